"""What differs between SQLite and Postgres around the steps: one class per backend.

Each backend's statements and the connections they run on are in its own module
(``store/postgres.py``, ``store/sqlite.py``); here is the rest of what differs: how an engine
is set up (pool, connection hooks, transaction start), how concurrent migrations are
serialised, how the database's clock is read, what can be known to fail before connecting,
and how a driver error is classified. The Store asks; it never checks which backend it has.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import os
import sqlite3
import weakref
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Final, Protocol
from uuid import UUID

import asyncpg
from sqlalchemy import (
    Connection,
    Engine,
    bindparam,
    event,
    func,
    select,
)
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ordering_sql._backends import BACKENDS
from ordering_sql.settings import Settings
from ordering_sql.store._clock import host_time, process_time
from ordering_sql.store._driver import DRIVER_ERRORS, PostgresUnits
from ordering_sql.store._sqlite_units import READ_ONLY, SqliteUnits
from ordering_sql.store._steps import Steps
from ordering_sql.store.postgres import PostgresSteps
from ordering_sql.store.sqlite import SqliteSteps

__all__ = ["Dialect", "Failure", "dialect_for"]


class Units(Protocol):
    """Where a backend's steps run: ``connection()`` gives what its steps take."""

    def connection(self) -> AbstractAsyncContextManager[Any]: ...

    def joining(self, conn: AsyncConnection) -> Any:
        """What the steps take, on a caller's connection inside the caller's transaction."""

    def transaction(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A connection of the engine's in a write transaction that ``joining`` steps may run
        in, committed when the block ends and rolled back if it raises."""

    async def close(self) -> None: ...


class UnitsFactory(Protocol):
    """Builds a backend's ``Units`` for a Store on ``engine``."""

    def __call__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        *,
        owns_engine: bool,
        listeners: list[Callable[[str], None]],
        turns: asyncio.Lock,
    ) -> Units: ...


class Failure(enum.Enum):
    """What a database error means for the caller."""

    RETRYABLE = "retryable"  # try the same transaction again: lock timeout, deadlock, dropped link
    UNAVAILABLE = "unavailable"  # cannot reach or log in to the database at all
    OTHER = "other"


class Dialect(Protocol):
    name: ClassVar[str]
    #: Whether a missing or old schema is migrated on first use instead of raising.
    migrates_on_first_use: ClassVar[bool]
    #: Whether the database admits one writer at a time (so a process queues its own writers).
    single_writer: ClassVar[bool]
    #: Whether a transaction's BEGIN is a statement SQLAlchemy executes (seen by its
    #: ``before_cursor_execute``), rather than something the driver sends by itself.
    begin_is_a_statement: ClassVar[bool]

    @property
    def steps(self) -> Steps:
        """The backend's steps (``store/_steps.Steps``)."""

    #: What its drivers raise besides SQLAlchemy's wrapped errors (the Store's error boundary).
    driver_errors: ClassVar[tuple[type[BaseException], ...]]

    def engine_url(self, url: URL, settings: Settings) -> URL:
        """The URL to create the engine with (``url``, or a form of it that ``settings`` need)."""

    def engine_options(self, url: URL, settings: Settings) -> dict[str, Any]:
        """Keyword arguments for ``create_async_engine``."""

    def configure(self, engine: AsyncEngine, settings: Settings, *, own: bool) -> None:
        """Install connection hooks on a new engine (once per engine); ``own``: the engine is
        ours, not a host application's (whose sessions keep their settings)."""

    def autocommit_options(self) -> dict[str, Any]:
        """Execution options for a connection whose statements each commit on their own."""

    #: Where the steps of a Store on an engine run (``listeners`` see every statement).
    units: ClassVar[UnitsFactory]

    async def serialize(self, conn: AsyncConnection, scope: str, key: UUID) -> None:
        """Serialise, until the transaction ends, every writer that calls this with (scope, key)."""

    def classify(self, exc: BaseException) -> Failure:
        """Sort a driver error into a ``Failure``."""

    def unreachable(self, url: URL, *, read_only: bool = False) -> str | None:
        """Why ``url`` cannot work, if that is known without connecting; else None. With
        ``read_only``, a database that would have to be created first cannot work either."""

    def one_connection(self, url: URL) -> bool:
        """Whether the database behind ``url`` lives on one connection that every unit shares."""

    async def read_clock(
        self, url: URL, connect: Callable[[], AbstractAsyncContextManager[Any]]
    ) -> datetime:
        """The database's current time, the clock every process shares (``store/_clock.py``);
        ``connect()`` opens a connection of ``units``, if the dialect needs one."""


class SqliteDialect:
    """SQLite through aiosqlite: one writer at a time, WAL so readers never block it.

    sqlite3 by default starts transactions lazily and only before DML, so a read-then-write
    transaction could start as a reader and fail with SQLITE_BUSY when it tries to write. Following
    SQLAlchemy's documented recipe, the driver's own transaction handling is switched off and every
    write transaction starts with ``BEGIN IMMEDIATE``, which takes the database's single write lock
    up front (waiting up to the busy timeout). Reads are single statements in autocommit mode.
    """

    name: ClassVar[str] = "sqlite"
    # An embedded file belongs to the application that opened it: set it up on first use.
    migrates_on_first_use: ClassVar[bool] = True
    single_writer: ClassVar[bool] = True
    begin_is_a_statement: ClassVar[bool] = True  # BEGIN IMMEDIATE, by ``_sqlite_on_begin``
    driver_errors: ClassVar[tuple[type[BaseException], ...]] = (sqlite3.Error,)

    @property
    def steps(self) -> SqliteSteps:
        return _SQLITE_STEPS

    units: ClassVar[UnitsFactory] = SqliteUnits

    def engine_url(self, url: URL, settings: Settings) -> URL:
        if not settings.read_only or self.one_connection(url) or _is_uri(url):
            return url
        # SQLite's read-only mode: no database is created, and nothing is written to one.
        path = Path(str(url.database)).expanduser().absolute()
        mode = "mode=ro"
        if not os.access(path.parent, os.W_OK) and not path.with_name(f"{path.name}-shm").exists():
            # A WAL database needs its -shm file, even to be read; where it cannot be made, the
            # file can only be read as immutable, which it is to a reader that cannot write.
            mode = "mode=ro&immutable=1"
        return url.set(database=f"file:{path.as_posix()}?{mode}", query={"uri": "true"})

    def engine_options(self, url: URL, settings: Settings) -> dict[str, Any]:
        # sqlite3's ``timeout`` is SQLite's busy timeout: how long to wait for the write lock.
        options: dict[str, Any] = {"connect_args": {"timeout": settings.busy_timeout_s}}
        if self.one_connection(url):
            # A memory database exists once per connection: keep exactly one connection.
            from sqlalchemy.pool import StaticPool

            options["poolclass"] = StaticPool
        else:
            options["pool_size"] = settings.pool_size
            options["max_overflow"] = settings.pool_size
        return options

    def configure(self, engine: AsyncEngine, settings: Settings, *, own: bool) -> None:
        sync_engine = engine.sync_engine
        if sync_engine in _configured:
            return
        _configured.add(sync_engine)
        pragmas = (
            # A reader leaves the journal as it is (switching it would write).
            *(() if settings.read_only else ("PRAGMA journal_mode=WAL",)),
            # FULL by default: a commit, and so an acknowledged parked follower, survives a
            # power loss or an OS crash; NORMAL survives only a crash of the process.
            f"PRAGMA synchronous={settings.sqlite_synchronous}",
            "PRAGMA foreign_keys=ON",
        )

        def on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # SQLAlchemy, not sqlite3, emits BEGIN
            cursor = dbapi_conn.cursor()
            for pragma in pragmas:
                cursor.execute(pragma)
            cursor.close()

        event.listen(sync_engine, "connect", on_connect)
        event.listen(sync_engine, "begin", _sqlite_on_begin)

    def autocommit_options(self) -> dict[str, Any]:
        return {READ_ONLY: True}  # used for reads only: writes take the write lock first

    async def serialize(self, conn: AsyncConnection, scope: str, key: UUID) -> None:
        # Nothing to do: the transaction began with BEGIN IMMEDIATE and holds SQLite's only write
        # lock, so no other writer can interleave with it.
        return None

    def unreachable(self, url: URL, *, read_only: bool = False) -> str | None:
        # Checked up front because a failed aiosqlite connect leaves its worker thread to
        # report to an event loop that may be gone by then.
        if self.one_connection(url) or url.database is None:
            return None
        database = url.database.removeprefix("file:").partition("?")[0]
        path = Path(database).expanduser().absolute()
        if read_only and not path.is_file():
            return f"the database file {str(path)!r} does not exist"
        if not path.parent.is_dir():
            return f"the directory {str(path.parent)!r} does not exist"
        return None

    def one_connection(self, url: URL) -> bool:
        return url.database in (None, "", ":memory:")

    async def read_clock(
        self, url: URL, connect: Callable[[], AbstractAsyncContextManager[Any]]
    ) -> datetime:
        # No connection needed: the shared clock is the kernel's, on the host of the file.
        database = url.database
        if database is None or self.one_connection(url) or _is_uri(url):
            # A memory database lives in this process only; a URI (read-only, say) is read
            # without writing the clock file beside it.
            return process_time()
        return host_time(database) or process_time()

    def classify(self, exc: BaseException) -> Failure:
        orig = exc.orig if isinstance(exc, DBAPIError) else exc
        if isinstance(orig, sqlite3.Error):
            name = getattr(orig, "sqlite_errorname", "")
            if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
                return Failure.RETRYABLE
            if name.startswith("SQLITE_CANTOPEN"):
                return Failure.UNAVAILABLE
        return Failure.OTHER


def _is_uri(url: URL) -> bool:
    """Whether a SQLite URL names its database as a ``file:`` URI."""
    return str(url.database or "").startswith("file:")


#: Engines whose connection hooks are installed already (a host's engine may be wrapped often).
_configured: weakref.WeakSet[Engine] = weakref.WeakSet()


def _sqlite_on_begin(conn: Connection) -> None:
    # Reads run as single autocommit statements (each one consistent on its own); every other
    # transaction takes the single write lock up front.
    if not conn.get_execution_options().get(READ_ONLY):
        conn.exec_driver_sql("BEGIN IMMEDIATE")


# SQLSTATE classes and codes (https://www.postgresql.org/docs/current/errcodes-appendix.html).
_PG_RETRYABLE: Final = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "55P03",  # lock_not_available
        "57P01",  # admin_shutdown (server restarting)
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now (server starting up)
    }
)
_PG_UNAVAILABLE: Final = frozenset(
    {
        "28000",  # invalid_authorization_specification
        "28P01",  # invalid_password
        "3D000",  # invalid_catalog_name: the database does not exist
    }
)


class PostgresDialect:
    """Postgres through asyncpg: row locks for leases, advisory locks to serialise parking."""

    name: ClassVar[str] = "postgresql"
    # A shared server's schema changes only when an operator runs `ordering-sql migrate`.
    migrates_on_first_use: ClassVar[bool] = False
    single_writer: ClassVar[bool] = False
    begin_is_a_statement: ClassVar[bool] = False  # asyncpg's transaction() sends it
    driver_errors: ClassVar[tuple[type[BaseException], ...]] = DRIVER_ERRORS

    @property
    def steps(self) -> PostgresSteps:
        return _POSTGRES_STEPS

    units: ClassVar[UnitsFactory] = PostgresUnits

    def engine_url(self, url: URL, settings: Settings) -> URL:
        return url

    def engine_options(self, url: URL, settings: Settings) -> dict[str, Any]:
        connect_args: dict[str, Any] = {"timeout": settings.connect_timeout_s}
        if settings.pooler == "transaction":
            # Behind a transaction pooler, consecutive transactions may run on different server
            # connections, so a named prepared statement made in one is missing in the next.
            # With both caches off, asyncpg prepares every statement unnamed, with its Parse and
            # its Execute in the same implicit transaction (one Sync), which a pooler keeps on
            # one server connection.
            connect_args.update(statement_cache_size=0, prepared_statement_cache_size=0)
        return {
            "pool_size": settings.pool_size,
            "max_overflow": settings.pool_size,
            # No pre-ping (it costs a round trip per checkout): a connection dropped by a database
            # restart fails its statement as "invalidated", SQLAlchemy then discards every pooled
            # connection older than it, and the Store retries the unit of work on a fresh one.
            "connect_args": connect_args,
        }

    def configure(self, engine: AsyncEngine, settings: Settings, *, own: bool) -> None:
        if not own or settings.pooler == "transaction":
            # A host's engine keeps its sessions as they are; a transaction pooler would not
            # carry a session setting (nor the plans) from one transaction to the next.
            return

        def on_connect(dbapi_conn: Any, _record: Any) -> None:
            # The steps bind their rows as arrays, whose lengths the planner would otherwise
            # plan each execution for anew (custom plans: ~0.1 ms each); one generic plan per
            # prepared statement serves every length (nested loops over the primary keys).
            # A SET after connecting, not a startup parameter: pgbouncer refuses startup
            # parameters it does not know, in every pool mode.
            dbapi_conn.run_async(lambda driver: driver.execute(_GENERIC_PLANS))

        event.listen(engine.sync_engine, "connect", on_connect)

    def autocommit_options(self) -> dict[str, Any]:
        return {"isolation_level": "AUTOCOMMIT"}

    async def serialize(self, conn: AsyncConnection, scope: str, key: UUID) -> None:
        # A transaction-scoped advisory lock: released at commit, locks nothing else.
        await conn.execute(_ADVISORY_LOCK, {"key": advisory_key(scope, key)})

    def unreachable(self, url: URL, *, read_only: bool = False) -> str | None:
        return None

    def one_connection(self, url: URL) -> bool:
        return False

    async def read_clock(
        self, url: URL, connect: Callable[[], AbstractAsyncContextManager[Any]]
    ) -> datetime:
        async with connect() as conn:
            # The server's current time (not the transaction's start, as ``now()`` would be).
            ((now,),) = await conn.fetch("SELECT clock_timestamp()")
        assert isinstance(now, datetime)
        return now

    def classify(self, exc: BaseException) -> Failure:
        if isinstance(exc, DBAPIError) and exc.connection_invalidated:
            return Failure.RETRYABLE
        orig = exc.orig if isinstance(exc, DBAPIError) else exc
        code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        if code in _PG_UNAVAILABLE:
            return Failure.UNAVAILABLE
        if code in _PG_RETRYABLE or (isinstance(code, str) and code.startswith("08")):
            return Failure.RETRYABLE  # class 08: connection exception
        # SQLAlchemy's asyncpg adapter raises DBAPI errors of its own, asyncpg's as the cause.
        root: BaseException = orig if orig is not None else exc
        while root.__cause__ is not None:
            root = root.__cause__
        if isinstance(
            root, OSError | TimeoutError | asyncpg.InterfaceError | asyncpg.InternalClientError
        ):
            # Refused, reset or closed while the server restarts; or a connection that an
            # earlier failure left mid-operation (it is discarded, the retry takes another).
            return Failure.RETRYABLE
        return Failure.OTHER


_SQLITE_STEPS: Final = SqliteSteps()
_POSTGRES_STEPS: Final = PostgresSteps()
_GENERIC_PLANS: Final = "SET plan_cache_mode = force_generic_plan"
_ADVISORY_LOCK: Final = select(func.pg_advisory_xact_lock(bindparam("key")))


def advisory_key(scope: str, key: UUID) -> int:
    """A stable signed 64-bit key for ``pg_advisory_xact_lock``."""
    digest = hashlib.blake2b(scope.encode() + key.bytes, digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


_DIALECTS: Final[dict[str, Dialect]] = {d.name: d for d in (SqliteDialect(), PostgresDialect())}
# One list of backends (``_backends.BACKENDS``): a dialect for each, and none besides.
assert set(_DIALECTS) == {backend.name for backend in BACKENDS}, "a backend without a dialect"


def dialect_for(name: str) -> Dialect:
    """The dialect for a SQLAlchemy dialect name (``engine.dialect.name``)."""
    return _DIALECTS[name]
