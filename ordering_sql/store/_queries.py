"""The SQL statements of the engine, built once per dialect from ``schema.py``.

Every statement takes its values as bound parameters (never literals), so SQLAlchemy compiles
each one once and reuses it; parameter ``x`` is bound as ``p_x`` and ``params()`` builds the
dict. Times are always passed in from the engine's clock: the database's own ``now()`` is never
consulted, so tests and simulations can move time.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from sqlalchemy import (
    Delete,
    Select,
    Update,
    and_,
    bindparam,
    case,
    delete,
    func,
    or_,
    select,
    tuple_,
)
from sqlalchemy import update as sa_update

from ordering_sql.schema import UtcDateTime, events, followers
from ordering_sql.store._dialects import dialect_for

__all__ = ["Queries", "params", "queries_for"]


def _p(name: str, **kwargs: Any) -> Any:
    """A bound parameter. Named ``p_<name>``: SQLAlchemy reserves column names in UPDATE."""
    return bindparam(f"p_{name}", **kwargs)


_scope = _p("scope")
_event_id = _p("event_id")
_now = _p("now", type_=UtcDateTime())
_owner = _p("owner")


def params(**values: Any) -> dict[str, Any]:
    """Parameters for the statements below: ``params(scope=...)`` binds ``p_scope``."""
    return {f"p_{name}": value for name, value in values.items()}


def _leader_mark(column: str) -> Any:
    """A scalar subquery: one mark of the event ``leader_id`` in this scope."""
    leader = events.alias("leader")
    return (
        select(leader.c[column])
        .where(leader.c.scope == _scope, leader.c.event_id == _p("leader_id"))
        .scalar_subquery()
    )


def _not_live(column: Any) -> Any:
    return or_(column.is_(None), column <= _now)


@dataclass(frozen=True, slots=True)
class Queries:
    #: Take the processing lease of ``event_id`` for ``owner``: succeeds (returns a row) only if
    #: no live lease exists and the event is not seen, or if ``owner`` already holds it (so a
    #: retried statement whose first commit went through is harmless). It is one statement on
    #: one row: Postgres re-checks the WHERE clause on the newest row version under the row lock
    #: taken by ON CONFLICT, and SQLite runs it under its single write lock, so two concurrent
    #: callers can never both succeed. The row returned also carries the marks of ``leader_id``
    #: (NULL if unknown), so the leader check costs no second round trip.
    acquire: Any
    #: Mark ``event_id`` seen and end its lease, only if ``owner`` still holds it (or no row
    #: exists at all). Returns a row on success; no row means the lease was taken over.
    complete: Any
    #: End the lease held by ``owner``; a no-op if someone else holds it now.
    release: Update
    #: End the lease whoever holds it (the reference's ``forget_event_is_processing``).
    release_any: Update
    #: Extend the lease ``owner`` still holds (not one it ended or lost) to ``lease_until``.
    renew: Update
    #: Mark seen, leaving any lease as it is (the reference's ``record_event_as_seen``).
    mark_seen: Any
    #: ``seen_until`` and ``lease_until`` of one event.
    marks: Select[Any]
    #: Park (or re-park) a follower, unclaimed.
    park: Any
    #: Claim the unclaimed (or expired-claim) followers of ``leader_id`` for ``owner``; those
    #: ``owner`` claimed already come back too, so a retried completion returns them again.
    claim_followers: Any
    forget_follower: Delete
    followers_of: Select[Any]
    followers_by_id: Select[Any]
    #: Delete and return the followers whose leader never came, or whose claim expired.
    take_lost: Any
    peek_lost: Select[Any]
    clear_events: Delete
    clear_followers: Delete
    clear_all_events: Delete
    clear_all_followers: Delete
    #: Delete at most ``p_limit`` event rows whose marks have all expired (any scope).
    purge_events: Delete
    #: How many rows a purge would delete: seen records, then leases never completed.
    expired_counts: Any


@cache
def queries_for(dialect_name: str) -> Queries:
    dialect = dialect_for(dialect_name)
    key = [events.c.scope, events.c.event_id]

    acquire_ins = dialect.insert(events).values(
        scope=_scope,
        event_id=_event_id,
        owner=_owner,
        lease_until=_p("lease_until"),
        seen_until=None,
        expires_at=_p("lease_until"),
    )
    acquire = acquire_ins.on_conflict_do_update(
        index_elements=key,
        set_={
            "owner": acquire_ins.excluded.owner,
            "lease_until": acquire_ins.excluded.lease_until,
            # The seen mark is not live here, so the lease is the row's only live mark.
            "expires_at": acquire_ins.excluded.expires_at,
        },
        where=or_(
            events.c.owner == acquire_ins.excluded.owner,
            and_(_not_live(events.c.lease_until), _not_live(events.c.seen_until)),
        ),
    ).returning(
        events.c.event_id,
        _leader_mark(events.c.seen_until.key).label("leader_seen_until"),
        _leader_mark(events.c.lease_until.key).label("leader_lease_until"),
    )

    complete_ins = dialect.insert(events).values(
        scope=_scope,
        event_id=_event_id,
        owner=_owner,
        lease_until=None,
        seen_until=_p("seen_until"),
        expires_at=_p("seen_until"),
    )
    complete = complete_ins.on_conflict_do_update(
        index_elements=key,
        set_={
            "lease_until": None,
            "seen_until": complete_ins.excluded.seen_until,
            "expires_at": complete_ins.excluded.expires_at,
        },
        where=events.c.owner == complete_ins.excluded.owner,
    ).returning(events.c.event_id)

    this_event = and_(events.c.scope == _scope, events.c.event_id == _event_id)
    # Without a lease the row lives as long as its seen mark, or is purgeable at once.
    released = {
        "lease_until": None,
        "expires_at": func.coalesce(events.c.seen_until, _now),
    }
    release = sa_update(events).where(this_event, events.c.owner == _owner).values(released)
    release_any = sa_update(events).where(this_event).values(released)
    renewed_until = _p("lease_until")
    renew = (
        sa_update(events)
        .where(this_event, events.c.owner == _owner, events.c.lease_until.is_not(None))
        .values(
            lease_until=renewed_until,
            expires_at=case(
                (events.c.seen_until > renewed_until, events.c.seen_until), else_=renewed_until
            ),
        )
    )

    seen_ins = dialect.insert(events).values(
        scope=_scope,
        event_id=_event_id,
        owner=None,
        lease_until=None,
        seen_until=_p("seen_until"),
        expires_at=_p("seen_until"),
    )
    mark_seen = seen_ins.on_conflict_do_update(
        index_elements=key,
        set_={
            "seen_until": seen_ins.excluded.seen_until,
            "expires_at": case(
                (events.c.lease_until > seen_ins.excluded.seen_until, events.c.lease_until),
                else_=seen_ins.excluded.seen_until,
            ),
        },
    )

    marks = select(events.c.seen_until, events.c.lease_until).where(this_event)

    park_ins = dialect.insert(followers).values(
        scope=_scope,
        follower_id=_event_id,
        leader_id=_p("leader_id"),
        occurred=_p("occurred"),
        received=_p("received"),
        event=_p("event"),
        claimed_by=None,
        claimed_until=None,
    )
    park = park_ins.on_conflict_do_update(
        index_elements=[followers.c.scope, followers.c.follower_id],
        set_={
            "leader_id": park_ins.excluded.leader_id,
            "occurred": park_ins.excluded.occurred,
            "received": park_ins.excluded.received,
            "event": park_ins.excluded.event,
            "claimed_by": None,
            "claimed_until": None,
        },
    )

    in_scope = followers.c.scope == _scope
    claim_followers = (
        sa_update(followers)
        .where(
            in_scope,
            followers.c.leader_id == _p("leader_id"),
            or_(_not_live(followers.c.claimed_until), followers.c.claimed_by == _owner),
        )
        .values(claimed_by=_owner, claimed_until=_p("claimed_until"))
        .returning(followers.c.event, followers.c.occurred, followers.c.follower_id)
    )
    forget_follower = delete(followers).where(in_scope, followers.c.follower_id == _event_id)
    followers_of = (
        select(followers.c.event)
        .where(in_scope, followers.c.leader_id == _p("leader_id"))
        .order_by(followers.c.occurred, followers.c.follower_id)
    )
    followers_by_id = (
        select(followers.c.event)
        .where(in_scope, followers.c.follower_id.in_(_p("ids", expanding=True)))
        .order_by(followers.c.occurred, followers.c.follower_id)
    )
    # Lost: never claimed and received before the lookback horizon, or claimed by a leader whose
    # claim expired (that leader crashed or its handler for this follower failed).
    lost = or_(
        and_(followers.c.claimed_until.is_(None), followers.c.received <= _p("horizon")),
        and_(followers.c.claimed_until.is_not(None), followers.c.claimed_until <= _now),
    )
    take_lost = (
        delete(followers)
        .where(in_scope, lost)
        .returning(followers.c.event, followers.c.occurred, followers.c.follower_id)
    )
    peek_lost = (
        select(followers.c.event)
        .where(in_scope, lost)
        .order_by(followers.c.occurred, followers.c.follower_id)
    )

    expired = events.c.expires_at <= _now
    expired_counts = select(
        func.count().filter(events.c.seen_until.is_not(None)).label("seen"),
        func.count().filter(events.c.seen_until.is_(None)).label("leases"),
    ).where(expired)

    return Queries(
        expired_counts=expired_counts,
        acquire=acquire,
        complete=complete,
        release=release,
        release_any=release_any,
        renew=renew,
        mark_seen=mark_seen,
        marks=marks,
        park=park,
        claim_followers=claim_followers,
        forget_follower=forget_follower,
        followers_of=followers_of,
        followers_by_id=followers_by_id,
        take_lost=take_lost,
        peek_lost=peek_lost,
        clear_events=delete(events).where(events.c.scope == _scope),
        clear_followers=delete(followers).where(in_scope),
        clear_all_events=delete(events),
        clear_all_followers=delete(followers),
        # The expiry test stands in the DELETE's own WHERE too: under Postgres's READ
        # COMMITTED, a row that was re-leased while the DELETE waited for its lock is
        # re-checked against this WHERE (not the subquery's), and so is kept.
        purge_events=delete(events).where(
            expired,
            tuple_(events.c.scope, events.c.event_id).in_(
                select(events.c.scope, events.c.event_id).where(expired).limit(_p("limit"))
            ),
        ),
    )


def scope_counts(now: Any, horizon: Any) -> tuple[Select[Any], Select[Any]]:
    """Per-scope counts for ``ordering-sql status``: one query per table, grouped by scope.

    ``now`` and ``horizon`` (now minus the lookback) are literal values here: these queries run
    once per command, not on a hot path.
    """
    seen_live = and_(events.c.seen_until.is_not(None), events.c.seen_until > now)
    lease_live = and_(events.c.lease_until.is_not(None), events.c.lease_until > now)
    events_q = select(
        events.c.scope,
        func.count().filter(seen_live).label("seen"),
        func.count().filter(events.c.seen_until.is_not(None), ~seen_live).label("seen_expired"),
        func.count().filter(lease_live).label("processing"),
        func.count()
        .filter(events.c.lease_until.is_not(None), ~lease_live)
        .label("processing_expired"),
    ).group_by(events.c.scope)
    followers_q = select(
        followers.c.scope,
        func.count().label("parked"),
        func.count().filter(followers.c.claimed_until.is_not(None)).label("claimed"),
        func.count().filter(followers.c.received <= horizon).label("past_lookback"),
        func.min(followers.c.received).label("oldest_received"),
    ).group_by(followers.c.scope)
    return events_q, followers_q
