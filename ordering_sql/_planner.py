"""Which events of a batch are ready, and which must park: a pure decision, from values alone.

The engine takes the batch's leases and reads the marks of the leaders it needs
(``store.take``), then asks ``plan``; it parks what the plan says in one step and hands the
ready events to the caller, leaders before their followers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

__all__ = ["Plan", "Planned", "plan"]


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
