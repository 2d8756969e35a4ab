"""``CausalOrdering``: the causal ordering rules, kept durable in a database.

The rules are those of the reference in-memory engine (same methods, same meaning, same log
messages); what differs is that every mark lives in a table, and that the places where the
reference engine loses or duplicates events under concurrency are closed:

* Taking the processing lease fails for an event that is already seen, in the same step, so a
  duplicate delivered just after another worker finished cannot run again.
* A lease carries an owner token; completing or releasing checks it. A lease is renewed while
  its handler runs; one that stalled past its lease still completes if nobody took the event.
* Completing a leader marks it seen, claims its parked followers and ends its lease in one
  step, and parking a follower is ordered against that by the leader's row lock, so a follower
  can never park itself just after its leader collected the followers (``store/_steps.py``).
* A follower stays stored until its own handler succeeded; claims are renewed while a leader
  replays its followers, and a follower whose handler failed or whose worker died is handed
  back by ``get_lost_followers`` once the claim expires. The sweep claims what it hands out.
* Every expiry is decided on the database's clock, shared by every process (``store/_clock``).

This module holds the decisions: what to take, when to wait, park, complete, replay. The
statements are the backends' (``store/postgres.py``, ``store/sqlite.py``), reached through the
Store's typed steps; single events go through the same steps as batches, as batches of one.
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

from ordering_sql._planner import Planned, plan
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
from ordering_sql.store import Store, acquire_store, release_store
from ordering_sql.store._steps import (
    Claimed,
    Complete,
    Completed,
    Marks,
    Park,
    Parking,
    ReadMarks,
    Release,
    RenewClaims,
    Sweep,
    TakeLeases,
    Taken,
)

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
        await self._db()

    async def now(self) -> datetime:
        """The time this instance decides on: the database's clock (or the ``clock`` given).

        Stamp ``received`` with it where the process's own clock may be off:
        ``ReceivedEvent(..., received=await ordering.now())``.
        """
        await self._db()
        return self._now()

    async def _db(self) -> Store:
        """This instance's Store on the running loop, checked and with its clock read."""
        if self._closed:
            msg = f"This CausalOrdering (scope {self.scope!r}) was closed; create a new one."
            raise ClosedError(msg)
        loop = asyncio.get_running_loop()
        store, store_loop = self._store, self._store_loop
        if store is None or store.disposed or store_loop is None or store_loop() is not loop:
            if self._engine is not None:
                store = Store.from_engine(self._engine)
            else:
                assert self._settings is not None
                store = await acquire_store(self._settings)
                self._shared_stores.append((weakref.ref(loop), store))
            self._store, self._store_loop = store, weakref.ref(loop)
        await store.ensure_ready(migrate=self._migrate_on_first_use)
        if self._clock is None:
            await store.clock.sync_if_due()
        return store

    def _now(self) -> datetime:
        """The time every decision of this instance is made on: the injected clock if one was
        given, else the database's (read by ``_db``, see ``store/_clock.py``)."""
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

    def _load(self, claimed: Iterable[Claimed]) -> list[E]:
        """The events of claimed followers, in ``occurred`` order (then id, for stability)."""
        ordered = sorted(claimed, key=lambda c: (c.occurred, c.follower_id))
        return [self.event_type.model_validate_json(c.event) for c in ordered]

    # -- processing marks ----------------------------------------------------------------------

    async def record_event_as_processing(self, event: EventLike) -> bool:
        """Take the processing lease; False if another holder has it or the event was seen."""
        event_id = _event_id(event)
        token = uuid4()
        if event_id not in (await self._take([event_id], token)).taken:
            return False
        self._leases[event_id] = token
        return True

    async def event_has_started_processing(self, event: UUID | str | HasId) -> bool:
        """Whether a handler holds ``event``'s processing lease right now."""
        return (await self._marks(_event_id(event))).processing

    async def forget_event_is_processing(self, event: EventLike) -> None:
        """End the processing mark: the lease this instance took, or (if none) whoever's it is."""
        event_id = _event_id(event)
        db = await self._db()
        token = self._leases.pop(event_id, None)
        await db.release(Release(self.scope, token, (event_id,), self._now()), self._clock)

    # -- seen marks ----------------------------------------------------------------------------

    async def event_has_been_seen(self, event: UUID | str | HasId) -> bool:
        """Whether ``event`` was handled (within ``seen_expiration``)."""
        return (await self._marks(_event_id(event))).seen

    async def record_event_as_seen(self, event: EventLike) -> None:
        """Mark ``event`` handled, leaving any lease as it is."""
        event_id = _event_id(event)
        db = await self._db()
        await db.mark_seen(self.scope, [event_id], self._now() + self.durations.seen)

    async def _marks(self, event_id: UUID) -> Marks:
        db = await self._db()
        marks = await db.marks(ReadMarks(self.scope, (event_id,), self._now()), self._clock)
        return marks.get(event_id, Marks(seen=False, processing=False))

    # -- followers -----------------------------------------------------------------------------

    async def record_follower(self, event: EventLike) -> None:
        """Store ``event`` as waiting for ``event.follows``.

        Raises ``ConfigurationError`` for an event that follows nothing or cannot be stored.
        """
        check_event(event)
        if event.follows is None:
            msg = f"Event {event.id} follows nothing, so it cannot wait for a leader."
            raise ConfigurationError(msg)
        stored = stored_form(event)
        await self._park([(event, stored)], None, unless_leader_seen=False)

    async def forget_follower(self, follower: EventLike) -> None:
        """Forget that ``follower`` waits for its leader."""
        db = await self._db()
        await db.forget_followers(self.scope, [_event_id(follower)])

    async def get_followers(self, leader: UUID | str | HasId) -> list[E]:
        """The events waiting for ``leader``, in ``occurred`` order."""
        db = await self._db()
        found = await db.followers_of(self.scope, _event_id(leader))
        return [self.event_type.model_validate_json(event) for event in found]

    async def followers_by_id(self, follower_ids: Sequence[UUID | str]) -> list[E]:
        """The stored followers with these ids, in ``occurred`` order; unknown ids are skipped."""
        ids = [_event_id(i) for i in follower_ids]
        if not ids:
            return []
        db = await self._db()
        found = await db.followers_by_id(self.scope, ids)
        return [self.event_type.model_validate_json(event) for event in found]

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
        now = self._now()
        sweep = Sweep(
            self.scope,
            owner=uuid4(),  # the sweep's claims; the same for every retry of this step
            now=now,
            horizon=now - self.durations.preceding_event_lookback,
            # A leader seen at least a claim timeout ago: its seen mark ends no later than this.
            seen_cutoff=now + self.durations.seen - self.durations.claim_timeout,
            claimed_until=now + self.durations.claim_timeout,
        )
        return self._load(await db.sweep(sweep, self._clock))

    # -- clearing ------------------------------------------------------------------------------

    async def clear(self) -> None:
        """Forget everything of this scope."""
        await (await self._db()).clear(self.scope)
        self._leases.clear()

    async def clear_all_scopes(self) -> None:
        """Forget everything of every scope in this instance's database."""
        await (await self._db()).clear(None)
        self._leases.clear()

    # -- the ordering protocol -----------------------------------------------------------------

    @asynccontextmanager
    async def event_is_processing(self, event: EventLike) -> AsyncIterator[None]:
        """Hold the processing lease while the body runs; mark the event seen if it succeeds.

        Raises ``EventBeingProcessed`` if another worker holds the event or it was already seen,
        and ``LeaseLostError`` after the body if the lease expired and was taken over.
        """
        check_event(event)
        token, _ = await self._take_or_raise(event, with_leader=False)
        async with self._holding(token, [event.id]):
            yield
        await self._complete_one(event, token, claim=False)

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
        ``EventBeingProcessed``, ``EventArrivedEarly`` (the event is parked: acknowledge it),
        ``MaxDepthExceeded``, ``LeaseLostError`` (after the body: another worker took the event
        over), or ``ConfigurationError`` (before anything is taken: the event cannot be ordered
        or stored).
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

        token, leader = await self._take_or_raise(event, stored, wait=self.wait_for_holder)
        async with self._holding(token, [event.id]) as hold:
            await self._wait_for_leader(event, hold, leader, stored)
            yield
        followers = await self._complete_one(event, token, claim=True)
        await self._replay(handler, token, [(event, followers)], depth)

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
        the lookback. The others are parked at once, in one step (a batch never waits for a
        leader in flight elsewhere: that leader's completion replays it). When the block ends
        without an error, one step marks every ready event seen, ends the leases and claims
        the followers they released; those are then handed to ``handler(follower, 1)``, as
        ``preceding_event_confirmed`` does, and listed in ``batch.replayed``.

        If the block raises, nothing is recorded: the leases are ended and the error propagates,
        so a redelivered batch is handled again. ``LeaseLostError`` is raised at the end if some
        leases expired and were taken over while the block ran (the rest is recorded).
        ``ConfigurationError`` (before anything is taken) if an event cannot be ordered or
        stored.
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
        batch = Batch[E](ready=[], parked=[], skipped=skipped, busy=[])
        token = uuid4()
        if unique:
            await self._decide_batch(batch, unique, stored, token)
        ids = [cast("EventLike", event).id for event in batch.ready]
        if not ids:
            yield batch
            return
        async with self._holding(token, ids):
            yield batch
        completed = await self._complete(ids, token, claim=True)
        groups = [
            (leader, self._load(c for c in completed.claimed if c.leader_id == leader.id))
            for leader in (cast("EventLike", event) for event in batch.ready)
        ]
        for _, followers in groups:
            batch.replayed += followers
        await self._replay(handler, token, groups, 0)
        lost = [event_id for event_id in ids if event_id not in completed.done]
        if lost:
            msg = (
                f"The processing leases of {len(lost)} events of this batch in scope "
                f"{self.scope!r} were taken over by another worker after they expired "
                f"({self.durations.lease}); their results were not recorded."
            )
            raise LeaseLostError(msg, scope=self.scope, event_id=lost[0])

    async def _decide_batch(
        self, batch: Batch[E], events: dict[UUID, E], stored: dict[UUID, str], token: UUID
    ) -> None:
        """Take the batch's leases, plan it (``_planner.plan``), park what waits, and fill in
        ``batch``: ready (leaders first), parked, skipped (seen), busy (held elsewhere)."""
        await self._db()
        now = self._now()
        lookback = self.durations.preceding_event_lookback

        def waits_for(event: EventLike) -> UUID | None:
            young = now - event.received < lookback
            return event.follows if _follows_something(event) and young else None

        planned = [Planned(i, waits_for(cast("EventLike", e))) for i, e in events.items()]
        leaders = {p.waits_for for p in planned if p.waits_for is not None}
        taken = await self._take(list(events), token, leaders - events.keys())
        for event_id, event in events.items():
            if event_id not in taken.taken:
                (batch.skipped if taken.of(event_id).seen else batch.busy).append(event)
        seen = {leader for leader in leaders if taken.of(leader).seen}
        decided = plan(planned, taken=set(taken.taken), seen=seen)
        batch.ready += [events[i] for i in decided.ready]
        if not decided.park:
            return
        parking = [(cast("EventLike", events[i]), stored[i]) for i in decided.park]
        parked = await self._park(parking, token)
        unparked = [i for i in decided.park if i not in parked]
        back = await self._take(unparked, token) if unparked else Taken(frozenset())
        for event_id in decided.park:
            event = events[event_id]
            if event_id in parked:
                self._log(
                    logging.INFO,
                    cast("EventLike", event),
                    "arrived before the event it follows %s",
                    cast("EventLike", event).follows,
                    action="preceding_events_confirmed",
                )
                batch.parked.append(event)
            elif event_id in back.taken:
                batch.ready.append(event)  # its leader completed meanwhile: it goes ahead
            else:
                batch.busy.append(event)  # our lease ended and another worker has it now

    # -- the steps, as this instance asks for them ---------------------------------------------

    async def _take(
        self, event_ids: Sequence[UUID], token: UUID, leaders: Iterable[UUID] = ()
    ) -> Taken:
        """Take (or renew) the leases of ``event_ids`` for ``token``; read ``leaders``' marks."""
        db = await self._db()
        now = self._now()
        request = TakeLeases(
            self.scope, token, tuple(event_ids), now, now + self.durations.lease, tuple(leaders)
        )
        return await db.take(request, self._clock)

    async def _park(
        self,
        events: Sequence[tuple[EventLike, str]],
        token: UUID | None,
        *,
        unless_leader_seen: bool = True,
        leader: UUID | None = None,
    ) -> frozenset[UUID]:
        """Park ``events`` (each with its ``stored_form``) on their leaders (or on ``leader``);
        the ids parked. ``token``'s leases of them end in the same step (see ``_steps.Park``)."""
        db = await self._db()
        now = self._now()
        # The leader's row is kept while its followers may wait: at least the lookback.
        hold = self.durations.preceding_event_lookback + self.durations.claim_timeout
        followers = tuple(
            Parking(e.id, leader or cast("UUID", e.follows), e.occurred, e.received, stored)
            for e, stored in events
        )
        request = Park(self.scope, token, followers, now, now + hold, unless_leader_seen)
        return await db.park(request, self._clock)

    async def _complete(self, event_ids: Sequence[UUID], token: UUID, *, claim: bool) -> Completed:
        """Mark ``event_ids`` seen, end ``token``'s leases, claim their followers (``claim``)."""
        db = await self._db()
        now = self._now()
        request = Complete(
            self.scope,
            token,
            tuple(event_ids),
            now,
            now + self.durations.seen,
            now + self.durations.claim_timeout,
            claim,
        )
        completed = await db.complete(request, self._clock)
        await db.purge_if_due(self._now())
        return completed

    async def _complete_one(self, event: EventLike, token: UUID, *, claim: bool) -> list[E]:
        """``_complete`` of one event; its claimed followers. ``LeaseLostError`` if another
        worker holds the event now or has finished it: then nothing was recorded."""
        completed = await self._complete([event.id], token, claim=claim)
        if event.id not in completed.done:
            msg = (
                f"The processing lease of event {event.id} in scope {self.scope!r} was taken "
                f"over by another worker after it expired ({self.durations.lease}); this "
                "worker's result was not recorded."
            )
            raise LeaseLostError(msg, scope=self.scope, event_id=event.id)
        return self._load(completed.claimed)

    async def _release_after_failure(self, event_ids: list[UUID], token: UUID) -> None:
        """End the leases ``token`` still holds (a no-op for any taken over meanwhile).

        The handler already failed; that error is what the caller must see. If the release
        fails too, the leases simply expire after ``lease_timeout``.
        """
        try:
            db = await self._db()
            await db.release(Release(self.scope, token, tuple(event_ids), self._now()), self._clock)
        except Exception:
            logger.warning(
                "could not release %s; it expires in %s",
                _what_is_held(event_ids),
                self.durations.lease,
                exc_info=True,
                extra={"action": "release_lease", "scope": self.scope},
            )

    # -- holding, waiting, parking, replaying --------------------------------------------------

    async def _take_or_raise(
        self,
        event: EventLike,
        stored: str | None = None,
        *,
        wait: bool = False,
        with_leader: bool = True,
    ) -> tuple[UUID, Marks | None]:
        """Take ``event``'s lease for a fresh token (reading its leader's marks, with
        ``with_leader``): the token and the leader's marks (None if it waits for none).
        ``EventBeingProcessed`` if another worker holds it or it was seen (or, with ``wait``,
        see ``wait_for_holder``)."""
        token = uuid4()
        leader = event.follows if with_leader and _follows_something(event) else None
        taken = await self._take([event.id], token, () if leader is None else (leader,))
        if event.id not in taken.taken and wait:
            taken = await self._wait_for_holder(event, token, leader, stored)
        if event.id not in taken.taken:
            self._log(
                logging.INFO, event, "is already being processed", action="event_is_processing"
            )
            raise self.being_processed_error(event)
        return token, (None if leader is None else taken.of(leader))

    async def _wait_for_holder(
        self, event: EventLike, token: UUID, leader: UUID | None, stored: str | None
    ) -> Taken:
        """Wait for the worker that holds ``event``: see ``wait_for_holder``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.durations.in_flight_event_timeout.total_seconds()
        longest = self.durations.poll_interval.total_seconds()
        poll = min(0.01, longest)
        leaders = () if leader is None else (leader,)
        while True:
            marks = await self._marks(event.id)
            if marks.seen:
                self._log(
                    logging.INFO, event, "was handled by another worker", action="wait_for_holder"
                )
                raise self.arrived_early_error(event)
            if marks.processing and loop.time() >= deadline:
                break
            if marks.processing:
                await asyncio.sleep(min(poll, max(0.0, deadline - loop.time())))
                poll = min(poll * 2, longest)
            taken = await self._take([event.id], token, leaders)
            if event.id in taken.taken:
                return taken
        # Still held: wait behind the holder, stored as a follower of itself (its completion
        # forgets it; the sweep hands it back once nobody holds the event).
        await self._park([(event, stored or stored_form(event))], None, leader=event.id)
        self._log(
            logging.INFO,
            event,
            "is being processed by another worker, and waits for it",
            action="wait_for_holder",
        )
        raise self.arrived_early_error(event)

    @asynccontextmanager
    async def _holding(self, token: UUID, event_ids: list[UUID]) -> AsyncIterator[_Hold]:
        """Keep the leases of ``token`` alive while the body runs; release them if it raises.

        Without renewal, a handler slower than ``lease_timeout`` would let another worker take
        the event over while it still runs. Renewing is taking the leases again with the same
        token (the lease rule, ``_steps.TakeLeases``), so it also keeps a lease whose row was
        purged meanwhile, and it stops as soon as another worker holds the event or finished
        it. Why it is safe: the renewal is stopped (and any renewal in flight has finished)
        before the lease is ended here, by parking, by the completion that follows the body, or
        by the release after a failure, so no renewal can take back a lease its holder ended. A
        worker that dies stops renewing, so its lease expires as before.
        """

        async def renew() -> bool:
            return bool((await self._take(event_ids, token)).taken)  # none: ended or lost

        renewal = self._renewal(renew, self.durations.lease, _what_is_held(event_ids))
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
        self, renew: Callable[[], Awaitable[bool]], lifetime: timedelta, what: str
    ) -> Renewal:
        return Renewal(renew, interval=lifetime.total_seconds() / 3, what=what, scope=self.scope)

    async def _wait_for_leader(
        self, event: EventLike, hold: _Hold | None, marks: Marks | None, stored: str | None
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
        assert stored is not None  # the event follows something
        if hold is not None:
            await hold.pause()  # parking ends the lease: no renewal may follow it
        token = None if hold is None else hold.token
        if event.id not in await self._park([(event, stored)], token):
            # The leader completed while we looked: go ahead, holding the lease again (on
            # Postgres parking ended it anyway; see ``_steps.Park``).
            if token is not None and event.id not in (await self._take([event.id], token)).taken:
                if hold is not None:
                    hold.ended = True  # another worker holds it now: nothing of ours to release
                raise self.being_processed_error(event)
            if hold is not None:
                hold.resume()
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
        leaders = tuple(leader.id for leader, followers in groups if followers)
        if not leaders:
            return

        async def renew() -> bool:
            db = await self._db()
            until = self._now() + self.durations.claim_timeout
            renewal = RenewClaims(self.scope, token, leaders, until)
            return bool(await db.renew_claims(renewal, self._clock))

        first_error: Exception | None = None
        what = _what_is_held(leaders, "the claims on the followers of event")
        async with self._renewal(renew, self.durations.claim_timeout, what):
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

    def _log(self, level: int, event: EventLike, message: str, *args: Any, action: str) -> None:
        """Log ``message`` about ``event`` as ``Event <id> <message>``; subclasses may reword."""
        extra = {"action": action, "scope": self.scope, "event_id": event.id}
        logger.log(level, "Event %r " + message, event.id, *args, extra=extra)

    # -- conveniences --------------------------------------------------------------------------

    @property
    def lease_timeout(self) -> timedelta:
        return self.durations.lease
