"""Leases, seen marks and parking under real concurrency, on both backends.

Several coroutines (and, where it matters, two separate connection pools) compete for the same
rows; the database, not the Python event loop, has to decide who wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from datetime import timedelta
from typing import Any, TypeVar
from uuid import UUID

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ordering_sql import (
    CausalOrdering,
    EventArrivedEarly,
    EventBeingProcessed,
    LeaseLostError,
    ReceivedEvent,
)
from tests.conftest import OrderingFactory
from tests.support import Clock, chain, make_event

T = TypeVar("T")

#: Every test here must finish well within this many seconds.
TEST_TIMEOUT_S = 30.0


async def bounded(awaitable: Awaitable[T], seconds: float = TEST_TIMEOUT_S) -> T:
    return await asyncio.wait_for(awaitable, timeout=seconds)


@pytest.fixture
async def own_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine with its own connection pool on the test database (not the shared one)."""
    engine = create_async_engine(database_url)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def two_pools(
    make_ordering: OrderingFactory, own_engine: AsyncEngine
) -> tuple[CausalOrdering[Any], CausalOrdering[Any]]:
    """Two workers on the same database through two different connection pools."""
    shared = make_ordering()
    separate = make_ordering(engine=own_engine, database_url=None)
    return shared, separate


class Recorder:
    """The usual recursive handler; records (event id, depth) of every body that ran."""

    def __init__(
        self,
        ordering: CausalOrdering[Any],
        *,
        jitter: random.Random | None = None,
        handled: list[tuple[UUID, int]] | None = None,
    ) -> None:
        self.ordering = ordering
        self.jitter = jitter
        #: May be shared by several recorders: then it is the order in which all bodies ran.
        self.handled: list[tuple[UUID, int]] = [] if handled is None else handled

    async def handler(self, event: ReceivedEvent, depth: int = 0) -> None:
        async with self.ordering.preceding_event_confirmed(self.handler, event, depth):
            if self.jitter is not None:
                await asyncio.sleep(self.jitter.uniform(0, 0.004))
            self.handled.append((event.id, depth))

    async def deliver(self, event: ReceivedEvent) -> None:
        """The usual consumer: skip seen events; parked or held elsewhere means done."""
        if await self.ordering.event_has_been_seen(event.id):
            return
        with contextlib.suppress(EventArrivedEarly, EventBeingProcessed):
            await self.handler(event)


# -- the processing lease ------------------------------------------------------------------------


async def test_two_pools_racing_for_a_lease_have_exactly_one_winner(
    two_pools: tuple[CausalOrdering[Any], CausalOrdering[Any]],
) -> None:
    shared, separate = two_pools
    contenders_per_pool = 3

    async def race(event: ReceivedEvent) -> list[bool]:
        attempts = [
            ordering.record_event_as_processing(event)
            for _ in range(contenders_per_pool)
            for ordering in (shared, separate)
        ]
        return list(await asyncio.gather(*attempts))

    async def rounds() -> None:
        for round_no in range(50):
            event = make_event()
            results = await race(event)
            assert results.count(True) == 1, f"round {round_no}: {results}"
            # Both pools now agree that the event is held, and nobody else can take it.
            assert await shared.event_has_started_processing(event)
            assert await separate.event_has_started_processing(event)
            assert not await separate.record_event_as_processing(event)
            assert not await shared.record_event_as_processing(event)

    await bounded(rounds())


async def test_two_pools_racing_to_handle_an_event_run_its_body_once(
    two_pools: tuple[CausalOrdering[Any], CausalOrdering[Any]],
) -> None:
    """The whole protocol, raced: one body per event, everyone else is told it is taken."""
    shared, separate = two_pools
    bodies: Counter[UUID] = Counter()

    async def handle(ordering: CausalOrdering[Any], event: ReceivedEvent) -> str:
        try:
            async with ordering.event_is_processing(event):
                await asyncio.sleep(0)
                bodies[event.id] += 1
        except EventBeingProcessed:
            return "refused"
        return "ran"

    async def rounds() -> None:
        for round_no in range(30):
            event = make_event()
            outcomes = await asyncio.gather(
                *(handle(o, event) for _ in range(3) for o in (shared, separate))
            )
            assert sorted(outcomes) == ["ran"] + ["refused"] * 5, f"round {round_no}"
            assert bodies[event.id] == 1
            assert await separate.event_has_been_seen(event)
            assert not await shared.event_has_started_processing(event)

    await bounded(rounds())


@pytest.mark.parametrize("first_to_finish", ["old holder", "new holder"])
async def test_expired_lease_is_taken_over_and_the_old_holder_loses(
    make_ordering: OrderingFactory, clock: Clock, first_to_finish: str
) -> None:
    old = make_ordering(lease_timeout=5)
    new = make_ordering(lease_timeout=5)
    event = make_event()
    bodies: list[str] = []
    old_entered, old_may_finish = asyncio.Event(), asyncio.Event()
    new_entered, new_may_finish = asyncio.Event(), asyncio.Event()

    async def work(
        ordering: CausalOrdering[Any], name: str, entered: asyncio.Event, may_finish: asyncio.Event
    ) -> None:
        async with ordering.event_is_processing(event):
            entered.set()
            await may_finish.wait()
            bodies.append(name)

    async def scenario() -> None:
        old_task = asyncio.create_task(work(old, "old", old_entered, old_may_finish))
        await old_entered.wait()
        assert not await new.record_event_as_processing(event), "the lease is still live"
        clock.advance(timedelta(seconds=4, milliseconds=999))
        assert not await new.record_event_as_processing(event), "the lease is still live"

        clock.advance(timedelta(milliseconds=1))  # exactly lease_timeout after it was taken
        new_task = asyncio.create_task(work(new, "new", new_entered, new_may_finish))
        await new_entered.wait()

        if first_to_finish == "old holder":
            old_may_finish.set()
            with pytest.raises(LeaseLostError) as lost:
                await old_task
            # The old holder's result was not recorded, and it did not end the new lease.
            assert not await new.event_has_been_seen(event)
            assert await new.event_has_started_processing(event)
            new_may_finish.set()
            await new_task
        else:
            new_may_finish.set()
            await new_task
            assert await new.event_has_been_seen(event)
            old_may_finish.set()
            with pytest.raises(LeaseLostError) as lost:
                await old_task

        assert lost.value.event_id == event.id
        assert lost.value.scope == "test"
        assert await old.event_has_been_seen(event)
        assert not await old.event_has_started_processing(event)
        # Seen once: nobody can take the event again, whichever holder finished last.
        assert not await old.record_event_as_processing(event)
        assert not await new.record_event_as_processing(event)

    await bounded(scenario())
    assert sorted(bodies) == ["new", "old"]  # both bodies ran; only the new one counted


async def test_leader_that_lost_its_lease_does_not_claim_its_followers(
    make_ordering: OrderingFactory, clock: Clock
) -> None:
    old = Recorder(make_ordering(lease_timeout=5))
    new = Recorder(make_ordering(lease_timeout=5))
    leader = make_event(received=clock.now)
    followers = [
        make_event(follows=leader, occurred=clock.now + timedelta(seconds=i), received=clock.now)
        for i in range(2)
    ]
    for follower in followers:
        with pytest.raises(EventArrivedEarly):
            await old.handler(follower)

    old_entered, old_may_finish = asyncio.Event(), asyncio.Event()

    async def old_worker() -> None:
        async with old.ordering.preceding_event_confirmed(old.handler, leader):
            old_entered.set()
            await old_may_finish.wait()

    async def scenario() -> None:
        task = asyncio.create_task(old_worker())
        await old_entered.wait()
        clock.advance(6)
        assert await new.ordering.record_event_as_processing(leader), "takeover after expiry"
        old_may_finish.set()
        with pytest.raises(LeaseLostError):
            await task
        assert old.handled == [], "no follower may be replayed by a worker that lost its lease"
        assert await new.ordering.get_followers(leader) == followers
        assert not await new.ordering.event_has_been_seen(leader)

        # The lease taken over above is released, then the new worker handles the leader.
        await new.ordering.forget_event_is_processing(leader)
        await new.handler(leader)

    await bounded(scenario())
    assert new.handled == [(leader.id, 0), (followers[0].id, 1), (followers[1].id, 1)]
    assert await new.ordering.get_followers(leader) == []
    clock.advance(timedelta(minutes=20))
    assert await new.ordering.get_lost_followers() == []


async def test_forgetting_a_lease_that_was_taken_over_leaves_the_new_holder_alone(
    two_pools: tuple[CausalOrdering[Any], CausalOrdering[Any]], clock: Clock
) -> None:
    old, new = two_pools
    event = make_event()
    assert await old.record_event_as_processing(event)
    clock.advance(old.lease_timeout)
    assert await new.record_event_as_processing(event), "an expired lease can be taken over"
    await old.forget_event_is_processing(event)  # the old holder gives up what it thinks it has
    assert await new.event_has_started_processing(event)
    assert not await old.record_event_as_processing(event), "the new lease is still live"
    await new.forget_event_is_processing(event)
    assert not await old.event_has_started_processing(event)


# -- the seen mark -------------------------------------------------------------------------------


@pytest.mark.parametrize("marked_by", ["event_is_processing", "record_event_as_seen"])
async def test_seen_event_cannot_be_taken_until_the_seen_mark_expires(
    make_ordering: OrderingFactory, clock: Clock, marked_by: str
) -> None:
    ordering, other = make_ordering(), make_ordering()
    event = make_event()
    if marked_by == "event_is_processing":
        async with ordering.event_is_processing(event):
            pass
    else:
        await ordering.record_event_as_seen(event)

    assert not await ordering.record_event_as_processing(event)
    assert not await other.record_event_as_processing(event)
    with pytest.raises(EventBeingProcessed):
        async with other.event_is_processing(event):
            pytest.fail("a seen event must not be handled again")

    clock.advance(timedelta(minutes=29, seconds=59))
    assert await other.event_has_been_seen(event)
    assert not await other.record_event_as_processing(event)

    clock.advance(timedelta(seconds=1))  # SEEN_EXPIRATION (30 min) after it was marked
    assert not await other.event_has_been_seen(event)
    assert await other.record_event_as_processing(event)
    assert not await ordering.record_event_as_processing(event), "and now it is leased again"


async def test_duplicate_arriving_right_after_completion_is_refused(
    two_pools: tuple[CausalOrdering[Any], CausalOrdering[Any]],
) -> None:
    """The gap between "seen?" and taking the lease: the lease itself must refuse a seen event."""
    shared, separate = two_pools
    for _ in range(20):
        event = make_event()
        assert not await separate.event_has_been_seen(event)  # the duplicate's check passes...
        async with shared.event_is_processing(event):  # ...then the original completes
            pass
        assert not await separate.record_event_as_processing(event)
        assert not await separate.event_has_started_processing(event)


# -- parking against completion ------------------------------------------------------------------


@pytest.mark.parametrize(
    "in_flight_event_timeout",
    [pytest.param(0, id="park-at-once"), pytest.param(2, id="wait-for-in-flight-leader")],
)
async def test_follower_racing_its_leaders_completion_is_never_orphaned(
    make_ordering: OrderingFactory, clock: Clock, in_flight_event_timeout: float
) -> None:
    settings: dict[str, Any] = {
        "in_flight_event_timeout": in_flight_event_timeout,
        "poll_interval": 0.005,
        "lease_timeout": 60,
    }
    leader_side = Recorder(make_ordering(**settings))
    follower_side = Recorder(make_ordering(**settings))
    rng = random.Random(20240601)
    rounds = 40
    replayed = direct = 0

    async def one_round(round_no: int) -> None:
        nonlocal replayed, direct
        leader = make_event(received=clock.now)
        follower = make_event(follows=leader, received=clock.now)
        # Either side may start first; around equal starts, the follower's checks overlap the
        # leader's body and completion.
        lead_delay, follow_delay = rng.uniform(0, 0.02), rng.uniform(0, 0.01)
        body_time = rng.uniform(0, 0.01)

        async def lead() -> None:
            await asyncio.sleep(lead_delay)
            async with leader_side.ordering.preceding_event_confirmed(leader_side.handler, leader):
                await asyncio.sleep(body_time)
                leader_side.handled.append((leader.id, 0))

        async def follow() -> None:
            await asyncio.sleep(follow_delay)
            await follower_side.deliver(follower)

        await asyncio.gather(lead(), follow())

        everything = leader_side.handled + follower_side.handled
        handled_follower = [depth for event_id, depth in everything if event_id == follower.id]
        assert len(handled_follower) == 1, f"round {round_no}: follower ran {handled_follower}"
        if handled_follower == [1]:
            replayed += 1
        else:
            direct += 1
        assert await leader_side.ordering.event_has_been_seen(follower), f"round {round_no}"
        assert await leader_side.ordering.get_followers(leader) == [], f"round {round_no}"

    async def all_rounds() -> None:
        for round_no in range(rounds):
            await one_round(round_no)

    await bounded(all_rounds())

    # Both outcomes happened, so the race was really run from both sides.
    assert replayed > 0, "the follower was never parked and replayed"
    assert direct > 0, "the follower never ran on its own delivery"
    assert replayed + direct == rounds
    bodies = Counter(event_id for event_id, _ in leader_side.handled + follower_side.handled)
    assert set(bodies.values()) == {1}
    assert len(bodies) == 2 * rounds

    # Nothing was left for the lost-follower sweep.
    clock.advance(timedelta(minutes=15, seconds=1))
    assert await leader_side.ordering.get_lost_followers() == []
    assert await follower_side.ordering.get_lost_followers() == []


async def test_follower_that_saw_its_leader_unseen_is_not_parked_once_the_leader_completed(
    make_ordering: OrderingFactory, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The orphan window, forced: the follower finds its leader not handled, the leader then
    completes and collects its followers (none yet), and only then does the follower park.

    The pause is injected by wrapping the follower instance's ``_park`` step (a test seam only:
    the real parking transaction runs unchanged, just later).
    """
    leader_side = Recorder(make_ordering())
    follower_side = Recorder(make_ordering())
    leader = make_event(received=clock.now)
    follower = make_event(follows=leader, received=clock.now)
    about_to_park, leader_done = asyncio.Event(), asyncio.Event()
    real_park = follower_side.ordering._park

    async def park_later(*args: Any, **kwargs: Any) -> bool:
        about_to_park.set()
        await leader_done.wait()
        return await real_park(*args, **kwargs)

    monkeypatch.setattr(follower_side.ordering, "_park", park_later)

    async def scenario() -> None:
        following = asyncio.create_task(follower_side.deliver(follower))
        await about_to_park.wait()
        assert not await leader_side.ordering.event_has_been_seen(leader)
        await leader_side.handler(leader)
        assert leader_side.handled == [(leader.id, 0)], "nothing was parked to replay yet"
        leader_done.set()
        await following

    await bounded(scenario())
    assert follower_side.handled == [(follower.id, 0)], "the follower went ahead at once"
    assert await leader_side.ordering.get_followers(leader) == []
    assert await leader_side.ordering.event_has_been_seen(follower)
    clock.advance(timedelta(minutes=15, seconds=1))
    assert await leader_side.ordering.get_lost_followers() == []


async def test_follower_parked_while_its_leader_is_in_flight_is_replayed_by_it(
    make_ordering: OrderingFactory, clock: Clock
) -> None:
    """The other side of the window: parking lands before the leader's completion."""
    settings: dict[str, Any] = {"in_flight_event_timeout": 0, "lease_timeout": 60}
    leader_side = Recorder(make_ordering(**settings))
    follower_side = Recorder(make_ordering(**settings))
    leader = make_event(received=clock.now)
    follower = make_event(follows=leader, received=clock.now)

    async def scenario() -> None:
        async with leader_side.ordering.preceding_event_confirmed(leader_side.handler, leader):
            with pytest.raises(EventArrivedEarly):
                await follower_side.handler(follower)
            assert await follower_side.ordering.get_followers(leader) == [follower]
            leader_side.handled.append((leader.id, 0))

    await bounded(scenario())
    assert leader_side.handled == [(leader.id, 0), (follower.id, 1)]
    assert follower_side.handled == []
    assert await leader_side.ordering.get_followers(leader) == []
    clock.advance(timedelta(minutes=15, seconds=1))
    assert await leader_side.ordering.get_lost_followers() == []


async def test_duplicate_deliveries_of_jumbled_chains_run_each_body_once_in_order(
    make_ordering: OrderingFactory, own_engine: AsyncEngine, clock: Clock
) -> None:
    """Several consumers each receive every event of several chains, in their own jumbled order."""
    settings: dict[str, Any] = {"poll_interval": 0.005}
    chains = [chain(4, received=clock.now) for _ in range(4)]
    everything = [event for events in chains for event in events]
    bodies: list[tuple[UUID, int]] = []  # shared by every worker, in the order bodies ran
    rng = random.Random(7)

    workers: list[Recorder] = []
    for i in range(4):
        ordering = (
            make_ordering(**settings)
            if i % 2 == 0
            else make_ordering(engine=own_engine, database_url=None, **settings)
        )
        workers.append(Recorder(ordering, jitter=random.Random(i), handled=bodies))

    async def consume(worker: Recorder, deliveries: list[ReceivedEvent]) -> None:
        for event in deliveries:
            await worker.deliver(event)
            await asyncio.sleep(0)

    async def run() -> None:
        await asyncio.gather(
            *(consume(worker, rng.sample(everything, len(everything))) for worker in workers)
        )

    await bounded(run())

    counts = Counter(event_id for event_id, _ in bodies)
    assert {event.id for event in everything} == set(counts)
    assert set(counts.values()) == {1}, "every body runs exactly once"

    # Causal order within each chain, across workers: the shared log is the order bodies ran.
    finished = [event_id for event_id, _ in bodies]
    for events in chains:
        ids = [event.id for event in events]
        assert [i for i in finished if i in ids] == ids

    probe = workers[0].ordering
    for event in everything:
        assert await probe.event_has_been_seen(event)
        assert await probe.get_followers(event) == []
    clock.advance(timedelta(minutes=15, seconds=1))
    assert await probe.get_lost_followers() == []
