"""Publish a jumbled stream of order events, with duplicates, to the example service's queue.

::

    python examples/service/publish.py --orders 200 --check

Each order is three events, ``order.placed`` -> ``order.paid`` -> ``order.shipped``, each
``follows`` the one before. The stream is shuffled, so many followers come before their leader,
and a share of the events is sent twice. The bodies are ``ReceivedEvent`` JSON without
``received``: the service stamps its own receipt time. ``--seed`` makes the stream, event ids
included, the same on every run (sent again within the ordering's 30 minutes of memory, every
message is a duplicate and nothing new is written).

``--check`` then waits until the service has written a row for every event and checks the
``orders`` table: every event written exactly once, each after the event it follows.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import shop
from faststream.rabbit import RabbitBroker
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from ordering_sql import ReceivedEvent
from ordering_sql.settings import mask_url, normalize_url


def order_stream(orders: int, *, seed: int, duplicates: float) -> list[ReceivedEvent]:
    """The messages to send, in the order to send them."""
    rng = random.Random(seed)
    start = datetime.now(UTC)
    events: list[ReceivedEvent] = []
    for n in range(1, orders + 1):
        leader: ReceivedEvent | None = None
        for k, step in enumerate(shop.STEPS):
            event = ReceivedEvent(
                occurred=start + timedelta(seconds=n, milliseconds=k),
                event=f"order.{step}",
                resource={"prefect.resource.id": f"order-{seed}-{n}"},
                payload={"order": n, "step": step},
                id=UUID(int=rng.getrandbits(128), version=4),
                follows=None if leader is None else leader.id,
            )
            events.append(event)
            leader = event
    messages = events + rng.sample(events, round(len(events) * duplicates))
    rng.shuffle(messages)
    return messages


def early(messages: Sequence[ReceivedEvent]) -> int:
    """Messages sent before the first message of the event they follow."""
    sent: set[UUID] = set()
    count = 0
    for event in messages:
        count += event.follows is not None and event.follows not in sent
        sent.add(event.id)
    return count


async def publish(broker: RabbitBroker, queue: str, messages: Sequence[ReceivedEvent]) -> None:
    """One after another, each confirmed by the broker before the next: messages published
    concurrently may reach the queue in another order than the one printed and saved."""
    for event in messages:
        await broker.publish(event.model_dump_json(exclude={"received"}), queue, persist=True)


def no_sqlite_file(url: str) -> bool:
    """Whether ``url`` is a SQLite file that does not exist (opening it would create it)."""
    parsed = normalize_url(url)
    database = parsed.database or ""
    on_disk = parsed.get_backend_name() == "sqlite" and database not in ("", ":memory:")
    return on_disk and not database.startswith("file:") and not Path(database).is_file()


async def wait_and_check(
    url: str, waiting: Callable[[], Awaitable[int]], events: Sequence[ReceivedEvent], seconds: float
) -> shop.Verdict | None:
    """Wait until every event has a row and no message waits in the queue (``waiting``), or
    ``seconds`` passed, then judge the table; None if the database has no orders table."""
    engine = create_async_engine(normalize_url(url))
    try:
        deadline = time.monotonic() + seconds
        while True:
            async with engine.connect() as conn:
                ready = await conn.run_sync(lambda c: inspect(c).has_table(shop.orders.name))
            verdict = await shop.check_orders(engine, events) if ready else None
            done = verdict is not None and verdict.complete and not await waiting()
            if done or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        if done:  # the last messages taken from the queue may still be in hand: let them finish
            await asyncio.sleep(1.0)
            verdict = await shop.check_orders(engine, events)
        return verdict
    finally:
        await engine.dispose()


async def main(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else random.randrange(10**6)
    messages = order_stream(args.orders, seed=seed, duplicates=args.duplicates)
    events = shop.distinct(messages)
    if args.save:
        args.save.write_text("".join(event.model_dump_json() + "\n" for event in messages))
    amqp = shop.rabbitmq_url(args.rabbitmq_url)
    url = shop.database_url(args.database_url)
    if args.check and no_sqlite_file(url):
        print(f"no database at {mask_url(url)}: start the service first", file=sys.stderr)
        return 1
    async with RabbitBroker(amqp, log_level=logging.DEBUG) as broker:
        queue = await broker.declare_queue(shop.queue(args.queue))
        await broker.declare_queue(shop.dead_letter_queue(args.queue))
        began = time.monotonic()
        await publish(broker, args.queue, messages)
        print(
            f"published {len(messages)} messages to {args.queue!r} on {mask_url(amqp)} in "
            f"{time.monotonic() - began:.1f} s: {len(events)} events of {args.orders} orders "
            f"(seed {seed}), {len(messages) - len(events)} duplicates, {early(messages)} sent "
            f"before the event they follow",
            flush=True,
        )
        if not args.check:
            return 0

        async def waiting() -> int:
            declared = await queue.declare()  # again: its reply counts the messages waiting
            return declared.message_count or 0

        verdict = await wait_and_check(url, waiting, events, args.timeout)
    if verdict is None:
        print(f"no orders table in {mask_url(url)}: start the service first", file=sys.stderr)
        return 1
    if not verdict.complete:
        print(
            f"after {args.timeout:g} s only {verdict.written} of {verdict.events} events have a "
            f"row in {mask_url(url)}: is the service running on this queue and database?",
            file=sys.stderr,
        )
    for order_id, steps in verdict.examples.items():
        print(f"  {order_id}: " + ", ".join(f"{step} (row {row})" for step, row in steps))
    print(("ok: " if verdict.ok else "FAILED: ") + verdict.summary())
    return 0 if verdict.ok else 1


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--orders", type=int, default=100, help="default %(default)s")
    parser.add_argument("--seed", type=int, help="default: a random one (printed)")
    parser.add_argument(
        "--duplicates",
        type=float,
        default=0.2,
        help="share of the events sent twice (default %(default)s)",
    )
    parser.add_argument("--queue", default=shop.DEFAULT_QUEUE, help="default: %(default)s")
    parser.add_argument(
        "--rabbitmq-url",
        help=f"default: ${shop.RABBITMQ_URL_ENV}, else {mask_url(shop.DEFAULT_RABBITMQ_URL)}",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="then wait for the service and check the orders table",
    )
    parser.add_argument(
        "--database-url",
        help=f"for --check: the service's database (default: ${shop.DATABASE_URL_ENV}, "
        f"else {shop.DEFAULT_DATABASE_URL})",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="for --check, seconds (%(default)s)"
    )
    parser.add_argument(
        "--save", type=Path, help="also write the messages sent, as JSON lines, to this file"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
