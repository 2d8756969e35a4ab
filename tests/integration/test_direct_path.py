"""Postgres's direct path: the steps' statements sent to asyncpg past SQLAlchemy (``_driver.py``).

The rest of the suite runs every engine behaviour through it on Postgres. Here: that it returns
what SQLAlchemy returns, and that its connections are handled as carefully as the pool's own:
given back after a unit that raised, kept after a statement the server refused, retired after
a cancelled statement or a terminated session, never hoarded from a host application's pool,
and leaving room in the pool for the units SQLAlchemy still runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import QueuePool

from ordering_sql import CausalOrdering, LeaseLostError, StoreError, dispose_engines
from ordering_sql.settings import ENV_DIRECT_DRIVER, ENV_ECHO, ENV_POOL_SIZE
from ordering_sql.store import Store
from ordering_sql.store._driver import DriverConnection, SqlAlchemyConnection
from tests.support import Clock, make_event

pytestmark = pytest.mark.postgres

BACKEND_PID = "SELECT pg_backend_pid()"


@pytest.fixture
async def ordering(postgres_url: str, clock: Clock) -> AsyncIterator[CausalOrdering[Any]]:
    ordering: CausalOrdering[Any] = CausalOrdering("direct", database_url=postgres_url, clock=clock)
    await ordering.check()
    yield ordering
    await ordering.close()
    await dispose_engines()


async def _store(ordering: CausalOrdering[Any]) -> Store:
    store = await ordering._db()
    assert store._units._direct is not None, "Postgres over asyncpg takes the direct path"
    return store


async def _pid(store: Store) -> int:
    async def work(conn: Any) -> int:
        assert isinstance(conn, DriverConnection)
        return int((await conn.fetch(BACKEND_PID))[0][0])

    return await store.run(work, action="test")


async def test_reads_return_what_sqlalchemy_returns(ordering: CausalOrdering[Any]) -> None:
    leader = make_event()
    followers = [make_event(follows=leader) for _ in range(3)]
    for follower in followers:
        await ordering.record_follower(follower)
    await ordering.record_event_as_seen(make_event())
    store = await _store(ordering)
    now, steps, ids = ordering._now(), store.steps, [f.id for f in followers]
    later = now + timedelta(hours=1)
    reads = [
        lambda c: steps.followers_of(c, "direct", leader.id),
        lambda c: steps.followers_by_id(c, "direct", ids),
        lambda c: steps.peek_lost(c, "direct", later, later, now),
        lambda c: steps.expired_counts(c, now + timedelta(days=1)),
        lambda c: steps.scope_counts(c, now, now),
    ]

    async def direct(conn: Any) -> list[Any]:
        assert isinstance(conn, DriverConnection)
        return [await read(conn) for read in reads]

    async with store.engine.connect() as conn:
        autocommit = SqlAlchemyConnection(
            await conn.execution_options(isolation_level="AUTOCOMMIT")
        )
        through_sqlalchemy = [await read(autocommit) for read in reads]
    through_driver = await store.run(direct, action="test")
    assert [_plain(r) for r in through_driver] == [_plain(r) for r in through_sqlalchemy]
    assert [len(rows) for rows in through_driver[:3]] == [3, 3, 3]


def _plain(value: Any) -> Any:
    """Rows of either driver as plain tuples, for comparing them."""
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


async def test_a_unit_that_raises_gives_its_connection_back(
    ordering: CausalOrdering[Any], clock: Clock
) -> None:
    store = await _store(ordering)
    first = await _pid(store)
    event = make_event()

    async def taken_over_while_handled() -> None:
        async with ordering.preceding_event_confirmed(_no_followers, event):
            clock.advance(ordering.lease_timeout * 2)
            assert await ordering.record_event_as_processing(event)  # another holder takes over

    with pytest.raises(LeaseLostError):
        await taken_over_while_handled()
    assert await _pid(store) == first
    assert _checked_out(store.engine) == 1, "the one kept connection, and no other"


async def test_a_refused_statement_keeps_the_connection(ordering: CausalOrdering[Any]) -> None:
    store = await _store(ordering)
    first = await _pid(store)

    async def divide_by_zero(conn: Any) -> None:
        await conn.fetch("SELECT 1 / 0")

    with pytest.raises(StoreError, match="DivisionByZeroError"):
        await store.run(divide_by_zero, action="test")
    assert await _pid(store) == first
    assert not await ordering.event_has_been_seen(make_event())


async def test_a_cancelled_statement_retires_its_connection(
    ordering: CausalOrdering[Any], caplog: pytest.LogCaptureFixture
) -> None:
    store = await _store(ordering)
    first = await _pid(store)

    async def sleep(conn: Any) -> None:
        await conn.fetch("SELECT pg_sleep(30)")

    task = asyncio.create_task(store.run(sleep, action="test"))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Left mid-statement, that connection is never handed out again; the next unit gets a
    # fresh one and runs at once.
    second = await asyncio.wait_for(_pid(store), timeout=5)
    assert second != first
    assert not await ordering.event_has_been_seen(make_event())
    assert "transient database fault" not in caplog.text, "a broken connection was handed out"


async def test_terminated_sessions_are_replaced(
    ordering: CausalOrdering[Any], postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = await _store(ordering)
    # Several kept connections: as many units at once.
    pids = set(await asyncio.gather(*(_pid_after_a_while(store) for _ in range(4))))
    assert len(pids) == 4
    await _terminate(postgres_url, pids)
    for _ in range(6):  # every kept connection is dead now; none may reach a caller
        assert not await ordering.event_has_been_seen(make_event())
    assert "transient database fault" in caplog.text
    assert not pids & set(await asyncio.gather(*(_pid_after_a_while(store) for _ in range(4))))


async def test_a_host_engine_lends_its_connections_per_unit(postgres_url: str) -> None:
    engine = create_async_engine(postgres_url)
    ordering: CausalOrdering[Any] = CausalOrdering("host", engine=engine)
    try:
        store = await _store(ordering)
        async with ordering.preceding_event_confirmed(_no_followers, make_event()):
            pass
        await asyncio.gather(*(_pid_after_a_while(store) for _ in range(3)))
        assert _checked_out(engine) == 0, "a host application's pool is never drained"
    finally:
        await ordering.close()
        await engine.dispose()


async def test_kept_connections_leave_the_pool_room_for_sqlalchemy_units(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_POOL_SIZE, "1")  # one kept connection, one more in the pool
    ordering: CausalOrdering[Any] = CausalOrdering("room", database_url=postgres_url)
    try:
        store = await _store(ordering)
        await asyncio.gather(*(_pid_after_a_while(store) for _ in range(3)))
        assert _checked_out(store.engine) == 1
        # A schema check or migration is SQLAlchemy's: it must find a connection at once.
        await asyncio.wait_for(store.migrate(), timeout=5)
        await asyncio.wait_for(ordering.clear(), timeout=5)
        await asyncio.wait_for(_concurrent_transactions_and_steps(ordering), timeout=20)
    finally:
        await ordering.close()
        await dispose_engines()


async def test_closing_gives_every_kept_connection_back(postgres_url: str) -> None:
    ordering: CausalOrdering[Any] = CausalOrdering("closing", database_url=postgres_url)
    store = await _store(ordering)
    pids = set(await asyncio.gather(*(_pid_after_a_while(store) for _ in range(3))))
    await ordering.close()  # the last user of the shared Store: its engine is disposed
    assert _checked_out(store.engine) == 0
    for _ in range(50):
        if not pids & await _live_pids(postgres_url):
            break
        await asyncio.sleep(0.1)
    assert not pids & await _live_pids(postgres_url), "sessions were left open"


async def test_echo_logs_the_direct_statements_too(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(ENV_ECHO, "1")
    ordering: CausalOrdering[Any] = CausalOrdering("echo", database_url=postgres_url)
    try:
        await ordering.check()
        with caplog.at_level(logging.INFO, logger="sqlalchemy.engine"):
            await ordering.record_event_as_seen(make_event())
    finally:
        await ordering.close()
        await dispose_engines()
    assert "[direct] INSERT INTO ordering_events" in caplog.text


async def test_the_direct_path_can_be_turned_off(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_DIRECT_DRIVER, "0")
    engine = create_async_engine(postgres_url)
    own: CausalOrdering[Any] = CausalOrdering("off", database_url=postgres_url)
    hosted: CausalOrdering[Any] = CausalOrdering("off", engine=engine)
    try:
        for ordering in (own, hosted):
            store = await ordering._db()
            assert store._units._direct is None
            async with ordering.preceding_event_confirmed(_no_followers, make_event()):
                pass
    finally:
        await own.close()
        await hosted.close()
        await engine.dispose()
        await dispose_engines()


async def test_a_connection_in_use_at_close_is_given_back_when_its_unit_ends(
    postgres_url: str,
) -> None:
    ordering: CausalOrdering[Any] = CausalOrdering("closing", database_url=postgres_url)
    await ordering.check()  # so that the unit below is the only user of a connection
    store = await _store(ordering)
    unit = asyncio.create_task(_pid_after_a_while(store))
    await asyncio.sleep(0.01)  # the unit holds its connection now
    await ordering.close()
    pid = await unit
    assert _checked_out(store.engine) == 0
    for _ in range(50):
        if pid not in await _live_pids(postgres_url):
            break
        await asyncio.sleep(0.1)
    assert pid not in await _live_pids(postgres_url), "the session was left open"


# -- helpers --------------------------------------------------------------------------------------


async def _no_followers(_event: Any, _depth: int = 0) -> None:
    msg = "no follower was parked"
    raise AssertionError(msg)


async def _pid_after_a_while(store: Store) -> int:
    """The backend that served a unit which held its connection a moment (so units overlap)."""

    async def work(conn: Any) -> int:
        pid = int((await conn.fetch(BACKEND_PID))[0][0])
        await conn.fetch("SELECT pg_sleep(0.05)")
        return pid

    return await store.run(work, action="test")


async def _concurrent_transactions_and_steps(ordering: CausalOrdering[Any]) -> None:
    async def handle() -> None:
        async with ordering.preceding_event_confirmed(_no_followers, make_event()):
            await asyncio.sleep(0.01)

    await asyncio.gather(*(handle() for _ in range(6)), *(ordering.clear() for _ in range(3)))


def _checked_out(engine: AsyncEngine) -> int:
    pool = engine.pool
    assert isinstance(pool, QueuePool)
    return pool.checkedout()


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _terminate(url: str, pids: set[int]) -> None:
    conn = await asyncpg.connect(_dsn(url))
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", sorted(pids)
        )
    finally:
        await conn.close()


async def _live_pids(url: str) -> set[int]:
    conn = await asyncpg.connect(_dsn(url))
    try:
        rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid()")
        return {int(row["pid"]) for row in rows}
    finally:
        await conn.close()
