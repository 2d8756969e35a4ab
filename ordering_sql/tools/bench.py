"""``ordering-sql bench``: workloads W1-W5 and E0-E1 next to the floors of the same database.

Workloads (``--events`` events, 5,000 by default, in chains of 5):

* W1: delivered in order, one worker;
* W2: each chain's delivery shuffled (seeded), one worker;
* W3: W2 consumed by 8 concurrent workers from one queue;
* W4: W2 through the batch API (``preceding_events_confirmed``), in batches of 100, one worker;
* W5: 4 worker processes sharing one stream (round-robin partitions, as a broker would hand
  them out), with 20% duplicate deliveries;
* E0: W1 whose handler writes one effect row (into ``bench_effects``, on the ordering database)
  in a transaction of its own inside ``preceding_event_confirmed``;
* E1: E0 through ``exactly_once``: the effect row is written on the connection it yields and
  commits with the event's completion.

Each workload runs ``--repeat`` times (3) in fresh scopes and reports the median events/s,
p50/p99 seconds per delivery, statements (round trips on Postgres) per event, and a correctness
check: every event handled exactly once, in causal order, nothing left parked (E0 and E1: and
exactly one effect row per event). The floors (``floors.py``) are measured on the same database
in the same run: a single-row INSERT + COMMIT into an ordinary (durable) table and a
``SELECT 1``, each through the raw driver and through SQLAlchemy; each workload is also shown as
a ratio to the two-statement floor (SQLAlchemy's INSERT + COMMIT rate halved), the least an
in-order event costs when both of its statements commit through SQLAlchemy. ``--plot`` draws
them (``plot.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict
from sqlalchemy import event as sa_event
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ordering_sql.admin import status
from ordering_sql.engine import CausalOrdering
from ordering_sql.migration import migrate
from ordering_sql.models import ReceivedEvent
from ordering_sql.settings import (
    ENV_POOLER,
    ENV_SQLITE_SYNCHRONOUS,
    Settings,
    mask_url,
    normalize_url,
)
from ordering_sql.tools.floors import Floors, measure_floors
from ordering_sql.tools.simulation import (
    DeliveryQueue,
    HandledLog,
    Stream,
    WorkerSpec,
    check,
    read_log,
    run_batch_worker,
    run_worker,
    write_deliveries,
)

__all__ = ["BenchReport", "WorkloadResult", "run_bench"]

CHAIN = 5
WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "E0", "E1")
#: The workloads delivered in order (the others shuffle each chain).
IN_ORDER = ("W1", "E0", "E1")
#: The workloads whose handler writes an effect row: E1 through ``exactly_once`` (joined).
EFFECTS = {"E0": False, "E1": True}
#: E0 and E1's effects table, on the ordering database; created and dropped by the workload.
EFFECTS_TABLE = "bench_effects"
#: W4's batch size.
BATCH = 100


class WorkloadResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    workload: str
    backend: str
    events: int
    runs: list[float]
    events_per_s: float
    p50_s: float | None
    p99_s: float | None
    statements_per_event: float | None
    ratio_to_floor: float
    correct: bool
    problems: list[str]


class BenchReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    floors: dict[str, Floors]
    results: list[WorkloadResult]


def chains(events: int, *, shuffled: bool, seed: int, duplicates: float = 0.0) -> Stream:
    """``events`` events in chains of 5; with ``shuffled`` each chain's delivery is jumbled."""
    rng = random.Random(seed)
    start = datetime.now(UTC)
    made: list[ReceivedEvent] = []
    deliveries: list[ReceivedEvent] = []
    for c in range(max(1, events // CHAIN)):
        chain: list[ReceivedEvent] = []
        for i in range(CHAIN):
            chain.append(
                ReceivedEvent(
                    occurred=start + timedelta(microseconds=len(made)),
                    event=f"bench.step.{i}",
                    resource={"prefect.resource.id": f"bench.chain.{c}"},
                    id=UUID(int=rng.getrandbits(128), version=4),
                    follows=chain[-1].id if chain else None,
                    received=start,
                )
            )
            made.append(chain[-1])
        order = list(chain)
        if shuffled:
            rng.shuffle(order)
        deliveries.extend(order)
    for _ in range(int(len(made) * duplicates)):
        deliveries.insert(rng.randrange(len(deliveries) + 1), rng.choice(made))
    return Stream(events=made, deliveries=deliveries)


async def _in_process(
    url: str,
    stream: Stream,
    workers: int,
    *,
    batch: int | None = None,
    effects: _Effects | None = None,
    joined: bool = False,
) -> tuple[float, list[float], int, list[dict[str, Any]], str]:
    """Run ``workers`` consumers of ``stream`` in this process: the usual single-event worker,
    the batch worker (``batch``), or with ``effects`` the same worker with E0/E1's handler.
    Returns the seconds, the latencies, the statements sent, the handler records and the scope.
    """
    scope = f"bench-{time.time_ns()}"
    ordering: CausalOrdering[Any] = CausalOrdering(scope, database_url=url)
    try:
        await ordering.check()
        queue = DeliveryQueue(stream.deliveries)
        logs = [HandledLog(None, f"w{i}") for i in range(workers)]
        latencies: list[float] = []
        count = [0]

        def sent(_statement: str) -> None:
            count[0] += 1

        async with ordering.observe_statements(sent):
            began = time.perf_counter()
            if effects is not None:
                with effects.observe(sent):
                    await asyncio.gather(
                        *(
                            run_worker(
                                ordering,
                                queue,
                                log,
                                latencies=latencies,
                                handler=_effects_handler(ordering, log, effects, joined=joined),
                            )
                            for log in logs
                        )
                    )
            elif batch is None:
                await asyncio.gather(
                    *(run_worker(ordering, queue, log, latencies=latencies) for log in logs)
                )
            else:
                await asyncio.gather(
                    *(
                        run_batch_worker(
                            ordering, queue, log, batch_size=batch, latencies=latencies
                        )
                        for log in logs
                    )
                )
            seconds = time.perf_counter() - began
        records = [r for log in logs for r in log.records]
        return seconds, latencies, count[0], records, scope
    finally:
        await ordering.close()


class _Effects:
    """E0 and E1's effects table, ``bench_effects``, on the ordering database.

    Through an engine of the bench's own, as an application would make it: E0 writes each
    effect on it in a transaction of its own; E1 writes on the connection ``exactly_once``
    yields, and uses this engine only to set the table up and to count its rows. The
    statements sent on this engine (BEGIN, INSERT, COMMIT) are counted with the engine's own
    (``observe``), so that E0's statements per event include its effect's.
    """

    insert = text(f"INSERT INTO {EFFECTS_TABLE} (event_id, note) VALUES (:event_id, :note)")

    def __init__(self, url: str) -> None:
        parsed = normalize_url(url)
        settings = Settings.from_env(url)
        options: dict[str, Any] = {}
        if parsed.get_backend_name() == "sqlite":
            # As patient with the write lock as the engine's connections (and, below, as durable).
            options["connect_args"] = {"timeout": settings.busy_timeout_s}
        elif settings.pooler == "transaction":  # unnamed statements, as the engine's
            options["connect_args"] = {
                "statement_cache_size": 0,
                "prepared_statement_cache_size": 0,
            }
        self.engine: AsyncEngine = create_async_engine(parsed, **options)
        self._listeners: list[Callable[[str], None]] = []
        sync_engine = self.engine.sync_engine
        if parsed.get_backend_name() == "sqlite":
            synchronous = f"PRAGMA synchronous={settings.sqlite_synchronous}"

            def on_connect(dbapi_conn: Any, _record: Any) -> None:
                cursor = dbapi_conn.cursor()
                cursor.execute(synchronous)
                cursor.close()

            sa_event.listen(sync_engine, "connect", on_connect)
        sa_event.listen(sync_engine, "begin", lambda _conn: self._sent("BEGIN"))
        sa_event.listen(
            sync_engine, "before_cursor_execute", lambda _c, _cu, sql, *_: self._sent(sql)
        )
        sa_event.listen(sync_engine, "commit", lambda _conn: self._sent("COMMIT"))

    def _sent(self, statement: str) -> None:
        for listener in self._listeners:
            listener(statement)

    @contextlib.contextmanager
    def observe(self, listener: Callable[[str], None]) -> Iterator[None]:
        """Call ``listener`` with every statement sent on this engine while the block runs."""
        self._listeners.append(listener)
        try:
            yield
        finally:
            self._listeners.remove(listener)

    async def write(self, conn: AsyncConnection, event: ReceivedEvent) -> None:
        """One effect row for ``event``, on ``conn`` (in its caller's transaction)."""
        await conn.execute(self.insert, {"event_id": str(event.id), "note": event.event})

    async def create(self) -> None:
        """Create the table if missing, and empty it (rows a killed run may have left)."""
        async with self.engine.begin() as conn:
            await conn.execute(
                text(
                    f"CREATE TABLE IF NOT EXISTS {EFFECTS_TABLE} "
                    "(event_id VARCHAR(36) NOT NULL, note VARCHAR(40))"
                )
            )
            await conn.execute(text(f"DELETE FROM {EFFECTS_TABLE}"))

    async def problems(self, stream: Stream) -> str | None:
        """What is wrong with the rows written for ``stream`` (None: one per event, no other);
        the table is emptied afterwards, for the next run."""
        async with self.engine.begin() as conn:
            rows = await conn.execute(
                text(f"SELECT event_id, COUNT(*) FROM {EFFECTS_TABLE} GROUP BY event_id")
            )
            written: dict[str, int] = {event_id: count for event_id, count in rows}
            await conn.execute(text(f"DELETE FROM {EFFECTS_TABLE}"))
        ids = {str(e.id) for e in stream.events}
        missing = len(ids - written.keys())
        twice = sum(1 for event_id, count in written.items() if event_id in ids and count > 1)
        unknown = sum(count for event_id, count in written.items() if event_id not in ids)
        if not (missing or twice or unknown):
            return None
        return (
            f"effect rows missing {missing}, written more than once {twice}, "
            f"of no event of the run {unknown}"
        )

    async def drop(self) -> None:
        """Drop the table and close the engine."""
        try:
            async with self.engine.begin() as conn:
                await conn.execute(text(f"DROP TABLE IF EXISTS {EFFECTS_TABLE}"))
        finally:
            await self.engine.dispose()


def _effects_handler(
    ordering: CausalOrdering[Any], log: HandledLog, effects: _Effects, *, joined: bool
) -> Callable[[ReceivedEvent, int], Awaitable[None]]:
    """The recursive handler of E0 and E1: one effect row per event, in a transaction of its
    own inside ``preceding_event_confirmed`` (E0), or on ``exactly_once``'s connection
    (``joined``, E1)."""

    async def handler(event: ReceivedEvent, depth: int = 0) -> None:
        if joined:
            async with ordering.exactly_once(handler, event, depth) as conn:
                log.write("start", event.id)
                await effects.write(conn, event)
                log.write("end", event.id)
        else:
            async with ordering.preceding_event_confirmed(handler, event, depth):
                log.write("start", event.id)
                async with effects.engine.begin() as conn:
                    await effects.write(conn, event)
                log.write("end", event.id)

    return handler


async def _processes(
    url: str, stream: Stream, workers: int, folder: Path
) -> tuple[float, list[float], int | None, list[dict[str, Any]], str]:
    scope = f"bench-{time.time_ns()}"
    specs = []
    for i in range(workers):
        deliveries = folder / f"{scope}-{i}.jsonl"
        write_deliveries(deliveries, stream.deliveries[i::workers])
        spec = WorkerSpec(
            database_url=url,
            scope=scope,
            deliveries=deliveries,
            log=folder / f"{scope}-{i}.log",
            worker=f"p{i}",
        )
        path = folder / f"{scope}-{i}.json"
        path.write_text(spec.model_dump_json())
        specs.append((spec, path))
    began = time.perf_counter()
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ordering_sql.tools.simulation",
            str(path),
            stdout=asyncio.subprocess.DEVNULL,
        )
        for _, path in specs
    ]
    for proc in procs:
        await asyncio.wait_for(proc.wait(), timeout=600)
    seconds = time.perf_counter() - began
    records = [r for spec, _ in specs for r in read_log(spec.log)]
    return seconds, [], None, records, scope


async def _leftovers_then_clear(url: str, scope: str) -> int:
    """Parked followers and live leases left in the run's scope; the scope is then cleared.

    The tables are not vacuumed here: autovacuum looks after them, as in a service. (Vacuuming
    emptied tables was tried: the planner then takes them for empty and reads the next run's
    growing tables by sequential scans until autovacuum analyses them again, which favours
    the batch workload and penalises the single-event ones; neither is a service's steady
    state.)
    """
    ordering: CausalOrdering[Any] = CausalOrdering(scope, database_url=url)
    try:
        store = await ordering._db()
        found = await status(store, now=await store.now(), scope=scope)
        await ordering.clear()
        return sum(s.parked + s.processing for s in found)
    finally:
        await ordering.close()


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_workload(
    name: str,
    url: str,
    *,
    events: int,
    repeat: int,
    seed: int,
    floors: Floors,
    folder: Path,
    backend: str | None = None,
) -> WorkloadResult:
    runs: list[float] = []
    latencies: list[float] = []
    statements: list[int] = []
    problems: list[str] = []
    effects = _Effects(url) if name in EFFECTS else None
    try:
        for r in range(repeat):
            stream = chains(
                events,
                shuffled=name not in IN_ORDER,
                seed=seed + r,
                duplicates=0.2 if name == "W5" else 0.0,
            )
            if effects is not None:
                await effects.create()
            if name == "W5":
                seconds, lat, count, records, scope = await _processes(url, stream, 4, folder)
            else:
                workers = 8 if name == "W3" else 1
                batch = BATCH if name == "W4" else None
                seconds, lat, count, records, scope = await _in_process(
                    url,
                    stream,
                    workers,
                    batch=batch,
                    effects=effects,
                    joined=EFFECTS.get(name, False),
                )
            runs.append(len(stream.events) / seconds)
            latencies += lat
            if count is not None:
                statements.append(count)
            verdict = check(stream, records)
            left = await _leftovers_then_clear(url, scope)
            if not verdict.ok or verdict.handled_twice or left:
                problems.append(
                    f"run {r + 1}: lost {verdict.lost}, twice {verdict.handled_twice}, "
                    f"order violations {verdict.order_violations}, left parked or leased {left}"
                )
            if effects is not None and (wrong := await effects.problems(stream)):
                problems.append(f"run {r + 1}: {wrong}")
    finally:
        if effects is not None:
            await effects.drop()
    rate = statistics.median(runs)
    backend = backend or normalize_url(url).get_backend_name()
    return WorkloadResult(
        workload=name,
        backend=backend,
        events=events,
        runs=runs,
        events_per_s=rate,
        p50_s=_percentile(latencies, 0.50),
        p99_s=_percentile(latencies, 0.99),
        statements_per_event=(statistics.median(statements) / events) if statements else None,
        ratio_to_floor=rate / floors.two_statement,
        correct=not problems,
        problems=problems,
    )


async def run_bench(
    urls: list[str],
    *,
    events: int = 5000,
    repeat: int = 3,
    seed: int = 1,
    workloads: tuple[str, ...] = WORKLOADS,
    sqlite_synchronous: tuple[str, ...] = (),
    pooled_urls: tuple[str, ...] = (),
    on_step: Callable[[str], None] | None = None,
) -> BenchReport:
    """Run the floors and ``workloads`` on every database of ``urls``, then of ``pooled_urls``.

    ``sqlite_synchronous``: run a SQLite database once per ``PRAGMA synchronous`` setting given
    (its results are labelled ``sqlite-full``, ``sqlite-normal``...), so that one run shows
    what durability costs; empty, once with the configured setting, labelled ``sqlite``.
    ``pooled_urls``: Postgres databases reached through a transaction pooler (pgbouncer), run
    with ``ORDERING_SQL_POOLER=transaction`` and labelled ``postgresql-pooled``, so that one run
    shows what the pooler costs next to a direct connection.
    """
    floors: dict[str, Floors] = {}
    results: list[WorkloadResult] = []
    with tempfile.TemporaryDirectory(prefix="ordering-sql-bench-") as tmp:
        folder = Path(tmp)
        for run in _passes(urls, pooled_urls, sqlite_synchronous):
            with _environment(run.environment):
                await migrate(run.url)
                if on_step:
                    on_step(f"{run.label}: floors on {mask_url(run.url)}")
                floor = floors[run.label] = await measure_floors(run.url)
                for name in workloads:
                    if name == "W5" and run.backend == "sqlite":
                        continue  # W5 is a Postgres workload: processes sharing a server
                    if on_step:
                        on_step(f"{run.label}: {name}")
                    results.append(
                        await run_workload(
                            name,
                            run.url,
                            events=events,
                            repeat=repeat,
                            seed=seed,
                            floors=floor,
                            folder=folder,
                            backend=run.label,
                        )
                    )
    return BenchReport(floors=floors, results=results)


@dataclasses.dataclass(frozen=True)
class _Pass:
    """One database measured with one set of ``ORDERING_SQL_*`` settings."""

    url: str
    backend: str
    label: str
    environment: dict[str, str]


def _passes(
    urls: list[str], pooled_urls: tuple[str, ...], sqlite_synchronous: tuple[str, ...]
) -> Iterator[_Pass]:
    for url in urls:
        backend = normalize_url(url).get_backend_name()
        if backend == "sqlite" and sqlite_synchronous:
            for mode in sqlite_synchronous:
                env = {ENV_SQLITE_SYNCHRONOUS: mode}
                yield _Pass(url, backend, f"{backend}-{mode.lower()}", env)
        else:
            yield _Pass(url, backend, backend, {})
    for url in pooled_urls:
        backend = normalize_url(url).get_backend_name()
        yield _Pass(url, backend, f"{backend}-pooled", {ENV_POOLER: "transaction"})


@contextlib.contextmanager
def _environment(overrides: dict[str, str]) -> Iterator[None]:
    """``overrides`` in ``os.environ`` for one pass of the bench.

    The engines of a pass are made within it (each workload run opens and closes its own, and
    W5's worker processes inherit the environment), so they all take the pass's settings.
    """
    before = {name: os.environ.get(name) for name in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
