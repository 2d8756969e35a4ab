"""A Prefect triggers consumer in its own OS process, driven by ``test_processes.py``.

Usage: ``python -m tests.prefect._consumer SPEC.json`` (from the repository root), with the
environment of ``tests.prefect.conftest.prefect_child_env`` (Prefect's home and database, and
``PREFECT_SERVER_EVENTS_CAUSAL_ORDERING=ordering_sql.prefect``).

Once Prefect is imported it creates ``imported`` and waits for ``start``; then it runs Prefect's
own ``triggers.consumer`` (whose ordering Prefect's loader builds; its first use migrates an
empty database), creates ``ready`` once the consumer started, then for each phase waits for the
phase's ``start`` file,
hands each event of the phase to the consumer's message handler as Prefect's event pipeline
would, and creates the phase's ``done`` file. Every event that reaches trigger evaluation (a
call of ``find_interested_triggers``, wrapped here) is logged to ``log`` as a JSON line with
``time.monotonic_ns()`` (one clock for every process of the machine) and the process id.
The periodic evaluation runs once, at the start: no follower here is released by the sweep.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import anyio
from prefect.server.events import triggers
from prefect.server.events.schemas.events import ReceivedEvent

import ordering_sql
from tests.prefect.support import message, triggers_consumer

#: How long a phase waits for its start file before the process gives up.
SIGNAL_TIMEOUT_S = 60.0


async def _wait_for(name: str) -> None:
    path, deadline = anyio.Path(name), time.monotonic() + SIGNAL_TIMEOUT_S
    while not await path.exists():
        if time.monotonic() > deadline:
            msg = f"gave up waiting for {path}"
            raise TimeoutError(msg)
        await asyncio.sleep(0.01)


async def main(spec: dict[str, Any], log: TextIO) -> None:
    original = triggers.find_interested_triggers

    def recording(event: ReceivedEvent) -> Any:
        record = {"id": str(event.id), "ns": time.monotonic_ns(), "pid": os.getpid()}
        log.write(json.dumps(record) + "\n")
        log.flush()
        return original(event)

    triggers.find_interested_triggers = recording  # type: ignore[assignment]

    await anyio.Path(spec["imported"]).touch()
    await _wait_for(spec["start"])
    async with triggers_consumer() as handle:
        await anyio.Path(spec["ready"]).touch()
        for phase in spec["phases"]:
            await _wait_for(phase["start"])
            for raw in phase["events"]:
                await handle(message(ReceivedEvent.model_validate(raw)))
            await anyio.Path(phase["done"]).touch()
    await ordering_sql.dispose_engines()


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    with Path(spec["log"]).open("a") as log:
        asyncio.run(main(spec, log))
