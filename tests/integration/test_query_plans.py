"""Every statement of the steps is served by an index: no full table scan, proven by the planner.

Each statement of ``store/postgres.py`` and ``store/sqlite.py`` (their ``STATEMENTS``) runs once
with ``EXPLAIN`` (Postgres, with sequential scans priced out, so the planner shows whether an
index *can* serve it at all, on tables holding rows of the plans' own scope so that a scope-wide
scan is not free) or ``EXPLAIN QUERY PLAN`` (SQLite) put in front of it, with real parameters.
Nothing is executed: neither form runs the statement. Scanning the bound arrays (``unnest``) is
expected; scanning ``ordering_events`` or ``ordering_followers`` is not, nor reading a whole
scope where the statement names its events.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from ordering_sql.settings import Settings
from ordering_sql.store import Store, postgres, sqlite
from tests.conftest import BACKENDS, _asyncpg_dsn

NOW = datetime.now(UTC)
SCOPE = "plans"

#: A plan line that reads a whole ordering table (Postgres; SQLite, by table or alias).
FULL_SCAN = re.compile(r"(Seq Scan on ordering_\w+|^SCAN (ordering_\w+|[a-z])$)", re.MULTILINE)
#: An index used for the scope alone, where a statement names its events: every row of the
#: scope is read and filtered.
SCOPE_ONLY = re.compile(
    r"(Index Cond: \(\(scope\)::text = '[^']*'::text\)$|^SEARCH \w+ .*\(scope=\?\)$)",
    re.MULTILINE,
)
#: Statements that look at a whole scope by design: the sweep and its peek (by the lost
#: conditions, served by the scope's indexes) and the purge (by expiry).
SCOPE_WIDE = {"sweep", "peek_lost", "drop_handled_lost", "purge"}
ROWS = 5_000


def _ids(n: int = 3) -> list[Any]:
    return [uuid4() for _ in range(n)]


def _postgres_args() -> dict[str, tuple[Any, ...]]:
    ids, scopes, times, one = _ids(), [SCOPE] * 3, [NOW] * 3, uuid4()
    return {
        "take": (scopes, ids, _ids(), times, NOW, scopes, _ids()),
        "marks": (scopes, ids),
        "complete": (scopes, ids, _ids(), times, times, [True] * 3, NOW),
        "claim_again": (scopes, ids, _ids(), times, scopes, _ids(), NOW),
        "park": (
            NOW,
            scopes,
            ids,
            [True, False, True],
            times,
            [None, uuid4(), None],
            scopes,
            _ids(),
            ids,
            times,
            times,
            ["{}"] * 3,
            [True] * 3,
        ),
        "release": (NOW, scopes, ids, _ids()),
        "renew_claims": (scopes, ids, _ids(), times),
        "sweep": (SCOPE, NOW, NOW, NOW, one, NOW),
        "peek_lost": (SCOPE, NOW, NOW, NOW),
        "mark_seen": (SCOPE, ids, NOW),
        "forget_followers": (SCOPE, ids),
        "followers_of": (SCOPE, one),
        "followers_by_id": (SCOPE, ids),
        "purge": (NOW, 100),
    }


def _sqlite_args() -> dict[str, dict[str, Any]]:
    t, one, other = NOW.strftime("%Y-%m-%d %H:%M:%S.%f"), uuid4().hex, uuid4().hex
    every = {
        "scope": SCOPE,
        "event_id": one,
        "leader_id": other,
        "owner": uuid4().hex,
        "now": t,
        "lease_until": t,
        "seen_until": t,
        "claimed_until": t,
        "hold_until": t,
        "horizon": t,
        "seen_cutoff": t,
        "occurred": t,
        "received": t,
        "event": "{}",
        "limit": 100,
    }
    return dict.fromkeys(sqlite.STATEMENTS, every)


Explain = Callable[[str, Any], Any]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Plans depend on the statements, not on who sends them: one Postgres run is enough."""
    return str(request.param)


@pytest.fixture
async def explain(
    backend: str, database_url: str
) -> AsyncIterator[tuple[str, Callable[[str, Any], Any]]]:
    """(backend, explain(sql, args) -> the plan as text) on a fresh migrated database."""
    url = database_url
    if backend == "sqlite":
        conn = sqlite3.connect(str(make_url(url).database))
        try:

            async def on_sqlite(sql: str, args: Any) -> str:
                rows = conn.execute(f"EXPLAIN QUERY PLAN {sql}", args).fetchall()
                return "\n".join(str(row[-1]) for row in rows)

            yield "sqlite", on_sqlite
        finally:
            conn.close()
        return
    pg = await asyncpg.connect(_asyncpg_dsn(url))
    try:
        async with pg.transaction():
            await pg.execute(
                "INSERT INTO ordering_events (scope, event_id, expires_at)"
                f" SELECT '{SCOPE}', gen_random_uuid(), now() FROM generate_series(1, {ROWS})"
            )
            await pg.execute(
                "INSERT INTO ordering_followers"
                " (scope, follower_id, leader_id, occurred, received, event)"
                f" SELECT '{SCOPE}', gen_random_uuid(), gen_random_uuid(), now(), now(), '{{}}'"
                f" FROM generate_series(1, {ROWS})"
            )
        await pg.execute("ANALYZE ordering_events, ordering_followers")
        await pg.execute("SET enable_seqscan = off")

        async def on_postgres(sql: str, args: Any) -> str:
            rows = await pg.fetch(f"EXPLAIN {sql}", *args)
            return "\n".join(row[0].strip() for row in rows)

        yield "postgres", on_postgres
    finally:
        await pg.close()


async def test_every_statement_uses_an_index(
    explain: tuple[str, Callable[[str, Any], Any]],
) -> None:
    backend, run = explain
    statements = postgres.STATEMENTS if backend == "postgres" else sqlite.STATEMENTS
    args: dict[str, Any] = _postgres_args() if backend == "postgres" else _sqlite_args()
    assert set(args) == set(statements), "a statement without sample parameters"
    scans = {}
    for name, sql in statements.items():
        plan = await run(sql, args[name])
        if FULL_SCAN.search(plan) or (name not in SCOPE_WIDE and SCOPE_ONLY.search(plan)):
            scans[name] = plan
    assert not scans, "\n\n".join(
        f"{name} scans a table or scope:\n{plan}" for name, plan in scans.items()
    )


async def test_a_full_scan_would_be_caught(
    explain: tuple[str, Callable[[str, Any], Any]],
) -> None:
    """Controls: a lookup on an unindexed column shows up as a full scan, and with the scope
    as a scope-wide scan, in the same checks."""
    backend, run = explain
    if backend == "postgres":
        full = await run("SELECT follower_id FROM ordering_followers WHERE event = $1", ("x",))
        scoped = await run(
            "SELECT follower_id FROM ordering_followers WHERE scope = $1 AND event = $2",
            (SCOPE, "x"),
        )
    else:
        full = await run("SELECT follower_id FROM ordering_followers WHERE event = ?", ("x",))
        scoped = await run(
            "SELECT follower_id FROM ordering_followers WHERE scope = ? AND event = ?",
            (SCOPE, "x"),
        )
    assert FULL_SCAN.search(full), full
    assert SCOPE_ONLY.search(scoped), scoped


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("pooler", "own", "expected"),
    [
        ("none", True, "force_generic_plan"),
        ("session", True, "force_generic_plan"),
        ("transaction", True, "auto"),
        ("none", False, "auto"),
    ],
)
async def test_generic_plans_are_set_on_our_own_postgres_sessions_only(
    postgres_url: str, pooler: str, own: bool, expected: str
) -> None:
    """The engine's own connections plan the steps' array statements generically, set after
    connecting (a startup parameter would be refused by pgbouncer); a transaction pooler would
    not keep the setting, and a host application's engine keeps its sessions as they are."""
    if own:
        store = Store.from_settings(Settings(database_url=postgres_url, pooler=pooler))
    else:
        store = Store.from_engine(create_async_engine(postgres_url))
    try:
        async with store.engine.connect() as conn:
            found = (await conn.execute(text("SHOW plan_cache_mode"))).scalar_one()
    finally:
        await store.dispose()
        if not own:
            await store.engine.dispose()
    assert found == expected
