"""A worker in its own OS process, driven by ``test_durability.py``.

Usage: ``python _child.py DATABASE_URL NOW_ISO ACTIONS_JSON``

``ACTIONS_JSON`` is a list of ``{"do": ..., "event": <event JSON object>}`` steps, run in order
by one ``CausalOrdering`` whose clock is frozen at ``NOW_ISO`` (the parent's test clock). The
results are printed to stdout as one JSON list, one entry per step:

* ``handle``: the usual recursive handler; ``{"handled": [ids...]}`` in the order bodies ran, or
  ``"parked"`` (EventArrivedEarly) or ``"busy"`` (EventBeingProcessed).
* ``lease``: ``record_event_as_processing``; true or false. The lease is left held on exit.
* ``seen``: ``event_has_been_seen``; true or false.
* ``followers``: the ids ``get_followers`` returns for the event.

The process exits without releasing anything it holds, like a worker that stops.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime
from typing import Any

from ordering_sql import (
    CausalOrdering,
    EventArrivedEarly,
    EventBeingProcessed,
    ReceivedEvent,
    dispose_engines,
)


async def run(database_url: str, now: datetime, actions: list[dict[str, Any]]) -> list[Any]:
    ordering: CausalOrdering[ReceivedEvent] = CausalOrdering(
        "test", database_url=database_url, clock=lambda: now
    )
    handled: list[str] = []

    async def handler(event: ReceivedEvent, depth: int = 0) -> None:
        async with ordering.preceding_event_confirmed(handler, event, depth):
            handled.append(str(event.id))

    results: list[Any] = []
    try:
        for action in actions:
            event = ReceivedEvent.model_validate(action["event"])
            if action["do"] == "handle":
                handled.clear()
                try:
                    await handler(event)
                except EventArrivedEarly:
                    results.append("parked")
                except EventBeingProcessed:
                    results.append("busy")
                else:
                    results.append({"handled": list(handled)})
            elif action["do"] == "lease":
                results.append(await ordering.record_event_as_processing(event))
            elif action["do"] == "seen":
                results.append(await ordering.event_has_been_seen(event))
            elif action["do"] == "followers":
                results.append([str(f.id) for f in await ordering.get_followers(event)])
            else:
                msg = f"unknown action {action['do']!r}"
                raise ValueError(msg)
    finally:
        await ordering.close()
        await dispose_engines()
    return results


def main() -> None:
    database_url, now_iso, actions_json = sys.argv[1:4]
    now = datetime.fromisoformat(now_iso)
    results = asyncio.run(run(database_url, now, json.loads(actions_json)))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
