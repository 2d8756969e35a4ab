"""Operator views of the ordering tables: what ``ordering-sql status`` shows."""

from __future__ import annotations

from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict
from sqlalchemy.ext.asyncio import AsyncConnection

from ordering_sql.models import utc_now
from ordering_sql.store import Store
from ordering_sql.store._queries import scope_counts

__all__ = ["ScopeStatus", "status"]


class ScopeStatus(BaseModel):
    """The state of one scope at one moment."""

    model_config = ConfigDict(frozen=True)

    scope: str
    seen: int = 0
    seen_expired: int = 0
    processing: int = 0
    processing_expired: int = 0
    parked: int = 0
    claimed: int = 0
    oldest_parked_age: timedelta | None = None


async def status(store: Store, *, scope: str | None = None) -> list[ScopeStatus]:
    """Counts per scope (only ``scope`` if given), sorted by scope name."""
    now = utc_now()
    events_q, followers_q = scope_counts(now)

    async def work(conn: AsyncConnection) -> list[ScopeStatus]:
        rows: dict[str, dict[str, object]] = {}
        for row in await conn.execute(events_q):
            rows.setdefault(row.scope, {}).update(row._asdict())
        for row in await conn.execute(followers_q):
            oldest: datetime | None = row.oldest_received
            entry = rows.setdefault(row.scope, {})
            entry.update(scope=row.scope, parked=row.parked, claimed=row.claimed)
            entry["oldest_parked_age"] = None if oldest is None else max(now - oldest, timedelta(0))
        return [
            ScopeStatus.model_validate(values)
            for name, values in sorted(rows.items())
            if scope is None or name == scope
        ]

    return await store.read(work, action="status")
