"""Faults and races across real OS processes: pairs racing, duplicates, SIGKILL, dropped links.

``test_locking.py`` races coroutines of one process; here the contenders are separate
interpreters (``python -m ordering_sql.tools.simulation``, or ``_proc_worker.py``, which starts on a
signal and can be stepped in lock-step with another), the crash is a real ``SIGKILL``, and the
database outage is every session on the test database terminated by an administrator. Handler
logs use ``time.monotonic_ns()``, one clock for the whole machine, so the logs of every process
can be checked together by ``ordering_sql.tools.simulation.check``.

Every subprocess wait is bounded; a child still running when a test ends is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from uuid import uuid4

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from ordering_sql import CausalOrdering, ReceivedEvent, dispose_engines
from ordering_sql.admin import ScopeStatus, status
from ordering_sql.settings import Settings
from ordering_sql.store import Store
from ordering_sql.tools.simulation import (
    Check,
    DeliveryQueue,
    HandledLog,
    Stream,
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
from tests.concurrency._proc_worker import WorkerProcessSpec
from tests.conftest import _asyncpg_dsn
from tests.support import REPO_ROOT, child_env, make_event

T = TypeVar("T")

#: The longest any child process may run before it is killed and the test fails.
CHILD_TIMEOUT_S = 90.0
#: Past the lookback (15 min) and every claim timeout used here: what is lost then is lost.
LATER = timedelta(minutes=20)


async def bounded(awaitable: Awaitable[T], seconds: float) -> T:
    return await asyncio.wait_for(awaitable, timeout=seconds)


# -- child processes -----------------------------------------------------------------------------


@dataclass
class Child:
    """One worker process. Its stderr goes to a file; its stdout too, unless it is stepped
    through pipes (then the parent writes steps to its stdin and reads its replies)."""

    name: str
    process: asyncio.subprocess.Process
    stderr: Path
    stdout: Path | None = None
    #: What was read from a piped stdout.
    replies: list[str] = field(default_factory=list)

    def output(self) -> str:
        if self.stdout is None:
            return "".join(self.replies)
        return self.stdout.read_text() if self.stdout.exists() else ""

    def errors(self) -> str:
        return self.stderr.read_text()[-2000:] if self.stderr.exists() else ""

    def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)

    async def wait(self, seconds: float = CHILD_TIMEOUT_S) -> int:
        """The exit code; a child still running after ``seconds`` is killed and the test fails."""
        try:
            if self.process.stdout is not None:  # drain the pipe, or the child may block on it
                rest = await bounded(self.process.stdout.read(), seconds)
                self.replies.append(rest.decode())
            return await bounded(self.process.wait(), seconds)
        except TimeoutError:
            self.kill()
            await bounded(self.process.wait(), 10)
            pytest.fail(f"worker {self.name} did not finish within {seconds} s: {self.errors()}")

    async def succeeded(self, seconds: float = CHILD_TIMEOUT_S) -> Tally:
        """Wait for a clean exit; the ``Tally`` the worker printed last."""
        code = await self.wait(seconds)
        assert code == 0, f"worker {self.name} exited with {code}: {self.errors()}"
        return Tally(**json.loads(self.output().strip().splitlines()[-1]))


@dataclass
class Children:
    folder: Path
    running: list[Child] = field(default_factory=list)

    async def spawn(
        self,
        name: str,
        module: str,
        spec: WorkerSpec | WorkerProcessSpec,
        *,
        stepped: bool = False,
    ) -> Child:
        spec_path = self.folder / f"{name}.json"
        stdout, stderr = self.folder / f"{name}.out", self.folder / f"{name}.err"
        handles = _write_and_open(spec_path, spec.model_dump_json(), stdout, stderr)
        pipe = asyncio.subprocess.PIPE
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                module,
                str(spec_path),
                stdin=pipe if stepped else asyncio.subprocess.DEVNULL,
                stdout=pipe if stepped else handles[0],
                stderr=handles[1],
                cwd=str(REPO_ROOT),
                env=child_env(),
            )
        finally:
            for handle in handles:
                handle.close()
        child = Child(name, process, stderr, stdout=None if stepped else stdout)
        self.running.append(child)
        return child


def _write_and_open(spec_path: Path, spec: str, *outputs: Path) -> list[Any]:
    spec_path.write_text(spec)
    return [path.open("wb") for path in outputs]


@pytest.fixture
async def children(tmp_path: Path) -> AsyncIterator[Children]:
    """Spawns workers; any still running at the end of the test is killed and reaped."""
    made = Children(tmp_path)
    yield made
    for child in made.running:
        child.kill()
    for child in made.running:
        if child.process.stdin is not None:
            child.process.stdin.close()
        with contextlib.suppress(TimeoutError):
            if child.process.stdout is not None:
                await bounded(child.process.stdout.read(), 10)
            await bounded(child.process.wait(), 10)


# -- looking at the results ----------------------------------------------------------------------


def records_of(logs: Iterable[Path]) -> list[dict[str, Any]]:
    return [record for log in logs if log.exists() for record in read_log(log)]


def kinds(records: Iterable[dict[str, Any]], kind: str) -> Counter[str]:
    """How many records of ``kind`` ("start", "end", "ack") each event id has."""
    return Counter(record["id"] for record in records if record["k"] == kind)


def assert_each_handled_once(stream: Stream, records: Sequence[dict[str, Any]]) -> Check:
    verdict = check(stream, records)
    assert verdict.lost == 0, verdict.examples
    assert verdict.order_violations == 0, verdict.examples
    assert verdict.handled_twice == 0, f"handled more than once: {verdict.twice[:5]}"
    starts = kinds(records, "start")
    ran_again = {i: n for i, n in starts.items() if n != 1}
    assert not ran_again, f"handler bodies started more than once: {list(ran_again.items())[:5]}"
    assert set(starts) == {str(e.id) for e in stream.events}
    return verdict


async def scope_status(database_url: str, scope: str) -> ScopeStatus:
    """What ``ordering-sql status`` shows for ``scope`` right now."""
    store = Store.from_settings(Settings(database_url=database_url))
    try:
        found = await status(store, now=datetime.now(UTC), scope=scope)
    finally:
        await store.dispose()
    return found[0] if found else ScopeStatus(scope=scope)


async def in_batches(calls: Sequence[Awaitable[T]], size: int = 50) -> list[T]:
    """Await ``calls`` a batch at a time (each takes a pooled connection)."""
    results: list[T] = []
    for at in range(0, len(calls), size):
        results.extend(await asyncio.gather(*calls[at : at + size]))
    return results


async def assert_nothing_left(
    database_url: str, scope: str, events: Sequence[ReceivedEvent]
) -> None:
    """No follower parked or claimed, none lost even long after, and every event seen."""
    probe: CausalOrdering[ReceivedEvent] = CausalOrdering(scope, database_url=database_url)
    later: CausalOrdering[ReceivedEvent] = CausalOrdering(
        scope, database_url=database_url, clock=lambda: datetime.now(UTC) + LATER
    )
    try:
        ids = [event.id for event in events]
        assert await probe.followers_by_id(ids) == [], "followers are still stored"
        leaders = sorted({event.follows for event in events if event.follows is not None})
        waiting = await in_batches([probe.get_followers(leader) for leader in leaders])
        assert not any(waiting), "a leader still has followers waiting"
        seen = await in_batches([probe.event_has_been_seen(event) for event in events])
        assert all(seen), f"{seen.count(False)} events not marked seen"
        assert await later.get_lost_followers() == [], "followers lost past every timeout"
    finally:
        await probe.close()
        await later.close()
    state = await scope_status(database_url, scope)
    assert (state.parked, state.claimed, state.processing) == (0, 0, 0), state
    assert state.seen == len({event.id for event in events}), state


def jumbled(
    deliveries: Sequence[ReceivedEvent], seed: int, window: int = 32
) -> list[ReceivedEvent]:
    """``deliveries`` shuffled within consecutive windows, as ``build_stream`` does."""
    rng = random.Random(seed)
    out = list(deliveries)
    for i in range(0, len(out), window):
        chunk = out[i : i + window]
        rng.shuffle(chunk)
        out[i : i + window] = chunk
    return out


# -- 1. a leader process and a follower process, pair by pair -------------------------------------

PAIRS = 500
#: The follower's delivery of a pair is shifted by this much relative to its leader's (the
#: earlier side waits), so that across the pairs it lands before the leader is taken, while the
#: leader's handler runs, and after the leader completed.
PAIR_SHIFT_S = (-0.004, 0.008)


async def _wait_for_files(paths: Sequence[Path], workers: Sequence[Child], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not all(path.exists() for path in paths):
        for worker in workers:
            assert worker.process.returncode is None, f"{worker.name} died: {worker.errors()}"
        assert time.monotonic() < deadline, f"workers not ready after {seconds} s"
        await asyncio.sleep(0.01)


def _signal_start(path: Path) -> None:
    path.touch()


async def _lock_step(workers: Sequence[Child], steps: int, seconds: float = 30) -> None:
    """Step every worker at once, ``steps`` times; each step ends when all of them replied."""
    for i in range(steps):
        for worker in workers:
            assert worker.process.stdin is not None
            worker.process.stdin.write(b"go\n")
        await asyncio.gather(*(w.process.stdin.drain() for w in workers if w.process.stdin))
        replies = await bounded(
            asyncio.gather(*(w.process.stdout.readline() for w in workers if w.process.stdout)),
            seconds,
        )
        for worker, reply in zip(workers, replies, strict=True):
            if reply != f"done {i}\n".encode():
                pytest.fail(f"{worker.name} answered {reply!r} to step {i}: {worker.errors()}")
    for worker in workers:
        assert worker.process.stdin is not None
        worker.process.stdin.close()


@pytest.mark.postgres
@pytest.mark.slow
async def test_leader_and_follower_processes_racing_pair_by_pair_lose_no_follower(
    postgres_url: str, children: Children, tmp_path: Path
) -> None:
    """Two processes deliver the two halves of 500 leader/follower pairs at the same moments.

    The processes go in lock-step: pair i is delivered by both at once (give or take a seeded
    shift of a few ms), once both are done with pair i - 1. Every follower must be handled
    exactly once, after its leader's handling ended and soon after it, whether it arrived early
    (parked, then replayed by the leader's process), during the leader's handler (waited for
    it) or late (went straight through). Nothing may stay parked, claimed or held.
    """
    scope = f"race-{uuid4().hex[:8]}"
    now = datetime.now(UTC)
    leaders = [make_event(received=now, name=f"race.leader.{i}") for i in range(PAIRS)]
    followers = [
        make_event(follows=leader, received=now, name=f"race.follower.{i}")
        for i, leader in enumerate(leaders)
    ]
    rng = random.Random(500)
    shifts = [rng.uniform(*PAIR_SHIFT_S) for _ in range(PAIRS)]

    start_file = tmp_path / "start"
    workers: list[Child] = []
    ready: list[Path] = []
    for side, events, delays in (
        ("leaders", leaders, [max(0.0, -shift) for shift in shifts]),
        ("followers", followers, [max(0.0, shift) for shift in shifts]),
    ):
        deliveries = tmp_path / f"{side}.jsonl"
        write_deliveries(deliveries, events)
        ready.append(tmp_path / f"{side}.ready")
        spec = WorkerProcessSpec(
            database_url=postgres_url,
            scope=scope,
            deliveries=deliveries,
            log=tmp_path / f"{side}.log",
            worker=side,
            ready_file=ready[-1],
            start_file=start_file,
            stepped=True,
            delays=delays,
            work_seconds=0.002,
            lease_timeout=2.0,
            claim_timeout=3.0,
        )
        workers.append(
            await children.spawn(side, "tests.concurrency._proc_worker", spec, stepped=True)
        )
    await _wait_for_files(ready, workers, seconds=60)
    _signal_start(start_file)
    await _lock_step(workers, PAIRS)
    leader_tally, follower_tally = [await worker.succeeded() for worker in workers]

    records = records_of(tmp_path / f"{side}.log" for side in ("leaders", "followers"))
    stream = Stream(events=leaders + followers, deliveries=leaders + followers)
    assert_each_handled_once(stream, records)

    # After the leader's handling ended (checked above), and within seconds of it.
    first: dict[tuple[str, str], dict[str, Any]] = {}
    for record in records:
        first.setdefault((record["k"], record["id"]), record)
    slowest = max(
        first["end", str(f.id)]["t"] - first["end", str(f.follows)]["t"] for f in followers
    )
    assert slowest / 1e9 < 10, f"a follower was handled {slowest / 1e9:.1f} s after its leader"

    # How each follower's race went.
    parked = waited = late = 0
    for follower in followers:
        if first["start", str(follower.id)]["w"] == "leaders":
            parked += 1  # arrived first, parked, replayed by its leader
        elif first["deliver", str(follower.id)]["t"] < first["end", str(follower.follows)]["t"]:
            # Delivered while its leader was being handled, and went ahead once it was done
            # (or, within the ms before its own lease was taken, found the leader done).
            waited += 1
        else:
            late += 1
    print(
        f"\nrace: of {PAIRS} followers {parked} were parked and replayed by the leader process, "
        f"{waited} waited for their leader in flight, {late} came after it; "
        f"{follower_tally.retried} retried; slowest {slowest / 1e6:.0f} ms after its leader"
    )
    assert parked == leader_tally.replayed == follower_tally.parked
    assert parked + waited + late == PAIRS
    # Every outcome of the race happened, so it really was run from every side.
    assert parked > 0, "no follower ever arrived before its leader"
    assert waited > 0, "no follower ever arrived while its leader was being handled"
    assert late > 0, "no follower ever arrived after its leader"

    await assert_nothing_left(postgres_url, scope, leaders + followers)


# -- 2. every delivery to every process ------------------------------------------------------------


@pytest.mark.slow
async def test_three_processes_each_receiving_every_delivery_handle_each_event_once(
    database_url: str, children: Children, tmp_path: Path
) -> None:
    scope = f"copies-{uuid4().hex[:8]}"
    stream = build_stream(240, seed=23, duplicate_rate=0.1)
    start_file = tmp_path / "start"
    workers: list[Child] = []
    ready: list[Path] = []
    logs: list[Path] = []
    for k in range(3):
        deliveries = tmp_path / f"copy-{k}.jsonl"
        # Every process gets every delivery (duplicates included), each in its own jumble.
        write_deliveries(deliveries, jumbled(stream.deliveries, seed=k))
        ready.append(tmp_path / f"copy-{k}.ready")
        logs.append(tmp_path / f"copy-{k}.log")
        spec = WorkerProcessSpec(
            database_url=database_url,
            scope=scope,
            deliveries=deliveries,
            log=logs[-1],
            worker=f"copy-{k}",
            ready_file=ready[-1],
            start_file=start_file,
            work_seconds=0.002,
            # Long enough that a slow moment never lets a lease expire: no crash here.
            lease_timeout=30.0,
            claim_timeout=60.0,
        )
        workers.append(await children.spawn(f"copy-{k}", "tests.concurrency._proc_worker", spec))
    await _wait_for_files(ready, workers, seconds=60)
    _signal_start(start_file)
    tallies = [await worker.succeeded() for worker in workers]

    records = records_of(logs)
    assert_each_handled_once(stream, records)
    # Each process consumed (acknowledged) its whole copy of the stream.
    for log in logs:
        assert sum(kinds(read_log(log), "ack").values()) == len(stream.deliveries), log.name
    busy = [t.handled for t in tallies]
    print(
        f"\ncopies: handled per process {busy}, skipped {[t.duplicates_skipped for t in tallies]}"
    )
    assert sum(busy) == len(stream.events)
    assert sum(1 for n in busy if n) >= 2, f"only one process did any work: {busy}"
    await assert_nothing_left(database_url, scope, stream.events)


# -- 3. SIGKILL in the middle of a handler ---------------------------------------------------------

KILL_LEASE_S = 1.0
KILL_CLAIM_S = 2.0
SWEEP_EVERY_S = 0.25


def _replaying(records: Sequence[dict[str, Any]]) -> bool:
    """Whether the running handler is a follower's replay (its leader's claims are held).

    A delivery logs its own body first; any further body before its "ack" is a replay.
    """
    for record in reversed(records[:-1]):
        if record["k"] == "ack":
            return False
        if record["k"] == "end":
            return True
    return False


async def _kill_mid_handler(worker: Child, log: Path, deliveries: int) -> bool:
    """SIGKILL ``worker`` in a handler body, once it acknowledged a third of its deliveries.

    Waits, if it can, for a moment where the body is a follower being replayed, so that the dead
    worker also leaves claimed followers behind. True if that is where it died.
    """
    target = max(1, deliveries // 3)
    deadline = time.monotonic() + 60
    while worker.process.returncode is None and time.monotonic() < deadline:
        records = records_of([log])
        acks = sum(1 for r in records if r["k"] == "ack")
        if acks >= target and records and records[-1]["k"] == "start":
            replay = _replaying(records)
            if replay or acks >= target + 40:
                worker.kill()
                break
        await asyncio.sleep(0.001)
    code = await worker.wait(10)
    assert code == -signal.SIGKILL, (
        f"the worker was not killed mid-run (exit code {code}): {worker.errors()}"
    )
    return _replaying(records_of([log]))


def _in_flight(records: Sequence[dict[str, Any]]) -> str:
    """The event whose handler the kill interrupted (a worker runs one body at a time)."""
    for record in reversed(records):
        if record["k"] in ("start", "end"):
            return str(record["id"])
    msg = "the killed worker had not started any handler"
    raise AssertionError(msg)


async def _recover(
    ordering: CausalOrdering[Any],
    redelivered: list[ReceivedEvent],
    stream: Stream,
    dead_records: list[dict[str, Any]],
    seconds: float,
) -> list[dict[str, Any]]:
    """A restarted worker takes the unacknowledged messages; a sweeper returns lost followers.

    Runs until every event was handled somewhere; the records of every worker.
    """
    restarted, sweeper = HandledLog(None, "restarted"), HandledLog(None, "sweeper")
    tally = Tally()
    tasks = [asyncio.create_task(run_worker(ordering, DeliveryQueue(redelivered), restarted))]
    wanted = {str(event.id) for event in stream.events}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    try:
        while True:
            for task in [t for t in tasks if t.done()]:
                tally.add(task.result())  # a worker that failed fails the test here
                tasks.remove(task)
            records = dead_records + restarted.records + sweeper.records
            if not tasks and wanted <= set(kinds(records, "end")):
                return records
            assert loop.time() < deadline, (
                f"not recovered within {seconds} s: "
                f"{len(wanted - set(kinds(records, 'end')))} events never handled"
            )
            queue = DeliveryQueue()
            await sweep_lost(ordering, queue, tally)
            if len(queue):
                tasks.append(asyncio.create_task(run_worker(ordering, queue, sweeper)))
            await asyncio.sleep(SWEEP_EVERY_S)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.slow
async def test_worker_killed_mid_handler_is_recovered_with_nothing_lost(
    database_url: str, backend: str, children: Children, tmp_path: Path
) -> None:
    scope = f"kill-{uuid4().hex[:8]}"
    stream = build_stream(150, seed=31, duplicate_rate=0.1)
    deliveries = tmp_path / "doomed.jsonl"
    write_deliveries(deliveries, stream.deliveries)
    log = tmp_path / "doomed.log"
    spec = WorkerSpec(
        database_url=database_url,
        scope=scope,
        deliveries=deliveries,
        log=log,
        worker="doomed",
        work_seconds=0.01,  # most of its time is spent inside a handler body
        lease_timeout=KILL_LEASE_S,
        claim_timeout=KILL_CLAIM_S,
    )
    doomed = await children.spawn("doomed", "ordering_sql.tools.simulation", spec)
    died_replaying = await _kill_mid_handler(doomed, log, len(stream.deliveries))
    dead_records = records_of([log])
    in_flight = _in_flight(dead_records)
    left_behind = await scope_status(database_url, scope)

    ordering: CausalOrdering[ReceivedEvent] = CausalOrdering(
        scope,
        database_url=database_url,
        lease_timeout=KILL_LEASE_S,
        claim_timeout=KILL_CLAIM_S,
        poll_interval=0.02,
    )
    try:
        redelivered = unacknowledged(stream.deliveries, dead_records)
        records = await _recover(ordering, redelivered, stream, dead_records, seconds=60)
    finally:
        await ordering.close()

    verdict = check(stream, records)
    print(
        f"\nkill [{backend}]: killed in the handler of {in_flight} "
        f"({'a replayed follower' if died_replaying else 'a delivered event'}), "
        f"{sum(kinds(dead_records, 'end').values())} bodies done before the kill, "
        f"left behind: {left_behind.processing} lease(s), {left_behind.claimed} claimed "
        f"follower(s), {left_behind.parked} parked; {len(redelivered)} redelivered; "
        f"handled twice: {verdict.handled_twice} {verdict.twice}"
    )
    assert verdict.lost == 0, verdict.examples
    assert verdict.order_violations == 0, verdict.examples
    assert set(verdict.twice) <= {in_flight}, (
        f"handled twice: {verdict.twice}, but only {in_flight} was running at the kill"
    )
    if died_replaying:  # the dead worker's leader had claimed the follower it was replaying
        assert left_behind.claimed >= 1, left_behind
    await assert_nothing_left(database_url, scope, stream.events)


# -- 4. every connection to the database terminated, twice ----------------------------------------


async def _terminate_backends(admin_url: str, database: str) -> int:
    """Terminate every session on ``database`` (not the server): how many there were."""
    conn = await asyncpg.connect(_asyncpg_dsn(admin_url), timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
    finally:
        await conn.close()
    return sum(1 for row in rows if row[0])


@pytest.mark.postgres
async def test_workers_ride_out_every_connection_being_terminated(
    postgres_url: str, postgres_admin_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    scope = f"outage-{uuid4().hex[:8]}"
    database = make_url(postgres_url).database
    assert database is not None
    stream = build_stream(300, seed=41, duplicate_rate=0.1)
    workers = 3
    partitions = [stream.deliveries[i::workers] for i in range(workers)]
    handled = 0
    progress = asyncio.Event()

    def on_handled() -> None:
        nonlocal handled
        handled += 1
        progress.set()

    async def outages() -> list[int]:
        terminated = []
        for share in (3, 3 / 2):  # at a third and at two thirds of the run
            while handled < len(stream.events) / share:
                progress.clear()
                await progress.wait()
            terminated.append(await _terminate_backends(postgres_admin_url, database))
        return terminated

    orderings: list[CausalOrdering[ReceivedEvent]] = [
        CausalOrdering(scope, database_url=postgres_url, poll_interval=0.02) for _ in range(workers)
    ]
    logs = [HandledLog(None, f"worker-{i}") for i in range(workers)]
    caplog.set_level(logging.WARNING, logger="ordering_sql")
    killer = asyncio.create_task(outages())
    try:
        tallies = await bounded(
            asyncio.gather(
                *(
                    run_worker(o, DeliveryQueue(p), log, work_seconds=0.003, on_handled=on_handled)
                    for o, p, log in zip(orderings, partitions, logs, strict=True)
                )
            ),
            60,
        )
        terminated = await bounded(killer, 10)
    finally:
        killer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await killer
        for ordering in orderings:
            await ordering.close()

    retries = [r for r in caplog.records if "transient database fault" in r.getMessage()]
    print(
        f"\noutage: terminated {terminated} sessions; {len(retries)} retried units of work; "
        f"handled {sum(t.handled for t in tallies)}"
    )
    assert all(n > 0 for n in terminated), f"no session was terminated: {terminated}"
    assert retries, "the engine never saw the terminated connections"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "errors were logged"
    records = [r for log in logs for r in log.records]
    assert_each_handled_once(stream, records)
    await assert_nothing_left(postgres_url, scope, stream.events)


# -- 5. random event graphs ----------------------------------------------------------------------


@dataclass(frozen=True)
class Graph:
    """Events 0..n-1; ``leaders[i]`` is the earlier event i follows, if any."""

    leaders: tuple[int | None, ...]
    workers: int
    #: (worker, event) in delivery order; every event appears at least once.
    deliveries: tuple[tuple[int, int], ...]


@st.composite
def graphs(draw: st.DrawFn) -> Graph:
    n = draw(st.integers(1, 12))
    leaders: list[int | None] = [None]
    for i in range(1, n):
        # Chains (the one just before), fans (any earlier one), or a new family.
        leaders.append(draw(st.one_of(st.just(i - 1), st.integers(0, i - 1), st.none())))
    order = list(draw(st.permutations(range(n))))
    for again in draw(st.lists(st.integers(0, n - 1), max_size=n)):
        order.insert(draw(st.integers(0, len(order))), again)
    workers = draw(st.integers(1, 3))
    owners = draw(st.lists(st.integers(0, workers - 1), min_size=len(order), max_size=len(order)))
    return Graph(tuple(leaders), workers, tuple(zip(owners, order, strict=True)))


def random_graph(rng: random.Random) -> Graph:
    n = rng.randint(2, 14)
    leaders: list[int | None] = [None]
    for i in range(1, n):
        leaders.append(rng.choice([i - 1, rng.randrange(i), None]))
    order = rng.sample(range(n), n)
    for _ in range(rng.randint(0, n)):
        order.insert(rng.randint(0, len(order)), rng.randrange(n))
    workers = rng.randint(1, 3)
    return Graph(tuple(leaders), workers, tuple((rng.randrange(workers), i) for i in order))


def graph_events(graph: Graph) -> list[ReceivedEvent]:
    now = datetime.now(UTC)
    events: list[ReceivedEvent] = []
    for i, leader in enumerate(graph.leaders):
        events.append(
            make_event(
                follows=None if leader is None else events[leader].id,
                occurred=now + timedelta(milliseconds=i),
                received=now,
                name=f"graph.{i}",
            )
        )
    return events


async def run_graph(database_url: str, graph: Graph) -> None:
    """Deliver ``graph`` to its workers in a fresh scope; every body once, every edge kept."""
    scope = f"h-{uuid4()}"
    events = graph_events(graph)
    orderings: list[CausalOrdering[ReceivedEvent]] = [
        CausalOrdering(scope, database_url=database_url, poll_interval=0.005)
        for _ in range(graph.workers)
    ]
    # One log for every worker: its records are in the order things happened in this process.
    log = HandledLog(None, "graph")
    queues = [
        DeliveryQueue([events[i] for owner, i in graph.deliveries if owner == k])
        for k in range(graph.workers)
    ]
    try:
        await bounded(
            asyncio.gather(
                *(run_worker(o, q, log) for o, q in zip(orderings, queues, strict=True))
            ),
            30,
        )
        assert await orderings[0].followers_by_id([e.id for e in events]) == []
    finally:
        for ordering in orderings:
            await ordering.close()
    records = log.records
    assert_each_handled_once(Stream(events=events, deliveries=[]), records)
    # Every follows edge, in the order the bodies ran.
    position = {(r["k"], r["id"]): n for n, r in enumerate(records)}
    for follower in events:
        if follower.follows is not None:
            leader_end = position[("end", str(follower.follows))]
            follower_start = position[("start", str(follower.id))]
            assert leader_end < follower_start, f"{follower.id} began before its leader ended"


async def _graph_example(database_url: str, graph: Graph) -> None:
    try:
        await run_graph(database_url, graph)
    finally:
        await dispose_engines()


@pytest.mark.sqlite
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(graph=graphs())
def test_random_graphs_on_sqlite_run_each_event_once_in_causal_order(
    graph: Graph, sqlite_template: Path, tmp_path: Path
) -> None:
    database = tmp_path / "graphs.db"
    if not database.exists():
        shutil.copyfile(sqlite_template, database)
    asyncio.run(_graph_example(f"sqlite+aiosqlite:///{database}", graph))


@pytest.mark.postgres
async def test_random_graphs_on_postgres_run_each_event_once_in_causal_order(
    postgres_url: str,
) -> None:
    for seed in range(20):
        await run_graph(postgres_url, random_graph(random.Random(seed)))


# -- the engine's own purge against a lease being taken (a library bug) ---------------------------


async def _lock_waiters(monitor: asyncpg.Connection, database: str) -> int:
    return int(
        await monitor.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
            database,
        )
    )


async def _until_lock_waiters(monitor: asyncpg.Connection, database: str, count: int) -> None:
    deadline = time.monotonic() + 10
    while await _lock_waiters(monitor, database) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"fewer than {count} statements ever waited for the row lock")
        await asyncio.sleep(0.01)


@pytest.mark.postgres
async def test_engine_purge_running_while_a_lease_is_taken_again_leaves_that_lease_alone(
    postgres_url: str, postgres_admin_url: str
) -> None:
    """A lease given back and taken again at the moment another worker's engine purges.

    The interleaving is forced with a row lock held by a third connection: the worker's take
    waits for it first, then the purge (run by a worker whose clock is a second later, on its
    first completion). Once the lock goes, the take commits, then the purge goes on.
    """
    scope = f"purge-{uuid4().hex[:8]}"
    database = make_url(postgres_url).database
    assert database is not None
    t0 = datetime.now(UTC)
    worker: CausalOrdering[ReceivedEvent] = CausalOrdering(
        scope, database_url=postgres_url, clock=lambda: t0
    )
    rival: CausalOrdering[ReceivedEvent] = CausalOrdering(
        scope, database_url=postgres_url, clock=lambda: t0
    )
    # Its own engine, so its own Store: that Store's first completion runs the purge.
    purger_engine = create_async_engine(postgres_url)
    purger: CausalOrdering[ReceivedEvent] = CausalOrdering(
        f"{scope}-other", engine=purger_engine, clock=lambda: t0 + timedelta(seconds=1)
    )
    event = make_event(received=t0)
    # Taken and given back (as parking a follower does): the row has expired, purgeable.
    assert await worker.record_event_as_processing(event)
    await worker.forget_event_is_processing(event)

    async def complete_something() -> None:
        async with purger.event_is_processing(make_event()):
            pass

    blocker = await asyncpg.connect(_asyncpg_dsn(postgres_url), timeout=10)
    monitor = await asyncpg.connect(_asyncpg_dsn(postgres_admin_url), timeout=10)
    lock = blocker.transaction()
    tasks: list[asyncio.Task[Any]] = []
    try:
        await lock.start()
        await blocker.execute(
            "SELECT 1 FROM ordering_events WHERE scope = $1 AND event_id = $2 FOR UPDATE",
            scope,
            event.id,
        )
        tasks.append(asyncio.create_task(worker.record_event_as_processing(event)))
        await _until_lock_waiters(monitor, database, 1)
        tasks.append(asyncio.create_task(complete_something()))
        await _until_lock_waiters(monitor, database, 2)
        await lock.rollback()
        taken, _ = await bounded(asyncio.gather(*tasks), 10)
        if not taken:
            pytest.fail("the worker could not take the lease back")

        # The worker holds the lease: nobody else may take the event while it runs.
        assert await rival.event_has_started_processing(event), "the lease row was purged"
        assert not await rival.record_event_as_processing(event), "two workers hold the lease"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if not blocker.is_closed():
            await blocker.close()
        await monitor.close()
        for ordering in (worker, rival, purger):
            await ordering.close()
        await purger_engine.dispose()
