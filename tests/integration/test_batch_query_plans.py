"""The batch API's statements are served by indexes too: no full scan of either table.

As in ``test_query_plans.py``: each statement runs once with ``EXPLAIN`` (Postgres, sequential
scans priced out) or ``EXPLAIN QUERY PLAN`` (SQLite) in front of it, with the engine's own
statement objects and real parameters (the id lists bound as the dialect binds them). Nothing
is executed. Scanning the bound id list itself (``unnest``, ``json_each``) is expected; scanning
``ordering_events`` or ``ordering_followers`` is not.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import pytest
from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ordering_sql.schema import followers
from ordering_sql.store._dialects import dialect_for
from ordering_sql.store._queries import params, queries_for
from tests.conftest import BACKENDS
from tests.support import FULL_SCAN
from tests.support import explaining as explaining_connection

NOW = datetime.now(UTC)
#: An index used for the scope alone: every row of the scope is read and filtered. The id list
#: must be part of the index condition (Postgres) or of the search key (SQLite).
SCOPE_ONLY = re.compile(
    r"(Index Cond: \(\(scope\)::text = '[^']*'::text\)$|^SEARCH ordering_\w+ .*\(scope=\?\)$)",
    re.MULTILINE,
)
#: Postgres only: rows in the plans' own scope, so that a scope-wide scan is not free.
ROWS = 5_000
FILLER = {
    "ordering_events (scope, event_id, expires_at)": "'plans', gen_random_uuid(), now()",
    "ordering_followers (scope, follower_id, leader_id, occurred, received, event)": (
        "'plans', gen_random_uuid(), gen_random_uuid(), now(), now(), '{}'"
    ),
}


def _statements(dialect: str) -> dict[str, tuple[Any, dict[str, Any]]]:
    q = queries_for(dialect)
    scope, owner = "plans", uuid4()
    ids = q.bind_ids([uuid4() for _ in range(5)])
    leaders = q.bind_ids([uuid4() for _ in range(3)])
    statements: dict[str, tuple[Any, dict[str, Any]]] = {
        "acquire_many: take a batch's leases": (
            q.acquire_many,
            params(scope=scope, owner=owner, now=NOW, lease_until=NOW, ids=ids),
        ),
        "marks_many: read the leaders' marks": (q.marks_many, params(scope=scope, ids=ids)),
        "release_many: end a failed batch's leases": (
            q.release_many,
            params(scope=scope, owner=owner, now=NOW, ids=ids),
        ),
        "renew_claims: renew the claims of a replay": (
            q.renew_claims,
            params(scope=scope, owner=owner, claimed_until=NOW, leaders=leaders),
        ),
        "done_many: mark a batch seen": (
            q.done_many,
            params(scope=scope, owner=owner, now=NOW, seen_until=NOW, ids=ids),
        ),
        "forget_many: forget the batch's own parked rows": (
            q.forget_many,
            params(scope=scope, ids=ids),
        ),
        "claim_many: claim the followers of the batch's leaders": (
            q.claim_many,
            params(scope=scope, owner=owner, now=NOW, claimed_until=NOW, ids=ids, leaders=leaders),
        ),
    }
    if q.single_statement_steps:
        statements["complete_many_statement: complete a batch in one statement"] = (
            q.complete_many_statement,
            params(scope=scope, owner=owner, now=NOW, seen_until=NOW, claimed_until=NOW, ids=ids),
        )
    return statements


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Plans depend on the statements, not on who sends them: one Postgres run is enough."""
    return str(request.param)


@pytest.fixture
async def explaining(database_url: str) -> AsyncIterator[tuple[AsyncConnection, list[str]]]:
    async with explaining_connection(database_url, filler=FILLER, rows=ROWS) as explained:
        yield explained


async def test_every_batch_statement_uses_an_index(
    explaining: tuple[AsyncConnection, list[str]],
) -> None:
    conn, plans = explaining
    dialect = dialect_for(conn.dialect.name)
    # Controls first: an id list matched against an unindexed column shows up in the checks,
    # as a full scan without the scope and as a scope-wide scan with it.
    values = params(scope="plans", ids=dialect.bind_ids([uuid4()]))
    unindexed = dialect.in_ids(followers.c.claimed_by, "ids")
    await conn.execute(select(followers.c.follower_id).where(unindexed), values)
    assert FULL_SCAN.search(plans[-1]), plans[-1]
    in_scope = followers.c.scope == bindparam("p_scope")
    await conn.execute(select(followers.c.follower_id).where(in_scope, unindexed), values)
    assert SCOPE_ONLY.search(plans[-1]), plans[-1]
    plans.clear()

    statements = _statements(conn.dialect.name)
    # Postgres completes a batch in one statement; SQLite in done + forget (+ claim).
    assert ("complete_many_statement: complete a batch in one statement" in statements) == (
        conn.dialect.name == "postgresql"
    )
    scans = {}
    for name, (statement, values) in statements.items():
        await conn.execute(statement, values)
        if FULL_SCAN.search(plans[-1]) or SCOPE_ONLY.search(plans[-1]):
            scans[name] = plans[-1]
    assert len(plans) == len(statements)
    assert not scans, "\n\n".join(
        f"{name} scans a whole table or scope:\n{plan}" for name, plan in scans.items()
    )
