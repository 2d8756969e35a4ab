"""Each outcome of ``ordering_sql.faststream.ordered`` as the broker sees it, on each broker.

A subscriber runs in the test's process against the real broker. What the tests read back
comes from the broker: the delivery count it attaches to each message (``Kit.attempt``: a
redelivery has a count above 1), and what it still holds for the channel once the subscriber
has stopped (``Kit.backlog``: nothing waiting and nothing unacknowledged means every message was
acknowledged or rejected; RabbitMQ also dead-letters what was rejected). The settlement the
subscriber chose (``Delivery.settled``) is recorded too, by a FastStream middleware.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest
from faststream import AckPolicy, StreamMessage
from faststream.nats import JStream, NatsBroker, TestNatsBroker
from faststream.rabbit import RabbitBroker, RabbitQueue, TestRabbitBroker
from faststream.redis import RedisBroker, StreamSub, TestRedisBroker
from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from ordering_sql import CausalOrdering, ConfigurationError, ReceivedEvent
from ordering_sql.faststream import OrderedSubscriber, ordered
from ordering_sql.tools.effects import EFFECTS, Effects, create_effects
from tests.brokers.conftest import require
from tests.brokers.support import (
    Backlog,
    Deliveries,
    Kit,
    RabbitKit,
    channel_name,
    make_kit,
)
from tests.support import Clock, make_event

#: Short, so that redeliveries come quickly.
RETRY_DELAY_S = 0.05


@pytest.fixture
async def ordering(sqlite_url: str) -> AsyncIterator[CausalOrdering[ReceivedEvent]]:
    made: CausalOrdering[ReceivedEvent] = CausalOrdering(
        f"fs-{uuid4().hex[:8]}", database_url=sqlite_url
    )
    yield made
    await made.close()


@asynccontextmanager
async def serving(
    kit: Kit,
    channel: str,
    consume: Callable[[StreamMessage[Any]], Awaitable[None]],
    **subscriber: Any,
) -> AsyncIterator[Deliveries]:
    """The subscriber, consuming ``channel`` until the block ends; the deliveries it saw."""
    deliveries = Deliveries()
    broker = kit.broker(middlewares=[deliveries.middleware(kit)])
    if subscriber:  # a subscriber with options of its own (RabbitMQ only here)
        queue = RabbitQueue(channel, durable=True, arguments=RabbitKit.arguments(channel))
        broker.subscriber(queue, **subscriber)(consume)
    else:
        kit.subscribe(broker, consume, channel, consumer="test")
    async with broker:
        await broker.start()
        yield deliveries


async def publish(kit: Kit, channel: str, *events: ReceivedEvent) -> None:
    await kit.publish(channel, [event.model_dump_json().encode() for event in events])


async def backlog_after(kit: Kit, channel: str, seconds: float = 5.0) -> Backlog:
    """What the broker holds for the channel, once acknowledgements sent just before (NATS
    sends them without waiting) have reached it: polled until nothing is left, or ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        found = await kit.backlog(channel)
        if not found.left or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.1)


def settled(deliveries: Deliveries, event_id: UUID, status: str, count: int = 1) -> bool:
    return sum(d.settled == status for d in deliveries.of(event_id)) >= count


class Calls:
    """The subscriber's function: records the events it ran on, in order."""

    def __init__(self, fail: set[UUID] | None = None) -> None:
        self.events: list[UUID] = []
        self._fail = set(fail or ())

    async def __call__(self, event: ReceivedEvent) -> None:
        self.events.append(event.id)
        if event.id in self._fail:
            self._fail.discard(event.id)  # fails once
            msg = f"the handler fails on {event.id}"
            raise RuntimeError(msg)


# -- one test per outcome --------------------------------------------------------------------------


@pytest.mark.sqlite
async def test_a_handled_event_is_acknowledged(
    kit: Kit, channel: str, ordering: CausalOrdering[ReceivedEvent]
) -> None:
    calls, event = Calls(), make_event()
    async with serving(kit, channel, ordered(ordering)(calls)) as deliveries:
        await publish(kit, channel, event)
        await deliveries.until(lambda: settled(deliveries, event.id, "ACKED"))
    assert calls.events == [event.id]
    assert [(d.attempt, d.settled) for d in deliveries] == [(1, "ACKED")]
    assert await backlog_after(kit, channel) == Backlog(0, 0, 0 if kit.name == "rabbit" else None)
    assert await ordering.event_has_been_seen(event)


@pytest.mark.sqlite
async def test_a_parked_event_is_acknowledged_and_runs_when_its_leader_does(
    kit: Kit, channel: str, ordering: CausalOrdering[ReceivedEvent]
) -> None:
    calls, leader = Calls(), make_event(name="leader")
    follower = make_event(follows=leader, name="follower")
    async with serving(kit, channel, ordered(ordering)(calls)) as deliveries:
        await publish(kit, channel, follower)
        await deliveries.until(lambda: settled(deliveries, follower.id, "ACKED"))
        assert calls.events == [], "the follower ran before its leader"
        assert await ordering.get_followers(leader) == [follower], "not stored durably"
        await publish(kit, channel, leader)
        await deliveries.until(lambda: settled(deliveries, leader.id, "ACKED"))
    assert calls.events == [leader.id, follower.id], "the follower was not replayed after it"
    assert [(d.event_id, d.attempt) for d in deliveries] == [
        (str(follower.id), 1),
        (str(leader.id), 1),
    ]
    assert (await backlog_after(kit, channel)).left == 0
    assert await ordering.get_followers(leader) == []


@pytest.mark.sqlite
async def test_a_duplicate_is_acknowledged_without_running_the_function(
    kit: Kit, channel: str, ordering: CausalOrdering[ReceivedEvent]
) -> None:
    calls, event = Calls(), make_event()
    async with serving(kit, channel, ordered(ordering)(calls)) as deliveries:
        await publish(kit, channel, event)
        await deliveries.until(lambda: settled(deliveries, event.id, "ACKED"))
        await publish(kit, channel, event)
        await deliveries.until(lambda: settled(deliveries, event.id, "ACKED", 2))
    assert calls.events == [event.id]
    assert [(d.attempt, d.settled) for d in deliveries] == [(1, "ACKED"), (1, "ACKED")]
    assert (await backlog_after(kit, channel)).left == 0


@pytest.mark.sqlite
async def test_an_event_held_by_another_worker_is_redelivered_until_it_is_free(
    kit: Kit, channel: str, ordering: CausalOrdering[ReceivedEvent], sqlite_url: str
) -> None:
    calls, event = Calls(), make_event()
    holder: CausalOrdering[ReceivedEvent] = CausalOrdering(ordering.scope, database_url=sqlite_url)
    assert await holder.record_event_as_processing(event)
    consume = ordered(ordering, retry_delay=RETRY_DELAY_S)(calls)
    try:
        async with serving(kit, channel, consume) as deliveries:
            await publish(kit, channel, event)
            # The broker delivers it again and again while the other worker holds it.
            await deliveries.until(lambda: settled(deliveries, event.id, "NACKED", 3))
            assert calls.events == []
            await holder.forget_event_is_processing(event)
            await deliveries.until(lambda: settled(deliveries, event.id, "ACKED"))
    finally:
        await holder.close()
    assert calls.events == [event.id]
    *busy, last = deliveries.of(event.id)
    assert {d.settled for d in busy} == {"NACKED"}
    assert (last.settled, last.attempt > 1) == ("ACKED", True)
    assert [d.attempt for d in deliveries] == sorted(d.attempt for d in deliveries)
    assert (await backlog_after(kit, channel)).left == 0


@pytest.mark.sqlite
async def test_an_event_whose_function_failed_is_redelivered_and_the_error_propagates(
    kit: Kit, channel: str, ordering: CausalOrdering[ReceivedEvent]
) -> None:
    event = make_event()
    calls = Calls(fail={event.id})
    consume = ordered(ordering, retry_delay=RETRY_DELAY_S)(calls)
    async with serving(kit, channel, consume) as deliveries:
        await publish(kit, channel, event)
        await deliveries.until(lambda: settled(deliveries, event.id, "ACKED"))
    assert calls.events == [event.id, event.id]
    assert [(d.attempt, d.settled, d.error) for d in deliveries] == [
        (1, "NACKED", "RuntimeError"),
        (2, "ACKED", None),
    ]
    assert (await backlog_after(kit, channel)).left == 0
    assert await ordering.event_has_been_seen(event)


@pytest.mark.sqlite
async def test_an_event_whose_lease_was_taken_over_is_redelivered(
    kit: Kit, channel: str, ordering: CausalOrdering[ReceivedEvent], sqlite_url: str
) -> None:
    """While the function runs, a worker whose clock is an hour ahead (so the lease looks
    expired to it) takes the event over: the completion finds the lease lost, nothing is
    recorded, and the message goes back. Once that worker lets go, a redelivery handles it."""
    event = make_event()
    usurper: CausalOrdering[ReceivedEvent] = CausalOrdering(
        ordering.scope,
        database_url=sqlite_url,
        clock=lambda: datetime.now(UTC) + timedelta(hours=1),
    )
    calls: list[UUID] = []

    async def on_event(received: ReceivedEvent) -> None:
        calls.append(received.id)
        if len(calls) == 1:
            assert await usurper.record_event_as_processing(received), "no takeover"

    consume = ordered(ordering, retry_delay=RETRY_DELAY_S)(on_event)
    try:
        async with serving(kit, channel, consume) as deliveries:
            await publish(kit, channel, event)
            await deliveries.until(lambda: settled(deliveries, event.id, "NACKED"))
            assert not await ordering.event_has_been_seen(event), "a lost lease recorded it"
            await usurper.forget_event_is_processing(event)
            await deliveries.until(lambda: settled(deliveries, event.id, "ACKED"))
    finally:
        await usurper.close()
    assert calls == [event.id, event.id]
    first, *_, last = deliveries.of(event.id)
    assert (first.attempt, first.settled, first.error) == (1, "NACKED", None)
    assert (last.attempt > 1, last.settled) == (True, "ACKED")
    assert (await backlog_after(kit, channel)).left == 0


@pytest.mark.sqlite
async def test_a_body_that_is_not_an_event_is_rejected(
    kit: Kit, channel: str, ordering: CausalOrdering[ReceivedEvent]
) -> None:
    calls = Calls()
    naive = make_event().model_dump_json().replace("+00:00", "").replace("Z", "").encode()
    consume = ordered(ordering, retry_delay=RETRY_DELAY_S)(calls)
    async with serving(kit, channel, consume) as deliveries:
        await kit.publish(channel, [b"this is not an event", naive])
        await deliveries.until(lambda: len(deliveries.seen) == 2)
        await deliveries.until(lambda: all(d.settled for d in deliveries))
        await asyncio.sleep(0.5)  # a redelivery would come within this
    assert calls.events == []
    # A Redis stream has no reject: the entry is acknowledged, or it would stay pending.
    expected = "ACKED" if kit.name == "redis" else "REJECTED"
    assert [(d.attempt, d.settled, d.error) for d in deliveries] == [
        (1, expected, "ValidationError"),
        (1, expected, "ValidationError"),
    ]
    assert await backlog_after(kit, channel) == Backlog(0, 0, 2 if kit.name == "rabbit" else None)


# -- exactly once, replays, sweeps -----------------------------------------------------------------


@pytest.fixture
def rabbit() -> Kit:
    require("rabbit")
    return make_kit("rabbit")


@pytest.fixture
def redis() -> Kit:
    require("redis")
    return make_kit("redis")


@asynccontextmanager
async def rabbit_channel(kit: Kit) -> AsyncIterator[tuple[Kit, str]]:
    channel = channel_name()
    await kit.declare(channel)
    try:
        yield kit, channel
    finally:
        await kit.remove(channel)


@pytest.fixture(
    params=[
        pytest.param("sqlite", marks=pytest.mark.sqlite),
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
def any_url(request: pytest.FixtureRequest) -> str:
    """A fresh, migrated database on SQLite, then on Postgres."""
    return str(request.getfixturevalue(f"{request.param}_url"))


async def effect_rows(url: str) -> tuple[dict[str, int], int]:
    """Effect rows per event id, and how many followers' rows came before their leader's."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            per_event = select(EFFECTS.c.event_id, func.count()).group_by(EFFECTS.c.event_id)
            rows = {str(i): int(n) for i, n in (await conn.execute(per_event)).all()}
            early = select(func.count()).where(
                EFFECTS.c.leader_id.is_not(None), EFFECTS.c.after_leader.is_(False)
            )
            return rows, int((await conn.execute(early)).scalar_one())
    finally:
        await engine.dispose()


async def test_exactly_once_writes_each_event_once_through_the_broker(
    any_url: str, rabbit: Kit
) -> None:
    """Followers before their leaders, every event published twice, one leader failing after
    it wrote its row: each event has exactly one effect row, each follower's written after
    its leader's committed, and every message was acknowledged."""
    url = any_url
    await create_effects(url)
    ordering: CausalOrdering[ReceivedEvent] = CausalOrdering("fs-effects", database_url=url)
    leaders = [make_event(name=f"leader.{i}") for i in range(5)]
    followers = [
        make_event(follows=leader, name=f"follower.{i}") for i, leader in enumerate(leaders)
    ]
    failing = {leaders[2].id}
    effects = Effects()

    async def on_event(event: ReceivedEvent, *, conn: AsyncConnection) -> None:
        await effects.write(conn, event, "test")
        if event.id in failing:
            failing.discard(event.id)
            msg = f"fails after writing its row: {event.id}"
            raise RuntimeError(msg)

    events = [*followers, *leaders]
    consume = ordered(ordering, exactly_once=True, retry_delay=RETRY_DELAY_S)(on_event)
    try:
        async with rabbit_channel(rabbit) as (kit, channel):
            async with serving(kit, channel, consume) as deliveries:
                await publish(kit, channel, *events, *reversed(events))
                await deliveries.until(
                    lambda: all(settled(deliveries, e.id, "ACKED", 2) for e in events), 20
                )
            assert (await backlog_after(kit, channel)).left == 0
            # The leader that failed; the others were copies held by the first (busy).
            assert [d.error for d in deliveries if d.error] == ["RuntimeError"]
            assert {d.settled for d in deliveries if d.error} == {"NACKED"}
    finally:
        await ordering.close()
    rows, early = await effect_rows(url)
    assert rows == {str(e.id): 1 for e in events}
    assert early == 0, "a follower's row was written before its leader's committed"


@pytest.mark.sqlite
async def test_a_follower_whose_replay_failed_comes_back_from_the_sweep(
    sqlite_url: str, rabbit: Kit
) -> None:
    """The follower's message was acknowledged when it was parked, so once its replay fails
    (the leader's message is acknowledged all the same: the leader was handled) only the sweep
    hands it back, after its claim expired."""
    clock = Clock()  # moved by hand past the claim, instead of waiting for it
    ordering: CausalOrdering[ReceivedEvent] = CausalOrdering(
        "fs-sweep", database_url=sqlite_url, clock=clock
    )
    leader = make_event(name="leader")
    follower = make_event(follows=leader, name="follower")
    calls = Calls(fail={follower.id})
    orders = ordered(ordering, retry_delay=RETRY_DELAY_S)
    try:
        async with rabbit_channel(rabbit) as (kit, channel):
            async with serving(kit, channel, orders(calls)) as deliveries:
                await publish(kit, channel, follower)
                await deliveries.until(lambda: settled(deliveries, follower.id, "ACKED"))
                await publish(kit, channel, leader)
                await deliveries.until(lambda: settled(deliveries, leader.id, "ACKED"))
            assert [(d.settled, d.error) for d in deliveries] == [("ACKED", None)] * 2
            assert (await backlog_after(kit, channel)).left == 0
        assert calls.events == [leader.id, follower.id]
        assert not await ordering.event_has_been_seen(follower)
        assert await orders.sweep_lost() == 0, "handed out while its claim was live"
        clock.advance(ordering.durations.claim_timeout + timedelta(seconds=1))
        assert await orders.sweep_lost() == 1
        assert calls.events == [leader.id, follower.id, follower.id]
        assert await ordering.event_has_been_seen(follower)
        assert await ordering.get_followers(leader) == []
        assert await orders.sweep_lost() == 0
    finally:
        await ordering.close()


@pytest.mark.sqlite
async def test_sweeping_runs_the_sweep_in_the_background(sqlite_url: str) -> None:
    ordering: CausalOrdering[ReceivedEvent] = CausalOrdering(
        "fs-sweeping", database_url=sqlite_url, claim_timeout=0.5
    )
    leader = make_event(name="leader")
    follower = make_event(follows=leader, name="follower")
    calls = Calls(fail={follower.id})
    orders = ordered(ordering)
    orders(calls)
    try:
        await ordering.record_follower(follower)
        async with ordering.preceding_event_confirmed(lambda *_: asyncio.sleep(0), leader):
            pass  # the leader is handled elsewhere; its replay (a no-op here) claimed the follower
        async with orders.sweeping(every=0.1):
            deadline = time.monotonic() + 10
            while not await ordering.event_has_been_seen(follower):
                assert time.monotonic() < deadline, f"not swept: {calls.events}"
                await asyncio.sleep(0.05)
        assert calls.events == [follower.id, follower.id]  # failed once, then swept again
    finally:
        await ordering.close()


# -- misuse ----------------------------------------------------------------------------------------


@pytest.mark.sqlite
async def test_a_subscriber_that_acknowledges_first_is_refused(
    ordering: CausalOrdering[ReceivedEvent], rabbit: Kit
) -> None:
    """``AckPolicy.ACK_FIRST`` acknowledges before the function runs: nothing could be
    redelivered, so the subscriber refuses to handle the event and says why."""
    calls, event = Calls(), make_event()
    async with rabbit_channel(rabbit) as (kit, channel):
        consume = ordered(ordering)(calls)
        async with serving(kit, channel, consume, ack_policy=AckPolicy.ACK_FIRST) as deliveries:
            await publish(kit, channel, event)
            await deliveries.until(lambda: any(d.error for d in deliveries))
        assert (await backlog_after(kit, channel)).left == 0, "the broker kept it: not ack-first"
    assert calls.events == []
    assert [d.error for d in deliveries] == ["ConfigurationError"]


@pytest.mark.sqlite
@pytest.mark.parametrize(
    "policy",
    [AckPolicy.REJECT_ON_ERROR, AckPolicy.NACK_ON_ERROR, AckPolicy.ACK, AckPolicy.MANUAL],
)
async def test_every_acknowledging_policy_settles_as_the_ordering_says(
    ordering: CausalOrdering[ReceivedEvent], rabbit: Kit, policy: AckPolicy
) -> None:
    """The subscriber settles each message itself, so the subscriber's policy changes nothing:
    not even ``AckPolicy.ACK``, which would acknowledge the failed handling, nor ``MANUAL``."""
    event = make_event()
    calls = Calls(fail={event.id})
    async with rabbit_channel(rabbit) as (kit, channel):
        consume = ordered(ordering, retry_delay=RETRY_DELAY_S)(calls)
        async with serving(kit, channel, consume, ack_policy=policy) as deliveries:
            await publish(kit, channel, event)
            await deliveries.until(lambda: settled(deliveries, event.id, "ACKED"))
        assert (await backlog_after(kit, channel)).left == 0
    assert calls.events == [event.id, event.id]
    assert [(d.attempt, d.settled) for d in deliveries] == [(1, "NACKED"), (2, "ACKED")]


def unused_ordering() -> CausalOrdering[ReceivedEvent]:
    """An ordering that is never used: building one does no I/O."""
    return CausalOrdering("unused", database_url="sqlite+aiosqlite:///unused.db")


def test_one_ordered_subscriber_wraps_one_function() -> None:
    orders = ordered(unused_ordering())

    async def first(event: ReceivedEvent) -> None:
        """The first."""

    async def second(event: ReceivedEvent) -> None:
        pass

    consume = orders(first)
    assert (consume.__name__, consume.__doc__) == ("first", "The first.")
    assert orders(first) is not None  # the same function again is fine
    with pytest.raises(ConfigurationError, match="already wraps"):
        orders(second)
    assert isinstance(orders, OrderedSubscriber)


@pytest.mark.parametrize("delay", [-1, float("nan"), "soon", timedelta(seconds=-1)])
def test_a_bad_retry_delay_is_refused(delay: Any) -> None:
    with pytest.raises(ConfigurationError, match="retry_delay"):
        ordered(unused_ordering(), retry_delay=delay)


@pytest.mark.sqlite
async def test_a_redis_stream_read_without_a_consumer_group_is_refused(
    ordering: CausalOrdering[ReceivedEvent], redis: Kit
) -> None:
    """Without a consumer group, a Redis stream neither acknowledges nor redelivers."""
    calls, event, channel = Calls(), make_event(), channel_name()
    deliveries = Deliveries()
    broker = redis.broker(middlewares=[deliveries.middleware(redis)])
    broker.subscriber(stream=StreamSub(channel, polling_interval=50))(ordered(ordering)(calls))
    try:
        async with broker:
            await broker.start()
            await publish(redis, channel, event)
            await deliveries.until(lambda: any(d.error for d in deliveries))
    finally:
        await redis.remove(channel)
    assert calls.events == []
    assert [d.error for d in deliveries] == ["ConfigurationError"]


class Envelope(BaseModel):
    """Another message shape: the event inside an envelope."""

    kind: str
    event: ReceivedEvent


class LooseEvent(BaseModel):
    """An event model that lets a naive datetime through, which cannot be ordered."""

    id: UUID
    follows: UUID | None = None
    occurred: datetime
    received: datetime


@pytest.mark.sqlite
async def test_event_from_reads_the_event_from_another_shape(
    ordering: CausalOrdering[ReceivedEvent], rabbit: Kit
) -> None:
    calls, leader = Calls(), make_event(name="leader")
    follower = make_event(follows=leader, name="follower")
    orders = ordered(ordering, event_from=lambda body: Envelope.model_validate_json(body).event)
    async with rabbit_channel(rabbit) as (kit, channel):
        async with serving(kit, channel, orders(calls)) as deliveries:
            bodies = [Envelope(kind="order", event=e).model_dump_json() for e in (follower, leader)]
            await kit.publish(channel, [body.encode() for body in bodies])
            await deliveries.until(lambda: len([d for d in deliveries if d.settled]) == 2)
        assert (await backlog_after(kit, channel)).left == 0
    assert calls.events == [leader.id, follower.id]
    assert [d.settled for d in deliveries] == ["ACKED", "ACKED"]


@pytest.mark.sqlite
async def test_an_event_that_cannot_be_ordered_is_rejected(sqlite_url: str, rabbit: Kit) -> None:
    loose: CausalOrdering[LooseEvent] = CausalOrdering(
        "fs-loose", database_url=sqlite_url, event_type=LooseEvent
    )
    ran: list[UUID] = []

    async def on_event(event: LooseEvent) -> None:
        ran.append(event.id)

    naive = LooseEvent(id=uuid4(), occurred=datetime(2024, 1, 1), received=datetime(2024, 1, 1))
    try:
        async with rabbit_channel(rabbit) as (kit, channel):
            async with serving(kit, channel, ordered(loose)(on_event)) as deliveries:
                await kit.publish(channel, [naive.model_dump_json().encode()])
                await deliveries.until(lambda: any(d.settled for d in deliveries))
            assert await backlog_after(kit, channel) == Backlog(0, 0, 1)
    finally:
        await loose.close()
    assert ran == []
    assert [(d.settled, d.error) for d in deliveries] == [("REJECTED", "ConfigurationError")]


def _in_memory(name: str) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """(broker, its FastStream test broker class, subscriber options, publish options)."""
    if name == "rabbit":
        return RabbitBroker(), TestRabbitBroker, {"queue": "q"}, {"queue": "q"}
    if name == "nats":
        subject = {"subject": "s", "stream": JStream("st")}
        return NatsBroker(), TestNatsBroker, subject, {"subject": "s"}
    stream = StreamSub("rs", group="g", consumer="c")
    return RedisBroker(), TestRedisBroker, {"stream": stream}, {"stream": "rs"}


@pytest.mark.sqlite
@pytest.mark.parametrize("name", ["rabbit", "nats", "redis"])
async def test_ordered_runs_under_faststream_test_brokers(
    ordering: CausalOrdering[ReceivedEvent], name: str
) -> None:
    """FastStream's in-memory test brokers (for a service's own unit tests) need no broker:
    their messages are neither refused as acknowledged already nor as unacknowledgeable."""
    broker, test_broker, subscribe, destination = _in_memory(name)
    calls, leader = Calls(), make_event(name="leader")
    follower = make_event(follows=leader, name="follower")
    broker.subscriber(**subscribe)(ordered(ordering)(calls))
    async with test_broker(broker) as running:
        for event in (follower, leader, leader):
            await running.publish(event.model_dump_json(), **destination)
    assert calls.events == [leader.id, follower.id]
