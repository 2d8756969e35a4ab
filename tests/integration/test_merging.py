"""Concurrent callers share statements (``store/_merge.py``): group commit for the steps.

On every backend: a lone caller runs at once, alone; callers that arrive while a step of the
same kind is in flight share the next statement (Postgres) or transaction (SQLite); each gets
its own result and its own error; two callers of the same event in one merged step are decided
as two concurrent callers would be: one wins.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from ordering_sql import CausalOrdering, EventArrivedEarly, LeaseLostError
from tests.conftest import OrderingFactory
from tests.support import Clock, Counter, counting, make_event

CALLERS = 8


async def _warm(ordering: CausalOrdering[Any]) -> None:
    async with ordering.event_is_processing(make_event()):
        pass  # connected, schema checked, the first purge done


def _units(counter: Counter, word: str) -> int:
    """Statements starting with ``word`` on Postgres; write transactions on SQLite."""
    if counter.transactions:
        return counter.transactions
    return sum(1 for first, _ in counter.statements if first == word)


async def test_a_lone_caller_runs_alone_and_at_once(ordering: CausalOrdering[Any]) -> None:
    await _warm(ordering)
    async with counting(ordering) as counter:
        assert await ordering.record_event_as_processing(make_event())
    assert _units(counter, "WITH") == 1, counter


async def test_concurrent_callers_share_statements(
    make_ordering: OrderingFactory,
) -> None:
    """Eight instances on one database URL (one Store), each taking and completing its own
    event at the same moment: far fewer statements (transactions) than events, and every
    caller gets its own answer."""
    workers = [make_ordering() for _ in range(CALLERS)]
    await _warm(workers[0])
    events = [make_event() for _ in range(CALLERS)]
    async with counting(workers[0]) as counter:
        taken = await asyncio.gather(
            *(w.record_event_as_processing(e) for w, e in zip(workers, events, strict=True))
        )
    assert taken == [True] * CALLERS
    assert _units(counter, "WITH") < CALLERS / 2, counter

    async def handle(ordering: CausalOrdering[Any], event: Any) -> None:
        async with ordering.event_is_processing(event):
            await asyncio.sleep(0)

    others = [make_event() for _ in range(CALLERS)]
    async with counting(workers[0]) as counter:
        await asyncio.gather(*(handle(w, e) for w, e in zip(workers, others, strict=True)))
    for event in others:
        assert await workers[0].event_has_been_seen(event)
    # Two steps per event (take, complete), merged: far fewer than 2 x 8.
    cost = counter.transactions or len(counter.sent)  # SQLite: units; Postgres: statements
    assert cost < CALLERS, counter


async def test_two_callers_of_one_event_in_one_merged_step_one_wins(
    make_ordering: OrderingFactory,
) -> None:
    workers = [make_ordering() for _ in range(CALLERS)]
    await _warm(workers[0])
    event = make_event()
    for _ in range(3):  # the first call of a burst runs alone; the rest merge
        taken = await asyncio.gather(*(w.record_event_as_processing(event) for w in workers))
        assert taken.count(True) <= 1, taken
        await workers[0].forget_event_is_processing(event)
    taken = await asyncio.gather(*(w.record_event_as_processing(event) for w in workers))
    assert taken.count(True) == 1, taken


async def test_each_caller_of_a_merged_completion_gets_its_own_error(
    make_ordering: OrderingFactory, clock: Clock
) -> None:
    """A merged completion in which one caller's lease was taken over: that caller gets
    ``LeaseLostError`` and records nothing; the others complete."""
    worker, rival = make_ordering(), make_ordering()
    await _warm(worker)
    stale, fine = make_event(), [make_event() for _ in range(3)]
    started = asyncio.Event()
    release = asyncio.Event()

    async def handle(event: Any, *, stall: bool = False) -> None:
        async with worker.event_is_processing(event):
            if stall:
                clock.advance(worker.lease_timeout * 2)
                assert await rival.record_event_as_processing(stale)  # taken over
                started.set()
            await release.wait()

    tasks = [asyncio.create_task(handle(stale, stall=True))]
    await asyncio.wait_for(started.wait(), 10)
    tasks += [asyncio.create_task(handle(event)) for event in fine]
    await asyncio.sleep(0.05)
    release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], LeaseLostError), results
    assert results[1:] == [None] * len(fine), results
    assert not await worker.event_has_been_seen(stale)
    for event in fine:
        assert await worker.event_has_been_seen(event)


@pytest.mark.parametrize("backend", [pytest.param("sqlite", marks=pytest.mark.sqlite)])
async def test_sqlite_merges_different_write_steps_into_one_transaction(
    make_ordering: OrderingFactory,
) -> None:
    """SQLite: takes, parks and completions of several callers share one write transaction
    (one lock, one commit), whatever step each caller is at."""
    workers = [make_ordering() for _ in range(CALLERS)]
    await _warm(workers[0])
    leader = make_event()
    followers = [make_event(follows=leader) for _ in range(CALLERS // 2)]
    singles = [make_event() for _ in range(CALLERS // 2)]

    async def deliver(ordering: CausalOrdering[Any], event: Any) -> None:
        async def handler(e: Any, depth: int = 0) -> None:
            async with ordering.preceding_event_confirmed(handler, e, depth):
                await asyncio.sleep(0)

        with contextlib.suppress(EventArrivedEarly):  # the followers park
            await handler(event)

    async with counting(workers[0]) as counter:
        await asyncio.gather(
            *(deliver(w, e) for w, e in zip(workers, [*followers, *singles], strict=True))
        )
    # Each event alone would take 2 write units (take; park or complete): 16 for 8 events.
    assert counter.transactions < CALLERS, counter
    assert [f.id for f in await workers[0].get_followers(leader)] != []
