"""The three brokers behind one small interface, for the tests and their consumer processes.

A ``Kit`` declares a channel (a RabbitMQ queue, a JetStream stream with one durable pull
consumer, a Redis stream with one consumer group), subscribes an ordered function to it the way
a service would, publishes bodies, and reads back from the broker itself what happened:

* ``attempt(message)``: which delivery of its message this is, as the broker counts it (RabbitMQ
  only says whether it was delivered before: 1 or 2);
* ``backlog(channel)``: messages still waiting, delivered but not acknowledged, and (RabbitMQ)
  rejected into the dead-letter queue.

Every channel name is unique per test (``channel_name``), and ``remove`` deletes it.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from uuid import uuid4

import aio_pika
import nats
import redis.asyncio as aioredis
from faststream import BaseMiddleware, StreamMessage
from faststream.nats import JStream, NatsBroker, PullSub
from faststream.rabbit import Channel, RabbitBroker, RabbitQueue
from faststream.redis import RedisBroker, StreamSub
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from redis.exceptions import ResponseError

BrokerName = Literal["rabbit", "nats", "redis"]
BROKERS: tuple[BrokerName, ...] = ("rabbit", "nats", "redis")

DEFAULT_URLS: dict[BrokerName, str] = {
    "rabbit": "amqp://guest:guest@127.0.0.1:5672/",
    "nats": "nats://127.0.0.1:4222",
    "redis": "redis://127.0.0.1:6379/0",
}
#: Environment variables that point the tests at other brokers.
URL_ENV: dict[BrokerName, str] = {
    "rabbit": "ORDERING_SQL_TEST_RABBITMQ_URL",
    "nats": "ORDERING_SQL_TEST_NATS_URL",
    "redis": "ORDERING_SQL_TEST_REDIS_URL",
}
#: The one consumer group / durable consumer every worker of a channel shares.
GROUP = "workers"

SubscriberFunction = Callable[[StreamMessage[Any]], Awaitable[None]]


#: Read once, on import: the suite's autouse fixture clears ``ORDERING_SQL_*`` for each test.
URLS: dict[BrokerName, str] = {
    name: os.environ.get(URL_ENV[name]) or DEFAULT_URLS[name] for name in DEFAULT_URLS
}


def broker_url(name: BrokerName) -> str:
    return URLS[name]


def channel_name(prefix: str = "ordering-sql-test") -> str:
    return f"{prefix}-{uuid4().hex[:12]}"


@dataclass(frozen=True)
class Backlog:
    """What the broker still holds for a channel's consumers."""

    waiting: int
    unacked: int
    #: Rejected messages dead-lettered (RabbitMQ); None where the broker does not keep them.
    rejected: int | None = None

    @property
    def left(self) -> int:
        return self.waiting + self.unacked


@dataclass
class Settings:
    """How the channel redelivers: shorter than the brokers' defaults, so tests stay short."""

    #: NATS: seconds before an unacknowledged delivery is sent again.
    ack_wait: float = 30.0
    #: Redis: milliseconds a pending entry waits before the claiming subscriber takes it.
    claim_idle_ms: int = 300
    #: RabbitMQ prefetch, NATS fetch size.
    prefetch: int = 4


class Kit(Protocol):
    name: BrokerName
    url: str
    settings: Settings

    def broker(self, middlewares: Sequence[Any] = ()) -> Any: ...

    def subscribe(
        self, broker: Any, function: SubscriberFunction, channel: str, *, consumer: str
    ) -> None: ...

    async def declare(self, channel: str) -> None: ...

    async def publish(self, channel: str, bodies: Sequence[bytes]) -> None: ...

    async def backlog(self, channel: str) -> Backlog: ...

    async def attempt(self, message: StreamMessage[Any]) -> int: ...

    async def remove(self, channel: str) -> None: ...

    async def reachable(self) -> None: ...


@dataclass
class RabbitKit:
    """A durable classic queue with a dead-letter queue for rejected messages."""

    url: str
    settings: Settings = field(default_factory=Settings)
    name: BrokerName = "rabbit"

    @staticmethod
    def arguments(channel: str) -> dict[str, Any]:
        return {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{channel}.dead"}

    def broker(self, middlewares: Sequence[Any] = ()) -> RabbitBroker:
        return RabbitBroker(self.url, middlewares=middlewares)

    def subscribe(
        self, broker: Any, function: SubscriberFunction, channel: str, *, consumer: str
    ) -> None:
        queue = RabbitQueue(channel, durable=True, arguments=self.arguments(channel))
        broker.subscriber(queue, channel=Channel(prefetch_count=self.settings.prefetch))(function)

    async def _channel(self) -> tuple[aio_pika.abc.AbstractConnection, Any]:
        connection = await aio_pika.connect(self.url, timeout=10)
        return connection, await connection.channel()

    async def declare(self, channel: str) -> None:
        connection, chan = await self._channel()
        async with connection:
            await chan.declare_queue(f"{channel}.dead", durable=True)
            await chan.declare_queue(channel, durable=True, arguments=self.arguments(channel))

    async def publish(self, channel: str, bodies: Sequence[bytes]) -> None:
        connection, chan = await self._channel()
        async with connection:
            for at in range(0, len(bodies), 100):
                await asyncio.gather(
                    *(
                        chan.default_exchange.publish(
                            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                            routing_key=channel,
                        )
                        for body in bodies[at : at + 100]
                    )
                )

    async def backlog(self, channel: str) -> Backlog:
        """Ready messages; a message delivered to a live consumer and not acknowledged counts
        only once its consumer is gone (AMQP reports ready messages alone)."""
        connection, chan = await self._channel()
        async with connection:
            queue = await chan.declare_queue(channel, passive=True)
            dead = await chan.declare_queue(f"{channel}.dead", passive=True)
            waiting = queue.declaration_result.message_count or 0
            rejected = dead.declaration_result.message_count or 0
        return Backlog(waiting=waiting, unacked=0, rejected=rejected)

    async def attempt(self, message: StreamMessage[Any]) -> int:
        return 2 if message.raw_message.redelivered else 1

    async def remove(self, channel: str) -> None:
        connection, chan = await self._channel()
        async with connection:
            await chan.queue_delete(channel)
            await chan.queue_delete(f"{channel}.dead")

    async def reachable(self) -> None:
        connection, _ = await self._channel()
        await connection.close()


@dataclass
class NatsKit:
    """A JetStream stream with one durable pull consumer that every worker shares."""

    url: str
    settings: Settings = field(default_factory=Settings)
    name: BrokerName = "nats"

    @staticmethod
    def _names(channel: str) -> tuple[str, str]:
        """(stream, subject): NATS names cannot hold dots where a stream name is wanted."""
        return channel, f"{channel}.events"

    def _consumer_config(self, subject: str) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=GROUP,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.settings.ack_wait,
            max_deliver=-1,
            filter_subject=subject,
        )

    def broker(self, middlewares: Sequence[Any] = ()) -> NatsBroker:
        return NatsBroker(self.url, middlewares=middlewares)

    def subscribe(
        self, broker: Any, function: SubscriberFunction, channel: str, *, consumer: str
    ) -> None:
        stream, subject = self._names(channel)
        broker.subscriber(
            subject,
            stream=JStream(stream, declare=False),
            durable=GROUP,
            config=self._consumer_config(subject),
            pull_sub=PullSub(batch_size=self.settings.prefetch, timeout=0.5),
        )(function)

    async def _js(self) -> tuple[Any, Any]:
        connection = await nats.connect(self.url, connect_timeout=5, max_reconnect_attempts=0)
        return connection, connection.jetstream()

    async def declare(self, channel: str) -> None:
        stream, subject = self._names(channel)
        connection, js = await self._js()
        try:
            await js.add_stream(name=stream, subjects=[subject])
            await js.add_consumer(stream, self._consumer_config(subject))
        finally:
            await connection.close()

    async def publish(self, channel: str, bodies: Sequence[bytes]) -> None:
        _, subject = self._names(channel)
        connection, js = await self._js()
        try:
            for at in range(0, len(bodies), 100):
                await asyncio.gather(*(js.publish(subject, body) for body in bodies[at : at + 100]))
        finally:
            await connection.close()

    async def backlog(self, channel: str) -> Backlog:
        stream, _ = self._names(channel)
        connection, js = await self._js()
        try:
            info = await js.consumer_info(stream, GROUP)
        finally:
            await connection.close()
        return Backlog(waiting=info.num_pending or 0, unacked=info.num_ack_pending or 0)

    async def attempt(self, message: StreamMessage[Any]) -> int:
        return int(message.raw_message.metadata.num_delivered)

    async def remove(self, channel: str) -> None:
        stream, _ = self._names(channel)
        connection, js = await self._js()
        try:
            await js.delete_stream(stream)
        finally:
            await connection.close()

    async def reachable(self) -> None:
        connection, js = await self._js()
        try:
            await js.account_info()  # fails unless JetStream is enabled
        finally:
            await connection.close()


@dataclass
class RedisKit:
    """A Redis stream read by one consumer group: each worker reads new entries, and a second
    subscriber of the same worker claims entries left pending (XAUTOCLAIM) for longer than
    ``claim_idle_ms``: that is how a nacked entry, or a dead worker's, is delivered again."""

    url: str
    settings: Settings = field(default_factory=Settings)
    name: BrokerName = "redis"

    def broker(self, middlewares: Sequence[Any] = ()) -> RedisBroker:
        return RedisBroker(self.url, middlewares=middlewares)

    def subscribe(
        self, broker: Any, function: SubscriberFunction, channel: str, *, consumer: str
    ) -> None:
        broker.subscriber(
            stream=StreamSub(
                channel,
                group=GROUP,
                consumer=consumer,
                max_records=self.settings.prefetch,
                last_id=">",
                polling_interval=100,
            )
        )(function)
        broker.subscriber(
            stream=StreamSub(
                channel,
                group=GROUP,
                consumer=consumer,
                min_idle_time=self.settings.claim_idle_ms,
                last_id=">",
                polling_interval=100,
            )
        )(function)

    def _client(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.url, socket_connect_timeout=5)

    async def declare(self, channel: str) -> None:
        client = self._client()
        try:
            await client.xgroup_create(channel, GROUP, id="0", mkstream=True)
        finally:
            await client.aclose()

    async def publish(self, channel: str, bodies: Sequence[bytes]) -> None:
        publisher = RedisBroker(self.url)
        async with publisher:
            await publisher.connect()
            for at in range(0, len(bodies), 100):
                await asyncio.gather(
                    *(publisher.publish(body, stream=channel) for body in bodies[at : at + 100])
                )

    async def backlog(self, channel: str) -> Backlog:
        client = self._client()
        try:
            pending = await client.xpending(channel, GROUP)
            groups = await client.xinfo_groups(channel)
        finally:
            await client.aclose()
        lag = next(int(g.get("lag") or 0) for g in groups if g["name"] == GROUP.encode())
        return Backlog(waiting=lag, unacked=int(pending["pending"]))

    async def attempt(self, message: StreamMessage[Any]) -> int:
        """The entry's delivery count in the group's pending list (XPENDING)."""
        raw = message.raw_message
        entry = raw["message_ids"][0]
        client = self._client()
        try:
            found = await client.xpending_range(raw["channel"], GROUP, entry, entry, 1)
        except ResponseError:  # read without the group: never pending
            found = []
        finally:
            await client.aclose()
        return int(found[0]["times_delivered"]) if found else 1

    async def remove(self, channel: str) -> None:
        client = self._client()
        try:
            await client.delete(channel)
        finally:
            await client.aclose()

    async def reachable(self) -> None:
        client = self._client()
        try:
            await client.ping()
        finally:
            await client.aclose()


def make_kit(name: BrokerName, url: str | None = None, settings: Settings | None = None) -> Kit:
    kinds: dict[BrokerName, type[RabbitKit | NatsKit | RedisKit]] = {
        "rabbit": RabbitKit,
        "nats": NatsKit,
        "redis": RedisKit,
    }
    return kinds[name](url or broker_url(name), settings or Settings())


# -- what a consumer saw --------------------------------------------------------------------------


@dataclass
class Delivery:
    """One delivery of a message to the subscriber, and how the subscriber settled it."""

    event_id: str | None
    attempt: int
    #: "ACKED", "NACKED", "REJECTED", or None if the message was left unsettled.
    settled: str | None = None
    #: The name of the exception the subscriber raised to FastStream, if any.
    error: str | None = None


def event_id_of(body: bytes) -> str | None:
    with suppress(ValueError, TypeError, AttributeError):
        found = json.loads(body).get("id")
        return str(found) if found is not None else None
    return None


def recorder(
    kit: Kit, on_delivery: Callable[[Delivery], None], on_settled: Callable[[Delivery], None]
) -> type[BaseMiddleware]:
    """A FastStream middleware class that reports each delivery (with the broker's own count of
    its attempts) before the subscriber runs, and the settlement after it."""

    class Recorder(BaseMiddleware):
        async def consume_scope(self, call_next: Any, msg: StreamMessage[Any]) -> Any:
            delivery = Delivery(event_id_of(msg.body), await kit.attempt(msg))
            on_delivery(delivery)
            try:
                return await call_next(msg)
            except Exception as exc:
                delivery.error = type(exc).__name__
                raise
            finally:
                delivery.settled = msg.committed.value if msg.committed else None
                on_settled(delivery)

    return Recorder


@dataclass
class Deliveries:
    """Every delivery a test's subscriber saw, in order."""

    seen: list[Delivery] = field(default_factory=list)

    def middleware(self, kit: Kit) -> type[BaseMiddleware]:
        return recorder(kit, self.seen.append, lambda _: None)

    def of(self, event_id: object) -> list[Delivery]:
        return [d for d in self.seen if d.event_id == str(event_id)]

    def __iter__(self) -> Iterator[Delivery]:
        return iter(self.seen)

    async def until(self, condition: Callable[[], bool], seconds: float = 10.0) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > deadline:
                listed = [(d.event_id, d.attempt, d.settled) for d in self.seen]
                msg = f"not reached within {seconds} s; deliveries: {listed}"
                raise TimeoutError(msg)
            await asyncio.sleep(0.02)
