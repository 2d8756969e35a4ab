"""An order service: FastStream on RabbitMQ, causal ordering and exactly-once writes by
ordering-sql, OpenTelemetry metrics for Prometheus.

::

    python examples/service/service.py            # Ctrl-C (SIGINT) or SIGTERM stops it

It consumes order events (``ReceivedEvent`` JSON) from a RabbitMQ queue, jumbled and with
duplicates as they come, and writes one row per event into the ``orders`` table, in the same
transaction as the ordering's completion of the event (``ordered(..., exactly_once=True)``):
each event's row is written once, after the row of the event it follows. Followers that came
early are parked and replayed after their leader; a sweep hands back the lost ones.

Metrics: the engine's (``ordering_sql_*``) and the service's own count of messages by how they
were settled (``orders_service_messages_total{settled=...}``), at
``http://127.0.0.1:9464/metrics``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import shop
from faststream import BaseMiddleware, FastStream, StreamMessage
from faststream.rabbit import Channel, RabbitBroker
from opentelemetry import metrics
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from prometheus_client import start_http_server
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from ordering_sql import CausalOrdering, ReceivedEvent, dispose_engines, migrate
from ordering_sql.faststream import ordered
from ordering_sql.settings import mask_url, normalize_url

logger = logging.getLogger("orders_service")

#: Seconds. The SDK's default buckets (0, 5, 10, ... 10000) suit milliseconds; the engine
#: reports its histograms in seconds, where a step takes about a millisecond.
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)

_messages = metrics.get_meter("orders_service").create_counter(
    "orders_service.messages", "{message}", "Messages consumed, by how they were settled"
)


class CountSettlements(BaseMiddleware):
    """Counts each delivered message by how the subscriber settled it: ``acked`` (handled,
    parked, or a duplicate), ``nacked`` (redelivered: held by another handling right now, or
    the handler failed), ``rejected`` (not an event), ``unsettled``."""

    async def consume_scope(self, call_next: Any, msg: StreamMessage[Any]) -> Any:
        try:
            return await call_next(msg)
        finally:
            settled = msg.committed.value.lower() if msg.committed else "unsettled"
            _messages.add(1, {"settled": settled})


def serve_metrics(host: str, port: int) -> tuple[MeterProvider, Any]:
    """Install the OpenTelemetry SDK with a Prometheus reader and serve it over HTTP; the SDK
    and the HTTP server, to shut down."""
    views = [
        View(
            instrument_name="ordering_sql.step.duration",
            aggregation=ExplicitBucketHistogramAggregation(STEP_BUCKETS),
        ),
        View(
            instrument_name="ordering_sql.follower.wait.duration",
            aggregation=ExplicitBucketHistogramAggregation(WAIT_BUCKETS),
        ),
    ]
    provider = MeterProvider(
        metric_readers=[PrometheusMetricReader()],
        resource=Resource.create({"service.name": "orders-service"}),
        views=views,
    )
    metrics.set_meter_provider(provider)
    server, _thread = start_http_server(port, addr=host)
    return provider, server


def build(args: argparse.Namespace) -> FastStream:
    """The FastStream application: the broker, the ordered subscriber, and a lifespan that
    prepares the database and sweeps lost followers."""
    url = shop.database_url(args.database_url)
    amqp = shop.rabbitmq_url(args.rabbitmq_url)
    ordering: CausalOrdering[ReceivedEvent] = CausalOrdering(args.scope, database_url=url)
    orders = ordered(ordering, exactly_once=True)
    broker = RabbitBroker(amqp, middlewares=[CountSettlements], log_level=logging.DEBUG)

    @broker.subscriber(shop.queue(args.queue), channel=Channel(prefetch_count=args.prefetch))
    @orders
    async def on_order_event(event: ReceivedEvent, *, conn: AsyncConnection) -> None:
        # Runs once the event it follows was handled; commits with the event's completion.
        await conn.execute(
            insert(shop.orders).values(
                order_id=event.resource.id,
                step=event.event.removeprefix("order."),
                event_id=str(event.id),
                follows=None if event.follows is None else str(event.follows),
            )
        )

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        await migrate(url)  # the ordering's tables; a no-op once done
        engine = create_async_engine(normalize_url(url))
        try:
            async with engine.begin() as conn:
                await conn.run_sync(shop.metadata.create_all)  # the service's own table
            await ordering.check()
            logger.info("database %s, scope %r", mask_url(url), args.scope)
            try:
                async with orders.sweeping(every=args.sweep_every):
                    yield
            finally:
                await ordering.close()
                async with engine.connect() as conn:
                    rows = await conn.scalar(select(func.count()).select_from(shop.orders))
                logger.info("stopped; the orders table holds %s rows", rows)
        finally:
            await engine.dispose()
            await dispose_engines()

    app = FastStream(broker, lifespan=lifespan)

    @app.after_startup
    async def consuming() -> None:
        # Only the dead-letter queue: FastStream caches a queue declared through the broker on
        # the broker's default channel, and a subscriber that starts after that consumes there,
        # without its own channel's prefetch limit.
        await broker.declare_queue(shop.dead_letter_queue(args.queue))
        logger.info("consuming queue %r on %s", args.queue, mask_url(amqp))

    return app


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--database-url",
        help=f"the database of the ordering and of the orders table "
        f"(default: ${shop.DATABASE_URL_ENV}, else {shop.DEFAULT_DATABASE_URL})",
    )
    parser.add_argument(
        "--rabbitmq-url",
        help=f"default: ${shop.RABBITMQ_URL_ENV}, else {mask_url(shop.DEFAULT_RABBITMQ_URL)}",
    )
    parser.add_argument("--queue", default=shop.DEFAULT_QUEUE, help="default: %(default)s")
    parser.add_argument("--scope", default="orders", help="the ordering's scope (%(default)s)")
    parser.add_argument(
        "--prefetch",
        type=int,
        default=10,
        help="messages handled at once (RabbitMQ prefetch count; default %(default)s)",
    )
    parser.add_argument(
        "--sweep-every",
        type=float,
        default=60.0,
        help="seconds between sweeps for lost followers (default %(default)s)",
    )
    parser.add_argument(
        "--metrics-host", default="127.0.0.1", help="address of /metrics (%(default)s)"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("METRICS_PORT", "9464")),
        help="port of /metrics (default: $METRICS_PORT, else 9464)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log each event's handling")
    return parser.parse_args(argv)


async def main(args: argparse.Namespace) -> None:
    provider, server = serve_metrics(args.metrics_host, args.metrics_port)
    logger.info("metrics at http://%s:%s/metrics", args.metrics_host, args.metrics_port)
    try:
        await build(args).run()  # until SIGINT or SIGTERM
    finally:
        server.shutdown()
        server.server_close()
        provider.shutdown()


if __name__ == "__main__":
    arguments = parse()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    )
    # The engine logs each parked event at INFO: with -v, see them (and each settled message).
    engine_level = logging.DEBUG if arguments.verbose else logging.WARNING
    logging.getLogger("ordering_sql").setLevel(engine_level)
    asyncio.run(main(arguments))
