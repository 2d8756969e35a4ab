"""Operator views and repairs of the ordering tables: ``ordering-sql status``, ``lost``, ``purge``.

``purge`` is also what the engine runs on its own, a bounded batch at a time, so a service never
needs a cron job for it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Final

from pydantic import BaseModel, ConfigDict

from ordering_sql.settings import PRECEDING_EVENT_LOOKBACK, Durations
from ordering_sql.store import Connection, Store
from ordering_sql.store._queries import params, scope_counts

__all__ = ["PurgeResult", "ScopeStatus", "peek_lost", "purge", "status"]

#: Rows deleted per purge statement; a purge loops until nothing is left.
PURGE_BATCH: Final = 5000


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
    past_lookback: int = 0
    oldest_parked_age: timedelta | None = None


async def status(
    store: Store,
    *,
    now: datetime,
    scope: str | None = None,
    lookback: timedelta = PRECEDING_EVENT_LOOKBACK,
) -> list[ScopeStatus]:
    """Counts per scope (only ``scope`` if given), sorted by scope name."""
    events_q, followers_q = scope_counts(now, now - lookback)

    async def work(conn: Connection) -> list[ScopeStatus]:
        rows: dict[str, dict[str, object]] = {}
        for row in await conn.execute(events_q):
            rows.setdefault(row.scope, {}).update(row._asdict())
        for row in await conn.execute(followers_q):
            values = row._asdict()
            oldest: datetime | None = values.pop("oldest_received")
            values["oldest_parked_age"] = (
                None if oldest is None else max(now - oldest, timedelta(0))
            )
            rows.setdefault(row.scope, {}).update(values)
        return [
            ScopeStatus.model_validate(values)
            for name, values in sorted(rows.items())
            if scope is None or name == scope
        ]

    return await store.read(work, action="status")


async def peek_lost(
    store: Store, *, scope: str, now: datetime, durations: Durations | None = None
) -> list[str]:
    """The JSON of the followers ``get_lost_followers()`` would return, without removing any."""
    durations = durations or Durations()
    query = store.queries.peek_lost
    values = params(
        scope=scope,
        now=now,
        horizon=now - durations.preceding_event_lookback,
        seen_cutoff=now + durations.seen - durations.claim_timeout,
    )

    async def work(conn: Connection) -> list[str]:
        return [row.event for row in await conn.execute(query, values)]

    return await store.read(work, action="peek_lost")


class PurgeResult(BaseModel):
    """Event rows whose marks had all expired: seen records, and leases never completed."""

    model_config = ConfigDict(frozen=True)

    seen: int
    leases: int
    deleted: bool

    @property
    def total(self) -> int:
        return self.seen + self.leases


async def purge(store: Store, *, now: datetime, dry_run: bool = False) -> PurgeResult:
    """Delete (or with ``dry_run`` only count) the expired rows of every scope."""

    async def count(conn: Connection) -> tuple[int, int]:
        row = (await conn.execute(store.queries.expired_counts, params(now=now))).one()
        return int(row.seen), int(row.leases)

    seen, leases = await store.read(count, action="purge_count")
    if not dry_run:
        while await store.purge_expired(now, limit=PURGE_BATCH) == PURGE_BATCH:
            pass
    return PurgeResult(seen=seen, leases=leases, deleted=not dry_run)
