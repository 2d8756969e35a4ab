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

This module is the public API; the decisions behind it (what to take, when to wait, park,
complete, replay) are in ``_handling.py``. The statements are the backends'
(``store/postgres.py``, ``store/sqlite.py``), reached through the Store's typed steps; single
events go through the same steps as batches, as batches of one.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any, ClassVar, TypeVar, cast
from uuid import UUID, uuid4

from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ordering_sql import telemetry
from ordering_sql._handling import EventHandler, Handling
from ordering_sql._planner import Batch
from ordering_sql._renewal import Hold
from ordering_sql.errors import (
    ConfigurationError,
    EventArrivedEarly,
    EventBeingProcessed,
    LeaseLostError,
    MaxDepthExceeded,
)
from ordering_sql.models import (
    EventLike,
    HasId,
    ReceivedEvent,
    check_event,
    follows_something,
    stored_form,
)
from ordering_sql.settings import Durations, Settings, mask_url, shortened, validate_scope
from ordering_sql.store import Store, release_store
from ordering_sql.store._steps import Completed, Release, Sweep

__all__ = ["Batch", "CausalOrdering", "EventHandler"]

logger = logging.getLogger(__name__)

E = TypeVar("E", bound=BaseModel)


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


class CausalOrdering(Handling[E]):
    """Durable causal ordering of events for one ``scope``.

    Building an instance does no I/O. Instances on the same database URL share one engine and
    connection pool per event loop; ``close()`` gives this instance's share back.

    ``migrate_on_first_use``: migrate the schema at the first call if it is missing or old
    (None, the default: only an embedded SQLite database is; see ``Store.ensure_ready``).

    Errors every method that reaches the database may raise, besides those it names itself:
    ``ClosedError`` after ``close()``; ``SchemaNotReadyError`` if the ordering tables are
    missing or older than this code (run ``ordering-sql migrate``); ``DatabaseUnavailableError``
    if the database cannot be reached; ``StoreError`` if it failed otherwise. Transient
    failures (a lost connection, a deadlock, a busy SQLite file) are retried before any of
    these is raised; each step is safe to retry, so a retry never takes, parks or completes
    anything twice. Event arguments that cannot be ordered (no id, a naive datetime) raise
    ``ConfigurationError``.
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

    # -- processing marks ----------------------------------------------------------------------

    async def record_event_as_processing(self, event: EventLike) -> bool:
        """Take ``event``'s processing lease for this instance.

        Returns True if taken, False if another holder has a live lease or the event was seen.
        The lease is not renewed: end it with ``forget_event_is_processing``.
        """
        event_id = _event_id(event)
        token = uuid4()
        if event_id not in (await self._take([event_id], token)).taken:
            return False
        self._leases[event_id] = token
        return True

    async def event_has_started_processing(self, event: UUID | str | HasId) -> bool:
        """Returns whether a handler holds ``event``'s processing lease right now."""
        return (await self._marks(_event_id(event))).processing

    async def forget_event_is_processing(self, event: EventLike) -> None:
        """End ``event``'s processing lease: the one this instance took, or else whoever's it is.

        Returns None; an event without a lease is left as it is.
        """
        event_id = _event_id(event)
        db = await self._db()
        token = self._leases.pop(event_id, None)
        await db.release(Release(self.scope, token, (event_id,), self._now()), self._clock)

    # -- seen marks ----------------------------------------------------------------------------

    async def event_has_been_seen(self, event: UUID | str | HasId) -> bool:
        """Returns whether ``event`` was handled within ``seen_expiration``."""
        return (await self._marks(_event_id(event))).seen

    async def record_event_as_seen(self, event: EventLike) -> None:
        """Mark ``event`` handled for ``seen_expiration``, leaving any lease as it is."""
        event_id = _event_id(event)
        db = await self._db()
        await db.mark_seen(self.scope, [event_id], self._now() + self.durations.seen)

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
        """Forget that ``follower`` waits for its leader; an unknown follower is ignored."""
        db = await self._db()
        await db.forget_followers(self.scope, [_event_id(follower)])

    async def get_followers(self, leader: UUID | str | HasId) -> list[E]:
        """Returns the stored events waiting for ``leader``, in ``occurred`` order (as
        ``event_type``), without claiming or removing them."""
        db = await self._db()
        found = await db.followers_of(self.scope, _event_id(leader))
        return [self.event_type.model_validate_json(event) for event in found]

    async def followers_by_id(self, follower_ids: Sequence[UUID | str]) -> list[E]:
        """Returns the stored followers with these ids, in ``occurred`` order (as
        ``event_type``); unknown ids are skipped."""
        ids = [_event_id(i) for i in follower_ids]
        if not ids:
            return []
        db = await self._db()
        found = await db.followers_by_id(self.scope, ids)
        return [self.event_type.model_validate_json(event) for event in found]

    async def get_lost_followers(self) -> list[E]:
        """Returns the followers whose leader never came, in ``occurred`` order (as
        ``event_type``), each claimed for ``claim_timeout``.

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
        lost = self._load(await db.sweep(sweep, self._clock))
        telemetry.lost_followers(self.scope, len(lost))
        return lost

    # -- clearing ------------------------------------------------------------------------------

    async def clear(self) -> None:
        """Forget every mark and parked follower of this scope (other scopes are untouched)."""
        await (await self._db()).clear(self.scope)
        self._leases.clear()

    async def clear_all_scopes(self) -> None:
        """Forget every mark and parked follower of every scope in this instance's database."""
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
        """Return when ``event`` may be handled; else park it and raise ``EventArrivedEarly``.

        It may be handled if it follows nothing, if its leader was handled, or if it is older
        than ``preceding_event_lookback``. Parked, it is stored durably before the error is
        raised, so its message may be acknowledged. ``ConfigurationError`` if it cannot be
        stored.
        """
        check_event(event)
        token = self._leases.get(event.id)
        hold = None if token is None else Hold(token, [event.id])
        stored = stored_form(event) if follows_something(event) else None
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
        with telemetry.handling(self.scope, event.id, event.follows, "preceding_event_confirmed"):
            stored = self._admit(event, depth, action="preceding_event_confirmed")
            token, leader = await self._take_or_raise(event, stored, wait=self.wait_for_holder)
            async with self._holding(token, [event.id]) as hold:
                await self._wait_for_leader(event, hold, leader, stored)
                yield
            followers = await self._complete_one(event, token, claim=True)
            await self._replay(handler, token, [(event, followers)], depth)

    @asynccontextmanager
    async def exactly_once(
        self, handler: EventHandler, event: EventLike, depth: int = 0
    ) -> AsyncIterator[AsyncConnection]:
        """``preceding_event_confirmed`` whose body writes its effects in the completion's
        transaction: effects and completion commit together or not at all.

        ::

            async with ordering.exactly_once(handler, event, depth) as conn:
                await conn.execute(orders.insert().values(...))

        Yields an ``AsyncConnection`` to the ordering's database inside an open transaction
        (write on it, or through an ``AsyncSession(bind=conn)``; do not commit it). When the
        block ends, the event is marked seen, its lease ended and its followers claimed on
        that connection, and the transaction commits; the released followers are then
        replayed through ``handler(follower, depth + 1)``, which may use ``exactly_once``
        too. The block runs at most once per event, as far as anything it writes there is
        concerned.

        Before the block: ``EventBeingProcessed`` if the event was already handled (its
        effects are committed: acknowledge the message) or another worker holds it;
        ``EventArrivedEarly``, ``MaxDepthExceeded`` and ``ConfigurationError`` as
        ``preceding_event_confirmed``. If the block raises, the transaction rolls back, the
        lease is released and the error propagates. ``LeaseLostError`` if another worker took
        the event over meanwhile: the transaction rolls back, the effects with it. A database
        error of the block or of its commit propagates as raised (SQLAlchemy's): whether the
        commit happened is then unknown, and a redelivery finds out (``EventBeingProcessed``
        if it did, or a handling once the lease expired if it did not).

        The transaction lasts as long as the block. On SQLite it holds the one write lock of
        the file: every other writer (other workers, other processes) waits for it, so keep
        the block short. On Postgres it holds the locks of the rows it writes, and the
        connection, until the block ends; it runs at READ COMMITTED.
        """
        with telemetry.handling(self.scope, event.id, event.follows, "exactly_once"):
            stored = self._admit(event, depth, action="exactly_once")
            token, leader = await self._take_or_raise(event, stored, wait=self.wait_for_holder)
            async with self._holding(token, [event.id]) as hold:
                await self._wait_for_leader(event, hold, leader, stored)
                async with self._effects_transaction(hold) as conn:
                    yield conn
                    completed = await self._complete_joined(conn, hold, [event.id])
                    if event.id not in completed.done:
                        raise self._lease_lost(event.id)  # rolls the effects back
            released = [(event, self._load(completed.claimed))]
            await self._after_joined_commit(handler, token, released, depth, handled=1)

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
        batch, token = await self._decide(events)
        ids = [cast("EventLike", event).id for event in batch.ready]
        if not ids:
            yield batch
            return
        async with self._holding(token, ids):
            yield batch
        completed = await self._complete(ids, token, claim=True)
        await self._replay(handler, token, self._released(batch, completed), 0)
        lost = [event_id for event_id in ids if event_id not in completed.done]
        if lost:
            raise self._batch_lost(lost, "their results were not recorded")

    @asynccontextmanager
    async def exactly_once_batch(
        self, handler: EventHandler, events: Iterable[E]
    ) -> AsyncIterator[tuple[Batch[E], AsyncConnection]]:
        """The batch form of ``exactly_once``: the block's effects and the whole batch's
        completion in one transaction.

        ::

            async with ordering.exactly_once_batch(handler, events) as (batch, conn):
                for event in batch:  # batch.ready, leaders before their followers
                    await conn.execute(orders.insert().values(...))
            # acknowledge every message of the batch but batch.busy

        The batch is decided as by ``preceding_events_confirmed`` (``batch.skipped``: already
        handled, with their effects committed; ``batch.parked``; ``batch.busy``: held by
        another worker, redeliver them). The connection is in an open transaction, as in
        ``exactly_once`` (and with its costs); when the block ends, every ready event is
        marked seen on it and the transaction commits, then the followers released are
        replayed through ``handler(follower, 1)``. If the block raises, or if any lease of the
        batch was taken over meanwhile (``LeaseLostError``), the whole transaction rolls back
        and the leases still held are released: redeliver the batch, nothing of it was
        recorded. A batch with nothing ready still gets a (short, empty) transaction.
        """
        batch, token = await self._decide(events)
        ids = [cast("EventLike", event).id for event in batch.ready]
        if not ids:
            async with (await self._db()).transaction() as conn:
                yield batch, conn
            return
        async with (
            self._holding(token, ids) as hold,
            self._effects_transaction(hold) as conn,
        ):
            yield batch, conn
            completed = await self._complete_joined(conn, hold, ids)
            lost = [event_id for event_id in ids if event_id not in completed.done]
            if lost:  # the effects of the batch cannot be told apart: none commits
                raise self._batch_lost(lost, "nothing of this batch was recorded")
        released = self._released(batch, completed)
        await self._after_joined_commit(handler, token, released, 0, handled=len(ids))

    async def _decide(self, events: Iterable[E]) -> tuple[Batch[E], UUID]:
        """Check a batch's events (before anything is taken: an event that cannot be stored is
        refused whether or not it waits), take their leases and decide them (``_decide_batch``)."""
        unique: dict[UUID, E] = {}
        skipped: list[E] = []
        stored: dict[UUID, str] = {}
        for event in events:
            event_id = check_event(event).id
            if event_id in unique:
                skipped.append(event)
                continue
            unique[event_id] = event
            if follows_something(cast("EventLike", event)):
                stored[event_id] = stored_form(cast("EventLike", event))
        batch = Batch[E](ready=[], parked=[], skipped=skipped, busy=[])
        token = uuid4()
        if unique:
            await self._decide_batch(batch, unique, stored, token)
        return batch, token

    def _released(self, batch: Batch[E], completed: Completed) -> list[tuple[EventLike, list[E]]]:
        """The followers a batch's completion claimed, by leader; added to ``batch.replayed``."""
        groups = [
            (leader, self._load(c for c in completed.claimed if c.leader_id == leader.id))
            for leader in (cast("EventLike", event) for event in batch.ready)
        ]
        for _, followers in groups:
            batch.replayed += followers
        return groups

    def _batch_lost(self, lost: list[UUID], outcome: str) -> LeaseLostError:
        telemetry.leases_lost(self.scope, len(lost))
        msg = (
            f"The processing leases of {len(lost)} events of this batch in scope "
            f"{self.scope!r} were taken over by another worker after they expired "
            f"({self.durations.lease}); {outcome}."
        )
        return LeaseLostError(msg, scope=self.scope, event_id=lost[0])

    # -- conveniences --------------------------------------------------------------------------

    @property
    def lease_timeout(self) -> timedelta:
        """How long a processing lease lasts unless renewed (``durations.lease``)."""
        return self.durations.lease

    @asynccontextmanager
    async def observe_statements(self, listener: Callable[[str], None]) -> AsyncIterator[None]:
        """Call ``listener`` with the SQL text of every statement sent while the block runs.

        Every path counts: SQLAlchemy's, asyncpg's own and SQLite's thread connections,
        ``BEGIN`` and ``COMMIT`` included; a statement merged for several callers is seen once.
        The engine is shared, so statements of other instances on the same database URL and
        event loop are seen too. Connects first, so it raises what ``check()`` raises. For
        counting round trips and for instrumentation; ``listener`` must not block.
        """
        db = await self._db()
        with db.observe(listener):
            yield
