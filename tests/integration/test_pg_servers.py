"""The test servers of ``tests/pg_servers.py`` work: a throwaway Postgres cluster starts,
survives fast and immediate restarts and leaves nothing behind; a pgbouncer forwards queries and,
in transaction mode, breaks asyncpg's named prepared statements as pgbouncer fleets do.

Without the server binaries these tests skip with a reason; under ``CI=true`` they fail.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import IN_CI
from tests.pg_servers import (
    PgBouncer,
    PoolMode,
    ServerError,
    ShutdownMode,
    ThrowawayPostgres,
    port_is_open,
    process_is_running,
)

pytestmark = pytest.mark.postgres


def _require(reason: str | None) -> None:
    """Skip (fail under CI=true) when a server program is missing."""
    if reason is None:
        return
    if IN_CI:
        pytest.fail(f"CI=true, but {reason}")
    pytest.skip(reason)


@pytest.fixture
def postgres_binaries() -> None:
    _require(ThrowawayPostgres.unavailable_reason())


@pytest.fixture
def cluster(postgres_binaries: None) -> Iterator[ThrowawayPostgres]:
    """A throwaway cluster of the test's own, which it may restart."""
    with ThrowawayPostgres() as server:
        yield server


@pytest.fixture
def pgbouncer_program() -> None:
    _require(PgBouncer.unavailable_reason())


@pytest.fixture(scope="module")
def upstream() -> Iterator[ThrowawayPostgres]:
    """One throwaway cluster behind the pgbouncer tests that do not restart it."""
    _require(ThrowawayPostgres.unavailable_reason())
    _require(PgBouncer.unavailable_reason())
    with ThrowawayPostgres() as server:
        yield server


def _gone(directory: Path, port: int, pid: int) -> bool:
    """No directory, nothing listening on the port, no process with the pid."""
    return not directory.exists() and not port_is_open(port) and not process_is_running(pid)


async def _connect(url: str, **kwargs: object) -> asyncpg.Connection:
    return await asyncpg.connect(url, timeout=10, **kwargs)


# -- ThrowawayPostgres --------------------------------------------------------------------------


async def test_cluster_accepts_connections_and_is_gone_after_close(
    postgres_binaries: None,
) -> None:
    server = ThrowawayPostgres()
    try:
        await asyncio.to_thread(server.start)
        assert server.running
        directory, port, pid = server.directory, server.port, server.pid
        assert pid is not None
        assert server.url("test") == f"postgresql+asyncpg://postgres@127.0.0.1:{port}/test"

        conn = await _connect(server.url(driver="postgresql"))
        try:
            assert await conn.fetchval("SELECT current_user") == "postgres"
            assert await conn.fetchval("SELECT inet_server_port()") == port
            assert await conn.fetchval("SHOW listen_addresses") == "127.0.0.1"
            assert await conn.fetchval("SHOW unix_socket_directories") == str(directory / "run")
            assert await conn.fetchval("SHOW server_encoding") == "UTF8"
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(server.close)

    assert not server.running
    assert _gone(directory, port, pid)
    server.close()  # a second close does nothing


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_cluster_survives_a_restart(cluster: ThrowawayPostgres, mode: ShutdownMode) -> None:
    port = cluster.port
    before = await _connect(cluster.url(driver="postgresql"))
    try:
        await before.execute("CREATE TABLE kept (n int)")
        await before.execute("INSERT INTO kept VALUES (1)")
        old_pid = cluster.pid

        await asyncio.to_thread(cluster.restart, mode)

        with pytest.raises((asyncpg.InterfaceError, asyncpg.PostgresError)):
            await before.fetchval("SELECT 1")
        assert before.is_closed()
    finally:
        before.terminate()

    assert cluster.port == port
    assert cluster.pid not in (None, old_pid)
    after = await _connect(cluster.url(driver="postgresql"))
    try:
        assert await after.fetchval("SELECT n FROM kept") == 1  # committed survives a crash too
    finally:
        await after.close()
    if mode == "immediate":
        assert "automatic recovery in progress" in cluster.log_path.read_text()


def test_cluster_is_removed_when_the_with_block_raises(postgres_binaries: None) -> None:
    seen: list[tuple[Path, int, int | None]] = []

    def failing_test() -> None:
        with ThrowawayPostgres() as server:
            seen.append((server.directory, server.port, server.pid))
            msg = "the test failed"
            raise RuntimeError(msg)

    with pytest.raises(RuntimeError, match="the test failed"):
        failing_test()
    [(directory, port, pid)] = seen
    assert pid is not None
    assert _gone(directory, port, pid)


def test_a_cluster_nobody_closed_is_removed_when_collected(postgres_binaries: None) -> None:
    server = ThrowawayPostgres()
    server.start()
    directory, port, pid = server.directory, server.port, server.pid
    assert pid is not None
    del server
    gc.collect()
    assert _gone(directory, port, pid)


def test_a_failed_start_reports_the_log_and_cleans_up(postgres_binaries: None) -> None:
    server = ThrowawayPostgres(settings={"shared_buffers": "a lot"})
    try:
        with pytest.raises(ServerError, match="pg_ctl start failed") as info:
            server.start()
        directory = server.directory
    finally:
        server.close()
    message = str(info.value)
    assert "last lines of" in message
    assert 'invalid value for parameter "shared_buffers"' in message
    assert not directory.exists()


# -- PgBouncer ----------------------------------------------------------------------------------


async def _two_transactions_while_the_first_server_is_busy(
    bouncer: PgBouncer, **connect_kwargs: object
) -> tuple[list[int], list[int]]:
    """Client A runs one parameterised query in each of two transactions; between them client
    B holds the server connection A had, so that a pooler in transaction mode gives A's second
    transaction another server connection. Returns A's results and its server pids."""
    url = bouncer.url(driver="postgresql")
    a = await _connect(url, **connect_kwargs)
    b = await _connect(url)
    try:
        results: list[int] = []
        backends: list[int] = []
        for n in (1, 2):
            if n == 2:
                await b.execute("BEGIN")
                await b.execute("SELECT 1")
            async with a.transaction():
                results.append(await a.fetchval("SELECT $1::int * 10", n))
                backends.append(await a.fetchval("SELECT pg_backend_pid()"))
        await b.execute("ROLLBACK")
        return results, backends
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
async def test_pgbouncer_forwards_queries(upstream: ThrowawayPostgres, pool_mode: PoolMode) -> None:
    with PgBouncer(upstream.port, pool_mode=pool_mode) as bouncer:
        assert bouncer.port != upstream.port
        conn = await _connect(bouncer.url("postgres", driver="postgresql"))
        try:
            assert await conn.fetchval("SELECT inet_server_port()") == upstream.port
            assert await conn.fetchval("SELECT current_database()") == "postgres"
        finally:
            await conn.close()


async def test_transaction_mode_breaks_named_prepared_statements(
    upstream: ThrowawayPostgres,
) -> None:
    with PgBouncer(upstream.port, pool_mode="transaction") as bouncer:
        with pytest.raises(
            asyncpg.InvalidSQLStatementNameError,
            match=r'prepared statement "__asyncpg_stmt_\w+__" does not exist',
        ):
            await _two_transactions_while_the_first_server_is_busy(bouncer)

        results, backends = await _two_transactions_while_the_first_server_is_busy(
            bouncer, statement_cache_size=0
        )
    assert results == [10, 20]
    assert backends[0] != backends[1]  # the second transaction ran on another server connection


@pytest.mark.parametrize("statement_cache_size", [100, 0])
async def test_session_mode_keeps_prepared_statements(
    upstream: ThrowawayPostgres, statement_cache_size: int
) -> None:
    with PgBouncer(upstream.port, pool_mode="session") as bouncer:
        results, backends = await _two_transactions_while_the_first_server_is_busy(
            bouncer, statement_cache_size=statement_cache_size
        )
    assert results == [10, 20]
    assert backends[0] == backends[1]


@pytest.mark.slow
async def test_pgbouncer_clients_outlive_an_upstream_restart(
    cluster: ThrowawayPostgres, pgbouncer_program: None
) -> None:
    with PgBouncer(cluster.port, pool_mode="transaction") as bouncer:
        url = bouncer.url(driver="postgresql")
        kept = await _connect(url, statement_cache_size=0)
        try:
            old_backend = await kept.fetchval("SELECT pg_backend_pid()")

            await asyncio.to_thread(cluster.restart, "fast")

            # The client's connection is to pgbouncer, which drops the dead server connection
            # and logs in again for the next transaction.
            assert await kept.fetchval("SELECT pg_backend_pid()") != old_backend
            fresh = await _connect(url)
            try:
                assert await fresh.fetchval("SELECT 1") == 1
            finally:
                await fresh.close()
        finally:
            await kept.close()


def test_pgbouncer_is_gone_after_close(upstream: ThrowawayPostgres) -> None:
    bouncer = PgBouncer(upstream.port)
    try:
        bouncer.start()
        directory, port, pid = bouncer.directory, bouncer.port, bouncer.pid
        assert pid is not None
        assert port_is_open(port)
    finally:
        bouncer.close()
    assert not bouncer.running
    assert _gone(directory, port, pid)
