"""Lease renewal for long handlers, and the engine's own purge of expired rows."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from ordering_sql import CausalOrdering
from ordering_sql.admin import status
from tests.conftest import OrderingFactory
from tests.support import Clock, make_event


async def test_a_handler_slower_than_its_lease_keeps_it(make_ordering: OrderingFactory) -> None:
    """The lease is renewed while the body runs, so no other worker can take the event over."""
    worker = make_ordering(clock=None, lease_timeout=0.6)
    rival = make_ordering(clock=None, lease_timeout=0.6)
    event = make_event()
    body_started = asyncio.Event()
    rival_tries: list[bool] = []

    async def slow_handler() -> None:
        async with worker.event_is_processing(event):
            body_started.set()
            await asyncio.sleep(1.5)  # well past the 0.6 s lease

    handling = asyncio.create_task(slow_handler())
    await asyncio.wait_for(body_started.wait(), timeout=5)
    for _ in range(3):
        await asyncio.sleep(0.35)
        rival_tries.append(await rival.record_event_as_processing(event))
    await asyncio.wait_for(handling, timeout=10)

    assert rival_tries == [False, False, False]
    assert await rival.event_has_been_seen(event)
    assert not await rival.record_event_as_processing(event), "a seen event cannot be taken"


async def test_a_renewed_lease_still_expires_when_its_worker_is_gone(
    make_ordering: OrderingFactory, clock: Clock
) -> None:
    """Renewal only happens while the body runs: an abandoned lease expires as before."""
    ordering = make_ordering(lease_timeout=5)
    event = make_event()
    assert await ordering.record_event_as_processing(event)
    clock.advance(timedelta(seconds=5))
    assert await make_ordering().record_event_as_processing(event)


async def _expired_seen(ordering: CausalOrdering[Any]) -> int:
    db = await ordering._db()
    return sum(s.seen_expired for s in await status(db, now=ordering._clock()))


async def test_engine_purges_expired_rows_by_itself(
    make_ordering: OrderingFactory, clock: Clock
) -> None:
    ordering = make_ordering()
    old = [make_event() for _ in range(3)]
    for event in old:
        async with ordering.event_is_processing(event):
            pass  # completing runs the first purge: nothing has expired yet
    clock.advance(timedelta(minutes=31))
    assert await _expired_seen(ordering) == 3

    async with ordering.event_is_processing(make_event()):
        pass
    assert await _expired_seen(ordering) == 0, "a completion more than a minute later purges"
    assert not await ordering.event_has_been_seen(old[0])


async def test_engine_purges_at_most_once_a_minute(
    make_ordering: OrderingFactory, clock: Clock
) -> None:
    ordering = make_ordering()
    async with ordering.event_is_processing(make_event()):
        pass  # this process's first purge runs now
    in_the_past = make_ordering(clock=Clock(clock.now - timedelta(hours=2)))
    await in_the_past.record_event_as_seen(make_event())  # expired long ago
    assert await _expired_seen(ordering) == 1

    clock.advance(timedelta(seconds=59))
    async with ordering.event_is_processing(make_event()):
        pass
    assert await _expired_seen(ordering) == 1, "within a minute of a purge, none runs again"

    clock.advance(timedelta(seconds=1))
    async with ordering.event_is_processing(make_event()):
        pass
    assert await _expired_seen(ordering) == 0
