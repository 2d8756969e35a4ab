"""Which events of a batch are ready, and which must park: a pure decision, from values alone.

The engine takes the batch's leases and reads the marks of the leaders it needs
(``store.take``), then asks ``plan``; it parks what the plan says in one step and hands the
ready events to the caller, leaders before their followers, in a ``Batch``: what the caller
sees of the decision.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar
from uuid import UUID

__all__ = ["Batch", "Plan", "Planned", "plan"]

E = TypeVar("E")


@dataclass(frozen=True, slots=True)
class Planned:
    """What the planner needs of one event."""

    id: UUID
    #: Its leader, if it must wait for one: it follows another event and is younger than the
    #: lookback (an event that follows itself follows nothing; an older one goes through).
    waits_for: UUID | None


@dataclass(frozen=True, slots=True)
class Plan:
    #: Ready events, in the order to handle them: a leader before its followers.
    ready: list[UUID]
    #: Events to park, each waiting for its leader: outside the batch and not seen, or in the
    #: batch and parked itself, or in a cycle.
    park: list[UUID]


def plan(events: Sequence[Planned], *, taken: set[UUID], seen: set[UUID]) -> Plan:
    """Sort the ``taken`` events of a batch into ready ones (leaders first) and ones to park.

    ``seen``: the leaders known to be handled. An event is ready if it waits for nothing, if
    its leader is seen, or if its leader is ready earlier in the same batch; any other event
    parks. Each event's chain of leaders within the batch is walked iteratively (a batch may
    hold a chain of any length, or a cycle), deciding a leader before its follower.
    """
    by_id = {event.id: event for event in events if event.id in taken}
    decided: dict[UUID, bool] = {}  # event id -> ready (True) or parked (False)
    ready: list[UUID] = []
    park: list[UUID] = []
    for first in by_id.values():
        if first.id in decided:
            continue
        path: list[Planned] = []
        on_path: set[UUID] = set()
        current = first
        while True:  # up the chain of leaders in the batch, to one already decided or outside
            path.append(current)
            on_path.add(current.id)
            leader = current.waits_for
            if leader is None or leader not in by_id or leader in decided or leader in on_path:
                break
            current = by_id[leader]
        for event in reversed(path):  # leaders first
            leader = event.waits_for
            if leader is None:
                go = True
            elif leader in by_id:
                go = decided.get(leader, False)  # not decided yet: a cycle
            else:
                go = leader in seen
            decided[event.id] = go
            (ready if go else park).append(event.id)
    return Plan(ready=ready, park=park)


@dataclass(eq=False)
class Batch(Generic[E]):
    """What ``preceding_events_confirmed`` decided for one batch of events.

    Iterating a batch yields ``ready``: handle those, in that order (a leader comes before its
    followers). ``parked`` events wait in the database for a leader outside the batch, and
    ``skipped`` ones were repeats within the batch or already handled: acknowledge both, with
    the ready ones. ``busy`` events are being handled by another worker right now: do not
    acknowledge them, redeliver them later (as for ``EventBeingProcessed``), so that they are
    not lost if that worker dies.
    """

    ready: list[E]
    parked: list[E]
    skipped: list[E]
    busy: list[E]
    #: Followers from earlier batches that this batch's events released, handed to the handler
    #: after the batch was recorded (filled in when the ``async with`` block ends).
    replayed: list[E] = field(default_factory=list)

    def __iter__(self) -> Iterator[E]:
        return iter(self.ready)

    def __len__(self) -> int:
        return len(self.ready)
