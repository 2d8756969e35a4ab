"""Ordering a stream of JSON lines: what ``ordering-sql order`` does.

Each line is a ``ReceivedEvent`` (``received`` may be absent: it is set on arrival). An event is
written out at the moment it may be handled: at once if its leader was handled already (in this
run or an earlier one on the same database and scope), or when its leader arrives. Events whose
leader has not arrived stay parked in the database for a later run.

Lines are taken ``batch_size`` at a time through the batch API (one batch is one lease step and
one completion step, whatever its size); with ``batch_size=1`` each event goes through the
single-event path as soon as its line is read. Memory stays bounded by the batch: parked events
live in the database, not here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from ordering_sql.engine import CausalOrdering
from ordering_sql.errors import EventArrivedEarly, EventBeingProcessed
from ordering_sql.models import ReceivedEvent, utc_now

__all__ = ["MalformedLine", "OrderSummary", "order_lines"]


@dataclass
class OrderSummary:
    read: int = 0
    emitted: int = 0
    replayed: int = 0
    parked: int = 0
    duplicates: int = 0
    malformed: int = 0
    lost_flushed: int = 0

    def line(self) -> str:
        return (
            f"read {self.read}, emitted {self.emitted} ({self.replayed} released by their leader"
            f", {self.lost_flushed} lost followers flushed), parked {self.parked}, "
            f"duplicates {self.duplicates}, malformed {self.malformed}"
        )


class MalformedLine(Exception):
    """Raised in strict mode at the first line that is not a valid event."""

    def __init__(self, number: int, reason: str) -> None:
        super().__init__(f"line {number}: {reason}")
        self.number = number
        self.reason = reason


def _reason(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else str(first["msg"])


async def order_lines(
    ordering: CausalOrdering[Any],
    lines: Iterable[bytes | str],
    emit: Callable[[str], None],
    *,
    on_malformed: Callable[[int, str], None],
    strict: bool = False,
    flush_lost: bool = False,
    restamp: bool = False,
    batch_size: int = 1,
) -> OrderSummary:
    """Push JSON lines through ``ordering``; ``emit`` gets each event's JSON when it is ready.

    Lines may be bytes (checked as UTF-8 like the rest of the JSON) or text. With ``restamp``
    every event counts as received now, whatever its ``received`` says: an old log is then
    ordered along every ``follows`` edge instead of passing through as too old to wait.
    """
    if batch_size < 1:
        msg = f"batch_size must be at least 1, got {batch_size}."
        raise ValueError(msg)
    summary = OrderSummary()
    max_depth = ordering.durations.max_depth_of_preceding_event
    # Followers released deeper than the engine's recursion limit wait here and are delivered
    # again from the top, so a chain of any length comes out whole and in order.
    deeper: deque[ReceivedEvent] = deque()

    async def handler(event: ReceivedEvent, depth: int = 0) -> None:
        if depth > max_depth:
            deeper.append(event)  # still claimed by its leader: nobody else takes it meanwhile
            return
        async with ordering.preceding_event_confirmed(handler, event, depth):
            emit(event.model_dump_json())
            summary.emitted += 1
            summary.replayed += depth > 0

    async def deliver(event: ReceivedEvent) -> None:
        if await ordering.event_has_been_seen(event):
            summary.duplicates += 1
            return
        try:
            await handler(event)
        except EventArrivedEarly:
            summary.parked += 1
        except EventBeingProcessed:
            summary.duplicates += 1  # another consumer holds it right now
        await drain()

    async def drain() -> None:
        while deeper:
            emitted = summary.emitted
            await deliver(deeper.popleft())
            summary.replayed += summary.emitted > emitted  # released by its leader, too

    async def deliver_batch(events: list[ReceivedEvent]) -> None:
        async with ordering.preceding_events_confirmed(handler, events) as batch:
            for event in batch:
                emit(event.model_dump_json())
                summary.emitted += 1
        summary.parked += len(batch.parked)
        summary.duplicates += len(batch.skipped) + len(batch.busy)
        await drain()

    def parsed() -> Iterator[ReceivedEvent]:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            summary.read += 1
            try:
                event = ReceivedEvent.model_validate_json(line)
            except ValidationError as exc:
                summary.malformed += 1
                if strict:
                    raise MalformedLine(number, _reason(exc)) from None
                on_malformed(number, _reason(exc))
                continue
            if restamp:
                event = event.model_copy(update={"received": utc_now()})
            yield event

    if batch_size == 1:
        for event in parsed():
            await deliver(event)
    else:
        pending: list[ReceivedEvent] = []
        try:
            for event in parsed():
                pending.append(event)
                if len(pending) == batch_size:
                    await deliver_batch(pending)
                    pending = []
        except MalformedLine:
            await deliver_batch(pending)  # strict: the lines before the bad one still count
            raise
        if pending:
            await deliver_batch(pending)

    if flush_lost:
        for event in await ordering.get_lost_followers():
            summary.lost_flushed += 1
            await deliver(event)
    return summary
