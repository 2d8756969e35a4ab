"""The batch API under concurrency and crashes, on both backends.

* Several workers (each its own ``CausalOrdering``, some on their own connection pool) consume
  the same jumbled stream with duplicates in overlapping batches of random sizes, alone or
  mixed with workers on the single-event path: each event is handled exactly once, every
  ``follows`` edge in order, and nothing is left parked, claimed or held.
* A batch worker in its own OS process dies by ``SIGKILL`` (``_batch_worker.py``), inside the
  block or in a replay after it; a fresh instance then takes the redelivered messages and the
  lost followers, and everything is handled with nothing lost and nothing left behind.

Handler logs use ``time.monotonic_ns()`` (one clock for every process of the machine) and are
judged by ``ordering_sql.tools.simulation.check``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID, uuid4

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from ordering_sql import (
    Batch,
    CausalOrdering,
    EventArrivedEarly,
    EventBeingProcessed,
    ReceivedEvent,
    dispose_engines,
)
from ordering_sql.admin import ScopeStatus, status
from ordering_sql.settings import Settings
from ordering_sql.store import Store
from ordering_sql.tools.simulation import HandledLog, Stream, build_stream, check, read_log
from tests.concurrency._batch_worker import BatchWorkerSpec, write_batches
from tests.support import REPO_ROOT, Clock, chain, child_env, make_event

T = TypeVar("T")

#: Every wait here is bounded by this; nothing should come near it.
TEST_TIMEOUT_S = 60.0
#: Past the lookback (15 min) and every claim timeout used here.
LATER = timedelta(minutes=20)


async def bounded(awaitable: Awaitable[T], seconds: float = TEST_TIMEOUT_S) -> T:
    return await asyncio.wait_for(awaitable, timeout=seconds)


# -- the consumers --------------------------------------------------------------------------------


class Worker:
    """One consumer, on the batch path or the single-event path; logs every body it runs."""

    def __init__(self, ordering: CausalOrdering[Any], name: str, seed: int) -> None:
        self.ordering = ordering
        self.log = HandledLog(None, name)
        self.rng = random.Random(seed)
        self.parked = self.replayed = self.busy = 0

    async def body(self, event: ReceivedEvent) -> None:
        self.log.write("start", event.id)
        if self.rng.random() < 0.3:
            await asyncio.sleep(self.rng.uniform(0, 0.003))
        self.log.write("end", event.id)

    async def handler(self, event: ReceivedEvent, depth: int = 0) -> None:
        async with self.ordering.preceding_event_confirmed(self.handler, event, depth):
            await self.body(event)
            self.replayed += depth > 0

    async def consume_in_batches(self, deliveries: Sequence[ReceivedEvent]) -> None:
        """Batches of 1 to 12 deliveries; busy events are redelivered after the rest."""
        queue = list(deliveries)
        while queue:
            size = self.rng.randint(1, 12)
            deliveries, queue = queue[:size], queue[size:]
            batch: Batch[ReceivedEvent]
            async with self.ordering.preceding_events_confirmed(self.handler, deliveries) as batch:
                for event in batch:
                    await self.body(event)
            self.parked += len(batch.parked)
            self.busy += len(batch.busy)
            if batch.busy:
                queue += batch.busy
                if len(queue) == len(batch.busy):
                    await asyncio.sleep(0.005)  # only events held elsewhere are left

    async def consume_one_by_one(self, deliveries: Sequence[ReceivedEvent]) -> None:
        """The README's consumer; an event held elsewhere is redelivered after the rest."""
        queue = list(deliveries)
        while queue:
            event = queue.pop(0)
            if await self.ordering.event_has_been_seen(event):
                continue
            try:
                await self.handler(event)
            except EventArrivedEarly:
                self.parked += 1
            except EventBeingProcessed:
                self.busy += 1
                queue.append(event)
                if len(queue) == 1:
                    await asyncio.sleep(0.005)


def jumbled(
    deliveries: Sequence[ReceivedEvent], seed: int, window: int = 24
) -> list[ReceivedEvent]:
    rng = random.Random(seed)
    out = list(deliveries)
    for i in range(0, len(out), window):
        chunk = out[i : i + window]
        rng.shuffle(chunk)
        out[i : i + window] = chunk
    return out


# -- looking at the results ----------------------------------------------------------------------


def assert_each_handled_once_in_order(stream: Stream, records: Sequence[dict[str, Any]]) -> None:
    verdict = check(stream, records)
    assert verdict.lost == 0, verdict.examples
    assert verdict.order_violations == 0, verdict.examples
    starts = Counter(r["id"] for r in records if r["k"] == "start")
    again = {i: n for i, n in starts.items() if n != 1}
    assert not again, f"bodies run more than once: {list(again.items())[:5]}"
    assert set(starts) == {str(e.id) for e in stream.events}


async def scope_status(database_url: str, scope: str) -> ScopeStatus:
    store = Store.from_settings(Settings(database_url=database_url))
    try:
        found = await status(store, now=datetime.now(UTC), scope=scope)
    finally:
        await store.dispose()
    return found[0] if found else ScopeStatus(scope=scope)


async def assert_nothing_left(
    database_url: str, scope: str, events: Sequence[ReceivedEvent], *, now: datetime
) -> None:
    """Every event seen; no follower parked or claimed, none lost even long after."""
    probe: CausalOrdering[ReceivedEvent] = CausalOrdering(
        scope, database_url=database_url, clock=lambda: now
    )
    later: CausalOrdering[ReceivedEvent] = CausalOrdering(
        scope, database_url=database_url, clock=lambda: now + LATER
    )
    try:
        assert await probe.followers_by_id([e.id for e in events]) == [], "followers still stored"
        for leader in {e.follows for e in events if e.follows is not None}:
            assert await probe.get_followers(leader) == [], f"followers wait for {leader}"
        for e in events:
            assert await probe.event_has_been_seen(e), f"{e.event} {e.id} not marked seen"
            assert not await probe.event_has_started_processing(e), f"{e.id} still leased"
        assert await later.get_lost_followers() == [], "followers lost past every timeout"
    finally:
        await probe.close()
        await later.close()
    state = await scope_status(database_url, scope)
    assert (state.parked, state.claimed) == (0, 0), state
    assert state.seen == len({e.id for e in events}), state


# -- 1. concurrent consumers of one stream -------------------------------------------------------


@pytest.fixture
async def workers(database_url: str) -> AsyncIterator[list[CausalOrdering[Any]]]:
    """Four instances on one scope: two share the usual pool, two have pools of their own."""
    scope = f"batches-{uuid4().hex[:8]}"
    engines = [create_async_engine(database_url) for _ in range(2)]
    made: list[CausalOrdering[Any]] = [
        CausalOrdering(scope, database_url=database_url),
        CausalOrdering(scope, database_url=database_url),
        *(CausalOrdering(scope, engine=engine) for engine in engines),
    ]
    try:
        yield made
    finally:
        for ordering in made:
            await ordering.close()
        for engine in engines:
            await engine.dispose()
        await dispose_engines()


async def _run(
    database_url: str,
    orderings: list[CausalOrdering[Any]],
    paths: Sequence[str],
    seed: int,
) -> list[Worker]:
    stream = build_stream(120, seed=seed, duplicate_rate=0.2, max_family=6)
    assert len(stream.deliveries) > len(stream.events)  # duplicates are delivered
    team = [
        Worker(o, f"{path}-{k}", seed=seed + k)
        for k, (o, path) in enumerate(zip(orderings, paths, strict=True))
    ]
    # Every worker receives every delivery, each in a jumble of its own: the batches overlap.
    runs = [
        w.consume_in_batches(jumbled(stream.deliveries, seed=seed * 10 + k))
        if path == "batch"
        else w.consume_one_by_one(jumbled(stream.deliveries, seed=seed * 10 + k))
        for k, (w, path) in enumerate(zip(team, paths, strict=True))
    ]
    await bounded(asyncio.gather(*runs))

    records = [r for w in team for r in w.log.records]
    assert_each_handled_once_in_order(stream, records)
    assert sum(w.parked for w in team) > 0, "no follower was ever parked: nothing was tested"
    assert sum(w.replayed for w in team) > 0, "no follower was ever replayed"
    scope = orderings[0].scope
    await assert_nothing_left(database_url, scope, stream.events, now=datetime.now(UTC))
    return team


async def test_concurrent_batch_workers_handle_each_event_once_in_order(
    database_url: str, workers: list[CausalOrdering[Any]]
) -> None:
    team = await _run(database_url, workers, ["batch"] * 4, seed=11)
    busy = sum(w.busy for w in team)
    print(f"\nbatches: parked {sum(w.parked for w in team)}, busy {busy}")


async def test_batch_and_single_event_workers_mixed_handle_each_event_once_in_order(
    database_url: str, workers: list[CausalOrdering[Any]]
) -> None:
    # Each path on each kind of pool.
    team = await _run(database_url, workers, ["batch", "single", "batch", "single"], seed=12)
    handled = Counter(r["w"].split("-")[0] for w in team for r in w.log.records if r["k"] == "end")
    print(f"\nmixed: bodies run per path {dict(handled)}")
    assert handled["batch"] > 0
    assert handled["single"] > 0


@pytest.mark.postgres
async def test_overlapping_batches_in_opposite_orders_do_not_deadlock(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Brokers redeliver in any order: two workers get the same events, jumbled differently."""
    scope = f"lock-order-{uuid4().hex[:8]}"
    engines = [create_async_engine(postgres_url) for _ in range(2)]
    orderings: list[CausalOrdering[Any]] = [CausalOrdering(scope, engine=e) for e in engines]
    handled: list[UUID] = []

    async def handler(event: ReceivedEvent, depth: int = 0) -> None:  # pragma: no cover
        msg = "nothing is replayed here"
        raise AssertionError(msg)

    async def take(ordering: CausalOrdering[Any], events: list[ReceivedEvent]) -> None:
        async with ordering.preceding_events_confirmed(handler, events) as batch:
            handled.extend(ids(batch))

    caplog.set_level(logging.WARNING, logger="ordering_sql")
    try:
        for _ in range(20):
            events = [make_event(name=f"e{i}") for i in range(200)]
            await bounded(
                asyncio.gather(
                    take(orderings[0], events), take(orderings[1], list(reversed(events)))
                )
            )
            if any("deadlock" in r.getMessage() for r in caplog.records):
                break
    finally:
        for ordering in orderings:
            await ordering.close()
        for engine in engines:
            await engine.dispose()
    assert len(handled) == len(set(handled)), "an event was handled by both"
    deadlocks = [r.getMessage() for r in caplog.records if "deadlock" in r.getMessage()]
    assert deadlocks == [], deadlocks[0]


# -- 2. a batch worker killed ---------------------------------------------------------------------

LEASE_S = 30.0  # the test clock jumps past these: no real waiting
CLAIM_S = 60.0


async def _run_doomed(spec: BatchWorkerSpec, folder: Path) -> str:
    """Run the worker process until it kills itself; its stderr."""
    spec_path, stderr = folder / "doomed.json", folder / "doomed.err"
    spec_path.write_text(spec.model_dump_json())
    with stderr.open("wb") as err:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.concurrency._batch_worker",
            str(spec_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err,
            cwd=str(REPO_ROOT),
            env=child_env(),
        )
    try:
        code = await bounded(process.wait())
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await bounded(process.wait(), 10)
    errors = stderr.read_text()[-2000:]
    assert code == -signal.SIGKILL, f"the worker was not killed (exit code {code}): {errors}"
    return errors


def _families(now: datetime) -> tuple[list[list[ReceivedEvent]], list[ReceivedEvent]]:
    """Two batches and every event. Batch 0: the last two links of six chains of four (parked:
    their leaders come in batch 1) and loners. Batch 1: the chains' first two links, more loners,
    a repeat of a batch-0 loner and a repeat within the batch."""
    chains = [chain(4, received=now) for _ in range(6)]
    first_loners = [make_event(received=now, name=f"loner.a{i}") for i in range(3)]
    second_loners = [make_event(received=now, name=f"loner.b{i}") for i in range(3)]
    rng = random.Random(5)
    batch_0 = [e for c in chains for e in c[2:]] + first_loners
    batch_1 = [e for c in chains for e in c[:2]] + second_loners
    rng.shuffle(batch_0)
    rng.shuffle(batch_1)
    batch_1 += [first_loners[0], batch_1[0]]
    events = [e for c in chains for e in c] + first_loners + second_loners
    return [batch_0, batch_1], events


def _unacked(batches: Iterable[list[ReceivedEvent]], records: list[dict[str, Any]]) -> list[Any]:
    """What the broker redelivers: the messages the dead worker never acknowledged."""
    acked = Counter(r["id"] for r in records if r["k"] == "ack")
    remaining = []
    for event in (e for batch in batches for e in batch):
        if acked[str(event.id)] > 0:
            acked[str(event.id)] -= 1
        else:
            remaining.append(event)
    return remaining


class Recovery:
    """A fresh batch consumer after the crash, on a test clock that can jump past timeouts."""

    def __init__(self, database_url: str, scope: str) -> None:
        self.clock = Clock()
        self.ordering: CausalOrdering[ReceivedEvent] = CausalOrdering(
            scope,
            database_url=database_url,
            clock=self.clock,
            lease_timeout=LEASE_S,
            claim_timeout=CLAIM_S,
        )
        self.worker = Worker(self.ordering, "restarted", seed=0)

    async def deliver(self, deliveries: list[ReceivedEvent]) -> Batch[ReceivedEvent]:
        async with self.ordering.preceding_events_confirmed(
            self.worker.handler, deliveries
        ) as batch:
            for event in batch:
                await self.worker.body(event)
        return batch


@pytest.mark.slow
async def test_batch_worker_killed_inside_the_block_is_recovered_by_redelivery(
    database_url: str, tmp_path: Path
) -> None:
    scope = f"kill-block-{uuid4().hex[:8]}"
    batches, events = _families(datetime.now(UTC))
    write_batches(tmp_path / "batches.jsonl", batches)
    log = tmp_path / "doomed.log"
    spec = BatchWorkerSpec(
        database_url=database_url,
        scope=scope,
        batches=tmp_path / "batches.jsonl",
        log=log,
        lease_timeout=LEASE_S,
        claim_timeout=CLAIM_S,
        die_in_batch=1,
        die_after=5,
    )
    await _run_doomed(spec, tmp_path)

    dead = read_log(log)
    dead_ends = [r["id"] for r in dead if r["k"] == "end"]
    done_in_block = dead_ends[-5:]  # the five bodies of batch 1 before the kill
    parked_by_dead = {r["id"] for r in dead if r["k"] == "parked"}
    assert len(parked_by_dead) == 12, dead  # the last two links of each chain
    left = await scope_status(database_url, scope)
    assert left.parked == 12, left
    assert left.processing == 12 + 3, left  # the leases of batch 1's ready events, held on

    recovery = Recovery(database_url, scope)
    try:
        redelivered = _unacked(batches, dead)
        assert {str(e.id) for e in redelivered} == {str(e.id) for e in batches[1]}
        # At once: the dead worker's leases still live. Held elsewhere, so busy: not handled,
        # not acknowledged; the repeats are skipped (one was handled in batch 0).
        early = await recovery.deliver(redelivered)
        assert early.ready == []
        assert len(early.busy) == 15, early
        assert len(early.skipped) == 2, early
        for e in early.busy:
            assert not await recovery.ordering.event_has_been_seen(e)

        recovery.clock.advance(LEASE_S + 1)  # the dead worker's leases expire
        again = await recovery.deliver(early.busy)
        assert len(again.ready) == 15, again
        assert len(again.replayed) == 6, again  # the chains' third links, parked by the dead
    finally:
        await recovery.ordering.close()

    records = dead + recovery.worker.log.records
    stream = Stream(events=events, deliveries=[e for b in batches for e in b])
    verdict = check(stream, records)
    assert verdict.lost == 0, verdict.examples
    assert verdict.order_violations == 0, verdict.examples
    # The bodies the dead worker ran in the block were not recorded: they ran again. Nothing
    # else ran twice.
    assert sorted(verdict.twice) == sorted(done_in_block)
    assert len(done_in_block) == 5
    await assert_nothing_left(database_url, scope, events, now=recovery.clock.now)


@pytest.mark.slow
async def test_batch_worker_killed_replaying_a_follower_is_recovered_by_the_sweep(
    database_url: str, tmp_path: Path
) -> None:
    scope = f"kill-replay-{uuid4().hex[:8]}"
    batches, events = _families(datetime.now(UTC))
    write_batches(tmp_path / "batches.jsonl", batches)
    log = tmp_path / "doomed.log"
    spec = BatchWorkerSpec(
        database_url=database_url,
        scope=scope,
        batches=tmp_path / "batches.jsonl",
        log=log,
        lease_timeout=LEASE_S,
        claim_timeout=CLAIM_S,
        die_in_batch=1,
        die_in_replay=True,
    )
    await _run_doomed(spec, tmp_path)

    dead = read_log(log)
    interrupted = dead[-1]
    assert (interrupted["k"], interrupted["depth"]) == ("start", 1), interrupted
    left = await scope_status(database_url, scope)
    assert left.claimed == 6, left  # batch 1 recorded; its leaders claimed the third links
    assert left.parked == 12, left

    recovery = Recovery(database_url, scope)
    try:
        redelivered = _unacked(batches, dead)
        # Batch 1 was recorded before the kill: its redelivery is all skipped.
        skipped = await recovery.deliver(redelivered)
        assert skipped.ready == [], skipped
        assert skipped.busy == [], skipped
        assert len(skipped.skipped) == len(redelivered)
        assert await recovery.ordering.get_lost_followers() == []  # the claims still live

        recovery.clock.advance(CLAIM_S + 1)
        lost = await recovery.ordering.get_lost_followers()
        assert len(lost) == 6, lost  # the claimed third links; the fourth still wait for them
        swept = await recovery.deliver(lost)
        assert sorted(ids(swept.ready)) == sorted(ids(lost))
        assert len(swept.replayed) == 6, swept  # the fourth links
    finally:
        await recovery.ordering.close()

    records = dead + recovery.worker.log.records
    stream = Stream(events=events, deliveries=[e for b in batches for e in b])
    verdict = check(stream, records)
    assert verdict.lost == 0, verdict.examples
    assert verdict.order_violations == 0, verdict.examples
    assert verdict.twice == []  # the interrupted body never ended in the dead worker
    starts = Counter(r["id"] for r in records if r["k"] == "start")
    assert {i for i, n in starts.items() if n > 1} == {interrupted["id"]}
    await assert_nothing_left(database_url, scope, events, now=recovery.clock.now)


def ids(events: Iterable[ReceivedEvent]) -> list[UUID]:
    return [e.id for e in events]
