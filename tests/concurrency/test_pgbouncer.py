"""Behind a real pgbouncer, in transaction and in session pooling mode.

The engine, the command line and migrations must work through pgbouncer in both modes, with
``ORDERING_SQL_POOLER`` set to the mode. Each test starts its own pgbouncer on a free port in
front of the suite's Postgres (``tests/pg_servers.py``) and reaches the test's own fresh database
through it.

In transaction mode pgbouncer has fewer server connections (``TRANSACTION_POOL_SIZE``) than the
workers open client connections, so consecutive transactions of one client connection run on
different server connections: a named prepared statement made in one is missing in the next,
and one made by another client is in the way ("already exists"). The tests check that the
pooling really multiplexes, and a control shows that without the setting it breaks. In session
mode a client connection keeps its server connection until it disconnects, so the pool there is
large enough for every client (a smaller one would make the surplus clients wait, not fail).

What the workers leave behind is checked over a direct connection to Postgres, past pgbouncer.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast
from uuid import uuid4

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from ordering_sql import CausalOrdering, ReceivedEvent, dispose_engines
from ordering_sql.errors import StoreError
from ordering_sql.settings import ENV_DIRECT_DRIVER, ENV_POOLER
from ordering_sql.tools.simulation import build_stream, read_log, write_deliveries
from tests.acceptance.test_cli import Result, _environment
from tests.concurrency import test_processes as processes
from tests.concurrency._bouncer_worker import BouncerWorkerSpec
from tests.conftest import IN_CI, _asyncpg_dsn
from tests.pg_servers import HOST, SERVER_USER, PgBouncer, PoolMode, find_postgres_bindir
from tests.support import REPO_ROOT, make_event

#: The multi-process tests' fixture: spawns workers, kills and reaps any left at the end.
children = processes.children

#: Server connections pgbouncer may open to the test database in transaction mode: fewer than
#: the client connections the workers hold at once (``PROCESSES`` x ``CONSUMERS`` at least).
TRANSACTION_POOL_SIZE = 3
#: In session mode every client connection holds a server connection: room for all of them
#: (three processes with a pool of up to 2 x ORDERING_SQL_POOL_SIZE = 20 connections each).
SESSION_POOL_SIZE = 60
PROCESSES = 3
#: Consumers per worker process, each on its own client connection at the same moment.
CONSUMERS = 3
EVENTS = 600
CLI_TIMEOUT_S = 60
ENTRY = [sys.executable, "-m", "ordering_sql"]
EXAMPLE = REPO_ROOT / "examples" / "jumbled.jsonl"
#: What asyncpg and Postgres say when a named prepared statement went missing or collided.
PREPARED_STATEMENT_ERRORS = ("does not exist", "already exists")


# -- pgbouncer ----------------------------------------------------------------------------------


def _require_pgbouncer() -> None:
    reason = PgBouncer.unavailable_reason()
    if reason is None:
        return
    message = f"the pgbouncer tests need a pgbouncer program, but {reason}"
    if IN_CI:
        pytest.fail(f"CI=true: {message}")
    pytest.skip(message)


def _through(url: str, bouncer: PgBouncer) -> str:
    """``url`` with its host and port replaced by pgbouncer's: the same database through it."""
    return make_url(url).set(host=HOST, port=bouncer.port).render_as_string(hide_password=False)


def _database(url: str) -> str:
    name = make_url(url).database
    assert name is not None
    return name


@pytest.fixture(params=["transaction", "session"])
def pool_mode(request: pytest.FixtureRequest) -> PoolMode:
    return cast("PoolMode", request.param)


@pytest.fixture
def bouncer(pool_mode: PoolMode, postgres_admin_url: str) -> Iterator[PgBouncer]:
    """A pgbouncer in ``pool_mode`` in front of the suite's Postgres, on a port of its own."""
    _require_pgbouncer()
    upstream = make_url(postgres_admin_url)
    size = TRANSACTION_POOL_SIZE if pool_mode == "transaction" else SESSION_POOL_SIZE
    with PgBouncer(
        upstream.port or 5432,
        host=upstream.host or HOST,
        pool_mode=pool_mode,
        users=tuple(sorted({SERVER_USER, upstream.username or SERVER_USER})),
        settings={"default_pool_size": str(size)},
    ) as running:
        yield running


@pytest.fixture
def bouncer_url(postgres_url: str, bouncer: PgBouncer) -> str:
    """The test's fresh migrated database (``postgres_url``), through pgbouncer."""
    return _through(postgres_url, bouncer)


@pytest.fixture
def empty_bouncer_url(empty_postgres_url: str, bouncer: PgBouncer) -> str:
    """The test's empty database (``empty_postgres_url``), through pgbouncer."""
    return _through(empty_postgres_url, bouncer)


async def _backends(admin_url: str, database: str) -> set[int]:
    """The server processes connected to ``database``, seen over a direct connection."""
    conn = await asyncpg.connect(_asyncpg_dsn(admin_url), timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
    finally:
        await conn.close()
    return {row["pid"] for row in rows}


@dataclass
class PoolWatch:
    """Samples, while workers run, the server connections to the test database (directly, in
    ``pg_stat_activity``) and pgbouncer's client connections to it (``SHOW POOLS`` on its admin
    console through ``psql``, since asyncpg cannot speak to that console; None without psql)."""

    admin_url: str
    bouncer: PgBouncer
    database: str
    max_servers: int = 0
    max_clients: int | None = None
    samples: int = 0
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    @staticmethod
    def psql() -> str | None:
        found = shutil.which("psql")
        if found is None and (bindir := find_postgres_bindir()) is not None:
            candidate = bindir / "psql"
            found = str(candidate) if candidate.exists() else None
        return found

    async def _clients(self, psql: str) -> int | None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        proc = await asyncio.create_subprocess_exec(
            psql,
            "--csv",
            "-X",
            "-c",
            "SHOW POOLS",
            f"host={HOST} port={self.bouncer.port} dbname=pgbouncer user={SERVER_USER}",
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 10)
        if proc.returncode != 0:
            return None
        for row in csv.DictReader(io.StringIO(out.decode())):
            if row.get("database") == self.database:
                return int(row["cl_active"]) + int(row["cl_waiting"])
        return 0

    async def _run(self) -> None:
        psql = self.psql()
        conn = await asyncpg.connect(_asyncpg_dsn(self.admin_url), timeout=10)
        try:
            while True:
                servers = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1",
                    self.database,
                )
                self.max_servers = max(self.max_servers, int(servers))
                if psql is not None:
                    clients = await self._clients(psql)
                    if clients is not None:
                        self.max_clients = max(self.max_clients or 0, clients)
                self.samples += 1
                await asyncio.sleep(0.05)
        finally:
            await conn.close()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        assert self._task is not None
        if self._task.done():
            self._task.result()  # a failed watch fails the test
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


# -- 1. the pooling really multiplexes ------------------------------------------------------------


@pytest.mark.postgres
async def test_pgbouncer_multiplexes_server_connections_as_its_mode_says(
    bouncer: PgBouncer, bouncer_url: str, postgres_admin_url: str, pool_mode: PoolMode
) -> None:
    """Twice as many clients as transaction mode has server connections, all busy at once: in
    transaction mode the clients' transactions share the pool's few server connections (a
    server connection serves several clients in turn; whether one client's transactions also
    move between server connections is up to pgbouncer's queue, so that is not asserted); in
    session mode each client keeps one server connection of its own."""
    clients = 2 * TRANSACTION_POOL_SIZE
    dsn = _asyncpg_dsn(bouncer_url)
    conns = [await asyncpg.connect(dsn, statement_cache_size=0, timeout=10) for _ in range(clients)]

    async def transactions(conn: asyncpg.Connection) -> list[int]:
        pids: list[int] = []
        for _ in range(15):
            async with conn.transaction():
                pids.append(int(await conn.fetchval("SELECT pg_backend_pid()")))
                await conn.execute("SELECT pg_sleep(0.005)")
        return pids

    try:
        seen = await processes.bounded(asyncio.gather(*(transactions(c) for c in conns)), 60)
        backends = await _backends(postgres_admin_url, _database(bouncer_url))
    finally:
        for conn in conns:
            await conn.close()
    per_client = [set(pids) for pids in seen]
    servers = set().union(*per_client)
    print(
        f"\n{pool_mode}: {clients} clients ran on {len(servers)} server connections; "
        f"server connections per client {[len(s) for s in per_client]}"
    )
    # Every pid is a real backend of the test database, seen past pgbouncer.
    assert servers <= backends, (servers, backends)
    if pool_mode == "transaction":
        assert len(servers) <= TRANSACTION_POOL_SIZE < clients, per_client
    else:
        assert all(len(s) == 1 for s in per_client), per_client
        assert len(servers) == clients


# -- 2. three processes, each receiving every delivery, through pgbouncer -------------------------


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.parametrize("path", ["direct", "sqlalchemy"])
async def test_three_processes_through_pgbouncer_handle_each_event_once(
    bouncer: PgBouncer,
    bouncer_url: str,
    postgres_url: str,
    postgres_admin_url: str,
    pool_mode: PoolMode,
    path: str,
    children: processes.Children,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``test_three_processes_each_receiving_every_delivery_handle_each_event_once`` through
    pgbouncer, with ``ORDERING_SQL_POOLER`` set to its mode in the workers, on the direct driver
    path and with every statement through SQLAlchemy (``ORDERING_SQL_DIRECT_DRIVER=0``); each
    process runs ``CONSUMERS`` consumers at once, so it holds that many client connections.
    Every event is handled exactly once, in order, and nothing is left (checked directly)."""
    monkeypatch.setenv(ENV_POOLER, pool_mode)
    if path == "sqlalchemy":
        monkeypatch.setenv(ENV_DIRECT_DRIVER, "0")
    scope = f"bouncer-{uuid4().hex[:8]}"
    stream = build_stream(EVENTS, seed=29, duplicate_rate=0.1)
    start_file = tmp_path / "start"
    workers: list[processes.Child] = []
    ready: list[Path] = []
    logs: list[Path] = []
    for k in range(PROCESSES):
        deliveries = tmp_path / f"copy-{k}.jsonl"
        # Every process gets every delivery (duplicates included), each in its own jumble.
        write_deliveries(deliveries, processes.jumbled(stream.deliveries, seed=k))
        ready.append(tmp_path / f"copy-{k}.ready")
        logs.append(tmp_path / f"copy-{k}.log")
        spec = BouncerWorkerSpec(
            database_url=bouncer_url,
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
            consumers=CONSUMERS,
        )
        workers.append(await children.spawn(f"copy-{k}", "tests.concurrency._bouncer_worker", spec))
    await processes._wait_for_files(ready, workers, seconds=60)
    watch = PoolWatch(postgres_admin_url, bouncer, _database(bouncer_url))
    watch.start()
    began = time.monotonic()
    processes._signal_start(start_file)
    try:
        tallies = [await worker.succeeded() for worker in workers]
    finally:
        await watch.stop()
    took = time.monotonic() - began

    records = processes.records_of(logs)
    processes.assert_each_handled_once(stream, records)
    for log in logs:
        assert sum(processes.kinds(read_log(log), "ack").values()) == len(stream.deliveries)
    busy = [t.handled for t in tallies]
    print(
        f"\n{pool_mode}/{path}: {len(stream.events)} events, {len(stream.deliveries)} deliveries"
        f" to each of {PROCESSES} processes in {took:.1f} s; handled per process {busy}, "
        f"skipped {[t.duplicates_skipped for t in tallies]}, retried "
        f"{[t.retried for t in tallies]}; at most {watch.max_servers} server connections for "
        f"{watch.max_clients} client connections ({watch.samples} samples)"
    )
    assert sum(busy) == len(stream.events)
    assert sum(1 for n in busy if n) >= 2, f"only one process did any work: {busy}"
    if pool_mode == "transaction":
        # The pooling multiplexed: never more server connections than the pool, and (where
        # psql can ask pgbouncer) more client connections than that at once.
        assert 0 < watch.max_servers <= TRANSACTION_POOL_SIZE, watch
        if watch.max_clients is not None:
            assert watch.max_clients > TRANSACTION_POOL_SIZE, watch

    # Checked over a direct connection to Postgres, with no pooler setting.
    monkeypatch.delenv(ENV_POOLER)
    monkeypatch.delenv(ENV_DIRECT_DRIVER, raising=False)
    await processes.assert_nothing_left(postgres_url, scope, stream.events)


# -- 3. the command line through pgbouncer ------------------------------------------------------


@dataclass(frozen=True)
class Cli:
    """``python -m ordering_sql`` in ``cwd`` with the suite's clean environment plus ``env``."""

    cwd: Path
    env: dict[str, str]

    async def __call__(self, *args: str) -> Result:
        proc = await asyncio.create_subprocess_exec(
            *ENTRY,
            *args,
            cwd=self.cwd,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.communicate()
            raise
        assert proc.returncode is not None
        return Result(proc.returncode, out.decode(), err.decode())


def _cli(tmp_path: Path, **env: str) -> Cli:
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    return Cli(workdir, {**_environment(), **env})


#: Every command an operator runs behind a pooler, in order, on an empty database.
COMMANDS: Sequence[tuple[str, ...]] = (
    ("migrate",),
    ("status",),
    ("lost",),
    ("lost", "--take"),
    ("purge",),
    ("order", str(EXAMPLE)),
)


@contextlib.asynccontextmanager
async def _busy_servers(url: str, clients: int = TRANSACTION_POOL_SIZE + 1) -> AsyncIterator[None]:
    """Other clients keep pgbouncer's server connections busy meanwhile, so that consecutive
    transactions of the command under test land on different server connections."""
    dsn = _asyncpg_dsn(url)
    conns = [await asyncpg.connect(dsn, statement_cache_size=0, timeout=10) for _ in range(clients)]
    stop = asyncio.Event()

    async def load(conn: asyncpg.Connection) -> None:
        while not stop.is_set():
            await conn.execute("SELECT pg_sleep(0.005)")
            await asyncio.sleep(0.002)

    tasks = [asyncio.create_task(load(conn)) for conn in conns]
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in conns:
            await conn.close()


def _assert_clean(result: Result, command: Sequence[str], run: int) -> None:
    """Exit code 0 and no error on stderr."""
    what = f"`ordering-sql {' '.join(command)}` (run {run})"
    assert result.code == 0, f"{what} exited with {result.code}: {result.stderr}"
    assert not result.error_lines, f"{what}: {result.error_lines}"
    assert "Traceback" not in result.stderr, f"{what}: {result.stderr}"
    assert "prepared statement" not in result.stderr + result.stdout, f"{what}: {result.stderr}"


async def _revision(url: str) -> str | None:
    conn = await asyncpg.connect(_asyncpg_dsn(url), timeout=10)
    try:
        found = await conn.fetchval("SELECT version_num FROM ordering_sql_version")
        return None if found is None else str(found)
    finally:
        await conn.close()


@pytest.mark.postgres
async def test_cli_through_pgbouncer_with_the_pooler_setting_runs_every_command_cleanly(
    bouncer: PgBouncer,
    empty_bouncer_url: str,
    empty_postgres_url: str,
    pool_mode: PoolMode,
    tmp_path: Path,
) -> None:
    """With ``ORDERING_SQL_POOLER`` set to pgbouncer's mode: ``migrate`` on an empty database,
    then ``status``, ``lost``, ``lost --take``, ``purge`` and ``order``, each run twice (named
    prepared statements left on the server connections by the first run would collide with the
    second's), while other clients keep the server connections busy. Each exits 0, no error."""
    from ordering_sql.migration import head_revision

    cli = _cli(tmp_path, **{ENV_POOLER: pool_mode})
    url = ("--database-url", empty_bouncer_url)
    results: dict[tuple[str, ...], list[Result]] = {}
    async with _busy_servers(empty_bouncer_url):
        for command in COMMANDS:
            for run in (1, 2):
                result = await cli(*command, *url)
                _assert_clean(result, command, run)
                results.setdefault(command, []).append(result)
        final = await cli("status", "--json", *url)
    _assert_clean(final, ("status", "--json"), 3)

    assert await _revision(empty_postgres_url) == head_revision()  # looked at directly
    for result in results[("migrate",)]:
        assert f"is at revision {head_revision()}" in result.stderr
    first, second = results[("order", str(EXAMPLE))]
    assert len(first.stdout.splitlines()) == 8, first  # 9 lines, one of them a duplicate
    assert "emitted 8" in first.stderr_lines[-1], first.stderr
    assert second.stdout == "", second  # every event was seen by the first run
    assert "duplicates 9" in second.stderr_lines[-1], second.stderr
    scopes = {row["scope"]: row for row in json.loads(final.stdout)}
    assert scopes["default"]["seen"] == 8, scopes
    assert (scopes["default"]["parked"], scopes["default"]["processing"]) == (0, 0), scopes


# -- 4. controls: without the setting, transaction pooling breaks ---------------------------------
#
# These show that the tests above would catch the fault: the same pgbouncer in transaction mode,
# without ORDERING_SQL_POOLER, makes named prepared statements go missing or collide.


def _prepared_statement_error(text: str) -> bool:
    return "prepared statement" in text and any(e in text for e in PREPARED_STATEMENT_ERRORS)


@pytest.mark.postgres
@pytest.mark.parametrize("pool_mode", ["transaction"])
async def test_control_without_the_setting_the_cli_fails_behind_a_transaction_pooler(
    bouncer: PgBouncer, bouncer_url: str, tmp_path: Path
) -> None:
    """CONTROL. Without ``ORDERING_SQL_POOLER`` the commands use named prepared statements,
    which transaction pooling breaks; then, on the same pgbouncer and the same server
    connections (with the first runs' statements still on them), the setting makes them work.
    On a migrated database, so that a failed ``migrate`` leaves nothing else to fail."""
    url = ("--database-url", bouncer_url)
    runs: Sequence[tuple[str, ...]] = (
        ("migrate",),
        ("migrate",),
        ("status",),
        ("status",),
        ("lost",),
        ("purge",),
    )
    without = _cli(tmp_path)
    outcomes: list[tuple[tuple[str, ...], Result]] = []
    async with _busy_servers(bouncer_url):
        for command in runs:
            outcomes.append((command, await without(*command, *url)))
    failed = [(command, result) for command, result in outcomes if result.code != 0]
    print(
        "\ncontrol (no setting): "
        + "; ".join(
            f"{' '.join(c)}: {r.code} {r.error_lines[-1] if r.error_lines else ''}"
            for c, r in outcomes
        )
    )
    assert failed, "without the setting every command worked behind the transaction pooler"
    for command, result in failed:
        assert result.code == 1, (command, result)
        assert "Traceback" not in result.stderr, (command, result.stderr)
        assert len(result.error_lines) == 1, (command, result.stderr)
        assert _prepared_statement_error(result.error_lines[0]), (command, result.stderr)

    with_setting = _cli(tmp_path, **{ENV_POOLER: "transaction"})
    async with _busy_servers(bouncer_url):
        for command in runs:
            _assert_clean(await with_setting(*command, *url), command, 1)


async def _concurrent_units(url: str, workers: int = 8, rounds: int = 30) -> list[str]:
    """``workers`` instances on one engine at once, each looking up and recording events in
    ``rounds`` rounds; the errors they met (a worker stops at its first)."""
    orderings: list[CausalOrdering[ReceivedEvent]] = [
        CausalOrdering("control", database_url=url) for _ in range(workers)
    ]
    errors: list[str] = []

    async def work(ordering: CausalOrdering[ReceivedEvent]) -> None:
        for _ in range(rounds):
            event = make_event()
            try:
                if not await ordering.event_has_been_seen(event):
                    await ordering.record_event_as_seen(event)
            except StoreError as exc:
                errors.append(str(exc))
                return

    try:
        await processes.bounded(asyncio.gather(*(work(o) for o in orderings)), 60)
    finally:
        for ordering in orderings:
            await ordering.close()
        await dispose_engines()  # the next run builds its engine from the settings anew
    return errors


@pytest.mark.postgres
@pytest.mark.parametrize("pool_mode", ["transaction"])
@pytest.mark.parametrize("path", ["direct", "sqlalchemy"])
async def test_control_without_the_setting_concurrent_units_fail_behind_a_transaction_pooler(
    bouncer: PgBouncer, bouncer_url: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CONTROL. Eight instances at once through the transaction pooler: without the setting
    their units fail on missing or colliding prepared statements (on the direct path and through
    SQLAlchemy); with ``ORDERING_SQL_POOLER=transaction``, on the same pgbouncer, none does."""
    if path == "sqlalchemy":
        monkeypatch.setenv(ENV_DIRECT_DRIVER, "0")
    without = await _concurrent_units(bouncer_url)
    print(f"\ncontrol ({path}, no setting): {len(without)} of 8 workers failed; {without[:1]}")
    assert without, "without the setting no unit failed behind the transaction pooler"
    assert all(_prepared_statement_error(message) for message in without), without

    monkeypatch.setenv(ENV_POOLER, "transaction")
    assert await _concurrent_units(bouncer_url) == []
