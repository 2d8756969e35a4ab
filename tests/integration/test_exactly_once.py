"""``exactly_once`` and ``exactly_once_batch``: the block's effects and the event's completion
commit together or not at all, on every backend, behind the engine's own pool and a host's.

Effects go to an ``effects`` table in the ordering's database that has no unique constraint, so
a second handling would show as a second row.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine

from ordering_sql import CausalOrdering
from ordering_sql.errors import (
    EventArrivedEarly,
    EventBeingProcessed,
    LeaseLostError,
    MaxDepthExceeded,
)
from ordering_sql.models import ReceivedEvent
from tests.conftest import BACKENDS, OrderingFactory
from tests.support import Clock, make_event

INSERT = text("INSERT INTO effects (event_id, note) VALUES (:id, :note)")


class Boom(Exception):
    pass


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The block's transaction and its completion go through SQLAlchemy on both Postgres paths:
    one Postgres run is enough (the engine's own tests cover the steps around them)."""
    return str(request.param)


@pytest.fixture
async def effects(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine of the test's own on the ordering's database, with an ``effects`` table."""
    engine = create_async_engine(database_url)
    async with engine.begin() as conn:
        await conn.execute(
            text("CREATE TABLE effects (event_id VARCHAR(36) NOT NULL, note VARCHAR(40))")
        )
    yield engine
    await engine.dispose()


async def rows(engine: AsyncEngine) -> list[tuple[str, str]]:
    async with engine.connect() as conn:
        found = await conn.execute(text("SELECT event_id, note FROM effects"))
        return [(row[0], row[1]) for row in found]


async def write(conn: AsyncConnection, event: ReceivedEvent, note: str = "handled") -> None:
    await conn.execute(INSERT, {"id": str(event.id), "note": note})


def recursive(
    ordering: CausalOrdering[Any], order: list[UUID] | None = None
) -> Callable[[ReceivedEvent, int], Any]:
    """The usual handler, through ``exactly_once``: one effect row per handling."""

    async def handler(event: ReceivedEvent, depth: int = 0) -> None:
        async with ordering.exactly_once(handler, event, depth) as conn:
            await write(conn, event)
            if order is not None:
                order.append(event.id)

    return handler


async def test_the_effect_and_the_completion_commit_together(
    ordering: CausalOrdering[Any], effects: AsyncEngine
) -> None:
    event = make_event()
    async with ordering.exactly_once(recursive(ordering), event) as conn:
        await write(conn, event)
        assert not await ordering.event_has_been_seen(event)  # not committed yet
        assert await rows(effects) == []  # the effect neither
    assert await rows(effects) == [(str(event.id), "handled")]
    assert await ordering.event_has_been_seen(event)
    assert not await ordering.event_has_started_processing(event)


async def test_an_effect_written_through_a_session_bound_to_the_connection(
    ordering: CausalOrdering[Any], effects: AsyncEngine
) -> None:
    event = make_event()
    async with ordering.exactly_once(recursive(ordering), event) as conn:
        session = AsyncSession(bind=conn)
        await session.execute(INSERT, {"id": str(event.id), "note": "session"})
        await session.flush()
    assert await rows(effects) == [(str(event.id), "session")]
    assert await ordering.event_has_been_seen(event)


async def test_a_block_that_raises_rolls_its_effects_back_and_releases_the_lease(
    ordering: CausalOrdering[Any], effects: AsyncEngine
) -> None:
    event = make_event()

    async def attempt() -> None:
        async with ordering.exactly_once(recursive(ordering), event) as conn:
            await write(conn, event, "rolled back")
            raise Boom

    with pytest.raises(Boom):
        await attempt()
    assert await rows(effects) == []
    assert not await ordering.event_has_been_seen(event)
    assert not await ordering.event_has_started_processing(event)  # released, not left to expire
    # The redelivery is handled at once, and only its effect remains.
    await recursive(ordering)(event, 0)
    assert await rows(effects) == [(str(event.id), "handled")]


async def test_an_event_already_handled_does_not_run_the_block(
    ordering: CausalOrdering[Any], effects: AsyncEngine
) -> None:
    event = make_event()
    handler = recursive(ordering)
    await handler(event, 0)
    ran = []

    async def attempt() -> None:
        async with ordering.exactly_once(handler, event) as conn:
            ran.append(True)
            await write(conn, event, "again")

    with pytest.raises(EventBeingProcessed):
        await attempt()
    assert not ran
    assert await rows(effects) == [(str(event.id), "handled")]


async def test_an_event_held_by_another_worker_does_not_run_the_block(
    ordering: CausalOrdering[Any], effects: AsyncEngine
) -> None:
    event = make_event()
    assert await ordering.record_event_as_processing(event)
    with pytest.raises(EventBeingProcessed):
        async with ordering.exactly_once(recursive(ordering), event):
            pytest.fail("the block ran while another worker held the event")
    assert await rows(effects) == []


async def test_an_early_follower_is_parked_without_running_the_block(
    ordering: CausalOrdering[Any], effects: AsyncEngine
) -> None:
    leader = make_event()
    follower = make_event(follows=leader)
    with pytest.raises(EventArrivedEarly):
        async with ordering.exactly_once(recursive(ordering), follower):
            pytest.fail("the block ran before the leader")
    assert await rows(effects) == []
    assert [e.id for e in await ordering.get_followers(leader)] == [follower.id]


async def test_too_deep_a_replay_does_not_run_the_block(
    make_ordering: OrderingFactory, effects: AsyncEngine
) -> None:
    ordering = make_ordering(max_depth_of_preceding_event=2)
    with pytest.raises(MaxDepthExceeded):
        async with ordering.exactly_once(recursive(ordering), make_event(), depth=3):
            pytest.fail("the block ran past the maximum depth")
    assert await rows(effects) == []


async def test_released_followers_are_replayed_through_exactly_once_in_order(
    ordering: CausalOrdering[Any], effects: AsyncEngine
) -> None:
    """A chain delivered backwards: each follower parks; the leader's handling replays the
    chain through the recursive handler, each link in its own transaction, after its leader's
    commit."""
    first = make_event()
    second = make_event(follows=first)
    third = make_event(follows=second)
    order: list[UUID] = []
    handler = recursive(ordering, order)
    for early in (third, second):
        with pytest.raises(EventArrivedEarly):
            await handler(early, 0)
    await handler(first, 0)
    assert order == [first.id, second.id, third.id]
    assert sorted(await rows(effects)) == sorted((str(i), "handled") for i in order)
    for event in (first, second, third):
        assert await ordering.event_has_been_seen(event)
    assert await ordering.get_followers(first) == []
    assert await ordering.get_followers(second) == []


async def test_a_takeover_while_waiting_for_the_leader_rolls_the_effects_back(
    make_ordering: OrderingFactory, clock: Clock, effects: AsyncEngine, backend: str
) -> None:
    """The follower's worker waits for its leader in flight; meanwhile its own lease is taken
    over (by a worker whose clock is an hour ahead, so the lease looks expired to it). When the
    leader is done: on Postgres the block runs and its completion finds the lease gone; on
    SQLite the transaction finds it gone as it begins (it takes the lease again first: no
    takeover can happen *during* the block there, which holds the file's write lock) and the
    block does not run. Either way ``LeaseLostError`` and nothing of the block is committed."""
    ordering = make_ordering(in_flight_event_timeout=30)
    other = make_ordering()
    ahead = Clock(clock.now + timedelta(hours=1))
    usurper = make_ordering(clock=ahead)
    leader = make_event()
    follower = make_event(follows=leader)
    assert await other.record_event_as_processing(leader)
    ran = asyncio.Event()

    async def handle() -> None:
        async with ordering.exactly_once(recursive(ordering), follower) as conn:
            await write(conn, follower)
            ran.set()

    task = asyncio.create_task(handle())
    for _ in range(500):  # the follower's worker takes its lease, then waits for the leader
        if await ordering.event_has_started_processing(follower):
            break
        await asyncio.sleep(0.01)
    assert await usurper.record_event_as_processing(follower)  # the takeover
    await other.record_event_as_seen(leader)
    await other.forget_event_is_processing(leader)
    with pytest.raises(LeaseLostError):
        await task
    assert ran.is_set() == (backend != "sqlite")
    assert await rows(effects) == []
    assert not await ordering.event_has_been_seen(follower)
    assert await usurper.event_has_started_processing(follower)  # still the usurper's


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_a_takeover_during_the_block_rolls_the_effects_back(
    make_ordering: OrderingFactory, clock: Clock, effects: AsyncEngine
) -> None:
    """Postgres: the block's transaction does not lock the lease, so a worker that sees it
    expired can take it over while the block runs; the completion then fails its owner check."""
    ordering = make_ordering()
    usurper = make_ordering(clock=Clock(clock.now + timedelta(hours=1)))
    event = make_event()

    async def attempt() -> None:
        async with ordering.exactly_once(recursive(ordering), event) as conn:
            await write(conn, event)
            assert await usurper.record_event_as_processing(event)

    with pytest.raises(LeaseLostError):
        await attempt()
    assert await rows(effects) == []
    assert not await ordering.event_has_been_seen(event)


async def test_behind_a_host_applications_engine(
    database_url: str, clock: Clock, effects: AsyncEngine
) -> None:
    """``CausalOrdering(engine=...)``: the block's transaction is on a connection of the host's
    pool, which has nothing checked out once the block and its replays are done."""
    host = create_async_engine(database_url)
    ordering: CausalOrdering[Any] = CausalOrdering("host", engine=host, clock=clock)
    try:
        leader = make_event()
        follower = make_event(follows=leader)
        handler = recursive(ordering)
        with pytest.raises(EventArrivedEarly):
            await handler(follower, 0)
        await handler(leader, 0)
        assert sorted(await rows(effects)) == sorted(
            [(str(leader.id), "handled"), (str(follower.id), "handled")]
        )
        assert host.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await ordering.close()
        await host.dispose()


# -- batches ------------------------------------------------------------------------------------


async def test_a_batch_commits_its_effects_with_its_completion(
    ordering: CausalOrdering[Any], effects: AsyncEngine
) -> None:
    leader = make_event()
    follower = make_event(follows=leader)
    orphan_leader = make_event()
    parked = make_event(follows=orphan_leader)
    handled_before = make_event()
    handler = recursive(ordering)
    await handler(handled_before, 0)
    events = [follower, leader, parked, handled_before, leader]
    async with ordering.exactly_once_batch(handler, events) as (batch, conn):
        assert [e.id for e in batch] == [leader.id, follower.id]
        for event in batch:
            await write(conn, event, "batch")
        assert not await ordering.event_has_been_seen(leader)
    assert [e.id for e in batch.parked] == [parked.id]
    assert {e.id for e in batch.skipped} == {handled_before.id, leader.id}
    assert sorted(await rows(effects)) == sorted(
        [
            (str(handled_before.id), "handled"),
            (str(leader.id), "batch"),
            (str(follower.id), "batch"),
        ]
    )
    for event in (leader, follower):
        assert await ordering.event_has_been_seen(event)
    # The parked follower's leader arrives alone: the follower is replayed, exactly once.
    async with ordering.exactly_once_batch(handler, [orphan_leader]) as (batch, conn):
        for event in batch:
            await write(conn, event, "batch")
    assert [e.id for e in batch.replayed] == [parked.id]
    assert (str(parked.id), "handled") in await rows(effects)
    assert await ordering.event_has_been_seen(parked)


async def test_a_batch_whose_block_raises_records_nothing(
    ordering: CausalOrdering[Any], effects: AsyncEngine
) -> None:
    events = [make_event(), make_event()]

    async def attempt() -> None:
        async with ordering.exactly_once_batch(recursive(ordering), events) as (batch, conn):
            for event in batch:
                await write(conn, event)
            raise Boom

    with pytest.raises(Boom):
        await attempt()
    assert await rows(effects) == []
    for event in events:
        assert not await ordering.event_has_been_seen(event)
        assert not await ordering.event_has_started_processing(event)


async def test_a_batch_with_nothing_ready_still_gives_a_connection(
    ordering: CausalOrdering[Any], effects: AsyncEngine
) -> None:
    event = make_event()
    await recursive(ordering)(event, 0)
    async with ordering.exactly_once_batch(recursive(ordering), [event]) as (batch, conn):
        assert list(batch) == []
        assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
    assert [e.id for e in batch.skipped] == [event.id]


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_a_batch_with_one_lease_taken_over_records_none_of_it(
    make_ordering: OrderingFactory, clock: Clock, effects: AsyncEngine
) -> None:
    """The effects of a batch cannot be told apart by event, so one lost lease rolls back the
    whole batch; the leases still held are released, so the redelivered batch goes ahead."""
    ordering = make_ordering()
    usurper = make_ordering(clock=Clock(clock.now + timedelta(hours=1)))
    kept, lost = make_event(), make_event()

    async def attempt() -> None:
        async with ordering.exactly_once_batch(recursive(ordering), [kept, lost]) as (batch, c):
            for event in batch:
                await write(c, event)
            assert await usurper.record_event_as_processing(lost)

    with pytest.raises(LeaseLostError, match="nothing of this batch was recorded"):
        await attempt()
    assert await rows(effects) == []
    assert not await ordering.event_has_been_seen(kept)
    assert not await ordering.event_has_started_processing(kept)


async def test_a_commit_that_fails_leaves_the_event_unhandled(
    ordering: CausalOrdering[Any], effects: AsyncEngine
) -> None:
    """The completion is in the block's own transaction, not committed before it: an effect
    that the database refuses only at COMMIT (a deferred foreign key) takes the seen mark down
    with it, and the lease is released for the redelivery."""
    async with effects.begin() as conn:
        await conn.execute(text("CREATE TABLE parents (id VARCHAR(36) PRIMARY KEY)"))
        await conn.execute(
            text(
                "CREATE TABLE children (parent_id VARCHAR(36) NOT NULL REFERENCES parents (id)"
                " DEFERRABLE INITIALLY DEFERRED)"
            )
        )
    event = make_event()

    async def attempt() -> None:
        async with ordering.exactly_once(recursive(ordering), event) as conn:
            await write(conn, event)
            await conn.execute(text("INSERT INTO children (parent_id) VALUES ('nobody')"))

    with pytest.raises(IntegrityError):
        await attempt()
    assert await rows(effects) == []
    assert not await ordering.event_has_been_seen(event)
    assert not await ordering.event_has_started_processing(event)


async def test_observed_statements_include_the_blocks_begin_and_commit(
    ordering: CausalOrdering[Any], effects: AsyncEngine
) -> None:
    """``observe_statements`` sees the block's transaction whole, on every path."""
    event = make_event()
    seen: list[str] = []
    async with (
        ordering.observe_statements(seen.append),
        ordering.exactly_once(recursive(ordering), event) as conn,
    ):
        await write(conn, event)
    texts = [sql.strip().split()[0].upper() for sql in seen]
    effect = next(i for i, sql in enumerate(seen) if "INTO effects" in sql)
    control = [t for t in texts[:effect] if t in ("BEGIN", "COMMIT")]
    assert control, seen
    assert control[-1] == "BEGIN", seen  # the block's transaction is open
    assert "COMMIT" in texts[effect:], seen
