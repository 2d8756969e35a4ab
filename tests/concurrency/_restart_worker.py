"""A worker process that keeps consuming while its Postgres restarts, for ``test_postgres_restart``.

Usage: ``python -m tests.concurrency._restart_worker SPEC.json`` (from the repository root).

The usual consumer (as ``ordering_sql.tools.simulation.run_worker``: skip seen events, the recursive
handler through ``preceding_event_confirmed``, ``EventArrivedEarly`` acknowledged,
``EventBeingProcessed`` redelivered later), made for a database that goes away under it:

* Any other ``OrderingError`` (``StoreError``, ``DatabaseUnavailableError``, ``LeaseLostError``...)
  is a nack: the event is redelivered later, and the nack is counted by exception class.
* Any exception that is not an ``OrderingError`` is recorded (class, message and traceback, in
  the log and in the report) and the event is redelivered too; the test fails if there was one.
  So are exceptions that reach the event loop's exception handler (a task nobody awaited).
* Handlers take ``work_seconds`` (a random time in that range) and every delivery waits
  ``pace_seconds`` first, so that the stream lasts long enough to span the faults.
* Every ``sweep_every`` seconds it runs the periodic sweep (``get_lost_followers()``), whose
  results go back into its queue.
* It stops only once its queue is empty and ``stop_file`` exists, so that followers released
  or swept late still come through.
* It counts the Store's retries of transient faults (the ``transient database fault`` warnings
  of logger ``ordering_sql.store``) by the root cause's exception class.

It connects and checks the schema first, then creates ``ready_file`` and waits for
``start_file``. At the end it writes its report (JSON) to ``report``. Its handler log is the
``HandledLog`` of ``ordering_sql.tools.simulation`` (``start``/``end``/``ack`` records, read by
``check``) with ``nack`` and ``unexpected`` records besides.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any
from uuid import uuid4

from pydantic import BaseModel, ConfigDict

from ordering_sql import (
    CausalOrdering,
    EventArrivedEarly,
    EventBeingProcessed,
    OrderingError,
    ReceivedEvent,
    dispose_engines,
)
from ordering_sql.tools.simulation import DeliveryQueue, HandledLog, read_deliveries

#: How long the worker waits for the start signal before giving up.
SIGNAL_TIMEOUT_S = 60.0
#: The longest a worker runs after the start signal; the test kills it long before.
RUN_TIMEOUT_S = 150.0
#: The message of the Store's retry log line (``Store._retrying``).
RETRY_MESSAGE = "transient database fault"


class RestartWorkerSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    database_url: str
    scope: str
    deliveries: Path
    log: Path
    report: Path
    worker: str
    ready_file: Path
    start_file: Path
    stop_file: Path
    #: Each handler body takes a random time in this range.
    work_seconds: tuple[float, float] = (0.002, 0.005)
    #: The wait before each delivery.
    pace_seconds: float = 0.03
    #: Redelivery delays: for an event another worker holds, and after a nack.
    retry_delay: float = 0.05
    nack_delay: float = 0.2
    sweep_every: float = 0.5
    lease_timeout: float = 3.0
    claim_timeout: float = 4.0
    seed: int = 0


class Queue(DeliveryQueue):
    """The simulation's queue (a nacked event comes back after a delay), read with a timeout:
    the worker also sweeps, and waits for late followers, while nothing is ready."""

    async def get_within(self, wait: float) -> ReceivedEvent | None:
        """The next delivery, or None if none is ready within ``wait`` seconds."""
        if not self._ready:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), wait)
            except TimeoutError:
                return None
        return self._ready.popleft() if self._ready else None


class RetryCounter(logging.Handler):
    """Counts the Store's retry warnings by the exception class of their root cause."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.by_cause: Counter[str] = Counter()
        #: A few distinct descriptions of each cause, for the report.
        self.samples: dict[str, list[str]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if RETRY_MESSAGE not in record.getMessage():
            return
        # The last argument is ``_describe(cause)``: "ClassName: message".
        described = str(record.args[-1]) if isinstance(record.args, tuple) else "?"
        cause = described.split(":", 1)[0]
        self.by_cause[cause] += 1
        samples = self.samples.setdefault(cause, [])
        if described not in samples and len(samples) < 3:
            samples.append(described[:200])


class Worker:
    def __init__(self, spec: RestartWorkerSpec, ordering: CausalOrdering[Any], log: HandledLog):
        self.spec = spec
        self.ordering = ordering
        self.log = log
        self.rng = random.Random(spec.seed)
        self.queue = Queue(read_deliveries(spec.deliveries))
        self.counts: Counter[str] = Counter()
        self.nacks: Counter[str] = Counter()
        self.nack_samples: dict[str, list[str]] = {}
        self.sweep_errors: Counter[str] = Counter()
        self.unexpected: list[dict[str, str]] = []

    def record_unexpected(self, where: str, exc: BaseException, event_id: Any = None) -> None:
        text = "".join(traceback.format_exception(exc))
        found = {
            "where": where,
            "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "message": str(exc),
            "traceback": text,
        }
        self.unexpected.append(found)
        self.log.write("unexpected", event_id or uuid4(), **found)
        print(f"UNEXPECTED in {where}: {text}", file=sys.stderr, flush=True)

    async def handler(self, event: ReceivedEvent, depth: int = 0) -> None:
        async with self.ordering.preceding_event_confirmed(self.handler, event, depth):
            self.log.write("start", event.id)
            await asyncio.sleep(self.rng.uniform(*self.spec.work_seconds))
            self.log.write("end", event.id)
            self.counts["handled"] += 1
            self.counts["replayed"] += depth > 0

    async def deliver(self, event: ReceivedEvent) -> None:
        self.counts["delivered"] += 1
        try:
            if await self.ordering.event_has_been_seen(event):
                self.counts["duplicates_skipped"] += 1
            else:
                await self.handler(event, 0)
        except EventArrivedEarly:
            self.counts["parked"] += 1
        except EventBeingProcessed:
            self.counts["busy_redelivered"] += 1
            self.queue.put_later(event, self.spec.retry_delay)
            return
        except OrderingError as exc:
            name = type(exc).__name__
            self.nacks[name] += 1
            samples = self.nack_samples.setdefault(name, [])
            if len(samples) < 3:
                samples.append(str(exc)[:300])
            self.log.write("nack", event.id, exc=type(exc).__name__, message=str(exc)[:300])
            self.queue.put_later(event, self.spec.nack_delay)
            return
        except Exception as exc:
            self.record_unexpected("delivery", exc, event.id)
            self.queue.put_later(event, self.spec.nack_delay)
            return
        self.log.write("ack", event.id)

    async def sweep(self) -> None:
        self.counts["sweeps"] += 1
        try:
            lost = await self.ordering.get_lost_followers()
        except OrderingError as exc:
            self.sweep_errors[type(exc).__name__] += 1
            self.nack_samples.setdefault("sweep " + type(exc).__name__, []).append(str(exc)[:300])
            return
        except Exception as exc:
            self.record_unexpected("sweep", exc)
            return
        for event in lost:
            self.counts["swept"] += 1
            self.queue.put(event)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RUN_TIMEOUT_S
        next_sweep = loop.time() + self.spec.sweep_every
        while True:
            if loop.time() >= next_sweep:
                await self.sweep()
                next_sweep = loop.time() + self.spec.sweep_every
            event = await self.queue.get_within(0.05)
            if event is None:
                if len(self.queue) == 0 and _exists(self.spec.stop_file):
                    return
                if loop.time() > deadline:
                    msg = f"still running after {RUN_TIMEOUT_S} s with {len(self.queue)} queued"
                    raise TimeoutError(msg)
                continue
            await asyncio.sleep(self.spec.pace_seconds)
            await self.deliver(event)


def _exists(path: Path) -> bool:
    return path.exists()


async def _wait_for(path: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not _exists(path):
        if time.monotonic() > deadline:
            msg = f"no signal at {path} after {seconds} s"
            raise TimeoutError(msg)
        await asyncio.sleep(0.005)


async def run(spec: RestartWorkerSpec) -> dict[str, Any]:
    retries = RetryCounter()
    store_logger = logging.getLogger("ordering_sql.store")
    store_logger.addHandler(retries)
    store_logger.setLevel(logging.DEBUG)
    ordering: CausalOrdering[Any] = CausalOrdering(
        spec.scope,
        database_url=spec.database_url,
        lease_timeout=spec.lease_timeout,
        claim_timeout=spec.claim_timeout,
        poll_interval=0.02,
    )
    began = time.monotonic()
    with spec.log.open("a") as sink:
        log = HandledLog(sink, spec.worker)
        worker = Worker(spec, ordering, log)

        def on_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            if isinstance(exc, BaseException) and not isinstance(exc, OrderingError):
                worker.record_unexpected(f"event loop: {context.get('message')}", exc)
            loop.default_exception_handler(context)

        asyncio.get_running_loop().set_exception_handler(on_loop_error)
        try:
            await ordering.event_has_been_seen(uuid4())  # connect and check the schema now
            spec.ready_file.touch()
            await _wait_for(spec.start_file, SIGNAL_TIMEOUT_S)
            began = time.monotonic()
            await worker.run()
        finally:
            await ordering.close()
            await dispose_engines()
    return {
        "worker": spec.worker,
        "seconds": round(time.monotonic() - began, 2),
        "counts": dict(worker.counts),
        "nacks": dict(worker.nacks),
        "sweep_errors": dict(worker.sweep_errors),
        "retries": dict(retries.by_cause),
        "retry_samples": retries.samples,
        "nack_samples": worker.nack_samples,
        "unexpected": worker.unexpected,
    }


def main() -> None:
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setLevel(logging.WARNING)
    to_stderr.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(to_stderr)
    spec = RestartWorkerSpec.model_validate_json(Path(sys.argv[1]).read_text())
    report = asyncio.run(run(spec))
    spec.report.write_text(json.dumps(report))
    print(json.dumps({k: v for k, v in report.items() if k != "unexpected"}), flush=True)


if __name__ == "__main__":
    main()
