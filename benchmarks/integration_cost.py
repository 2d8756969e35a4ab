"""What the FastStream integration and the telemetry cost per event, on SQLite.

::

    python benchmarks/integration_cost.py [--events 2000] [--repeat 3] [--rabbitmq-url URL]

The same stream each time: ``--events`` events in chains of 5 (each follows the one before),
delivered in order, one at a time, as ``ReceivedEvent`` JSON bodies; every run on a fresh
SQLite file (``synchronous=FULL``, the default). The variants:

* ``loop``: the engine alone, ``preceding_event_confirmed`` in a plain loop over the bodies
  (parsing each, as a consumer would);
* ``rabbit, plain``: a plain FastStream subscriber on RabbitMQ that only parses the body: the
  broker's and FastStream's own cost (prefetch 1: one message at a time, in order);
* ``rabbit, engine by hand``: the same subscriber calling ``preceding_event_confirmed`` itself;
* ``rabbit, ordered``: ``@ordered(ordering)`` on RabbitMQ, prefetch 1.

Telemetry ``off``: no OpenTelemetry SDK (the API's no-ops); ``on``: the SDK's MeterProvider
with an in-memory reader and a TracerProvider with a BatchSpanProcessor to an in-memory
exporter. A provider cannot be uninstalled, so each run is a process of its own (this script
again, with ``--run``), after a warm-up of its own. The runs go round the variants ``--repeat``
times, so that load from elsewhere on the machine falls on every variant alike; each variant's
median is reported, with the spread of its runs. RabbitMQ variants are skipped if the broker
cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import aio_pika
from faststream.rabbit import Channel, RabbitBroker, RabbitQueue
from faststream.rabbit.annotations import RabbitMessage

from ordering_sql import CausalOrdering, EventArrivedEarly, ReceivedEvent, dispose_engines
from ordering_sql.faststream import ordered

CHAIN = 5
WARM_UP = 200
VARIANTS: dict[str, str] = {
    "loop": "engine alone, plain loop",
    "rabbit-plain": "RabbitMQ, plain subscriber (parse only)",
    "rabbit-manual": "RabbitMQ, plain subscriber + engine by hand",
    "rabbit-ordered": "RabbitMQ, @ordered(ordering)",
}
#: (variant, telemetry) in the order they run and are printed.
PLAN = [
    ("loop", "off"),
    ("loop", "on"),
    ("rabbit-plain", "off"),
    ("rabbit-manual", "off"),
    ("rabbit-ordered", "off"),
    ("rabbit-ordered", "on"),
]


def bodies(events: int) -> list[bytes]:
    """``events`` events in chains of ``CHAIN``, in order, as message bodies (no ``received``:
    the consumer stamps its own)."""
    start = datetime.now(UTC)
    found: list[bytes] = []
    leader: ReceivedEvent | None = None
    for n in range(events):
        event = ReceivedEvent(
            occurred=start + timedelta(milliseconds=n),
            event="bench.step",
            resource={"prefect.resource.id": f"chain.{n // CHAIN}"},
            follows=None if n % CHAIN == 0 or leader is None else leader.id,
        )
        found.append(event.model_dump_json(exclude={"received"}).encode())
        leader = event
    return found


def install_telemetry() -> None:
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(InMemorySpanExporter()))
    trace.set_tracer_provider(tracer_provider)


async def nothing(_event: Any, _depth: int = 0) -> None:
    return None


# -- one run of each variant: the seconds its events took ------------------------------------


async def run_loop(ordering: CausalOrdering[ReceivedEvent], messages: list[bytes], _: str) -> float:
    began = time.perf_counter()
    for body in messages:
        event = ReceivedEvent.model_validate_json(body)
        async with ordering.preceding_event_confirmed(nothing, event):
            pass
    return time.perf_counter() - began


Subscribe = Callable[[RabbitBroker, RabbitQueue, Callable[[], None]], None]


async def consume_on_rabbit(url: str, messages: list[bytes], subscribe: Subscribe) -> float:
    """Publish ``messages`` to a fresh queue, then time a prefetch-1 consumer through them."""
    # Deleted below; one left behind by a crash expires after ten minutes unused.
    name = f"ordering-sql-bench-{uuid4().hex[:12]}"
    queue = RabbitQueue(name, durable=False, arguments={"x-expires": 600_000})
    broker = RabbitBroker(url, log_level=0)
    done = asyncio.Event()
    handled = 0

    def one() -> None:
        nonlocal handled
        handled += 1
        if handled == len(messages):
            done.set()

    subscribe(broker, queue, one)
    try:
        # Declared and filled by a broker of its own: a queue declared through the consuming
        # broker is cached on its default channel, and the subscriber would consume there,
        # without its channel's prefetch limit.
        async with RabbitBroker(url, log_level=0) as publisher:
            await publisher.connect()
            await publisher.declare_queue(queue)
            for body in messages:  # one after another: concurrent publishes may be reordered
                await publisher.publish(body, queue.name)
        async with broker:
            began = time.perf_counter()
            await broker.start()
            await asyncio.wait_for(done.wait(), 600)
            took = time.perf_counter() - began
    finally:
        connection = await aio_pika.connect(url)
        async with connection:
            await (await connection.channel()).queue_delete(name)
    return took


async def run_rabbit_plain(
    _ordering: CausalOrdering[ReceivedEvent], messages: list[bytes], url: str
) -> float:
    def subscribe(broker: RabbitBroker, queue: RabbitQueue, one: Callable[[], None]) -> None:
        @broker.subscriber(queue, channel=Channel(prefetch_count=1))
        async def plain(message: RabbitMessage) -> None:
            ReceivedEvent.model_validate_json(message.body)
            one()

    return await consume_on_rabbit(url, messages, subscribe)


async def run_rabbit_manual(
    ordering: CausalOrdering[ReceivedEvent], messages: list[bytes], url: str
) -> float:
    def subscribe(broker: RabbitBroker, queue: RabbitQueue, one: Callable[[], None]) -> None:
        @broker.subscriber(queue, channel=Channel(prefetch_count=1))
        async def by_hand(message: RabbitMessage) -> None:
            event = ReceivedEvent.model_validate_json(message.body)
            try:
                async with ordering.preceding_event_confirmed(nothing, event):
                    one()
            except EventArrivedEarly:
                early.append(event)
                one()

    early: list[ReceivedEvent] = []
    took = await consume_on_rabbit(url, messages, subscribe)
    if early:  # the comparison holds for events in order only
        sys.exit(f"{len(early)} events came before their leader")
    return took


async def run_rabbit_ordered(
    ordering: CausalOrdering[ReceivedEvent], messages: list[bytes], url: str
) -> float:
    def subscribe(broker: RabbitBroker, queue: RabbitQueue, one: Callable[[], None]) -> None:
        @broker.subscriber(queue, channel=Channel(prefetch_count=1))
        @ordered(ordering)
        async def on_event(_event: ReceivedEvent) -> None:
            one()

    return await consume_on_rabbit(url, messages, subscribe)


RUNNERS = {
    "loop": run_loop,
    "rabbit-manual": run_rabbit_manual,
    "rabbit-plain": run_rabbit_plain,
    "rabbit-ordered": run_rabbit_ordered,
}


async def measure(variant: str, events: int, repeat: int, url: str) -> list[float]:
    """Seconds per run: a warm-up of ``WARM_UP`` events, then ``repeat`` runs, each on a new
    SQLite file."""
    runner = RUNNERS[variant]
    times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="ordering-sql-cost-") as folder:
        for run in range(repeat + 1):
            database = f"sqlite+aiosqlite:///{Path(folder) / f'run{run}.db'}"
            ordering: CausalOrdering[ReceivedEvent] = CausalOrdering("bench", database_url=database)
            await ordering.check()  # creates and migrates the file, outside the timing
            took = await runner(ordering, bodies(WARM_UP if run == 0 else events), url)
            if run:
                times.append(took)
            await ordering.close()
            await dispose_engines()
    return times


def run_child(args: argparse.Namespace) -> None:
    if args.telemetry == "on":
        install_telemetry()
    times = asyncio.run(measure(args.run, args.events, args.repeat, args.rabbitmq_url))
    print(json.dumps({"variant": args.run, "telemetry": args.telemetry, "seconds": times}))


async def rabbit_reachable(url: str) -> str | None:
    broker = RabbitBroker(url, log_level=0)
    try:
        async with broker:
            await asyncio.wait_for(broker.connect(), 10)
    except Exception as exc:
        return repr(exc)
    return None


def run_once(variant: str, telemetry: str, args: argparse.Namespace) -> float:
    """One run of ``variant`` in a process of its own: its seconds."""
    child = subprocess.run(
        [
            sys.executable,
            __file__,
            *("--run", variant, "--telemetry", telemetry),
            *("--events", str(args.events), "--repeat", "1"),
            *("--rabbitmq-url", args.rabbitmq_url),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if child.returncode != 0:
        sys.exit(f"{variant} failed:\n{child.stderr}")
    seconds: list[float] = json.loads(child.stdout.strip().splitlines()[-1])["seconds"]
    return seconds[0]


def main(args: argparse.Namespace) -> None:
    unreachable = asyncio.run(rabbit_reachable(args.rabbitmq_url))
    if unreachable:
        print(f"RabbitMQ unreachable ({unreachable}): its variants are skipped", file=sys.stderr)
    plan = [(v, t) for v, t in PLAN if not (v.startswith("rabbit") and unreachable)]
    runs: dict[tuple[str, str], list[float]] = {key: [] for key in plan}
    for round_ in range(1, args.repeat + 1):
        print(f"round {round_} of {args.repeat}...", file=sys.stderr, flush=True)
        for variant, telemetry in plan:
            runs[(variant, telemetry)].append(run_once(variant, telemetry, args))

    def us(seconds: float) -> float:
        return float(seconds / args.events * 1e6)

    per_event = {key: us(statistics.median(times)) for key, times in runs.items()}
    base = per_event[("loop", "off")]
    print(
        f"\n{args.events} events in chains of {CHAIN}, in order, one at a time, SQLite "
        f"(synchronous=FULL); median of {args.repeat} runs, each in a process of its own\n"
    )
    print("| variant | telemetry | events/s | µs per event (runs) | vs the plain loop |")
    print("|---|---|---|---|---|")
    for (variant, telemetry), times in runs.items():
        spread = ", ".join(f"{us(t):,.0f}" for t in sorted(times))
        print(
            f"| {VARIANTS[variant]} | {telemetry} | {args.events / statistics.median(times):,.0f} "
            f"| {per_event[(variant, telemetry)]:,.0f} ({spread}) "
            f"| {per_event[(variant, telemetry)] - base:+,.0f} µs |"
        )

    def diff(a: tuple[str, str], b: tuple[str, str]) -> str:
        if a not in per_event or b not in per_event:
            return "-"
        return f"{per_event[a] - per_event[b]:+,.0f} µs per event"

    print()
    print(f"telemetry on, engine alone (loop): {diff(('loop', 'on'), ('loop', 'off'))}")
    on_rabbit = diff(("rabbit-ordered", "on"), ("rabbit-ordered", "off"))
    print(f"telemetry on, @ordered on RabbitMQ: {on_rabbit}")
    over_loop = diff(("rabbit-ordered", "off"), ("loop", "off"))
    print(f"@ordered on RabbitMQ over the plain loop: {over_loop}")
    if ("rabbit-plain", "off") in per_event:
        plain = per_event[("rabbit-plain", "off")]
        print(f"the broker and FastStream alone (plain subscriber): {plain:,.0f} µs per event")
    by_hand = diff(("rabbit-ordered", "off"), ("rabbit-manual", "off"))
    print(f"the decorator itself (@ordered - engine by hand, both on RabbitMQ): {by_hand}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=2000, help="default %(default)s")
    parser.add_argument("--repeat", type=int, default=3, help="default %(default)s")
    parser.add_argument(
        "--rabbitmq-url", default="amqp://guest:guest@127.0.0.1:5672/", help="default: %(default)s"
    )
    parser.add_argument("--run", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--telemetry", choices=("on", "off"), default="off", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse()
    if arguments.run:
        run_child(arguments)
    else:
        main(arguments)
