"""Postgres over asyncpg, past SQLAlchemy's execution layer: the engine's hot path.

Why: measured on this project's 2-core machine, SQLAlchemy's async execution (connection
check-out, greenlet hand-offs, parameter and result processing) costs about 0.7 ms of Python
per statement, more than the database needs to run most of them. Here each statement is
compiled by SQLAlchemy once, to exactly the ``$n`` SQL it would send itself, and is then sent
straight to the asyncpg connection, which prepares it once per connection.

What does not change:

* The SQL. The statements are still built in ``_queries.py``; only who sends them differs.
* Autocommit. This path serves the Store's STEP and READ units on Postgres, which already ran
  in autocommit: every statement is its own transaction. Multi-statement transactions still go
  through SQLAlchemy.
* The error boundary. ``Store._connection`` classifies asyncpg's errors as it classifies the
  ones SQLAlchemy wraps, and retries the same transient faults.
* The connections. They come from the engine's own pool.

Connections: a Store that owns its engine keeps up to ``pool_size`` driver connections out of
the pool between units of work, so a unit skips the pool's check-out and check-in (about 0.1 ms).
The pool has ``max_overflow`` more, so SQLAlchemy's own units (migrations, ``clear``) always
find one. A host application's engine is borrowed from per unit instead, never hoarded.
"""

from __future__ import annotations

import asyncio
from collections import namedtuple
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar, Final

import asyncpg
from sqlalchemy.engine import Dialect as SqlDialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.util import greenlet_spawn

__all__ = ["DRIVER_ERRORS", "Connection", "DriverConnection", "DriverConnections", "DriverResult"]

#: What asyncpg raises itself: errors the server reported, client-side ones (a closed link), and
#: a connection found in the middle of an operation that an earlier failure broke off.
DRIVER_ERRORS: Final = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)

#: How many compiled statements are kept per dialect. The engine has about thirty; the operator
#: commands build a few more per call.
_PLAN_CACHE_SIZE: Final = 256


@dataclass(frozen=True, slots=True)
class _Plan:
    """One statement, compiled once for asyncpg."""

    sql: str
    #: The parameter name behind each ``$n``, in order.
    names: tuple[str, ...]
    #: Values SQLAlchemy bound itself (constants in the statement); the caller's win.
    constants: Mapping[str, Any]
    #: Whether the statement returns rows (a SELECT, or RETURNING); else its row count matters.
    returns_rows: bool


def _plan(statement: ClauseElement, dialect: SqlDialect) -> _Plan:
    compiled = statement.compile(dialect=dialect)
    assert isinstance(compiled, SQLCompiler)
    if "POSTCOMPILE" in compiled.string:
        # An expanding IN renders differently per list length; bind lists as one parameter
        # (``Dialect.in_ids``) so that every statement has one text.
        msg = f"Statement with an expanding IN cannot take the driver path: {compiled.string}"
        raise TypeError(msg)
    required = {name for name, bind in compiled.binds.items() if bind.required}
    constants = {
        name: value
        for name, value in (compiled.construct_params(_check=False) or {}).items()
        if name not in required
    }
    returns_rows = bool(compiled.returning) or bool(getattr(statement, "is_select", False))
    return _Plan(compiled.string, tuple(compiled.positiontup or ()), constants, returns_rows)


@lru_cache(maxsize=64)
def _row_type(keys: tuple[str, ...]) -> Any:
    """Rows with attribute access (``row.event_id``), as SQLAlchemy's rows have."""
    return namedtuple("Row", keys, rename=True)


class DriverResult:
    """The rows of one statement, with the parts of SQLAlchemy's ``Result`` the engine uses."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    @classmethod
    def of(cls, records: Sequence[asyncpg.Record]) -> DriverResult:
        if not records:
            return cls([], 0)
        row = _row_type(tuple(records[0].keys()))
        return cls([tuple.__new__(row, record.values()) for record in records], len(records))

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)

    def all(self) -> list[Any]:
        return list(self._rows)

    def first(self) -> Any | None:
        return self._rows[0] if self._rows else None

    def one(self) -> Any:
        if len(self._rows) != 1:
            msg = f"Expected exactly one row, got {len(self._rows)}"
            raise LookupError(msg)
        return self._rows[0]

    def scalar_one(self) -> Any:
        return self.one()[0]

    def scalar_one_or_none(self) -> Any | None:
        if not self._rows:
            return None
        return self.one()[0]


class DriverConnection:
    """An asyncpg connection that runs SQLAlchemy statements: ``await conn.execute(stmt, values)``.

    It offers the one method of ``AsyncConnection`` the engine's units of work call, so the same
    unit runs on either. Every statement commits on its own (autocommit).
    """

    __slots__ = ("_connection", "_listeners", "_plans", "interrupted")

    def __init__(
        self,
        connection: asyncpg.Connection,
        plans: _Plans,
        listeners: list[Callable[[str], None]],
    ) -> None:
        self._connection = connection
        self._plans = plans
        self._listeners = listeners
        #: True while a statement is on the wire; still True after that statement was
        #: cancelled, which leaves the connection in an unknown state.
        self.interrupted = False

    async def execute(
        self, statement: ClauseElement, parameters: Mapping[str, Any] | None = None
    ) -> DriverResult:
        plan = self._plans.get(statement)
        values = parameters or {}
        constants = plan.constants
        # A name missing from both is a required parameter the caller forgot: KeyError.
        args = [values[n] if n in values else constants[n] for n in plan.names]
        for listener in self._listeners:
            listener(plan.sql)
        self.interrupted = True  # until the statement returned or failed on its own
        try:
            if plan.returns_rows:
                result = DriverResult.of(await self._connection.fetch(plan.sql, *args))
            else:
                status = await self._connection.execute(plan.sql, *args)
                result = DriverResult([], _row_count(status))
        except Exception:
            self.interrupted = False
            raise
        self.interrupted = False
        return result


def _row_count(status: str) -> int:
    """The row count of a command tag: ``DELETE 5``, ``UPDATE 0``, ``INSERT 0 1``."""
    last = status.rpartition(" ")[2]
    return int(last) if last.isdigit() else 0


class _Plans:
    """Compiled statements of one engine's dialect, by statement object.

    The engine's statements are built once per process (``queries_for``), so they compile once
    per process: the cache is shared by every engine of the same dialect and server version
    (what compiling depends on), and outlives Stores that come and go.
    """

    __slots__ = ("_dialect", "_plans")

    _shared: ClassVar[dict[tuple[Any, ...], dict[ClauseElement, _Plan]]] = {}

    def __init__(self, dialect: SqlDialect) -> None:
        self._dialect = dialect
        self._plans: dict[ClauseElement, _Plan] | None = None

    def get(self, statement: ClauseElement) -> _Plan:
        if self._plans is None:
            # Looked up at the first statement: the dialect knows the server's version only
            # once the engine has connected, which it has by now.
            key = (type(self._dialect), getattr(self._dialect, "server_version_info", None))
            self._plans = self._shared.setdefault(key, {})
        plan = self._plans.get(statement)
        if plan is None:
            if len(self._plans) >= _PLAN_CACHE_SIZE:
                self._plans.clear()  # only one-off statements get here; the hot ones return
            plan = self._plans[statement] = _plan(statement, self._dialect)
        return plan


class DriverConnections:
    """Driver connections out of ``engine``'s pool, up to ``keep`` of them kept between units.

    Why keeping them is safe: each serves one unit of work at a time (it is taken out of
    ``_idle`` before use and put back after; all of this runs on the Store's one event loop),
    and a unit leaves no state on it: autocommit, so no transaction is open, and nothing else
    is set. A connection is put back only if its unit ended, or raised on its own, or had a
    statement refused by the server. One whose statement was cancelled midway is invalidated.
    One whose link is gone (or whose session the server ended) is invalidated together with
    every connection the pool made before it, as SQLAlchemy does on a disconnect: a server
    restart drops them all. A kept connection that died unnoticed fails its next statement,
    which the Store retries on another.
    """

    def __init__(self, engine: AsyncEngine, *, keep: int) -> None:
        self._engine = engine
        self._plans = _Plans(engine.dialect)
        self._keep = keep
        self._idle: list[PoolProxiedConnection] = []
        self._closing = False  # after close(), connections still in use are not kept
        #: Called with the SQL of every statement sent this way, before it is sent: SQLAlchemy's
        #: ``before_cursor_execute`` does not see them (the statement-budget tests listen here).
        self.listeners: list[Callable[[str], None]] = []
        if engine.echo:  # ``ORDERING_SQL_ECHO``: log these statements where SQLAlchemy logs its own
            log = engine.sync_engine.logger
            self.listeners.append(lambda sql: log.info("[direct] %s", sql))

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[DriverConnection]:
        pooled = self._idle.pop() if self._idle else await self._engine.raw_connection()
        connection = DriverConnection(pooled.driver_connection, self._plans, self.listeners)
        try:
            yield connection
        except BaseException as exc:
            if _is_disconnect(exc) or self._closed(pooled):
                await self._retire(pooled, exc, everyone=True)
            elif connection.interrupted:
                await self._retire(pooled, exc, everyone=False)
            else:  # the server refused a statement, or the unit itself raised: the link is fine
                await self._put_back(pooled)
            raise
        await self._put_back(pooled)

    async def close(self) -> None:
        """Give every kept connection back to the pool, and the ones in use when they finish."""
        self._closing = True
        idle, self._idle = self._idle, []
        for pooled in idle:
            await greenlet_spawn(pooled.close)

    @staticmethod
    def _closed(pooled: PoolProxiedConnection) -> bool:
        driver = pooled.driver_connection
        return driver is None or bool(driver.is_closed())

    async def _put_back(self, pooled: PoolProxiedConnection) -> None:
        if self._closing:
            # The engine may be disposed already: its old pool would keep this connection open
            # until garbage collection. Close it for good instead.
            await greenlet_spawn(pooled.invalidate)
        elif len(self._idle) < self._keep:
            self._idle.append(pooled)
        else:
            await greenlet_spawn(pooled.close)

    async def _retire(
        self, pooled: PoolProxiedConnection, exc: BaseException, *, everyone: bool
    ) -> None:
        stale: list[PoolProxiedConnection] = []
        if everyone:
            stale, self._idle = self._idle, []
        error = exc if isinstance(exc, Exception) else None
        # Shielded: this may run while a cancellation unwinds, and must finish regardless.
        await asyncio.shield(greenlet_spawn(self._invalidate, pooled, stale, error, everyone))

    def _invalidate(
        self,
        pooled: PoolProxiedConnection,
        stale: list[PoolProxiedConnection],
        error: Exception | None,
        everyone: bool,
    ) -> None:
        if everyone:
            # ``Pool._invalidate`` is SQLAlchemy's own disconnect handling: it retires this
            # connection and every one the pool made before it. The kept ones are out of the
            # pool, so they are retired here.
            self._engine.sync_engine.pool._invalidate(pooled, error)
            for other in stale:
                other.invalidate(error)
        else:
            pooled.invalidate(error)


def _is_disconnect(exc: BaseException) -> bool:
    """Whether ``exc`` means the link to the server is gone or unusable.

    Besides lost links, that is the server ending the session (SQLSTATE class 57P: shutdown,
    ``pg_terminate_backend``), reported just before it closes the socket, so the connection
    may not look closed yet; and asyncpg's own state errors, after which it cannot be used.
    """
    if isinstance(exc, asyncpg.PostgresError):
        code = str(getattr(exc, "sqlstate", "") or "")
        return isinstance(exc, asyncpg.PostgresConnectionError) or code.startswith("57P")
    return isinstance(
        exc, asyncpg.InterfaceError | asyncpg.InternalClientError | OSError | TimeoutError
    )


#: What a unit of work gets: SQLAlchemy's connection, or on Postgres's autocommit units the
#: driver's. Both run the statements of ``Queries`` with ``execute``.
Connection = AsyncConnection | DriverConnection
