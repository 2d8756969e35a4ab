"""The SQL of the engine, built once per dialect from ``schema.py``.

Every statement takes its values as bound parameters (never literals), so SQLAlchemy compiles
each one once and reuses it; parameter ``x`` is bound as ``p_x`` and ``params()`` builds the
dict. Times are always passed in from the engine's clock: the database's clock as the Store
reads it (``store/_clock.py``), or a clock that a test or simulation injects to move time.

Two steps of the protocol change several rows at once: completing an event, and parking a
follower. The batch API has three more, each over a list of event ids bound as one parameter
(``_dialects.Dialect.id_list``): taking the leases of a batch, reading marks, and completing
a batch. Where the database can change several tables in one statement (data-modifying common
table expressions, Postgres), each is one statement, sent in autocommit: one round trip. Where
it cannot (SQLite), each is a few statements in one transaction under the single write lock.
``Queries.complete`` and ``Queries.park`` hide which.

Why parking never strands a follower, on both paths: the follower's statement upserts the
*leader's* events row (setting ``has_followers``) and reads that row's seen mark in the same
step, and the leader's completion upserts the same row to mark it seen. The row lock orders the
two, and an upsert always sees the newest committed version of its row. If the completion came
first, the follower sees the seen mark and does not park. If the follower came first, the
completion sees ``has_followers``; its own claim may have run on a snapshot older than the
follower's commit (a statement's snapshot is taken before it waits for the lock), so it claims
once more in a fresh statement, which sees the follower.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any
from uuid import UUID

from sqlalchemy import (
    Delete,
    Row,
    Select,
    String,
    Update,
    Uuid,
    and_,
    bindparam,
    case,
    cast,
    delete,
    exists,
    func,
    literal,
    null,
    or_,
    select,
    true,
    tuple_,
)
from sqlalchemy import update as sa_update

from ordering_sql.schema import UtcDateTime, events, followers
from ordering_sql.store._dialects import dialect_for
from ordering_sql.store._driver import Connection

__all__ = ["Queries", "params", "queries_for"]


def _p(name: str, **kwargs: Any) -> Any:
    """A bound parameter. Named ``p_<name>``: SQLAlchemy reserves column names in UPDATE."""
    return bindparam(f"p_{name}", **kwargs)


_scope = _p("scope")
_event_id = _p("event_id", type_=Uuid())
_now = _p("now", type_=UtcDateTime())
_owner = _p("owner", type_=Uuid())
_leader_id = _p("leader_id", type_=Uuid())


def params(**values: Any) -> dict[str, Any]:
    """Parameters for the statements below: ``params(scope=...)`` binds ``p_scope``."""
    return {f"p_{name}": value for name, value in values.items()}


def _leader_mark(column: str) -> Any:
    """A scalar subquery: one mark of the event ``leader_id`` in this scope."""
    leader = events.alias("leader")
    return (
        select(leader.c[column])
        .where(leader.c.scope == _scope, leader.c.event_id == _leader_id)
        .scalar_subquery()
    )


def _not_live(column: Any) -> Any:
    return or_(column.is_(None), column <= _now)


def _later(column: Any, value: Any) -> Any:
    """The later of a column and a value (NULL counts as earliest)."""
    return case((column > value, column), else_=value)


def _free_or_ours(insert: Any) -> Any:
    """The lease rule, for an upsert of rows owned by ``excluded.owner``: the row's lease is the
    same owner's already, or nobody holds it (no live lease) and the event is not seen.

    Taking, renewing and completing all follow it. So a holder whose lease expired can still
    renew it and complete the event as long as nobody else took it over meanwhile, even after
    the purge deleted its row or a follower re-created it as a placeholder; and it is refused
    as soon as another worker really holds the event or has finished it.
    """
    return or_(
        events.c.owner == insert.excluded.owner,
        and_(_not_live(events.c.lease_until), _not_live(events.c.seen_until)),
    )


def _take_lease(insert: Any) -> Any:
    """``insert`` (of lease rows) as an upsert that takes (or renews) each lease by the lease
    rule, ``_free_or_ours``: the rule of ``Queries.acquire``."""
    return insert.on_conflict_do_update(
        index_elements=[events.c.scope, events.c.event_id],
        set_={
            "owner": insert.excluded.owner,
            "lease_until": insert.excluded.lease_until,
            # The seen mark is not live here, so the lease is the row's only live mark.
            "expires_at": insert.excluded.expires_at,
        },
        where=_free_or_ours(insert),
    )


def _end_lease_as_seen(insert: Any) -> Any:
    """``insert`` (of seen rows) as an upsert that marks each event seen and ends its lease by
    the lease rule, ``_free_or_ours`` (a missing row is written anew): ``Queries.mark_done``.

    The owner is written too, so a stale holder that completes later is refused: the event is
    seen and the row is no longer its own.
    """
    return insert.on_conflict_do_update(
        index_elements=[events.c.scope, events.c.event_id],
        set_={
            "owner": insert.excluded.owner,
            "lease_until": None,
            "seen_until": insert.excluded.seen_until,
            "expires_at": insert.excluded.expires_at,
        },
        where=_free_or_ours(insert),
    )


@dataclass(frozen=True, slots=True)
class Queries:
    #: Whether multi-row steps are single statements (sent in autocommit), or several
    #: statements that need the caller's transaction.
    single_statement_steps: bool
    #: The value of an id-list parameter (``ids``, ``leaders``) from event ids.
    bind_ids: Callable[[Iterable[UUID]], Any]
    #: Take the processing lease of ``event_id`` for ``owner``: succeeds (returns a row) only if
    #: no live lease exists and the event is not seen, or if ``owner`` already holds it (so a
    #: retried statement whose first commit went through is harmless). It is one statement on
    #: one row: Postgres re-checks the WHERE clause on the newest row version under the row lock
    #: taken by ON CONFLICT, and SQLite runs it under its single write lock, so two concurrent
    #: callers can never both succeed. The row returned also carries the marks of ``leader_id``
    #: (NULL if unknown), so the leader check costs no second round trip.
    acquire: Any
    #: Mark ``event_id`` seen and end its lease, only if ``owner`` still holds it (or no row
    #: exists at all). Returns ``has_followers``; no row means the lease was taken over.
    mark_done: Any
    #: ``mark_done`` + forget the event's own parked row + claim its followers, one statement
    #: (Postgres only); one row per claimed follower, or one row of NULLs if none.
    complete_and_claim: Any
    #: ``mark_done`` + forget the event's own parked row, one statement (Postgres only).
    complete_only: Any
    #: End the lease held by ``owner``; a no-op if someone else holds it now.
    release: Update
    #: End the lease whoever holds it (the reference's ``forget_event_is_processing``).
    release_any: Update
    #: Mark seen, leaving any lease as it is (the reference's ``record_event_as_seen``).
    mark_seen: Any
    #: ``seen_until`` and ``lease_until`` of one event.
    marks: Select[Any]
    #: Flag the leader's row (creating a placeholder if needed) and return its seen mark.
    flag_leader: Any
    #: Park (or re-park) a follower, unclaimed.
    store_follower: Any
    #: flag_leader + store_follower (unless the leader is seen) + release the follower's own
    #: lease, one statement (Postgres only); returns the leader's seen mark. The two events
    #: rows are changed by one upsert in id order, the order in which every batch takes its
    #: row locks, so parking and a batch can never deadlock. The release does not depend on
    #: the leader (whose row may be locked only after the follower's): where the leader turns
    #: out seen, the caller takes its lease back (``CausalOrdering._park``).
    park_if_leader_unseen: Any
    #: flag_leader + store_follower, one statement (Postgres only).
    park_always: Any
    #: Claim the unclaimed (or expired-claim) followers of ``leader_id`` for ``owner``; those
    #: ``owner`` claimed already come back too, so a retried completion returns them again. An
    #: event that names itself as its leader follows nothing, so it is never its own follower.
    claim_followers: Any
    #: Extend the claims ``owner`` holds on the followers of ``leaders`` (while it replays them).
    renew_claims: Update
    forget_follower: Delete
    followers_of: Select[Any]
    followers_by_id: Select[Any]
    #: Claim the lost followers (see ``lost`` below) for ``owner``, as a completion claims, and
    #: return them; those ``owner`` claimed already come back too, so a retried sweep returns
    #: what its first attempt took. With ``drop_handled`` on SQLite (one statement on Postgres).
    take_lost: Any
    #: Delete the lost followers whose own event is seen: they were handled, nothing to return.
    drop_handled_lost: Delete
    peek_lost: Select[Any]
    clear_events: Delete
    clear_followers: Delete
    clear_all_events: Delete
    clear_all_followers: Delete
    #: Delete at most ``p_limit`` event rows whose marks have all expired (any scope), except
    #: those that followers still wait on.
    purge_events: Delete
    #: How many rows a purge would delete: seen records, then leases never completed.
    expired_counts: Any

    # -- batches: ``ids`` (and ``leaders``) are id lists, see ``Dialect.bind_ids`` -----------

    #: ``acquire`` for every event of ``ids`` at once, for one ``owner``; returns the ids taken.
    acquire_many: Any
    #: ``event_id``, ``seen_until`` and ``lease_until`` of the events of ``ids``.
    marks_many: Select[Any]
    #: ``release`` for the events of ``ids`` that ``owner`` holds.
    release_many: Update
    #: Mark seen and end the lease of the events of ``ids`` that ``owner`` holds (or that have
    #: no row at all); returns their ``event_id`` and ``has_followers``.
    done_many: Any
    #: Forget the parked rows of the events of ``ids``.
    forget_many: Delete
    #: Claim for ``owner`` the followers of the events of ``leaders``, except the events of
    #: ``ids`` (handled in the batch itself); returns them with their ``leader_id``.
    claim_many: Any
    #: done_many + forget_many + claim_many as one statement (Postgres only): one row per
    #: (done event, claimed follower), the follower columns NULL where it has none.
    complete_many_statement: Any

    # -- the two multi-row steps --------------------------------------------------------------

    async def complete(
        self, conn: Connection, values: dict[str, Any], *, claim: bool
    ) -> list[Row[Any]] | None:
        """Mark done, forget the own parked row, and (with ``claim``) claim the followers.

        Returns the claimed followers' rows (``event``, ``occurred``, ``follower_id``), or None
        if ``owner`` no longer holds the lease (then nothing was written).
        """
        if self.single_statement_steps:
            statement = self.complete_and_claim if claim else self.complete_only
            rows = (await conn.execute(statement, values)).all()
            if not rows:
                return None
            has_followers = bool(rows[0].has_followers)
            claimed = [row for row in rows if row.follower_id is not None]
        else:
            done = (await conn.execute(self.mark_done, values)).first()
            if done is None:
                return None
            await conn.execute(self.forget_follower, values)
            has_followers = bool(done.has_followers)
            claimed = []
        if claim and has_followers:
            # A fresh statement: it sees followers whose park committed after the snapshot
            # of the statement above was taken (see the module docstring).
            again = (await conn.execute(self.claim_followers, values)).all()
            seen = {row.follower_id for row in claimed}
            claimed += [row for row in again if row.follower_id not in seen]
        return claimed

    async def complete_many(
        self, conn: Connection, values: dict[str, Any]
    ) -> tuple[set[Any], list[Row[Any]]]:
        """Complete the events of ``ids`` that ``owner`` still holds, and claim their followers.

        Returns the ids completed and the claimed followers' rows (``event``, ``occurred``,
        ``follower_id``, ``leader_id``). Ids missing from the first were taken over.
        """
        if self.single_statement_steps:
            rows = (await conn.execute(self.complete_many_statement, values)).all()
            done = {row.event_id for row in rows}
            flagged = {row.event_id for row in rows if row.has_followers}
            claimed = [row for row in rows if row.follower_id is not None]
        else:
            marked = (await conn.execute(self.done_many, values)).all()
            done = {row.event_id for row in marked}
            flagged = {row.event_id for row in marked if row.has_followers}
            await conn.execute(self.forget_many, {**values, "p_ids": self.bind_ids(done)})
            claimed = []
        if flagged:
            # A fresh statement, as in ``complete``: it sees followers parked meanwhile.
            again = {**values, "p_leaders": self.bind_ids(flagged)}
            known = {row.follower_id for row in claimed}
            claimed += [
                row
                for row in (await conn.execute(self.claim_many, again)).all()
                if row.follower_id not in known
            ]
        return done, claimed

    async def sweep(self, conn: Connection, values: dict[str, Any]) -> list[Row[Any]]:
        """Drop the lost followers that were handled; claim the rest for ``owner``.

        Returns the claimed followers' rows (``event``, ``occurred``, ``follower_id``).
        """
        if not self.single_statement_steps:
            await conn.execute(self.drop_handled_lost, values)
        return list((await conn.execute(self.take_lost, values)).all())

    async def park(
        self, conn: Connection, values: dict[str, Any], *, unless_leader_seen: bool
    ) -> bool:
        """Store a follower and flag its leader; False (and nothing parked) if the leader is seen.

        With ``unless_leader_seen``, the follower's own lease (``owner``) is ended in the same
        step; on Postgres even when the leader turns out seen (``park_if_leader_unseen``), so a
        caller that goes ahead then takes its lease back. Without it, the follower is stored
        whatever the leader's state.
        """
        if self.single_statement_steps:
            statement = self.park_if_leader_unseen if unless_leader_seen else self.park_always
            rows = {values["p_leader_id"]}
            if unless_leader_seen:
                rows.add(values["p_event_id"])  # the follower's own lease ends too
            values = {**values, "p_ids": self.bind_ids(sorted(rows))}  # one lock order
            leader_seen_until = (await conn.execute(statement, values)).scalar_one_or_none()
        else:
            leader_seen_until = (await conn.execute(self.flag_leader, values)).scalar_one()
        if unless_leader_seen and leader_seen_until and leader_seen_until > values["p_now"]:
            return False
        if not self.single_statement_steps:
            await conn.execute(self.store_follower, values)
            if unless_leader_seen:
                await conn.execute(self.release, values)
        return True


@cache
def queries_for(dialect_name: str) -> Queries:
    dialect = dialect_for(dialect_name)
    key = [events.c.scope, events.c.event_id]
    this_event = and_(events.c.scope == _scope, events.c.event_id == _event_id)
    in_scope = followers.c.scope == _scope

    acquire_ins = dialect.insert(events).values(
        scope=_scope,
        event_id=_event_id,
        owner=_owner,
        lease_until=_p("lease_until"),
        seen_until=None,
        expires_at=_p("lease_until"),
    )
    acquire = _take_lease(acquire_ins).returning(
        events.c.event_id,
        _leader_mark(events.c.seen_until.key).label("leader_seen_until"),
        _leader_mark(events.c.lease_until.key).label("leader_lease_until"),
    )

    done_ins = dialect.insert(events).values(
        scope=_scope,
        event_id=_event_id,
        owner=_owner,
        lease_until=None,
        seen_until=_p("seen_until"),
        expires_at=_p("seen_until"),
    )
    mark_done = _end_lease_as_seen(done_ins).returning(events.c.has_followers)

    # Without a lease the row lives as long as its seen mark, or is purgeable at once.
    released = {
        "lease_until": None,
        "expires_at": func.coalesce(events.c.seen_until, _now),
    }
    release = sa_update(events).where(this_event, events.c.owner == _owner).values(released)
    release_any = sa_update(events).where(this_event).values(released)

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
            "expires_at": _later(events.c.lease_until, seen_ins.excluded.seen_until),
        },
    )

    marks = select(events.c.seen_until, events.c.lease_until).where(this_event)

    # The leader's row holds the flag for as long as its followers may wait for it.
    hold_until = _p("hold_until", type_=UtcDateTime())
    flag_ins = dialect.insert(events).values(
        scope=_scope,
        event_id=_leader_id,
        owner=None,
        lease_until=None,
        seen_until=None,
        expires_at=hold_until,
        has_followers=True,
    )
    flag_leader = flag_ins.on_conflict_do_update(
        index_elements=key,
        set_={"has_followers": True, "expires_at": _later(events.c.expires_at, hold_until)},
    ).returning(events.c.seen_until)

    follower_values = {
        "scope": _scope,
        "follower_id": _event_id,
        "leader_id": _leader_id,
        "occurred": _p("occurred", type_=UtcDateTime()),
        "received": _p("received", type_=UtcDateTime()),
        "event": _p("event"),
        "claimed_by": None,
        "claimed_until": None,
    }
    store_ins = dialect.insert(followers).values(follower_values)
    refresh_follower = {
        "leader_id": store_ins.excluded.leader_id,
        "occurred": store_ins.excluded.occurred,
        "received": store_ins.excluded.received,
        "event": store_ins.excluded.event,
        "claimed_by": None,
        "claimed_until": None,
    }
    store_follower = store_ins.on_conflict_do_update(
        index_elements=[followers.c.scope, followers.c.follower_id], set_=refresh_follower
    )

    claimed_until = _p("claimed_until", type_=UtcDateTime())
    claim_followers = (
        sa_update(followers)
        .where(
            in_scope,
            followers.c.leader_id == _leader_id,
            followers.c.follower_id != _leader_id,
            or_(_not_live(followers.c.claimed_until), followers.c.claimed_by == _owner),
        )
        .values(claimed_by=_owner, claimed_until=claimed_until)
        .returning(followers.c.event, followers.c.occurred, followers.c.follower_id)
    )
    renew_claims = (
        sa_update(followers)
        .where(
            in_scope,
            dialect.in_ids(followers.c.leader_id, "leaders"),
            followers.c.claimed_by == _owner,
        )
        .values(claimed_until=claimed_until)
    )
    forget_follower = delete(followers).where(in_scope, followers.c.follower_id == _event_id)

    if dialect.single_statement_steps:
        complete_and_claim, complete_only = _completion_statements(
            mark_done, forget_follower, claim_followers
        )
        park_if_leader_unseen, park_always = _park_statements(
            dialect, follower_values, refresh_follower
        )
    else:
        complete_and_claim = complete_only = park_if_leader_unseen = park_always = None

    followers_of = (
        select(followers.c.event)
        .where(in_scope, followers.c.leader_id == _leader_id)
        .order_by(followers.c.occurred, followers.c.follower_id)
    )
    followers_by_id = (
        select(followers.c.event)
        .where(in_scope, dialect.in_ids(followers.c.follower_id, "ids"))
        .order_by(followers.c.occurred, followers.c.follower_id)
    )

    # Lost: never claimed and received before the lookback horizon; or claimed by a leader
    # whose claim expired (that worker died, or the handler for this follower failed); or never
    # claimed although its leader was marked seen at least a claim timeout ago (a completion
    # that died between its two statements, or a leader marked seen by record_event_as_seen).
    leader = events.alias("leader")
    leader_done_a_while_ago = exists().where(
        leader.c.scope == followers.c.scope,
        leader.c.event_id == followers.c.leader_id,
        leader.c.seen_until > _now,
        leader.c.seen_until <= _p("seen_cutoff", type_=UtcDateTime()),
    )
    # An event that waits behind the worker holding it (``CausalOrdering.wait_for_holder``) is
    # stored as its own follower: lost once nobody holds it.
    own = events.alias("own")
    own_held = exists().where(
        own.c.scope == followers.c.scope,
        own.c.event_id == followers.c.follower_id,
        own.c.lease_until > _now,
    )
    behind_a_dead_holder = and_(followers.c.leader_id == followers.c.follower_id, ~own_held)
    lost = or_(
        and_(
            followers.c.claimed_until.is_(None),
            or_(
                followers.c.received <= _p("horizon", type_=UtcDateTime()),
                leader_done_a_while_ago,
                behind_a_dead_holder,
            ),
        ),
        and_(followers.c.claimed_until.is_not(None), followers.c.claimed_until <= _now),
    )
    # A lost follower whose own event is seen was handled (by record_event_as_seen, or by a
    # worker whose replay skipped it): it is dropped, never handed out again.
    handled = exists().where(
        own.c.scope == followers.c.scope,
        own.c.event_id == followers.c.follower_id,
        own.c.seen_until > _now,
    )
    drop_handled_lost = delete(followers).where(in_scope, lost, handled)
    claim_lost = (
        sa_update(followers)
        .where(in_scope, or_(lost, followers.c.claimed_by == _owner), ~handled)
        .values(claimed_by=_owner, claimed_until=claimed_until)
        .returning(followers.c.event, followers.c.occurred, followers.c.follower_id)
    )
    take_lost: Any
    if dialect.single_statement_steps:
        dropped = drop_handled_lost.cte("dropped")
        claimed_lost = claim_lost.cte("claimed_lost")
        take_lost = select(
            claimed_lost.c.event, claimed_lost.c.occurred, claimed_lost.c.follower_id
        ).add_cte(dropped)
    else:
        take_lost = claim_lost
    peek_lost = (
        select(followers.c.event)
        .where(in_scope, lost, ~handled)
        .order_by(followers.c.occurred, followers.c.follower_id)
    )

    expired = events.c.expires_at <= _now
    still_awaited = and_(
        events.c.has_followers,
        exists().where(
            followers.c.scope == events.c.scope, followers.c.leader_id == events.c.event_id
        ),
    )
    purgeable = and_(expired, ~still_awaited)
    expired_counts = select(
        func.count().filter(events.c.seen_until.is_not(None)).label("seen"),
        func.count().filter(events.c.seen_until.is_(None)).label("leases"),
    ).where(purgeable)

    batch = _batch_statements(dialect, released)

    return Queries(
        single_statement_steps=dialect.single_statement_steps,
        bind_ids=dialect.bind_ids,
        acquire=acquire,
        mark_done=mark_done,
        complete_and_claim=complete_and_claim,
        complete_only=complete_only,
        release=release,
        release_any=release_any,
        mark_seen=mark_seen,
        marks=marks,
        flag_leader=flag_leader,
        store_follower=store_follower,
        park_if_leader_unseen=park_if_leader_unseen,
        park_always=park_always,
        claim_followers=claim_followers,
        renew_claims=renew_claims,
        forget_follower=forget_follower,
        followers_of=followers_of,
        followers_by_id=followers_by_id,
        take_lost=take_lost,
        drop_handled_lost=drop_handled_lost,
        peek_lost=peek_lost,
        clear_events=delete(events).where(events.c.scope == _scope),
        clear_followers=delete(followers).where(in_scope),
        clear_all_events=delete(events),
        clear_all_followers=delete(followers),
        # The purge test stands in the DELETE's own WHERE too: under Postgres's READ
        # COMMITTED, a row that was re-leased while the DELETE waited for its lock is
        # re-checked against this WHERE (not the subquery's), and so is kept.
        purge_events=delete(events).where(
            purgeable,
            tuple_(events.c.scope, events.c.event_id).in_(
                select(events.c.scope, events.c.event_id).where(purgeable).limit(_p("limit"))
            ),
        ),
        expired_counts=expired_counts,
        **batch,
    )


def _batch_statements(dialect: Any, released: dict[str, Any]) -> dict[str, Any]:
    """The statements of the batch API; each takes its event ids as one list parameter."""
    in_scope = events.c.scope == _scope
    ids = dialect.id_list("ids").subquery("ids")
    lease_until = _p("lease_until", type_=UtcDateTime())
    # WHERE true: SQLite would otherwise read ON CONFLICT as the SELECT's join constraint.
    rows = select(cast(_scope, String()), ids.c.id, _owner, lease_until, null(), lease_until).where(
        true()
    )
    acquire_ins = dialect.insert(events).from_select(
        ["scope", "event_id", "owner", "lease_until", "seen_until", "expires_at"], rows
    )
    acquire_many = _take_lease(acquire_ins).returning(events.c.event_id)

    held = and_(in_scope, dialect.in_ids(events.c.event_id, "ids"), events.c.owner == _owner)
    seen_until = _p("seen_until", type_=UtcDateTime())
    # An upsert like the single ``mark_done``: a row purged after its lease expired (nobody
    # took the event over) is written anew; a row another owner holds is left alone.
    done_rows = select(
        cast(_scope, String()), ids.c.id, _owner, null(), seen_until, seen_until
    ).where(true())
    done_ins = dialect.insert(events).from_select(
        ["scope", "event_id", "owner", "lease_until", "seen_until", "expires_at"], done_rows
    )
    done_many = _end_lease_as_seen(done_ins).returning(events.c.event_id, events.c.has_followers)
    followers_in_scope = followers.c.scope == _scope
    unclaimed_or_ours = or_(_not_live(followers.c.claimed_until), followers.c.claimed_by == _owner)
    claim_values = {
        "claimed_by": _owner,
        "claimed_until": _p("claimed_until", type_=UtcDateTime()),
    }
    claimed_columns = (
        followers.c.event,
        followers.c.occurred,
        followers.c.follower_id,
        followers.c.leader_id,
    )
    claim_many = (
        sa_update(followers)
        .where(
            followers_in_scope,
            dialect.in_ids(followers.c.leader_id, "leaders"),
            ~dialect.in_ids(followers.c.follower_id, "ids"),
            unclaimed_or_ours,
        )
        .values(claim_values)
        .returning(*claimed_columns)
    )
    forget_many = delete(followers).where(
        followers_in_scope, dialect.in_ids(followers.c.follower_id, "ids")
    )

    complete_many_statement = None
    if dialect.single_statement_steps:
        done = done_many.cte("done")
        done_ids = select(done.c.event_id)
        forgot = (
            delete(followers)
            .where(followers_in_scope, followers.c.follower_id.in_(done_ids))
            .cte("forgot")
        )
        claimed = (
            sa_update(followers)
            .where(
                followers_in_scope,
                followers.c.leader_id.in_(done_ids),
                ~dialect.in_ids(followers.c.follower_id, "ids"),
                unclaimed_or_ours,
            )
            .values(claim_values)
            .returning(*claimed_columns)
            .cte("claimed")
        )
        complete_many_statement = (
            select(
                done.c.event_id,
                done.c.has_followers,
                claimed.c.event,
                claimed.c.occurred,
                claimed.c.follower_id,
                claimed.c.leader_id,
            )
            .select_from(done.outerjoin(claimed, claimed.c.leader_id == done.c.event_id))
            .add_cte(forgot)
        )

    return {
        "acquire_many": acquire_many,
        "marks_many": select(events.c.event_id, events.c.seen_until, events.c.lease_until).where(
            in_scope, dialect.in_ids(events.c.event_id, "ids")
        ),
        "release_many": sa_update(events).where(held).values(released),
        "done_many": done_many,
        "forget_many": forget_many,
        "claim_many": claim_many,
        "complete_many_statement": complete_many_statement,
    }


def _completion_statements(mark_done: Any, forget: Any, claim: Any) -> tuple[Any, Any]:
    """Completion as one statement: data-modifying CTEs, each acting only if ``done`` did."""
    done = mark_done.cte("done")
    did = exists(select(done.c.has_followers))
    forgot = forget.where(did).cte("forgot")
    claimed = claim.where(did).cte("claimed")
    complete_and_claim = (
        select(done.c.has_followers, claimed.c.event, claimed.c.occurred, claimed.c.follower_id)
        .select_from(done.outerjoin(claimed, true()))
        .add_cte(forgot)
    )
    complete_only = select(
        done.c.has_followers,
        literal(None).label("event"),
        literal(None).label("occurred"),
        literal(None, Uuid()).label("follower_id"),
    ).add_cte(forgot)
    return complete_and_claim, complete_only


def _park_statements(
    dialect: Any, values: dict[str, Any], refresh: dict[str, Any]
) -> tuple[Any, Any]:
    """Parking as one statement: flag the leader, end the follower's own lease, store it.

    The leader's row and the follower's own row are changed by one upsert over ``ids`` (both
    ids, sorted), so their row locks are taken in id order, as every batch takes its locks. The
    leader's row is flagged (created as a placeholder if needed); the follower's lease is ended
    if ``owner`` holds it, whatever the leader's state, since in id order its row may come
    first. The follower is stored only if the leader is not seen.
    """
    hold_until = _p("hold_until", type_=UtcDateTime())
    ids = dialect.id_list("ids").subquery("park_ids")
    is_leader = ids.c.id == _leader_id
    rows = select(
        cast(_scope, String()),
        ids.c.id,
        null(),
        null(),
        null(),
        case((is_leader, hold_until), else_=_now),
        is_leader,
    ).where(true())  # WHERE true: as in the batch statements, for SQLite's parser
    insert = dialect.insert(events).from_select(
        ["scope", "event_id", "owner", "lease_until", "seen_until", "expires_at", "has_followers"],
        rows,
    )
    excluded = insert.excluded
    ours = and_(excluded.event_id == _event_id, events.c.owner == _owner)
    locked = (
        insert.on_conflict_do_update(
            index_elements=[events.c.scope, events.c.event_id],
            set_={
                "has_followers": or_(events.c.has_followers, excluded.has_followers),
                "lease_until": case((ours, null()), else_=events.c.lease_until),
                "expires_at": case(
                    (excluded.has_followers, _later(events.c.expires_at, hold_until)),
                    (ours, func.coalesce(events.c.seen_until, _now)),
                    else_=events.c.expires_at,
                ),
            },
        )
        .returning(events.c.event_id, events.c.seen_until)
        .cte("locked")
    )
    leader = select(locked.c.seen_until).where(locked.c.event_id == _leader_id).cte("leader")
    leader_seen = exists(select(leader.c.seen_until).where(leader.c.seen_until > _now))
    columns = list(values)
    stored_when_unseen = dialect.insert(followers).from_select(
        columns, select(*(values[c] for c in columns)).where(~leader_seen)
    )
    stored_always = dialect.insert(followers).from_select(
        columns, select(*(values[c] for c in columns)).where(exists(select(leader.c.seen_until)))
    )
    key = [followers.c.scope, followers.c.follower_id]

    def upsert(insert: Any) -> Any:
        excluded = insert.excluded
        return insert.on_conflict_do_update(
            index_elements=key, set_={name: getattr(excluded, name) for name in refresh}
        ).cte()

    park_if_unseen = select(leader.c.seen_until).add_cte(upsert(stored_when_unseen))
    park_always = select(leader.c.seen_until).add_cte(upsert(stored_always))
    return park_if_unseen, park_always


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
