"""What survives a restart: seen marks, parked followers and leases live in the database.

"Restart" here means every pooled connection is gone (``dispose_engines``) and a fresh
``CausalOrdering`` is built; some tests go further and use a second OS process.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID, uuid4

import asyncpg
import pytest
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from sqlalchemy.engine import make_url

import ordering_sql
from ordering_sql import (
    CausalOrdering,
    EventArrivedEarly,
    EventBeingProcessed,
    ReceivedEvent,
    Resource,
)
from tests.conftest import OrderingFactory, _asyncpg_dsn
from tests.support import REPO_ROOT, Clock, child_env, make_event

T = TypeVar("T")

CHILD = Path(__file__).with_name("_child.py")
TEST_TIMEOUT_S = 30.0
CHILD_TIMEOUT_S = 60.0


async def bounded(awaitable: Awaitable[T], seconds: float = TEST_TIMEOUT_S) -> T:
    return await asyncio.wait_for(awaitable, timeout=seconds)


class Recorder:
    """The usual recursive handler; ``fail_on`` makes the body raise for those events."""

    def __init__(self, ordering: CausalOrdering[Any], fail_on: set[UUID] | None = None) -> None:
        self.ordering = ordering
        self.fail_on = fail_on or set()
        self.handled: list[UUID] = []

    async def handler(self, event: Any, depth: int = 0) -> None:
        async with self.ordering.preceding_event_confirmed(self.handler, event, depth):
            if event.id in self.fail_on:
                msg = f"handler failed for {event.id}"
                raise RuntimeError(msg)
            self.handled.append(event.id)


async def restart() -> None:
    """Drop every pooled connection of this process, as a crash or a redeploy would."""
    await ordering_sql.dispose_engines()


def rich_follower(leader: ReceivedEvent, clock: Clock, **kwargs: Any) -> ReceivedEvent:
    """A follower whose JSON exercises nesting, unicode, offsets and microseconds."""
    return ReceivedEvent(
        occurred=kwargs.pop("occurred", clock.now),
        received=clock.now,
        event="order.shipped",
        resource=Resource({"prefect.resource.id": "order.1234", "region": "eu-west-1"}),
        related=[
            Resource({"prefect.resource.id": "customer.77", "prefect.resource.role": "buyer"}),
        ],
        payload={
            "items": [{"sku": "A-1", "qty": 2, "price": 9.99}, {"sku": "Ω-ß", "qty": 1}],
            "note": 'line\nbreak, quote " and emoji \N{PACKAGE}',
            "empty": {},
            "flag": None,
        },
        follows=leader.id,
        **kwargs,
    )


# -- one process, fresh engines ------------------------------------------------------------------


async def test_state_is_seen_by_a_fresh_engine_after_a_restart(
    make_ordering: OrderingFactory, clock: Clock
) -> None:
    before = make_ordering()
    leader = make_event(received=clock.now)
    handled, marked, leased = make_event(), make_event(), make_event()
    # Offsets differ: +02:00 at 10:00 is 08:00 UTC, earlier than 09:00 UTC.
    day = clock.now.date()
    early = rich_follower(
        leader,
        clock,
        occurred=datetime(day.year, day.month, day.day, 10, tzinfo=timezone(timedelta(hours=2))),
    )
    late = rich_follower(
        leader, clock, occurred=datetime(day.year, day.month, day.day, 9, 0, 0, 123456, tzinfo=UTC)
    )

    async with before.event_is_processing(handled):
        pass
    await before.record_event_as_seen(marked)
    recorder = Recorder(before)
    for follower in (late, early):
        with pytest.raises(EventArrivedEarly):
            await recorder.handler(follower)
    assert await before.record_event_as_processing(leased)

    await before.close()
    await restart()

    after = make_ordering()
    assert await after.event_has_been_seen(handled)
    assert await after.event_has_been_seen(marked.id)
    assert not await after.record_event_as_processing(handled)

    parked = await after.get_followers(leader)
    assert parked == [early, late]  # occurred order compares instants, not wall-clock text
    assert [p.model_dump_json() for p in parked] == [
        early.model_dump_json(),
        late.model_dump_json(),
    ]
    assert parked[0].occurred.utcoffset() == timedelta(hours=2)
    assert await after.followers_by_id([late.id, early.id]) == [early, late]

    assert await after.event_has_started_processing(leased)
    assert not await after.record_event_as_processing(leased), "the lease outlived the restart"
    clock.advance(after.lease_timeout)
    assert await after.record_event_as_processing(leased), "and it still expires"

    replay = Recorder(after)
    await replay.handler(leader)
    assert replay.handled == [leader.id, early.id, late.id]
    assert await after.get_followers(leader) == []


class Shipment(BaseModel):
    """A host application's own event model (not ReceivedEvent)."""

    model_config = ConfigDict(frozen=True)

    id: UUID = Field(default_factory=uuid4)
    follows: UUID | None = None
    occurred: AwareDatetime
    received: AwareDatetime
    parcels: list[dict[str, int]]
    carrier: str


async def test_custom_event_type_round_trips_through_a_restart(
    make_ordering: OrderingFactory, clock: Clock
) -> None:
    leader = Shipment(occurred=clock.now, received=clock.now, parcels=[], carrier="first")
    follower = Shipment(
        follows=leader.id,
        occurred=clock.now + timedelta(seconds=1),
        received=clock.now,
        parcels=[{"kg": 3}, {"kg": 12}],
        carrier="Müller & Söhne",
    )
    before = make_ordering(event_type=Shipment)
    with pytest.raises(EventArrivedEarly):
        await Recorder(before).handler(follower)
    await restart()

    after = make_ordering(event_type=Shipment)
    stored = await after.get_followers(leader)
    assert stored == [follower]
    assert all(isinstance(s, Shipment) for s in stored)
    replay = Recorder(after)
    await replay.handler(leader)
    assert replay.handled == [leader.id, follower.id]


async def test_parked_follower_survives_a_crash_mid_leader(
    make_ordering: OrderingFactory, clock: Clock
) -> None:
    """A worker parks a follower, starts on the leader and dies; a new worker finishes it all."""
    crashed = make_ordering(lease_timeout=10)
    leader = make_event(received=clock.now)
    follower = make_event(follows=leader, received=clock.now)
    with pytest.raises(EventArrivedEarly):
        await Recorder(crashed).handler(follower)
    assert await crashed.record_event_as_processing(leader)
    await restart()  # no close(), no release: the worker is simply gone

    survivor = make_ordering(lease_timeout=10)
    recorder = Recorder(survivor)
    with pytest.raises(EventBeingProcessed):
        await recorder.handler(leader)  # the dead worker's lease still holds it
    assert await survivor.get_followers(leader) == [follower]

    clock.advance(10)
    await bounded(recorder.handler(leader))
    assert recorder.handled == [leader.id, follower.id]
    assert await survivor.event_has_been_seen(follower)
    assert await survivor.get_followers(leader) == []


class WorkerDied(BaseException):
    """Stands for the process dying in the middle of replaying followers."""


async def test_claimed_follower_survives_a_crash_mid_replay(
    make_ordering: OrderingFactory, clock: Clock
) -> None:
    crashed = make_ordering()
    leader = make_event(received=clock.now)
    follower = make_event(follows=leader, received=clock.now)

    async def dying_handler(event: ReceivedEvent, depth: int = 0) -> None:
        async with crashed.preceding_event_confirmed(dying_handler, event, depth):
            if event.id == follower.id:
                raise WorkerDied

    with pytest.raises(EventArrivedEarly):
        await dying_handler(follower)
    try:
        await dying_handler(leader)
    except WorkerDied:
        pass
    else:
        pytest.fail("the worker was meant to die while replaying the follower")
    await restart()

    survivor = make_ordering()
    assert await survivor.event_has_been_seen(leader)
    assert not await survivor.event_has_been_seen(follower)
    assert await survivor.get_followers(leader) == [follower], "claimed, not deleted"
    assert await survivor.get_lost_followers() == [], "the claim is still live"
    clock.advance(timedelta(minutes=1))
    lost = await survivor.get_lost_followers()
    assert lost == [follower]
    recorder = Recorder(survivor)
    await recorder.handler(lost[0])
    assert recorder.handled == [follower.id]
    assert await survivor.get_followers(leader) == []


async def test_follower_whose_replay_fails_comes_back_after_the_claim_timeout(
    make_ordering: OrderingFactory, clock: Clock
) -> None:
    ordering = make_ordering()
    leader = make_event(received=clock.now)
    first, failing, last = (
        make_event(follows=leader, occurred=clock.now + timedelta(seconds=i), received=clock.now)
        for i in range(3)
    )
    recorder = Recorder(ordering, fail_on={failing.id})
    for follower in (last, failing, first):
        with pytest.raises(EventArrivedEarly):
            await recorder.handler(follower)

    with pytest.raises(RuntimeError, match=str(failing.id)):
        await recorder.handler(leader)
    assert recorder.handled == [leader.id, first.id, last.id], "the siblings were still handled"
    assert await ordering.event_has_been_seen(leader)
    assert not await ordering.event_has_been_seen(failing)
    assert not await ordering.event_has_started_processing(failing)
    assert await ordering.get_followers(leader) == [failing], "kept until its handler succeeds"

    await restart()  # and it stays recoverable across a restart
    sweeper = make_ordering()
    clock.advance(timedelta(seconds=59))
    assert await sweeper.get_lost_followers() == []
    clock.advance(timedelta(seconds=1))  # claim_timeout; the 15 min lookback is far away
    assert await sweeper.get_lost_followers() == [failing]
    assert await sweeper.get_lost_followers() == [], "handed back once"

    fixed = Recorder(sweeper)
    await fixed.handler(failing)
    assert fixed.handled == [failing.id]
    assert await sweeper.event_has_been_seen(failing)


# -- connections after a restart -----------------------------------------------------------------


def _wal_exists(database: str | None) -> bool:
    return Path(f"{database}-wal").exists()


async def open_connections(database_url: str) -> int:
    """How many connections to the test database are open (other than this probe's own).

    SQLite: the write-ahead log file exists exactly while some connection has the database open
    (the last one to close checkpoints and removes it), so the answer is 0 or 1.
    """
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        return int(_wal_exists(url.database))
    probe = await asyncpg.connect(_asyncpg_dsn(database_url), timeout=10)
    try:
        count = await probe.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await probe.close()
    return int(count)


async def settled_open_connections(database_url: str) -> int:
    """``open_connections`` once closed connections had time to go (a server ends a backend
    a moment after its client hung up)."""
    for _ in range(40):
        if (count := await open_connections(database_url)) == 0:
            return 0
        await asyncio.sleep(0.05)
    return count


async def test_close_gives_the_connections_back(
    make_ordering: OrderingFactory, database_url: str
) -> None:
    ordering = make_ordering()
    await ordering.record_event_as_seen(make_event())
    assert await open_connections(database_url) > 0
    await ordering.close()
    assert await settled_open_connections(database_url) == 0


async def test_instance_used_after_a_restart_gives_its_connections_back_on_close(
    make_ordering: OrderingFactory, database_url: str
) -> None:
    ordering = make_ordering()
    event = make_event()
    await ordering.record_event_as_seen(event)
    await restart()
    assert await settled_open_connections(database_url) == 0
    assert await ordering.event_has_been_seen(event), "the instance still works after a restart"
    leaked = ordering._store  # only to clean up below if close() leaves it open
    try:
        await ordering.close()
        assert await settled_open_connections(database_url) == 0
    finally:
        if leaked is not None:
            await leaked.engine.dispose()


# -- two OS processes ----------------------------------------------------------------------------


async def run_child(database_url: str, now: datetime, actions: list[dict[str, Any]]) -> list[Any]:
    """Run ``_child.py`` in a new interpreter on the same database; its results."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CHILD),
        database_url,
        now.isoformat(),
        json.dumps(actions),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(REPO_ROOT),
        env=child_env(),
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=CHILD_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, stderr.decode()
    result: list[Any] = json.loads(stdout)
    return result


def step(do: str, event: ReceivedEvent) -> dict[str, Any]:
    return {"do": do, "event": json.loads(event.model_dump_json())}


async def test_state_left_by_another_process_is_used_here(
    make_ordering: OrderingFactory, database_url: str, clock: Clock
) -> None:
    leader = make_event(received=clock.now)
    follower = rich_follower(leader, clock)
    done, held = make_event(), make_event()

    results = await run_child(
        database_url,
        clock.now,
        [
            step("handle", follower),
            step("handle", done),
            step("lease", held),
        ],
    )
    assert results == ["parked", {"handled": [str(done.id)]}, True]

    ordering = make_ordering()
    assert await ordering.get_followers(leader) == [follower]
    assert await ordering.event_has_been_seen(done)
    assert not await ordering.record_event_as_processing(done)
    assert await ordering.event_has_started_processing(held)
    assert not await ordering.record_event_as_processing(held), "the other process holds it"

    recorder = Recorder(ordering)
    await bounded(recorder.handler(leader))
    assert recorder.handled == [leader.id, follower.id]
    assert await ordering.get_followers(leader) == []

    clock.advance(ordering.lease_timeout)  # the child exited without releasing: it expires
    assert await ordering.record_event_as_processing(held)


async def test_follower_parked_here_is_replayed_by_another_process(
    make_ordering: OrderingFactory, database_url: str, clock: Clock
) -> None:
    leader = make_event(received=clock.now)
    followers = [
        make_event(follows=leader, occurred=clock.now + timedelta(seconds=i), received=clock.now)
        for i in (2, 1)
    ]
    held = make_event()
    ordering = make_ordering()
    for follower in followers:
        with pytest.raises(EventArrivedEarly):
            await Recorder(ordering).handler(follower)
    assert await ordering.record_event_as_processing(held)

    results = await run_child(
        database_url,
        clock.now,
        [
            step("followers", leader),
            step("handle", held),
            step("handle", leader),
            step("handle", followers[0]),
            step("seen", followers[1]),
        ],
    )
    assert results == [
        [str(followers[1].id), str(followers[0].id)],
        "busy",
        {"handled": [str(leader.id), str(followers[1].id), str(followers[0].id)]},
        "busy",  # already handled: taking the lease refuses a seen event
        True,
    ]
    assert await ordering.get_followers(leader) == []
    for event in (leader, *followers):
        assert await ordering.event_has_been_seen(event)


# -- what a SQLite commit survives ---------------------------------------------------------------


async def _sqlite_synchronous(ordering: CausalOrdering[Any]) -> int:
    """``PRAGMA synchronous`` on the engine's own connections: 1 NORMAL, 2 FULL, 3 EXTRA."""
    db = await ordering._db()

    async def work(conn: Any) -> int:
        rows = await conn.unit(lambda cursor: cursor.rows("PRAGMA synchronous"), write=False)
        return int(rows[0][0])

    return await db.run(work, action="test")


@pytest.mark.sqlite
@pytest.mark.parametrize(
    ("setting", "expected"), [(None, 2), ("NORMAL", 1), ("normal", 1), ("FULL", 2), ("EXTRA", 3)]
)
async def test_sqlite_commits_are_durable_unless_told_otherwise(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, setting: str | None, expected: int
) -> None:
    """A parked follower is acknowledged as stored: by default its commit must survive a power
    loss or an OS crash (``synchronous=FULL``), not only a crash of the process (NORMAL, with
    WAL). ``ORDERING_SQL_SQLITE_SYNCHRONOUS`` chooses otherwise, explicitly."""
    if setting is not None:
        monkeypatch.setenv("ORDERING_SQL_SQLITE_SYNCHRONOUS", setting)
    ordering: CausalOrdering[Any] = CausalOrdering("durable", database_url=sqlite_url)
    try:
        await ordering.record_event_as_seen(make_event())
        assert await _sqlite_synchronous(ordering) == expected
    finally:
        await ordering.close()


def test_sqlite_refuses_synchronous_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """OFF would acknowledge commits that any crash can lose: not offered, a clear error."""
    monkeypatch.setenv("ORDERING_SQL_SQLITE_SYNCHRONOUS", "OFF")
    with pytest.raises(ordering_sql.ConfigurationError, match="sqlite_synchronous='OFF'"):
        CausalOrdering("durable", database_url="sqlite+aiosqlite:///durable.db")
