"""The protocol's steps: what the engine asks of a database, as typed requests and results.

A step acts on a list of events, so that one event is a batch of one, a caller's batch is a
batch, and the concurrent calls of several callers can be merged into one statement or one
transaction (``store/_merge.py``). Each request carries everything about one caller (scope,
owner token, times); a merged step answers each request on its own.

One implementation per backend, each owning its statements: ``store/postgres.py`` (one
statement per step, data-modifying CTEs, autocommit) and ``store/sqlite.py`` (a few statements
in one ``BEGIN IMMEDIATE`` transaction, run in one hop to the connection's thread). The engine
(``engine.py``) holds the decisions; it sees only these types.

Why parking never strands a follower (the one argument the engine and both backends rely on):
parking a follower changes its *leader's* events row (setting ``has_followers``, creating a
placeholder row if needed) and reads that row's seen mark in the same step, under that row's
lock; completing the leader upserts the same row to mark it seen. The row lock (SQLite: its
single write lock) orders the two, and an upsert always acts on the newest committed version
of its row. If the completion came first, the parking step sees the seen mark and does not
park: the follower goes ahead. If the parking came first, the completion sees
``has_followers``; its own claim may have run on a snapshot taken before the follower's commit
(a statement's snapshot is taken before it waits for the lock), so it claims once more in a
fresh statement, which sees the follower. The follower's own lease ends in the parking step, so
the leader can always take it to replay the follower.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

__all__ = [
    "Claimed",
    "Complete",
    "Completed",
    "Joined",
    "Marks",
    "Park",
    "Parking",
    "ReadMarks",
    "Release",
    "RenewClaims",
    "Steps",
    "Sweep",
    "TakeLeases",
    "Taken",
]

Key = tuple[str, UUID]  # (scope, event id)


@dataclass(frozen=True, slots=True)
class Marks:
    """An event's two marks, as of one moment."""

    seen: bool
    processing: bool

    @classmethod
    def at(cls, now: datetime, seen_until: datetime | None, lease_until: datetime | None) -> Marks:
        return cls(
            seen=seen_until is not None and seen_until > now,
            processing=lease_until is not None and lease_until > now,
        )


NO_MARKS = Marks(seen=False, processing=False)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A parked follower handed to a caller (claimed by its token), as stored."""

    follower_id: UUID
    leader_id: UUID
    occurred: datetime
    event: str


# -- requests and results: one request per caller ------------------------------------------------


@dataclass(frozen=True, slots=True)
class TakeLeases:
    """Take (or renew) the leases of ``event_ids`` for ``owner``, by the lease rule: each is
    taken if nobody holds it live and the event is not seen, or if ``owner`` holds it already
    (so a retry whose first attempt committed is harmless). Also reads the marks of
    ``leaders`` and of the events not taken, in the same step."""

    scope: str
    owner: UUID
    event_ids: tuple[UUID, ...]
    now: datetime
    lease_until: datetime
    leaders: tuple[UUID, ...] = ()


@dataclass(frozen=True, slots=True)
class Taken:
    #: The ids whose lease ``owner`` holds now.
    taken: frozenset[UUID]
    #: Marks of the leaders asked for and of the events not taken (absent: no row).
    marks: dict[UUID, Marks] = field(default_factory=dict)

    def of(self, event_id: UUID | None) -> Marks:
        return self.marks.get(event_id, NO_MARKS) if event_id is not None else NO_MARKS


@dataclass(frozen=True, slots=True)
class ReadMarks:
    scope: str
    event_ids: tuple[UUID, ...]
    now: datetime


@dataclass(frozen=True, slots=True)
class Parking:
    """A follower to park: its id, its leader, and what is stored (its ``stored_form``)."""

    event_id: UUID
    leader_id: UUID
    occurred: datetime
    received: datetime
    event: str


@dataclass(frozen=True, slots=True)
class Park:
    """Park followers: flag each leader's row (creating a placeholder), store the follower
    unless its leader is seen (with ``unless_leader_seen``), and end the follower's own lease if
    ``owner`` holds it. Returns the ids stored; the others found their leader seen."""

    scope: str
    owner: UUID | None
    followers: tuple[Parking, ...]
    now: datetime
    #: How long a leader's row is kept for its followers: at least the lookback.
    hold_until: datetime
    unless_leader_seen: bool = True


@dataclass(frozen=True, slots=True)
class Complete:
    """Mark ``event_ids`` seen and end their leases, by the lease rule (a missing row is
    written anew), forget their own parked rows and, with ``claim``, claim their parked
    followers for ``owner`` (those claimed by ``owner`` already come back too; followers among
    the events being completed are not claimed: they were just handled)."""

    scope: str
    owner: UUID
    event_ids: tuple[UUID, ...]
    now: datetime
    seen_until: datetime
    claimed_until: datetime
    claim: bool = True


@dataclass(frozen=True, slots=True)
class Completed:
    #: The ids completed; the others are held by another worker, or were finished by one.
    done: frozenset[UUID]
    claimed: list[Claimed] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Release:
    """End the leases of ``event_ids`` that ``owner`` holds (None: whoever holds them)."""

    scope: str
    owner: UUID | None
    event_ids: tuple[UUID, ...]
    now: datetime


@dataclass(frozen=True, slots=True)
class RenewClaims:
    """Extend the claims ``owner`` holds on the followers of ``leaders``; how many."""

    scope: str
    owner: UUID
    leaders: tuple[UUID, ...]
    claimed_until: datetime


@dataclass(frozen=True, slots=True)
class Sweep:
    """Hand over the lost followers of a scope: claim them for ``owner`` and return them
    (those ``owner`` claimed already come back too, so a retried sweep returns what its first
    attempt took); lost followers whose own event is seen are dropped instead.

    Lost: unclaimed and received at or before ``horizon``; unclaimed although the leader was
    seen a claim timeout ago (its seen mark ends at or before ``seen_cutoff``); unclaimed and
    waiting behind a holder of its own event that is gone (``wait_for_holder``); or claimed by
    a claim that expired."""

    scope: str
    owner: UUID
    now: datetime
    horizon: datetime
    seen_cutoff: datetime
    claimed_until: datetime


class Steps(Protocol):
    """The protocol's steps on one backend; each takes many requests and answers each.

    ``conn`` is whatever the backend's units run on (``Connection`` of the backend module):
    the Store opens it, or a caller provides it inside its own transaction.
    """

    async def take(self, conn: Any, requests: Sequence[TakeLeases]) -> list[Taken]: ...

    async def marks(self, conn: Any, requests: Sequence[ReadMarks]) -> list[dict[UUID, Marks]]: ...

    async def park(self, conn: Any, requests: Sequence[Park]) -> list[frozenset[UUID]]: ...

    async def complete(self, conn: Any, requests: Sequence[Complete]) -> list[Completed]: ...

    async def release(self, conn: Any, requests: Sequence[Release]) -> list[None]: ...

    async def renew_claims(self, conn: Any, requests: Sequence[RenewClaims]) -> list[int]: ...

    async def sweep(self, conn: Any, requests: Sequence[Sweep]) -> list[list[Claimed]]: ...


class Joined:
    """The steps on a connection of the caller's, inside a transaction the caller began and
    will end (``Store.joined``): a step's writes commit or roll back with the caller's own.

    One request at a time, as given: no merging with other callers (their statements would
    join this transaction), no retries (a transient fault fails the caller's transaction,
    which the caller retries as a whole) and no commit. The parking proof above holds inside
    the caller's transaction as long as it runs at READ COMMITTED (Postgres' default): the
    completion's second claim needs a fresh snapshot. Its locks are held until the caller's
    transaction ends, so keep it short.
    """

    __slots__ = ("_conn", "_steps")

    def __init__(self, steps: Steps, conn: Any) -> None:
        self._steps = steps
        self._conn = conn

    async def take(self, request: TakeLeases) -> Taken:
        (result,) = await self._steps.take(self._conn, [request])
        return result

    async def marks(self, request: ReadMarks) -> dict[UUID, Marks]:
        (result,) = await self._steps.marks(self._conn, [request])
        return result

    async def park(self, request: Park) -> frozenset[UUID]:
        (result,) = await self._steps.park(self._conn, [request])
        return result

    async def complete(self, request: Complete) -> Completed:
        (result,) = await self._steps.complete(self._conn, [request])
        return result

    async def release(self, request: Release) -> None:
        await self._steps.release(self._conn, [request])

    async def renew_claims(self, request: RenewClaims) -> int:
        (result,) = await self._steps.renew_claims(self._conn, [request])
        return result

    async def sweep(self, request: Sweep) -> list[Claimed]:
        (result,) = await self._steps.sweep(self._conn, [request])
        return result
