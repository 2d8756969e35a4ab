"""Operator views and repairs of the ordering tables: ``ordering-sql status``, ``lost``, ``purge``.

``purge`` is also what the engine runs on its own, a bounded batch at a time, so a service never
needs a cron job for it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Final

from pydantic import BaseModel, ConfigDict

from ordering_sql.settings import PRECEDING_EVENT_LOOKBACK, Durations
from ordering_sql.store import Store

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
    events, followers = await store.scope_counts(now, now - lookback)
    rows: dict[str, dict[str, object]] = {}
    for name, seen, seen_expired, processing, processing_expired in events:
        rows.setdefault(name, {}).update(
            seen=seen,
            seen_expired=seen_expired,
            processing=processing,
            processing_expired=processing_expired,
        )
    for name, parked, claimed, past_lookback, oldest in followers:
        age = None if oldest is None else max(now - oldest, timedelta(0))
        rows.setdefault(name, {}).update(
            parked=parked, claimed=claimed, past_lookback=past_lookback, oldest_parked_age=age
        )
    return [
        ScopeStatus.model_validate({"scope": name, **values})
        for name, values in sorted(rows.items())
        if scope is None or name == scope
    ]


async def peek_lost(
    store: Store, *, scope: str, now: datetime, durations: Durations | None = None
) -> list[str]:
    """The JSON of the followers ``get_lost_followers()`` would return, without claiming any."""
    durations = durations or Durations()
    return await store.peek_lost(
        scope,
        now=now,
        horizon=now - durations.preceding_event_lookback,
        seen_cutoff=now + durations.seen - durations.claim_timeout,
    )


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
    seen, leases = await store.expired_counts(now)
    if not dry_run:
        while await store.purge_expired(now, limit=PURGE_BATCH) == PURGE_BATCH:
            pass
    return PurgeResult(seen=seen, leases=leases, deleted=not dry_run)
