"""Every hot statement is served by an index: no full table scan, proven by the planner.

Each statement runs once with ``EXPLAIN`` (Postgres, with sequential scans priced out so the
planner shows whether an index *can* serve the query at all) or ``EXPLAIN QUERY PLAN`` (SQLite)
put in front of it, so the statements checked are exactly the ones the engine sends, with their
real parameters. Nothing is executed: neither form runs the statement.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from ordering_sql.schema import followers
from ordering_sql.store._queries import params, queries_for
from tests.conftest import BACKENDS
from tests.support import FULL_SCAN
from tests.support import explaining as explaining_connection

NOW = datetime.now(UTC)


def _statements(dialect: str) -> dict[str, tuple[Any, dict[str, Any]]]:
    q = queries_for(dialect)
    scope, event_id, owner, leader_id = "plans", uuid4(), uuid4(), uuid4()
    return {
        "take the lease (and read the leader)": (
            q.acquire,
            params(
                scope=scope,
                event_id=event_id,
                owner=owner,
                now=NOW,
                lease_until=NOW,
                leader_id=uuid4(),
            ),
        ),
        "read an event's marks": (q.marks, params(scope=scope, event_id=event_id)),
        "complete an event": (
            q.complete_and_claim if q.single_statement_steps else q.mark_done,
            params(
                scope=scope,
                event_id=event_id,
                owner=owner,
                seen_until=NOW,
                now=NOW,
                leader_id=event_id,
                claimed_until=NOW,
            ),
        ),
        "park a follower": (
            q.park_if_leader_unseen if q.single_statement_steps else q.flag_leader,
            params(
                scope=scope,
                event_id=event_id,
                owner=owner,
                now=NOW,
                leader_id=leader_id,
                ids=q.bind_ids(sorted([event_id, leader_id])),
                hold_until=NOW,
                occurred=NOW,
                received=NOW,
                event="{}",
            ),
        ),
        "store a follower": (
            q.store_follower,
            params(
                scope=scope,
                event_id=event_id,
                leader_id=uuid4(),
                occurred=NOW,
                received=NOW,
                event="{}",
            ),
        ),
        "forget the completed event's own parked row": (
            q.forget_follower,
            params(scope=scope, event_id=event_id),
        ),
        "claim a leader's followers": (
            q.claim_followers,
            params(scope=scope, leader_id=event_id, owner=owner, now=NOW, claimed_until=NOW),
        ),
        "look up followers by leader": (
            q.followers_of,
            params(scope=scope, leader_id=event_id),
        ),
        "followers by id": (
            q.followers_by_id,
            params(scope=scope, ids=q.bind_ids([uuid4(), uuid4()])),
        ),
        "lost-follower sweep": (
            q.take_lost,
            params(
                scope=scope,
                now=NOW,
                horizon=NOW,
                seen_cutoff=NOW,
                owner=owner,
                claimed_until=NOW,
            ),
        ),
        "lost-follower sweep: drop the handled ones": (
            q.drop_handled_lost,
            params(scope=scope, now=NOW, horizon=NOW, seen_cutoff=NOW),
        ),
        "lost-follower peek": (
            q.peek_lost,
            params(scope=scope, now=NOW, horizon=NOW, seen_cutoff=NOW),
        ),
        "purge": (q.purge_events, params(now=NOW, limit=100)),
        "release a lease": (
            q.release,
            params(scope=scope, event_id=event_id, owner=owner, now=NOW),
        ),
    }


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Plans depend on the statements, not on who sends them: one Postgres run is enough."""
    return str(request.param)


@pytest.fixture
async def explaining(database_url: str) -> AsyncIterator[tuple[AsyncConnection, list[str]]]:
    async with explaining_connection(database_url) as explained:
        yield explained


@pytest.mark.parametrize("name", list(_statements("sqlite")))
async def test_statement_uses_an_index(
    explaining: tuple[AsyncConnection, list[str]], name: str
) -> None:
    conn, plans = explaining
    statement, values = _statements(conn.dialect.name)[name]
    await conn.execute(statement, values)
    plan = plans[-1]
    assert not FULL_SCAN.search(plan), f"{name} scans a whole table:\n{plan}"


async def test_a_full_scan_would_be_caught(explaining: tuple[AsyncConnection, list[str]]) -> None:
    """Control: a lookup on an unindexed column shows up as a full scan in the same check."""
    conn, plans = explaining
    await conn.execute(select(followers.c.follower_id).where(followers.c.event == "x"))
    assert FULL_SCAN.search(plans[-1]), plans[-1]
