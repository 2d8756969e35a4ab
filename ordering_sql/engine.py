"""``CausalOrdering``: the causal ordering rules, kept durable in a database.

The rules are those of the reference in-memory engine (same methods, same meaning, same log
messages); what differs is that every mark lives in a table, and that the places where the
reference engine loses or duplicates events under concurrency are closed:

* Taking the processing lease fails for an event that is already seen, in the same statement,
  so a duplicate delivered just after another worker finished cannot run again.
* A lease carries an owner token; completing or releasing checks it.
* Completing a leader marks it seen, claims its parked followers and ends its lease in one
  atomic step, and parking a follower is ordered against that by the leader's row lock
  (``_park``), so a follower can never park itself just after its leader collected the followers.
* A lease is renewed while its handler runs, so a slow handler is not taken over; one that
  stalled past its lease still completes if nobody else took the event meanwhile.
* A follower stays stored until its own handler succeeded; a claimed follower whose handler
  failed or whose worker died is handed back by ``get_lost_followers`` once the claim expires,
  and claims are renewed while a leader replays its followers.
* The lost-follower sweep claims what it hands out, so a follower whose caller died comes back.
* Every expiry is decided on the database's clock, shared by every process (``store/_clock.py``).

This module knows nothing of SQL dialects: statements and the two multi-row steps (complete,
park) come from ``store._queries``; units of work and retries from ``store``.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar, Generic, TypeVar, cast
from uuid import UUID, uuid4

from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine

from ordering_sql._renewal import Renewal
from ordering_sql.errors import (
    ClosedError,
    ConfigurationError,
    EventArrivedEarly,
    EventBeingProcessed,
    LeaseLostError,
    MaxDepthExceeded,
)
from ordering_sql.models import EventLike, HasId, ReceivedEvent, check_event, stored_form
from ordering_sql.settings import Durations, Settings, mask_url, shortened, validate_scope
from ordering_sql.store import Connection, Store, acquire_store, release_store
from ordering_sql.store._queries import params

__all__ = ["Batch", "CausalOrdering", "EventHandler"]

logger = logging.getLogger(__name__)

E = TypeVar("E", bound=BaseModel)

#: ``handler(event, depth)``: the consumer's own handling of one event, which calls
#: ``preceding_event_confirmed(handler, event, depth)`` around its work.
EventHandler = Callable[[Any, int], Awaitable[None]]


def _event_id(event: UUID | str | HasId) -> UUID:
    if isinstance(event, UUID):
        return event
    if isinstance(event, str):
        try:
            return UUID(event)
        except ValueError:
            msg = f"Expected an event or an event id, got the string {shortened(event)}."
            raise ConfigurationError(msg) from None
    event_id = getattr(event, "id", None)
    if isinstance(event_id, UUID):
        return event_id
    msg = f"Expected an event or an event id (a UUID, or its string), got {shortened(event)}."
    raise ConfigurationError(msg)


def _follows_something(event: EventLike) -> bool:
    return event.follows is not None and event.follows != event.id


@dataclass(frozen=True, slots=True)
class _Marks:
    """An event's two marks, as of one moment."""

    seen: bool
    processing: bool

    @classmethod
    def at(cls, now: datetime, seen_until: datetime | None, lease_until: datetime | None) -> _Marks:
        return cls(
            seen=seen_until is not None and seen_until > now,
            processing=lease_until is not None and lease_until > now,
        )


@dataclass(frozen=True, slots=True)
class _Lease:
    """A processing lease this worker holds, and its leader's marks when it was taken."""

    token: UUID
    leader: _Marks | None


@dataclass(eq=False)
class _Hold:
    """Leases this worker holds for one handling, and the renewal that keeps them alive."""

    token: UUID
    event_ids: list[UUID]
    renewal: Renewal | None = None
    #: Set once the leases were ended without a release (parked, or taken over meanwhile).
    ended: bool = False

    async def pause(self) -> None:
        if self.renewal is not None:
            await self.renewal.stop()

    def resume(self) -> None:
        if self.renewal is not None:
            self.renewal.start()


def _what_is_held(event_ids: Sequence[UUID], noun: str = "the lease of event") -> str:
    """``the lease of event <id>``, or ``... <id> and N more``, for log lines."""
    more = f" and {len(event_ids) - 1} more" if len(event_ids) > 1 else ""
    return f"{noun} {event_ids[0]}{more}"


@dataclass(eq=False)
class Batch(Generic[E]):
    """What ``preceding_events_confirmed`` decided for one batch of events.

    Iterating a batch yields ``ready``: handle those, in that order (a leader comes before its
    followers). ``parked`` events wait in the database for a leader outside the batch, and
    ``skipped`` ones were repeats within the batch or already handled: acknowledge both, with
    the ready ones. ``busy`` events are being handled by another worker right now: do not
    acknowledge them, redeliver them later (as for ``EventBeingProcessed``), so that they are
    not lost if that worker dies.
    """

    ready: list[E]
    parked: list[E]
    skipped: list[E]
    busy: list[E]
    #: Followers from earlier batches that this batch's events released, handed to the handler
    #: after the batch was recorded (filled in when the ``async with`` block ends).
    replayed: list[E] = field(default_factory=list)

    def __iter__(self) -> Iterator[E]:
        return iter(self.ready)

    def __len__(self) -> int:
        return len(self.ready)


class CausalOrdering(Generic[E]):
    """Durable causal ordering of events for one ``scope``.

    Building an instance does no I/O. Instances on the same database URL share one engine and
    connection pool per event loop; ``close()`` gives this instance's share back.

    ``migrate_on_first_use``: migrate the schema at the first call if it is missing or old
    (None, the default: only an embedded SQLite database is; see ``Store.ensure_ready``).
    """

    #: The exceptions raised for the three outcomes the reference names. A subclass may put
    #: subclasses of them here: ``ordering_sql.prefect`` does, so that Prefect's own ``except``
    #: clauses catch them as well.
    arrived_early_error: ClassVar[type[EventArrivedEarly]] = EventArrivedEarly
    being_processed_error: ClassVar[type[EventBeingProcessed]] = EventBeingProcessed
    max_depth_error: ClassVar[type[MaxDepthExceeded]] = MaxDepthExceeded
    #: What ``preceding_event_confirmed`` does with an event another worker holds right now
    #: (``event_is_processing`` always raises ``EventBeingProcessed``, as the reference does).
    #: False: raise ``EventBeingProcessed`` (the consumer redelivers the message later). True,
    #: for consumers that can only acknowledge (``ordering_sql.prefect``): wait for the holder
    #: up to ``in_flight_event_timeout``; if it finished, raise ``EventArrivedEarly`` (nothing
    #: is left to do: acknowledge); if it let go, take the event; if it still holds it, store
    #: the event to wait behind it, then raise ``EventArrivedEarly``. Stored so, the event is
    #: forgotten when the holder completes it, and handed back by ``get_lost_followers`` once
    #: nobody holds it any more (its holder died).
    wait_for_holder: ClassVar[bool] = False

    def __init__(
        self,
        scope: str,
        *,
        database_url: str | None = None,
        engine: AsyncEngine | None = None,
        clock: Callable[[], datetime] | None = None,
        event_type: type[E] = ReceivedEvent,  # type: ignore[assignment]
        migrate_on_first_use: bool | None = None,
        **durations: Any,
    ) -> None:
        validate_scope(scope)
        if database_url is not None and engine is not None:
            msg = "Pass either database_url or engine, not both."
            raise ConfigurationError(msg)
        if not (isinstance(event_type, type) and issubclass(event_type, BaseModel)):
            msg = f"event_type must be a pydantic model class, got {event_type!r}."
            raise ConfigurationError(msg)
        self.scope = scope
        self.durations = Durations.build(**durations)
        self.event_type: type[E] = event_type
        # None: the database's clock (``Store.clock``), shared by every process.
        self._clock = clock
        self._migrate_on_first_use = migrate_on_first_use
        self._engine = engine
        # Validates the URL now (a clear error at construction), connects only on first use.
        self._settings = Settings.from_env(database_url) if engine is None else None
        _ = self._settings.url if self._settings else None
        self._store: Store | None = None
        self._store_loop: weakref.ReferenceType[asyncio.AbstractEventLoop] | None = None
        self._shared_stores: list[tuple[weakref.ReferenceType[Any], Store]] = []
        self._closed = False
        # Owner tokens of leases taken through the public record_event_as_processing(), so that
        # forget_event_is_processing() releases only a lease this instance still holds.
        self._leases: dict[UUID, UUID] = {}

    def __repr__(self) -> str:
        if self._store is not None:
            where = self._store.url
        elif self._settings is not None:
            where = mask_url(self._settings.database_url)
        else:
            where = mask_url(self._engine.url) if self._engine is not None else "?"
        return f"CausalOrdering(scope={self.scope!r}, database={where!r})"

    # -- lifecycle -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Give back this instance's share of the pooled connections; the instance is done."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        for loop_ref, store in self._shared_stores:
            if loop_ref() is loop:
                await release_store(store)
        self._shared_stores.clear()
        self._store = None

    async def check(self) -> None:
        """Connect and check the schema now, instead of at the first real call.

        Raises what that call would (``DatabaseUnavailableError``, ``SchemaNotReadyError``...);
        an embedded SQLite database is migrated. Useful at a service's start-up.
        """
        await (await self._db()).ensure_ready()

    async def _db(self) -> Store:
        if self._closed:
            msg = f"This CausalOrdering (scope {self.scope!r}) was closed; create a new one."
            raise ClosedError(msg)
        loop = asyncio.get_running_loop()
        store, store_loop = self._store, self._store_loop
        if store is not None and not store.disposed and store_loop and store_loop() is loop:
            return store
        if self._engine is not None:
            store = Store.from_engine(self._engine)
        else:
            assert self._settings is not None
            store = await acquire_store(self._settings)
            self._shared_stores.append((weakref.ref(loop), store))
        if self._migrate_on_first_use is not None:
            await store.ensure_ready(migrate=self._migrate_on_first_use)
        self._store, self._store_loop = store, weakref.ref(loop)
        return store

    async def now(self) -> datetime:
        """The time this instance decides on: the database's clock (or the ``clock`` given).

        Stamp ``received`` with it where the process's own clock may be off:
        ``ReceivedEvent(..., received=await ordering.now())``.
        """
        db = await self._db()
        if self._clock is None:
            await db.now()  # checks the database and reads its clock, if a reading is due
        return self._now()

    def _now(self) -> datetime:
        """The time every decision of this instance is made on: the injected clock if one was
        given, else the database's (read before each unit of work, see ``store/_clock.py``)."""
        if self._clock is None:
            assert self._store is not None, "the store is opened before any time is taken"
            return self._store.clock.now()
        now = self._clock()
        if not isinstance(now, datetime):
            msg = f"The clock returned {shortened(now)}; it must return aware datetimes."
            raise ConfigurationError(msg)
        if now.tzinfo is None or now.utcoffset() is None:
            msg = f"The clock returned a naive datetime {now!r}; it must return aware UTC times."
            raise ConfigurationError(msg)
        return now

    def _params(self, event_id: UUID | None = None, **extra: Any) -> dict[str, Any]:
        if event_id is not None:
            extra["event_id"] = event_id
        return params(scope=self.scope, **extra)

    def _load(self, rows: Iterable[Any]) -> list[E]:
        return [self.event_type.model_validate_json(row.event) for row in rows]

    def _load_sorted(self, rows: Iterable[Any]) -> list[E]:
        # RETURNING clauses cannot be ordered: sort here, by occurred, then id for stability.
        return self._load(sorted(rows, key=lambda row: (row.occurred, row.follower_id)))

    # -- processing marks ----------------------------------------------------------------------

    async def record_event_as_processing(self, event: EventLike) -> bool:
        """Take the processing lease; False if another holder has it or the event was seen."""
        lease = await self._acquire(event.id)
        if lease is None:
            return False
        self._leases[event.id] = lease.token
        return True

    async def event_has_started_processing(self, event: UUID | str | HasId) -> bool:
        return (await self._marks(_event_id(event))).processing

    async def forget_event_is_processing(self, event: EventLike) -> None:
        """End the processing mark: the lease this instance took, or (if none) whoever's it is."""
        db = await self._db()
        token = self._leases.pop(event.id, None)
        query = db.queries.release_any if token is None else db.queries.release

        async def work(conn: Connection) -> None:
            await conn.execute(query, self._params(event.id, now=self._now(), owner=token))

        await db.step(work, action="forget_event_is_processing")

    async def _acquire(self, event_id: UUID, leader_id: UUID | None = None) -> _Lease | None:
        """Take the lease for a fresh owner token; None if it is held or the event was seen.

        The same statement reads the marks of ``leader_id``, if given.
        """
        db = await self._db()
        token = uuid4()

        async def work(conn: Connection) -> _Lease | None:
            now = self._now()
            lease = self._params(
                event_id,
                owner=token,
                now=now,
                lease_until=now + self.durations.lease,
                leader_id=leader_id,
            )
            row = (await conn.execute(db.queries.acquire, lease)).first()
            if row is None:
                return None
            leader = _Marks.at(now, row.leader_seen_until, row.leader_lease_until)
            return _Lease(token, leader if leader_id is not None else None)

        return await db.step(work, action="record_event_as_processing")

    async def _release_after_failure(self, event_ids: list[UUID], token: UUID) -> None:
        """End the leases ``token`` still holds (a no-op for any taken over meanwhile).

        The handler already failed; that error is what the caller must see. If the release
        fails too, the leases simply expire after ``lease_timeout``.
        """
        db = await self._db()
        ids = db.dialect.bind_ids(event_ids)

        async def work(conn: Connection) -> None:
            release = self._params(owner=token, now=self._now(), ids=ids)
            await conn.execute(db.queries.release_many, release)

        try:
            await db.step(work, action="release_lease")
        except Exception:
            logger.warning(
                "could not release %s; it expires in %s",
                _what_is_held(event_ids),
                self.durations.lease,
                exc_info=True,
                extra={"action": "release_lease", "scope": self.scope},
            )

    # -- seen marks ----------------------------------------------------------------------------

    async def event_has_been_seen(self, event: UUID | str | HasId) -> bool:
        return (await self._marks(_event_id(event))).seen

    async def record_event_as_seen(self, event: EventLike) -> None:
        db = await self._db()

        async def work(conn: Connection) -> None:
            seen_until = self._now() + self.durations.seen
            await conn.execute(db.queries.mark_seen, self._params(event.id, seen_until=seen_until))

        await db.step(work, action="record_event_as_seen")

    async def _marks(self, event_id: UUID) -> _Marks:
        """Whether ``event_id`` is seen, and whether it is being processed, right now."""
        db = await self._db()

        async def work(conn: Connection) -> _Marks:
            row = (await conn.execute(db.queries.marks, self._params(event_id))).first()
            now = self._now()
            return _Marks.at(now, *(row or (None, None)))

        return await db.read(work, action="read_marks")

    # -- followers -----------------------------------------------------------------------------

    async def record_follower(self, event: EventLike) -> None:
        """Store ``event`` as waiting for ``event.follows``."""
        check_event(event)
        if event.follows is None:
            msg = f"Event {event.id} follows nothing, so it cannot wait for a leader."
            raise ConfigurationError(msg)
        stored = stored_form(event)
        db = await self._db()

        async def work(conn: Connection) -> None:
            values = self._follower_params(event, stored, now=self._now(), owner=None)
            await db.queries.park(conn, values, unless_leader_seen=False)

        await db.step(work, action="record_follower")

    def _follower_params(
        self,
        event: EventLike,
        stored: str,
        *,
        now: datetime,
        owner: UUID | None,
        leader: UUID | None = None,
    ) -> dict[str, Any]:
        """Parameters to park ``event`` (as ``stored``) on ``leader`` (default: its own)."""
        # The leader's row is kept while its followers may wait: at least the lookback.
        hold = self.durations.preceding_event_lookback + self.durations.claim_timeout
        return self._params(
            event.id,
            leader_id=leader or event.follows,
            occurred=event.occurred,
            received=event.received,
            event=stored,
            now=now,
            owner=owner,
            hold_until=now + hold,
        )

    async def forget_follower(self, follower: EventLike) -> None:
        db = await self._db()

        async def work(conn: Connection) -> None:
            await conn.execute(db.queries.forget_follower, self._params(follower.id))

        await db.step(work, action="forget_follower")

    async def get_followers(self, leader: UUID | str | HasId) -> list[E]:
        """The events waiting for ``leader``, in ``occurred`` order."""
        db = await self._db()

        async def work(conn: Connection) -> list[E]:
            query_params = self._params(leader_id=_event_id(leader))
            return self._load(await conn.execute(db.queries.followers_of, query_params))

        return await db.read(work, action="get_followers")

    async def followers_by_id(self, follower_ids: Sequence[UUID | str]) -> list[E]:
        """The stored followers with these ids, in ``occurred`` order; unknown ids are skipped."""
        ids = [_event_id(i) for i in follower_ids]
        if not ids:
            return []
        db = await self._db()

        async def work(conn: Connection) -> list[E]:
            query_params = self._params(ids=db.queries.bind_ids(ids))
            return self._load(await conn.execute(db.queries.followers_by_id, query_params))

        return await db.read(work, action="followers_by_id")

    async def get_lost_followers(self) -> list[E]:
        """Hand over the followers whose leader never came, in ``occurred`` order.

        Lost means: waiting since before the lookback horizon; or claimed by a leader (or by an
        earlier sweep) whose claim expired, because that worker died or the handler for this
        follower failed; or never claimed although its leader was handled a claim timeout ago.
        Handle them as if their leader had come, through ``preceding_event_confirmed`` (or
        ``event_is_processing``): a follower's row is deleted when its own handling completes.

        Unlike the reference engine, which removes them as it returns them, this sweep hands
        them over at least once: each one returned is claimed for ``claim_timeout``, and one
        not handled by then (the caller died, or its handler failed) is returned again by a
        later sweep. A sweep retried after its reply was lost returns what it had claimed.
        Followers whose own event was handled meanwhile are dropped, not returned.
        """
        db = await self._db()
        token = uuid4()  # the sweep's claims; the same for every retry of this step

        async def work(conn: Connection) -> list[Any]:
            now = self._now()
            values = self._params(
                now=now,
                horizon=now - self.durations.preceding_event_lookback,
                # A leader seen at least a claim timeout ago: its seen mark ends later than this.
                seen_cutoff=now + self.durations.seen - self.durations.claim_timeout,
                owner=token,
                claimed_until=now + self.durations.claim_timeout,
            )
            return await db.queries.sweep(conn, values)

        return self._load_sorted(await db.step(work, action="get_lost_followers"))

    # -- clearing ------------------------------------------------------------------------------

    async def clear(self) -> None:
        """Forget everything of this scope."""
        db = await self._db()

        async def work(conn: Connection) -> None:
            await conn.execute(db.queries.clear_followers, self._params())
            await conn.execute(db.queries.clear_events, self._params())

        await db.write(work, action="clear")
        self._leases.clear()

    async def clear_all_scopes(self) -> None:
        """Forget everything of every scope in this instance's database."""
        db = await self._db()

        async def work(conn: Connection) -> None:
            await conn.execute(db.queries.clear_all_followers)
            await conn.execute(db.queries.clear_all_events)

        await db.write(work, action="clear_all_scopes")
        self._leases.clear()

    # -- the ordering protocol -----------------------------------------------------------------

    @asynccontextmanager
    async def event_is_processing(self, event: EventLike) -> AsyncIterator[None]:
        """Hold the processing lease while the body runs; mark the event seen if it succeeds.

        Raises ``EventBeingProcessed`` if another worker holds the event or it was already seen,
        and ``LeaseLostError`` after the body if the lease expired and was taken over.
        """
        check_event(event)
        lease = await self._acquire_or_raise(event)
        async with self._holding(lease.token, [event.id]):
            yield
        await self._complete(event, lease.token, claim=False)

    async def wait_for_leader(self, event: EventLike) -> None:
        """Return when ``event`` may be handled; park it and raise ``EventArrivedEarly`` if not."""
        check_event(event)
        token = self._leases.get(event.id)
        hold = None if token is None else _Hold(token, [event.id])
        stored = stored_form(event) if _follows_something(event) else None
        await self._wait_for_leader(event, hold, None, stored)

    @asynccontextmanager
    async def preceding_event_confirmed(
        self, handler: EventHandler, event: EventLike, depth: int = 0
    ) -> AsyncIterator[None]:
        """Run the body only once ``event``'s leader was handled, then replay its followers.

        ``handler(follower, depth + 1)`` is called for each follower that was waiting for this
        event, in ``occurred`` order, after this event was marked seen. Raises
        ``EventBeingProcessed``, ``EventArrivedEarly`` (the event is parked: acknowledge it) or
        ``MaxDepthExceeded``.
        """
        check_event(event)
        # Checked before the lease is taken: an event that cannot wait for its leader is refused
        # whether or not it would have to, so its message is never acknowledged half-handled.
        stored = stored_form(event) if _follows_something(event) else None
        max_depth = self.durations.max_depth_of_preceding_event
        if depth > max_depth:
            self._log(
                logging.ERROR,
                event,
                "has exceeded the maximum recursion depth %s",
                max_depth,
                action="preceding_event_confirmed",
            )
            raise self.max_depth_error(event)

        lease = await self._acquire_or_raise(
            event, leader_id=event.follows, stored=stored, wait=self.wait_for_holder
        )
        async with self._holding(lease.token, [event.id]) as hold:
            await self._wait_for_leader(event, hold, lease.leader, stored)
            yield
        followers = await self._complete(event, lease.token, claim=True)
        await self._replay(handler, lease.token, [(event, followers)], depth)

    @asynccontextmanager
    async def _holding(self, token: UUID, event_ids: list[UUID]) -> AsyncIterator[_Hold]:
        """Keep the leases of ``token`` alive while the body runs; release them if it raises.

        Without renewal, a handler slower than ``lease_timeout`` would let another worker take
        the event over while it still runs. Renewing is taking the leases again with the same
        token (the lease rule of ``store/_queries.py``), so it also keeps a lease whose row was
        purged meanwhile, and it stops as soon as another worker holds the event or finished
        it. Why it is safe: the renewal is stopped (and any renewal in flight has finished)
        before the lease is ended here, by parking, by the completion that follows the body, or
        by the release after a failure, so no renewal can take back a lease its holder ended. A
        worker that dies stops renewing, so its lease expires as before.
        """
        renewal = self._renewal(
            lambda: self._take_leases(event_ids, token),
            interval=self.durations.lease,
            what=_what_is_held(event_ids),
        )
        hold = _Hold(token, event_ids, renewal)
        renewal.start()
        try:
            yield hold
        except BaseException:
            await renewal.stop()
            if not hold.ended:
                await self._release_after_failure(event_ids, token)
            raise
        await renewal.stop()

    def _renewal(
        self, renew: Callable[[], Awaitable[Any]], *, interval: timedelta, what: str
    ) -> Renewal:
        async def keep() -> bool:
            return bool(await renew())  # nothing renewed: ended or taken over

        return Renewal(keep, interval=interval.total_seconds() / 3, what=what, scope=self.scope)

    async def _take_leases(self, event_ids: list[UUID], token: UUID) -> set[UUID]:
        """Take (or renew) the leases of ``event_ids`` for ``token``; the ids now held."""
        db = await self._db()
        # Sorted: concurrent callers then lock their rows in one order (Postgres locks rows in
        # the order they are inserted), so two batches sharing events cannot deadlock.
        ids = db.dialect.bind_ids(sorted(event_ids))

        async def work(conn: Connection) -> set[UUID]:
            now = self._now()
            lease = self._params(
                owner=token, now=now, lease_until=now + self.durations.lease, ids=ids
            )
            return {row.event_id for row in await conn.execute(db.queries.acquire_many, lease)}

        return await db.step(work, action="renew_lease")

    async def _acquire_or_raise(
        self,
        event: EventLike,
        leader_id: UUID | None = None,
        stored: str | None = None,
        *,
        wait: bool = False,
    ) -> _Lease:
        """Take the lease; ``EventBeingProcessed`` if another worker holds it (or, with
        ``wait``, see ``wait_for_holder``)."""
        lease = await self._acquire(event.id, leader_id)
        if lease is None and wait:
            lease = await self._wait_for_holder(event, leader_id, stored)
        if lease is None:
            self._log(
                logging.INFO, event, "is already being processed", action="event_is_processing"
            )
            raise self.being_processed_error(event)
        return lease

    async def _wait_for_holder(
        self, event: EventLike, leader_id: UUID | None, stored: str | None
    ) -> _Lease:
        """Wait for the worker that holds ``event``: see ``wait_for_holder``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.durations.in_flight_event_timeout.total_seconds()
        longest = self.durations.poll_interval.total_seconds()
        poll = min(0.01, longest)
        while True:
            marks = await self._marks(event.id)
            if marks.seen:
                self._log(
                    logging.INFO, event, "was handled by another worker", action="wait_for_holder"
                )
                raise self.arrived_early_error(event)
            if not marks.processing or loop.time() < deadline:
                if marks.processing:
                    await asyncio.sleep(min(poll, max(0.0, deadline - loop.time())))
                    poll = min(poll * 2, longest)
                lease = await self._acquire(event.id, leader_id)
                if lease is not None:
                    return lease
                continue
            await self._wait_behind(event, stored or stored_form(event))
            self._log(
                logging.INFO,
                event,
                "is being processed by another worker, and waits for it",
                action="wait_for_holder",
            )
            raise self.arrived_early_error(event)

    async def _wait_behind(self, event: EventLike, stored: str) -> None:
        """Store ``event`` as waiting for its own holder (a follower of itself), unless seen.

        The holder's completion deletes the event's own parked row, so it is forgotten once
        the holder finishes; the sweep hands such a row back once nobody holds the event.
        """
        db = await self._db()

        async def work(conn: Connection) -> None:
            now = self._now()
            values = self._follower_params(event, stored, now=now, owner=None, leader=event.id)
            await db.queries.park(conn, values, unless_leader_seen=True)

        await db.step(work, action="wait_for_holder")

    async def _wait_for_leader(
        self, event: EventLike, hold: _Hold | None, marks: _Marks | None, stored: str | None
    ) -> None:
        """``hold``: the event's lease, if this worker holds it; ``marks``: the leader's marks
        if already read (with the lease), else None; ``stored``: the event's ``stored_form``
        (None if it follows nothing)."""
        leader = event.follows
        if leader is None or leader == event.id:
            return
        # An old event's leader bookkeeping may be gone already: let it through.
        if await self.now() - event.received >= self.durations.preceding_event_lookback:
            return
        marks = marks or await self._marks(leader)
        if marks.seen:
            return
        waits = self.durations.in_flight_event_timeout > timedelta(0)  # 0: park at once
        if marks.processing and waits and await self._await_leader_in_flight(event, leader):
            return
        if hold is not None:
            await hold.pause()  # parking ends the lease: no renewal may follow it
        try:
            assert stored is not None  # the event follows something
            parked = await self._park(event, stored, None if hold is None else hold.token)
        except EventBeingProcessed:
            if hold is not None:
                hold.ended = True  # another worker holds it now: nothing of ours to release
            raise
        if not parked:
            if hold is not None:
                hold.resume()  # the leader completed while we looked: go ahead, still holding
            return
        if hold is not None:
            hold.ended = True
        self._log(
            logging.INFO,
            event,
            "arrived before the event it follows %s",
            leader,
            action="wait_for_leader",
        )
        raise self.arrived_early_error(event)

    async def _await_leader_in_flight(self, event: EventLike, leader: UUID) -> bool:
        """Poll a leader that is being processed right now; True once it is seen."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.durations.in_flight_event_timeout.total_seconds()
        longest = self.durations.poll_interval.total_seconds()
        poll = min(0.01, longest)  # most leaders finish within milliseconds: look early, back off
        while loop.time() < deadline:
            await asyncio.sleep(min(poll, max(0.0, deadline - loop.time())))
            poll = min(poll * 2, longest)
            marks = await self._marks(leader)
            if marks.seen:
                return True
            if not marks.processing:
                return False  # the leader's handler failed or gave up: park and wait for it
        self._log(
            logging.WARNING,
            event,
            "timed out waiting for its in-flight leader %s, will treat as lost",
            leader,
            action="wait_for_leader",
        )
        return False

    async def _park(self, event: EventLike, stored: str, token: UUID | None) -> bool:
        """Park ``event`` until its leader completes; False if the leader is seen after all.

        Why no follower is orphaned: the parking step flags the leader's row and reads its seen
        mark under that row's lock, and the leader's completion marks the same row seen; the
        row lock orders the two (SQLite: its single write lock). If the leader completed first,
        we see its seen mark and do not park. If we parked first, the completion sees the flag
        and claims our row in a statement that starts after our commit, so it replays us. The
        full argument is in ``store/_queries.py``.

        The follower's own lease (``token``) is ended in the same step, so a leader that
        completes right after can always take it to replay the follower. If the leader turns
        out seen, the lease is taken back (it may have been ended: see ``Queries.park``); if
        another worker has the event by then, ``EventBeingProcessed`` is raised.
        """
        assert event.follows is not None
        db = await self._db()

        async def work(conn: Connection) -> bool:
            now = self._now()
            values = self._follower_params(event, stored, now=now, owner=token)
            if await db.queries.park(conn, values, unless_leader_seen=True):
                return True
            if token is not None and not await self._still_holds(db, conn, event.id, token):
                raise self.being_processed_error(event)
            return False

        return await db.step(work, action="park_follower")

    async def _still_holds(self, db: Store, conn: Connection, event_id: UUID, token: UUID) -> bool:
        """Take the lease of ``token`` back; False if another worker holds the event now.

        Needed where ``_park`` finds the leader done: the park step may have ended our lease
        (on Postgres it always does; anywhere, a retried step whose first attempt committed
        did), and the leader may already be replaying this event.
        """
        now = self._now()
        lease = self._params(
            event_id, owner=token, now=now, lease_until=now + self.durations.lease, leader_id=None
        )
        return (await conn.execute(db.queries.acquire, lease)).first() is not None

    async def _complete(self, event: EventLike, token: UUID, *, claim: bool) -> list[E]:
        """Mark ``event`` seen and end its lease; with ``claim``, take its parked followers.

        All of it happens or none (one statement on Postgres, one transaction on SQLite; a
        second claim statement may follow, see ``Queries.complete``). If ``token`` no longer
        holds the lease (it expired and another worker took over), nothing is written and
        ``LeaseLostError`` is raised. The event's own parked row, if any, is deleted: it has
        now been handled.
        """
        db = await self._db()

        async def work(conn: Connection) -> list[Any]:
            now = self._now()
            values = self._params(
                event.id,
                owner=token,
                now=now,
                seen_until=now + self.durations.seen,
                leader_id=event.id,
                claimed_until=now + self.durations.claim_timeout,
            )
            claimed = await db.queries.complete(conn, values, claim=claim)
            if claimed is None:
                msg = (
                    f"The processing lease of event {event.id} in scope {self.scope!r} was taken "
                    f"over by another worker after it expired ({self.durations.lease}); this "
                    "worker's result was not recorded."
                )
                raise LeaseLostError(msg, scope=self.scope, event_id=event.id)
            return claimed

        followers = self._load_sorted(await db.step(work, action="complete_event"))
        await db.purge_if_due(self._now())
        return followers

    async def _replay(
        self,
        handler: EventHandler,
        token: UUID,
        groups: Sequence[tuple[EventLike, list[E]]],
        depth: int,
    ) -> None:
        """Hand the followers ``token`` claimed to ``handler``, leader by leader.

        The claims are renewed while the replay runs (``_holding`` says why renewing is safe;
        a follower's claim ends when its own handling deletes its row), so a sweep does not
        hand out a follower that waits its turn or whose handler is running; if this worker
        dies, the claims expire and the sweep returns the followers not handled yet.

        Siblings go on when one of them fails: a follower whose handler raised stays claimed
        and comes back from ``get_lost_followers`` once the claim expires; the first such error
        is re-raised at the end so the caller sees it.
        """
        leaders = [leader.id for leader, followers in groups if followers]
        if not leaders:
            return
        db = await self._db()
        ids = db.dialect.bind_ids(leaders)

        async def renew_claims() -> int:
            async def work(conn: Connection) -> int:
                until = self._now() + self.durations.claim_timeout
                values = self._params(owner=token, leaders=ids, claimed_until=until)
                return int((await conn.execute(db.queries.renew_claims, values)).rowcount)

            return await db.step(work, action="renew_claims")

        first_error: Exception | None = None
        what = f"the claims on the followers of {_what_is_held(leaders, 'event')}"
        async with self._renewal(renew_claims, interval=self.durations.claim_timeout, what=what):
            for leader, followers in groups:
                for follower in followers:
                    try:
                        await handler(follower, depth + 1)
                    except MaxDepthExceeded:
                        self._log(
                            logging.WARNING,
                            leader,
                            "reached its max depth of %s followers processed.",
                            self.durations.max_depth_of_preceding_event,
                            action="replay_followers",
                        )
                        break  # the rest of this leader's followers come back by the sweep
                    except (EventBeingProcessed, EventArrivedEarly):
                        continue  # another worker has it, or had it: nothing left to do here
                    except Exception as exc:
                        if first_error is None:
                            first_error = exc
                            continue
                        logger.error(
                            "handler failed for follower %r of %r; it is recovered by "
                            "get_lost_followers() once its claim expires",
                            cast("EventLike", follower).id,
                            leader.id,
                            exc_info=exc,
                            extra={"action": "replay_followers", "scope": self.scope},
                        )
        if first_error is not None:
            raise first_error

    # -- batches -------------------------------------------------------------------------------

    @asynccontextmanager
    async def preceding_events_confirmed(
        self, handler: EventHandler, events: Iterable[E]
    ) -> AsyncIterator[Batch[E]]:
        """The batch form of ``preceding_event_confirmed``: decide a whole batch at once.

        ::

            async with ordering.preceding_events_confirmed(handler, events) as batch:
                for event in batch:  # batch.ready, leaders before their followers
                    await handle(event)
            # acknowledge every message of the batch

        On entry, one step takes the processing leases of all the events and reads the marks of
        the leaders outside the batch. An event is ready if it follows nothing, if its leader
        was handled, if its leader is ready earlier in the same batch, or if it is older than
        the lookback. Any other event is parked at once (one statement each; a batch never waits
        for a leader in flight elsewhere: that leader's completion replays it). When the block
        ends without an error, one step marks every ready event seen, ends the leases and claims
        the followers they released; those are then handed to ``handler(follower, 1)``, as
        ``preceding_event_confirmed`` does, and listed in ``batch.replayed``.

        If the block raises, nothing is recorded: the leases are ended and the error propagates,
        so a redelivered batch is handled again. ``LeaseLostError`` is raised at the end if some
        leases expired and were taken over while the block ran (the rest is recorded).
        """
        unique: dict[UUID, E] = {}
        skipped: list[E] = []
        stored: dict[UUID, str] = {}  # as in preceding_event_confirmed: checked before leasing
        for event in events:
            event_id = check_event(event).id
            if event_id in unique:
                skipped.append(event)
                continue
            unique[event_id] = event
            if _follows_something(cast("EventLike", event)):
                stored[event_id] = stored_form(cast("EventLike", event))
        token = uuid4()
        taken, marks = await self._acquire_batch(unique, token) if unique else (set(), {})
        batch = Batch[E](ready=[], parked=[], skipped=skipped, busy=[])
        for event_id, event in unique.items():
            if event_id not in taken:
                seen = marks.get(event_id, _Marks(seen=False, processing=False)).seen
                (batch.skipped if seen else batch.busy).append(event)
        await self._sort_batch(batch, unique, stored, taken, marks, token)
        ids = [cast("EventLike", event).id for event in batch.ready]
        if not ids:
            yield batch
            return
        async with self._holding(token, ids):
            yield batch
        lost = await self._complete_batch(handler, batch, token)
        if lost:
            msg = (
                f"The processing leases of {len(lost)} events of this batch in scope "
                f"{self.scope!r} were taken over by another worker after they expired "
                f"({self.durations.lease}); their results were not recorded."
            )
            raise LeaseLostError(msg, scope=self.scope, event_id=lost[0])

    async def _acquire_batch(
        self, events: dict[UUID, E], token: UUID
    ) -> tuple[set[UUID], dict[UUID, _Marks]]:
        """Take the leases of ``events`` for ``token``; read the marks of the leaders we need.

        Returns the ids taken, and the marks of the events not taken (seen, or held elsewhere)
        and of each leader of a taken event that is not itself taken (outside the batch, or in
        it but not taken). A retry of this step is harmless: the leases ``token`` already holds
        are taken again.
        """
        db = await self._db()
        bind = db.dialect.bind_ids

        async def work(conn: Connection) -> tuple[set[UUID], dict[UUID, _Marks]]:
            now = self._now()
            # Sorted: concurrent batches then lock their rows in one order, so two batches
            # sharing events cannot deadlock (Postgres locks in the order rows are inserted).
            lease = self._params(
                owner=token,
                now=now,
                lease_until=now + self.durations.lease,
                ids=bind(sorted(events)),
            )
            taken = {row.event_id for row in await conn.execute(db.queries.acquire_many, lease)}
            wanted = {event_id for event_id in events if event_id not in taken}
            for event_id, event in events.items():
                leader = cast("EventLike", event).follows
                if event_id in taken and leader not in taken and self._waits(event, now):
                    wanted.add(cast("UUID", leader))
            marks: dict[UUID, _Marks] = {}
            if wanted:
                query_params = self._params(ids=bind(wanted))
                for row in await conn.execute(db.queries.marks_many, query_params):
                    marks[row.event_id] = _Marks.at(now, row.seen_until, row.lease_until)
            return taken, marks

        return await db.step(work, action="acquire_batch")

    def _waits(self, event: E, now: datetime) -> bool:
        """Whether ``event`` names a leader it must wait for (not itself; not too old)."""
        e = cast("EventLike", event)
        lookback = self.durations.preceding_event_lookback
        return _follows_something(e) and now - e.received < lookback

    async def _sort_batch(
        self,
        batch: Batch[E],
        events: dict[UUID, E],
        stored: dict[UUID, str],
        taken: set[UUID],
        marks: dict[UUID, _Marks],
        token: UUID,
    ) -> None:
        """Sort the taken events into ``batch.ready`` (leaders first) and ``batch.parked``.

        Walks each event's chain of leaders within the batch iteratively (a batch may hold a
        chain of any length, or a cycle), deciding a leader before its follower. An event whose
        leader is not ready is parked right away; if parking finds the leader seen after all
        (it completed meanwhile) the event is ready instead.
        """
        ready: dict[UUID, bool] = {}  # event id -> ready (True), or parked or skipped (False)
        now = self._now()
        for first_id in events:
            if first_id not in taken or first_id in ready:
                continue
            path: list[E] = []
            on_path: set[UUID] = set()
            current = events[first_id]
            while True:
                path.append(current)
                on_path.add(cast("EventLike", current).id)
                leader = cast("EventLike", current).follows
                if (
                    leader is None
                    or leader not in taken
                    or leader in ready
                    or leader in on_path
                    or not self._waits(current, now)
                ):
                    break
                current = events[leader]
            for event in reversed(path):  # leaders first
                e = cast("EventLike", event)
                leader_id = cast("UUID", e.follows)
                if not self._waits(event, now):
                    go = True
                elif leader_id in taken:
                    go = ready.get(leader_id, False)  # not decided yet: a cycle
                else:
                    go = marks.get(leader_id, _Marks(seen=False, processing=False)).seen
                if not go:
                    go = await self._park_in_batch(batch, event, stored[e.id], token)
                ready[e.id] = go
                if go:
                    batch.ready.append(event)

    async def _park_in_batch(self, batch: Batch[E], event: E, stored: str, token: UUID) -> bool:
        """Park ``event``; True if its leader turned out seen, so it is ready after all."""
        e = cast("EventLike", event)
        try:
            parked = await self._park(e, stored, token)
        except EventBeingProcessed:
            batch.busy.append(event)  # our lease ended and another worker has it now
            return False
        if not parked:
            return True
        self._log(
            logging.INFO,
            e,
            "arrived before the event it follows %s",
            e.follows,
            action="preceding_events_confirmed",
        )
        batch.parked.append(event)
        return False

    async def _complete_batch(
        self, handler: EventHandler, batch: Batch[E], token: UUID
    ) -> list[UUID]:
        """Record the ready events, then replay the followers they released; the ids lost.

        One step marks the events seen, ends their leases, forgets their own parked rows and
        claims their followers (the guarantees of ``_complete``, for many rows: only the leases
        ``token`` still holds are completed). Followers in the batch itself are not claimed:
        they were just handled.
        """
        db = await self._db()
        ids = [cast("EventLike", event).id for event in batch.ready]
        ordered = sorted(ids)  # one lock order for every batch, as in _acquire_batch

        async def work(conn: Connection) -> tuple[set[Any], list[Any]]:
            now = self._now()
            values = self._params(
                owner=token,
                now=now,
                seen_until=now + self.durations.seen,
                claimed_until=now + self.durations.claim_timeout,
                ids=db.dialect.bind_ids(ordered),
            )
            return await db.queries.complete_many(conn, values)

        done, rows = await db.step(work, action="complete_batch")
        await db.purge_if_due(self._now())
        by_leader: dict[UUID, list[Any]] = {}
        for row in rows:
            by_leader.setdefault(row.leader_id, []).append(row)
        leaders = {cast("EventLike", event).id: cast("EventLike", event) for event in batch.ready}
        groups = [
            (leaders[leader_id], self._load_sorted(leader_rows))
            for leader_id, leader_rows in by_leader.items()
        ]
        for _, followers in groups:
            batch.replayed += followers
        await self._replay(handler, token, groups, 0)
        return [event_id for event_id in ids if event_id not in done]

    def _log(self, level: int, event: EventLike, message: str, *args: Any, action: str) -> None:
        """Log ``message`` about ``event`` as ``Event <id> <message>``; subclasses may reword."""
        extra = {"action": action, "scope": self.scope, "event_id": event.id}
        logger.log(level, "Event %r " + message, event.id, *args, extra=extra)

    # -- conveniences --------------------------------------------------------------------------

    @property
    def lease_timeout(self) -> timedelta:
        return self.durations.lease
