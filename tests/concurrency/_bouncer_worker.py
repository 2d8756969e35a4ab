"""A worker process for ``test_pgbouncer.py``: several consumers in one process.

Usage: ``python -m tests.concurrency._bouncer_worker SPEC.json`` (from the repository root).

Like ``_proc_worker`` without ``stepped``: it connects and checks the schema, creates
``ready_file``, waits for ``start_file``, then consumes its deliveries through ``run_worker``. The
difference: ``consumers`` consumers take turns on the one delivery queue at once (as a service
handling several messages concurrently does), each with its own ``CausalOrdering`` on the one
shared engine, so that the process holds several client connections at the same moment. Behind a
pooler with fewer server connections than that, consecutive transactions of one client
connection then really run on different server connections. Every consumer writes to the one
log under the process's worker name. At the end it prints the sum of their ``Tally`` as JSON on
the last line of stdout.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any
from uuid import uuid4

from ordering_sql import CausalOrdering, dispose_engines
from ordering_sql.tools.simulation import (
    DeliveryQueue,
    HandledLog,
    Tally,
    read_deliveries,
    run_worker,
)
from tests.concurrency._proc_worker import WorkerProcessSpec, _wait_for_start


class BouncerWorkerSpec(WorkerProcessSpec):
    #: How many consumers share the process's delivery queue at once.
    consumers: int = 3


async def run(spec: BouncerWorkerSpec) -> Tally:
    orderings: list[CausalOrdering[Any]] = [
        CausalOrdering(
            spec.scope,
            database_url=spec.database_url,
            lease_timeout=spec.lease_timeout,
            claim_timeout=spec.claim_timeout,
        )
        for _ in range(spec.consumers)
    ]
    tally = Tally()
    try:
        # Connect and check the schema now, on as many connections as there are consumers.
        await asyncio.gather(*(o.event_has_been_seen(uuid4()) for o in orderings))
        spec.ready_file.touch()
        await _wait_for_start(spec.start_file)
        with spec.log.open("a") as sink:
            log = HandledLog(sink, spec.worker)
            queue = DeliveryQueue(read_deliveries(spec.deliveries))
            tallies = await asyncio.gather(
                *(run_worker(o, queue, log, work_seconds=spec.work_seconds) for o in orderings)
            )
        for one in tallies:
            tally.add(one)
    finally:
        for ordering in orderings:
            await ordering.close()
        await dispose_engines()
    return tally


def main() -> None:
    spec = BouncerWorkerSpec.model_validate_json(Path(sys.argv[1]).read_text())
    tally = asyncio.run(run(spec))
    print(json.dumps(tally.__dict__), flush=True)


if __name__ == "__main__":
    main()
