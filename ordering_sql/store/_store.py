"""``Store``: one database, its backend's steps and where they run, retries, error mapping."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from datetime import datetime, timedelta
from typing import Any, Final, TypeVar
from uuid import UUID

from sqlalchemy import Engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ordering_sql import telemetry
from ordering_sql.errors import (
    DatabaseUnavailableError,
    OrderingError,
    StoreError,
)
from ordering_sql.settings import Settings, mask_url
from ordering_sql.store._clock import DatabaseClock
from ordering_sql.store._dialects import Dialect, Failure, dialect_for
from ordering_sql.store._errors import (
    could_not_connect,
    describe,
    is_connect_error,
    not_ready,
    refuse_a_newer_schema,
)
from ordering_sql.store._merge import Merging
from ordering_sql.store._steps import (
    Claimed,
    Complete,
    Completed,
    Joined,
    Marks,
    Park,
    ReadMarks,
    Release,
    RenewClaims,
    Sweep,
    TakeLeases,
    Taken,
)

__all__ = ["Store"]

#: The action a step is logged as (retries, errors).
_ACTIONS: Final = {
    "take": "take_leases",
    "marks": "read_marks",
    "park": "park_followers",
    "complete": "complete_event",
    "release": "release_leases",
    "renew_claims": "renew_claims",
    "sweep": "get_lost_followers",
}

logger = logging.getLogger("ordering_sql.store")  # the package's name: log filters use it

T = TypeVar("T")

#: The engine's own purge of expired rows: how many rows at most, how often.
AUTO_PURGE_BATCH: Final = 5000
AUTO_PURGE_EVERY: Final = timedelta(minutes=1)
AUTO_PURGE_SOON: Final = timedelta(seconds=1)

#: How often one unit of work is tried when the database reports a transient fault.
MAX_ATTEMPTS: Final = 6
_BACKOFF_BASE_S: Final = 0.05
_BACKOFF_CAP_S: Final = 2.0


class _Transient(Exception):
    """Internal: a transient failure worth retrying (carries the original error)."""


class Store:
    """One database: its engine, its backend's steps and where they run, retries, errors.

    The engine asks for the protocol's steps (``take``, ``park``, ``complete``, ...: typed
    requests and results, ``store/_steps.py``); each runs on a connection of the backend's
    units (``store/postgres.py``, ``store/sqlite.py``), is retried as a whole on transient
    faults, and has its driver errors translated at one boundary (``_attempt``).
    """

    def __init__(self, engine: AsyncEngine, *, settings: Settings, owns_engine: bool) -> None:
        self.engine = engine
        self.owns_engine = owns_engine
        self.dialect: Dialect = dialect_for(engine.dialect.name)
        self.steps: Any = self.dialect.steps
        self.url = mask_url(engine.url)
        self.disposed = False  # set by dispose(): instances then fetch a fresh shared Store
        #: Opened only to look (``Settings.read_only``): never created, never migrated.
        self.read_only = settings.read_only
        self._ready = False
        self._ready_lock = asyncio.Lock()
        self._next_purge: datetime | None = None
        #: Called with the SQL of every statement sent, on every path (``observe``).
        self._listeners: list[Callable[[str], None]] = []
        self._units = self.dialect.units(
            engine,
            settings,
            owns_engine=owns_engine,
            listeners=self._listeners,
            turns=_turns(engine),
        )
        _observe_sqlalchemy(
            engine, self._listeners, report_begin=not self.dialect.begin_is_a_statement
        )
        self._autocommit_options = self.dialect.autocommit_options()
        #: The database's clock, which every expiry decision is made on (``store/_clock.py``).
        self.clock = DatabaseClock(self._read_clock)
        self._merging = Merging(self._run_merged)
        #: What the database and its drivers raise: SQLAlchemy's wrapped errors, the drivers'
        #: own (the direct paths), and the DBAPI errors of SQLAlchemy's driver adapter, which
        #: reach us unwrapped where a pooled connection is opened (``raw_connection``).
        self._driver_errors: tuple[type[BaseException], ...] = (
            DBAPIError,
            OSError,
            TimeoutError,
            *self.dialect.driver_errors,
            engine.dialect.loaded_dbapi.Error,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        dialect = dialect_for(settings.url.get_backend_name())
        url = dialect.engine_url(settings.url, settings)
        engine = create_async_engine(
            url, echo=settings.echo, **dialect.engine_options(url, settings)
        )
        dialect.configure(engine, settings, own=True)
        store = cls(engine, settings=settings, owns_engine=True)
        store.url = mask_url(settings.url)  # as given, not the engine's form of it
        return store

    @classmethod
    def from_engine(cls, engine: AsyncEngine, *, settings: Settings | None = None) -> Store:
        """Wrap a host application's engine; it is never disposed by us.

        ``settings``: those that apply to an engine made elsewhere (``direct_driver``,
        ``sqlite_synchronous``); by default from the environment (``Settings.for_host_engine``).
        """
        settings = settings or Settings.for_host_engine()
        store = cls(engine, settings=settings, owns_engine=False)
        store.dialect.configure(engine, settings, own=False)
        return store

    async def dispose(self) -> None:
        self.disposed = True
        await self._units.close()
        if self.owns_engine:
            await self.engine.dispose()

    @contextmanager
    def observe(self, listener: Callable[[str], None]) -> Iterator[None]:
        """Call ``listener`` with the SQL of every statement this Store sends while the block
        runs, on every path (SQLAlchemy's, asyncpg's own, SQLite's thread connections), BEGIN
        and COMMIT included: for tests that count round trips, and for instrumentation."""
        self._listeners.append(listener)
        try:
            yield
        finally:
            self._listeners.remove(listener)

    # -- the protocol's steps ------------------------------------------------------------------

    # Each takes the ``clock`` of the caller's times (None: the database's): only requests of
    # one clock are merged.

    async def take(self, request: TakeLeases, clock: object = None) -> Taken:
        """``_steps.TakeLeases``."""
        result: Taken = await self._call("take", request, clock)
        return result

    async def marks(self, request: ReadMarks, clock: object = None) -> dict[UUID, Marks]:
        """``_steps.ReadMarks``: the marks of the events that have a row."""
        result: dict[UUID, Marks] = await self._call("marks", request, clock)
        return result

    async def park(self, request: Park, clock: object = None) -> frozenset[UUID]:
        """``_steps.Park``: the ids stored."""
        result: frozenset[UUID] = await self._call("park", request, clock)
        return result

    async def complete(self, request: Complete, clock: object = None) -> Completed:
        """``_steps.Complete``."""
        result: Completed = await self._call("complete", request, clock)
        return result

    async def release(self, request: Release, clock: object = None) -> None:
        """``_steps.Release``."""
        await self._call("release", request, clock)

    async def renew_claims(self, request: RenewClaims, clock: object = None) -> int:
        """``_steps.RenewClaims``: how many claims were renewed."""
        result: int = await self._call("renew_claims", request, clock)
        return result

    async def sweep(self, request: Sweep, clock: object = None) -> list[Claimed]:
        """``_steps.Sweep``: the followers handed over."""
        result: list[Claimed] = await self._call("sweep", request, clock)
        return result

    def transaction(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A connection to this Store's database in a write transaction, for a caller's own
        work and ``joined`` steps together: committed when the block ends, rolled back if it
        raises (see the backend's ``Units.transaction`` for what holding it costs)."""
        return self._units.transaction()

    def joined(self, conn: AsyncConnection) -> Joined:
        """The steps on ``conn``, a connection to this Store's database inside a transaction
        its caller began: each step's writes commit or roll back with the caller's own work
        (``_steps.Joined``). Driver errors are the caller's to handle, as its own are."""
        return Joined(self.steps, self._units.joining(conn))

    async def _call(self, step: str, request: Any, clock: object) -> Any:
        """Run one request of ``step``, merged with concurrent ones (``store/_merge.py``) of
        the same clock, retried as a whole."""
        key = (self.steps.merge_key(step), None if clock is None else id(clock))
        began = time.perf_counter()
        try:
            return await self._merging.call(key, (step, request))
        finally:
            telemetry.step_took(step, request.scope, time.perf_counter() - began)

    async def _run_merged(self, key: Any, items: list[tuple[str, Any]]) -> list[Any]:
        action = _ACTIONS[items[0][0]]
        results: list[Any] = await self.run(
            lambda conn: self.steps.run_merged(conn, items), action=action
        )
        return results

    async def run(self, work: Callable[[Any], Awaitable[T]], *, action: str) -> T:
        """Run ``work(conn)`` on a connection of the backend's units, retried as a whole on
        transient faults (it must be harmless to repeat: every step is), errors translated."""
        await self.ensure_ready()
        # Before the unit: its work reads the clock (``clock.now()``) without awaiting.
        await self.clock.sync_if_due()
        return await self._retrying(lambda: self._attempt(work), action=action)

    async def _attempt(self, work: Callable[[Any], Awaitable[T]]) -> T:
        """One try of ``work``: the one boundary where driver errors become ours."""
        with self._translating():
            async with self._units.connection() as conn:
                return await work(conn)

    @contextmanager
    def _translating(self) -> Iterator[None]:
        """Driver errors become ordering-sql's: transient faults ``_Transient`` (retried),
        the others ``DatabaseUnavailableError`` or ``StoreError``."""
        try:
            yield
        except OrderingError:
            raise
        except self._driver_errors as exc:
            failure = self.dialect.classify(exc)
            if failure is Failure.RETRYABLE:
                raise _Transient from exc
            if failure is Failure.UNAVAILABLE or is_connect_error(exc):
                msg = f"Cannot connect to database {self.url!r}: {describe(exc)}"
                raise DatabaseUnavailableError(msg, url=self.url) from exc
            msg = f"Database {self.url!r} failed: {describe(exc)}"
            raise StoreError(msg, url=self.url) from exc

    # -- the rest of the API --------------------------------------------------------------------

    async def mark_seen(self, scope: str, event_ids: Sequence[UUID], seen_until: datetime) -> None:
        await self.run(
            lambda conn: self.steps.mark_seen(conn, scope, event_ids, seen_until),
            action="record_event_as_seen",
        )

    async def forget_followers(self, scope: str, follower_ids: Sequence[UUID]) -> None:
        await self.run(
            lambda conn: self.steps.forget_followers(conn, scope, follower_ids),
            action="forget_follower",
        )

    async def followers_of(self, scope: str, leader_id: UUID) -> list[str]:
        found: list[str] = await self.run(
            lambda conn: self.steps.followers_of(conn, scope, leader_id), action="get_followers"
        )
        return found

    async def followers_by_id(self, scope: str, follower_ids: Sequence[UUID]) -> list[str]:
        found: list[str] = await self.run(
            lambda conn: self.steps.followers_by_id(conn, scope, follower_ids),
            action="followers_by_id",
        )
        return found

    async def peek_lost(
        self, scope: str, *, now: datetime, horizon: datetime, seen_cutoff: datetime
    ) -> list[str]:
        found: list[str] = await self.run(
            lambda conn: self.steps.peek_lost(conn, scope, now, horizon, seen_cutoff),
            action="peek_lost",
        )
        return found

    async def clear(self, scope: str | None) -> None:
        """Forget everything of ``scope`` (None: of every scope)."""
        await self.run(lambda conn: self.steps.clear(conn, scope), action="clear")

    async def expired_counts(self, now: datetime) -> tuple[int, int]:
        """Rows a purge would delete: seen records, and leases never completed."""
        counts: tuple[int, int] = await self.run(
            lambda conn: self.steps.expired_counts(conn, now), action="purge_count"
        )
        return counts

    async def scope_counts(
        self, now: datetime, horizon: datetime
    ) -> tuple[list[Sequence[Any]], list[Sequence[Any]]]:
        """Counts per scope for ``ordering-sql status`` (see the backends' ``scope_counts``)."""
        counts: tuple[list[Sequence[Any]], list[Sequence[Any]]] = await self.run(
            lambda conn: self.steps.scope_counts(conn, now, horizon), action="status"
        )
        return counts

    async def now(self) -> datetime:
        """The database's current time: the clock leases, seen marks and claims expire on."""
        await self.ensure_ready()
        await self.clock.sync_if_due()
        return self.clock.now()

    async def _read_clock(self) -> datetime:
        async def attempt() -> datetime:
            async def read(conn: Any) -> datetime:
                return await self.dialect.read_clock(self.engine.url, _given(conn))

            return await self._attempt(read)

        return await self._retrying(attempt, action="read_clock")

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
                        f"attempts: {describe(cause)}"
                    )
                    if cause is not None and could_not_connect(cause):
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
                    describe(cause),
                    extra={"action": action, "attempt": number},
                )
                await asyncio.sleep(delay)
                number += 1

    @asynccontextmanager
    async def _sqlalchemy_connection(self, *, write: bool) -> AsyncIterator[AsyncConnection]:
        """SQLAlchemy's connection, for what is not a step: schema checks and migrations
        (one transaction, ``BEGIN IMMEDIATE`` on SQLite), with driver errors translated."""
        with self._translating():
            async with _turns(self.engine), self.engine.connect() as conn:
                if not write:
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
            refuse_a_newer_schema(self.url, current, expected)
            if migrate is None:
                migrate = self.dialect.migrates_on_first_use and not self.read_only
            if current != expected and migrate and self.owns_engine:
                logger.info("migrating database %s to %s", self.url, expected)
                await self.migrate()
                current = await self._with_retries(self._current_revision)
            if current != expected:
                raise not_ready(self.url, current, expected)
            self._ready = True

    # -- housekeeping --------------------------------------------------------------------------

    async def purge_expired(self, now: datetime, *, limit: int) -> int:
        """Delete at most ``limit`` event rows whose marks all expired; how many went."""
        deleted: int = await self.run(
            lambda conn: self.steps.purge(conn, now, limit), action="purge"
        )
        return deleted

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
            async with self._sqlalchemy_connection(write=True) as conn:
                await _migrations.run_upgrade(conn, serialize, revision)

        self._check_reachable()
        current = await self._with_retries(self._current_revision)
        refuse_a_newer_schema(self.url, current, _migrations.head_revision())
        await self._with_retries(attempt)
        self._ready = False

    def _check_reachable(self) -> None:
        reason = self.dialect.unreachable(self.engine.url, read_only=self.read_only)
        if reason is not None:
            msg = f"Cannot connect to database {self.url!r}: {reason}."
            raise DatabaseUnavailableError(msg, url=self.url)

    async def _current_revision(self) -> str | None:
        async with self._sqlalchemy_connection(write=False) as conn:
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


def _given(conn: Any) -> Callable[[], AbstractAsyncContextManager[Any]]:
    """``conn`` (already open) as a ``connect()`` for ``Dialect.read_clock``."""

    @asynccontextmanager
    async def connect() -> AsyncIterator[Any]:
        yield conn

    return connect


def _observe_sqlalchemy(
    engine: AsyncEngine, listeners: list[Callable[[str], None]], *, report_begin: bool
) -> None:
    """Tell ``listeners`` of the statements sent through SQLAlchemy on ``engine``, and of the
    BEGIN and COMMIT of each of its transactions (``Store.observe``)."""

    def before(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        for listener in listeners:
            listener(statement)

    def transactional(conn: Any) -> bool:
        return bool(conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT")

    def on_begin(conn: Any) -> None:
        # ``report_begin``: the driver sends BEGIN itself, unseen by ``before_cursor_execute``.
        if transactional(conn):
            for listener in listeners:
                listener("BEGIN")

    def on_commit(conn: Any) -> None:
        if transactional(conn):
            for listener in listeners:
                listener("COMMIT")

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    if report_begin:
        event.listen(engine.sync_engine, "begin", on_begin)
    event.listen(engine.sync_engine, "commit", on_commit)


_engine_turns: weakref.WeakKeyDictionary[Engine, asyncio.Lock] = weakref.WeakKeyDictionary()


def _turns(engine: AsyncEngine) -> asyncio.Lock:
    """The queue of this process's units on ``engine`` (see ``Store._turn``)."""
    turns = _engine_turns.get(engine.sync_engine)
    if turns is None:
        turns = _engine_turns[engine.sync_engine] = asyncio.Lock()
    return turns
