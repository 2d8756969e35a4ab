"""The proof of ``exactly_once``: three worker processes, every event delivered three times, real
faults, and exactly one effect row per event at the end.

Each of three OS processes receives every event of a jumbled stream (each in its own jumble), and
handles through ``exactly_once``, writing one row per handling into an effects table that has no
unique constraint (``effects.EFFECTS``). A row records whether its leader's row was visible
to its transaction, that is, committed before it. The faults, one run each:

* ``kill``: one worker is SIGKILLed at a random moment inside a handler (its transaction open,
  its lease held) and restarted with the messages it had not acknowledged; the moment is a
  handler body of a random ordinal, where the worker stops itself (SIGSTOP) for the test to
  kill it, so the fault lands inside a body on every run;
* ``raise``: every worker's handler raises after writing its row, at random (a fifth of them);
* ``stop``: one worker is stopped (SIGSTOP, at such a moment) inside a handler for four lease
  lifetimes, then
  continued: on Postgres another worker takes the expired lease over and the stalled one's
  completion fails (``LeaseLostError``, rolled back); on SQLite the stalled transaction holds
  the write lock, so nobody can take the lease over, and the others wait for it.

A sweeper in the test process hands back the followers whose replay the faults interrupted.
Then every event has exactly one effect row, each follower's written after its leader's
committed, and nothing is left parked, claimed or leased.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Literal
from uuid import uuid4

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from ordering_sql import CausalOrdering
from ordering_sql.models import ReceivedEvent
from ordering_sql.tools.effects import EFFECTS, Effects, check_effects, create_effects
from ordering_sql.tools.simulation import (
    DeliveryQueue,
    HandledLog,
    Stream,
    Tally,
    WorkerSpec,
    build_stream,
    run_worker,
    sweep_lost,
    unacknowledged,
    write_deliveries,
)
from tests.concurrency.test_processes import (
    Child,
    Children,
    assert_nothing_left,
    children,
    jumbled,
    records_of,
)
from tests.conftest import BACKENDS

__all__ = ["children"]  # the fixture, used here

Fault = Literal["kill", "raise", "stop"]
EVENTS = 100
LEASE_S = 1.0
CLAIM_S = 2.0
FAIL_RATE = 0.2
STALL_S = 4 * LEASE_S
SWEEP_EVERY_S = 0.25
SIMULATION = "ordering_sql.tools.simulation"  # a worker process: ``simulation.main``


async def _first_body(worker: Child, log: Path) -> None:
    """Wait until ``worker`` has begun its first handler body."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert worker.process.returncode is None, f"{worker.name} ended early: {worker.errors()}"
        if any(r["k"] == "start" for r in records_of([log])):
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"{worker.name} never began a handler body: {worker.errors()}")


def _stopped(pid: int) -> bool:
    """Whether the process is stopped (by a signal), as the kernel reports it."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


async def _when_stopped_in_handler(worker: Child, log: Path) -> str:
    """Wait until ``worker`` stopped itself inside a handler body (``WorkerSpec.stop_at_body``:
    its lease held, its transaction open); the event it is handling."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert worker.process.returncode is None, f"{worker.name} ended early: {worker.errors()}"
        if _stopped(worker.process.pid):
            records = records_of([log])
            assert records[-1]["k"] == "start", records[-1]
            return str(records[-1]["id"])
        await asyncio.sleep(0.005)
    pytest.fail(f"{worker.name} never stopped inside a handler: {worker.errors()}")


async def _sweep_until_done(
    url: str, scope: str, stream: Stream, workers: list[Child], effects: Effects, seconds: float
) -> Tally:
    """Run the sweep a service runs (lost followers go to a consumer of the test's own) until
    the workers have ended and every event has its effect row."""
    ordering: CausalOrdering[ReceivedEvent] = CausalOrdering(
        scope, database_url=url, lease_timeout=LEASE_S, claim_timeout=CLAIM_S
    )
    tally, log = Tally(), HandledLog(None, "sweeper")
    deadline = time.monotonic() + seconds
    try:
        while True:
            ended = all(w.process.returncode is not None for w in workers)
            if ended and (await check_effects(url, stream)).missing == 0:
                return tally
            assert time.monotonic() < deadline, f"not done within {seconds} s"
            queue = DeliveryQueue()
            await sweep_lost(ordering, queue, tally)
            if len(queue):
                tally.add(await run_worker(ordering, queue, log, effects=effects))
            await asyncio.sleep(SWEEP_EVERY_S)
    finally:
        await ordering.close()


async def _writers(url: str) -> dict[str, str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(select(EFFECTS.c.event_id, EFFECTS.c.worker))
            return {event_id: worker for event_id, worker in rows}
    finally:
        await engine.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("fault", ["kill", "raise", "stop"])
async def test_three_processes_with_every_event_three_times_write_each_effect_once(
    database_url: str, backend: str, fault: Fault, children: Children, tmp_path: Path
) -> None:
    seed = random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    scope = f"once-{fault}-{uuid4().hex[:8]}"
    stream = build_stream(EVENTS, seed=seed, duplicate_rate=0.0)
    await create_effects(database_url)
    fail_rate = FAIL_RATE if fault == "raise" else 0.0

    def spec(
        name: str, deliveries: list[ReceivedEvent], k: int, stop_at_body: int | None = None
    ) -> WorkerSpec:
        path = tmp_path / f"{name}.jsonl"
        write_deliveries(path, deliveries)
        return WorkerSpec(
            database_url=database_url,
            scope=scope,
            deliveries=path,
            log=tmp_path / f"{name}.log",
            worker=name,
            work_seconds=0.005,  # a handler body is long enough to be caught inside
            lease_timeout=LEASE_S,
            claim_timeout=CLAIM_S,
            exactly_once=True,
            fail_rate=fail_rate,
            seed=seed + k,
            stop_at_body=stop_at_body,
        )

    # The random moment: copy-0 stops itself inside its handler body of a random ordinal. It
    # starts first and the others once it is handling, so it is sure to reach that body (the
    # others boot while it works) and they race it for the rest of the stream.
    moment = rng.randrange(2, 12) if fault in ("kill", "stop") else None
    copies = [jumbled(stream.deliveries, seed=seed + k) for k in range(3)]
    specs = [spec(f"copy-{k}", copies[k], k, moment if k == 0 else None) for k in range(3)]
    workers = [await children.spawn(specs[0].worker, SIMULATION, specs[0])]
    await _first_body(workers[0], specs[0].log)
    workers += [await children.spawn(s.worker, SIMULATION, s) for s in specs[1:]]
    caught: str | None = None
    if fault == "kill":
        caught = await _when_stopped_in_handler(workers[0], specs[0].log)
        workers[0].kill()
        assert await workers[0].wait(10) == -signal.SIGKILL
        redelivered = unacknowledged(copies[0], records_of([specs[0].log]))
        restarted = spec("copy-0-restarted", redelivered, 3)
        workers.append(await children.spawn(restarted.worker, SIMULATION, restarted))
    elif fault == "stop":
        caught = await _when_stopped_in_handler(workers[0], specs[0].log)
        await asyncio.sleep(STALL_S)
        workers[0].process.send_signal(signal.SIGCONT)

    sweeper = Effects(fail_rate, random.Random(seed - 1))
    sweep = asyncio.create_task(
        _sweep_until_done(database_url, scope, stream, workers, sweeper, seconds=120)
    )
    alive = workers[1:] if fault == "kill" else workers
    tallies = [await worker.succeeded(120) for worker in alive]
    swept = await sweep

    found = await check_effects(database_url, stream)
    records = records_of(s.log for s in specs) + (
        records_of([tmp_path / "copy-0-restarted.log"]) if fault == "kill" else []
    )
    bodies = Counter(r["id"] for r in records if r["k"] == "start")
    deliveries = sum(len(c) for c in copies) + (len(redelivered) if fault == "kill" else 0)
    writers = await _writers(database_url)
    print(
        f"\nexactly once [{backend}, {fault}, seed {seed}]: {found.events} events, "
        f"{deliveries} deliveries to {len(workers)} processes, "
        f"{sum(bodies.values())} handler bodies begun in them, "
        f"{1 if fault == 'kill' else 0} killed, {1 if fault == 'stop' else 0} stopped "
        f"{STALL_S if fault == 'stop' else 0:.0f} s, "
        f"{sum(t.retried for t in tallies) + swept.retried} redelivered after a failure or "
        f"a busy lease, {swept.lost_swept} swept and handled {swept.handled}; "
        f"effect rows {found.rows} "
        f"({found.missing} missing, {found.twice} twice, {found.before_leader} before their "
        f"leader); the caught event's row by {writers.get(caught or '', '-')}"
    )
    assert found.ok, found.examples
    if fault == "raise":
        assert sum(bodies.values()) + swept.handled > EVENTS, "no handler failed"
    if fault == "stop" and backend == "postgres":
        # The lease expired under the stalled worker and another took the event over.
        assert writers[caught or ""] != "copy-0", "the stalled worker's lease was not taken over"
    await assert_nothing_left(database_url, scope, stream.events)
