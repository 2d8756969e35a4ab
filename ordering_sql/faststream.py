"""Causal ordering for FastStream subscribers: ``@ordered(ordering)`` under ``@broker.subscriber``.

::

    ordering = CausalOrdering("orders")

    @broker.subscriber("orders")
    @ordered(ordering)
    async def on_order(event: ReceivedEvent) -> None:
        ...  # runs once the event's leader was handled; its followers are replayed after it

The message body is the event (``ordering.event_type`` as JSON, ``ReceivedEvent`` by default;
``event_from`` reads another shape). Every outcome settles the message with the broker:

====================================================  ========================================
outcome                                               message
====================================================  ========================================
handled (the function returned)                       ack
parked (``EventArrivedEarly``: stored durably)        ack
duplicate of an event already handled                 ack (the function does not run)
held by another worker now (``EventBeingProcessed``)  nack: redelivered
``LeaseLostError``, or the function raised            nack: redelivered (the error propagates)
the body is not an event, or cannot be ordered        reject: never redelivered
====================================================  ========================================

How each broker redelivers a nacked message: RabbitMQ requeues it (after ``retry_delay``, which
the consumer waits); NATS JetStream delivers it again after ``retry_delay`` (a delayed NAK);
a Redis stream keeps it pending in the consumer group, and a subscriber with ``min_idle_time``
(XAUTOCLAIM) on the same group delivers it again. A rejected message is dropped or
dead-lettered (RabbitMQ), terminated (NATS), or acknowledged (Redis, whose reject would leave it
pending for ever). The subscriber settles every message itself, whatever the subscriber's
``AckPolicy``; but only consumers that acknowledge can redeliver: a JetStream consumer, a
RabbitMQ queue, a Redis stream read by a consumer group (FastStream 0.7.8 or later); not
``AckPolicy.ACK_FIRST`` (refused with ``ConfigurationError``), NATS core subjects, or Redis
Pub/Sub and lists. One message is one event: batch subscribers are not supported.

Followers released by an event's completion run through the same function, after it; one that
fails stays stored and comes back from ``sweep_lost()`` (run it periodically: ``sweeping()``).
With ``exactly_once=True`` the function also gets ``conn``, the ``AsyncConnection`` of
``CausalOrdering.exactly_once``: what it writes there commits with the event's completion.

Needs the extra: ``pip install 'ordering-sql[faststream]'``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from datetime import timedelta
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any, Generic, Protocol, TypeAlias, TypeVar, cast

try:
    from faststream import Context, StreamMessage
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    msg = "ordering_sql.faststream needs FastStream: pip install 'ordering-sql[faststream]'"
    raise ImportError(msg) from exc
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncConnection

from ordering_sql.engine import CausalOrdering
from ordering_sql.errors import (
    ConfigurationError,
    EventArrivedEarly,
    EventBeingProcessed,
    LeaseLostError,
    MaxDepthExceeded,
)
from ordering_sql.models import EventLike, check_event, follows_something, stored_form

if TYPE_CHECKING:
    from faststream.nats.message import NatsMessage

__all__ = ["EffectsFunction", "EventFunction", "OrderedSubscriber", "ordered"]

logger = logging.getLogger(__name__)

E = TypeVar("E", bound=BaseModel)
E_contra = TypeVar("E_contra", bound=BaseModel, contravariant=True)

#: The message being consumed, as FastStream's dependency injection hands it to a subscriber.
_Message: TypeAlias = Annotated[StreamMessage[Any], Context("message")]

#: The default wait before a message is handed back for redelivery, in seconds.
RETRY_DELAY_S = 0.5


class EventFunction(Protocol[E_contra]):
    """The subscriber's own function: ``async def on_event(event) -> None``."""

    def __call__(self, event: E_contra, /) -> Awaitable[None]: ...


class EffectsFunction(Protocol[E_contra]):
    """The function with ``exactly_once=True``: ``async def on_event(event, *, conn) -> None``;
    what it writes on ``conn`` commits together with the event's completion."""

    def __call__(self, event: E_contra, /, *, conn: AsyncConnection) -> Awaitable[None]: ...


class _Outcome(Enum):
    HANDLED = "handled"
    PARKED = "parked"
    DUPLICATE = "duplicate"
    BUSY = "busy"
    LEASE_LOST = "lease_lost"


#: Outcomes whose message is acknowledged; the others are redelivered.
_SETTLED = frozenset({_Outcome.HANDLED, _Outcome.PARKED, _Outcome.DUPLICATE})


def _is_message_of(message: object, module: str, name: str) -> bool:
    """Whether ``message`` is FastStream's ``module.name``. A broker's message module is loaded
    whenever one of its messages exists, so a broker whose client is not installed is never
    imported here."""
    cls = getattr(sys.modules.get(module), name, None)
    return isinstance(cls, type) and isinstance(message, cls)


def _is_nats(message: object) -> bool:
    return _is_message_of(message, "faststream.nats.message", "NatsMessage")


def _is_redis_stream(message: object) -> bool:
    return _is_message_of(message, "faststream.redis.message", "RedisStreamMessage")


def _redis_can_settle(message: StreamMessage[Any]) -> bool:
    """Whether a Redis stream message acknowledges itself: it was read by a consumer group and
    carries its client (FastStream 0.7.8 and later), or it comes from FastStream's test broker
    (its stand-in client acknowledges nothing, and nothing is redelivered there anyway)."""
    consumer = getattr(message, "consumer", None)
    if consumer is None:
        return False
    stand_in = getattr(sys.modules.get("faststream.redis.message"), "FAKE_CONSUMER", None)
    return consumer is stand_in or getattr(message, "group", None) is not None


def _settled_already(message: StreamMessage[Any]) -> bool:
    """Whether the message was acknowledged before the subscriber ran (``AckPolicy.ACK_FIRST``):
    FastStream marks it so, except on RabbitMQ, where it consumes without acknowledgements
    and the client marks each delivered message processed as it arrives (a test broker's
    messages, which have no delivery tag, are marked so too, and are not refused)."""
    if message.committed is not None:
        return True
    if not _is_message_of(message, "faststream.rabbit.message", "RabbitMessage"):
        return False
    raw = message.raw_message
    return bool(raw.locked and raw.delivery_tag)


class OrderedSubscriber(Generic[E]):
    """Puts one FastStream subscriber function under ``ordering``; built by ``ordered()``.

    Used as a decorator below ``@broker.subscriber(...)``, it returns the function FastStream
    calls for each message. Keep the instance to sweep lost followers (``sweep_lost()``,
    ``sweeping()``): followers whose replay failed or whose worker died come back only that way,
    since their messages were acknowledged when they were parked.
    """

    def __init__(
        self,
        ordering: CausalOrdering[E],
        *,
        exactly_once: bool = False,
        event_from: Callable[[bytes], E] | None = None,
        retry_delay: float | timedelta = RETRY_DELAY_S,
    ) -> None:
        seconds = retry_delay.total_seconds() if isinstance(retry_delay, timedelta) else retry_delay
        if not isinstance(seconds, int | float) or not seconds >= 0:
            msg = f"retry_delay must be a duration of zero or more seconds, got {retry_delay!r}."
            raise ConfigurationError(msg)
        self.ordering = ordering
        self.exactly_once = exactly_once
        self.retry_delay = float(seconds)
        self._event_from = event_from or ordering.event_type.model_validate_json
        self._function: EventFunction[E] | EffectsFunction[E] | None = None

    def __call__(
        self, function: EventFunction[E] | EffectsFunction[E]
    ) -> Callable[[StreamMessage[Any]], Awaitable[None]]:
        """Returns the function to register with ``@broker.subscriber(...)``.

        It reads the event from the message, runs ``function`` under the ordering and settles
        the message (see the module's table). One function per instance: ``sweep_lost()``
        replays through it.
        """
        if self._function is not None and self._function is not function:
            msg = (
                f"This ordered() already wraps {self._function!r}; "
                f"use another ordered() for {function!r}."
            )
            raise ConfigurationError(msg)
        self._function = function

        async def consume(message: _Message) -> None:
            await self._consume(message)

        # FastStream names the subscriber and documents it after the function. No
        # ``__wrapped__``: FastStream would read the wrapped function's parameters instead.
        for attribute in ("__module__", "__name__", "__qualname__", "__doc__"):
            with suppress(AttributeError):
                setattr(consume, attribute, getattr(function, attribute))
        return consume

    # -- a message -----------------------------------------------------------------------------

    async def _consume(self, message: StreamMessage[Any]) -> None:
        if _is_redis_stream(message) and not _redis_can_settle(message):
            msg = (
                "A Redis stream message can be acknowledged and redelivered only when a "
                "consumer group reads it (StreamSub(..., group=..., consumer=...)), with "
                "FastStream 0.7.8 or later."
            )
            raise ConfigurationError(msg)
        if _settled_already(message):
            msg = (
                "The message was acknowledged before its event was handled, so it could not "
                "be redelivered; subscribe with an acknowledging policy, not AckPolicy.ACK_FIRST."
            )
            raise ConfigurationError(msg)
        try:
            event = self._event_from(message.body)
            # The engine's own checks, made here so that only they reject: an event that
            # cannot be ordered, or stored to wait for its leader, never will be.
            if follows_something(check_event(event)):
                stored_form(cast("EventLike", event))
        except Exception:
            await self._reject(message)
            raise
        try:
            outcome = await self._deliver(event)
        except Exception:
            await self._nack(message)
            raise
        logger.debug(
            "message %s: event %s %s",
            message.message_id,
            getattr(event, "id", None),
            outcome.value,
            extra={"action": "faststream_consume", "outcome": outcome.value},
        )
        if outcome in _SETTLED:
            await message.ack()
        else:
            await self._nack(message)

    async def _deliver(self, event: E) -> _Outcome:
        try:
            await self._run(event, 0)
        except EventArrivedEarly:
            return _Outcome.PARKED
        except EventBeingProcessed as refused:
            return _Outcome.DUPLICATE if refused.seen else _Outcome.BUSY
        except LeaseLostError as exc:
            logger.warning(
                "%s; the message is redelivered",
                exc,
                extra={"action": "faststream_consume", "outcome": _Outcome.LEASE_LOST.value},
            )
            return _Outcome.LEASE_LOST
        return _Outcome.HANDLED

    async def _nack(self, message: StreamMessage[Any]) -> None:
        if _is_nats(message):  # JetStream waits before it redelivers
            await cast("NatsMessage", message).nack(delay=self.retry_delay)
        elif _is_redis_stream(message):  # stays pending: a claiming subscriber redelivers it
            await message.nack()
        else:  # RabbitMQ requeues at once: the wait keeps a busy event from spinning
            await asyncio.sleep(self.retry_delay)
            await message.nack()

    async def _reject(self, message: StreamMessage[Any]) -> None:
        if _is_redis_stream(message):  # a rejected stream entry would stay pending for ever
            await message.ack()
        else:
            await message.reject()

    # -- the ordering --------------------------------------------------------------------------

    async def _run(self, event: Any, depth: int) -> None:
        """``event`` through the function under the ordering; followers through ``_replay``."""
        function = self._function
        if function is None:  # pragma: no cover - consume() exists only once it is set
            msg = "ordered() was not applied to a function."
            raise ConfigurationError(msg)
        if self.exactly_once:
            async with self.ordering.exactly_once(self._replay, event, depth) as conn:
                await cast("EffectsFunction[E]", function)(event, conn=conn)
        else:
            async with self.ordering.preceding_event_confirmed(self._replay, event, depth):
                await cast("EventFunction[E]", function)(event)

    async def _replay(self, follower: Any, depth: int) -> None:
        """A follower released by its leader's completion. Its failure is not the leader's: the
        leader's message is acknowledged, and the follower, still stored, comes back from
        ``sweep_lost()`` once its claim expires."""
        try:
            await self._run(follower, depth)
        except (EventArrivedEarly, EventBeingProcessed, MaxDepthExceeded):
            raise  # the engine's own outcomes: it knows what follows from each
        except Exception:
            logger.error(
                "follower %s failed; get_lost_followers() hands it back once its claim expires",
                getattr(follower, "id", None),
                exc_info=True,
                extra={"action": "faststream_replay", "scope": self.ordering.scope},
            )

    # -- lost followers ------------------------------------------------------------------------

    async def sweep_lost(self) -> int:
        """Run the function on the lost followers (``CausalOrdering.get_lost_followers``).

        Returns how many were handled. One that fails, or is held elsewhere, is skipped: it
        comes back from a later sweep once its claim expires (``claim_timeout``).
        """
        handled = 0
        for follower in await self.ordering.get_lost_followers():
            try:
                await self._run(follower, 0)
            except (EventArrivedEarly, EventBeingProcessed):
                continue  # parked again, handled meanwhile, or held by another worker
            except Exception:
                logger.error(
                    "lost follower %s failed; a later sweep hands it back",
                    getattr(follower, "id", None),
                    exc_info=True,
                    extra={"action": "faststream_sweep", "scope": self.ordering.scope},
                )
                continue
            handled += 1
        return handled

    @asynccontextmanager
    async def sweeping(self, every: float | timedelta = 60.0) -> AsyncIterator[None]:
        """Run ``sweep_lost()`` at once and then ``every`` seconds while the block runs.

        For a FastStream application's lifespan::

            @asynccontextmanager
            async def lifespan() -> AsyncIterator[None]:
                async with orders.sweeping(every=60):  # orders = ordered(ordering)
                    yield

            app = FastStream(broker, lifespan=lifespan)

        A sweep that fails is logged and the next one goes on.
        """
        seconds = every.total_seconds() if isinstance(every, timedelta) else every
        if not seconds > 0:
            msg = f"every must be a positive duration, got {every!r}."
            raise ConfigurationError(msg)

        async def sweeps() -> None:
            while True:
                try:
                    await self.sweep_lost()
                except Exception:
                    logger.error(
                        "sweeping lost followers failed; the next sweep tries again",
                        exc_info=True,
                        extra={"action": "faststream_sweep", "scope": self.ordering.scope},
                    )
                await asyncio.sleep(seconds)

        task = asyncio.create_task(sweeps())
        try:
            yield
        finally:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task


def ordered(
    ordering: CausalOrdering[E],
    *,
    exactly_once: bool = False,
    event_from: Callable[[bytes], E] | None = None,
    retry_delay: float | timedelta = RETRY_DELAY_S,
) -> OrderedSubscriber[E]:
    """Put a FastStream subscriber function under ``ordering``: a decorator.

    ::

        @broker.subscriber("orders")
        @ordered(ordering)
        async def on_order(event: ReceivedEvent) -> None: ...

        @broker.subscriber("orders")
        @ordered(ordering, exactly_once=True)
        async def on_order(event: ReceivedEvent, *, conn: AsyncConnection) -> None:
            await conn.execute(orders.insert().values(...))  # commits with the completion

    Args:
        ordering: the ordering the events go through (its scope, database and durations).
        exactly_once: run the function inside ``ordering.exactly_once`` and pass it the
            transaction's connection as ``conn``.
        event_from: reads the event from the message body (bytes); default:
            ``ordering.event_type.model_validate_json``. An error from it rejects the message,
            as does an event that cannot be ordered (a naive datetime, say).
        retry_delay: seconds (or a ``timedelta``) before a message is redelivered: RabbitMQ
            and others wait that long before the nack, NATS JetStream delays its redelivery;
            on a Redis stream the claiming subscriber's ``min_idle_time`` decides instead.

    Returns:
        An ``OrderedSubscriber``: apply it to the function, keep it to sweep lost followers.
    """
    return OrderedSubscriber(
        ordering, exactly_once=exactly_once, event_from=event_from, retry_delay=retry_delay
    )
