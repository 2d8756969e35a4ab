"""The protocol's steps on Postgres: one statement each, data-modifying CTEs, autocommit.

Every step takes its rows as arrays (``unnest``), one element per event of every request, so
one statement serves one event, a batch, or the merged requests of concurrent callers, and is
prepared once. Rows that take row locks are sorted by (scope, id): every statement that locks
several ``ordering_events`` rows locks them in that one order, so no two can deadlock. Rows
are unique per statement: ``ON CONFLICT DO UPDATE`` may not touch a row twice, so requests for
the same event go to separate rounds (``_rounds``), decided one after the other as two
concurrent callers would be.

Times come in from the engine (the database's clock as the Store reads it, or a test's clock);
``$now`` is the statement's one ``now``, the latest of its requests' (they share one clock:
``store/_merge.py`` merges only requests of the same clock). Why parking never strands a
follower: see ``store/_steps.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
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

__all__ = ["Connection", "PostgresSteps"]

R = TypeVar("R")


class Connection(Protocol):
    """What the steps run on: asyncpg's own connection (``store/_driver.py``), or SQLAlchemy's
    (``exec_driver_sql``); ``$n`` parameters, rows indexable by position."""

    async def fetch(self, sql: str, *args: Any) -> Sequence[Sequence[Any]]: ...

    async def run(self, sql: str, *args: Any) -> int:
        """Execute; the number of rows the command changed."""
        ...


def _sql(text: str) -> str:
    """A statement's text on one line (as logged and prepared)."""
    return " ".join(text.split())


# -- the statements ------------------------------------------------------------------------------

#: The lease rule (``_steps.TakeLeases``) for an upsert of rows owned by ``excluded.owner``.
_FREE_OR_OURS = """
    e.owner = excluded.owner
    OR ((e.lease_until IS NULL OR e.lease_until <= $5)
        AND (e.seen_until IS NULL OR e.seen_until <= $5))"""

TAKE: Final = _sql(f"""
WITH r AS (
    SELECT * FROM unnest($1::text[], $2::uuid[], $3::uuid[], $4::timestamptz[])
        WITH ORDINALITY AS r(scope, event_id, owner, lease_until, n)
), taken AS (
    INSERT INTO ordering_events AS e (scope, event_id, owner, lease_until, seen_until, expires_at)
    SELECT scope, event_id, owner, lease_until, NULL, lease_until FROM r ORDER BY n
    ON CONFLICT (scope, event_id) DO UPDATE
    SET owner = excluded.owner, lease_until = excluded.lease_until,
        expires_at = excluded.expires_at
    WHERE {_FREE_OR_OURS}
    RETURNING e.scope, e.event_id
)
SELECT scope, event_id, true, NULL::timestamptz, NULL::timestamptz FROM taken
UNION ALL
SELECT m.scope, m.event_id, false, m.seen_until, m.lease_until
FROM unnest($6::text[], $7::uuid[]) AS w(scope, event_id)
JOIN ordering_events m ON m.scope = w.scope AND m.event_id = w.event_id
""")

MARKS: Final = _sql("""
SELECT m.scope, m.event_id, m.seen_until, m.lease_until
FROM unnest($1::text[], $2::uuid[]) AS w(scope, event_id)
JOIN ordering_events m ON m.scope = w.scope AND m.event_id = w.event_id
""")

_FREE_OR_OURS_7 = _FREE_OR_OURS.replace("$5", "$7")

COMPLETE: Final = _sql(f"""
WITH r AS (
    SELECT * FROM unnest($1::text[], $2::uuid[], $3::uuid[], $4::timestamptz[],
                         $5::timestamptz[], $6::bool[])
        WITH ORDINALITY AS r(scope, event_id, owner, seen_until, claimed_until, claim, n)
), done AS (
    INSERT INTO ordering_events AS e (scope, event_id, owner, lease_until, seen_until, expires_at)
    SELECT scope, event_id, owner, NULL, seen_until, seen_until FROM r ORDER BY n
    ON CONFLICT (scope, event_id) DO UPDATE
    SET owner = excluded.owner, lease_until = NULL, seen_until = excluded.seen_until,
        expires_at = excluded.expires_at
    WHERE {_FREE_OR_OURS_7}
    RETURNING e.scope, e.event_id, e.owner, e.has_followers
), forgot AS (
    DELETE FROM ordering_followers f USING done d
    WHERE f.scope = d.scope AND f.follower_id = d.event_id
), claimed AS (
    UPDATE ordering_followers f SET claimed_by = d.owner, claimed_until = r.claimed_until
    FROM done d JOIN r ON r.scope = d.scope AND r.event_id = d.event_id
    WHERE r.claim AND f.scope = d.scope AND f.leader_id = d.event_id
      AND NOT EXISTS (SELECT 1 FROM r AS x WHERE x.scope = f.scope AND x.event_id = f.follower_id)
      AND (f.claimed_until IS NULL OR f.claimed_until <= $7 OR f.claimed_by = d.owner)
    RETURNING f.scope, f.leader_id, f.follower_id, f.occurred, f.event
)
SELECT scope, event_id, has_followers, NULL::uuid, NULL::timestamptz, NULL::text FROM done
UNION ALL
SELECT scope, leader_id, NULL::boolean, follower_id, occurred, event FROM claimed
""")

#: A completion's second claim, in a fresh statement (see ``_steps``): the followers of the
#: flagged leaders, except the events completed in the same step.
CLAIM_AGAIN: Final = _sql("""
UPDATE ordering_followers f SET claimed_by = x.owner, claimed_until = x.claimed_until
FROM unnest($1::text[], $2::uuid[], $3::uuid[], $4::timestamptz[])
    AS x(scope, leader_id, owner, claimed_until)
WHERE f.scope = x.scope AND f.leader_id = x.leader_id
  AND NOT EXISTS (SELECT 1 FROM unnest($5::text[], $6::uuid[]) AS d(scope, event_id)
                  WHERE d.scope = f.scope AND d.event_id = f.follower_id)
  AND (f.claimed_until IS NULL OR f.claimed_until <= $7 OR f.claimed_by = x.owner)
RETURNING f.scope, f.leader_id, f.follower_id, f.occurred, f.event
""")

PARK: Final = _sql("""
WITH locked AS (
    INSERT INTO ordering_events AS e
        (scope, event_id, owner, lease_until, seen_until, expires_at, has_followers)
    SELECT scope, event_id, release_owner, NULL, NULL,
           CASE WHEN flag THEN hold_until ELSE $1 END, flag
    FROM unnest($2::text[], $3::uuid[], $4::bool[], $5::timestamptz[], $6::uuid[])
        WITH ORDINALITY AS x(scope, event_id, flag, hold_until, release_owner, n)
    ORDER BY n
    ON CONFLICT (scope, event_id) DO UPDATE SET
        has_followers = e.has_followers OR excluded.has_followers,
        lease_until = CASE WHEN e.owner = excluded.owner THEN NULL ELSE e.lease_until END,
        expires_at = CASE
            WHEN excluded.has_followers THEN greatest(e.expires_at, excluded.expires_at)
            WHEN e.owner = excluded.owner THEN coalesce(e.seen_until, $1)
            ELSE e.expires_at END
    RETURNING e.scope, e.event_id, e.seen_until
), f AS (
    SELECT * FROM unnest($7::text[], $8::uuid[], $9::uuid[], $10::timestamptz[],
                         $11::timestamptz[], $12::text[], $13::bool[])
        AS f(scope, follower_id, leader_id, occurred, received, event, unless_seen)
), stored AS (
    INSERT INTO ordering_followers AS o
        (scope, follower_id, leader_id, occurred, received, event, claimed_by, claimed_until)
    SELECT f.scope, f.follower_id, f.leader_id, f.occurred, f.received, f.event, NULL, NULL
    FROM f JOIN locked l ON l.scope = f.scope AND l.event_id = f.leader_id
    WHERE NOT (f.unless_seen AND l.seen_until IS NOT NULL AND l.seen_until > $1)
    ON CONFLICT (scope, follower_id) DO UPDATE SET
        leader_id = excluded.leader_id, occurred = excluded.occurred,
        received = excluded.received, event = excluded.event,
        claimed_by = NULL, claimed_until = NULL
    RETURNING o.scope, o.follower_id
)
SELECT scope, follower_id FROM stored
""")

RELEASE: Final = _sql("""
UPDATE ordering_events e SET lease_until = NULL, expires_at = coalesce(e.seen_until, $1)
FROM unnest($2::text[], $3::uuid[], $4::uuid[]) AS r(scope, event_id, owner)
WHERE e.scope = r.scope AND e.event_id = r.event_id AND (r.owner IS NULL OR e.owner = r.owner)
""")

RENEW_CLAIMS: Final = _sql("""
UPDATE ordering_followers f SET claimed_until = x.claimed_until
FROM unnest($1::text[], $2::uuid[], $3::uuid[], $4::timestamptz[])
    AS x(scope, leader_id, owner, claimed_until)
WHERE f.scope = x.scope AND f.leader_id = x.leader_id AND f.claimed_by = x.owner
""")

#: A lost follower ($2 now, $3 horizon, $4 seen cutoff): see ``_steps.Sweep``.
_LOST = """(
    (f.claimed_until IS NULL AND (
        f.received <= $3
        OR EXISTS (SELECT 1 FROM ordering_events l
                   WHERE l.scope = f.scope AND l.event_id = f.leader_id
                     AND l.seen_until > $2 AND l.seen_until <= $4)
        OR (f.leader_id = f.follower_id
            AND NOT EXISTS (SELECT 1 FROM ordering_events o
                            WHERE o.scope = f.scope AND o.event_id = f.follower_id
                              AND o.lease_until > $2))))
    OR f.claimed_until <= $2)"""
#: The follower's own event is seen: it was handled.
_HANDLED = """EXISTS (SELECT 1 FROM ordering_events h
               WHERE h.scope = f.scope AND h.event_id = f.follower_id AND h.seen_until > $2)"""

SWEEP: Final = _sql(f"""
WITH dropped AS (
    DELETE FROM ordering_followers f WHERE f.scope = $1 AND {_LOST} AND {_HANDLED}
), claimed AS (
    UPDATE ordering_followers f SET claimed_by = $5, claimed_until = $6
    WHERE f.scope = $1 AND ({_LOST} OR f.claimed_by = $5) AND NOT {_HANDLED}
    RETURNING f.follower_id, f.leader_id, f.occurred, f.event
)
SELECT follower_id, leader_id, occurred, event FROM claimed
""")

PEEK_LOST: Final = _sql(f"""
SELECT f.event FROM ordering_followers f
WHERE f.scope = $1 AND {_LOST} AND NOT {_HANDLED}
ORDER BY f.occurred, f.follower_id
""")

MARK_SEEN: Final = _sql("""
INSERT INTO ordering_events AS e (scope, event_id, owner, lease_until, seen_until, expires_at)
SELECT $1, id, NULL, NULL, $3, $3 FROM unnest($2::uuid[]) AS id
ON CONFLICT (scope, event_id) DO UPDATE
SET seen_until = excluded.seen_until, expires_at = greatest(e.lease_until, excluded.seen_until)
""")

FORGET_FOLLOWERS: Final = _sql("""
DELETE FROM ordering_followers WHERE scope = $1 AND follower_id = ANY($2::uuid[])
""")

FOLLOWERS_OF: Final = _sql("""
SELECT event FROM ordering_followers WHERE scope = $1 AND leader_id = $2
ORDER BY occurred, follower_id
""")

FOLLOWERS_BY_ID: Final = _sql("""
SELECT event FROM ordering_followers WHERE scope = $1 AND follower_id = ANY($2::uuid[])
ORDER BY occurred, follower_id
""")

CLEAR: Final = _sql("""
WITH gone AS (DELETE FROM ordering_followers WHERE scope = $1)
DELETE FROM ordering_events WHERE scope = $1
""")

CLEAR_ALL: Final = _sql("""
WITH gone AS (DELETE FROM ordering_followers)
DELETE FROM ordering_events
""")

#: An events row whose marks all expired, unless followers still wait on it.
_PURGEABLE = """{t}.expires_at <= $1 AND NOT ({t}.has_followers AND EXISTS (
    SELECT 1 FROM ordering_followers f WHERE f.scope = {t}.scope AND f.leader_id = {t}.event_id))"""

#: The test stands in the DELETE's own WHERE too: under READ COMMITTED a row re-leased while
#: the DELETE waited for its lock is re-checked against that WHERE (not the subquery's): kept.
PURGE: Final = _sql(f"""
DELETE FROM ordering_events e WHERE {_PURGEABLE.format(t="e")}
AND (e.scope, e.event_id) IN (
    SELECT p.scope, p.event_id FROM ordering_events p WHERE {_PURGEABLE.format(t="p")} LIMIT $2)
""")

EXPIRED_COUNTS: Final = _sql(f"""
SELECT count(*) FILTER (WHERE e.seen_until IS NOT NULL),
       count(*) FILTER (WHERE e.seen_until IS NULL)
FROM ordering_events e WHERE {_PURGEABLE.format(t="e")}
""")

EVENT_COUNTS: Final = _sql("""
SELECT scope,
       count(*) FILTER (WHERE seen_until > $1),
       count(*) FILTER (WHERE seen_until <= $1),
       count(*) FILTER (WHERE lease_until > $1),
       count(*) FILTER (WHERE lease_until <= $1)
FROM ordering_events GROUP BY scope
""")

FOLLOWER_COUNTS: Final = _sql("""
SELECT scope, count(*), count(claimed_until), count(*) FILTER (WHERE received <= $1),
       min(received)
FROM ordering_followers GROUP BY scope
""")

#: Every statement, by name: for tests that explain them (``tests/integration/test_*plans*``).
STATEMENTS: Final = {
    "take": TAKE,
    "marks": MARKS,
    "complete": COMPLETE,
    "claim_again": CLAIM_AGAIN,
    "park": PARK,
    "release": RELEASE,
    "renew_claims": RENEW_CLAIMS,
    "sweep": SWEEP,
    "peek_lost": PEEK_LOST,
    "mark_seen": MARK_SEEN,
    "forget_followers": FORGET_FOLLOWERS,
    "followers_of": FOLLOWERS_OF,
    "followers_by_id": FOLLOWERS_BY_ID,
    "purge": PURGE,
}


# -- the steps -----------------------------------------------------------------------------------


def _rounds(requests: Sequence[R], keys: Any) -> Iterator[list[tuple[int, R]]]:
    """Split ``requests`` (with their positions) into rounds in which no two share a key.

    ``keys(request)`` gives the (scope, id) rows a request writes. Almost always there is one
    round; a second one holds a request for an event another request of the first round has.
    """
    pending = list(enumerate(requests))
    while pending:
        seen: set[Any] = set()
        now_round: list[tuple[int, R]] = []
        later: list[tuple[int, R]] = []
        for index, request in pending:
            mine = set(keys(request))
            if mine & seen:
                later.append((index, request))
            else:
                seen |= mine
                now_round.append((index, request))
        yield now_round
        pending = later


def _latest(times: Iterable[datetime]) -> datetime:
    return max(times)


class PostgresSteps:
    """``_steps.Steps`` on Postgres."""

    def merge_key(self, step: str) -> str:
        """Which requests may share a statement (``store/_merge.py``): those of one step."""
        return step

    async def run_merged(self, conn: Connection, items: Sequence[tuple[str, Any]]) -> list[Any]:
        """Requests ``(step, request)`` of one step (one ``merge_key``), in one statement."""
        (step,) = {name for name, _ in items}
        results: list[Any] = await getattr(self, step)(conn, [request for _, request in items])
        return results

    async def take(self, conn: Connection, requests: Sequence[TakeLeases]) -> list[Taken]:
        results: list[Taken | None] = [None] * len(requests)
        for batch in _rounds(requests, lambda r: ((r.scope, i) for i in r.event_ids)):
            rows = sorted(
                {
                    (r.scope, i): (r.owner, r.lease_until) for _, r in batch for i in r.event_ids
                }.items()
            )
            wanted = {(r.scope, i) for _, r in batch for i in (*r.event_ids, *r.leaders)}
            found = await conn.fetch(
                TAKE,
                [scope for (scope, _), _ in rows],
                [event_id for (_, event_id), _ in rows],
                [owner for _, (owner, _) in rows],
                [until for _, (_, until) in rows],
                _latest(r.now for _, r in batch),
                [scope for scope, _ in wanted],
                [event_id for _, event_id in wanted],
            )
            taken = {(row[0], row[1]) for row in found if row[2]}
            marks = {(row[0], row[1]): (row[3], row[4]) for row in found if not row[2]}
            for index, r in batch:
                results[index] = Taken(
                    taken=frozenset(i for i in r.event_ids if (r.scope, i) in taken),
                    marks={
                        i: Marks.at(r.now, *marks[r.scope, i])
                        for i in {*r.event_ids, *r.leaders}
                        if (r.scope, i) in marks and (r.scope, i) not in taken
                    },
                )
        return _all(results)

    async def marks(
        self, conn: Connection, requests: Sequence[ReadMarks]
    ) -> list[dict[UUID, Marks]]:
        wanted = {(r.scope, i) for r in requests for i in r.event_ids}
        found = await conn.fetch(
            MARKS, [scope for scope, _ in wanted], [event_id for _, event_id in wanted]
        )
        rows = {(row[0], row[1]): (row[2], row[3]) for row in found}
        return [
            {i: Marks.at(r.now, *rows[r.scope, i]) for i in r.event_ids if (r.scope, i) in rows}
            for r in requests
        ]

    async def complete(self, conn: Connection, requests: Sequence[Complete]) -> list[Completed]:
        results: list[Completed | None] = [None] * len(requests)
        for batch in _rounds(requests, lambda r: ((r.scope, i) for i in r.event_ids)):
            rows = sorted(
                ((r.scope, i), (r.owner, r.seen_until, r.claimed_until, r.claim))
                for _, r in batch
                for i in r.event_ids
            )
            now = _latest(r.now for _, r in batch)
            found = await conn.fetch(
                COMPLETE,
                [scope for (scope, _), _ in rows],
                [event_id for (_, event_id), _ in rows],
                *([row[1][k] for row in rows] for k in range(4)),
                now,
            )
            # Rows of the completed events (no follower), then rows of claimed followers.
            done = {(row[0], row[1]) for row in found if row[3] is None}
            flagged = {(row[0], row[1]) for row in found if row[3] is None and row[2]}
            claimed = [
                (row[0], Claimed(row[3], row[1], row[4], row[5]))
                for row in found
                if row[3] is not None
            ]
            by_key = dict(rows)
            again = sorted(key for key in flagged if by_key[key][3])
            if again:
                # A fresh statement: it sees followers parked after the first one's snapshot.
                known = {(scope, c.follower_id) for scope, c in claimed}
                extra = await conn.fetch(
                    CLAIM_AGAIN,
                    [scope for scope, _ in again],
                    [leader for _, leader in again],
                    [by_key[key][0] for key in again],
                    [by_key[key][2] for key in again],
                    [scope for (scope, _), _ in rows],
                    [event_id for (_, event_id), _ in rows],
                    now,
                )
                claimed += [
                    (row[0], Claimed(row[2], row[1], row[3], row[4]))
                    for row in extra
                    if (row[0], row[2]) not in known
                ]
            for index, r in batch:
                mine = frozenset(i for i in r.event_ids if (r.scope, i) in done)
                results[index] = Completed(
                    done=mine,
                    claimed=[c for scope, c in claimed if scope == r.scope and c.leader_id in mine],
                )
        return _all(results)

    async def park(self, conn: Connection, requests: Sequence[Park]) -> list[frozenset[UUID]]:
        results: list[frozenset[UUID] | None] = [None] * len(requests)
        for batch in _rounds(requests, lambda r: ((r.scope, f.event_id) for f in r.followers)):
            # The events rows to lock: each leader's (flagged) and each parking follower's own
            # (released, if its owner holds it); one row per (scope, id), sorted: one lock order.
            flags: dict[tuple[str, UUID], tuple[bool, datetime | None, UUID | None]] = {}
            for _, r in batch:
                for f in r.followers:
                    flag, hold, owner = flags.get((r.scope, f.leader_id), (False, None, None))
                    flags[r.scope, f.leader_id] = (True, _later(hold, r.hold_until), owner)
                    if r.owner is not None:
                        flag, hold, _ = flags.get((r.scope, f.event_id), (False, None, None))
                        flags[r.scope, f.event_id] = (flag, hold, r.owner)
            rows = sorted(flags.items())
            parked = [(r, f) for _, r in batch for f in r.followers]
            found = await conn.fetch(
                PARK,
                _latest(r.now for _, r in batch),
                [scope for (scope, _), _ in rows],
                [event_id for (_, event_id), _ in rows],
                [flag for _, (flag, _, _) in rows],
                [hold for _, (_, hold, _) in rows],
                [owner for _, (_, _, owner) in rows],
                [r.scope for r, _ in parked],
                [f.event_id for _, f in parked],
                [f.leader_id for _, f in parked],
                [f.occurred for _, f in parked],
                [f.received for _, f in parked],
                [f.event for _, f in parked],
                [r.unless_leader_seen for r, _ in parked],
            )
            stored = {(row[0], row[1]) for row in found}
            for index, r in batch:
                results[index] = frozenset(
                    f.event_id for f in r.followers if (r.scope, f.event_id) in stored
                )
        return _all(results)

    async def release(self, conn: Connection, requests: Sequence[Release]) -> list[None]:
        rows = sorted({((r.scope, i), r.owner) for r in requests for i in r.event_ids})
        await conn.run(
            RELEASE,
            _latest(r.now for r in requests),
            [scope for (scope, _), _ in rows],
            [event_id for (_, event_id), _ in rows],
            [owner for _, owner in rows],
        )
        return [None] * len(requests)

    async def renew_claims(self, conn: Connection, requests: Sequence[RenewClaims]) -> list[int]:
        counts = []
        for r in requests:  # rare (a third of a claim timeout): not worth merging
            counts.append(
                await conn.run(
                    RENEW_CLAIMS,
                    [r.scope] * len(r.leaders),
                    list(r.leaders),
                    [r.owner] * len(r.leaders),
                    [r.claimed_until] * len(r.leaders),
                )
            )
        return counts

    async def sweep(self, conn: Connection, requests: Sequence[Sweep]) -> list[list[Claimed]]:
        swept = []
        for r in requests:
            rows = await conn.fetch(
                SWEEP, r.scope, r.now, r.horizon, r.seen_cutoff, r.owner, r.claimed_until
            )
            swept.append([Claimed(row[0], row[1], row[2], row[3]) for row in rows])
        return swept

    # -- the rest of the API: one caller at a time ----------------------------------------------

    async def mark_seen(
        self, conn: Connection, scope: str, event_ids: Sequence[UUID], seen_until: datetime
    ) -> None:
        await conn.run(MARK_SEEN, scope, sorted(set(event_ids)), seen_until)

    async def forget_followers(
        self, conn: Connection, scope: str, follower_ids: Sequence[UUID]
    ) -> None:
        await conn.run(FORGET_FOLLOWERS, scope, list(follower_ids))

    async def followers_of(self, conn: Connection, scope: str, leader_id: UUID) -> list[str]:
        return [row[0] for row in await conn.fetch(FOLLOWERS_OF, scope, leader_id)]

    async def followers_by_id(
        self, conn: Connection, scope: str, follower_ids: Sequence[UUID]
    ) -> list[str]:
        rows = await conn.fetch(FOLLOWERS_BY_ID, scope, list(follower_ids))
        return [row[0] for row in rows]

    async def peek_lost(
        self, conn: Connection, scope: str, now: datetime, horizon: datetime, seen_cutoff: datetime
    ) -> list[str]:
        return [row[0] for row in await conn.fetch(PEEK_LOST, scope, now, horizon, seen_cutoff)]

    async def clear(self, conn: Connection, scope: str | None) -> None:
        if scope is None:
            await conn.run(CLEAR_ALL)
        else:
            await conn.run(CLEAR, scope)

    async def purge(self, conn: Connection, now: datetime, limit: int) -> int:
        return await conn.run(PURGE, now, limit)

    async def expired_counts(self, conn: Connection, now: datetime) -> tuple[int, int]:
        (row,) = await conn.fetch(EXPIRED_COUNTS, now)
        return int(row[0]), int(row[1])

    async def scope_counts(
        self, conn: Connection, now: datetime, horizon: datetime
    ) -> tuple[list[Sequence[Any]], list[Sequence[Any]]]:
        """Per scope: (scope, seen, seen expired, leases, leases expired) and (scope, parked,
        claimed, past the lookback, oldest ``received``)."""
        return list(await conn.fetch(EVENT_COUNTS, now)), list(
            await conn.fetch(FOLLOWER_COUNTS, horizon)
        )


def _later(a: datetime | None, b: datetime) -> datetime:
    return b if a is None or b > a else a


def _all(results: Sequence[R | None]) -> list[R]:
    assert all(result is not None for result in results)
    return [result for result in results if result is not None]
