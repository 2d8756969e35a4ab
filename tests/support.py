"""Helpers shared by the test suites: a movable clock, event builders, a statement counter,
an EXPLAIN collector, and the environment of child processes."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

from sqlalchemy import Engine, event
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from ordering_sql import CausalOrdering, ReceivedEvent

REPO_ROOT = Path(__file__).resolve().parents[1]


def child_env() -> dict[str, str]:
    """The environment of a worker process a test starts: the test's own, ``ORDERING_SQL_*``
    settings included (the developer's were removed before the test), with this checkout
    importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


@dataclass
class Clock:
    """A clock the tests move by hand; starts at the real current time."""

    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta | float) -> None:
        self.now += delta if isinstance(delta, timedelta) else timedelta(seconds=delta)


def make_event(
    *,
    follows: UUID | ReceivedEvent | None = None,
    occurred: datetime | None = None,
    received: datetime | None = None,
    id: UUID | None = None,
    name: str = "test.event",
    **extra: Any,
) -> ReceivedEvent:
    """A ReceivedEvent with sensible defaults; ``follows`` may be an event or an id."""
    now = datetime.now(UTC)
    leader = follows.id if isinstance(follows, ReceivedEvent) else follows
    return ReceivedEvent(
        occurred=occurred or now,
        event=name,
        resource={"prefect.resource.id": f"test.resource.{name}"},
        id=id or uuid4(),
        follows=leader,
        received=received or now,
        **extra,
    )


def chain(
    length: int, *, start: datetime | None = None, received: datetime | None = None
) -> list[ReceivedEvent]:
    """``length`` events, each following the one before, occurring one second apart."""
    start = start or datetime.now(UTC)
    events: list[ReceivedEvent] = []
    for i in range(length):
        events.append(
            make_event(
                follows=events[-1] if events else None,
                occurred=start + timedelta(seconds=i),
                received=received,
                name=f"chain.{i}",
            )
        )
    return events


# -- counting statements ------------------------------------------------------------------------


@dataclass
class Counter:
    """The statements a Store sent, in order (``Store.observe``: every path, BEGIN and COMMIT
    included)."""

    sent: list[str] = field(default_factory=list)

    def _walk(self) -> Iterator[tuple[str, bool]]:
        """(first word, whether it ran outside an explicit transaction) of each statement
        other than BEGIN, COMMIT and ROLLBACK."""
        inside = False
        for sql in self.sent:
            word = sql.split()[0].upper()
            if word == "BEGIN":
                inside = True
            elif word in ("COMMIT", "ROLLBACK"):
                inside = False
            else:
                yield word, not inside

    @property
    def statements(self) -> list[tuple[str, bool]]:
        return list(self._walk())

    @property
    def transactions(self) -> int:
        return sum(1 for sql in self.sent if sql.split()[0].upper() == "BEGIN")

    @property
    def round_trips(self) -> int:
        """Statements sent, BEGIN and COMMIT of each explicit transaction included."""
        return len(self.sent)

    @property
    def units(self) -> int:
        """Units of work: explicit transactions, plus statements sent outside any."""
        return self.transactions + sum(1 for _, autocommit in self._walk() if autocommit)


@asynccontextmanager
async def counting(ordering: CausalOrdering[Any]) -> AsyncIterator[Counter]:
    counter = Counter()
    async with ordering.observe_statements(counter.sent.append):
        yield counter


# -- query plans ---------------------------------------------------------------------------------

#: A plan line that reads a whole ordering table (Postgres, then SQLite).
FULL_SCAN = re.compile(r"(Seq Scan on ordering_\w+|^SCAN ordering_\w+)", re.MULTILINE)


@contextmanager
def explained_plans(engine: Engine, dialect_name: str) -> Iterator[list[str]]:
    """Every statement on ``engine`` is explained instead of run; the plans collect here."""
    prefix = "EXPLAIN QUERY PLAN " if dialect_name == "sqlite" else "EXPLAIN "
    plans: list[str] = []

    def explain(
        _c: Any, _cur: Any, statement: str, parameters: Any, _ctx: Any, _many: bool
    ) -> tuple[str, Any]:
        return prefix + statement, parameters

    def collect(_c: Any, cursor: Any, _s: str, _p: Any, _ctx: Any, _many: bool) -> None:
        plans.append("\n".join(str(row[-1]) for row in cursor.fetchall()))

    event.listen(engine, "before_cursor_execute", explain, retval=True)
    event.listen(engine, "after_cursor_execute", collect)
    try:
        yield plans
    finally:
        event.remove(engine, "before_cursor_execute", explain)
        event.remove(engine, "after_cursor_execute", collect)


@asynccontextmanager
async def explaining(
    database_url: str, *, filler: Mapping[str, str] | None = None, rows: int = 0
) -> AsyncIterator[tuple[AsyncConnection, list[str]]]:
    """A connection on which every statement is explained instead of run, and its plans.

    On Postgres, sequential scans are priced out: any left in a plan means no index can serve
    it. ``filler`` first inserts ``rows`` rows into each table (``{"table (columns)": "values
    SQL"}``) and analyses them, so that the planner chooses as it would in service. Everything
    is rolled back.
    """
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            if engine.dialect.name != "sqlite":
                for table, columns in (filler or {}).items():
                    await conn.exec_driver_sql(
                        f"INSERT INTO {table} SELECT {columns} FROM generate_series(1, {rows})"
                    )
                if filler:
                    await conn.exec_driver_sql("ANALYZE ordering_events, ordering_followers")
                await conn.exec_driver_sql("SET enable_seqscan = off")
            with explained_plans(engine.sync_engine, engine.dialect.name) as plans:
                yield conn, plans
            await conn.rollback()
    finally:
        await engine.dispose()
