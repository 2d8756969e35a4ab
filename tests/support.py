"""Helpers shared by the test suites: a movable clock and event builders."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

from ordering_sql import ReceivedEvent


@dataclass
class Clock:
    """A clock the tests move by hand; starts at the real current time."""

    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta | float) -> None:
        self.now += delta if isinstance(delta, timedelta) else timedelta(seconds=delta)


def make_event(
    *,
    follows: UUID | ReceivedEvent | None = None,
    occurred: datetime | None = None,
    received: datetime | None = None,
    id: UUID | None = None,
    name: str = "test.event",
    **extra: Any,
) -> ReceivedEvent:
    """A ReceivedEvent with sensible defaults; ``follows`` may be an event or an id."""
    now = datetime.now(UTC)
    leader = follows.id if isinstance(follows, ReceivedEvent) else follows
    return ReceivedEvent(
        occurred=occurred or now,
        event=name,
        resource={"prefect.resource.id": f"test.resource.{name}"},
        id=id or uuid4(),
        follows=leader,
        received=received or now,
        **extra,
    )


def chain(
    length: int, *, start: datetime | None = None, received: datetime | None = None
) -> list[ReceivedEvent]:
    """``length`` events, each following the one before, occurring one second apart."""
    start = start or datetime.now(UTC)
    events: list[ReceivedEvent] = []
    for i in range(length):
        events.append(
            make_event(
                follows=events[-1] if events else None,
                occurred=start + timedelta(seconds=i),
                received=received,
                name=f"chain.{i}",
            )
        )
    return events
