"""The reference engine's behaviours, on both backends.

The chain used throughout: event_one <- event_two <- {event_three_a, event_three_b}.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from itertools import permutations
from typing import Any
from uuid import UUID

import pytest

from ordering_sql import (
    CausalOrdering,
    EventArrivedEarly,
    EventBeingProcessed,
    MaxDepthExceeded,
    ReceivedEvent,
)
from tests.conftest import OrderingFactory
from tests.support import Clock, chain, make_event


class Recorder:
    """The usual recursive handler, recording what it handled in order."""

    def __init__(self, ordering: CausalOrdering[Any]) -> None:
        self.ordering = ordering
        self.handled: list[UUID] = []

    async def handler(self, event: ReceivedEvent, depth: int = 0) -> None:
        async with self.ordering.preceding_event_confirmed(self.handler, event, depth):
            self.handled.append(event.id)

    async def deliver(self, event: ReceivedEvent) -> None:
        """The usual consumer: skip seen events, treat EventArrivedEarly as success."""
        if await self.ordering.event_has_been_seen(event.id):
            return
        with contextlib.suppress(EventArrivedEarly):
            await self.handler(event)


@pytest.fixture
def family(clock: Clock) -> dict[str, ReceivedEvent]:
    t = clock.now
    one = make_event(occurred=t, received=t, name="one")
    two = make_event(follows=one, occurred=t + timedelta(seconds=1), received=t, name="two")
    three_a = make_event(follows=two, occurred=t + timedelta(seconds=2), received=t, name="three_a")
    three_b = make_event(follows=two, occurred=t + timedelta(seconds=3), received=t, name="three_b")
    return {"one": one, "two": two, "three_a": three_a, "three_b": three_b}


def names(family: dict[str, ReceivedEvent], ids: list[UUID]) -> list[str]:
    by_id = {e.id: name for name, e in family.items()}
    return [by_id[i] for i in ids]


async def test_proper_order_is_handled_as_delivered(
    ordering: CausalOrdering[Any], family: dict[str, ReceivedEvent]
) -> None:
    recorder = Recorder(ordering)
    for name in ("one", "two", "three_a", "three_b"):
        await recorder.deliver(family[name])
    assert names(family, recorder.handled) == ["one", "two", "three_a", "three_b"]


async def test_jumbled_order_is_put_right(
    ordering: CausalOrdering[Any], family: dict[str, ReceivedEvent]
) -> None:
    recorder = Recorder(ordering)
    for name in ("three_a", "one", "three_b", "two"):
        await recorder.deliver(family[name])
    assert names(family, recorder.handled) == ["one", "two", "three_a", "three_b"]


async def test_backwards_order_is_put_right(
    ordering: CausalOrdering[Any], family: dict[str, ReceivedEvent]
) -> None:
    recorder = Recorder(ordering)
    for name in ("three_b", "three_a", "two", "one"):
        await recorder.deliver(family[name])
    assert names(family, recorder.handled) == ["one", "two", "three_a", "three_b"]
    assert await ordering.get_followers(family["two"]) == []
    assert await ordering.get_followers(family["one"]) == []


@pytest.mark.parametrize("backend", [pytest.param("sqlite", marks=pytest.mark.sqlite)])
async def test_every_delivery_order_respects_follows(
    make_ordering: OrderingFactory, family: dict[str, ReceivedEvent]
) -> None:
    """All 24 orders of the family, each in a fresh scope (SQLite only: it is the logic)."""
    for i, order in enumerate(permutations(family)):
        recorder = Recorder(make_ordering(f"perm-{i}"))
        for name in order:
            await recorder.deliver(family[name])
        handled = names(family, recorder.handled)
        assert sorted(handled) == sorted(family), order
        assert handled.index("one") < handled.index("two") < handled.index("three_a"), order
        assert handled.index("two") < handled.index("three_b"), order


async def test_early_follower_is_parked_and_reported(
    ordering: CausalOrdering[Any],
    family: dict[str, ReceivedEvent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder(ordering)
    with caplog.at_level(logging.INFO, logger="ordering_sql"), pytest.raises(EventArrivedEarly):
        await recorder.handler(family["two"])
    assert "arrived before the event it follows" in caplog.text
    assert recorder.handled == []
    assert await ordering.get_followers(family["one"]) == [family["two"]]
    assert not await ordering.event_has_started_processing(family["two"])
    assert not await ordering.event_has_been_seen(family["two"])


async def test_followers_are_returned_in_occurred_order(
    ordering: CausalOrdering[Any], clock: Clock
) -> None:
    leader = make_event()
    t = clock.now
    late = make_event(follows=leader, occurred=t + timedelta(seconds=30))
    early = make_event(follows=leader, occurred=t - timedelta(seconds=30))
    middle = make_event(follows=leader, occurred=t)
    for follower in (late, early, middle):
        await ordering.record_follower(follower)
    assert await ordering.get_followers(leader) == [early, middle, late]
    assert await ordering.get_followers(leader.id) == [early, middle, late]


async def test_followers_by_id_skips_unknown_and_sorts(
    ordering: CausalOrdering[Any], clock: Clock
) -> None:
    leader = make_event()
    t = clock.now
    second = make_event(follows=leader, occurred=t + timedelta(seconds=1))
    first = make_event(follows=leader, occurred=t)
    await ordering.record_follower(second)
    await ordering.record_follower(first)
    unknown = make_event().id
    found = await ordering.followers_by_id([second.id, unknown, first.id])
    assert found == [first, second]
    assert await ordering.followers_by_id([]) == []


async def test_lost_followers_come_back_after_the_lookback_in_order(
    ordering: CausalOrdering[Any], clock: Clock
) -> None:
    t = clock.now
    missing_leader = make_event()
    a = make_event(follows=missing_leader, occurred=t + timedelta(seconds=2), received=t)
    b = make_event(follows=missing_leader, occurred=t + timedelta(seconds=1), received=t)
    recent = make_event(follows=missing_leader, occurred=t, received=t + timedelta(minutes=10))
    for follower in (a, b, recent):
        await ordering.record_follower(follower)

    clock.advance(timedelta(minutes=14, seconds=59))
    assert await ordering.get_lost_followers() == []

    clock.advance(timedelta(seconds=1))  # exactly the lookback after a and b were received
    lost = await ordering.get_lost_followers()
    assert lost == [b, a]
    assert await ordering.get_lost_followers() == [], "handed out once: claimed while handled"
    recorder = Recorder(ordering)
    for follower in lost:
        await recorder.handler(follower)  # as if their leader had come
    assert recorder.handled == [b.id, a.id]
    assert await ordering.get_followers(missing_leader) == [recent], "gone once handled"


async def test_old_event_goes_through_without_its_leader(
    ordering: CausalOrdering[Any], clock: Clock
) -> None:
    """Past the lookback horizon the leader's bookkeeping is gone, so the event is not held."""
    old = make_event(follows=make_event(), received=clock.now - timedelta(minutes=15))
    recorder = Recorder(ordering)
    await recorder.deliver(old)
    assert recorder.handled == [old.id]

    young = make_event(follows=make_event(), received=clock.now - timedelta(minutes=14, seconds=59))
    with pytest.raises(EventArrivedEarly):
        await recorder.handler(young)


async def test_event_that_follows_itself_follows_nothing(ordering: CausalOrdering[Any]) -> None:
    event = make_event()
    selfish = event.model_copy(update={"follows": event.id})
    recorder = Recorder(ordering)
    await recorder.deliver(selfish)
    assert recorder.handled == [selfish.id]
    assert await ordering.event_has_been_seen(selfish)


async def test_recursion_is_bounded_at_max_depth(
    make_ordering: OrderingFactory, caplog: pytest.LogCaptureFixture
) -> None:
    ordering = make_ordering(max_depth_of_preceding_event=3)
    events = chain(7)
    recorder = Recorder(ordering)
    for event in reversed(events[1:]):
        with pytest.raises(EventArrivedEarly):
            await recorder.handler(event)
    with caplog.at_level(logging.WARNING, logger="ordering_sql"):
        await recorder.handler(events[0])
    # depth 0 is the leader itself, then depths 1..3 are replayed; depth 4 is refused.
    assert recorder.handled == [e.id for e in events[:4]]
    assert "reached its max depth of 3 followers processed" in caplog.text


async def test_default_max_depth_is_twenty(
    ordering: CausalOrdering[Any], caplog: pytest.LogCaptureFixture
) -> None:
    events = chain(23)
    recorder = Recorder(ordering)
    for event in reversed(events[1:]):
        with pytest.raises(EventArrivedEarly):
            await recorder.handler(event)
    with caplog.at_level(logging.WARNING, logger="ordering_sql"):
        await recorder.handler(events[0])
    assert recorder.handled == [e.id for e in events[:21]]
    assert "reached its max depth of 20 followers processed" in caplog.text


async def test_max_depth_exceeded_is_raised_past_the_limit(ordering: CausalOrdering[Any]) -> None:
    event = make_event()
    with pytest.raises(MaxDepthExceeded) as info:
        async with ordering.preceding_event_confirmed(Recorder(ordering).handler, event, 21):
            pytest.fail("the body must not run past the max depth")
    assert info.value.event is event


async def test_scopes_are_isolated(
    make_ordering: OrderingFactory, family: dict[str, ReceivedEvent]
) -> None:
    left, right = make_ordering("left"), make_ordering("right")
    await left.record_event_as_seen(family["one"])
    await left.record_follower(family["three_a"])
    assert await left.record_event_as_processing(family["two"])

    assert not await right.event_has_been_seen(family["one"])
    assert await right.get_followers(family["two"]) == []
    assert not await right.event_has_started_processing(family["two"])
    assert await right.record_event_as_processing(family["two"])

    await right.clear()
    assert await left.event_has_been_seen(family["one"])
    await left.clear()
    assert not await left.event_has_been_seen(family["one"])
    assert await left.get_followers(family["two"]) == []


async def test_clear_all_scopes_forgets_every_scope(
    make_ordering: OrderingFactory, family: dict[str, ReceivedEvent]
) -> None:
    left, right = make_ordering("left"), make_ordering("right")
    await left.record_event_as_seen(family["one"])
    await right.record_follower(family["two"])
    await left.clear_all_scopes()
    assert not await left.event_has_been_seen(family["one"])
    assert await right.get_followers(family["one"]) == []


async def test_follower_waits_for_a_leader_in_flight(
    make_ordering: OrderingFactory, family: dict[str, ReceivedEvent]
) -> None:
    """A follower whose leader is being processed polls until the leader is seen."""
    ordering = make_ordering(in_flight_event_timeout=5, poll_interval=0.05)

    leader_started, leader_may_finish = asyncio.Event(), asyncio.Event()

    async def lead() -> None:
        async with ordering.event_is_processing(family["one"]):
            leader_started.set()
            await leader_may_finish.wait()

    leading = asyncio.create_task(lead())
    await asyncio.wait_for(leader_started.wait(), timeout=5)
    assert await ordering.event_has_started_processing(family["one"])

    recorder = Recorder(ordering)
    following = asyncio.create_task(recorder.handler(family["two"]))
    await asyncio.sleep(0.2)
    assert not following.done(), "the follower must wait for its in-flight leader"
    leader_may_finish.set()
    await leading
    await asyncio.wait_for(following, timeout=5)
    assert recorder.handled == [family["two"].id]
    assert await ordering.get_followers(family["one"]) == []


async def test_follower_parks_when_the_in_flight_leader_times_out(
    make_ordering: OrderingFactory,
    family: dict[str, ReceivedEvent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    ordering = make_ordering(in_flight_event_timeout=0.3, poll_interval=0.05)
    assert await ordering.record_event_as_processing(family["one"])
    recorder = Recorder(ordering)
    with caplog.at_level(logging.WARNING, logger="ordering_sql"), pytest.raises(EventArrivedEarly):
        await recorder.handler(family["two"])
    assert "timed out waiting for its in-flight leader" in caplog.text
    assert await ordering.get_followers(family["one"]) == [family["two"]]


async def test_event_is_processing_marks_seen_and_refuses_duplicates(
    ordering: CausalOrdering[Any], caplog: pytest.LogCaptureFixture
) -> None:
    event = make_event()
    async with ordering.event_is_processing(event):
        assert await ordering.event_has_started_processing(event)
        with (
            caplog.at_level(logging.INFO, logger="ordering_sql"),
            pytest.raises(EventBeingProcessed),
        ):
            async with ordering.event_is_processing(event):
                pytest.fail("a second holder must not run")
        assert "is already being processed" in caplog.text
    assert await ordering.event_has_been_seen(event)
    assert not await ordering.event_has_started_processing(event)


async def test_failed_body_is_not_marked_seen(ordering: CausalOrdering[Any]) -> None:
    event = make_event()
    with pytest.raises(RuntimeError, match="boom"):
        async with ordering.event_is_processing(event):
            raise RuntimeError("boom")  # noqa: EM101
    assert not await ordering.event_has_been_seen(event)
    assert not await ordering.event_has_started_processing(event)
    async with ordering.event_is_processing(event):
        pass
    assert await ordering.event_has_been_seen(event)


async def test_no_in_flight_wait_parks_at_once_without_a_warning(
    make_ordering: OrderingFactory,
    family: dict[str, ReceivedEvent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """in_flight_event_timeout=0 is a choice, not a timeout: park at once, quietly."""
    ordering = make_ordering(in_flight_event_timeout=0)
    assert await ordering.record_event_as_processing(family["one"])
    with caplog.at_level(logging.WARNING, logger="ordering_sql"), pytest.raises(EventArrivedEarly):
        await Recorder(ordering).handler(family["two"])
    assert "Timed out" not in caplog.text
    assert await ordering.get_followers(family["one"]) == [family["two"]]


async def test_a_refused_event_says_whether_it_was_seen_or_is_held(
    ordering: CausalOrdering[Any],
) -> None:
    """``EventBeingProcessed.seen`` tells a consumer what to do with the message without asking
    again: True for a duplicate of a handled event (acknowledge), False for an event another
    worker holds (redeliver)."""

    async def handler(event: ReceivedEvent, depth: int = 0) -> None:
        async with ordering.preceding_event_confirmed(handler, event, depth):
            pass

    handled, held = make_event(), make_event()
    await handler(handled)
    assert await ordering.record_event_as_processing(held)

    with pytest.raises(EventBeingProcessed) as duplicate:
        await handler(handled)
    assert duplicate.value.seen is True
    with pytest.raises(EventBeingProcessed) as busy:
        await handler(held)
    assert busy.value.seen is False
