"""The database behind the engine: shared engines, short transactions, retries, error mapping.

A ``Store`` is one ``AsyncEngine`` (one connection pool) plus the dialect rules that go with it.
Every ``CausalOrdering`` on the same URL and event loop shares one Store; see ``acquire_store``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ordering_sql.errors import (
    DatabaseUnavailableError,
    OrderingError,
    SchemaNotReadyError,
    StoreError,
)
from ordering_sql.settings import Settings, mask_url
from ordering_sql.store._clock import DatabaseClock
from ordering_sql.store._dialects import Dialect, Failure, dialect_for
from ordering_sql.store._driver import DRIVER_ERRORS, Connection, DriverConnections
from ordering_sql.store._queries import Queries, params, queries_for

__all__ = ["Connection", "Store", "acquire_store", "dispose_engines", "release_store"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The engine's own purge of expired rows: how many rows at most, how often.
AUTO_PURGE_BATCH: Final = 5000
AUTO_PURGE_EVERY: Final = timedelta(minutes=1)
AUTO_PURGE_SOON: Final = timedelta(seconds=1)

#: How often one unit of work is tried when the database reports a transient fault.
MAX_ATTEMPTS: Final = 6
_BACKOFF_BASE_S: Final = 0.05
_BACKOFF_CAP_S: Final = 2.0


class _Mode(enum.Enum):
    READ = "read"  # autocommit reads
    TRANSACTION = "transaction"  # one write transaction (BEGIN IMMEDIATE on SQLite)
    STEP = "step"  # autocommit where steps are single statements, else a transaction


class _Transient(Exception):
    """Internal: a transient failure worth retrying (carries the original error)."""


class Store:
    """One database: its engine, its dialect rules, and its prepared statements.

    ``direct``: send the autocommit units to the driver directly where the dialect has such a
    path (see ``store/_driver.py``); ``keep``: how many driver connections that path holds
    between units of work (0 borrows one from the pool for each unit).
    """

    def __init__(
        self, engine: AsyncEngine, *, owns_engine: bool, direct: bool = True, keep: int = 0
    ) -> None:
        self.engine = engine
        self.owns_engine = owns_engine
        self.dialect: Dialect = dialect_for(engine.dialect.name)
        self.queries: Queries = queries_for(engine.dialect.name)
        self.url = mask_url(engine.url)
        self.disposed = False  # set by dispose(): instances then fetch a fresh shared Store
        #: Opened only to look (``Settings.read_only``): never created, never migrated.
        self.read_only = False
        self._ready = False
        self._ready_lock = asyncio.Lock()
        self._next_purge: datetime | None = None
        # On a single-writer database, this process's writers queue here instead of contending
        # for the database lock, where a loser sleeps in SQLite's busy handler (milliseconds,
        # growing) even after the lock is free. Writers in other processes still meet at the
        # database lock and wait up to the busy timeout. A Store belongs to one event loop; the
        # queue is the engine's, so every Store on one engine takes its turn in the same one.
        self._writers = _turns(engine) if self.dialect.single_writer else None
        # A database on one shared connection (SQLite ``:memory:``): a unit ending on it (a
        # read's rollback as its connection goes back to the pool, say) would end any other
        # unit's transaction too, so every unit takes its turn, reads and schema checks too.
        self._alone = self.dialect.one_connection(engine.url)
        self._autocommit_options = self.dialect.autocommit_options()
        direct = direct and engine.dialect.driver == self.dialect.direct_driver
        self._direct = DriverConnections(engine, keep=keep) if direct else None
        #: The database's clock, which every expiry decision is made on (``store/_clock.py``).
        self.clock = DatabaseClock(self._read_clock)
        #: What the database and its drivers raise: SQLAlchemy's wrapped errors, the driver's
        #: own (the direct path), and the DBAPI errors of SQLAlchemy's driver adapter, which
        #: reach us unwrapped where a pooled connection is opened (``raw_connection``).
        self._driver_errors: tuple[type[BaseException], ...] = (
            DBAPIError,
            OSError,
            TimeoutError,
            *DRIVER_ERRORS,
            engine.dialect.loaded_dbapi.Error,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        dialect = dialect_for(settings.url.get_backend_name())
        url = dialect.engine_url(settings.url, settings)
        engine = create_async_engine(
            url, echo=settings.echo, **dialect.engine_options(url, settings)
        )
        dialect.configure(engine, settings)
        store = cls(
            engine, owns_engine=True, direct=settings.direct_driver, keep=settings.pool_size
        )
        store.read_only = settings.read_only
        store.url = mask_url(settings.url)  # as given, not the engine's form of it
        return store

    @classmethod
    def from_engine(cls, engine: AsyncEngine, *, settings: Settings | None = None) -> Store:
        """Wrap a host application's engine; it is never disposed by us.

        ``settings``: those that apply to an engine made elsewhere (``direct_driver``,
        ``sqlite_synchronous``); by default from the environment (``Settings.for_host_engine``).
        """
        settings = settings or Settings.for_host_engine()
        store = cls(engine, owns_engine=False, direct=settings.direct_driver)
        store.dialect.configure(engine, settings)
        return store

    async def dispose(self) -> None:
        self.disposed = True
        if self._direct is not None:
            await self._direct.close()
        if self.owns_engine:
            await self.engine.dispose()

    # -- units of work -------------------------------------------------------------------------

    async def write(self, work: Callable[[Connection], Awaitable[T]], *, action: str) -> T:
        """Run ``work`` in one write transaction, retried as a whole on transient faults."""
        return await self._run(work, action=action, mode=_Mode.TRANSACTION)

    async def step(self, work: Callable[[Connection], Awaitable[T]], *, action: str) -> T:
        """Run ``work`` whose statements are each atomic on their own, retried on faults.

        Where the dialect makes every protocol step one statement (Postgres), ``work`` runs in
        autocommit: no BEGIN and COMMIT round trips. Elsewhere it runs in one transaction. A
        retried step must be harmless to repeat; each statement of the protocol is.
        """
        return await self._run(work, action=action, mode=_Mode.STEP)

    async def read(self, work: Callable[[Connection], Awaitable[T]], *, action: str) -> T:
        """Run ``work`` on a connection that only reads."""
        return await self._run(work, action=action, mode=_Mode.READ)

    async def now(self) -> datetime:
        """The database's current time: the clock leases, seen marks and claims expire on."""
        await self.ensure_ready()
        await self.clock.sync_if_due()
        return self.clock.now()

    async def _read_clock(self) -> datetime:
        async def attempt() -> datetime:
            return await self.dialect.read_clock(
                self.engine.url, lambda: self._connection(_Mode.READ)
            )

        return await self._retrying(attempt, action="read_clock")

    async def _run(
        self,
        work: Callable[[Connection], Awaitable[T]],
        *,
        action: str,
        mode: _Mode,
    ) -> T:
        await self.ensure_ready()
        # Before the unit: its work reads the clock (``clock.now()``) without awaiting.
        await self.clock.sync_if_due()

        async def attempt() -> T:
            async with self._turn(mode), self._connection(mode) as conn:
                return await work(conn)

        return await self._retrying(attempt, action=action)

    async def _retrying(
        self,
        attempt: Callable[[], Awaitable[T]],
        *,
        action: str,
        gives_up_as: type[StoreError] = StoreError,
        log_level: int = logging.WARNING,
    ) -> T:
        """Run ``attempt`` again, with jittered back-off, while it fails transiently.

        After ``MAX_ATTEMPTS`` the last fault is raised as ``gives_up_as``.
        """
        number = 1
        while True:
            try:
                return await attempt()
            except _Transient as transient:
                cause = transient.__cause__
                if number >= MAX_ATTEMPTS:
                    msg = (
                        f"Database {self.url!r} kept failing during {action} after {number} "
                        f"attempts: {_describe(cause)}"
                    )
                    if cause is not None and _could_not_connect(cause):
                        raise DatabaseUnavailableError(msg, url=self.url) from cause
                    raise gives_up_as(msg, url=self.url) from cause
                delay = min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2 ** (number - 1))
                delay *= 0.5 + random.random()  # jitter, so competing workers spread out
                logger.log(
                    log_level,
                    "transient database fault during %s (attempt %d of %d), retrying in %.2fs: %s",
                    action,
                    number,
                    MAX_ATTEMPTS,
                    delay,
                    _describe(cause),
                    extra={"action": action, "attempt": number},
                )
                await asyncio.sleep(delay)
                number += 1

    @asynccontextmanager
    async def _turn(self, mode: _Mode) -> AsyncIterator[None]:
        """Wait for this process's turn to use the database in ``mode``, where it has turns.

        Why holding an ``asyncio.Lock`` across the unit is safe: a unit never waits for another
        unit of the same engine while it holds it (nothing nests), so the queue cannot deadlock.
        """
        if self._writers is None or (mode is _Mode.READ and not self._alone):
            yield
            return
        async with self._writers:
            yield

    @asynccontextmanager
    async def _connection(self, mode: _Mode, *, direct: bool = True) -> AsyncIterator[Connection]:
        """A connection for one unit of work, with driver errors translated.

        Autocommit units go to the driver directly where the dialect allows it, unless
        ``direct`` is False (the unit needs SQLAlchemy's connection). This is the one boundary
        where driver exceptions become ordering-sql exceptions.
        """
        try:
            if direct and self._direct is not None and mode is not _Mode.TRANSACTION:
                # Both READ and STEP units are autocommit on a dialect with a direct driver.
                assert self.dialect.single_statement_steps
                async with self._direct.connection() as conn:
                    yield conn
            else:
                async with self._sqlalchemy_connection(mode) as sa_conn:
                    yield sa_conn
        except OrderingError:
            raise
        except self._driver_errors as exc:
            failure = self.dialect.classify(exc)
            if failure is Failure.RETRYABLE:
                raise _Transient from exc
            if failure is Failure.UNAVAILABLE or _is_connect_error(exc):
                msg = f"Cannot connect to database {self.url!r}: {_describe(exc)}"
                raise DatabaseUnavailableError(msg, url=self.url) from exc
            msg = f"Database {self.url!r} failed: {_describe(exc)}"
            raise StoreError(msg, url=self.url) from exc

    @asynccontextmanager
    async def _sqlalchemy_connection(self, mode: _Mode) -> AsyncIterator[AsyncConnection]:
        autocommit = mode is _Mode.READ or (
            mode is _Mode.STEP and self.dialect.single_statement_steps
        )
        async with self.engine.connect() as conn:
            if autocommit:
                # No BEGIN/COMMIT round trips: each statement is its own transaction.
                yield await conn.execution_options(**self._autocommit_options)
                return
            async with conn.begin():
                yield conn

    # -- schema readiness ----------------------------------------------------------------------

    async def ensure_ready(self, *, migrate: bool | None = None) -> None:
        """Check once per engine that the schema is at the revision this code expects.

        With ``migrate`` left at None, SQLite databases are migrated on first use (they are
        embedded and private to the application) and any other database must be migrated
        explicitly; ``migrate=True`` migrates any database this Store owns the engine of.
        Several processes migrating at once take turns (see ``_migrations.run_upgrade``).
        """
        if self._ready:
            return
        async with self._ready_lock:
            if self._ready:
                return
            self._check_reachable()
            from ordering_sql.store import _migrations  # imported late: it pulls in Alembic

            expected = _migrations.head_revision()
            current = await self._with_retries(self._current_revision)
            _refuse_a_newer_schema(self.url, current, expected)
            if migrate is None:
                migrate = self.dialect.migrates_on_first_use and not self.read_only
            if current != expected and migrate and self.owns_engine:
                logger.info("migrating database %s to %s", self.url, expected)
                await self.migrate()
                current = await self._with_retries(self._current_revision)
            if current != expected:
                raise _not_ready(self.url, current, expected)
            self._ready = True

    # -- housekeeping --------------------------------------------------------------------------

    async def purge_expired(self, now: datetime, *, limit: int) -> int:
        """Delete at most ``limit`` event rows whose marks all expired; how many went."""
        query, values = self.queries.purge_events, params(now=now, limit=limit)

        async def work(conn: Connection) -> int:
            return int((await conn.execute(query, values)).rowcount)

        return await self.step(work, action="purge")

    async def purge_if_due(self, now: datetime) -> None:
        """The engine's own purge: one bounded batch, at most once a minute per process.

        When a batch comes back full, the next one is due a second later instead, so the purge
        keeps up with a busy service (up to ``AUTO_PURGE_BATCH`` rows a second). Purging is
        housekeeping: a failure is logged and does not reach the caller.
        """
        if self._next_purge is not None and now < self._next_purge:
            return
        self._next_purge = now + AUTO_PURGE_EVERY  # set first: one purge at a time per Store
        try:
            deleted = await self.purge_expired(now, limit=AUTO_PURGE_BATCH)
        except OrderingError:
            logger.error(
                "automatic purge of expired rows failed", exc_info=True, extra={"action": "purge"}
            )
            return
        if deleted == AUTO_PURGE_BATCH:
            self._next_purge = now + AUTO_PURGE_SOON
        logger.debug("purged %d expired rows", deleted, extra={"action": "purge"})

    async def migrate(self, revision: str = "head") -> None:
        """Bring the schema to ``revision``, in one transaction (retrying transient faults)."""
        from ordering_sql.store import _migrations  # imported late: it pulls in Alembic

        async def serialize(conn: AsyncConnection) -> None:
            await self.dialect.serialize(conn, "ordering_sql", _migrations.MIGRATION_LOCK)

        async def attempt() -> None:
            async with self._turn(_Mode.TRANSACTION), self._connection(_Mode.TRANSACTION) as conn:
                assert isinstance(conn, AsyncConnection)  # transactions are SQLAlchemy's
                await _migrations.run_upgrade(conn, serialize, revision)

        self._check_reachable()
        current = await self._with_retries(self._current_revision)
        _refuse_a_newer_schema(self.url, current, _migrations.head_revision())
        await self._with_retries(attempt)
        self._ready = False

    def _check_reachable(self) -> None:
        reason = self.dialect.unreachable(self.engine.url, read_only=self.read_only)
        if reason is not None:
            msg = f"Cannot connect to database {self.url!r}: {reason}."
            raise DatabaseUnavailableError(msg, url=self.url)

    async def _current_revision(self) -> str | None:
        async with self._turn(_Mode.READ), self._connection(_Mode.READ, direct=False) as conn:
            assert isinstance(conn, AsyncConnection)
            from ordering_sql.store import _migrations  # imported late: it pulls in Alembic

            return await conn.run_sync(_migrations.read_revision)

    async def _with_retries(self, step: Callable[[], Awaitable[T]]) -> T:
        """Retries for schema checks and migrations: giving up means the database is away.

        Quiet (DEBUG) while retrying: what the caller sees is the one error at the end.
        """
        return await self._retrying(
            step,
            action="schema check",
            gives_up_as=DatabaseUnavailableError,
            log_level=logging.DEBUG,
        )


def _not_ready(url: str, current: str | None, expected: str) -> SchemaNotReadyError:
    state = "has no ordering-sql tables" if current is None else f"is at revision {current!r}"
    msg = (
        f"Database {url!r} {state}, but this version of ordering-sql needs revision "
        f"{expected!r}. Run `ordering-sql migrate --database-url {url}` "
        "or `await ordering_sql.migrate(url)`."
    )
    return SchemaNotReadyError(msg, url=url, current=current, expected=expected)


def _refuse_a_newer_schema(url: str, current: str | None, expected: str) -> None:
    """``SchemaNotReadyError`` if the database is at a revision this code does not know: a newer
    ordering-sql migrated it, and only upgrading ordering-sql can help."""
    from ordering_sql.store import _migrations  # imported late: it pulls in Alembic

    if current is None or _migrations.is_known_revision(current):
        return
    msg = (
        f"Database {url!r} is at revision {current!r}, which this version of ordering-sql "
        f"does not know (its newest is {expected!r}): a newer ordering-sql migrated it. "
        "Upgrade ordering-sql (`pip install --upgrade ordering-sql`) on this machine."
    )
    raise SchemaNotReadyError(msg, url=url, current=current, expected=expected)


def _is_connect_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError | TimeoutError | InterfaceError)


#: SQLSTATE of a server that refuses new sessions for now (starting up, shutting down).
_CANNOT_CONNECT_NOW: Final = "57P03"


def _could_not_connect(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it was raised from) means no session could be opened:
    a refused or timed-out connect, or a server that accepts no connections right now."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError | TimeoutError):
            return True
        if getattr(cause, "sqlstate", None) == _CANNOT_CONNECT_NOW:
            return True
        cause = cause.__cause__ or (cause.orig if isinstance(cause, DBAPIError) else None)
    return False


def _describe(exc: BaseException | None) -> str:
    """One line naming the root cause, without SQL text or parameters."""
    if exc is None:
        return "unknown error"
    root = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text_ = str(root).strip().splitlines()[0] if str(root).strip() else ""
    return f"{type(root).__name__}: {text_}" if text_ else type(root).__name__


# -- sharing engines -------------------------------------------------------------------------


@dataclass(eq=False)
class _Shared:
    store: Store
    users: int = 0


@dataclass(eq=False)
class _LoopStores:
    """The shared stores of one event loop."""

    stores: dict[str, _Shared] = field(default_factory=dict)
    sentinel: AsyncIterator[None] | None = None

    async def dispose_all(self) -> None:
        shared = list(self.stores.values())
        self.stores.clear()
        for item in shared:
            await item.store.dispose()


_engine_turns: weakref.WeakKeyDictionary[Engine, asyncio.Lock] = weakref.WeakKeyDictionary()


def _turns(engine: AsyncEngine) -> asyncio.Lock:
    """The queue of this process's units on ``engine`` (see ``Store._turn``)."""
    turns = _engine_turns.get(engine.sync_engine)
    if turns is None:
        turns = _engine_turns[engine.sync_engine] = asyncio.Lock()
    return turns


# Engines hold connections bound to the event loop that opened them, so sharing is per loop.
# Keyed weakly: when a loop is garbage-collected its entry goes too.
_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopStores] = (
    weakref.WeakKeyDictionary()
)


def _loop_stores() -> _LoopStores:
    loop = asyncio.get_running_loop()
    entry = _by_loop.get(loop)
    if entry is None:
        entry = _by_loop[loop] = _LoopStores()
    return entry


async def acquire_store(settings: Settings) -> Store:
    """The shared Store for ``settings.database_url`` on the running loop; counts one more user.

    Why this is safe without a lock: it runs on one event loop and never awaits between looking
    up and inserting the entry, so two coroutines cannot both create a Store for one URL.
    """
    entry = _loop_stores()
    key = settings.url.render_as_string(hide_password=False)
    shared = entry.stores.get(key)
    if shared is None:
        shared = entry.stores[key] = _Shared(Store.from_settings(settings))
        if entry.sentinel is None:
            entry.sentinel = sentinel = _dispose_at_shutdown(entry)
            await sentinel.__anext__()  # runs to the first ``yield`` without suspending
    shared.users += 1
    return shared.store


async def release_store(store: Store) -> None:
    """One user fewer; the last user of a shared Store disposes its engine."""
    entry = _by_loop.get(asyncio.get_running_loop())
    if entry is None:
        return
    for key, shared in list(entry.stores.items()):
        if shared.store is store:
            shared.users -= 1
            if shared.users <= 0:
                del entry.stores[key]
                await store.dispose()
            return


async def dispose_engines() -> None:
    """Dispose every engine shared on the running event loop (tests and short scripts)."""
    entry = _by_loop.get(asyncio.get_running_loop())
    if entry is None:
        return
    await entry.dispose_all()


async def _dispose_at_shutdown(entry: _LoopStores) -> AsyncIterator[None]:
    """Dispose this loop's engines when the loop shuts down.

    ``asyncio.run`` (and pytest-asyncio's runner) call ``loop.shutdown_asyncgens()`` before
    closing a loop: every async generator that has started and not finished is closed, while
    the loop still runs. This generator is started here and parked at its ``yield``; closing it
    runs its ``finally``, which disposes the engines. Without it, code that runs several loops
    in turn would leave pooled connections bound to a dead loop (and aiosqlite's worker
    threads, which are not daemons, would keep the process from exiting). The entry keeps the
    generator alive: the loop itself only holds async generators weakly.
    """
    try:
        yield
    finally:
        await entry.dispose_all()
