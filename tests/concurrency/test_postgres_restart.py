"""Worker processes keep consuming while their Postgres restarts fast and stops immediately.

Issue "Every fault a clear error", item 1: every transient connection-time fault (SQLSTATE class
08, 57P01-03, terminated sessions, refused connects) is retried with back-off on both paths (the
direct asyncpg path and SQLAlchemy's), then surfaces as ``DatabaseUnavailableError`` or
``StoreError``; no exception that is not an ``OrderingError`` reaches a caller.

The test starts a throwaway cluster of its own (``tests/pg_servers.py``; never the shared
server), and three worker processes (``_restart_worker.py``) that consume their shares of a
jumbled stream with duplicates. While they run, the cluster gets a fast restart and then an
immediate-mode stop (a crash: the next start recovers from the WAL), and stays down for longer
than one unit of work's retries, so errors must reach the workers, which nack and redeliver.
Afterwards: every event handled, in causal order, nothing parked, claimed or leased, and no
exception other than an ``OrderingError`` seen by any worker.

Every subprocess wait is bounded; a child still running when the test ends is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ordering_sql import dispose_engines, migrate
from ordering_sql.admin import ScopeStatus
from ordering_sql.settings import ENV_DIRECT_DRIVER
from ordering_sql.tools.simulation import build_stream, check, write_deliveries
from tests.concurrency._restart_worker import RestartWorkerSpec
from tests.concurrency.test_processes import assert_nothing_left, records_of, scope_status
from tests.pg_servers import ThrowawayPostgres
from tests.support import REPO_ROOT, child_env

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

WORKERS = 3
EVENTS = 600
LEASE_S = 3.0
CLAIM_S = 4.0
#: The fault schedule, in seconds: after the start, before the fast restart; after it, before
#: the immediate stop; how long the server then stays down. Down is longer than one unit of
#: work's retries (6 attempts, back-off 0.05 s doubling, jitter up to 1.5x: at most 2.3 s), so
#: StoreError or DatabaseUnavailableError must reach the workers.
BEFORE_RESTART_S = 1.5
BEFORE_STOP_S = 2.0
DOWN_S = 3.0
#: Rows written (in another database of the cluster) just before the immediate stop: the WAL
#: that the next start must replay, so that its crash recovery lasts long enough (about half a
#: second here) for the workers to meet "the database system is starting up" (57P03) reliably.
BALLAST_ROWS = 300_000
#: How long, once the faults are over, every event may take to be handled and the database
#: to settle (nothing parked, claimed or leased): several claim timeouts.
SETTLE_S = 60.0
#: The longest any child process may run before it is killed and the test fails.
CHILD_TIMEOUT_S = 120.0
#: Past the lookback (15 min) and every claim timeout used here: what is lost then is lost.


async def bounded(awaitable: Any, seconds: float) -> Any:
    return await asyncio.wait_for(awaitable, timeout=seconds)


# -- the cluster and its database ----------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[ThrowawayPostgres]:
    """A throwaway cluster for this module, which the tests restart and crash at will."""
    reason = ThrowawayPostgres.unavailable_reason()
    if reason is not None:
        message = f"a throwaway Postgres cluster cannot run here: {reason}"
        if IN_CI:
            pytest.fail(f"CI=true, but {message}")
        pytest.skip(message)
    with ThrowawayPostgres() as server:
        yield server


async def _admin(url: str, statement: str) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture
async def restart_url(cluster: ThrowawayPostgres) -> AsyncIterator[str]:
    """A fresh database on the cluster (running again if a test left it down), migrated."""
    await asyncio.to_thread(cluster.start)
    name = f"restart_{uuid.uuid4().hex[:12]}"
    admin = cluster.url(driver="postgresql")
    await _admin(admin, f'CREATE DATABASE "{name}"')
    url = cluster.url(name)
    await migrate(url)
    yield url
    await dispose_engines()
    if not cluster.running:
        await asyncio.to_thread(cluster.start)
    await _admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- child processes -----------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    spec: RestartWorkerSpec
    stdout: Path
    stderr: Path

    def errors(self, last: int = 3000) -> str:
        return self.stderr.read_text()[-last:] if self.stderr.exists() else ""

    def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)

    async def wait(self, seconds: float = CHILD_TIMEOUT_S) -> int:
        """The exit code; a child still running after ``seconds`` is killed and the test fails."""
        try:
            return int(await bounded(self.process.wait(), seconds))
        except TimeoutError:
            self.kill()
            await bounded(self.process.wait(), 10)
            pytest.fail(f"worker {self.name} did not finish within {seconds} s: {self.errors()}")

    def report(self) -> dict[str, Any]:
        return dict(json.loads(self.spec.report.read_text()))


@dataclass
class Children:
    folder: Path
    running: list[Child] = field(default_factory=list)

    async def spawn(self, name: str, spec: RestartWorkerSpec) -> Child:
        spec_path = self.folder / f"{name}.json"
        spec_path.write_text(spec.model_dump_json())
        stdout, stderr = self.folder / f"{name}.out", self.folder / f"{name}.err"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.concurrency._restart_worker",
                str(spec_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=str(REPO_ROOT),
                env=child_env(),
            )
        child = Child(name, process, spec, stdout, stderr)
        self.running.append(child)
        return child

    def assert_alive(self) -> None:
        for child in self.running:
            code = child.process.returncode
            assert code is None, f"worker {child.name} exited early ({code}): {child.errors()}"


@pytest.fixture
async def children(tmp_path: Path) -> AsyncIterator[Children]:
    """Spawns workers; any still running at the end of the test is killed and reaped."""
    made = Children(tmp_path)
    yield made
    for child in made.running:
        child.kill()
    for child in made.running:
        with contextlib.suppress(TimeoutError):
            await bounded(child.process.wait(), 10)


# -- looking at the results ----------------------------------------------------------------------


def ended(records: Iterable[dict[str, Any]]) -> set[str]:
    return {record["id"] for record in records if record["k"] == "end"}


def settled(state: ScopeStatus, events: int) -> bool:
    return (state.parked, state.claimed, state.processing, state.seen) == (0, 0, 0, events)


def _total(reports: Sequence[dict[str, Any]], key: str) -> Counter[str]:
    total: Counter[str] = Counter()
    for report in reports:
        total.update(report[key])
    return total


# -- the faults ----------------------------------------------------------------------------------


@dataclass
class Faults:
    """When each fault happened, on ``time.monotonic_ns()`` (the handler logs' clock)."""

    restart_began: int = 0
    restart_done: int = 0
    stop_began: int = 0
    stop_done: int = 0
    start_began: int = 0
    start_done: int = 0


async def write_ballast(admin_url: str) -> None:
    """WAL for the next crash recovery to replay (see ``BALLAST_ROWS``)."""
    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS ballast (n int, filler text)")
        await conn.execute(
            "INSERT INTO ballast SELECT n, repeat('x', 200) FROM generate_series(1, $1) AS n",
            BALLAST_ROWS,
        )
    finally:
        await conn.close()


async def inflict(cluster: ThrowawayPostgres, faults: Faults) -> None:
    """The schedule: a fast restart, then an immediate stop (after a burst of writes), down
    for DOWN_S, then a start, which recovers from the WAL."""
    await asyncio.sleep(BEFORE_RESTART_S)
    faults.restart_began = time.monotonic_ns()
    await asyncio.to_thread(cluster.restart, "fast")
    faults.restart_done = time.monotonic_ns()
    await asyncio.sleep(BEFORE_STOP_S)
    await write_ballast(cluster.url(driver="postgresql"))
    faults.stop_began = time.monotonic_ns()
    await asyncio.to_thread(cluster.stop, "immediate")
    faults.stop_done = time.monotonic_ns()
    await asyncio.sleep(DOWN_S)
    faults.start_began = time.monotonic_ns()
    await asyncio.to_thread(cluster.start)
    faults.start_done = time.monotonic_ns()


# -- the test ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["direct", "sqlalchemy"])
async def test_workers_ride_out_a_fast_restart_and_an_immediate_stop(
    path: str,
    cluster: ThrowawayPostgres,
    restart_url: str,
    children: Children,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if path == "sqlalchemy":
        monkeypatch.setenv(ENV_DIRECT_DRIVER, "0")  # the children's environment
    began = time.monotonic()
    scope = f"restart-{uuid.uuid4().hex[:8]}"
    stream = build_stream(EVENTS, seed=71, duplicate_rate=0.1)
    start_file, stop_file = tmp_path / "start", tmp_path / "stop"
    workers: list[Child] = []
    for i in range(WORKERS):
        name = f"worker-{i}"
        deliveries = tmp_path / f"{name}.jsonl"
        write_deliveries(deliveries, stream.deliveries[i::WORKERS])
        spec = RestartWorkerSpec(
            database_url=restart_url,
            scope=scope,
            deliveries=deliveries,
            log=tmp_path / f"{name}.log",
            report=tmp_path / f"{name}.report.json",
            worker=name,
            ready_file=tmp_path / f"{name}.ready",
            start_file=start_file,
            stop_file=stop_file,
            lease_timeout=LEASE_S,
            claim_timeout=CLAIM_S,
            seed=i,
        )
        workers.append(await children.spawn(name, spec))
    logs = [child.spec.log for child in workers]

    deadline = time.monotonic() + 60
    while not all(child.spec.ready_file.exists() for child in workers):
        children.assert_alive()
        assert time.monotonic() < deadline, "the workers did not get ready within 60 s"
        await asyncio.sleep(0.05)
    start_file.touch()

    faults = Faults()
    await bounded(inflict(cluster, faults), 120)
    children.assert_alive()

    # Until every event was handled and the database settled (all that the faults left leased
    # or claimed recovered), then the workers may finish their queues and stop.
    wanted = {str(event.id) for event in stream.events}
    deadline = time.monotonic() + SETTLE_S
    state = ScopeStatus(scope=scope)
    while True:
        children.assert_alive()
        records = records_of(logs)
        if wanted <= ended(records):
            state = await scope_status(restart_url, scope)
            if settled(state, len(wanted)):
                break
        assert time.monotonic() < deadline, (
            f"not settled {SETTLE_S} s after the faults: {len(wanted - ended(records))} events "
            f"never handled; {state}"
        )
        await asyncio.sleep(0.5)
    stop_file.touch()
    codes = [await child.wait() for child in workers]
    for child, code in zip(workers, codes, strict=True):
        assert code == 0, f"worker {child.name} exited with {code}: {child.errors()}"
    runtime = time.monotonic() - began

    reports = [child.report() for child in workers]
    records = records_of(logs)
    verdict = check(stream, records)
    counts = _total(reports, "counts")
    nacks = _total(reports, "nacks")
    sweep_errors = _total(reports, "sweep_errors")
    retries = _total(reports, "retries")
    unexpected = [found for report in reports for found in report["unexpected"]]
    bodies = sum(1 for record in records if record["k"] == "end")
    handled_before = {r["id"] for r in records if r["k"] == "end" and r["t"] < faults.restart_began}
    handled_after = {r["id"] for r in records if r["k"] == "end" and r["t"] > faults.start_done}
    ms = 1e-6
    print(
        f"\nrestart [{path}]: events {verdict.events}, deliveries {len(stream.deliveries)} "
        f"(+{counts['delivered'] - len(stream.deliveries)} redeliveries), handled "
        f"{verdict.handled} ({bodies} handler bodies run), handled twice "
        f"{verdict.handled_twice} {verdict.twice[:5]}, lost {verdict.lost}, order violations "
        f"{verdict.order_violations}; parked {counts['parked']}, duplicates skipped "
        f"{counts['duplicates_skipped']}, busy redelivered {counts['busy_redelivered']}, swept "
        f"{counts['swept']}\n"
        f"  nacks by exception: {dict(nacks)}; sweep errors: {dict(sweep_errors)}\n"
        f"  store retries by cause: {dict(retries)}\n"
        f"  not OrderingError: {len(unexpected)} "
        f"{Counter(found['type'] + ': ' + found['message'][:120] for found in unexpected)}\n"
        f"  faults (ms after the restart began): restart took "
        f"{(faults.restart_done - faults.restart_began) * ms:.0f}, stop immediate at "
        f"{(faults.stop_began - faults.restart_began) * ms:.0f}, down until "
        f"{(faults.start_done - faults.restart_began) * ms:.0f} (its start took "
        f"{(faults.start_done - faults.start_began) * ms:.0f}); events handled before the "
        f"faults {len(handled_before)}, after them {len(handled_after)}; worker run times "
        f"{[report['seconds'] for report in reports]} s; test {runtime:.1f} s"
    )
    samples: dict[str, set[str]] = {}
    for report in reports:
        for key in ("retry_samples", "nack_samples"):
            for cause, texts in report[key].items():
                samples.setdefault(f"{key[:5]} {cause}", set()).update(texts)
    for cause, texts in sorted(samples.items()):
        print(f"  {cause}: {sorted(texts)[:3]}")
    for found in unexpected[:3]:
        print(f"  --- {found['where']}: {found['traceback']}")

    assert not unexpected, (
        f"{len(unexpected)} exceptions that are not OrderingErrors reached the workers, first: "
        f"{unexpected[0]['traceback']}"
    )
    assert verdict.lost == 0, verdict.examples
    assert verdict.order_violations == 0, verdict.examples
    total_nacks = sum(nacks.values())
    assert verdict.handled_twice <= total_nacks, (
        f"{verdict.handled_twice} events handled twice but only {total_nacks} interrupted "
        f"handlings: {verdict.twice[:5]}"
    )
    # The faults hit the workers in the middle of the stream.
    assert handled_before, "no event was handled before the faults began"
    assert handled_after, "no event was handled after the server came back"
    assert sum(retries.values()) > 0, "the Store never retried a transient fault"
    assert total_nacks + sum(sweep_errors.values()) > 0, (
        "no error reached the workers, although the server was down longer than one retry"
    )
    await assert_nothing_left(restart_url, scope, stream.events)
