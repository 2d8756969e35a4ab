"""A FastStream consumer in its own OS process, driven by ``test_kill.py``.

Usage: ``python -m tests.brokers._consumer SPEC.json`` (from the repository root).

It subscribes an ``ordering_sql.faststream.ordered`` function to the test's channel on one
broker (``tests.brokers.support``: a RabbitMQ queue, a JetStream durable pull consumer, or a
Redis stream consumer group with its claiming subscriber), sweeps lost followers every
``sweep_every`` seconds, creates ``ready_file`` once it consumes, and runs until SIGTERM.

The function logs its body as ``ordering_sql.tools.simulation`` workers do (``start`` and
``end`` records on the machine-wide monotonic clock, read back by ``simulation.check``) and,
with ``exactly_once``, writes one ``effects.EFFECTS`` row per handling on the connection it
is given. A FastStream middleware logs each delivery (``deliver``, with the broker's count of
the attempt) and how it was settled (``ack``, ``nack``, ``reject``, or ``unsettled``).
``stop_at_body``: the process stops itself (SIGSTOP) inside that body (1 is the first), with
its lease and transaction open, for the test to SIGKILL it there.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy.ext.asyncio import AsyncConnection

from ordering_sql import CausalOrdering, ReceivedEvent, dispose_engines
from ordering_sql.faststream import ordered
from ordering_sql.tools.effects import Effects
from ordering_sql.tools.simulation import HandledLog, handler_body
from tests.brokers.support import BrokerName, Delivery, Settings, make_kit, recorder

SETTLED_AS = {"ACKED": "ack", "NACKED": "nack", "REJECTED": "reject", None: "unsettled"}


class ConsumerSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    broker: BrokerName
    url: str
    channel: str
    settings: Settings
    database_url: str
    scope: str
    log: Path
    worker: str
    ready_file: Path
    exactly_once: bool = True
    work_seconds: float = 0.002
    lease_timeout: float = 2.0
    claim_timeout: float = 3.0
    retry_delay: float = 0.05
    sweep_every: float = 0.5
    stop_at_body: int | None = None


async def run(spec: ConsumerSpec) -> None:
    ordering: CausalOrdering[ReceivedEvent] = CausalOrdering(
        spec.scope,
        database_url=spec.database_url,
        lease_timeout=spec.lease_timeout,
        claim_timeout=spec.claim_timeout,
    )
    kit = make_kit(spec.broker, spec.url, spec.settings)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    with spec.log.open("a") as sink:
        log = HandledLog(sink, spec.worker)
        body = handler_body(log, work_seconds=spec.work_seconds, stop_at_body=spec.stop_at_body)

        async def with_effects(event: ReceivedEvent, *, conn: AsyncConnection) -> None:
            await body(event)
            await Effects().write(conn, event, spec.worker)

        def delivered(delivery: Delivery) -> None:
            if delivery.event_id is not None:
                log.write("deliver", delivery.event_id, attempt=delivery.attempt)

        def settled(delivery: Delivery) -> None:
            if delivery.event_id is not None:
                log.write(SETTLED_AS[delivery.settled], delivery.event_id, error=delivery.error)

        orders = ordered(ordering, exactly_once=spec.exactly_once, retry_delay=spec.retry_delay)
        function: Any = with_effects if spec.exactly_once else body
        broker = kit.broker(middlewares=[recorder(kit, delivered, settled)])
        kit.subscribe(broker, orders(function), spec.channel, consumer=spec.worker)
        try:
            await ordering.check()
            async with broker:
                await broker.start()
                async with orders.sweeping(every=spec.sweep_every):
                    spec.ready_file.touch()
                    await stop.wait()
        finally:
            await ordering.close()
            await dispose_engines()


def main() -> None:
    spec = ConsumerSpec.model_validate_json(Path(sys.argv[1]).read_text())
    asyncio.run(run(spec))


if __name__ == "__main__":
    main()
