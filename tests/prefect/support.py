"""Helpers for the Prefect adapter tests: Prefect's own events, handlers and messages."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

from prefect.server.events import ordering as prefect_ordering
from prefect.server.events import triggers
from prefect.server.events.schemas.events import ReceivedEvent
from prefect.server.utilities.messaging.memory import MemoryMessage
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

#: For ``triggers.consumer(periodic_granularity=NO_SWEEP)``: its periodic evaluation runs once at
#: the start, then not again during a test, so a follower evaluated in a test was released by its
#: leader, not by the lost-follower sweep.
NO_SWEEP = timedelta(hours=1)


@asynccontextmanager
async def triggers_consumer() -> AsyncIterator[Any]:
    """Prefect's ``triggers.consumer(periodic_granularity=NO_SWEEP)``; yields its message handler.

    It is left only once its first periodic evaluation finished: Prefect's periodic task sleeps
    for a whole period in a ``finally`` block, so cancelling it in the middle of an evaluation
    (as leaving the consumer does) would wait for that period, an hour here.
    """
    finished = asyncio.Event()
    original = triggers.periodic_evaluation

    async def periodic_evaluation(now: Any) -> None:
        try:
            await original(now)
        finally:
            finished.set()

    triggers.periodic_evaluation = periodic_evaluation  # type: ignore[assignment]
    try:
        async with triggers.consumer(periodic_granularity=NO_SWEEP) as handle:
            yield handle
            await asyncio.wait_for(finished.wait(), timeout=60)
    finally:
        triggers.periodic_evaluation = original  # type: ignore[assignment]


def make_event(
    *,
    follows: ReceivedEvent | UUID | None = None,
    occurred: datetime | None = None,
    received: datetime | None = None,
    name: str = "test.event",
    resource: str | None = None,
) -> ReceivedEvent:
    """Prefect's own ``ReceivedEvent``; ``follows`` may be an event or an id."""
    now = datetime.now(UTC)
    leader = follows.id if isinstance(follows, ReceivedEvent) else follows
    return ReceivedEvent(
        occurred=occurred or now,
        event=name,
        resource={"prefect.resource.id": resource or f"test.resource.{name}"},
        id=uuid4(),
        follows=leader,
        received=received or now,
    )


def chain(length: int, *, prefix: str = "chain") -> list[ReceivedEvent]:
    """``length`` events, each following the one before, occurring one second apart."""
    start = datetime.now(UTC)
    events: list[ReceivedEvent] = []
    for i in range(length):
        events.append(
            make_event(
                follows=events[-1] if events else None,
                occurred=start + timedelta(seconds=i),
                name=f"{prefix}.{i}",
            )
        )
    return events


def family() -> dict[str, ReceivedEvent]:
    """one <- two <- {three_a, three_b}, the reference engine's test family."""
    t = datetime.now(UTC)
    one = make_event(occurred=t, received=t, name="one")
    two = make_event(follows=one, occurred=t + timedelta(seconds=1), received=t, name="two")
    three_a = make_event(follows=two, occurred=t + timedelta(seconds=2), received=t, name="three_a")
    three_b = make_event(follows=two, occurred=t + timedelta(seconds=3), received=t, name="three_b")
    return {"one": one, "two": two, "three_a": three_a, "three_b": three_b}


class Recorder:
    """The handler Prefect's triggers service uses, in miniature: records what it handled.

    Catches Prefect's ``EventArrivedEarly`` (not ordering-sql's), as Prefect's consumer does.
    """

    def __init__(self, ordering: Any) -> None:
        self.ordering = ordering
        self.handled: list[UUID] = []

    async def handler(self, event: ReceivedEvent, depth: int = 0) -> None:
        async with self.ordering.preceding_event_confirmed(self.handler, event, depth):
            self.handled.append(event.id)

    async def deliver(self, event: ReceivedEvent) -> None:
        if await self.ordering.event_has_been_seen(event.id):
            return
        with contextlib.suppress(prefect_ordering.EventArrivedEarly):
            await self.handler(event)


def message(event: ReceivedEvent) -> MemoryMessage:
    """The message Prefect's event pipeline hands the triggers consumer for ``event``."""
    return MemoryMessage(
        data=event.model_dump_json().encode(),
        attributes={"id": str(event.id), "event": event.event},
    )


async def schema_versions(database_url: str) -> list[tuple[Any, ...]]:
    """Every row of ordering-sql's own version table."""
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT * FROM ordering_sql_version"))).all()
    finally:
        await engine.dispose()
    return [tuple(row) for row in rows]
