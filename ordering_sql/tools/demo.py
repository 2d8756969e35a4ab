"""``ordering-sql demo``: several workers, a jumbled stream with duplicates, a crash, a restart.

The run, step by step:

1. Build a seeded stream of event families (chains and fans), jumbled, with duplicates, and
   split it round-robin into one partition per worker, as a message broker would.
2. Partition 0 goes to a worker in its own process. Part-way through, that process is killed
   with SIGKILL: whatever it held (a processing lease, claims on followers it was replaying,
   followers it parked) stays in the database, as after a real crash.
3. The other partitions are consumed by workers in this process, concurrently. When the
   crashed worker is gone, a "restarted" worker takes over the messages it had not acknowledged.
4. A sweeper calls ``get_lost_followers()`` periodically, as a service does, so followers
   claimed by the dead worker come back once their claim expires.
5. The handler logs of every worker (including the dead one) are checked: every event handled,
   causal order kept, and nothing handled twice except what the crash interrupted.

With ``exactly_once``, every worker handles through ``CausalOrdering.exactly_once``, writing one
row per handling into an effects table of the same database (no unique constraint), and the
verdict also requires exactly one effect row per event after the crash, each follower's written
after its leader's committed (``effects.check_effects``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from ordering_sql.engine import CausalOrdering
from ordering_sql.migration import migrate
from ordering_sql.models import ReceivedEvent
from ordering_sql.settings import mask_url
from ordering_sql.tools.effects import (
    Effects,
    EffectsCheck,
    check_effects,
    create_effects,
    drop_effects,
)
from ordering_sql.tools.simulation import (
    Check,
    DeliveryQueue,
    HandledLog,
    Tally,
    WorkerSpec,
    build_stream,
    check,
    read_log,
    run_worker,
    sweep_lost,
    unacknowledged,
    write_deliveries,
)

__all__ = ["DemoReport", "run_demo"]

#: Short leases so the demo recovers from its crash in seconds rather than the default 16 s.
LEASE_SECONDS = 1.0
CLAIM_SECONDS = 2.0
SWEEP_EVERY = 0.25


class DemoReport(BaseModel):
    """What the demo saw and whether it passed."""

    model_config = ConfigDict(frozen=True)

    database: str
    workers: int
    seed: int
    deliveries: int
    tally: dict[str, int]
    crashed_worker_handled: int
    crash_in_flight: list[str]
    check: Check
    seconds: float
    #: With ``exactly_once``: the verdict on the effect rows.
    effects: EffectsCheck | None = None

    @property
    def unexpected_twice(self) -> list[str]:
        return [i for i in self.check.twice if i not in self.crash_in_flight]

    @property
    def ok(self) -> bool:
        effects_ok = self.effects is None or self.effects.ok
        return self.check.ok and not self.unexpected_twice and effects_ok

    @property
    def throughput(self) -> float:
        return self.check.handled / self.seconds if self.seconds else 0.0


async def run_demo(
    *,
    database_url: str | None = None,
    events: int = 600,
    workers: int = 4,
    seed: int = 7,
    on_progress: Callable[[int, int], None] | None = None,
    deadline_seconds: float = 120.0,
    exactly_once: bool = False,
) -> DemoReport:
    """Run the simulation; ``on_progress(handled, total)`` is called as events are handled.
    ``exactly_once``: handle through ``exactly_once`` and check the effect rows (the table is
    dropped afterwards)."""
    workers = max(2, workers)
    with tempfile.TemporaryDirectory(prefix="ordering-sql-demo-") as tmp:
        folder = Path(tmp)
        url = database_url or f"sqlite+aiosqlite:///{folder / 'demo.db'}"
        await migrate(url)
        effects = Effects() if exactly_once else None
        if exactly_once:
            await create_effects(url)
        scope = f"demo-{seed}-{time.time_ns()}"
        stream = build_stream(events, seed=seed)
        partitions = [stream.deliveries[i::workers] for i in range(workers)]
        handled = 0

        def progressed() -> None:
            nonlocal handled
            handled += 1
            if on_progress is not None:
                on_progress(handled, len(stream.events))

        started = time.perf_counter()
        doomed_log = folder / "crashed-worker.log"
        doomed = await _start_doomed_worker(
            folder, url, scope, partitions[0], doomed_log, exactly_once=exactly_once
        )

        ordering: CausalOrdering[Any] = CausalOrdering(
            scope, database_url=url, lease_timeout=LEASE_SECONDS, claim_timeout=CLAIM_SECONDS
        )
        try:
            logs = [HandledLog(None, f"worker-{i}") for i in range(1, workers)]
            queues = [DeliveryQueue(p) for p in partitions[1:]]
            tasks = [
                asyncio.create_task(
                    run_worker(ordering, q, log, on_handled=progressed, effects=effects)
                )
                for q, log in zip(queues, logs, strict=True)
            ]
            crashed_handled = await _crash_part_way(doomed, doomed_log, len(partitions[0]))

            # The restart: a new worker gets the crashed worker's unacknowledged messages.
            crashed_records = read_log(doomed_log)
            handled += sum(1 for r in crashed_records if r["k"] == "end")
            restart_log = HandledLog(None, "restarted")
            restart_queue = DeliveryQueue(unacknowledged(partitions[0], crashed_records))
            tasks.append(
                asyncio.create_task(
                    run_worker(
                        ordering,
                        restart_queue,
                        restart_log,
                        on_handled=progressed,
                        effects=effects,
                    )
                )
            )
            logs.append(restart_log)
            tally = await _finish(
                ordering,
                stream.events,
                tasks,
                logs,
                crashed_records,
                progressed,
                deadline_seconds,
                effects,
            )
            seconds = time.perf_counter() - started
            all_records = crashed_records + [r for log in logs for r in log.records]
            verdict = check(stream, all_records)
            effects_verdict = await check_effects(url, stream) if exactly_once else None
            await ordering.clear()
        finally:
            await ordering.close()
            if doomed.returncode is None:
                doomed.kill()
                await doomed.wait()
            if exactly_once and database_url:
                await drop_effects(url)

    return DemoReport(
        database=mask_url(url) if database_url else "SQLite in a temporary directory",
        workers=workers,
        seed=seed,
        deliveries=len(stream.deliveries),
        tally=tally.__dict__,
        crashed_worker_handled=crashed_handled,
        crash_in_flight=_in_flight(crashed_records),
        check=verdict,
        seconds=seconds,
        effects=effects_verdict,
    )


async def _start_doomed_worker(
    folder: Path,
    url: str,
    scope: str,
    partition: list[ReceivedEvent],
    log: Path,
    *,
    exactly_once: bool,
) -> asyncio.subprocess.Process:
    # Small local files, written once before the workers start: blocking I/O is fine here.
    deliveries = folder / "crashed-worker.jsonl"
    write_deliveries(deliveries, partition)
    spec = WorkerSpec(
        database_url=url,
        scope=scope,
        deliveries=deliveries,
        log=log,
        worker="crashed",
        work_seconds=0.005,
        lease_timeout=LEASE_SECONDS,
        claim_timeout=CLAIM_SECONDS,
        exactly_once=exactly_once,
    )
    spec_path = folder / "crashed-worker.json"
    spec_path.write_text(spec.model_dump_json())
    log.touch()  # noqa: ASYNC240
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ordering_sql.tools.simulation",
        str(spec_path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def _crash_part_way(process: asyncio.subprocess.Process, log: Path, deliveries: int) -> int:
    """SIGKILL the worker once it acknowledged a third of its messages, mid-handler if possible."""
    target = max(1, deliveries // 3)
    while process.returncode is None:
        records = read_log(log)
        acks = sum(1 for r in records if r["k"] == "ack")
        if acks >= target and records and records[-1]["k"] == "start":
            break
        if acks >= target + 20:
            break  # it never paused mid-handler where we looked: kill it anyway
        await asyncio.sleep(0.002)
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGKILL)
    await process.wait()
    if process.returncode not in (-signal.SIGKILL, 0):
        err = (await process.stderr.read()).decode() if process.stderr else ""
        msg = f"the demo's crashing worker failed before it was killed: {err.strip()[-500:]}"
        raise RuntimeError(msg)
    return sum(1 for r in read_log(log) if r["k"] == "end")


def _in_flight(records: list[dict[str, Any]]) -> list[str]:
    """The event whose handler the kill interrupted (a worker runs one handler at a time)."""
    for record in reversed(records):
        if record["k"] in ("start", "end"):
            return [record["id"]]
    return []


async def _finish(
    ordering: CausalOrdering[Any],
    events: list[ReceivedEvent],
    tasks: list[asyncio.Task[Tally]],
    logs: list[HandledLog],
    crashed_records: list[dict[str, Any]],
    progressed: Callable[[], None],
    deadline_seconds: float,
    effects: Effects | None,
) -> Tally:
    """Wait for the workers, sweeping lost followers, until every event was handled."""
    tally = Tally()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_seconds
    sweep_log = HandledLog(None, "sweeper")
    logs.append(sweep_log)
    done_ids = {r["id"] for r in crashed_records if r["k"] == "end"}
    wanted = {str(e.id) for e in events}
    while loop.time() < deadline:
        finished = [t for t in tasks if t.done()]
        for task in finished:
            tally.add(task.result())
            tasks.remove(task)
        done_ids.update(r["id"] for log in logs for r in log.records if r["k"] == "end")
        if not tasks and wanted <= done_ids:
            break
        sweep_queue = DeliveryQueue()
        await sweep_lost(ordering, sweep_queue, tally)
        if len(sweep_queue):
            tasks.append(
                asyncio.create_task(
                    run_worker(
                        ordering, sweep_queue, sweep_log, on_handled=progressed, effects=effects
                    )
                )
            )
        await asyncio.sleep(SWEEP_EVERY)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return tally
