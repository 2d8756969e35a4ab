"""What the example service and its publisher share: the defaults, the queue, the orders table.

Each order is a chain of three events, ``order.placed`` -> ``order.paid`` -> ``order.shipped``,
each ``follows`` the one before. The service writes one row into ``orders`` per event it
handles, through ``exactly_once``; the table has no unique constraint, on purpose: that every
event has exactly one row, after its leader's, is what the ordering promises and what
``publish.py --check`` verifies.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final
from uuid import UUID

from faststream.rabbit import RabbitQueue
from sqlalchemy import Column, Integer, MetaData, String, Table, select
from sqlalchemy.ext.asyncio import AsyncEngine

from ordering_sql import ReceivedEvent

#: The ordering library's own default, so that ``ordering-sql status`` finds it without flags.
DEFAULT_DATABASE_URL: Final = "sqlite+aiosqlite:///ordering.db"
DATABASE_URL_ENV: Final = "ORDERING_SQL_DATABASE_URL"
DEFAULT_RABBITMQ_URL: Final = "amqp://guest:guest@127.0.0.1:5672/"
RABBITMQ_URL_ENV: Final = "RABBITMQ_URL"
DEFAULT_QUEUE: Final = "orders"
STEPS: Final = ("placed", "paid", "shipped")

metadata = MetaData()
orders = Table(
    "orders",
    metadata,
    Column("id", Integer, primary_key=True),  # the order rows were committed in
    Column("order_id", String(64), nullable=False),
    Column("step", String(32), nullable=False),
    Column("event_id", String(36), nullable=False, index=True),  # not unique: see above
    Column("follows", String(36)),
)


def database_url(given: str | None) -> str:
    return given or os.environ.get(DATABASE_URL_ENV) or DEFAULT_DATABASE_URL


def rabbitmq_url(given: str | None) -> str:
    return given or os.environ.get(RABBITMQ_URL_ENV) or DEFAULT_RABBITMQ_URL


def queue(name: str) -> RabbitQueue:
    """The durable queue the service consumes; a message it rejects (its body is not an event)
    goes to ``<name>.dead``. Service and publisher declare it alike, whichever starts first."""
    return RabbitQueue(
        name,
        durable=True,
        arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{name}.dead"},
    )


def dead_letter_queue(name: str) -> RabbitQueue:
    return RabbitQueue(f"{name}.dead", durable=True)


# -- the check ------------------------------------------------------------------------------------


@dataclass
class Verdict:
    """What the orders table says about a set of published events."""

    events: int
    orders: int
    written: int = 0  # events with at least one row
    missing: list[UUID] = field(default_factory=list)
    twice: list[UUID] = field(default_factory=list)  # events with more than one row
    out_of_order: list[UUID] = field(default_factory=list)  # a row before its leader's
    #: A few orders and the row ids of their steps, to show.
    examples: dict[str, list[tuple[str, int]]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def ok(self) -> bool:
        return not (self.missing or self.twice or self.out_of_order)

    def summary(self) -> str:
        if self.ok:
            return (
                f"{self.orders} orders, {self.events} events: every event written exactly once, "
                f"each after the event it follows ({' -> '.join(STEPS)})"
            )
        return (
            f"{self.orders} orders, {self.events} events: {len(self.missing)} not written, "
            f"{len(self.twice)} written more than once, {len(self.out_of_order)} written "
            f"before the event they follow (first few: "
            f"{[str(e) for e in (self.missing + self.twice + self.out_of_order)[:5]]})"
        )


async def check_orders(
    engine: AsyncEngine, events: Sequence[ReceivedEvent], *, show: int = 3
) -> Verdict:
    """Read the rows of ``events`` (distinct events) and judge them."""
    wanted = {str(event.id) for event in events}
    rows: dict[str, list[int]] = {}
    async with engine.connect() as conn:
        ids = sorted(wanted)
        for at in range(0, len(ids), 500):
            found = await conn.execute(
                select(orders.c.event_id, orders.c.id).where(
                    orders.c.event_id.in_(ids[at : at + 500])
                )
            )
            for event_id, row_id in found:
                rows.setdefault(event_id, []).append(row_id)
    by_order: dict[str, list[ReceivedEvent]] = {}
    for event in events:
        by_order.setdefault(event.resource.id, []).append(event)
    verdict = Verdict(events=len(events), orders=len(by_order), written=len(rows))
    for event in events:
        written = rows.get(str(event.id), [])
        if not written:
            verdict.missing.append(event.id)
        elif len(written) > 1:
            verdict.twice.append(event.id)
        if event.follows is not None and written:
            leader = rows.get(str(event.follows), [])
            if not leader or min(written) < max(leader):
                verdict.out_of_order.append(event.id)
    for order_id in sorted(by_order, key=lambda o: min(e.occurred for e in by_order[o]))[:show]:
        chain = sorted(by_order[order_id], key=lambda e: e.occurred)
        verdict.examples[order_id] = [(e.event, min(rows.get(str(e.id), [0]))) for e in chain]
    return verdict


def distinct(events: Iterable[ReceivedEvent]) -> list[ReceivedEvent]:
    """The events once each, in the order of their first appearance."""
    seen: dict[UUID, ReceivedEvent] = {}
    for event in events:
        seen.setdefault(event.id, event)
    return list(seen.values())
