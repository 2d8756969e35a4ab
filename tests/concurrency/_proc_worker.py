"""A worker in its own OS process that starts on a signal, driven by ``test_processes.py``.

Usage: ``python -m tests.concurrency._proc_worker SPEC.json`` (from the repository root).

Like ``python -m ordering_sql.tools.simulation`` (it consumes through ``run_worker``, the usual
consumer: skip seen events, park early ones, retry one that another worker holds), with two
differences that let several processes act at the same moments:

* It connects and checks the schema first, then creates ``ready_file`` and waits for
  ``start_file`` to appear, so that every process starts together.
* With ``stepped``, it delivers one event per line read from stdin: for line ``i`` it sleeps
  ``delays[i]`` seconds, delivers event ``i`` and prints ``done i`` once that delivery was
  handled, parked or skipped. A parent writing to two such processes at once makes them deliver
  event ``i`` of each at (nearly) the same moment, in lock-step. Each delivery is logged as a
  ``deliver`` record (which ``check`` ignores) at the moment it begins.

Without ``stepped`` it consumes all its deliveries as fast as it can. At the end it prints its
``Tally`` as JSON on the last line of stdout.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

from pydantic import BaseModel, ConfigDict

from ordering_sql import CausalOrdering, dispose_engines
from ordering_sql.tools.simulation import (
    DeliveryQueue,
    HandledLog,
    Tally,
    read_deliveries,
    run_worker,
)

#: How long the worker waits for the start signal, or for its next step, before giving up.
SIGNAL_TIMEOUT_S = 60.0


class WorkerProcessSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    database_url: str
    scope: str
    deliveries: Path
    log: Path
    worker: str
    ready_file: Path
    start_file: Path
    stepped: bool = False
    #: With ``stepped``: how long to wait after step ``i`` before delivering event ``i``.
    delays: list[float] | None = None
    work_seconds: float = 0.0
    lease_timeout: float = 2.0
    claim_timeout: float = 3.0


def _started(start_file: Path) -> bool:
    return start_file.exists()


async def _wait_for_start(start_file: Path) -> None:
    deadline = time.monotonic() + SIGNAL_TIMEOUT_S
    while not _started(start_file):
        if time.monotonic() > deadline:
            msg = f"no start signal at {start_file} after {SIGNAL_TIMEOUT_S} s"
            raise TimeoutError(msg)
        await asyncio.sleep(0.001)


async def _stdin() -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    return reader, transport


async def _stepped(
    spec: WorkerProcessSpec, ordering: CausalOrdering[Any], log: HandledLog, tally: Tally
) -> None:
    events = list(read_deliveries(spec.deliveries))
    delays = spec.delays or [0.0] * len(events)
    if len(delays) != len(events):
        msg = f"{len(events)} deliveries but {len(delays)} delays"
        raise ValueError(msg)
    steps, transport = await _stdin()
    try:
        for i, (event, delay) in enumerate(zip(events, delays, strict=True)):
            line = await asyncio.wait_for(steps.readline(), SIGNAL_TIMEOUT_S)
            if not line:
                msg = f"stdin closed before step {i}"
                raise EOFError(msg)
            if delay > 0:
                await asyncio.sleep(delay)
            log.write("deliver", event.id)
            queue = DeliveryQueue([event])
            tally.add(await run_worker(ordering, queue, log, work_seconds=spec.work_seconds))
            print(f"done {i}", flush=True)
    finally:
        transport.close()


async def run(spec: WorkerProcessSpec) -> Tally:
    ordering: CausalOrdering[Any] = CausalOrdering(
        spec.scope,
        database_url=spec.database_url,
        lease_timeout=spec.lease_timeout,
        claim_timeout=spec.claim_timeout,
    )
    tally = Tally()
    try:
        await ordering.event_has_been_seen(uuid4())  # connect and check the schema now
        spec.ready_file.touch()
        await _wait_for_start(spec.start_file)
        with spec.log.open("a") as sink:
            log = HandledLog(sink, spec.worker)
            if spec.stepped:
                await _stepped(spec, ordering, log, tally)
            else:
                queue = DeliveryQueue(read_deliveries(spec.deliveries))
                tally.add(await run_worker(ordering, queue, log, work_seconds=spec.work_seconds))
    finally:
        await ordering.close()
        await dispose_engines()
    return tally


def main() -> None:
    spec = WorkerProcessSpec.model_validate_json(Path(sys.argv[1]).read_text())
    tally = asyncio.run(run(spec))
    print(json.dumps(tally.__dict__), flush=True)


if __name__ == "__main__":
    main()
