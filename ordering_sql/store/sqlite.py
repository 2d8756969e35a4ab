"""The protocol's steps on SQLite: a few statements in one transaction, in one hop to its thread.

SQLite has no data-modifying CTEs, so a step is several statements; they run inside one
``BEGIN IMMEDIATE`` transaction (the database's single write lock, taken up front), and the
whole unit runs as one function in the thread of its connection (``ThreadConnection``): one hop
from the event loop per unit, not one per statement through an async adapter. Several callers'
requests, of any of the write steps, can share one unit (``store/_merge.py``): one lock and one
commit (one flush to disk) for all of them. Why parking never strands a follower: see
``store/_steps.py`` (here the write lock orders parking and completion).

Values are stored as SQLAlchemy stores them on SQLite (the schema is SQLAlchemy's, and its
migrations and operator views read the same rows): times as ``YYYY-MM-DD HH:MM:SS.ffffff`` in
UTC, ids as 32 hex digits, flags as 0/1.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Protocol, TypeVar
from uuid import UUID

from ordering_sql.store._steps import (
    Claimed,
    Complete,
    Completed,
    Marks,
    Park,
    ReadMarks,
    Release,
    RenewClaims,
    Sweep,
    TakeLeases,
    Taken,
)

__all__ = ["Connection", "Cursor", "Params", "SqliteSteps"]

T = TypeVar("T")

Params = Mapping[str, Any]


class Cursor(Protocol):
    """Statements inside a unit: ``:name`` parameters, rows as tuples."""

    def rows(self, sql: str, params: Params = ...) -> list[tuple[Any, ...]]: ...

    def run(self, sql: str, params: Params = ...) -> int:
        """Execute; the number of rows changed."""
        ...


class Connection(Protocol):
    """What the steps run on: ``unit(fn, write=...)`` runs ``fn(cursor)`` as one transaction
    (a write one, ``BEGIN IMMEDIATE``, or a read one) and returns what ``fn`` returned."""

    async def unit(self, fn: Callable[[Cursor], T], *, write: bool) -> T: ...


# -- values as SQLAlchemy stores them -------------------------------------------------------------


def _t(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)


def _id(value: UUID) -> str:
    return value.hex


def _sql(text: str) -> str:
    """A statement's text on one line (as logged and prepared)."""
    return " ".join(text.split())


# -- the statements -------------------------------------------------------------------------------

#: The lease rule (``_steps.TakeLeases``) for an upsert of rows owned by ``excluded.owner``.
_FREE_OR_OURS = """(ordering_events.owner = excluded.owner
    OR ((ordering_events.lease_until IS NULL OR ordering_events.lease_until <= :now)
        AND (ordering_events.seen_until IS NULL OR ordering_events.seen_until <= :now)))"""

TAKE: Final = _sql(f"""
INSERT INTO ordering_events (scope, event_id, owner, lease_until, seen_until, expires_at)
VALUES (:scope, :event_id, :owner, :lease_until, NULL, :lease_until)
ON CONFLICT (scope, event_id) DO UPDATE
SET owner = excluded.owner, lease_until = excluded.lease_until, expires_at = excluded.expires_at
WHERE {_FREE_OR_OURS}
RETURNING event_id
""")

MARKS: Final = _sql("""
SELECT seen_until, lease_until FROM ordering_events WHERE scope = :scope AND event_id = :event_id
""")

COMPLETE: Final = _sql(f"""
INSERT INTO ordering_events (scope, event_id, owner, lease_until, seen_until, expires_at)
VALUES (:scope, :event_id, :owner, NULL, :seen_until, :seen_until)
ON CONFLICT (scope, event_id) DO UPDATE
SET owner = excluded.owner, lease_until = NULL, seen_until = excluded.seen_until,
    expires_at = excluded.expires_at
WHERE {_FREE_OR_OURS}
RETURNING has_followers
""")

FORGET: Final = _sql("""
DELETE FROM ordering_followers WHERE scope = :scope AND follower_id = :event_id
""")

CLAIM: Final = _sql("""
UPDATE ordering_followers SET claimed_by = :owner, claimed_until = :claimed_until
WHERE scope = :scope AND leader_id = :leader_id AND follower_id != :leader_id
  AND (claimed_until IS NULL OR claimed_until <= :now OR claimed_by = :owner)
RETURNING follower_id, occurred, event
""")

FLAG_LEADER: Final = _sql("""
INSERT INTO ordering_events (scope, event_id, owner, lease_until, seen_until, expires_at,
                             has_followers)
VALUES (:scope, :leader_id, NULL, NULL, NULL, :hold_until, 1)
ON CONFLICT (scope, event_id) DO UPDATE
SET has_followers = 1,
    expires_at = CASE WHEN ordering_events.expires_at > :hold_until
                      THEN ordering_events.expires_at ELSE :hold_until END
RETURNING seen_until
""")

STORE_FOLLOWER: Final = _sql("""
INSERT INTO ordering_followers (scope, follower_id, leader_id, occurred, received, event,
                                claimed_by, claimed_until)
VALUES (:scope, :event_id, :leader_id, :occurred, :received, :event, NULL, NULL)
ON CONFLICT (scope, follower_id) DO UPDATE
SET leader_id = excluded.leader_id, occurred = excluded.occurred,
    received = excluded.received, event = excluded.event, claimed_by = NULL, claimed_until = NULL
""")

RELEASE: Final = _sql("""
UPDATE ordering_events SET lease_until = NULL, expires_at = coalesce(seen_until, :now)
WHERE scope = :scope AND event_id = :event_id AND (:owner IS NULL OR owner = :owner)
""")

RENEW_CLAIMS: Final = _sql("""
UPDATE ordering_followers SET claimed_until = :claimed_until
WHERE scope = :scope AND leader_id = :leader_id AND claimed_by = :owner
""")

#: A lost follower: see ``_steps.Sweep``.
_LOST = """(
    (f.claimed_until IS NULL AND (
        f.received <= :horizon
        OR EXISTS (SELECT 1 FROM ordering_events l
                   WHERE l.scope = f.scope AND l.event_id = f.leader_id
                     AND l.seen_until > :now AND l.seen_until <= :seen_cutoff)
        OR (f.leader_id = f.follower_id
            AND NOT EXISTS (SELECT 1 FROM ordering_events o
                            WHERE o.scope = f.scope AND o.event_id = f.follower_id
                              AND o.lease_until > :now))))
    OR f.claimed_until <= :now)"""
_HANDLED = """EXISTS (SELECT 1 FROM ordering_events h
               WHERE h.scope = f.scope AND h.event_id = f.follower_id AND h.seen_until > :now)"""

DROP_HANDLED_LOST: Final = _sql(f"""
DELETE FROM ordering_followers AS f WHERE f.scope = :scope AND {_LOST} AND {_HANDLED}
""")

SWEEP: Final = _sql(f"""
UPDATE ordering_followers AS f SET claimed_by = :owner, claimed_until = :claimed_until
WHERE f.scope = :scope AND ({_LOST} OR f.claimed_by = :owner) AND NOT {_HANDLED}
RETURNING follower_id, leader_id, occurred, event
""")

PEEK_LOST: Final = _sql(f"""
SELECT f.event FROM ordering_followers AS f
WHERE f.scope = :scope AND {_LOST} AND NOT {_HANDLED}
ORDER BY f.occurred, f.follower_id
""")

MARK_SEEN: Final = _sql("""
INSERT INTO ordering_events (scope, event_id, owner, lease_until, seen_until, expires_at)
VALUES (:scope, :event_id, NULL, NULL, :seen_until, :seen_until)
ON CONFLICT (scope, event_id) DO UPDATE
SET seen_until = excluded.seen_until,
    expires_at = CASE WHEN ordering_events.lease_until > excluded.seen_until
                      THEN ordering_events.lease_until ELSE excluded.seen_until END
""")

FOLLOWERS_OF: Final = _sql("""
SELECT event FROM ordering_followers WHERE scope = :scope AND leader_id = :leader_id
ORDER BY occurred, follower_id
""")

FOLLOWER_BY_ID: Final = _sql("""
SELECT event, occurred, follower_id FROM ordering_followers
WHERE scope = :scope AND follower_id = :event_id
""")

#: An events row whose marks all expired, unless followers still wait on it.
_PURGEABLE = """{t}.expires_at <= :now AND NOT ({t}.has_followers AND EXISTS (
    SELECT 1 FROM ordering_followers f WHERE f.scope = {t}.scope AND f.leader_id = {t}.event_id))"""

PURGE: Final = _sql(f"""
DELETE FROM ordering_events AS e WHERE {_PURGEABLE.format(t="e")}
AND (e.scope, e.event_id) IN (
    SELECT p.scope, p.event_id FROM ordering_events p WHERE {_PURGEABLE.format(t="p")}
    LIMIT :limit)
""")

EXPIRED_COUNTS: Final = _sql(f"""
SELECT count(*) FILTER (WHERE e.seen_until IS NOT NULL),
       count(*) FILTER (WHERE e.seen_until IS NULL)
FROM ordering_events e WHERE {_PURGEABLE.format(t="e")}
""")

EVENT_COUNTS: Final = _sql("""
SELECT scope,
       count(*) FILTER (WHERE seen_until > :now),
       count(*) FILTER (WHERE seen_until <= :now),
       count(*) FILTER (WHERE lease_until > :now),
       count(*) FILTER (WHERE lease_until <= :now)
FROM ordering_events GROUP BY scope
""")

FOLLOWER_COUNTS: Final = _sql("""
SELECT scope, count(*), count(claimed_until), count(*) FILTER (WHERE received <= :horizon),
       min(received)
FROM ordering_followers GROUP BY scope
""")

#: Every statement, by name: for tests that explain them (``tests/integration/test_*plans*``).
STATEMENTS: Final = {
    "take": TAKE,
    "marks": MARKS,
    "complete": COMPLETE,
    "forget": FORGET,
    "claim": CLAIM,
    "flag_leader": FLAG_LEADER,
    "store_follower": STORE_FOLLOWER,
    "release": RELEASE,
    "renew_claims": RENEW_CLAIMS,
    "drop_handled_lost": DROP_HANDLED_LOST,
    "sweep": SWEEP,
    "peek_lost": PEEK_LOST,
    "mark_seen": MARK_SEEN,
    "followers_of": FOLLOWERS_OF,
    "follower_by_id": FOLLOWER_BY_ID,
    "purge": PURGE,
}


# -- the steps -----------------------------------------------------------------------------------


class SqliteSteps:
    """``_steps.Steps`` on SQLite: each request is a function of a cursor, and a step runs
    all of its requests in one unit; ``units`` runs requests of several write steps in one."""

    async def take(self, conn: Connection, requests: Sequence[TakeLeases]) -> list[Taken]:
        return await conn.unit(lambda cur: [_take(cur, r) for r in requests], write=True)

    async def marks(
        self, conn: Connection, requests: Sequence[ReadMarks]
    ) -> list[dict[UUID, Marks]]:
        return await conn.unit(lambda cur: [_marks(cur, r) for r in requests], write=False)

    async def park(self, conn: Connection, requests: Sequence[Park]) -> list[frozenset[UUID]]:
        return await conn.unit(lambda cur: [_park(cur, r) for r in requests], write=True)

    async def complete(self, conn: Connection, requests: Sequence[Complete]) -> list[Completed]:
        return await conn.unit(lambda cur: [_complete(cur, r) for r in requests], write=True)

    async def release(self, conn: Connection, requests: Sequence[Release]) -> list[None]:
        def work(cur: Cursor) -> list[None]:
            for r in requests:
                _release(cur, r)
            return [None] * len(requests)

        return await conn.unit(work, write=True)

    async def renew_claims(self, conn: Connection, requests: Sequence[RenewClaims]) -> list[int]:
        return await conn.unit(lambda cur: [_renew_claims(cur, r) for r in requests], write=True)

    async def sweep(self, conn: Connection, requests: Sequence[Sweep]) -> list[list[Claimed]]:
        return await conn.unit(lambda cur: [_sweep(cur, r) for r in requests], write=True)

    def merge_key(self, step: str) -> str:
        """Which requests may share a transaction (``store/_merge.py``): every write step's
        (one write lock, one commit for all), and the reads among themselves."""
        return "write" if step in _WRITE_STEPS else step

    async def run_merged(self, conn: Connection, items: Sequence[tuple[str, Any]]) -> list[Any]:
        """Requests ``(step, request)`` of one ``merge_key``, in one transaction, in turn."""
        if all(name in _WRITE_STEPS for name, _ in items):
            return await conn.unit(
                lambda cur: [_WRITE_STEPS[name](cur, request) for name, request in items],
                write=True,
            )
        (step,) = {name for name, _ in items}
        results: list[Any] = await getattr(self, step)(conn, [request for _, request in items])
        return results

    # -- the rest of the API: one caller at a time ----------------------------------------------

    async def mark_seen(
        self, conn: Connection, scope: str, event_ids: Sequence[UUID], seen_until: datetime
    ) -> None:
        def work(cur: Cursor) -> None:
            for event_id in sorted(set(event_ids)):
                values = {"scope": scope, "event_id": _id(event_id), "seen_until": _t(seen_until)}
                cur.run(MARK_SEEN, values)

        await conn.unit(work, write=True)

    async def forget_followers(
        self, conn: Connection, scope: str, follower_ids: Sequence[UUID]
    ) -> None:
        def work(cur: Cursor) -> None:
            for follower_id in follower_ids:
                cur.run(FORGET, {"scope": scope, "event_id": _id(follower_id)})

        await conn.unit(work, write=True)

    async def followers_of(self, conn: Connection, scope: str, leader_id: UUID) -> list[str]:
        values = {"scope": scope, "leader_id": _id(leader_id)}
        rows = await conn.unit(lambda cur: cur.rows(FOLLOWERS_OF, values), write=False)
        return [row[0] for row in rows]

    async def followers_by_id(
        self, conn: Connection, scope: str, follower_ids: Sequence[UUID]
    ) -> list[str]:
        def work(cur: Cursor) -> list[tuple[Any, ...]]:
            found = []
            for follower_id in set(follower_ids):
                found += cur.rows(FOLLOWER_BY_ID, {"scope": scope, "event_id": _id(follower_id)})
            return found

        rows = await conn.unit(work, write=False)
        return [row[0] for row in sorted(rows, key=lambda row: (row[1], row[2]))]

    async def peek_lost(
        self, conn: Connection, scope: str, now: datetime, horizon: datetime, seen_cutoff: datetime
    ) -> list[str]:
        values = {
            "scope": scope,
            "now": _t(now),
            "horizon": _t(horizon),
            "seen_cutoff": _t(seen_cutoff),
        }
        rows = await conn.unit(lambda cur: cur.rows(PEEK_LOST, values), write=False)
        return [row[0] for row in rows]

    async def clear(self, conn: Connection, scope: str | None) -> None:
        def work(cur: Cursor) -> None:
            if scope is None:
                cur.run("DELETE FROM ordering_followers")
                cur.run("DELETE FROM ordering_events")
            else:
                cur.run("DELETE FROM ordering_followers WHERE scope = :scope", {"scope": scope})
                cur.run("DELETE FROM ordering_events WHERE scope = :scope", {"scope": scope})

        await conn.unit(work, write=True)

    async def purge(self, conn: Connection, now: datetime, limit: int) -> int:
        values = {"now": _t(now), "limit": limit}
        return await conn.unit(lambda cur: cur.run(PURGE, values), write=True)

    async def expired_counts(self, conn: Connection, now: datetime) -> tuple[int, int]:
        (row,) = await conn.unit(
            lambda cur: cur.rows(EXPIRED_COUNTS, {"now": _t(now)}), write=False
        )
        return int(row[0]), int(row[1])

    async def scope_counts(
        self, conn: Connection, now: datetime, horizon: datetime
    ) -> tuple[list[Sequence[Any]], list[Sequence[Any]]]:
        """As ``PostgresSteps.scope_counts``."""

        def work(cur: Cursor) -> tuple[list[Sequence[Any]], list[Sequence[Any]]]:
            events = cur.rows(EVENT_COUNTS, {"now": _t(now)})
            followers: list[Sequence[Any]] = [
                (*row[:4], _time(row[4]))
                for row in cur.rows(FOLLOWER_COUNTS, {"horizon": _t(horizon)})
            ]
            return list(events), followers

        return await conn.unit(work, write=False)


# Each step of one request, on a cursor inside the unit's transaction.


def _take(cur: Cursor, r: TakeLeases) -> Taken:
    now, until = _t(r.now), _t(r.lease_until)
    taken: set[UUID] = set()
    for event_id in sorted(set(r.event_ids)):
        values = {
            "scope": r.scope,
            "event_id": _id(event_id),
            "owner": _id(r.owner),
            "lease_until": until,
            "now": now,
        }
        if cur.rows(TAKE, values):
            taken.add(event_id)
    wanted = {*r.event_ids, *r.leaders} - taken
    marks = _marks(cur, ReadMarks(r.scope, tuple(wanted), r.now))
    return Taken(taken=frozenset(taken), marks=marks)


def _marks(cur: Cursor, r: ReadMarks) -> dict[UUID, Marks]:
    marks = {}
    for event_id in set(r.event_ids):
        rows = cur.rows(MARKS, {"scope": r.scope, "event_id": _id(event_id)})
        if rows:
            marks[event_id] = Marks.at(r.now, _time(rows[0][0]), _time(rows[0][1]))
    return marks


def _complete(cur: Cursor, r: Complete) -> Completed:
    done: set[UUID] = set()
    claimed: list[Claimed] = []
    ours = set(r.event_ids)
    for event_id in sorted(ours):
        values = {
            "scope": r.scope,
            "event_id": _id(event_id),
            "leader_id": _id(event_id),
            "owner": _id(r.owner),
            "seen_until": _t(r.seen_until),
            "claimed_until": _t(r.claimed_until),
            "now": _t(r.now),
        }
        marked = cur.rows(COMPLETE, values)
        if not marked:
            continue  # held by another worker, or finished by one
        done.add(event_id)
        cur.run(FORGET, values)
        if r.claim and marked[0][0]:
            # Within the write lock nothing parks meanwhile: one claim sees every follower.
            for follower, occurred, event in cur.rows(CLAIM, values):
                follower_id = UUID(follower)
                if follower_id not in ours:  # handled in this request itself
                    claimed.append(Claimed(follower_id, event_id, _stamp(occurred), event))
    return Completed(done=frozenset(done), claimed=claimed)


def _stamp(value: str) -> datetime:
    stamp = _time(value)
    assert stamp is not None
    return stamp


def _park(cur: Cursor, r: Park) -> frozenset[UUID]:
    stored: set[UUID] = set()
    now = _t(r.now)
    for follower in r.followers:
        values = {
            "scope": r.scope,
            "event_id": _id(follower.event_id),
            "leader_id": _id(follower.leader_id),
            "occurred": _t(follower.occurred),
            "received": _t(follower.received),
            "event": follower.event,
            "hold_until": _t(r.hold_until),
            "now": now,
            "owner": None if r.owner is None else _id(r.owner),
        }
        (leader_seen_until,) = cur.rows(FLAG_LEADER, values)[0]
        if r.unless_leader_seen and leader_seen_until is not None and leader_seen_until > now:
            continue  # the leader is done: the follower goes ahead, still holding its lease
        cur.run(STORE_FOLLOWER, values)
        if r.owner is not None:
            cur.run(RELEASE, values)
        stored.add(follower.event_id)
    return frozenset(stored)


def _release(cur: Cursor, r: Release) -> None:
    for event_id in sorted(set(r.event_ids)):
        owner = None if r.owner is None else _id(r.owner)
        values = {"scope": r.scope, "event_id": _id(event_id), "owner": owner, "now": _t(r.now)}
        cur.run(RELEASE, values)


def _renew_claims(cur: Cursor, r: RenewClaims) -> int:
    renewed = 0
    for leader_id in r.leaders:
        values = {
            "scope": r.scope,
            "leader_id": _id(leader_id),
            "owner": _id(r.owner),
            "claimed_until": _t(r.claimed_until),
        }
        renewed += cur.run(RENEW_CLAIMS, values)
    return renewed


def _sweep(cur: Cursor, r: Sweep) -> list[Claimed]:
    values = {
        "scope": r.scope,
        "owner": _id(r.owner),
        "now": _t(r.now),
        "horizon": _t(r.horizon),
        "seen_cutoff": _t(r.seen_cutoff),
        "claimed_until": _t(r.claimed_until),
    }
    cur.run(DROP_HANDLED_LOST, values)
    return [
        Claimed(UUID(follower), UUID(leader), _stamp(occurred), event)
        for follower, leader, occurred, event in cur.rows(SWEEP, values)
    ]


_WRITE_STEPS: Final[dict[str, Callable[[Cursor, Any], Any]]] = {
    "take": _take,
    "park": _park,
    "complete": _complete,
    "release": _release,
    "renew_claims": _renew_claims,
    "sweep": _sweep,
}
