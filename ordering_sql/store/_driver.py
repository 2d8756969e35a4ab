"""Postgres over asyncpg, past SQLAlchemy's execution layer: where the steps run on Postgres.

Why: measured on this project's 2-core machine, SQLAlchemy's async execution (connection
check-out, greenlet hand-offs, parameter and result processing) costs about 0.7 ms of Python
per statement, more than the database needs to run most of them. The steps' statements
(``store/postgres.py``) are SQL text with ``$n`` parameters, sent straight to the asyncpg
connection, which prepares each text once per connection. ``SqlAlchemyConnection`` runs the same
text through SQLAlchemy instead (``ORDERING_SQL_DIRECT_DRIVER=0``).

Every statement is its own transaction (autocommit). Multi-statement transactions (migrations)
go through SQLAlchemy. The Store's error boundary classifies asyncpg's errors as it classifies
the ones SQLAlchemy wraps, and retries the same transient faults.

Connections come from the engine's own pool: a Store that owns its engine keeps up to
``pool_size`` driver connections out of the pool between units of work, so a unit skips the
pool's check-out and check-in (about 0.1 ms). The pool has ``max_overflow`` more, so
SQLAlchemy's own units (migrations) always find one. A host application's engine is borrowed
from per unit instead, never hoarded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from ordering_sql.settings import Settings

__all__ = [
    "DRIVER_ERRORS",
    "DriverConnection",
    "DriverConnections",
    "PostgresUnits",
    "SqlAlchemyConnection",
]

#: What asyncpg raises itself: errors the server reported, client-side ones (a closed link), and
#: a connection found in the middle of an operation that an earlier failure broke off.
DRIVER_ERRORS: Final = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)


class DriverConnection:
    """An asyncpg connection that runs the steps' statements (``postgres.Connection``).

    Every statement commits on its own (autocommit); asyncpg prepares each SQL text once per
    connection (unnamed every time behind a transaction pooler: ``Settings.pooler``).
    """

    __slots__ = ("_connection", "_echo", "_listeners", "interrupted")

    def __init__(
        self,
        connection: asyncpg.Connection,
        listeners: Sequence[Callable[[str], None]],
        echo: logging.Logger | None = None,
    ) -> None:
        self._connection = connection
        self._listeners = listeners
        self._echo = echo
        #: True while a statement is on the wire; still True after that statement was
        #: cancelled, which leaves the connection in an unknown state.
        self.interrupted = False

    async def fetch(self, sql: str, *args: Any) -> Sequence[Sequence[Any]]:
        return await self._send(self._connection.fetch, sql, args)  # type: ignore[no-any-return]

    async def run(self, sql: str, *args: Any) -> int:
        status = await self._send(self._connection.execute, sql, args)
        last = str(status).rpartition(" ")[2]  # a command tag: "DELETE 5", "INSERT 0 1"
        return int(last) if last.isdigit() else 0

    async def _send(self, method: Callable[..., Awaitable[Any]], sql: str, args: Any) -> Any:
        for listener in self._listeners:
            listener(sql)
        if self._echo is not None:  # ``ORDERING_SQL_ECHO``: where SQLAlchemy logs its own
            self._echo.info("[direct] %s", sql)
        self.interrupted = True  # until the statement returned or failed on its own
        try:
            result = await method(sql, *args)
        except Exception:
            self.interrupted = False
            raise
        self.interrupted = False
        return result


class SqlAlchemyConnection:
    """SQLAlchemy's connection (in autocommit) running the same statements, through its
    ``exec_driver_sql``: for instrumentation that listens to SQLAlchemy's events, and for
    Postgres drivers other than asyncpg."""

    __slots__ = ("_conn",)

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def fetch(self, sql: str, *args: Any) -> Sequence[Sequence[Any]]:
        return (await self._conn.exec_driver_sql(sql, args)).all()

    async def run(self, sql: str, *args: Any) -> int:
        return int((await self._conn.exec_driver_sql(sql, args)).rowcount)


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

    def __init__(
        self, engine: AsyncEngine, *, keep: int, listeners: Sequence[Callable[[str], None]]
    ) -> None:
        self._engine = engine
        self._keep = keep
        self._idle: list[PoolProxiedConnection] = []
        self._closing = False  # after close(), connections still in use are not kept
        #: Called with the SQL of every statement sent this way, before it is sent (the Store's
        #: own list: SQLAlchemy's ``before_cursor_execute`` does not see these statements).
        self._listeners = listeners
        self._echo = logging.getLogger("sqlalchemy.engine.Engine") if engine.echo else None

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[DriverConnection]:
        pooled = self._idle.pop() if self._idle else await self._engine.raw_connection()
        connection = DriverConnection(pooled.driver_connection, self._listeners, self._echo)
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

    @staticmethod
    def _invalidate(
        pooled: PoolProxiedConnection,
        stale: list[PoolProxiedConnection],
        error: Exception | None,
        everyone: bool,
    ) -> None:
        # A lost link usually means the server restarted: the connections kept here are
        # retired with this one. Any other one still idle in the pool fails its first
        # statement in turn, which the Store retries on a fresh connection.
        pooled.invalidate(error)
        for other in stale if everyone else ():
            other.invalidate(error)


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


class PostgresUnits:
    """Where the Postgres steps run: asyncpg's own connections out of the engine's pool (the
    direct path, ``store/_driver.py``), or SQLAlchemy's, in autocommit."""

    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        *,
        owns_engine: bool,
        listeners: list[Callable[[str], None]],
        turns: asyncio.Lock,
    ) -> None:
        self._engine = engine
        self._direct: DriverConnections | None = None
        if settings.direct_driver and engine.dialect.driver == "asyncpg":
            keep = settings.pool_size if owns_engine else 0  # a host's pool is never hoarded
            self._direct = DriverConnections(engine, keep=keep, listeners=listeners)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[DriverConnection | SqlAlchemyConnection]:
        if self._direct is not None:
            async with self._direct.connection() as conn:
                yield conn
            return
        async with self._engine.connect() as sa_conn:
            autocommit = await sa_conn.execution_options(isolation_level="AUTOCOMMIT")
            yield SqlAlchemyConnection(autocommit)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """A transaction at READ COMMITTED whatever the engine's default: a joined completion
        claims its followers a second time, which must see parks committed meanwhile
        (``_steps.Joined``). Row locks taken in it are held until it ends."""
        async with self._engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="READ COMMITTED")
            async with conn.begin():
                yield conn

    def joining(self, conn: AsyncConnection) -> SqlAlchemyConnection:
        """The steps' connection on ``conn``, inside the transaction its caller began: the
        statements run there and commit or roll back with the caller's own work."""
        return SqlAlchemyConnection(conn)

    async def close(self) -> None:
        if self._direct is not None:
            await self._direct.close()
