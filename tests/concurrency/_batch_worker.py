"""A batch consumer in its own OS process that dies by ``SIGKILL``, driven by
``test_batch_concurrency.py``.

Usage: ``python -m tests.concurrency._batch_worker SPEC.json`` (from the repository root).

It delivers the batches of ``batches`` (JSON lines, each a list of events) one at a time through
``preceding_events_confirmed``; followers released by a batch come back to the usual recursive
handler (the single-event path). Its log (``ordering_sql.tools.simulation.HandledLog``, one
flushed JSON line per record) holds a ``start`` and an ``end`` for every handler body, a
``parked`` for every event a batch parked, and an ``ack`` for every delivery of a batch once
its block and the replays it released are over, as a consumer acknowledges its messages.

In batch ``die_in_batch`` it kills itself with ``SIGKILL``, a real crash with no clean-up:

* by default inside the block, after the bodies of ``die_after`` ready events ended, before the
  batch was recorded: its leases stay behind, live until ``lease_timeout``;
* with ``die_in_replay``, after the batch was recorded, inside the body of the first follower
  that batch released: that leader's claims on its followers stay behind, live until
  ``claim_timeout``, and so does the follower's own lease.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn
from uuid import uuid4

from pydantic import BaseModel, ConfigDict, TypeAdapter

from ordering_sql import CausalOrdering, ReceivedEvent, dispose_engines
from ordering_sql.tools.simulation import HandledLog

BATCH = TypeAdapter(list[ReceivedEvent])


class BatchWorkerSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    database_url: str
    scope: str
    batches: Path
    log: Path
    worker: str = "doomed"
    lease_timeout: float = 30.0
    claim_timeout: float = 60.0
    die_in_batch: int | None = None
    die_after: int = 0
    die_in_replay: bool = False


def write_batches(path: Path, batches: list[list[ReceivedEvent]]) -> None:
    path.write_bytes(b"\n".join(BATCH.dump_json(batch) for batch in batches) + b"\n")


def read_batches(path: Path) -> list[list[ReceivedEvent]]:
    return [BATCH.validate_json(line) for line in path.read_text().splitlines() if line]


def die() -> NoReturn:
    os.kill(os.getpid(), signal.SIGKILL)
    msg = "not reached"
    raise SystemExit(msg)  # pragma: no cover


async def run(spec: BatchWorkerSpec) -> None:
    ordering: CausalOrdering[ReceivedEvent] = CausalOrdering(
        spec.scope,
        database_url=spec.database_url,
        lease_timeout=spec.lease_timeout,
        claim_timeout=spec.claim_timeout,
    )
    dying = False
    try:
        await ordering.event_has_been_seen(uuid4())  # connect and check the schema now
        with spec.log.open("a") as sink:
            log = HandledLog(sink, spec.worker)

            async def handler(event: ReceivedEvent, depth: int = 0) -> None:
                async with ordering.preceding_event_confirmed(handler, event, depth):
                    log.write("start", event.id, depth=depth)
                    if dying and spec.die_in_replay:
                        die()
                    log.write("end", event.id, depth=depth)

            for number, deliveries in enumerate(read_batches(spec.batches)):
                dying = number == spec.die_in_batch
                async with ordering.preceding_events_confirmed(handler, deliveries) as batch:
                    for event in batch.parked:
                        log.write("parked", event.id)
                    for done, event in enumerate(batch):
                        if dying and not spec.die_in_replay and done == spec.die_after:
                            die()
                        log.write("start", event.id, depth=0)
                        log.write("end", event.id, depth=0)
                busy = {event.id for event in batch.busy}
                for event in deliveries:
                    if event.id not in busy:
                        log.write("ack", event.id)
    finally:
        await ordering.close()
        await dispose_engines()


def main() -> None:
    spec = BatchWorkerSpec.model_validate_json(Path(sys.argv[1]).read_text())
    asyncio.run(run(spec))


if __name__ == "__main__":
    main()
