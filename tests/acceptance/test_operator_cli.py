"""The operator commands (``order``, ``lost``, ``purge``, ``demo``) run as a user runs them.

Every command goes through its real entry point, ``python -m ordering_sql``, in a subprocess, on
SQLite and on Postgres (the ``database_url`` fixture). State the CLI must find (lost followers,
expired rows) is written through the library beforehand, and the instance closed before the CLI
runs.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from sqlalchemy import insert, inspect
from sqlalchemy.ext.asyncio import create_async_engine

from ordering_sql import ReceivedEvent
from ordering_sql.tools.effects import EFFECTS, check_effects, create_effects
from ordering_sql.tools.simulation import build_stream
from tests.acceptance.test_cli import Result, _environment
from tests.conftest import OrderingFactory
from tests.support import Clock, chain, make_event

TIMEOUT_S = 60
DEMO_TIMEOUT_S = 45
ENTRY = [sys.executable, "-m", "ordering_sql"]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "jumbled.jsonl"
SECRET = "secret"
BAD_URL = f"postgresql+asyncpg://u:{SECRET}@127.0.0.1:1/x"
PAST_LOOKBACK = timedelta(minutes=20)  # the lookback is 15 minutes

SUMMARY = re.compile(
    r"^ordering-sql: read (?P<read>\d+), emitted (?P<emitted>\d+) "
    r"\((?P<released>\d+) released by their leader, (?P<flushed>\d+) lost followers flushed\), "
    r"parked (?P<parked>\d+), duplicates (?P<duplicates>\d+), malformed (?P<malformed>\d+)$"
)


# -- running the command line ------------------------------------------------------------------


@dataclass(frozen=True)
class OperatorCli:
    """``python -m ordering_sql`` in ``cwd`` with a clean environment; stdin may be fed."""

    cwd: Path
    env: dict[str, str]

    async def __call__(
        self, *args: str, stdin: bytes | None = None, within_s: float = TIMEOUT_S
    ) -> Result:
        proc = await asyncio.create_subprocess_exec(
            *ENTRY,
            *args,
            cwd=self.cwd,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), within_s)
        except TimeoutError:
            proc.kill()
            await proc.communicate()
            raise
        assert proc.returncode is not None
        return Result(proc.returncode, out.decode(), err.decode())


@pytest.fixture
def ocli(tmp_path: Path) -> OperatorCli:
    workdir = tmp_path / "work"
    workdir.mkdir()
    return OperatorCli(workdir, _environment())


@dataclass(frozen=True)
class Summary:
    """The counts in ``order``'s summary line; ``released`` and ``flushed`` are in ``emitted``."""

    read: int = 0
    emitted: int = 0
    released: int = 0  # released by their leader
    flushed: int = 0  # lost followers flushed
    parked: int = 0
    duplicates: int = 0
    malformed: int = 0


def summary_of(result: Result) -> Summary:
    """The one summary line ``order`` writes, last, on stderr."""
    matches = [m for line in result.stderr_lines if (m := SUMMARY.match(line))]
    assert len(matches) == 1, result.stderr
    assert result.stderr_lines[-1] == matches[0].group(0), result.stderr
    return Summary(**{name: int(value) for name, value in matches[0].groupdict().items()})


def emitted(result: Result) -> list[ReceivedEvent]:
    """The events ``order`` wrote to stdout, in order; every stdout line must be one."""
    return [ReceivedEvent.model_validate_json(line) for line in result.stdout.splitlines()]


def ids(events: Sequence[ReceivedEvent]) -> list[UUID]:
    return [event.id for event in events]


async def all_scopes(ocli: OperatorCli, url: str) -> dict[str, dict[str, Any]]:
    """``status --json`` by scope, without the ages (they grow between two calls)."""
    result = await ocli("status", "--database-url", url, "--json")
    assert result.code == 0, result
    return {
        row["scope"]: {k: v for k, v in row.items() if k != "oldest_parked_age"}
        for row in json.loads(result.stdout)
    }


def assert_causal(out: Sequence[ReceivedEvent], given: Sequence[ReceivedEvent]) -> None:
    """Each input event emitted exactly once, never before a leader that is in the input."""
    counts = Counter(ids(out))
    assert set(counts) == set(ids(given)), "every event emitted, and nothing else"
    assert [i for i, n in counts.items() if n > 1] == [], "no event emitted twice"
    position = {event.id: index for index, event in enumerate(out)}
    for event in out:
        if event.follows is not None and event.follows in position:
            assert position[event.follows] < position[event.id], (
                f"{event.event} {event.id} emitted before its leader {event.follows}"
            )


def dump(event: ReceivedEvent, *, with_received: bool = True) -> str:
    return event.model_dump_json() if with_received else event.model_dump_json(exclude={"received"})


def write_lines(path: Path, lines: Sequence[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def jumbled_families(seed: int) -> list[ReceivedEvent]:
    """Two chains, a fan, a two-level tree and a lone event, shuffled."""
    events: list[ReceivedEvent] = [*chain(6), *chain(5)]
    fan_root = make_event(name="fan.root")
    events += [fan_root, *(make_event(follows=fan_root, name=f"fan.{i}") for i in range(4))]
    tree_root = make_event(name="tree.root")
    events.append(tree_root)
    for i in range(2):
        branch = make_event(follows=tree_root, name=f"tree.{i}")
        events += [branch, *(make_event(follows=branch, name=f"tree.{i}.{j}") for j in range(2))]
    events.append(make_event(name="lone"))
    random.Random(seed).shuffle(events)
    return events


def expected_counts(arrivals: Sequence[ReceivedEvent]) -> tuple[int, int, int]:
    """(parked, released by their leader, duplicates) of one run over these arrivals.

    The contract as a model: an event goes out when its leader was handled (or it has none),
    else it waits; a leader going out releases its waiting followers; an event already handled
    is a duplicate. (The arrivals never repeat an event that is still waiting.)
    """
    handled: set[UUID] = set()
    waiting: dict[UUID, list[UUID]] = defaultdict(list)
    parked = released = duplicates = 0
    for event in arrivals:
        if event.id in handled:
            duplicates += 1
            continue
        if event.follows is not None and event.follows not in handled:
            waiting[event.follows].append(event.id)
            parked += 1
            continue
        ready = [event.id]
        while ready:
            done = ready.pop()
            handled.add(done)
            followers = waiting.pop(done, [])
            released += len(followers)
            ready += followers
    return parked, released, duplicates


# -- order ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "parked_and_released"),
    [
        # One line at a time: five followers come before their leader, park, and are released.
        (["--batch", "1"], 5),
        (["--batch", "3"], 5),
        # The whole file in one batch (the default for a FILE): every leader is in the batch,
        # so every event is simply written out in causal order.
        ([], 0),
    ],
    ids=["batch-1", "batch-3", "default"],
)
async def test_order_example_file_in_causal_order(
    ocli: OperatorCli, database_url: str, batch: list[str], parked_and_released: int
) -> None:
    given = [ReceivedEvent.model_validate_json(line) for line in EXAMPLE.read_text().splitlines()]
    unique = list({event.id: event for event in given}.values())

    result = await ocli("order", str(EXAMPLE), "--database-url", database_url, *batch)

    assert result.code == 0, result
    out = emitted(result)
    assert_causal(out, unique)
    by_id = {event.id: event for event in unique}
    for event in out:
        assert event.model_dump(exclude={"received"}) == by_id[event.id].model_dump(
            exclude={"received"}
        ), "events go out unchanged"
    assert result.stderr_lines == [result.stderr_lines[-1]], "only the summary on stderr"
    assert summary_of(result) == Summary(
        read=9,
        emitted=8,
        released=parked_and_released,
        flushed=0,
        parked=parked_and_released,
        duplicates=1,
        malformed=0,
    )


async def test_order_generated_jumbled_families(
    ocli: OperatorCli, database_url: str, tmp_path: Path
) -> None:
    events = jumbled_families(seed=20261128)
    without_received = {event.id for event in events[::3]}
    duplicates = [events[0], events[7], events[-1]]  # repeated after everything went out
    arrivals = [*events, *duplicates]
    lines = [dump(e, with_received=e.id not in without_received) for e in arrivals]
    lines.insert(5, "")  # a blank line is neither read nor malformed
    path = write_lines(tmp_path / "families.jsonl", lines)
    parked, released, dups = expected_counts(arrivals)
    assert dups == 3
    assert parked > 0, "the shuffle must park some followers for this test to mean anything"
    before = datetime.now(UTC)

    # One line at a time, so that the per-line model above predicts parked and released.
    result = await ocli(
        "order", str(path), "--database-url", database_url, "--scope", "gen", "--batch", "1"
    )

    after = datetime.now(UTC)
    assert result.code == 0, result
    out = emitted(result)
    assert_causal(out, events)
    given = {event.id: event for event in events}
    for event in out:
        if event.id in without_received:
            assert before <= event.received <= after, "received is set on arrival"
        else:
            assert event.received == given[event.id].received, "a given received is kept"
    assert summary_of(result) == Summary(
        read=len(arrivals),
        emitted=len(events),
        released=released,
        flushed=0,
        parked=parked,
        duplicates=3,
        malformed=0,
    )


async def test_order_parks_follower_until_a_later_run_brings_its_leader(
    ocli: OperatorCli, database_url: str, tmp_path: Path
) -> None:
    leader = make_event(name="leader")
    follower = make_event(follows=leader, name="follower")
    first = write_lines(tmp_path / "first.jsonl", [dump(follower, with_received=False)])
    second = write_lines(tmp_path / "second.jsonl", [dump(leader, with_received=False)])
    url = ["--database-url", database_url]

    run1 = await ocli("order", str(first), *url)

    assert run1.code == 0, run1
    assert run1.stdout == "", "the follower waits for its leader"
    assert summary_of(run1) == Summary(read=1, parked=1)
    status, elsewhere = await asyncio.gather(
        all_scopes(ocli, database_url),
        ocli("order", str(second), *url, "--scope", "other"),
    )
    parked = status["default"]
    assert (parked["parked"], parked["claimed"], parked["past_lookback"]) == (1, 0, 0)
    assert parked["seen"] == 0
    assert elsewhere.code == 0, elsewhere
    assert ids(emitted(elsewhere)) == [leader.id], "another scope does not release it"

    run2 = await ocli("order", str(second), *url)

    assert run2.code == 0, run2
    assert ids(emitted(run2)) == [leader.id, follower.id]
    assert summary_of(run2) == Summary(read=1, emitted=2, released=1)


async def test_order_reads_stdin_with_dash_and_without_argument(
    ocli: OperatorCli, database_url: str
) -> None:
    root, *rest = chain(4)
    jumbled = [rest[2], rest[0], root, rest[1]]
    data = "".join(dump(e, with_received=i % 2 == 0) + "\n" for i, e in enumerate(jumbled))
    url = ["--database-url", database_url]

    results = await asyncio.gather(  # one scope each, so neither sees the other's events
        ocli("order", "-", *url, "--scope", "dash", stdin=data.encode()),
        ocli("order", *url, "--scope", "no-argument", stdin=data.encode()),
    )

    parked, released, _ = expected_counts(jumbled)
    assert (parked, released) == (2, 2)
    for result in results:
        assert result.code == 0, result
        assert ids(emitted(result)) == ids([root, *rest])
        assert summary_of(result) == Summary(read=4, emitted=4, released=released, parked=parked)


def malformed_input() -> tuple[ReceivedEvent, ReceivedEvent, ReceivedEvent, list[str]]:
    """Valid lines 1, 6 and 7; line 2 bad JSON, 3 blank, 4 no ``event``, 5 a naive datetime."""
    first = make_event(name="first")
    after = make_event(follows=first, name="after")
    last = make_event(name="last")
    missing = json.loads(dump(make_event()))
    del missing["event"]
    naive = json.loads(dump(make_event()))
    naive["occurred"] = "2026-11-28T09:00:00"
    lines = [
        dump(first),
        '{"occurred": "2026-11-28T09:00:00Z", "event": ',
        "",
        json.dumps(missing),
        json.dumps(naive),
        dump(after, with_received=False),
        dump(last),
    ]
    return first, after, last, lines


async def test_order_skips_malformed_lines_and_names_them(
    ocli: OperatorCli, database_url: str, tmp_path: Path
) -> None:
    first, after, last, lines = malformed_input()
    path = write_lines(tmp_path / "malformed.jsonl", lines)

    result = await ocli("order", str(path), "--database-url", database_url)

    assert result.code == 3, result
    assert "Traceback" not in result.stderr
    assert ids(emitted(result)) == [first.id, after.id, last.id], "the other lines go through"
    complaints = {
        int(m.group(1)): line
        for line in result.stderr_lines
        if (m := re.match(r"^ordering-sql: line (\d+): ", line))
    }
    assert sorted(complaints) == [2, 4, 5]
    assert "event" in complaints[4], "the missing field is named"
    assert "occurred" in complaints[5], "the field with a naive datetime is named"
    assert summary_of(result) == Summary(read=6, emitted=3, malformed=3)


async def test_order_strict_stops_at_the_first_malformed_line(
    ocli: OperatorCli, database_url: str, make_ordering: OrderingFactory, tmp_path: Path
) -> None:
    first, after, last, lines = malformed_input()
    path = write_lines(tmp_path / "malformed.jsonl", lines)

    result = await ocli("order", str(path), "--database-url", database_url, "--strict")

    assert result.code == 3, result
    assert "Traceback" not in result.stderr
    assert ids(emitted(result)) == [first.id], "what came before went out, nothing after"
    assert any("line 2" in line for line in result.stderr_lines), result.stderr
    assert not any("line 4" in line or "line 5" in line for line in result.stderr_lines)
    ordering = make_ordering("default")
    assert await ordering.event_has_been_seen(first)
    for unread in (after, last):
        assert not await ordering.event_has_been_seen(unread), "nothing after it was processed"
    assert await ordering.get_followers(first) == []


async def test_order_skips_and_counts_duplicates_within_and_across_runs(
    ocli: OperatorCli, database_url: str, tmp_path: Path
) -> None:
    root, child = chain(2)
    lines = [dump(child), dump(root), dump(child), dump(root, with_received=False)]
    path = write_lines(tmp_path / "dups.jsonl", lines)
    url = ["--database-url", database_url, "--batch", "1"]

    run1 = await ocli("order", str(path), *url)

    assert run1.code == 0, run1
    assert ids(emitted(run1)) == [root.id, child.id]
    assert summary_of(run1) == Summary(read=4, emitted=2, released=1, parked=1, duplicates=2)

    run2 = await ocli("order", str(path), *url)

    assert run2.code == 0, run2
    assert run2.stdout == "", "events handled by an earlier run are not emitted again"
    assert summary_of(run2) == Summary(read=4, duplicates=4)


async def test_order_flush_lost_emits_followers_past_the_lookback(
    ocli: OperatorCli, database_url: str, make_ordering: OrderingFactory, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    lost = make_event(follows=uuid4(), received=now - PAST_LOOKBACK, name="lost")
    fresh = make_event(follows=uuid4(), received=now, name="fresh")
    ordering = make_ordering("default")
    for follower in (lost, fresh):
        await ordering.record_follower(follower)
    await ordering.close()
    unrelated = make_event(name="unrelated")
    path = write_lines(tmp_path / "unrelated.jsonl", [dump(unrelated)])
    url = ["--database-url", database_url]

    without = await ocli("order", str(path), *url)

    assert without.code == 0, without
    assert ids(emitted(without)) == [unrelated.id], "lost followers stay without --flush-lost"
    assert summary_of(without) == Summary(read=1, emitted=1)

    flushed = await ocli("order", "--flush-lost", *url, stdin=b"")

    assert flushed.code == 0, flushed
    out = emitted(flushed)
    assert ids(out) == [lost.id], "only the follower past the lookback is flushed"
    assert out[0] == lost
    assert summary_of(flushed) == Summary(emitted=1, flushed=1)
    check = make_ordering("default")
    assert await check.get_followers(fresh.follows) == [fresh], "the fresh follower still waits"
    assert await check.get_followers(lost.follows) == [], "the flushed one is gone"
    assert await check.event_has_been_seen(lost), "and was handled"


# -- lost -----------------------------------------------------------------------------------------


async def test_lost_lists_without_removing_and_take_removes(
    ocli: OperatorCli, database_url: str, make_ordering: OrderingFactory
) -> None:
    now = datetime.now(UTC)
    old = now - PAST_LOOKBACK
    lost = [
        make_event(follows=uuid4(), received=old, occurred=now - timedelta(seconds=9), name="a"),
        make_event(follows=uuid4(), received=old, occurred=now - timedelta(seconds=5), name="b"),
    ]
    fresh = make_event(follows=uuid4(), name="fresh")
    elsewhere = make_event(follows=uuid4(), received=old, name="elsewhere")
    ordering = make_ordering("ops")
    for follower in (lost[1], fresh, lost[0]):
        await ordering.record_follower(follower)
    other_scope = make_ordering("elsewhere")
    await other_scope.record_follower(elsewhere)
    await ordering.close()
    await other_scope.close()
    url = ["--database-url", database_url]

    peek1 = await ocli("lost", "--scope", "ops", *url)
    peek2, after_peek = await asyncio.gather(
        ocli("lost", "--scope", "ops", *url), all_scopes(ocli, database_url)
    )

    assert peek1.code == 0, peek1
    assert emitted(peek1) == lost, "the lost followers, in occurred order, as JSON lines"
    assert "nothing removed" in peek1.stderr
    assert peek2.code == 0, peek2
    assert peek2.stdout == peek1.stdout, "looking removes nothing"
    parked = {scope: (row["parked"], row["past_lookback"]) for scope, row in after_peek.items()}
    assert parked == {"elsewhere": (1, 1), "ops": (3, 2)}, "looking removes nothing"

    take1 = await ocli("lost", "--scope", "ops", "--take", *url)
    take2 = await ocli("lost", "--scope", "ops", "--take", *url)

    assert take1.code == 0, take1
    assert emitted(take1) == lost
    assert take2.code == 0, take2
    assert take2.stdout == "", "taken followers are gone"
    check = make_ordering("ops")
    assert await check.followers_by_id([*ids(lost), fresh.id]) == [fresh], "the fresh one stays"
    other = make_ordering("elsewhere")
    assert await other.followers_by_id([elsewhere.id]) == [elsewhere], "other scopes stay"


# -- purge ----------------------------------------------------------------------------------------


async def test_purge_dry_run_counts_and_purge_deletes_expired_rows_only(
    ocli: OperatorCli, database_url: str, make_ordering: OrderingFactory, clock: Clock
) -> None:
    past = make_ordering("test", clock=Clock(clock.now - timedelta(hours=2)))
    for _ in range(3):
        await past.record_event_as_seen(make_event())
    assert await past.record_event_as_processing(make_event())
    live = make_ordering("test", lease_timeout=timedelta(hours=1))
    for _ in range(2):
        await live.record_event_as_seen(make_event())
    assert await live.record_event_as_processing(make_event())
    await past.close()
    await live.close()
    url = ["--database-url", database_url]
    marks = ("seen", "seen_expired", "processing", "processing_expired")

    dry = await ocli("purge", "--dry-run", *url)

    assert dry.code == 0, dry
    assert dry.stdout == "would delete (dry run) 4 expired rows: 3 seen records, 1 expired leases\n"

    real = await ocli("purge", *url)

    assert real.code == 0, real
    assert real.stdout == "deleted 4 expired rows: 3 seen records, 1 expired leases\n", (
        "the dry run removed nothing: the real purge finds the same rows"
    )
    after = await all_scopes(ocli, database_url)
    assert [after["test"][m] for m in marks] == [2, 0, 1, 0], "expired rows gone, live rows stay"


# -- demo -----------------------------------------------------------------------------------------


def assert_demo_passed(result: Result, events: int = 200) -> None:
    assert result.code == 0, result
    out = result.stdout
    assert re.search(rf"^\s+events\s+{events} \(", out, re.MULTILINE), out
    assert re.search(r"^\s+order violations\s+0$", out, re.MULTILINE), out
    assert re.search(r"^\s+events lost\s+0$", out, re.MULTILINE), out
    assert re.search(r"^\s+handled twice\s+\d+", out, re.MULTILINE), out
    assert re.search(r"^\s+duplicates skipped\s+\d+$", out, re.MULTILINE), out
    assert re.search(r"^\s+parked, then replayed\s+\d+ parked, \d+ replayed", out, re.MULTILINE)
    assert re.search(r"^\s+throughput\s+[\d,]+ events/s", out, re.MULTILINE), out
    assert re.search(r"^\s+verdict\s+PASSED$", out, re.MULTILINE), out
    assert "Traceback" not in result.stderr


@pytest.mark.slow
async def test_demo_passes_on_default_sqlite(ocli: OperatorCli) -> None:
    result = await ocli(
        "demo", "--events", "200", "--workers", "3", "--seed", "1", within_s=DEMO_TIMEOUT_S
    )
    assert_demo_passed(result)
    assert not (ocli.cwd / "ordering.db").exists(), "the default demo uses a temporary database"


@pytest.mark.slow
@pytest.mark.postgres
async def test_demo_passes_on_postgres(ocli: OperatorCli, postgres_url: str) -> None:
    result = await ocli(
        "demo",
        "--database-url",
        postgres_url,
        "--events",
        "200",
        "--workers",
        "3",
        "--seed",
        "1",
        within_s=DEMO_TIMEOUT_S,
    )
    assert_demo_passed(result)


async def test_status_watch_refreshes_the_table_until_interrupted(
    ocli: OperatorCli, make_ordering: OrderingFactory, database_url: str
) -> None:
    """A backlog appears while ``status --watch`` runs: a later table shows it; Ctrl-C (SIGINT)
    ends the watch with exit code 0. Piped, each refresh is printed after the last."""
    ordering = make_ordering("watched")
    await ordering.check()
    proc = await asyncio.create_subprocess_exec(
        *ENTRY,
        "status",
        "--watch",
        "0.2",
        "--database-url",
        database_url,
        cwd=ocli.cwd,
        env=ocli.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        first = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT_S)
        assert b"No ordering state" in first, first
        for _ in range(3):  # three followers wait for a leader that has not come
            await ordering.record_follower(make_event(follows=make_event()))
        seen = b""
        while not re.search(rb"watched\s+0\s+0\s+0\s+0\s+3\s", seen):
            seen += await asyncio.wait_for(proc.stdout.readline(), TIMEOUT_S)
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), TIMEOUT_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err
    assert b"Traceback" not in err


async def test_status_watch_refuses_json(ocli: OperatorCli) -> None:
    result = await ocli("status", "--watch", "--json")
    assert result.code != 0
    assert "--watch refreshes the table" in result.stderr
    result = await ocli("status", "--watch", "0")
    assert result.code != 0
    assert "must be more than 0" in result.stderr


def assert_effects_once(result: Result) -> None:
    out = result.stdout
    pattern = r"^\s+effect rows\s+120 for 120 events: 0 missing, 0 twice, 0 before their leader$"
    assert re.search(pattern, out, re.MULTILINE), out


@pytest.mark.slow
async def test_demo_exactly_once_writes_one_effect_row_per_event_on_sqlite(
    ocli: OperatorCli,
) -> None:
    result = await ocli(
        "demo",
        "--exactly-once",
        "--events",
        "120",
        "--workers",
        "3",
        "--seed",
        "2",
        within_s=DEMO_TIMEOUT_S,
    )
    assert_demo_passed(result, events=120)
    assert_effects_once(result)


@pytest.mark.slow
@pytest.mark.postgres
async def test_demo_exactly_once_on_postgres_leaves_no_effects_table(
    ocli: OperatorCli, postgres_url: str
) -> None:
    result = await ocli(
        "demo",
        "--exactly-once",
        "--database-url",
        postgres_url,
        "--events",
        "120",
        "--workers",
        "3",
        within_s=DEMO_TIMEOUT_S,
    )
    assert_demo_passed(result, events=120)
    assert_effects_once(result)
    engine = create_async_engine(postgres_url)
    try:
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
    finally:
        await engine.dispose()
    assert EFFECTS.name not in tables


async def test_the_effects_verdict_fails_on_a_missing_a_double_or_an_early_row(
    tmp_path: Path,
) -> None:
    """What ``demo --exactly-once`` judges by: each kind of wrong effect rows is caught."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'effects.db'}"
    stream = build_stream(3, seed=0, duplicate_rate=0.0, max_family=3)
    first, second, third = stream.events
    await create_effects(url)
    engine = create_async_engine(url)

    def row(event: ReceivedEvent, *, after_leader: bool) -> dict[str, Any]:
        leader = None if event.follows is None else str(event.follows)
        return {
            "event_id": str(event.id),
            "leader_id": leader,
            "after_leader": after_leader,
            "worker": "w",
        }

    try:
        async with engine.begin() as conn:
            await conn.execute(
                insert(EFFECTS),
                [
                    row(first, after_leader=False),
                    row(first, after_leader=False),
                    row(second, after_leader=False),
                ],
            )
    finally:
        await engine.dispose()
    found = await check_effects(url, stream)
    assert (found.missing, found.twice, found.before_leader) == (1, 1, 1), found
    assert not found.ok
    assert any(str(third.id) in example for example in found.examples)
    assert any(str(second.id) in example for example in found.examples)


# -- errors and help -------------------------------------------------------------------------------


async def test_bad_url_is_one_clean_line(ocli: OperatorCli) -> None:
    results = await asyncio.gather(
        ocli("order", "--database-url", BAD_URL, stdin=EXAMPLE.read_bytes()),
        ocli("lost", "--scope", "s", "--database-url", BAD_URL),
        ocli("purge", "--database-url", BAD_URL),
    )
    for result in results:
        assert result.code != 0, result
        assert len(result.stderr_lines) == 1, result.stderr
        assert result.stderr_lines[0].startswith("ordering-sql: error:"), result.stderr
        assert "127.0.0.1:1" in result.stderr, "the message names the database"
        assert "Traceback" not in result.stderr
        assert SECRET not in result.stderr + result.stdout
        assert result.stdout == ""


async def test_order_help_mentions_its_options(ocli: OperatorCli) -> None:
    result = await ocli("order", "--help")
    assert result.code == 0, result
    for option in ("--flush-lost", "--strict", "--scope", "--database-url"):
        assert option in result.stdout


# -- long chains, bad bytes, old events, bad URLs ---------------------------------------------


async def test_order_releases_a_long_chain_that_arrives_backwards(
    ocli: OperatorCli, sqlite_url: str, tmp_path: Path
) -> None:
    events = chain(25)
    path = write_lines(tmp_path / "backwards.jsonl", [dump(e) for e in reversed(events)])

    result = await ocli("order", str(path), "--database-url", sqlite_url)

    assert result.code == 0, result
    assert ids(emitted(result)) == ids(events)


async def test_order_skips_a_line_that_is_not_utf8(
    ocli: OperatorCli, sqlite_url: str, tmp_path: Path
) -> None:
    good = make_event()
    path = tmp_path / "binary.jsonl"
    path.write_bytes(b'\xff\xfe{"x": 1}\n' + dump(good).encode() + b"\n")

    result = await ocli("order", str(path), "--database-url", sqlite_url)

    assert result.code == 3, result
    assert ids(emitted(result)) == [good.id]
    assert any(line.startswith("ordering-sql: line 1:") for line in result.stderr_lines)


async def test_order_restamp_keeps_follows_edges_of_events_received_long_ago(
    ocli: OperatorCli, sqlite_url: str, tmp_path: Path
) -> None:
    old = datetime.now(UTC) - timedelta(hours=1)
    leader = make_event(received=old, name="leader")
    follower = make_event(follows=leader, received=old, name="follower")
    path = write_lines(tmp_path / "archive.jsonl", [dump(follower), dump(leader)])

    result = await ocli("order", str(path), "--database-url", sqlite_url, "--restamp")

    assert result.code == 0, result
    assert ids(emitted(result)) == [leader.id, follower.id]


async def test_order_lets_events_older_than_the_lookback_through(
    ocli: OperatorCli, sqlite_url: str, tmp_path: Path
) -> None:
    """Without --restamp, the engine's rule holds: an event received long ago does not wait."""
    old = datetime.now(UTC) - timedelta(hours=1)
    leader = make_event(received=old, name="leader")
    follower = make_event(follows=leader, received=old, name="follower")
    path = write_lines(tmp_path / "archive.jsonl", [dump(follower), dump(leader)])

    result = await ocli("order", str(path), "--database-url", sqlite_url)

    assert result.code == 0, result
    assert ids(emitted(result)) == [follower.id, leader.id]


async def test_order_with_bad_url_fails_even_on_empty_input(ocli: OperatorCli) -> None:
    result = await ocli("order", "--database-url", BAD_URL, stdin=b"")

    assert result.code != 0, result
    assert len(result.stderr_lines) == 1, result.stderr
    assert result.stderr_lines[0].startswith("ordering-sql: error:")
