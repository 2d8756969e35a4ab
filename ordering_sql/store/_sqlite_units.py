"""Where the SQLite steps run: sqlite3 connections in threads of their own, or SQLAlchemy's.

A step's unit (``sqlite.Connection.unit``) is one function of a cursor, run from its ``BEGIN``
to its ``COMMIT`` in one hop to the thread of its connection (``ThreadConnection``). A host
application's engine and a ``:memory:`` database go through SQLAlchemy's connections instead
(``_EngineUnits``), which take one more hop per statement.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, nullcontext
from typing import Any, Final, TypeVar

from sqlalchemy import Connection as SyncConnection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ordering_sql.settings import Settings
from ordering_sql.store.sqlite import Connection, Cursor, Params

__all__ = ["READ_ONLY", "SqliteUnits", "ThreadConnection", "ThreadConnections"]

T = TypeVar("T")

#: Execution option marking a SQLAlchemy connection that only reads: it takes no write lock.
READ_ONLY: Final = "ordering_sql_read_only"


class _Recording:
    """A cursor over a sqlite3 connection that records the SQL it runs (for ``Store.observe``)."""

    __slots__ = ("_conn", "sent")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.sent: list[str] = []

    def rows(self, sql: str, params: Params = {}) -> list[tuple[Any, ...]]:  # noqa: B006
        self.sent.append(sql)
        return self._conn.execute(sql, params).fetchall()

    def run(self, sql: str, params: Params = {}) -> int:  # noqa: B006
        self.sent.append(sql)
        return self._conn.execute(sql, params).rowcount


class ThreadConnection:
    """A sqlite3 connection that lives in a thread of its own: every call runs there, in turn.

    Why it is safe: sqlite3 connections may not be used from two threads at once; this one is
    used only from its single worker thread (it is even made there), and a unit runs there from
    its ``BEGIN`` to its ``COMMIT`` or ``ROLLBACK`` without interruption, so no other unit's
    statement can interleave with it.
    """

    def __init__(
        self,
        database: str,
        *,
        uri: bool,
        timeout: float,
        pragmas: Sequence[str],
        listeners: Sequence[Callable[[str], None]],
        echo: logging.Logger | None = None,
    ) -> None:
        self._database = database
        self._echo = echo
        self._uri = uri
        self._timeout = timeout
        self._pragmas = tuple(pragmas)
        self._listeners = listeners
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ordering-sql-sqlite")
        self._conn: sqlite3.Connection | None = None

    async def unit(self, fn: Callable[[Cursor], T], *, write: bool) -> T:
        """Run ``fn`` in one transaction: ``BEGIN IMMEDIATE`` (takes the write lock up front,
        waiting up to the busy timeout) for a write, ``BEGIN`` (one snapshot) for a read."""
        cursor, result = await self._call(lambda conn: _in_transaction(conn, fn, write=write))
        for sql in cursor.sent:
            for listener in self._listeners:
                listener(sql)
            if self._echo is not None:
                self._echo.info("[direct] %s", sql)
        return result

    async def close(self) -> None:
        try:
            await self._call(lambda conn: conn.close())
        finally:
            self._thread.shutdown(wait=False)

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._in_thread, fn)

    def _in_thread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            conn = sqlite3.connect(
                self._database, timeout=self._timeout, uri=self._uri, isolation_level=None
            )
            for pragma in self._pragmas:
                conn.execute(pragma)
            self._conn = conn
        return fn(self._conn)


def _in_transaction(
    conn: sqlite3.Connection, fn: Callable[[Cursor], T], *, write: bool
) -> tuple[_Recording, T]:
    cursor = _Recording(conn)
    cursor.run("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        result = fn(cursor)
        cursor.run("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return cursor, result


class ThreadConnections:
    """Up to ``size`` ``ThreadConnection``s to one database, each serving one unit at a time;
    a ``:memory:`` database is one connection (it exists once per connection)."""

    def __init__(self, make: Callable[[], ThreadConnection], *, size: int) -> None:
        self._make = make
        self._size = size
        self._made: list[ThreadConnection] = []
        self._idle: asyncio.Queue[ThreadConnection] | None = None

    async def unit(self, fn: Callable[[Cursor], T], *, write: bool) -> T:
        if self._idle is None:
            self._idle = asyncio.Queue()
        if self._idle.empty() and len(self._made) < self._size:
            self._made.append(self._make())
            self._idle.put_nowait(self._made[-1])
        conn = await self._idle.get()
        try:
            return await conn.unit(fn, write=write)
        finally:
            self._idle.put_nowait(conn)

    async def close(self) -> None:
        made, self._made = self._made, []
        for conn in made:
            await conn.close()


class _TakingTurns:
    """This process's own thread connections; write units take their turn first (see
    ``SqliteUnits``), reads go straight to a connection of their own (WAL: never blocked)."""

    def __init__(self, connections: ThreadConnections, turns: asyncio.Lock) -> None:
        self._connections = connections
        self._turns = turns

    async def unit(self, fn: Callable[[Cursor], T], *, write: bool) -> T:
        if not write:
            return await self._connections.unit(fn, write=False)
        async with self._turns:
            return await self._connections.unit(fn, write=True)


class _SqlAlchemyCursor:
    """A cursor over SQLAlchemy's sync connection (inside ``run_sync``)."""

    __slots__ = ("_conn",)

    def __init__(self, conn: SyncConnection) -> None:
        self._conn = conn

    def rows(self, sql: str, params: Params = {}) -> list[tuple[Any, ...]]:  # noqa: B006
        return [tuple(row) for row in self._conn.exec_driver_sql(sql, dict(params)).all()]

    def run(self, sql: str, params: Params = {}) -> int:  # noqa: B006
        return int(self._conn.exec_driver_sql(sql, dict(params)).rowcount)


class _EngineUnits:
    """Units on SQLAlchemy's connections: for a host application's engine, and for a
    ``:memory:`` database (which exists on the engine's one connection only).

    Why the turn is safe to hold across the unit: a unit never waits for another unit of the
    same engine while it holds it (nothing nests). On one shared connection every unit takes
    its turn, reads too: a unit ending on it (a read's rollback as its connection goes back to
    the pool) would end any other unit's transaction as well.
    """

    def __init__(self, engine: AsyncEngine, turns: asyncio.Lock, *, alone: bool) -> None:
        self._engine = engine
        self._turns = turns
        self._alone = alone

    async def unit(self, fn: Callable[[Cursor], T], *, write: bool) -> T:
        if write or self._alone:
            async with self._turns:
                return await self._unit(fn, write=write)
        return await self._unit(fn, write=write)

    async def _unit(self, fn: Callable[[Cursor], T], *, write: bool) -> T:
        async with self._engine.connect() as conn:
            if not write:
                conn = await conn.execution_options(**{READ_ONLY: True})
            async with conn.begin():  # BEGIN IMMEDIATE, by the engine's hook, for a write
                return await conn.run_sync(lambda sync: fn(_SqlAlchemyCursor(sync)))


class _JoinedUnits:
    """Units inside the caller's own transaction on its SQLAlchemy connection: no BEGIN or
    COMMIT of their own, and no turn (the caller's transaction already holds what it holds)."""

    __slots__ = ("_conn",)

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def unit(self, fn: Callable[[Cursor], T], *, write: bool) -> T:
        return await self._conn.run_sync(lambda sync: fn(_SqlAlchemyCursor(sync)))


class SqliteUnits:
    """Where the SQLite steps run: this process's own thread connections to the database file
    (one hop per unit), or, for a host's engine and for ``:memory:``, SQLAlchemy's connections.

    This process's writers queue for their turn (``turns``, one per engine) instead of meeting
    at SQLite's write lock, where a loser sleeps in SQLite's busy handler (milliseconds, growing)
    even after the lock is free; writers in other processes still meet there, and wait up to
    the busy timeout.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        *,
        owns_engine: bool,
        listeners: list[Callable[[str], None]],
        turns: asyncio.Lock,
    ) -> None:
        database = str(engine.url.database or "")
        alone = database in ("", ":memory:")
        self._engine, self._turns, self._alone = engine, turns, alone
        self._threads: ThreadConnections | None = None
        self._conn: Connection
        if owns_engine and not alone:
            pragmas = (
                # A reader leaves the journal as it is (switching it would write).
                *(() if settings.read_only else ("PRAGMA journal_mode=WAL",)),
                # FULL by default: a commit, and so an acknowledged parked follower, survives a
                # power loss or an OS crash; NORMAL survives only a crash of the process.
                f"PRAGMA synchronous={settings.sqlite_synchronous}",
                "PRAGMA foreign_keys=ON",
            )
            # ``ORDERING_SQL_ECHO``: log the statements where SQLAlchemy logs its own.
            echo = logging.getLogger("sqlalchemy.engine.Engine") if engine.echo else None

            def make() -> ThreadConnection:
                return ThreadConnection(
                    database,
                    uri=database.startswith("file:"),
                    timeout=settings.busy_timeout_s,
                    pragmas=pragmas,
                    listeners=listeners,
                    echo=echo,
                )

            self._threads = ThreadConnections(make, size=settings.pool_size)
            self._conn = _TakingTurns(self._threads, turns)
        else:
            self._conn = _EngineUnits(engine, turns, alone=alone)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """What a step runs on: each ``unit`` it runs gets a connection of its own."""
        yield self._conn

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction (BEGIN IMMEDIATE, by the engine's hook): it holds SQLite's one
        write lock from its start to its end, so every other writer of the file waits for it
        (up to the busy timeout). A memory database has one connection, shared by every unit:
        the transaction then takes this process's turn, so no unit runs on it meanwhile."""
        async with (
            self._turns if self._alone else nullcontext(),
            self._engine.connect() as conn,
            conn.begin(),
        ):
            yield conn

    def joining(self, conn: AsyncConnection) -> Connection:
        """The steps' connection on ``conn``, inside the transaction its caller began: the
        statements run there and commit or roll back with the caller's own work."""
        return _JoinedUnits(conn)

    async def close(self) -> None:
        if self._threads is not None:
            await self._threads.close()
