"""Statement budgets per path: a correctness property of the hot path, counted, never timed.

On Postgres every step of the protocol is one statement sent in autocommit, so statements are
round trips: an in-order event costs 2 (take the lease and read the leader; complete), a
follower that is parked and later replayed costs 4 in all. On SQLite a step that touches several
rows is a few statements inside one ``BEGIN IMMEDIATE`` transaction: there the budget is counted
in units of work (transactions or single autocommit statements), each one lock acquisition.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event

from ordering_sql import CausalOrdering, EventArrivedEarly
from tests.support import make_event


@dataclass
class Counter:
    #: (first word of the statement, whether it ran outside an explicit transaction)
    statements: list[tuple[str, bool]] = field(default_factory=list)
    transactions: int = 0

    @property
    def round_trips(self) -> int:
        """Statements sent, plus BEGIN and COMMIT of each explicit transaction."""
        return len(self.statements) + 2 * self.transactions

    @property
    def units(self) -> int:
        """Units of work: explicit transactions, plus statements sent outside any."""
        return self.transactions + sum(1 for _, autocommit in self.statements if autocommit)


def _autocommit(conn: Any) -> bool:
    options = conn.get_execution_options()
    return bool(
        options.get("isolation_level") == "AUTOCOMMIT" or options.get("ordering_sql_read_only")
    )


@contextmanager
def counting(ordering: CausalOrdering[Any]) -> Iterator[Counter]:
    assert ordering._store is not None, "use the instance once before counting"
    engine = ordering._store.engine.sync_engine
    counter = Counter()

    def before(conn: Any, _cur: Any, statement: str, *_: Any) -> None:
        if not statement.startswith("BEGIN"):  # SQLite's BEGIN IMMEDIATE: see on_commit
            counter.statements.append((statement.split()[0], _autocommit(conn)))

    def on_commit(conn: Any) -> None:
        if not _autocommit(conn):
            counter.transactions += 1

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "commit", on_commit)
    try:
        yield counter
    finally:
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "commit", on_commit)


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
    return counter.round_trips if ordering._store.queries.single_statement_steps else counter.units


async def test_in_order_event_without_leader_costs_two(ordering: CausalOrdering[Any]) -> None:
    await _warm(ordering)
    handled: list[Any] = []
    with counting(ordering) as counter:
        await _handle(ordering, make_event(), handled)
    assert len(handled) == 1
    assert _budget(ordering, counter) <= 2, counter


async def test_event_whose_leader_was_seen_costs_two(ordering: CausalOrdering[Any]) -> None:
    await _warm(ordering)
    leader = make_event()
    handled: list[Any] = []
    await _handle(ordering, leader, handled)
    with counting(ordering) as counter:
        await _handle(ordering, make_event(follows=leader), handled)
    assert len(handled) == 2
    assert _budget(ordering, counter) <= 2, counter


async def test_parked_then_replayed_follower_costs_four(ordering: CausalOrdering[Any]) -> None:
    await _warm(ordering)
    leader = make_event()
    follower = make_event(follows=leader)
    handled: list[Any] = []
    with counting(ordering) as parking, contextlib.suppress(EventArrivedEarly):
        await _handle(ordering, follower, handled)
    assert handled == []

    assert _budget(ordering, parking) <= 2, parking  # take the lease; park

    with counting(ordering) as replay:
        await _handle(ordering, leader, handled)
    assert handled == [leader.id, follower.id]
    # The leader's own path: lease, completion, and one more claim (followers exist) = 3.
    # The follower's replay: lease and completion = 2, so 4 for the follower in all.
    assert _budget(ordering, replay) <= 3 + 2, replay
