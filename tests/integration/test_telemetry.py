"""What the engine reports to OpenTelemetry, read back through the SDK's in-memory reader and
exporter, and checked against what the consumer saw (its handled log and its tally)."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from ordering_sql import telemetry
from ordering_sql.errors import EventArrivedEarly, EventBeingProcessed, LeaseLostError
from ordering_sql.tools.simulation import DeliveryQueue, HandledLog, build_stream, run_worker
from tests.conftest import OrderingFactory
from tests.support import Clock, make_event

_READER = InMemoryMetricReader()
_SPANS = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def _sdk() -> None:
    """The SDK an application would install; the engine's instruments forward to it."""
    metrics.set_meter_provider(MeterProvider(metric_readers=[_READER]))
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(_SPANS))
    trace.set_tracer_provider(tracer_provider)


def measured(scope: str) -> dict[str, float]:
    """Each metric's total for ``scope``: a counter's sum, a histogram's count."""
    totals: defaultdict[str, float] = defaultdict(float)
    data = _READER.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope_metrics in resource.scope_metrics:
            for metric in scope_metrics.metrics:
                for point in metric.data.data_points:
                    if (point.attributes or {}).get("ordering_sql.scope") != scope:
                        continue
                    if isinstance(point, NumberDataPoint):
                        totals[metric.name] += point.value
                    else:  # a histogram: how many were recorded
                        totals[metric.name] += point.count
    return dict(totals)


def spans(scope: str) -> list[ReadableSpan]:
    return [
        s
        for s in _SPANS.get_finished_spans()
        if s.attributes is not None and s.attributes.get("ordering_sql.scope") == scope
    ]


async def test_counts_and_spans_match_what_the_consumer_saw(
    make_ordering: OrderingFactory,
) -> None:
    scope = f"telemetry-{uuid4().hex[:8]}"  # the SDK's totals are cumulative, per process
    ordering = make_ordering(scope)
    stream = build_stream(120, seed=5, duplicate_rate=0.0)
    log = HandledLog(None, "w")
    tally = await run_worker(ordering, DeliveryQueue(stream.deliveries), log)
    ends = sum(1 for record in log.records if record["k"] == "end")
    assert ends == len(stream.events)
    assert tally.parked > 0
    assert tally.replayed > 0

    found = measured(scope)
    assert found["ordering_sql.events.handled"] == ends
    assert found["ordering_sql.events.parked"] == tally.parked
    assert found["ordering_sql.events.replayed"] == tally.replayed
    assert found["ordering_sql.follower.wait.duration"] == tally.replayed
    assert found["ordering_sql.step.duration"] > 0
    outcomes = Counter(
        s.attributes.get("ordering_sql.outcome") for s in spans(scope) if s.attributes
    )
    assert outcomes["handled"] == ends
    assert outcomes["parked"] == tally.parked
    followers = {e.id for e in stream.events if e.follows is not None}
    follows = [
        s.attributes["ordering_sql.event.follows"]
        for s in spans(scope)
        if s.attributes and "ordering_sql.event.follows" in s.attributes
    ]
    assert len(follows) >= len(followers)  # every follower's span names its leader


async def test_refusals_takeovers_and_lost_followers_are_counted(
    make_ordering: OrderingFactory, clock: Clock
) -> None:
    scope = f"telemetry-{uuid4().hex[:8]}"
    ordering = make_ordering(scope)
    other = make_ordering(scope)

    async def handler(event: Any, depth: int = 0) -> None:
        async with ordering.preceding_event_confirmed(handler, event, depth):
            pass

    done = make_event()
    await handler(done)
    with pytest.raises(EventBeingProcessed):
        await handler(done)  # a duplicate
    held = make_event()
    assert await other.record_event_as_processing(held)
    with pytest.raises(EventBeingProcessed):
        await handler(held)  # held by another worker
    orphan = make_event(follows=make_event(), received=clock.now)
    with pytest.raises(EventArrivedEarly):
        await handler(orphan)
    clock.advance(timedelta(minutes=16))
    assert [e.id for e in await ordering.get_lost_followers()] == [orphan.id]

    found = measured(scope)
    assert found["ordering_sql.events.handled"] == 1
    assert found["ordering_sql.events.duplicates"] == 1
    assert found["ordering_sql.events.busy"] == 1
    assert found["ordering_sql.events.parked"] == 1
    assert found["ordering_sql.followers.lost"] == 1
    outcomes = Counter(
        s.attributes.get("ordering_sql.outcome") for s in spans(scope) if s.attributes
    )
    assert outcomes == {"handled": 1, "duplicate": 1, "busy": 1, "parked": 1}


async def test_a_lost_lease_is_counted_and_its_span_is_an_error(
    make_ordering: OrderingFactory, clock: Clock
) -> None:
    scope = f"telemetry-{uuid4().hex[:8]}"
    ordering = make_ordering(scope)
    usurper = make_ordering(scope, clock=Clock(clock.now + timedelta(hours=1)))
    event = make_event()

    async def handle(_event: Any = None, _depth: int = 0) -> None:
        async with ordering.preceding_event_confirmed(handle, event):
            assert await usurper.record_event_as_processing(event)

    with pytest.raises(LeaseLostError):
        await handle()
    assert measured(scope)["ordering_sql.leases.lost"] == 1
    (span,) = spans(scope)
    assert span.attributes is not None
    assert span.attributes["ordering_sql.outcome"] == "lease_lost"
    assert span.status.status_code is StatusCode.ERROR


def test_the_readme_lists_every_metric_the_engine_reports() -> None:
    """The metric names of ``ordering_sql.telemetry``'s table, each in the README's."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    names = set(re.findall(r"``(ordering_sql\.[a-z_.]+)``", telemetry.__doc__ or ""))
    names -= {"ordering_sql.scope", "ordering_sql.step"}  # attributes, not metrics
    instruments = {n for n in names if not n.startswith("ordering_sql.event.")}
    assert len(instruments) >= 9, instruments
    missing = [name for name in sorted(instruments) if f"`{name}`" not in readme]
    assert not missing, missing
