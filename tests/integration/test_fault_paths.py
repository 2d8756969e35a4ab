"""Fault paths: stalls, takeovers, deaths mid-replay, sweeps, lock order, and shared connections.

Each test forces one fault (a worker that stalls past its lease, a handler that fails after a
takeover, a worker that dies while it replays followers, a sweep whose caller dies, a follower
that parks while a batch takes its rows, ...) and checks what the guarantees of the README say
must still hold: nothing handled twice, nothing lost, every ``follows`` edge in order, and no
worker refused for a lease nobody else took.

Most tests run on every backend with the test clock (``clock``), which only the test moves; the
lease and claim renewers run on real time, so a jump of the test clock is a stall they do not
see. Tests that need the renewers to run use ``clock=None`` (the database's clock) and real
sleeps.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID, uuid4

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from ordering_sql import (
    Batch,
    CausalOrdering,
    EventArrivedEarly,
    EventBeingProcessed,
    LeaseLostError,
    ReceivedEvent,
    dispose_engines,
)
from ordering_sql.tools.simulation import DeliveryQueue, HandledLog, build_stream, check, run_worker
from tests.conftest import OrderingFactory
from tests.support import Clock, make_event

T = TypeVar("T")

#: A bound on every wait here; nothing in this file should come near it.
TEST_TIMEOUT_S = 60.0
#: Past the preceding-event lookback (15 min) and every claim timeout used here.
LATER = timedelta(minutes=20)

SQLITE_ONLY = pytest.mark.parametrize("backend", [pytest.param("sqlite", marks=pytest.mark.sqlite)])

Hook = Callable[[], Awaitable[None]]


async def bounded(awaitable: Awaitable[T], seconds: float = TEST_TIMEOUT_S) -> T:
    return await asyncio.wait_for(awaitable, timeout=seconds)


class WorkerDied(BaseException):
    """Stands for the process dying in the middle of a handler (not an ``Exception``: the
    engine's own ``except Exception`` clauses must not swallow it)."""


class Recorder:
    """The usual recursive handler.

    ``calls`` is every call of the handler (replays included), ``handled`` every body that ran
    to its end, both in order. ``hooks`` run inside the body of the event with that id, before
    the body is recorded; a hook that raises makes the body fail.
    """

    def __init__(
        self,
        ordering: CausalOrdering[Any],
        hooks: dict[UUID, Hook] | None = None,
        handled: list[UUID] | None = None,
    ) -> None:
        self.ordering = ordering
        self.hooks = hooks or {}
        self.calls: list[UUID] = []
        #: May be shared by several recorders: then it is the order in which all bodies ran.
        self.handled: list[UUID] = [] if handled is None else handled

    async def handler(self, event: ReceivedEvent, depth: int = 0) -> None:
        self.calls.append(event.id)
        async with self.ordering.preceding_event_confirmed(self.handler, event, depth):
            hook = self.hooks.get(event.id)
            if hook is not None:
                await hook()
            self.handled.append(event.id)

    async def park(self, event: ReceivedEvent) -> None:
        """Deliver ``event``, which must park (its leader has not been handled)."""
        with pytest.raises(EventArrivedEarly):
            await self.handler(event)


def ids(events: Sequence[ReceivedEvent]) -> list[UUID]:
    return [e.id for e in events]


def followers_of(leader: ReceivedEvent, clock: Clock, count: int) -> list[ReceivedEvent]:
    """``count`` followers of ``leader`` received now, occurring one second apart, in order."""
    return [
        make_event(
            follows=leader,
            occurred=clock.now + timedelta(seconds=i + 1),
            received=clock.now,
            name=f"follower.{i}",
        )
        for i in range(count)
    ]


# -- 1. a stalled holder nobody took over ---------------------------------------------------------


@pytest.mark.parametrize("meanwhile", ["purged", "purged and a follower parked"])
async def test_a_stalled_holder_whose_lease_nobody_took_completes_and_replays(
    make_ordering: OrderingFactory, clock: Clock, meanwhile: str
) -> None:
    """No phantom takeover: worker A stalls past its lease inside the body of leader L; another
    process's purge deletes A's expired lease row and (in one variant) a follower F of L then
    parks at worker B, which re-creates L's row as an owner-less placeholder flagged as having
    followers. Nobody took L over, so A's completion must go through (no ``LeaseLostError``):
    L is seen, and A replays F in the same call, right after L."""
    a, b, other = make_ordering(), make_ordering(), make_ordering()
    leader = make_event(received=clock.now, name="leader")
    [follower] = followers_of(leader, clock, 1)
    parks = meanwhile != "purged"
    follower_side = Recorder(b)

    async def stall_purge_and_park() -> None:
        clock.advance(a.lease_timeout + timedelta(seconds=1))  # the renewer has not run
        db = await other._db()
        assert await db.purge_expired(clock.now, limit=1000) == 1, "A's expired lease row"
        assert not await other.event_has_started_processing(leader)
        if parks:
            await follower_side.park(follower)
            assert await other.get_followers(leader) == [follower]

    leader_side = Recorder(a, hooks={leader.id: stall_purge_and_park})
    await bounded(leader_side.handler(leader))

    assert leader_side.handled == ([leader.id, follower.id] if parks else [leader.id])
    assert follower_side.handled == []
    assert await other.event_has_been_seen(leader)
    assert not await other.event_has_started_processing(leader)
    assert not await other.record_event_as_processing(leader), "seen: nobody may take it again"
    if parks:
        assert await other.event_has_been_seen(follower)
        assert await other.get_followers(leader) == []
    clock.advance(LATER)
    assert await other.get_lost_followers() == []


@pytest.mark.parametrize("rival", ["holds it", "completed it"])
async def test_a_stalled_holder_whose_lease_was_taken_over_records_nothing(
    make_ordering: OrderingFactory, clock: Clock, rival: str
) -> None:
    """The counter-case: once another worker C really took L's expired lease (and, in one
    variant, completed L too) before A's body ended, A's completion raises ``LeaseLostError``
    and records nothing: it neither ends C's lease nor replays L's parked follower."""
    a, c, other = make_ordering(), make_ordering(), make_ordering()
    leader = make_event(received=clock.now, name="leader")
    [follower] = followers_of(leader, clock, 1)
    await Recorder(other).park(follower)

    async def stall_and_lose_the_lease() -> None:
        clock.advance(a.lease_timeout + timedelta(seconds=1))
        if rival == "holds it":
            assert await c.record_event_as_processing(leader), "an expired lease is taken over"
        else:
            async with c.event_is_processing(leader):
                pass

    leader_side = Recorder(a, hooks={leader.id: stall_and_lose_the_lease})
    with pytest.raises(LeaseLostError) as lost:
        await bounded(leader_side.handler(leader))

    assert lost.value.event_id == leader.id
    assert leader_side.calls == [leader.id], "no follower replayed by a worker that lost"
    assert await other.get_followers(leader) == [follower], "the follower still waits"
    if rival == "holds it":
        assert not await other.event_has_been_seen(leader), "A's result was not recorded"
        assert await other.event_has_started_processing(leader), "C's lease is intact"
        assert not await other.record_event_as_processing(leader)
    else:
        assert await other.event_has_been_seen(leader)
        assert not await other.event_has_started_processing(leader)


# -- 2. a failure after a takeover ----------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["event_is_processing", "preceding_event_confirmed", "preceding_events_confirmed"]
)
async def test_a_handler_failing_after_a_takeover_leaves_the_new_lease_alone(
    make_ordering: OrderingFactory, clock: Clock, path: str
) -> None:
    """A holder whose lease expired and was taken over by B, and whose body then raises, must
    not end B's lease when it releases after the failure: its error propagates, and a third
    worker C is still refused while B holds the event."""
    a, b, c = make_ordering(), make_ordering(), make_ordering()
    event = make_event(received=clock.now, name="taken-over")

    async def stall_be_taken_over_and_fail() -> None:
        clock.advance(a.lease_timeout + timedelta(seconds=1))
        assert await b.record_event_as_processing(event), "an expired lease is taken over"
        msg = "the handler failed after its lease was taken over"
        raise RuntimeError(msg)

    async def handle() -> None:
        if path == "event_is_processing":
            async with a.event_is_processing(event):
                await stall_be_taken_over_and_fail()
        elif path == "preceding_event_confirmed":
            await Recorder(a, hooks={event.id: stall_be_taken_over_and_fail}).handler(event)
        else:
            async with a.preceding_events_confirmed(Recorder(a).handler, [event]) as batch:
                assert batch.ready == [event]
                await stall_be_taken_over_and_fail()

    with pytest.raises(RuntimeError, match="after its lease was taken over"):
        await bounded(handle())

    assert not await c.record_event_as_processing(event), "B still holds the event"
    assert await c.event_has_started_processing(event)
    assert not await c.event_has_been_seen(event)
    await b.forget_event_is_processing(event)  # B's own token still ends B's lease
    assert not await c.event_has_started_processing(event)


# -- 3. claims while followers are replayed -------------------------------------------------------


async def test_a_replayed_followers_claim_is_renewed_while_the_replay_runs(
    make_ordering: OrderingFactory,
) -> None:
    """Claim renewal, in real time: the claim on L's followers F1 and F2 lasts 0.6 s, and F1's
    handler takes 1.5 s. Sweeps by another instance meanwhile, well past the claim timeout,
    never hand out F1 (being handled) nor F2 (waiting its turn); afterwards both are handled
    once, in order, and nothing is left stored."""
    worker = make_ordering(clock=None, claim_timeout=0.6)
    sweeper = make_ordering(clock=None, claim_timeout=0.6)
    now = datetime.now(UTC)
    leader = make_event(received=now, occurred=now, name="leader")
    first, second = (
        make_event(follows=leader, occurred=now + timedelta(seconds=i), received=now, name=f"f{i}")
        for i in (1, 2)
    )
    for follower in (second, first):
        await Recorder(worker).park(follower)

    first_started = asyncio.Event()

    async def slow() -> None:
        first_started.set()
        await asyncio.sleep(1.5)  # well past the 0.6 s claim

    recorder = Recorder(worker, hooks={first.id: slow})
    replay = asyncio.create_task(recorder.handler(leader))
    sweeps: list[list[ReceivedEvent]] = []
    try:
        await bounded(first_started.wait())
        for _ in range(5):  # at 0.25 s .. 1.25 s into F1's handler
            await asyncio.sleep(0.25)
            sweeps.append(await sweeper.get_lost_followers())
        await bounded(replay)
    finally:
        if not replay.done():
            replay.cancel()

    assert sweeps == [[]] * 5, "a sweep handed out a follower that was being replayed"
    assert recorder.handled == [leader.id, first.id, second.id]
    for event in (leader, first, second):
        assert await sweeper.event_has_been_seen(event)
    assert await sweeper.followers_by_id([first.id, second.id]) == []
    assert await sweeper.get_followers(leader) == []


async def test_a_follower_past_the_lookback_claimed_by_a_live_replay_waits_for_the_claim(
    make_ordering: OrderingFactory, clock: Clock
) -> None:
    """A follower that a live replay has claimed is not "lost" when it passes the lookback: the
    sweep leaves it to the replay until the claim expires, and only then hands it out (once)."""
    worker = make_ordering(preceding_event_lookback=10, claim_timeout=60)
    sweeper = make_ordering(preceding_event_lookback=10, claim_timeout=60)
    leader = make_event(received=clock.now, name="leader")
    (follower,) = followers_of(leader, clock, 1)
    await Recorder(worker).park(follower)
    sweeps: list[list[ReceivedEvent]] = []

    async def stall() -> None:  # inside the follower's replay, its claim live
        clock.advance(timedelta(seconds=11))  # the follower is now past the 10 s lookback
        sweeps.append(await sweeper.get_lost_followers())
        clock.advance(timedelta(seconds=60))  # and its claim (60 s, not renewed: real time)
        sweeps.append(await sweeper.get_lost_followers())

    recorder = Recorder(worker, hooks={follower.id: stall})
    await bounded(recorder.handler(leader))

    assert sweeps[0] == [], "the sweep took a follower a live replay had claimed"
    assert ids(sweeps[1]) == [follower.id], "an expired claim hands the follower out"
    assert recorder.handled == [leader.id, follower.id]


async def test_followers_of_a_replay_whose_worker_died_come_back_once_the_claim_expires(
    make_ordering: OrderingFactory, clock: Clock
) -> None:
    """The replaying worker dies in F1's handler (F2 still waiting its turn) and is abandoned:
    its claims live on until ``claim_timeout`` after the leader's completion, then a fresh
    instance's sweep returns both followers, and once handled nothing is left or lost."""
    crashed = make_ordering()
    leader = make_event(received=clock.now, name="leader")
    first, second = followers_of(leader, clock, 2)
    for follower in (second, first):
        await Recorder(crashed).park(follower)

    async def die() -> None:
        raise WorkerDied

    dying = Recorder(crashed, hooks={first.id: die})
    with pytest.raises(WorkerDied):
        await bounded(dying.handler(leader))
    assert dying.handled == [leader.id]
    await dispose_engines()  # no close(): the worker is simply gone

    survivor = make_ordering()
    assert await survivor.event_has_been_seen(leader)
    assert not await survivor.event_has_been_seen(first)
    assert await survivor.get_followers(leader) == [first, second], "claimed, not deleted"
    clock.advance(survivor.durations.claim_timeout - timedelta(seconds=1))
    assert await survivor.get_lost_followers() == [], "the dead worker's claims still live"
    clock.advance(timedelta(seconds=1))
    lost = await survivor.get_lost_followers()
    assert lost == [first, second]

    recorder = Recorder(survivor)
    for follower in lost:
        await bounded(recorder.handler(follower))
    assert recorder.handled == [first.id, second.id]
    assert await survivor.get_followers(leader) == []
    clock.advance(LATER)
    assert await survivor.get_lost_followers() == []


# -- 4. the sweep hands over at least once --------------------------------------------------------


async def test_the_sweep_hands_its_followers_out_again_when_its_caller_died(
    make_ordering: OrderingFactory, clock: Clock
) -> None:
    """Followers of a leader that never comes are returned by a sweep past the lookback and
    claimed: a second sweep right away returns nothing. The caller dies without handling them;
    once the sweep's claim expires a new sweep returns them again, and once handled they are
    gone for good."""
    parker = make_ordering()
    missing = make_event(name="never-comes")
    first, second = followers_of(missing, clock, 2)
    for follower in (second, first):
        await Recorder(parker).park(follower)

    clock.advance(parker.durations.preceding_event_lookback)
    doomed = make_ordering()
    assert await doomed.get_lost_followers() == [first, second]
    assert await doomed.get_lost_followers() == [], "claimed by the first sweep"
    await dispose_engines()  # the caller dies without handling them

    sweeper = make_ordering()
    claim_timeout = sweeper.durations.claim_timeout
    clock.advance(claim_timeout - timedelta(seconds=1))
    assert await sweeper.get_lost_followers() == [], "the dead sweep's claim still lives"
    clock.advance(timedelta(seconds=1))
    lost = await sweeper.get_lost_followers()
    assert lost == [first, second], "handed out again once the claim expired"

    recorder = Recorder(sweeper)
    for follower in lost:
        await bounded(recorder.handler(follower))  # older than the lookback: it goes through
    assert recorder.handled == [first.id, second.id]
    clock.advance(claim_timeout)
    assert await sweeper.get_lost_followers() == []
    assert await sweeper.followers_by_id([first.id, second.id]) == []
    assert await sweeper.get_followers(missing) == []


async def test_a_swept_follower_handled_some_other_way_is_not_handed_out_again(
    make_ordering: OrderingFactory, clock: Clock
) -> None:
    """A follower the sweep handed out, whose own event was then marked seen by
    ``record_event_as_seen``, is dropped (its row deleted) when the sweep's claim expires;
    its unhandled sibling is handed out again."""
    ordering = make_ordering()
    missing = make_event(name="never-comes")
    handled_elsewhere, sibling = followers_of(missing, clock, 2)
    for follower in (handled_elsewhere, sibling):
        await ordering.record_follower(follower)

    clock.advance(ordering.durations.preceding_event_lookback)
    assert await ordering.get_lost_followers() == [handled_elsewhere, sibling]
    await ordering.record_event_as_seen(handled_elsewhere)
    clock.advance(ordering.durations.claim_timeout)

    assert await ordering.get_lost_followers() == [sibling]
    assert await ordering.followers_by_id([handled_elsewhere.id]) == [], "its row is gone"
    clock.advance(ordering.durations.claim_timeout)
    assert await ordering.get_lost_followers() == [sibling], "only the sibling, again"


# -- 5. an event that follows itself --------------------------------------------------------------


async def test_an_event_stored_as_its_own_follower_is_handled_once_and_never_lost(
    ordering: CausalOrdering[Any], clock: Clock
) -> None:
    """An event whose ``follows`` is its own id follows nothing: stored as a follower of itself
    and then handled, its handler is called once (the completion does not claim it as its own
    follower), it is seen, its row is gone, and the sweep never reports it lost."""
    event = make_event(received=clock.now)
    selfish = event.model_copy(update={"follows": event.id})
    await ordering.record_follower(selfish)
    assert await ordering.get_followers(selfish) == [selfish]

    recorder = Recorder(ordering)
    await bounded(recorder.handler(selfish))
    assert recorder.calls == [selfish.id], "not replayed as its own follower"
    assert recorder.handled == [selfish.id]
    assert await ordering.event_has_been_seen(selfish)
    assert await ordering.get_followers(selfish) == []
    clock.advance(LATER)
    assert await ordering.get_lost_followers() == []


# -- 6. parking against a batch's acquire: one lock order -----------------------------------------


@pytest.fixture
async def two_pool_orderings(
    postgres_url: str,
) -> AsyncIterator[tuple[CausalOrdering[Any], CausalOrdering[Any]]]:
    """Two instances on one scope, each on a connection pool of its own, on the database clock;
    neither waits for a leader in flight (a follower parks at once)."""
    scope = f"lock-order-{uuid4().hex[:8]}"
    engines = [create_async_engine(postgres_url) for _ in range(2)]
    made: list[CausalOrdering[Any]] = [
        CausalOrdering(scope, engine=engine, in_flight_event_timeout=0) for engine in engines
    ]
    try:
        yield made[0], made[1]
    finally:
        for ordering in made:
            await ordering.close()
        for engine in engines:
            await engine.dispose()


#: Events of each racing batch whose ids lie between the follower's and the leader's: the batch
#: locks its rows in id order, so it holds the follower's row for a while before it reaches the
#: leader's, which makes the window in which a park can lock them the other way round wide.
BETWEEN = 24


@pytest.mark.postgres
async def test_parking_and_a_batch_acquire_take_row_locks_in_one_order(
    two_pool_orderings: tuple[CausalOrdering[Any], CausalOrdering[Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """200 races of follower F (id below its leader L's) parking at one worker against another
    worker's batch taking the leases of L, F and events whose ids lie between theirs, both
    started at once. The batch locks rows in ascending id order (F first, L last); the park
    must too, or the two deadlock (Postgres aborts one, the store retries it and says so in a
    warning). No retry may mention a deadlock, and every race ends consistently: L handled
    once, F handled once after L (directly, or parked and replayed), nothing left parked."""
    parking, batching = two_pool_orderings
    caplog.set_level(logging.WARNING, logger="ordering_sql.store")
    outcomes: Counter[str] = Counter()

    async def trial(number: int) -> None:
        low, *middle, high = sorted(uuid4() for _ in range(BETWEEN + 2))
        leader = make_event(id=high, name="leader")
        follower = make_event(id=low, follows=leader, name="follower")
        others = [make_event(id=i, name="other") for i in middle]
        handled: list[UUID] = []
        parker = Recorder(parking, handled=handled)
        batcher = Recorder(batching, handled=handled)
        ends = [leader, follower] if number % 2 == 0 else [follower, leader]
        batch_events = [ends[0], *others, ends[1]]

        async def park() -> str:
            try:
                await parker.handler(follower)
            except EventArrivedEarly:
                return "parked"
            except EventBeingProcessed:
                return "busy"
            return "handled"

        async def take() -> Batch[ReceivedEvent]:
            async with batching.preceding_events_confirmed(batcher.handler, batch_events) as b:
                for event in b:
                    handled.append(event.id)
            return b

        parked, batch = await bounded(asyncio.gather(park(), take()))
        where = "ready" if follower in batch.ready else "busy" if follower in batch.busy else "?"
        outcomes[f"follower {parked} at the parker, {where} in the batch"] += 1

        tag = f"trial {number} ({parked}, {where})"
        assert Counter(handled) == Counter(ids([leader, follower, *others])), tag
        assert handled.index(leader.id) < handled.index(follower.id), tag
        assert await batching.get_followers(leader) == [], tag
        assert await batching.event_has_been_seen(leader), tag
        assert await parking.event_has_been_seen(follower), tag

    for number in range(200):
        await trial(number)

    deadlocks = [
        r.getMessage()
        for r in caplog.records
        if "deadlock" in r.getMessage().lower() or "40P01" in r.getMessage()
    ]
    print(f"\noutcomes: {dict(outcomes)}; deadlocks: {len(deadlocks)}")
    assert deadlocks == [], f"{len(deadlocks)} deadlocks, e.g. {deadlocks[0]}"
    assert outcomes["follower parked at the parker, busy in the batch"] > 0, (
        "the follower never parked while the batch held its leader: the race was not run"
    )


# -- 7. SQLite units take the write lock when they begin ------------------------------------------


def write_lock_refusal(path: str) -> str | None:
    """Why a separate plain sqlite3 connection cannot take the database's write lock right now,
    or None if it can (it then lets go of it at once)."""
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        try:
            other.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            return str(exc)  # nothing began: nothing to roll back
        other.execute("ROLLBACK")
        return None
    finally:
        other.close()


def _sqlite_path(database_url: str) -> str:
    path = make_url(database_url).database
    assert path, database_url
    return path


@pytest.fixture(params=["own connections", "host engine"])
async def sqlite_ordering(
    request: pytest.FixtureRequest, make_ordering: OrderingFactory, database_url: str
) -> AsyncIterator[CausalOrdering[Any]]:
    """An instance on this process's own SQLite connections (its own engine), or on a host
    application's engine (SQLAlchemy's connections): the two places SQLite units run."""
    if request.param == "own connections":
        yield make_ordering()
        return
    engine = create_async_engine(database_url)
    try:
        yield make_ordering(engine=engine, database_url=None)
    finally:
        await engine.dispose()


@SQLITE_ONLY
async def test_a_sqlite_write_unit_holds_the_write_lock_before_its_first_statement(
    sqlite_ordering: CausalOrdering[Any], database_url: str
) -> None:
    """Every write step runs as a unit that begins with ``BEGIN IMMEDIATE``: before the unit
    has sent a single statement of its own, another connection cannot take the write lock, so
    a unit that reads and then writes can never fail half-way for a lock another writer took
    first; and the unit lets go of it at its end."""
    db = await sqlite_ordering._db()  # migrated and connected
    path = _sqlite_path(database_url)
    assert write_lock_refusal(path) is None, "nobody holds the lock between units"

    async def work(conn: Any) -> str | None:
        unit: str | None = await conn.unit(lambda _cursor: write_lock_refusal(path), write=True)
        return unit

    refusal = await db.run(work, action="test")
    assert refusal is not None, "the unit began without taking the write lock"
    assert "database is locked" in refusal
    assert write_lock_refusal(path) is None, "and it let go of it at its end"


@SQLITE_ONLY
async def test_a_sqlite_read_unit_takes_no_write_lock(
    sqlite_ordering: CausalOrdering[Any], database_url: str
) -> None:
    """The control: a read unit takes no write lock, so reads never hold up writers."""
    db = await sqlite_ordering._db()
    path = _sqlite_path(database_url)

    async def work(conn: Any) -> str | None:
        unit: str | None = await conn.unit(lambda _cursor: write_lock_refusal(path), write=False)
        return unit

    assert await db.run(work, action="test") is None


# -- 8. the batch path's lookback boundary --------------------------------------------------------


async def test_a_batch_lets_an_event_exactly_the_lookback_old_through_and_parks_a_younger_one(
    ordering: CausalOrdering[Any], clock: Clock
) -> None:
    """As the single path does: an event whose leader is unknown goes through a batch if it was
    received exactly ``preceding_event_lookback`` ago, and is parked if one second less."""
    lookback = ordering.durations.preceding_event_lookback
    old = make_event(follows=make_event(), received=clock.now - lookback, name="old")
    young = make_event(
        follows=make_event(), received=clock.now - lookback + timedelta(seconds=1), name="young"
    )
    recorder = Recorder(ordering)

    async with ordering.preceding_events_confirmed(recorder.handler, [young, old]) as batch:
        for event in batch:
            recorder.handled.append(event.id)

    assert batch.ready == [old]
    assert batch.parked == [young]
    assert recorder.handled == [old.id]
    assert await ordering.event_has_been_seen(old)
    assert not await ordering.event_has_been_seen(young)
    assert young.follows is not None
    assert await ordering.get_followers(young.follows) == [young]


# -- 9. workers sharing one in-memory SQLite database ---------------------------------------------

MEMORY_URL = "sqlite+aiosqlite:///:memory:"


@pytest.mark.sqlite
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_workers_sharing_a_memory_database_handle_each_event_once_in_order(
    seed: int,
) -> None:
    """Eight instances on one ``:memory:`` URL share its single connection. Consuming one
    jumbled stream of 240 events with duplicates, every event is handled exactly once, every
    ``follows`` edge in order, and nothing is left parked or lost."""
    scope = f"memory-{seed}"
    workers: list[CausalOrdering[Any]] = [
        CausalOrdering(scope, database_url=MEMORY_URL) for _ in range(8)
    ]
    far = datetime.now(UTC) + LATER
    later: CausalOrdering[Any] = CausalOrdering(scope, database_url=MEMORY_URL, clock=lambda: far)
    try:
        stream = build_stream(240, seed=seed, duplicate_rate=0.1)
        assert len(stream.deliveries) > len(stream.events)  # duplicates are delivered
        queue = DeliveryQueue(stream.deliveries)
        logs = [HandledLog(None, f"worker-{i}") for i in range(len(workers))]
        await bounded(
            asyncio.gather(
                *(run_worker(w, queue, log) for w, log in zip(workers, logs, strict=True))
            )
        )

        records = [record for log in logs for record in log.records]
        verdict = check(stream, records)
        assert verdict.lost == 0, verdict.examples
        assert verdict.handled_twice == 0, verdict.twice[:5]
        assert verdict.order_violations == 0, verdict.examples
        starts = Counter(r["id"] for r in records if r["k"] == "start")
        assert set(starts.values()) == {1}, "a body ran more than once"

        probe = workers[0]
        assert await probe.followers_by_id(ids(stream.events)) == [], "followers still stored"
        for leader in set(stream.leaders.values()):
            assert await probe.get_followers(leader) == [], f"followers wait for {leader}"
        assert await later.get_lost_followers() == [], "followers lost past every timeout"
    finally:
        await later.close()
        for ordering in workers:
            await ordering.close()
        await dispose_engines()
