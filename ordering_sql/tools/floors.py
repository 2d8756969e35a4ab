"""The floors ``ordering-sql bench`` sets its workloads next to: what the database itself does
per second on the same machine, in the same run.

A single-row INSERT + COMMIT into an ordinary (durable) table and a ``SELECT 1``, each through
the raw driver (aiosqlite, asyncpg) and through SQLAlchemy, and the raw INSERT + COMMIT summed
over ``PARALLEL_FLOOR`` connections at once.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiosqlite
import asyncpg
from pydantic import BaseModel, ConfigDict
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from ordering_sql.settings import Settings, normalize_url

__all__ = ["PARALLEL_FLOOR", "Floors", "measure_floors"]

#: Connections of the parallel floor: as many as W3's workers.
PARALLEL_FLOOR = 8


class Floors(BaseModel):
    """Operations per second on the same database: one connection, sequential, unless named."""

    model_config = ConfigDict(frozen=True)

    raw_insert_commit: float
    #: INSERT + COMMIT per second summed over ``PARALLEL_FLOOR`` connections working at once.
    raw_insert_commit_parallel: float
    raw_select_1: float
    sqlalchemy_insert_commit: float
    sqlalchemy_select_1: float

    @property
    def two_statement(self) -> float:
        """The least an in-order event costs: two committed statements through SQLAlchemy."""
        return self.sqlalchemy_insert_commit / 2


async def _measure(fn: Callable[[], Awaitable[None]], *, seconds: float = 1.0) -> float:
    """Calls per second of ``fn`` over about ``seconds``."""
    done, began = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - began) < seconds or done < 50:
        await fn()
        done += 1
    return done / elapsed


async def measure_floors(url: str) -> Floors:
    """The floors: a single-row INSERT + COMMIT and a ``SELECT 1``, raw and through SQLAlchemy.

    The INSERT goes to an ordinary table, durable like the engine's own: a temporary table
    writes no WAL (Postgres) or sits outside the database file (SQLite), so its commit skips the
    flush to disk that every commit of the engine pays. The table is dropped afterwards.
    """
    parsed = normalize_url(url)
    table = f"ordering_bench_floor_{os.getpid()}"
    pooled = Settings.from_env(url).pooler == "transaction"
    # Behind a transaction pooler the floors prepare unnamed statements too, as the engine does.
    caches_off = {"statement_cache_size": 0, "prepared_statement_cache_size": 0}
    engine = create_async_engine(parsed, connect_args=caches_off if pooled else {})
    try:
        async with engine.connect() as conn:
            await conn.execute(text(f"CREATE TABLE {table} (n INTEGER)"))
            await conn.commit()
            try:

                async def sa_insert() -> None:
                    await conn.execute(text(f"INSERT INTO {table} VALUES (1)"))
                    await conn.commit()

                async def sa_select() -> None:
                    await conn.execute(text("SELECT 1"))

                sa_insert_rate = await _measure(sa_insert)
                await conn.rollback()
                sa_select_rate = await _measure(sa_select)
                await conn.rollback()
                raw_insert_rate, parallel_rate, raw_select_rate = await _raw_floors(
                    parsed, table, pooled=pooled
                )
            finally:
                await conn.execute(text(f"DROP TABLE {table}"))
                await conn.commit()
    finally:
        await engine.dispose()
    return Floors(
        raw_insert_commit=raw_insert_rate,
        raw_insert_commit_parallel=parallel_rate,
        raw_select_1=raw_select_rate,
        sqlalchemy_insert_commit=sa_insert_rate,
        sqlalchemy_select_1=sa_select_rate,
    )


async def _raw_floors(parsed: Any, table: str, *, pooled: bool) -> tuple[float, float, float]:
    """The floors through the driver itself (aiosqlite or asyncpg), on the same table.

    Returns INSERT + COMMIT per second on one connection, the same summed over
    ``PARALLEL_FLOOR`` connections at once (W3's shape: concurrent commits may share a flush
    to disk), and ``SELECT 1`` per second.
    """
    if parsed.get_backend_name() == "sqlite":
        synchronous = Settings.from_env().sqlite_synchronous  # as the engine's connections

        async def connect() -> Any:
            raw = await aiosqlite.connect(parsed.database or ":memory:", timeout=30)
            await raw.execute("PRAGMA journal_mode=WAL")
            await raw.execute(f"PRAGMA synchronous={synchronous}")
            return raw

        async def insert(raw: Any) -> None:
            await raw.execute(f"INSERT INTO {table} VALUES (1)")
            await raw.commit()

        async def select_1(raw: Any) -> None:
            await (await raw.execute("SELECT 1")).fetchall()

    else:
        dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)

        async def connect() -> Any:
            return await asyncpg.connect(dsn, statement_cache_size=0 if pooled else 100)

        async def insert(raw: Any) -> None:
            await raw.execute(f"INSERT INTO {table} VALUES (1)")

        async def select_1(raw: Any) -> None:
            await raw.fetchval("SELECT 1")

    connections = [await connect() for _ in range(PARALLEL_FLOOR)]
    try:
        first = connections[0]
        single = await _measure(lambda: insert(first))
        rates = await asyncio.gather(*(_measure(functools.partial(insert, c)) for c in connections))
        return single, sum(rates), await _measure(lambda: select_1(first))
    finally:
        for raw in connections:
            await raw.close()
