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
* A lease is renewed while its handler runs, so a slow handler is not taken over.
* A follower stays stored until its own handler succeeded; a claimed follower whose handler
  failed or whose worker died is handed back by ``get_lost_followers`` once the claim expires.

This module knows nothing of SQL dialects: statements and the two multi-row steps (complete,
park) come from ``store._queries``; units of work and retries from ``store``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar, Generic, TypeVar, cast
from uuid import UUID, uuid4

from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ordering_sql.errors import (
    ClosedError,
    ConfigurationError,
    EventArrivedEarly,
    EventBeingProcessed,
    LeaseLostError,
    MaxDepthExceeded,
    OrderingError,
)
from ordering_sql.models import EventLike, HasId, ReceivedEvent, utc_now
from ordering_sql.schema import SCOPE_LENGTH
from ordering_sql.settings import Durations, Settings, mask_url
from ordering_sql.store import Store, acquire_store, release_store
from ordering_sql.store._queries import params

__all__ = ["CausalOrdering", "EventHandler"]

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
            msg = f"Expected an event or an event id, got the string {event!r}."
            raise ConfigurationError(msg) from None
    return event.id


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
        if not isinstance(scope, str) or not scope or len(scope) > SCOPE_LENGTH:
            msg = (
                f"scope must be a non-empty string of at most {SCOPE_LENGTH} chars, got {scope!r}."
            )
            raise ConfigurationError(msg)
        if database_url is not None and engine is not None:
            msg = "Pass either database_url or engine, not both."
            raise ConfigurationError(msg)
        if not (isinstance(event_type, type) and issubclass(event_type, BaseModel)):
            msg = f"event_type must be a pydantic model class, got {event_type!r}."
            raise ConfigurationError(msg)
        self.scope = scope
        self.durations = Durations.build(**durations)
        self.event_type: type[E] = event_type
        self._clock = clock or utc_now
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

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
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
        if token is None:
            query, release = db.queries.release_any, self._params(event.id, now=self._now())
        else:
            query, release = (
                db.queries.release,
                self._params(event.id, now=self._now(), owner=token),
            )

        async def work(conn: AsyncConnection) -> None:
            await conn.execute(query, release)

        await db.step(work, action="forget_event_is_processing")

    async def _acquire(self, event_id: UUID, leader_id: UUID | None = None) -> _Lease | None:
        """Take the lease for a fresh owner token; None if it is held or the event was seen.

        The same statement reads the marks of ``leader_id``, if given.
        """
        db = await self._db()
        token = uuid4()

        async def work(conn: AsyncConnection) -> _Lease | None:
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

    async def _release(self, event_id: UUID, token: UUID) -> None:
        """End the lease held by ``token``; a no-op if it was taken over meanwhile."""
        db = await self._db()

        async def work(conn: AsyncConnection) -> None:
            release = self._params(event_id, owner=token, now=self._now())
            await conn.execute(db.queries.release, release)

        await db.step(work, action="release_lease")

    async def _release_after_failure(self, event_id: UUID, token: UUID) -> None:
        # The handler already failed; that error is what the caller must see. If the release
        # fails too, the lease simply expires after lease_timeout.
        try:
            await self._release(event_id, token)
        except Exception:
            logger.warning(
                "could not release the lease of event %s; it expires in %s",
                event_id,
                self.durations.lease,
                exc_info=True,
                extra={"action": "release_lease", "scope": self.scope},
            )

    # -- seen marks ----------------------------------------------------------------------------

    async def event_has_been_seen(self, event: UUID | str | HasId) -> bool:
        return (await self._marks(_event_id(event))).seen

    async def record_event_as_seen(self, event: EventLike) -> None:
        db = await self._db()

        async def work(conn: AsyncConnection) -> None:
            seen_until = self._now() + self.durations.seen
            await conn.execute(db.queries.mark_seen, self._params(event.id, seen_until=seen_until))

        await db.step(work, action="record_event_as_seen")

    async def _marks(self, event_id: UUID) -> _Marks:
        """Whether ``event_id`` is seen, and whether it is being processed, right now."""
        db = await self._db()

        async def work(conn: AsyncConnection) -> _Marks:
            row = (await conn.execute(db.queries.marks, self._params(event_id))).first()
            now = self._now()
            return _Marks.at(now, *(row or (None, None)))

        return await db.read(work, action="read_marks")

    # -- followers -----------------------------------------------------------------------------

    async def record_follower(self, event: EventLike) -> None:
        """Store ``event`` as waiting for ``event.follows``."""
        if event.follows is None:
            msg = f"Event {event.id} follows nothing, so it cannot wait for a leader."
            raise ConfigurationError(msg)
        db = await self._db()

        async def work(conn: AsyncConnection) -> None:
            values = self._follower_params(event, now=self._now(), owner=None)
            await db.queries.park(conn, values, unless_leader_seen=False)

        await db.step(work, action="record_follower")

    def _follower_params(
        self, event: EventLike, *, now: datetime, owner: UUID | None
    ) -> dict[str, Any]:
        # The leader's row is kept while its followers may wait: at least the lookback.
        hold = self.durations.preceding_event_lookback + self.durations.claim_timeout
        return self._params(
            event.id,
            leader_id=event.follows,
            occurred=event.occurred,
            received=event.received,
            event=event.model_dump_json(),
            now=now,
            owner=owner,
            hold_until=now + hold,
        )

    async def forget_follower(self, follower: EventLike) -> None:
        db = await self._db()

        async def work(conn: AsyncConnection) -> None:
            await conn.execute(db.queries.forget_follower, self._params(follower.id))

        await db.step(work, action="forget_follower")

    async def get_followers(self, leader: UUID | str | HasId) -> list[E]:
        """The events waiting for ``leader``, in ``occurred`` order."""
        db = await self._db()

        async def work(conn: AsyncConnection) -> list[E]:
            query_params = self._params(leader_id=_event_id(leader))
            return self._load(await conn.execute(db.queries.followers_of, query_params))

        return await db.read(work, action="get_followers")

    async def followers_by_id(self, follower_ids: Sequence[UUID | str]) -> list[E]:
        """The stored followers with these ids, in ``occurred`` order; unknown ids are skipped."""
        ids = [_event_id(i) for i in follower_ids]
        if not ids:
            return []
        db = await self._db()

        async def work(conn: AsyncConnection) -> list[E]:
            query_params = self._params(ids=ids)
            return self._load(await conn.execute(db.queries.followers_by_id, query_params))

        return await db.read(work, action="followers_by_id")

    async def get_lost_followers(self) -> list[E]:
        """Remove and return the followers whose leader never came, in ``occurred`` order.

        Lost means: waiting since before the lookback horizon, or claimed by a leader whose claim
        expired (its worker died, or the handler for this follower failed). The caller now owns
        them: handle them as if their leader had come.
        """
        db = await self._db()

        async def work(conn: AsyncConnection) -> list[Any]:
            now = self._now()
            horizon = now - self.durations.preceding_event_lookback
            # A leader seen at least a claim timeout ago: its seen mark ends later than this.
            seen_cutoff = now + self.durations.seen - self.durations.claim_timeout
            query_params = self._params(now=now, horizon=horizon, seen_cutoff=seen_cutoff)
            return list((await conn.execute(db.queries.take_lost, query_params)).all())

        return self._load_sorted(await db.step(work, action="get_lost_followers"))

    # -- clearing ------------------------------------------------------------------------------

    async def clear(self) -> None:
        """Forget everything of this scope."""
        db = await self._db()

        async def work(conn: AsyncConnection) -> None:
            await conn.execute(db.queries.clear_followers, self._params())
            await conn.execute(db.queries.clear_events, self._params())

        await db.write(work, action="clear")
        self._leases.clear()

    async def clear_all_scopes(self) -> None:
        """Forget everything of every scope in this instance's database."""
        db = await self._db()

        async def work(conn: AsyncConnection) -> None:
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
        lease = await self._acquire_or_raise(event)
        async with self._renewing(event.id, lease.token):
            try:
                yield
            except BaseException:
                await self._release_after_failure(event.id, lease.token)
                raise
        await self._complete(event, lease.token, claim=False)

    async def wait_for_leader(self, event: EventLike) -> None:
        """Return when ``event`` may be handled; park it and raise ``EventArrivedEarly`` if not."""
        await self._wait_for_leader(event, self._leases.get(event.id), None)

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

        lease = await self._acquire_or_raise(event, leader_id=event.follows)
        async with self._renewing(event.id, lease.token):
            try:
                await self._wait_for_leader(event, lease.token, lease.leader)
            except EventArrivedEarly:
                raise  # parked: the parking transaction already ended our lease
            except BaseException:
                await self._release_after_failure(event.id, lease.token)
                raise
            try:
                yield
            except BaseException:
                await self._release_after_failure(event.id, lease.token)
                raise
        followers = await self._complete(event, lease.token, claim=True)
        await self._replay(handler, event, followers, depth)

    @asynccontextmanager
    async def _renewing(self, event_id: UUID, token: UUID) -> AsyncIterator[None]:
        """Keep the lease of ``token`` alive while the body runs longer than a third of it.

        Without this a handler slower than ``lease_timeout`` would let another worker take the
        event over while it still runs. Nothing is started for a body that ends sooner: a timer
        starts the renewer. Why it is safe: a renewal only extends a lease that ``token`` still
        holds (the same owner, not ended), in one statement; once the lease was ended (failure,
        parking) or taken over, a renewal changes nothing. A worker that dies stops renewing,
        so its lease expires as before.
        """
        interval = self.durations.lease.total_seconds() / 3
        stop = asyncio.Event()
        renewer: asyncio.Task[None] | None = None

        def start() -> None:
            nonlocal renewer
            renewer = asyncio.create_task(self._renew_until(stop, event_id, token, interval))

        timer = asyncio.get_running_loop().call_later(interval, start)
        try:
            yield
        finally:
            timer.cancel()
            stop.set()
            if renewer is not None:
                await renewer  # lets a renewal in flight finish; it never raises

    async def _renew_until(
        self, stop: asyncio.Event, event_id: UUID, token: UUID, interval: float
    ) -> None:
        db = await self._db()

        async def work(conn: AsyncConnection) -> bool:
            now = self._now()
            renewal = self._params(event_id, owner=token, lease_until=now + self.durations.lease)
            return bool((await conn.execute(db.queries.renew, renewal)).rowcount)

        while not stop.is_set():
            try:
                if not await db.step(work, action="renew_lease"):
                    return  # ended or taken over: nothing left to keep alive
            except OrderingError:
                logger.warning(
                    "could not renew the lease of event %s; trying again in %.1fs",
                    event_id,
                    interval,
                    exc_info=True,
                    extra={"action": "renew_lease", "scope": self.scope},
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    async def _acquire_or_raise(self, event: EventLike, leader_id: UUID | None = None) -> _Lease:
        lease = await self._acquire(event.id, leader_id)
        if lease is None:
            self._log(
                logging.INFO, event, "is already being processed", action="event_is_processing"
            )
            raise self.being_processed_error(event)
        return lease

    async def _wait_for_leader(
        self, event: EventLike, token: UUID | None, marks: _Marks | None
    ) -> None:
        """``marks``: the leader's marks if already read (with the lease), else None."""
        leader = event.follows
        if leader is None or leader == event.id:
            return
        # An old event's leader bookkeeping may be gone already: let it through.
        if self._now() - event.received >= self.durations.preceding_event_lookback:
            return
        marks = marks or await self._marks(leader)
        if marks.seen:
            return
        waits = self.durations.in_flight_event_timeout > timedelta(0)  # 0: park at once
        if marks.processing and waits and await self._await_leader_in_flight(event, leader):
            return
        if not await self._park(event, token):
            return  # the leader completed while we looked: go ahead
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

    async def _park(self, event: EventLike, token: UUID | None) -> bool:
        """Park ``event`` until its leader completes; False if the leader is seen after all.

        Why no follower is orphaned: the parking step flags the leader's row and reads its seen
        mark under that row's lock, and the leader's completion marks the same row seen; the
        row lock orders the two (SQLite: its single write lock). If the leader completed first,
        we see its seen mark and do not park. If we parked first, the completion sees the flag
        and claims our row in a statement that starts after our commit, so it replays us. The
        full argument is in ``store/_queries.py``.

        The follower's own lease (``token``) is ended in the same step, so a leader that
        completes right after can always take it to replay the follower.
        """
        assert event.follows is not None
        db = await self._db()

        async def work(conn: AsyncConnection) -> bool:
            now = self._now()
            values = self._follower_params(event, now=now, owner=token)
            if await db.queries.park(conn, values, unless_leader_seen=True):
                return True
            if token is not None and not await self._still_holds(db, conn, event.id, token):
                raise self.being_processed_error(event)
            return False

        return await db.step(work, action="park_follower")

    async def _still_holds(
        self, db: Store, conn: AsyncConnection, event_id: UUID, token: UUID
    ) -> bool:
        """Renew the lease of ``token``; False if another worker holds the event now.

        Needed where a retried ``_park`` finds the leader done: if the first attempt did commit
        (and so released our lease), the leader may already be replaying this event.
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

        async def work(conn: AsyncConnection) -> list[Any]:
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
        self, handler: EventHandler, leader: EventLike, followers: list[E], depth: int
    ) -> None:
        """Hand each claimed follower to ``handler``; siblings go on when one of them fails.

        A follower whose handler raised stays claimed and comes back from
        ``get_lost_followers`` once the claim expires; the first such error is re-raised at the
        end so the caller sees it.
        """
        first_error: Exception | None = None
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
                break
            except (EventBeingProcessed, EventArrivedEarly):
                continue  # another worker has it, or had it: nothing left to do here
            except Exception as exc:
                if first_error is None:
                    first_error = exc
                else:
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

    def _log(self, level: int, event: EventLike, message: str, *args: Any, action: str) -> None:
        """Log ``message`` about ``event`` as ``Event <id> <message>``; subclasses may reword."""
        extra = {"action": action, "scope": self.scope, "event_id": event.id}
        logger.log(level, "Event %r " + message, event.id, *args, extra=extra)

    # -- conveniences --------------------------------------------------------------------------

    @property
    def lease_timeout(self) -> timedelta:
        return self.durations.lease
