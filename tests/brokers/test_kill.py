"""Two consumer processes on a real broker, one of them SIGKILLed mid-handling and restarted.

A jumbled stream with duplicates (``simulation.build_stream``) is published to the broker once
both consumers (``tests/brokers/_consumer.py``) consume. One stops itself inside a handler body
(its lease held, its ``exactly_once`` transaction open, messages fetched and not acknowledged)
and is SIGKILLed there, then started again under a new name. The broker redelivers what it
held (RabbitMQ when its connection drops, JetStream after ``ack_wait``, a Redis stream when a
claiming subscriber takes the dead consumer's pending entries), the others' sweeps hand back
the followers it had claimed, and its lease expires.

Then: every event handled, in causal order (``simulation.check`` on the logs of all three
processes), exactly one effect row per event, each follower's after its leader's committed
(``effects.check_effects``), and nothing left: no message waiting or unacknowledged on the
broker once the consumers stopped, no follower parked or claimed, no lease held.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from ordering_sql.admin import ScopeStatus, status
from ordering_sql.settings import Settings as StoreSettings
from ordering_sql.store import Store
from ordering_sql.tools.effects import check_effects, create_effects
from ordering_sql.tools.simulation import build_stream, check, read_log
from tests.brokers._consumer import ConsumerSpec
from tests.brokers.support import Backlog, BrokerName, Kit, Settings
from tests.support import REPO_ROOT, child_env

EVENTS = 300
#: The body (its ordinal in the killed worker) inside which it is killed.
KILL_AT_BODY = 12
#: The longest the run may take before the test fails.
RUN_TIMEOUT_S = 60.0


@pytest.fixture
def settings() -> Settings:
    """Redelivery within seconds: JetStream's ack wait and the Redis claim idle time."""
    return Settings(ack_wait=2.0, claim_idle_ms=1000, prefetch=4)


@pytest.fixture(
    params=[
        pytest.param("sqlite", marks=pytest.mark.sqlite),
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
def db_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


# -- the consumer processes ----------------------------------------------------------------------


@dataclass
class Consumer:
    name: str
    process: asyncio.subprocess.Process
    stderr: Path

    def errors(self) -> str:
        return self.stderr.read_text()[-3000:] if self.stderr.exists() else ""

    def stopped(self) -> bool:
        """Whether the process stopped itself (SIGSTOP): its state in /proc is T."""
        stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] == "T"

    def signal(self, number: int) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(number)


@dataclass
class Consumers:
    folder: Path
    running: list[Consumer] = field(default_factory=list)

    async def start(self, spec: ConsumerSpec) -> Consumer:
        spec_path = self.folder / f"{spec.worker}.json"
        spec_path.write_text(spec.model_dump_json())
        stderr = self.folder / f"{spec.worker}.err"
        with stderr.open("wb") as errors:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.brokers._consumer",
                str(spec_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=errors,
                stderr=errors,
                cwd=str(REPO_ROOT),
                env=child_env(),
            )
        consumer = Consumer(spec.worker, process, stderr)
        self.running.append(consumer)
        return consumer

    async def until_ready(self, spec: ConsumerSpec, consumer: Consumer) -> None:
        deadline = time.monotonic() + 30
        while not spec.ready_file.exists():
            if consumer.process.returncode is not None or time.monotonic() > deadline:
                pytest.fail(f"consumer {consumer.name} did not start: {consumer.errors()}")
            await asyncio.sleep(0.05)

    async def stop(self, consumer: Consumer) -> None:
        """SIGTERM, and a clean exit within 15 s."""
        consumer.signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(consumer.process.wait(), 15)
        except TimeoutError:
            consumer.signal(signal.SIGKILL)
            await consumer.process.wait()
            pytest.fail(f"consumer {consumer.name} did not stop: {consumer.errors()}")
        assert code == 0, f"consumer {consumer.name} exited with {code}: {consumer.errors()}"


@pytest.fixture
async def consumers(tmp_path: Path) -> AsyncIterator[Consumers]:
    """Starts consumers; any still running when the test ends is killed and reaped."""
    made = Consumers(tmp_path)
    yield made
    for consumer in made.running:
        consumer.signal(signal.SIGKILL)
    for consumer in made.running:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(consumer.process.wait(), 10)


# -- the run ---------------------------------------------------------------------------------------


async def scope_status(url: str, scope: str) -> ScopeStatus:
    store = Store.from_settings(StoreSettings(database_url=url))
    try:
        found = await status(store, now=datetime.now(UTC), scope=scope)
    finally:
        await store.dispose()
    return found[0] if found else ScopeStatus(scope=scope)


async def until_done(kit: Kit, channel: str, url: str, scope: str, events: int) -> None:
    """Until every event was handled, and nothing is left on the broker or in the database."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        state = await scope_status(url, scope)
        backlog = await kit.backlog(channel)
        finished = (state.seen, state.parked, state.claimed, state.processing) == (events, 0, 0, 0)
        if finished and backlog.left == 0:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"not done after {RUN_TIMEOUT_S} s: {state}, {backlog}")
        await asyncio.sleep(0.25)


async def final_backlog(kit: Kit, channel: str) -> Backlog:
    """The broker's backlog once the consumers are gone (acknowledgements sent just before
    their exit may still be on their way to a JetStream server)."""
    deadline = time.monotonic() + 5
    while True:
        found = await kit.backlog(channel)
        if not found.left or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_a_consumer_killed_mid_handling_loses_nothing_and_repeats_no_effect(
    broker_name: BrokerName,
    kit: Kit,
    channel: str,
    db_url: str,
    consumers: Consumers,
    tmp_path: Path,
) -> None:
    began = time.monotonic()
    scope = f"kill-{uuid4().hex[:8]}"
    await create_effects(db_url)
    stream = build_stream(EVENTS, seed=7, duplicate_rate=0.2)
    logs = {name: tmp_path / f"{name}.log" for name in ("a", "b", "a2")}

    def spec(worker: str, **extra: Any) -> ConsumerSpec:
        return ConsumerSpec(
            broker=broker_name,
            url=kit.url,
            channel=channel,
            settings=kit.settings,
            database_url=db_url,
            scope=scope,
            log=logs[worker],
            worker=worker,
            ready_file=tmp_path / f"{worker}.ready",
            **extra,
        )

    specs = {"a": spec("a", stop_at_body=KILL_AT_BODY), "b": spec("b"), "a2": spec("a2")}
    a, b = [await consumers.start(specs[name]) for name in ("a", "b")]
    await consumers.until_ready(specs["a"], a)
    await consumers.until_ready(specs["b"], b)
    await kit.publish(channel, [event.model_dump_json().encode() for event in stream.deliveries])

    deadline = time.monotonic() + 30
    while not a.stopped():
        if a.process.returncode is not None or time.monotonic() > deadline:
            pytest.fail(f"consumer a never reached body {KILL_AT_BODY}: {a.errors()}")
        await asyncio.sleep(0.01)
    a.signal(signal.SIGKILL)
    assert await asyncio.wait_for(a.process.wait(), 10) == -signal.SIGKILL
    a2 = await consumers.start(specs["a2"])
    await consumers.until_ready(specs["a2"], a2)

    await until_done(kit, channel, db_url, scope, len(stream.events))
    for consumer in (b, a2):
        await consumers.stop(consumer)
    backlog = await final_backlog(kit, channel)
    state = await scope_status(db_url, scope)
    effects = await check_effects(db_url, stream)
    records = [record for log in logs.values() if log.exists() for record in read_log(log)]
    verdict = check(stream, records)
    deliveries = [r for r in records if r["k"] == "deliver"]
    settled = Counter(r["k"] for r in records if r["k"] in {"ack", "nack", "reject", "unsettled"})
    killed = [r["id"] for r in read_log(logs["a"]) if r["k"] == "start"][-1]
    print(
        f"\n{broker_name} on {db_url.split(':')[0]}: events {verdict.events}, "
        f"published {len(stream.deliveries)}, deliveries {len(deliveries)}, "
        f"redeliveries {sum(r['attempt'] > 1 for r in deliveries)}, settled {dict(settled)}, "
        f"handled {verdict.handled}, twice {verdict.handled_twice}, lost {verdict.lost}, "
        f"order violations {verdict.order_violations}, effect rows {effects.rows}, "
        f"left on the broker {backlog.left}, in {time.monotonic() - began:.1f} s"
    )

    assert verdict.lost == 0, verdict.examples
    assert verdict.order_violations == 0, verdict.examples
    # Only handlings the kill interrupted may have run twice: the body it stopped (which never
    # logged its end) and, as the process handles several events at once (RabbitMQ runs up to
    # its prefetch of messages together, and the sweep runs beside the subscriber), bodies that
    # had ended but whose transaction had not committed. Their effects count once (below).
    assert [r["k"] for r in read_log(logs["a"]) if r["id"] == killed][-1] == "start"
    started_by_a = {r["id"] for r in read_log(logs["a"]) if r["k"] == "start"}
    assert set(verdict.twice) <= started_by_a, [
        (r["w"], r["k"], r.get("attempt"), r.get("error"))
        for r in records
        if r["id"] in verdict.twice
    ]
    assert verdict.handled_twice <= kit.settings.prefetch + 1, verdict.twice
    assert effects.ok, effects
    assert backlog.left == 0, backlog
    assert settled["reject"] == settled["unsettled"] == 0, settled
    assert (state.parked, state.claimed, state.processing) == (0, 0, 0), state
    assert state.seen == len(stream.events), state
    # The kill mattered: a delivery to the dead worker came back, to another one.
    assert any(r["attempt"] > 1 and r["w"] != "a" for r in deliveries), "nothing redelivered"
