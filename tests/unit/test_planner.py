"""The planner: which events of a batch are ready and which park (pure values, no database)."""

from __future__ import annotations

from itertools import pairwise
from uuid import UUID, uuid4

from hypothesis import given
from hypothesis import strategies as st

from ordering_sql._planner import Planned, plan


def ids(count: int) -> list[UUID]:
    return [uuid4() for _ in range(count)]


def test_an_event_that_waits_for_nothing_is_ready() -> None:
    (a,) = ids(1)
    result = plan([Planned(a, None)], taken={a}, seen=set())
    assert (result.ready, result.park) == ([a], [])


def test_a_follower_of_a_seen_leader_is_ready() -> None:
    leader, follower = ids(2)
    result = plan([Planned(follower, leader)], taken={follower}, seen={leader})
    assert (result.ready, result.park) == ([follower], [])


def test_a_follower_of_an_unseen_leader_outside_the_batch_parks() -> None:
    leader, follower = ids(2)
    result = plan([Planned(follower, leader)], taken={follower}, seen=set())
    assert (result.ready, result.park) == ([], [follower])


def test_a_chain_in_one_batch_is_ready_leaders_first_whatever_the_arrival_order() -> None:
    a, b, c, d = ids(4)
    events = [Planned(d, c), Planned(b, a), Planned(c, b), Planned(a, None)]
    result = plan(events, taken={a, b, c, d}, seen=set())
    assert result.ready == [a, b, c, d]
    assert result.park == []


def test_a_chain_behind_a_missing_leader_parks_whole() -> None:
    missing, b, c = ids(3)
    events = [Planned(c, b), Planned(b, missing)]
    result = plan(events, taken={b, c}, seen=set())
    assert result.ready == []
    assert sorted(result.park) == sorted([b, c])


def test_events_not_taken_are_neither_ready_nor_parked() -> None:
    """A lease held elsewhere (or an event already seen) is someone else's: not this plan's."""
    a, b = ids(2)
    result = plan([Planned(a, None), Planned(b, None)], taken={b}, seen=set())
    assert (result.ready, result.park) == ([b], [])


def test_a_follower_of_a_leader_in_the_batch_but_not_taken_waits_for_its_mark() -> None:
    """The leader's lease is held by another caller: the follower parks unless it is seen."""
    leader, follower = ids(2)
    events = [Planned(leader, None), Planned(follower, leader)]
    parked = plan(events, taken={follower}, seen=set())
    assert (parked.ready, parked.park) == ([], [follower])
    ready = plan(events, taken={follower}, seen={leader})
    assert (ready.ready, ready.park) == ([follower], [])


def test_a_cycle_parks_every_member_and_what_follows_it() -> None:
    a, b, c, after = ids(4)
    events = [Planned(a, c), Planned(b, a), Planned(c, b), Planned(after, c)]
    result = plan(events, taken={a, b, c, after}, seen=set())
    assert result.ready == []
    assert sorted(result.park) == sorted([a, b, c, after])


def test_a_long_chain_does_not_recurse() -> None:
    """Chains longer than Python's recursion limit are walked iteratively."""
    chain = ids(5000)
    events = [Planned(chain[0], None)] + [
        Planned(event, leader) for leader, event in pairwise(chain)
    ]
    result = plan(list(reversed(events)), taken=set(chain), seen=set())
    assert result.ready == chain
    assert result.park == []


# -- the specification, by fixpoint ------------------------------------------------------------


def expected_ready(events: list[Planned], taken: set[UUID], seen: set[UUID]) -> set[UUID]:
    """Ready = the least set closed under: waits for nothing, leader seen, or leader ready
    (and in the batch's taken events). Computed by plain iteration to a fixpoint."""
    mine = {e.id: e for e in events if e.id in taken}
    ready: set[UUID] = set()
    changed = True
    while changed:
        changed = False
        for event in mine.values():
            if event.id in ready:
                continue
            leader = event.waits_for
            if (
                leader is None
                or (leader not in mine and leader in seen)
                or (leader in mine and leader in ready)
            ):
                ready.add(event.id)
                changed = True
    return ready


@st.composite
def batches(draw: st.DrawFn) -> tuple[list[Planned], set[UUID], set[UUID]]:
    batch = ids(draw(st.integers(min_value=1, max_value=10)))
    outside = ids(2)  # leaders that are not in the batch
    # Leaders drawn mostly from the batch itself, so chains, cycles and self-follows are common.
    leaders = st.one_of(st.none(), st.sampled_from(batch), st.sampled_from(outside))
    events = [Planned(event, draw(leaders)) for event in batch]
    events = [Planned(e.id, None if e.waits_for == e.id else e.waits_for) for e in events]
    taken = {event for event in batch if draw(st.integers(0, 3))}  # mostly taken
    seen = {leader for leader in batch + outside if draw(st.booleans())} - taken
    return draw(st.permutations(events)), taken, seen


@given(batches())
def test_the_plan_matches_the_fixpoint_and_orders_leaders_first(
    batch: tuple[list[Planned], set[UUID], set[UUID]],
) -> None:
    events, taken, seen = batch
    result = plan(events, taken=taken, seen=seen)
    mine = [e.id for e in events if e.id in taken]

    # Every taken event is decided exactly once, and nothing else is.
    assert sorted(result.ready + result.park) == sorted(mine)
    assert set(result.ready) == expected_ready(events, taken, seen)

    # A ready event's leader in the batch comes before it.
    position = {event: index for index, event in enumerate(result.ready)}
    leaders = {e.id: e.waits_for for e in events}
    for event in result.ready:
        leader = leaders[event]
        if leader in position:
            assert position[leader] < position[event]
