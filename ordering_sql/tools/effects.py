"""Effects written exactly once: what the simulation's ``exactly_once`` handlers write, and the
check that each event's effect was written once, after its leader's.

Handlers that go through ``exactly_once`` write one row per handling into ``EFFECTS``, a table
without a unique constraint in the ordering's own database (``Effects.write``): a second
handling of an event would show as a second row. ``check_effects`` then counts the rows per
event (exactly one each) and whether each follower's row was written after its leader's
committed. Used by the demo (``--exactly-once``), the bench (E1) and the fault tests.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from pydantic import BaseModel, ConfigDict
from sqlalchemy import Boolean, Column, MetaData, String, Table, exists, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from ordering_sql.models import ReceivedEvent

if TYPE_CHECKING:
    from ordering_sql.tools.simulation import Stream

__all__ = [
    "EFFECTS",
    "Effects",
    "EffectsCheck",
    "InjectedFailure",
    "check_effects",
    "create_effects",
    "drop_effects",
]


#: One row per handling that committed, in the ordering's own database. No unique constraint
#: and no primary key: a second handling of an event would show as a second row.
EFFECTS: Final = Table(
    "ordering_sql_demo_effects",
    MetaData(),
    Column("event_id", String(36), nullable=False),
    Column("leader_id", String(36)),
    #: Whether the leader's row was visible to this row's transaction: committed before it.
    Column("after_leader", Boolean, nullable=False),
    Column("worker", String(40), nullable=False),
)


class InjectedFailure(Exception):
    """A handler failure the simulation makes on purpose (``Effects.fail_rate``)."""


@dataclass
class Effects:
    """Handle through ``exactly_once``, one ``EFFECTS`` row each; fail ``fail_rate`` of the
    handlings after their row was written (it must roll back with them)."""

    fail_rate: float = 0.0
    rng: random.Random = field(default_factory=random.Random)

    async def write(self, conn: AsyncConnection, event: ReceivedEvent, worker: str) -> None:
        leader = None if event.follows is None else str(event.follows)
        visible = exists().where(EFFECTS.c.event_id == leader)
        await conn.execute(
            insert(EFFECTS).values(
                event_id=str(event.id),
                leader_id=leader,
                after_leader=visible if leader is not None else False,
                worker=worker,
            )
        )
        if self.fail_rate and self.rng.random() < self.fail_rate:
            msg = f"injected failure handling {event.id}"
            raise InjectedFailure(msg)


@asynccontextmanager
async def _transaction(url: str) -> AsyncIterator[AsyncConnection]:
    """A transaction on an engine of its own at ``url``, disposed afterwards (the effects
    table is set up and read apart from the engine under test)."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            yield conn
    finally:
        await engine.dispose()


async def create_effects(url: str) -> None:
    """(Re)create the ``EFFECTS`` table, empty, in the database at ``url``."""
    async with _transaction(url) as conn:
        await conn.run_sync(lambda sync: EFFECTS.drop(sync, checkfirst=True))
        await conn.run_sync(lambda sync: EFFECTS.create(sync))


async def drop_effects(url: str) -> None:
    async with _transaction(url) as conn:
        await conn.run_sync(lambda sync: EFFECTS.drop(sync, checkfirst=True))


class EffectsCheck(BaseModel):
    """The verdict on the effect rows of a run."""

    model_config = ConfigDict(frozen=True)

    events: int
    rows: int
    missing: int
    twice: int
    before_leader: int
    examples: list[str] = []

    @property
    def ok(self) -> bool:
        return (
            self.missing == 0
            and self.twice == 0
            and self.before_leader == 0
            and (self.rows == self.events)
        )


async def check_effects(url: str, stream: Stream) -> EffectsCheck:
    """Every event of ``stream`` has exactly one ``EFFECTS`` row, and each follower's row saw
    its leader's row committed."""
    async with _transaction(url) as conn:
        found = (await conn.execute(select(EFFECTS.c.event_id, EFFECTS.c.after_leader))).all()
    per_event: dict[str, int] = defaultdict(int)
    early: set[str] = set()
    for event_id, after_leader in found:
        per_event[event_id] += 1
        if not after_leader:
            early.add(event_id)
    followers = {str(f) for f in stream.leaders}
    ids = [str(e.id) for e in stream.events]
    missing = [i for i in ids if per_event.get(i, 0) == 0]
    twice = [i for i in ids if per_event.get(i, 0) > 1]
    before = sorted(early & followers)
    examples = (
        [f"no effect row for {i}" for i in missing[:3]]
        + [f"{per_event[i]} effect rows for {i}" for i in twice[:3]]
        + [f"{i}'s effect was written before its leader's committed" for i in before[:3]]
    )
    return EffectsCheck(
        events=len(ids),
        rows=len(found),
        missing=len(missing),
        twice=len(twice),
        before_leader=len(before),
        examples=examples,
    )
