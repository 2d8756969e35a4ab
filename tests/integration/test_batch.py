"""The batch API, ``preceding_events_confirmed(handler, events)``, on both backends.

A batch is decided on entry (leases taken, leaders looked up, early followers parked) and
recorded when the block ends (seen marks, leases ended, released followers claimed and handed
to ``handler``). Each test checks what a consumer can see: the ``Batch`` it gets, what its
handler is handed and in which order, and the marks and parked followers left in the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest

from ordering_sql import (
    Batch,
    CausalOrdering,
    EventArrivedEarly,
    LeaseLostError,
    ReceivedEvent,
)
from tests.conftest import OrderingFactory
from tests.support import Clock, Counter, chain, counting, make_event

#: A bound on every wait here; nothing in this file should come near it.
TEST_TIMEOUT_S = 20.0
#: Past the preceding-event lookback (15 minutes by default).
PAST_LOOKBACK = timedelta(minutes=16)


class Consumer:
    """A batch consumer: the block handles ``batch.ready``; released followers come back to the
    usual recursive handler (the single-event path). ``handled`` is every body, in order."""

    def __init__(self, ordering: CausalOrdering[Any], handled: list[UUID] | None = None) -> None:
        self.ordering = ordering
        self.handled: list[UUID] = [] if handled is None else handled
        self.replayed: list[UUID] = []

    async def handler(self, event: ReceivedEvent, depth: int = 0) -> None:
        async with self.ordering.preceding_event_confirmed(self.handler, event, depth):
            self.handled.append(event.id)
            if depth:
                self.replayed.append(event.id)

    async def deliver(self, events: Iterable[ReceivedEvent]) -> Batch[ReceivedEvent]:
        async with self.ordering.preceding_events_confirmed(self.handler, events) as batch:
            for e in batch:
                self.handled.append(e.id)
        return batch

    async def deliver_one(self, event: ReceivedEvent) -> None:
        """The single-event consumer of the README: parked counts as done."""
        with contextlib.suppress(EventArrivedEarly):
            await self.handler(event)


def ids(events: Iterable[ReceivedEvent]) -> list[UUID]:
    return [e.id for e in events]


def assert_leaders_first(order: Sequence[UUID], events: Iterable[ReceivedEvent]) -> None:
    """Every event whose leader is in ``order`` comes after that leader."""
    position = {event_id: i for i, event_id in enumerate(order)}
    for e in events:
        if e.follows in position and e.id in position:
            assert position[e.follows] < position[e.id], f"{e.event} came before its leader"


def family(clock: Clock, name: str) -> list[ReceivedEvent]:
    """root <- a <- {b1, b2 <- c}: a chain with a fan in it, received now."""
    t = clock.now
    root = make_event(occurred=t, received=t, name=f"{name}.root")
    a = make_event(follows=root, occurred=t + timedelta(seconds=1), received=t, name=f"{name}.a")
    b1 = make_event(follows=a, occurred=t + timedelta(seconds=2), received=t, name=f"{name}.b1")
    b2 = make_event(follows=a, occurred=t + timedelta(seconds=3), received=t, name=f"{name}.b2")
    c = make_event(follows=b2, occurred=t + timedelta(seconds=4), received=t, name=f"{name}.c")
    return [root, a, b1, b2, c]


async def assert_recorded(ordering: CausalOrdering[Any], events: Iterable[ReceivedEvent]) -> None:
    for e in events:
        assert await ordering.event_has_been_seen(e), f"{e.event} not marked seen"
        assert not await ordering.event_has_started_processing(e), f"{e.event} still leased"


# -- what is ready, and in which order ---------------------------------------------------------


async def test_a_shuffled_batch_of_whole_families_is_ready_leaders_first(
    make_ordering: OrderingFactory, clock: Clock
) -> None:
    for seed in range(4):
        ordering = make_ordering(f"shuffled-{seed}")
        events = [e for name in ("x", "y", "z") for e in family(clock, name)]
        events += chain(4, received=clock.now)
        events += [make_event(received=clock.now, name=f"loner.{i}") for i in range(3)]
        delivered = list(events)
        random.Random(seed).shuffle(delivered)
        # Followers really do come before their leaders in the delivery.
        position = {e.id: i for i, e in enumerate(delivered)}
        assert any(position[e.follows] > position[e.id] for e in events if e.follows), seed

        consumer = Consumer(ordering)
        batch = await consumer.deliver(delivered)

        assert sorted(ids(batch.ready)) == sorted(ids(events)), seed
        assert_leaders_first(ids(batch.ready), events)
        assert list(batch) == batch.ready
        assert len(batch) == len(events)
        assert (batch.parked, batch.skipped, batch.busy, batch.replayed) == ([], [], [], [])
        assert consumer.handled == ids(batch.ready)
        await assert_recorded(ordering, events)
        for e in events:
            assert await ordering.get_followers(e) == []


async def test_events_following_nothing_are_ready_in_delivery_order(
    ordering: CausalOrdering[Any],
) -> None:
    own = uuid4()
    loners = [make_event(name=f"loner.{i}") for i in range(4)]
    loners.insert(2, make_event(id=own, follows=own, name="follows-itself"))
    batch = await Consumer(ordering).deliver(loners)
    assert batch.ready == loners
    await assert_recorded(ordering, loners)


async def test_an_empty_batch_is_empty_and_does_nothing(ordering: CausalOrdering[Any]) -> None:
    consumer = Consumer(ordering)
    async with ordering.preceding_events_confirmed(consumer.handler, []) as batch:
        assert list(batch) == []
    assert (batch.ready, batch.parked, batch.skipped, batch.busy, batch.replayed) == (
        [],
        [],
        [],
        [],
        [],
    )
    assert consumer.handled == []
    assert await ordering.get_lost_followers() == []


async def test_a_chain_longer_than_max_depth_in_one_batch_is_all_ready_in_order(
    make_ordering: OrderingFactory,
) -> None:
    ordering = make_ordering(max_depth_of_preceding_event=5)
    events = chain(30)
    consumer = Consumer(ordering)
    batch = await consumer.deliver(list(reversed(events)))
    assert batch.ready == events
    assert batch.parked == []
    assert consumer.handled == ids(events)
    await assert_recorded(ordering, events)


# -- leaders outside the batch ------------------------------------------------------------------


async def test_follower_of_an_unseen_leader_outside_the_batch_is_parked(
    ordering: CausalOrdering[Any],
) -> None:
    leader = make_event(name="leader")
    follower = make_event(follows=leader, name="follower")
    loner = make_event(name="loner")
    consumer = Consumer(ordering)

    batch = await consumer.deliver([follower, loner])

    assert batch.ready == [loner]
    assert batch.parked == [follower]
    assert consumer.handled == [loner.id]
    assert await ordering.get_followers(leader) == [follower]
    assert not await ordering.event_has_been_seen(follower)
    # Parking ended the follower's lease, so the leader's completion can take it.
    assert not await ordering.event_has_started_processing(follower)


async def test_parked_follower_is_replayed_when_its_leader_comes_through_the_single_path(
    ordering: CausalOrdering[Any],
) -> None:
    leader = make_event(name="leader")
    follower = make_event(follows=leader, name="follower")
    consumer = Consumer(ordering)
    await consumer.deliver([follower])

    await consumer.deliver_one(leader)

    assert consumer.handled == [leader.id, follower.id]
    assert consumer.replayed == [follower.id]
    assert await ordering.get_followers(leader) == []
    await assert_recorded(ordering, [leader, follower])


async def test_parked_follower_is_replayed_when_its_leader_comes_in_a_later_batch(
    ordering: CausalOrdering[Any],
) -> None:
    leader = make_event(name="leader")
    followers = [make_event(follows=leader, name=f"follower.{i}") for i in range(3)]
    other = make_event(name="other")
    consumer = Consumer(ordering)
    first = await consumer.deliver(reversed(followers))
    assert sorted(ids(first.parked)) == sorted(ids(followers))
    assert first.ready == []

    second = await consumer.deliver([other, leader])

    assert second.ready == [other, leader]
    assert second.replayed == followers  # in occurred order
    assert consumer.handled == [other.id, leader.id, *ids(followers)]
    assert consumer.replayed == ids(followers)
    assert await ordering.get_followers(leader) == []
    await assert_recorded(ordering, [leader, other, *followers])


async def test_a_chain_parked_across_batches_comes_out_in_causal_order(
    ordering: CausalOrdering[Any],
) -> None:
    c0, c1, c2, c3, c4 = chain(5)
    consumer = Consumer(ordering)
    assert (await consumer.deliver([c3])).parked == [c3]
    assert (await consumer.deliver([c2])).parked == [c2]
    late = await consumer.deliver([c4, c1])  # c1 waits for c0; c4 for c3, which is parked
    assert late.ready == []
    assert sorted(ids(late.parked)) == sorted(ids([c1, c4]))
    assert consumer.handled == []

    last = await consumer.deliver([c0])

    assert last.ready == [c0]
    assert last.replayed == [c1]  # the rest come back through the handler, one by one
    assert consumer.handled == ids([c0, c1, c2, c3, c4])
    for leader in (c0, c1, c2, c3):
        assert await ordering.get_followers(leader) == []
    await assert_recorded(ordering, [c0, c1, c2, c3, c4])


async def test_follower_of_a_seen_leader_outside_the_batch_is_ready(
    ordering: CausalOrdering[Any],
) -> None:
    leader = make_event(name="leader")
    follower = make_event(follows=leader, name="follower")
    by_hand = make_event(name="marked-seen-by-hand")
    its_follower = make_event(follows=by_hand, name="its-follower")
    consumer = Consumer(ordering)
    await consumer.deliver_one(leader)
    await ordering.record_event_as_seen(by_hand)

    batch = await consumer.deliver([its_follower, follower])

    assert batch.ready == [its_follower, follower]
    assert batch.parked == []
    assert await ordering.get_followers(leader) == []
    assert consumer.handled == [leader.id, its_follower.id, follower.id]


async def test_parked_follower_redelivered_with_its_leader_is_handled_once(
    ordering: CausalOrdering[Any],
) -> None:
    leader = make_event(name="leader")
    follower = make_event(follows=leader, name="follower")
    consumer = Consumer(ordering)
    await consumer.deliver([follower])
    assert await ordering.get_followers(leader) == [follower]

    batch = await consumer.deliver([follower, leader])  # the broker redelivered it

    assert batch.ready == [leader, follower]
    assert batch.replayed == []  # it was handled in the batch: not claimed and replayed too
    assert consumer.handled == [leader.id, follower.id]
    assert await ordering.get_followers(leader) == []
    assert await ordering.followers_by_id([follower.id]) == []


# -- duplicates, seen events, and events held elsewhere -----------------------------------------


async def test_duplicates_inside_a_batch_are_skipped_and_handled_once(
    ordering: CausalOrdering[Any],
) -> None:
    c0, c1, c2 = chain(3)
    loner = make_event(name="loner")
    repeat_loner = loner.model_copy()
    consumer = Consumer(ordering)

    batch = await consumer.deliver([c2, loner, c1, c2, c0, repeat_loner, c1])

    assert sorted(ids(batch.ready)) == sorted(ids([c0, c1, c2, loner]))
    assert_leaders_first(ids(batch.ready), [c0, c1, c2])
    assert sorted(ids(batch.skipped)) == sorted(ids([c2, repeat_loner, c1]))
    assert batch.parked == []
    assert sorted(consumer.handled) == sorted(ids([c0, c1, c2, loner]))


async def test_events_handled_before_are_skipped(ordering: CausalOrdering[Any]) -> None:
    c0, c1 = chain(2)
    fresh = make_event(name="fresh")
    consumer = Consumer(ordering)
    await consumer.deliver([c0, c1])
    handled_before = list(consumer.handled)

    batch = await consumer.deliver([c1, fresh, c0])

    assert batch.ready == [fresh]
    assert sorted(ids(batch.skipped)) == sorted(ids([c0, c1]))
    assert (batch.parked, batch.busy) == ([], [])
    assert consumer.handled == [*handled_before, fresh.id]


async def test_an_event_another_instance_holds_is_busy_not_handled(
    make_ordering: OrderingFactory,
) -> None:
    ordering, other = make_ordering(), make_ordering()
    held = make_event(name="held")
    free = make_event(name="free")
    assert await other.record_event_as_processing(held)
    consumer = Consumer(ordering)

    batch = await consumer.deliver([held, free])

    assert batch.ready == [free]
    assert batch.busy == [held]  # to be redelivered, not acknowledged
    assert (batch.parked, batch.skipped) == ([], [])
    assert consumer.handled == [free.id]
    assert not await ordering.event_has_been_seen(held)
    assert await ordering.event_has_started_processing(held)  # still the other's lease

    await other.forget_event_is_processing(held)
    again = await consumer.deliver([held])  # the redelivery
    assert again.ready == [held]


async def test_follower_whose_in_batch_leader_is_held_elsewhere_is_parked_and_replayed(
    make_ordering: OrderingFactory,
) -> None:
    """The other holder is in the middle of the leader's handler when the batch comes."""
    ordering, other = make_ordering(), make_ordering()
    leader = make_event(name="leader")
    follower = make_event(follows=leader, name="follower")
    holder = Consumer(other)
    inside, finish = asyncio.Event(), asyncio.Event()

    async def hold_leader() -> None:
        async with other.preceding_event_confirmed(holder.handler, leader):
            inside.set()
            await finish.wait()
            holder.handled.append(leader.id)

    task = asyncio.create_task(hold_leader())
    try:
        await asyncio.wait_for(inside.wait(), TEST_TIMEOUT_S)
        consumer = Consumer(ordering)
        batch = await consumer.deliver([leader, follower])
        assert batch.ready == []
        assert batch.busy == [leader]
        assert batch.parked == [follower]
        assert await ordering.get_followers(leader) == [follower]
        assert consumer.handled == []
    finally:
        finish.set()
        await asyncio.wait_for(task, TEST_TIMEOUT_S)

    assert holder.handled == [leader.id, follower.id]  # the holder's completion replayed it
    assert await ordering.get_followers(leader) == []
    await assert_recorded(ordering, [leader, follower])


# -- failures --------------------------------------------------------------------------------


class Boom(Exception):
    pass


async def test_a_failing_body_records_nothing_and_a_retry_takes_the_batch_again(
    ordering: CausalOrdering[Any],
) -> None:
    c0, c1, c2 = chain(3)
    loner = make_event(name="loner")
    consumer = Consumer(ordering)
    seen: list[Batch[ReceivedEvent]] = []

    async def failing() -> None:
        async with ordering.preceding_events_confirmed(consumer.handler, [c2, loner, c1, c0]) as b:
            seen.append(b)
            for e in b:
                consumer.handled.append(e.id)
            raise Boom

    with pytest.raises(Boom):
        await failing()

    [batch] = seen
    assert sorted(ids(batch.ready)) == sorted(ids([c0, c1, c2, loner]))
    for e in (c0, c1, c2, loner):
        assert not await ordering.event_has_been_seen(e), f"{e.event} recorded"
        assert not await ordering.event_has_started_processing(e), f"{e.event} still leased"

    consumer.handled.clear()
    retry = await consumer.deliver([c2, loner, c1, c0])  # at once: no lease to wait out
    assert sorted(ids(retry.ready)) == sorted(ids([c0, c1, c2, loner]))
    assert (retry.skipped, retry.busy, retry.parked) == ([], [], [])
    await assert_recorded(ordering, [c0, c1, c2, loner])


async def test_a_failing_body_keeps_the_followers_it_parked(ordering: CausalOrdering[Any]) -> None:
    leader = make_event(name="leader")
    follower = make_event(follows=leader, name="follower")
    loner = make_event(name="loner")
    consumer = Consumer(ordering)

    async def failing() -> None:
        async with ordering.preceding_events_confirmed(consumer.handler, [follower, loner]) as b:
            assert b.parked == [follower]
            raise Boom

    with pytest.raises(Boom):
        await failing()
    assert await ordering.get_followers(leader) == [follower]
    assert not await ordering.event_has_been_seen(loner)

    await consumer.deliver_one(leader)
    assert consumer.handled == [leader.id, follower.id]


async def test_a_lease_lost_during_the_block_raises_after_recording_the_rest(
    make_ordering: OrderingFactory, clock: Clock
) -> None:
    # A long lease (its renewal would come after 10 real seconds); the test clock jumps past it.
    ordering = make_ordering(lease_timeout=30)
    other = make_ordering(lease_timeout=30)
    consumer = Consumer(ordering)
    await consumer.deliver_one(make_event(name="warm-up"))  # the first purge is done with
    kept_a, taken, kept_b = (make_event(name=n) for n in ("kept_a", "taken", "kept_b"))
    parked_leader = make_event(name="parked_leader")
    parked = make_event(follows=parked_leader, name="parked")
    await consumer.deliver([parked])

    seen: list[Batch[ReceivedEvent]] = []

    async def taken_over_meanwhile() -> None:
        async with ordering.preceding_events_confirmed(
            consumer.handler, [kept_a, taken, kept_b, parked_leader]
        ) as b:
            seen.append(b)
            for e in b:
                consumer.handled.append(e.id)
            clock.advance(31)
            assert await other.record_event_as_processing(taken)  # it was taken over

    with pytest.raises(LeaseLostError) as lost:
        await taken_over_meanwhile()

    [batch] = seen
    assert lost.value.event_id == taken.id
    assert not await ordering.event_has_been_seen(taken)
    assert await ordering.event_has_started_processing(taken)  # the other worker's now
    await assert_recorded(ordering, [kept_a, kept_b, parked_leader])
    # The rest was recorded, replays included.
    assert batch.replayed == [parked]
    assert consumer.replayed == [parked.id]
    await assert_recorded(ordering, [parked])


# -- time: old events, cycles -------------------------------------------------------------------


async def test_events_older_than_the_lookback_are_ready_whatever_their_leader(
    ordering: CausalOrdering[Any], clock: Clock
) -> None:
    unknown = make_event(name="never-comes")
    orphan = make_event(follows=unknown, received=clock.now, name="orphan")
    clock.advance(PAST_LOOKBACK)
    fresh_leader = make_event(received=clock.now, name="fresh-leader")  # not in the batch
    fresh = make_event(follows=fresh_leader, received=clock.now, name="fresh")

    batch = await Consumer(ordering).deliver([orphan, fresh])

    assert batch.ready == [orphan]
    assert batch.parked == [fresh]
    await assert_recorded(ordering, [orphan])


async def test_a_cycle_in_a_batch_parks_both_and_the_sweep_returns_them_after_the_lookback(
    ordering: CausalOrdering[Any], clock: Clock
) -> None:
    a_id, b_id = uuid4(), uuid4()
    a = make_event(id=a_id, follows=b_id, received=clock.now, name="a")
    b = make_event(id=b_id, follows=a_id, received=clock.now, name="b")
    loner = make_event(received=clock.now, name="loner")
    consumer = Consumer(ordering)

    batch = await asyncio.wait_for(consumer.deliver([a, loner, b]), TEST_TIMEOUT_S)

    assert batch.ready == [loner]
    assert sorted(ids(batch.parked)) == sorted([a_id, b_id])
    assert await ordering.get_followers(a_id) == [b]
    assert await ordering.get_followers(b_id) == [a]
    assert await ordering.get_lost_followers() == []  # not yet

    clock.advance(PAST_LOOKBACK)
    lost = await ordering.get_lost_followers()
    assert sorted(ids(lost)) == sorted([a_id, b_id])
    assert await ordering.get_lost_followers() == []  # handed out once: claimed


# -- mixing the two paths -----------------------------------------------------------------------


async def test_followers_parked_by_the_single_path_are_replayed_by_a_batch(
    ordering: CausalOrdering[Any],
) -> None:
    c0, c1, c2 = chain(3)
    consumer = Consumer(ordering)
    await consumer.deliver_one(c2)
    await consumer.deliver_one(c1)
    assert consumer.handled == []

    batch = await consumer.deliver([c0])

    assert batch.replayed == [c1]
    assert consumer.handled == ids([c0, c1, c2])
    assert consumer.replayed == ids([c1, c2])
    await assert_recorded(ordering, [c0, c1, c2])


async def test_batches_and_single_deliveries_interleaved_keep_every_edge(
    make_ordering: OrderingFactory, clock: Clock
) -> None:
    ordering = make_ordering()
    events = [e for name in ("r", "s", "t") for e in family(clock, name)]
    delivered = list(events)
    random.Random(7).shuffle(delivered)
    consumer = Consumer(ordering)
    at = 0
    rng = random.Random(8)
    while at < len(delivered):
        size = rng.randint(1, 4)
        if size == 1:
            await consumer.deliver_one(delivered[at])
        else:
            await consumer.deliver(delivered[at : at + size])
        at += size
    assert sorted(consumer.handled) == sorted(ids(events))
    assert_leaders_first(consumer.handled, events)
    await assert_recorded(ordering, events)


# -- statement budgets --------------------------------------------------------------------------


def chains_of_five(count: int, seed: int, **kwargs: Any) -> list[ReceivedEvent]:
    events = [e for _ in range(count) for e in chain(5, **kwargs)]
    random.Random(seed).shuffle(events)
    return events


async def _counted_batch(
    ordering: CausalOrdering[Any], events: list[ReceivedEvent]
) -> tuple[Counter, Batch[ReceivedEvent]]:
    consumer = Consumer(ordering)
    async with counting(ordering) as counter:
        batch = await consumer.deliver(events)
    assert len(batch.ready) == len({e.id for e in events}), batch
    assert consumer.replayed == []
    assert counter.statements, "no statement was counted"
    return counter, batch


async def _warm(ordering: CausalOrdering[Any]) -> None:
    """Schema check, pool, and this process's first purge (housekeeping is not counted)."""
    await Consumer(ordering).deliver_one(make_event(name="warm-up"))


def _single_statement_steps(ordering: CausalOrdering[Any]) -> bool:
    """Postgres: each step one statement. SQLite: each step one transaction, run in one hop to
    its connection's thread, its statements one per row there (not round trips)."""
    assert ordering._store is not None
    return ordering._store.dialect.name == "postgresql"


async def test_a_batch_of_whole_chains_costs_two_steps_whatever_its_size(
    ordering: CausalOrdering[Any],
) -> None:
    await _warm(ordering)
    small, _ = await _counted_batch(ordering, chains_of_five(2, seed=1))
    large, _ = await _counted_batch(ordering, chains_of_five(20, seed=2))
    if _single_statement_steps(ordering):
        # Postgres: take the leases; complete. One statement each, in autocommit.
        assert large.transactions == 0, large
        assert large.round_trips <= 2, large
        assert large.statements == small.statements, (small, large)
    else:
        # SQLite: one BEGIN IMMEDIATE transaction per step, a few statements in each.
        assert large.units <= 2, large
    assert large.transactions == small.transactions, (small, large)


async def test_leaders_outside_the_batch_cost_one_statement_more(
    ordering: CausalOrdering[Any],
) -> None:
    await _warm(ordering)
    heads = [make_event(name=f"head.{i}") for i in range(20)]
    await Consumer(ordering).deliver(heads)
    events = []
    for head in heads:  # 20 chains of 5, each following a leader handled before
        tail = chain(5)
        tail[0] = tail[0].model_copy(update={"follows": head.id})
        events += tail
    random.Random(3).shuffle(events)

    counter, batch = await _counted_batch(ordering, events)

    assert_leaders_first(ids(batch.ready), events)
    if _single_statement_steps(ordering):
        assert counter.transactions == 0, counter
        assert counter.round_trips <= 3, counter
        small, _ = await _counted_batch(ordering, chains_of_five(1, seed=4))
        assert len(counter.statements) <= len(small.statements) + 1, (small, counter)
    else:
        assert counter.units <= 2, counter


# -- a lease that expired while nobody took the event over ------------------------------------


async def _stall_past_the_lease_and_purge(clock: Clock, other: CausalOrdering[Any]) -> None:
    """The worker stalls past its lease; nobody takes the event over, but another worker of the
    process completes an event, and with it runs the process's housekeeping purge, which
    deletes expired leases."""
    clock.advance(31)
    await Consumer(other).deliver_one(make_event(name="someone-else"))


async def test_single_path_records_an_expired_lease_nobody_took_over(
    make_ordering: OrderingFactory, clock: Clock
) -> None:
    """The reference for the test below: the single path's completion records the event."""
    ordering, other = make_ordering(lease_timeout=30), make_ordering(lease_timeout=30)
    stalled = make_event(name="stalled")
    consumer = Consumer(ordering)
    async with ordering.preceding_event_confirmed(consumer.handler, stalled):
        await _stall_past_the_lease_and_purge(clock, other)
    assert await ordering.event_has_been_seen(stalled)


async def test_batch_records_an_expired_lease_nobody_took_over(
    make_ordering: OrderingFactory, clock: Clock
) -> None:
    ordering, other = make_ordering(lease_timeout=30), make_ordering(lease_timeout=30)
    stalled = make_event(name="stalled")
    consumer = Consumer(ordering)
    async with ordering.preceding_events_confirmed(consumer.handler, [stalled]) as batch:
        assert batch.ready == [stalled]
        await _stall_past_the_lease_and_purge(clock, other)
    assert await ordering.event_has_been_seen(stalled)
