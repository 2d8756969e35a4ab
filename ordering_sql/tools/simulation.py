"""A self-checking simulation of consumers using the engine: streams, workers, crashes, checks.

Used by ``ordering-sql demo`` and by the fault tests. The pieces:

* ``build_stream`` makes families of events (chains and fans of ``follows``), with duplicate
  deliveries, jumbled within a window, from a seed.
* ``run_worker`` is the usual consumer: skip seen events, run the recursive handler, count a
  parked event (``EventArrivedEarly``) as done, retry an event another worker holds. Every handler
  run is written to a log (start and end, on the machine-wide monotonic clock) and every message
  taken off the queue is acknowledged in the log, so runs can span processes and survive a kill.
* ``run_batch_worker`` is the same consumer taking its deliveries in batches, through
  ``preceding_events_confirmed``.
* ``check`` reads the logs back: events never handled, handled twice, and order violations (a
  follower whose handling began before its leader's first handling had ended).
* With ``Effects`` (``effects.py``), the handler goes through ``exactly_once`` and writes one
  row per handling into a table without a unique constraint; ``effects.check_effects`` then
  counts the rows per event (exactly one each) and whether each follower's row was written
  after its leader's committed.

A worker can also run as its own process (``python -m ordering_sql.tools.simulation SPEC``), so a
crash can be a real ``SIGKILL`` that leaves leases, claims and parked followers behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Final
from uuid import UUID, uuid4

from pydantic import BaseModel, ConfigDict, Field

from ordering_sql.engine import CausalOrdering
from ordering_sql.errors import EventArrivedEarly, EventBeingProcessed, LeaseLostError
from ordering_sql.models import ReceivedEvent
from ordering_sql.tools.effects import Effects, InjectedFailure

__all__ = [
    "Check",
    "Stream",
    "Tally",
    "WorkerSpec",
    "build_stream",
    "check",
    "handler_body",
    "read_log",
    "run_batch_worker",
    "run_worker",
    "unacknowledged",
]

RESOURCE: Final = "prefect.resource.id"


@dataclass(frozen=True)
class Stream:
    """The events of a simulation and the order in which they are delivered."""

    events: list[ReceivedEvent]
    deliveries: list[ReceivedEvent]

    @property
    def leaders(self) -> dict[UUID, UUID]:
        """follower id -> leader id."""
        return {e.id: e.follows for e in self.events if e.follows is not None}


def build_stream(
    events: int,
    *,
    seed: int = 0,
    max_family: int = 8,
    duplicate_rate: float = 0.1,
    window: int = 32,
    start: datetime | None = None,
) -> Stream:
    """``events`` events in families of 1..``max_family``, delivered jumbled with duplicates.

    In a family every event after the first follows an earlier one: the one just before it
    (building chains) or, half the time, any earlier one (building fans). Deliveries are the
    events in family order plus ``duplicate_rate`` repeats, shuffled within consecutive windows
    of ``window`` deliveries, so followers often arrive before their leaders.
    """
    rng = random.Random(seed)
    start = start or datetime.now(UTC)
    made: list[ReceivedEvent] = []
    family_no = 0
    while len(made) < events:
        size = min(rng.randint(1, max_family), events - len(made))
        family: list[ReceivedEvent] = []
        for i in range(size):
            leader = None
            if family:
                leader = family[-1] if rng.random() < 0.5 else rng.choice(family)
            family.append(
                ReceivedEvent(
                    occurred=start + timedelta(milliseconds=len(made) + i),
                    event=f"demo.step.{i}",
                    resource={RESOURCE: f"demo.family.{family_no}"},
                    id=UUID(int=rng.getrandbits(128), version=4),
                    follows=leader.id if leader else None,
                    received=start,
                )
            )
        made.extend(family)
        family_no += 1
    deliveries = list(made)
    for _ in range(int(len(made) * duplicate_rate)):
        deliveries.insert(rng.randrange(len(deliveries) + 1), rng.choice(made))
    for i in range(0, len(deliveries), window):
        chunk = deliveries[i : i + window]
        rng.shuffle(chunk)
        deliveries[i : i + window] = chunk
    return Stream(events=made, deliveries=deliveries)


# -- logs ---------------------------------------------------------------------------------------


class HandledLog:
    """Appends one JSON line per handler start/end and per acknowledged message.

    Lines are flushed as written, so a killed process leaves a complete record up to its death.
    Times are ``time.monotonic_ns()``, which on Linux is one clock for the whole machine.
    """

    def __init__(self, sink: IO[str] | None, worker: str) -> None:
        self._sink = sink
        self.worker = worker
        self.records: list[dict[str, Any]] = []

    def write(self, kind: str, event_id: UUID, **extra: Any) -> None:
        record = {"k": kind, "id": str(event_id), "w": self.worker, "t": time.monotonic_ns()}
        record.update(extra)
        self.records.append(record)
        if self._sink is not None:
            self._sink.write(json.dumps(record) + "\n")
            self._sink.flush()


def read_log(path: Path) -> list[dict[str, Any]]:
    """Records of a log file; a torn last line (the writer was killed) is ignored."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


# -- the consumer ---------------------------------------------------------------------------------


@dataclass
class Tally:
    """What a worker did with its deliveries."""

    delivered: int = 0
    handled: int = 0
    replayed: int = 0
    parked: int = 0
    duplicates_skipped: int = 0
    retried: int = 0
    lost_swept: int = 0

    def add(self, other: Tally) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class DeliveryQueue:
    """An in-memory queue with redelivery: an event another worker holds comes back later."""

    def __init__(self, deliveries: Iterable[ReceivedEvent] = ()) -> None:
        self._ready: deque[ReceivedEvent] = deque(deliveries)
        self._delayed = 0
        self._changed = asyncio.Event()

    def put(self, event: ReceivedEvent) -> None:
        self._ready.append(event)
        self._changed.set()

    def put_later(self, event: ReceivedEvent, delay: float) -> None:
        self._delayed += 1

        def _back() -> None:
            self._delayed -= 1
            self.put(event)

        asyncio.get_running_loop().call_later(delay, _back)

    async def get(self) -> ReceivedEvent | None:
        """The next delivery; None once nothing is queued or waiting to come back."""
        while not self._ready:
            if self._delayed == 0:
                return None
            self._changed.clear()
            await self._changed.wait()
        return self._ready.popleft()

    async def get_many(self, most: int) -> list[ReceivedEvent]:
        """Up to ``most`` deliveries (at least one unless the queue is done); [] once done."""
        first = await self.get()
        if first is None:
            return []
        taken = [first]
        while self._ready and len(taken) < most:
            taken.append(self._ready.popleft())
        return taken

    def __len__(self) -> int:
        return len(self._ready) + self._delayed


def handler_body(
    log: HandledLog, *, work_seconds: float = 0.0, stop_at_body: int | None = None
) -> Callable[[ReceivedEvent], Awaitable[None]]:
    """A handler's body as the checks read it: ``start`` logged, ``work_seconds`` of work,
    ``end`` logged.

    ``stop_at_body``: the process stops itself (SIGSTOP) inside its body of that ordinal (1 is
    the first), its lease held and its transaction open, and the fault test that asked for it
    decides what follows (SIGKILL, or SIGCONT after a stall). Stopping from inside puts the
    fault exactly there; a test polling from outside could miss every body of a worker whose
    peers handled the rest of the stream first.
    """
    bodies = 0

    async def body(event: ReceivedEvent) -> None:
        nonlocal bodies
        log.write("start", event.id)
        bodies += 1
        if bodies == stop_at_body:
            os.kill(os.getpid(), signal.SIGSTOP)
        if work_seconds:
            await asyncio.sleep(work_seconds)
        log.write("end", event.id)

    return body


def _handler(
    ordering: CausalOrdering[Any],
    log: HandledLog,
    tally: Tally,
    *,
    work_seconds: float = 0.0,
    on_handled: Callable[[], None] | None = None,
    effects: Effects | None = None,
    stop_at_body: int | None = None,
) -> Callable[[ReceivedEvent, int], Awaitable[None]]:
    """The workers' handler: one event through ``preceding_event_confirmed`` (or, with
    ``effects``, through ``exactly_once``, writing its effect row), its body run by
    ``handler_body``, counted; it is also the handler its released followers are replayed
    through."""
    work = handler_body(log, work_seconds=work_seconds, stop_at_body=stop_at_body)

    def counted(depth: int) -> None:
        tally.handled += 1
        tally.replayed += depth > 0
        if on_handled is not None:
            on_handled()

    async def handler(event: ReceivedEvent, depth: int = 0) -> None:
        if effects is None:
            async with ordering.preceding_event_confirmed(handler, event, depth):
                await work(event)
        else:
            async with ordering.exactly_once(handler, event, depth) as conn:
                await work(event)
                await effects.write(conn, event, log.worker)
        counted(depth)

    return handler


async def run_worker(
    ordering: CausalOrdering[Any],
    queue: DeliveryQueue,
    log: HandledLog,
    *,
    work_seconds: float = 0.0,
    retry_delay: float = 0.05,
    on_handled: Callable[[], None] | None = None,
    latencies: list[float] | None = None,
    effects: Effects | None = None,
    handler: Callable[[ReceivedEvent, int], Awaitable[None]] | None = None,
    stop_at_body: int | None = None,
) -> Tally:
    """Consume ``queue`` until it is empty, the way a service consumes its message queue.

    ``latencies``, if given, receives the seconds spent on each delivery (taking it off the
    queue to acknowledging it, replays of released followers included). ``effects``: handle
    through ``exactly_once`` (see ``Effects``); a handling that failed, or whose lease was
    taken over, is redelivered, as a broker redelivers a message not acknowledged.
    ``handler``: the consumer's own recursive handler instead of the simulation's (it logs
    its bodies itself; ``tally.handled`` then counts nothing). ``stop_at_body``: see
    ``_handler``.
    """
    tally = Tally()
    if handler is None:
        handler = _handler(
            ordering,
            log,
            tally,
            work_seconds=work_seconds,
            on_handled=on_handled,
            effects=effects,
            stop_at_body=stop_at_body,
        )

    while (event := await queue.get()) is not None:
        began = time.perf_counter()
        tally.delivered += 1
        if await ordering.event_has_been_seen(event):
            tally.duplicates_skipped += 1
        else:
            try:
                await handler(event, 0)
            except EventArrivedEarly:
                tally.parked += 1
            except (EventBeingProcessed, InjectedFailure, LeaseLostError):
                # Held by another worker (or a dead one, until its lease expires), or failed:
                # redeliver. (A replayed follower that failed comes back by the sweep.)
                tally.retried += 1
                queue.put_later(event, retry_delay)
                continue
        log.write("ack", event.id)
        if latencies is not None:
            latencies.append(time.perf_counter() - began)
    return tally


async def run_batch_worker(
    ordering: CausalOrdering[Any],
    queue: DeliveryQueue,
    log: HandledLog,
    *,
    batch_size: int = 100,
    retry_delay: float = 0.05,
    latencies: list[float] | None = None,
) -> Tally:
    """``run_worker`` for a consumer that receives its messages in batches.

    ``latencies``, if given, receives for each delivery the seconds its batch took (taking it
    off the queue to acknowledging it).
    """
    tally = Tally()
    # Followers released by a batch come back one at a time, through the single path.
    handler = _handler(ordering, log, tally)

    while deliveries := await queue.get_many(batch_size):
        began = time.perf_counter()
        tally.delivered += len(deliveries)
        async with ordering.preceding_events_confirmed(handler, deliveries) as batch:
            for event in batch:
                log.write("start", event.id)
                log.write("end", event.id)
                tally.handled += 1
        tally.parked += len(batch.parked)
        tally.duplicates_skipped += len(batch.skipped)
        tally.retried += len(batch.busy)
        for event in batch.busy:
            queue.put_later(event, retry_delay)
        busy = {event.id for event in batch.busy}
        acknowledged = [event for event in deliveries if event.id not in busy]
        for event in acknowledged:
            log.write("ack", event.id)
        if latencies is not None:
            latencies += [time.perf_counter() - began] * len(acknowledged)
    return tally


async def sweep_lost(ordering: CausalOrdering[Any], queue: DeliveryQueue, tally: Tally) -> None:
    """The periodic sweep a service runs: lost followers go back into the queue."""
    for event in await ordering.get_lost_followers():
        tally.lost_swept += 1
        queue.put(event)


def unacknowledged(
    deliveries: Iterable[ReceivedEvent], records: Iterable[dict[str, Any]]
) -> list[ReceivedEvent]:
    """What a broker redelivers after a worker died: its ``deliveries`` that its log
    ``records`` do not acknowledge (each "ack" record stands for one delivery)."""
    acked: dict[str, int] = defaultdict(int)
    for record in records:
        if record["k"] == "ack":
            acked[record["id"]] += 1
    remaining = []
    for event in deliveries:
        key = str(event.id)
        if acked[key] > 0:
            acked[key] -= 1
        else:
            remaining.append(event)
    return remaining


# -- checking -----------------------------------------------------------------------------------


class Check(BaseModel):
    """The verdict on a run."""

    model_config = ConfigDict(frozen=True)

    events: int
    handled: int
    handled_twice: int
    lost: int
    order_violations: int
    twice: list[str] = []
    examples: list[str] = []

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.order_violations == 0


def check(stream: Stream, records: Iterable[dict[str, Any]]) -> Check:
    """Judge the handler records of a run against the stream.

    Each event must have been handled (a completed start..end) at least once; a follower's first
    start must come after its leader's first end. ``twice`` lists the events handled more than
    once: after a crash, only an event whose handler was running at the kill may be.
    """
    starts: dict[str, list[int]] = defaultdict(list)
    ends: dict[str, list[int]] = defaultdict(list)
    for record in records:
        if record["k"] == "start":
            starts[record["id"]].append(record["t"])
        elif record["k"] == "end":
            ends[record["id"]].append(record["t"])
    ids = [str(e.id) for e in stream.events]
    lost = [i for i in ids if not ends.get(i)]
    twice = [i for i in ids if len(ends.get(i, ())) > 1]
    violations = []
    for follower, leader in stream.leaders.items():
        f, ld = str(follower), str(leader)
        if starts.get(f) and ends.get(ld) and min(starts[f]) < min(ends[ld]):
            violations.append(f"{f} started before its leader {ld} was done")
        elif starts.get(f) and not ends.get(ld):
            violations.append(f"{f} was handled but its leader {ld} never was")
    examples = [f"lost {i}" for i in lost[:3]] + violations[:3]
    return Check(
        events=len(ids),
        handled=sum(1 for i in ids if ends.get(i)),
        handled_twice=len(twice),
        twice=twice,
        lost=len(lost),
        order_violations=len(violations),
        examples=examples,
    )


# -- a worker in its own process --------------------------------------------------------------


class WorkerSpec(BaseModel):
    """What a worker process does: consume ``deliveries`` from a file, log to another."""

    model_config = ConfigDict(frozen=True)

    database_url: str
    scope: str
    deliveries: Path
    log: Path
    worker: str = Field(default_factory=lambda: uuid4().hex[:8])
    work_seconds: float = 0.0
    lease_timeout: float = 2.0
    claim_timeout: float = 3.0
    #: Handle through ``exactly_once``, writing ``EFFECTS`` rows (``Effects``).
    exactly_once: bool = False
    #: With ``exactly_once``: the share of handlings that fail after writing their row.
    fail_rate: float = 0.0
    seed: int | None = None
    #: Stop (SIGSTOP) inside the handler body of this ordinal, for a fault test to act on.
    stop_at_body: int | None = None


def write_deliveries(path: Path, deliveries: Iterable[ReceivedEvent]) -> None:
    with path.open("w") as out:
        for event in deliveries:
            out.write(event.model_dump_json() + "\n")


def read_deliveries(path: Path) -> Iterator[ReceivedEvent]:
    with path.open() as lines:
        for line in lines:
            yield ReceivedEvent.model_validate_json(line)


async def _worker_process(spec: WorkerSpec) -> Tally:
    ordering: CausalOrdering[Any] = CausalOrdering(
        spec.scope,
        database_url=spec.database_url,
        lease_timeout=spec.lease_timeout,
        claim_timeout=spec.claim_timeout,
    )
    with spec.log.open("a") as sink:
        log = HandledLog(sink, spec.worker)
        queue = DeliveryQueue(read_deliveries(spec.deliveries))
        effects = Effects(spec.fail_rate, random.Random(spec.seed)) if spec.exactly_once else None
        try:
            return await run_worker(
                ordering,
                queue,
                log,
                work_seconds=spec.work_seconds,
                effects=effects,
                stop_at_body=spec.stop_at_body,
            )
        finally:
            await ordering.close()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ordering_sql.tools.simulation SPEC.json``: run one worker process."""
    args = list(sys.argv[1:] if argv is None else argv)
    spec = WorkerSpec.model_validate_json(Path(args[0]).read_text())
    tally = asyncio.run(_worker_process(spec))
    print(json.dumps(tally.__dict__))


if __name__ == "__main__":
    main()
