"""Statement budgets per path: a correctness property of the hot path, counted, never timed.

On Postgres every step of the protocol is one statement sent in autocommit, so statements are
round trips: an in-order event costs 2 (take the lease and read the leader; complete), a
follower that is parked and later replayed costs 4 in all. On SQLite a step is a few statements
inside one ``BEGIN IMMEDIATE`` transaction, run in one hop to its connection's thread: there the
budget is counted in units of work (transactions), each one lock acquisition and one hop.
"""

from __future__ import annotations

import contextlib
from typing import Any

from ordering_sql import CausalOrdering, EventArrivedEarly
from tests.support import Counter, counting, make_event


async def _warm(ordering: CausalOrdering[Any]) -> None:
    """Schema check, pool, compiled statements, and this process's first purge, which then
    does not come back for a minute: housekeeping is not part of any path's budget."""
    await _handle(ordering, make_event(), [])


async def _handle(ordering: CausalOrdering[Any], event: Any, handled: list[Any]) -> None:
    async def handler(e: Any, depth: int = 0) -> None:
        async with ordering.preceding_event_confirmed(handler, e, depth):
            handled.append(e.id)

    await handler(event)


def _budget(ordering: CausalOrdering[Any], counter: Counter) -> int:
    """Round trips on a network database; units of work on SQLite."""
    assert ordering._store is not None
    # A budget is only as good as the counter: every path must be seen (Postgres's direct one too).
    assert counter.statements, "no statement was counted"
    postgres = ordering._store.dialect.name == "postgresql"
    return counter.round_trips if postgres else counter.units


async def test_in_order_event_without_leader_costs_two(ordering: CausalOrdering[Any]) -> None:
    await _warm(ordering)
    handled: list[Any] = []
    async with counting(ordering) as counter:
        await _handle(ordering, make_event(), handled)
    assert len(handled) == 1
    assert _budget(ordering, counter) <= 2, counter


async def test_event_whose_leader_was_seen_costs_two(ordering: CausalOrdering[Any]) -> None:
    await _warm(ordering)
    leader = make_event()
    handled: list[Any] = []
    await _handle(ordering, leader, handled)
    async with counting(ordering) as counter:
        await _handle(ordering, make_event(follows=leader), handled)
    assert len(handled) == 2
    assert _budget(ordering, counter) <= 2, counter


async def test_parked_then_replayed_follower_costs_four(ordering: CausalOrdering[Any]) -> None:
    await _warm(ordering)
    leader = make_event()
    follower = make_event(follows=leader)
    handled: list[Any] = []
    async with counting(ordering) as parking:
        with contextlib.suppress(EventArrivedEarly):
            await _handle(ordering, follower, handled)
    assert handled == []

    assert _budget(ordering, parking) <= 2, parking  # take the lease; park

    async with counting(ordering) as replay:
        await _handle(ordering, leader, handled)
    assert handled == [leader.id, follower.id]
    # The leader's own path: lease, completion, and one more claim (followers exist) = 3.
    # The follower's replay: lease and completion = 2, so 4 for the follower in all.
    assert _budget(ordering, replay) <= 3 + 2, replay
