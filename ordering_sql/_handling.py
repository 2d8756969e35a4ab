"""How ``CausalOrdering`` handles an event: the decisions behind its public methods.

Taking and renewing leases, waiting for a leader in flight or for another worker that holds
the event, parking, completing, replaying released followers, and deciding a batch: each is a
decision made here and a step asked of the Store (``store/_steps.py``), never SQL. Single events
go through the same steps as batches, as batches of one. ``engine.CausalOrdering`` is the
public API on top.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any, ClassVar, Generic, TypeVar, cast
from uuid import UUID, uuid4

from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ordering_sql import telemetry
from ordering_sql._planner import Batch, Planned, plan
from ordering_sql._renewal import Hold, Renewal, what_is_held
from ordering_sql.errors import (
    ClosedError,
    ConfigurationError,
    EventArrivedEarly,
    EventBeingProcessed,
    LeaseLostError,
    MaxDepthExceeded,
)
from ordering_sql.models import EventLike, check_event, follows_something, stored_form
from ordering_sql.settings import Durations, Settings, shortened
from ordering_sql.store import Store, acquire_store
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
    TakeLeases,
    Taken,
)

__all__ = ["EventHandler", "Handling"]

logger = logging.getLogger("ordering_sql.engine")

E = TypeVar("E", bound=BaseModel)

#: ``handler(event, depth)``: the consumer's own handling of one event, which calls
#: ``preceding_event_confirmed(handler, event, depth)`` around its work.
EventHandler = Callable[[Any, int], Awaitable[None]]


class Handling(Generic[E]):
    """The decisions of ``CausalOrdering`` (its base class), on the state it sets up."""

    arrived_early_error: ClassVar[type[EventArrivedEarly]] = EventArrivedEarly
    being_processed_error: ClassVar[type[EventBeingProcessed]] = EventBeingProcessed
    max_depth_error: ClassVar[type[MaxDepthExceeded]] = MaxDepthExceeded
    wait_for_holder: ClassVar[bool] = False

    scope: str
    durations: Durations
    event_type: type[E]
    _clock: Callable[[], datetime] | None
    _migrate_on_first_use: bool | None
    _engine: AsyncEngine | None
    _settings: Settings | None
    _store: Store | None
    _store_loop: weakref.ReferenceType[asyncio.AbstractEventLoop] | None
    _shared_stores: list[tuple[weakref.ReferenceType[Any], Store]]
    _closed: bool

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

    async def _marks(self, event_id: UUID) -> Marks:
        db = await self._db()
        marks = await db.marks(ReadMarks(self.scope, (event_id,), self._now()), self._clock)
        return marks.get(event_id, Marks(seen=False, processing=False))

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
            return event.follows if follows_something(event) and young else None

        planned = [Planned(i, waits_for(cast("EventLike", e))) for i, e in events.items()]
        leaders = {p.waits_for for p in planned if p.waits_for is not None}
        taken = await self._take(list(events), token, leaders - events.keys())
        for event_id, event in events.items():
            if event_id not in taken.taken:
                was_seen = taken.of(event_id).seen
                (batch.skipped if was_seen else batch.busy).append(event)
                telemetry.count("duplicates" if was_seen else "busy", self.scope)
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
                telemetry.count("parked", self.scope)
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
                telemetry.count("busy", self.scope)

    # -- the steps, as this instance asks for them ---------------------------------------------

    async def _take(
        self, event_ids: Sequence[UUID], token: UUID, leaders: Iterable[UUID] = ()
    ) -> Taken:
        """Take (or renew) the leases of ``event_ids`` for ``token``; read ``leaders``' marks."""
        db = await self._db()
        return await db.take(self._take_request(event_ids, token, leaders), self._clock)

    def _take_request(
        self, event_ids: Sequence[UUID], token: UUID, leaders: Iterable[UUID] = ()
    ) -> TakeLeases:
        now = self._now()
        return TakeLeases(
            self.scope, token, tuple(event_ids), now, now + self.durations.lease, tuple(leaders)
        )

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

    def _completion(self, event_ids: Sequence[UUID], token: UUID, *, claim: bool) -> Complete:
        now = self._now()
        return Complete(
            self.scope,
            token,
            tuple(event_ids),
            now,
            now + self.durations.seen,
            now + self.durations.claim_timeout,
            claim,
        )

    async def _complete(self, event_ids: Sequence[UUID], token: UUID, *, claim: bool) -> Completed:
        """Mark ``event_ids`` seen, end ``token``'s leases, claim their followers (``claim``)."""
        db = await self._db()
        completed = await db.complete(self._completion(event_ids, token, claim=claim), self._clock)
        telemetry.count("handled", self.scope, len(completed.done))
        await self._purge_if_due()
        return completed

    async def _purge_if_due(self) -> None:
        db = await self._db()
        await db.purge_if_due(self._now())

    async def _complete_one(self, event: EventLike, token: UUID, *, claim: bool) -> list[E]:
        """``_complete`` of one event; its claimed followers. ``LeaseLostError`` if another
        worker holds the event now or has finished it: then nothing was recorded."""
        completed = await self._complete([event.id], token, claim=claim)
        if event.id not in completed.done:
            raise self._lease_lost(event.id)
        return self._load(completed.claimed)

    def _lease_lost(self, event_id: UUID) -> LeaseLostError:
        telemetry.leases_lost(self.scope)
        msg = (
            f"The processing lease of event {event_id} in scope {self.scope!r} was taken "
            f"over by another worker after it expired ({self.durations.lease}); this "
            "worker's result was not recorded."
        )
        return LeaseLostError(msg, scope=self.scope, event_id=event_id)

    # -- exactly once: the caller's effects and the completion in one transaction ----------------

    @asynccontextmanager
    async def _effects_transaction(self, hold: Hold) -> AsyncIterator[AsyncConnection]:
        """The transaction an ``exactly_once`` block writes its effects in (``Store.transaction``).

        On Postgres the leases are renewed while the block runs, as for any handler.

        On SQLite the transaction holds the file's one write lock from its BEGIN IMMEDIATE to
        its end. A renewal on another connection would wait for that lock, and stopping the
        renewal waits for a renewal in flight: stopped after BEGIN, the two would wait for
        each other until the busy timeout. So the renewal is stopped before BEGIN, and the
        leases are taken again inside the transaction, as its first step: if another worker
        took one over while BEGIN waited for the lock, ``LeaseLostError`` before the block
        runs; else nobody can take them over until the commit (nobody else can write), and
        the completion finds them its own, expired or not (``_steps.Complete``).
        """
        db = await self._db()
        if not db.dialect.single_writer:
            async with db.transaction() as conn:
                yield conn
            return
        await hold.pause()
        async with db.transaction() as conn:
            taken = await db.joined(conn).take(self._take_request(hold.event_ids, hold.token))
            lost = [event_id for event_id in hold.event_ids if event_id not in taken.taken]
            if lost:  # the release that follows ends only those still ours
                raise self._lease_lost(lost[0])
            yield conn

    async def _complete_joined(
        self, conn: AsyncConnection, hold: Hold, event_ids: Sequence[UUID]
    ) -> Completed:
        """``_complete`` (claiming) inside the caller's transaction on ``conn``. The renewal is
        stopped first: the completion ends the leases, and no renewal may follow that
        (``_holding``). If the transaction then rolls back, ``_holding`` releases them."""
        await hold.pause()
        db = await self._db()
        return await db.joined(conn).complete(self._completion(event_ids, hold.token, claim=True))

    async def _after_joined_commit(
        self,
        handler: EventHandler,
        token: UUID,
        groups: Sequence[tuple[EventLike, list[E]]],
        depth: int,
        handled: int,
    ) -> None:
        """What follows a joined completion once its transaction committed (``_complete`` does
        the same for its own): count the events handled, purge if due, replay the followers."""
        telemetry.count("handled", self.scope, handled)
        await self._purge_if_due()
        await self._replay(handler, token, groups, depth)

    def _admit(self, event: EventLike, depth: int, *, action: str) -> str | None:
        """The checks before a lease is taken: the event's ``stored_form`` if it follows
        something (an event that cannot wait for its leader is refused whether or not it
        would have to, so its message is never acknowledged half-handled), and its depth."""
        check_event(event)
        stored = stored_form(event) if follows_something(event) else None
        max_depth = self.durations.max_depth_of_preceding_event
        if depth > max_depth:
            self._log(
                logging.ERROR,
                event,
                "has exceeded the maximum recursion depth %s",
                max_depth,
                action=action,
            )
            raise self.max_depth_error(event)
        return stored

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
                what_is_held(event_ids),
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
        leader = event.follows if with_leader and follows_something(event) else None
        taken = await self._take([event.id], token, () if leader is None else (leader,))
        if event.id not in taken.taken and wait:
            taken = await self._wait_for_holder(event, token, leader, stored)
        if event.id not in taken.taken:
            self._log(
                logging.INFO, event, "is already being processed", action="event_is_processing"
            )
            seen = taken.of(event.id).seen
            telemetry.count("duplicates" if seen else "busy", self.scope)
            raise self.being_processed_error(event, seen=seen)
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
        telemetry.count("parked", self.scope)
        self._log(
            logging.INFO,
            event,
            "is being processed by another worker, and waits for it",
            action="wait_for_holder",
        )
        raise self.arrived_early_error(event)

    @asynccontextmanager
    async def _holding(self, token: UUID, event_ids: list[UUID]) -> AsyncIterator[Hold]:
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

        renewal = self._renewal(renew, self.durations.lease, what_is_held(event_ids))
        hold = Hold(token, event_ids, renewal)
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
        self, event: EventLike, hold: Hold | None, marks: Marks | None, stored: str | None
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
            retaken = None if token is None else await self._take([event.id], token)
            if retaken is not None and event.id not in retaken.taken:
                if hold is not None:
                    hold.ended = True  # another worker holds it now: nothing of ours to release
                raise self.being_processed_error(event, seen=retaken.of(event.id).seen)
            if hold is not None:
                hold.resume()
            return
        if hold is not None:
            hold.ended = True
        telemetry.count("parked", self.scope)
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
        what = what_is_held(leaders, "the claims on the followers of event")
        async with self._renewal(renew, self.durations.claim_timeout, what):
            for leader, followers in groups:
                for follower in followers:
                    telemetry.count("replayed", self.scope)
                    received = cast("EventLike", follower).received
                    telemetry.waited(self.scope, (self._now() - received).total_seconds())
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
