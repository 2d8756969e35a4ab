"""Two Prefect servers, in two OS processes, get the same event at once (issue item 7).

Prefect's messaging may deliver one event to two servers (a redelivery, a rebalanced stream).
With ``ordering_sql.prefect`` on one shared database, the server that loses the race for the
event's processing lease must end the way Prefect's consumer expects: its message handler
returns (Prefect's ``message_handler`` catches only ``EventArrivedEarly``; any other exception
escapes to ``consume_loop``, which logs "Failed in consume_loop" at ERROR, retries the message
and finally writes it to the dead-letter folder), the event is evaluated exactly once, and it is
still evaluated if the server holding it dies mid-evaluation.

Each server is a child process (``_duplicate_consumer.py``) running Prefect's own
``triggers.consumer``, with its own Prefect home and database (SQLite) and the ordering tables
on one Postgres database (``ORDERING_SQL_DATABASE_URL``). Trigger evaluation is observed by
wrapping ``find_interested_triggers`` and made slow enough (50-200 ms) that the two servers
really overlap; every log record at WARNING or above of the ``prefect`` and ``ordering_sql``
loggers is reported back by each child.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prefect.server.events.schemas.events import ReceivedEvent

import ordering_sql
import ordering_sql.prefect
from tests.prefect.conftest import REPO_ROOT, prefect_child_env
from tests.prefect.support import make_event

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

#: How long a child may take to reach a signal (start-up includes importing Prefect).
CHILD_TIMEOUT_S = 90.0
#: Events in the simultaneous-delivery test, and the time between two of them.
EVENTS = 20
SLOT_S = 0.35
#: Prefect's in-flight timeout (8 s) x 2: a dead server's lease on an event ends by then.
LEASE_TIMEOUT_S = 16.0
#: After the holder is killed (at least half a second after it took the event), how long the
#: other server has to evaluate the event: the lease expiring, then its own retry or its periodic
#: evaluation (every PERIODIC_S).
TAKEOVER_DEADLINE_S = LEASE_TIMEOUT_S + 8.0
PERIODIC_S = 1.0


@dataclass
class Server:
    name: str
    directory: Path
    spec: dict[str, Any]
    process: subprocess.Popen[bytes]

    @property
    def records_path(self) -> Path:
        return Path(self.spec["records"])

    def records(self, kind: str | None = None) -> list[dict[str, Any]]:
        if not self.records_path.exists():
            return []
        lines = self.records_path.read_text().splitlines()
        # A child killed mid-write may leave a partial last line.
        parsed = []
        for line in lines:
            try:
                parsed.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return [r for r in parsed if kind is None or r["kind"] == kind]

    def stderr(self) -> str:
        return (self.directory / "stderr.txt").read_text()[-4000:]

    def errors_logged(self) -> list[dict[str, Any]]:
        return [r for r in self.records("log") if r["level"] in ("ERROR", "CRITICAL")]

    def failed_calls(self) -> list[dict[str, Any]]:
        return [r for r in self.records("handled") if r["error"] is not None]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _start_server(
    tmp_path: Path,
    name: str,
    prefect_db_template: Path,
    ordering_url: str,
    phases: list[dict[str, Any]],
    **spec_extra: Any,
) -> Server:
    directory = tmp_path / name
    directory.mkdir()
    shutil.copyfile(prefect_db_template, directory / "prefect.db")
    spec = {
        "records": str(directory / "records.jsonl"),
        "imported": str(directory / "imported"),
        "start": str(directory / "start"),
        "ready": str(directory / "ready"),
        "phases": phases,
        **spec_extra,
    }
    (directory / "spec.json").write_text(json.dumps(spec))
    env = prefect_child_env(
        directory / "home", directory / "prefect.db", ORDERING_SQL_DATABASE_URL=ordering_url
    )
    with (directory / "stderr.txt").open("wb") as stderr:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.prefect._duplicate_consumer",
                str(directory / "spec.json"),
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    return Server(name, directory, spec, process)


async def _wait_until(what: str, done: Any, servers: list[Server]) -> None:
    """Poll ``done()`` until it is true; fail if a child exits first or time runs out."""
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not done():
        for server in servers:
            if server.process.poll() is not None:
                pytest.fail(f"server {server.name} exited early:\n{server.stderr()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def _start_together(servers: list[Server]) -> None:
    files = [Path(s.spec["imported"]) for s in servers]
    await _wait_until(
        "both servers to import Prefect", lambda: all(map(Path.exists, files)), servers
    )
    for server in servers:
        _signal(server.spec["start"])
    files = [Path(s.spec["ready"]) for s in servers]
    await _wait_until("both consumers to start", lambda: all(map(Path.exists, files)), servers)


def _signal(path: str, text: str = "") -> None:
    """Create ``path`` with ``text`` in one step, so that a child never reads it half-written."""
    partial = Path(f"{path}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def _phase(directory: Path, name: str, events: list[ReceivedEvent], slot: float = 0.0) -> Any:
    return {
        "start": str(directory / f"{name}.start"),
        "done": str(directory / f"{name}.done"),
        "events": [event.model_dump(mode="json") for event in events],
        "slot": slot,
    }


def _observations(servers: list[Server]) -> str:
    """What each server did, for the failure messages (and the report)."""
    lines = []
    for server in servers:
        handled = server.records("handled")
        failures = Counter(f"{r['error_module']}.{r['error']}" for r in server.failed_calls())
        lines.append(
            f"{server.name}: {len(server.records('evaluating'))} evaluations, "
            f"{len(handled)} handler calls returned or raised, raised: {dict(failures)}, "
            f"ERROR records: {[(r['logger'], r['message']) for r in server.errors_logged()]}, "
            f"WARNING records: "
            f"{[(r['logger'], r['message']) for r in server.records('log')][:5]}"
        )
        for failure in server.failed_calls()[:1]:
            lines.append(
                f"  first exception raised by {server.name}'s handler:\n{failure['traceback']}"
            )
    return "\n".join(lines)


async def test_an_event_given_to_two_servers_at_once_is_evaluated_once_and_acked_by_both(
    tmp_path: Path, postgres_url: str, prefect_db_template: Path
) -> None:
    events = [make_event(name=f"duplicated.{i}") for i in range(EVENTS)]
    rng = random.Random(7)
    delays = {str(event.id): rng.uniform(0.05, 0.2) for event in events}
    servers = []
    try:
        for name in ("server-a", "server-b"):
            phases = [_phase(tmp_path / name, "both", events, slot=SLOT_S)]
            servers.append(
                _start_server(
                    tmp_path, name, prefect_db_template, postgres_url, phases, delays=delays
                )
            )
        await _start_together(servers)
        t0 = time.monotonic_ns() + 300_000_000
        for server in servers:
            _signal(server.spec["phases"][0]["start"], str(t0))
        done = [Path(s.spec["phases"][0]["done"]) for s in servers]
        await _wait_until(
            "both servers to handle every event", lambda: all(map(Path.exists, done)), servers
        )
        for server in servers:
            server.process.wait(timeout=CHILD_TIMEOUT_S)
            assert server.process.returncode == 0, server.stderr()
    finally:
        for server in servers:
            server.stop()

    observed = _observations(servers)
    evaluations = Counter(r["id"] for s in servers for r in s.records("evaluating"))
    handled = [r for s in servers for r in s.records("handled")]
    assert len(handled) == 2 * EVENTS, observed

    # The servers really overlapped: for most events, the second handler call began while the
    # first server was still evaluating the event.
    evaluated_by = {r["id"]: r["pid"] for s in servers for r in s.records("evaluating")}
    evaluation_end = {r["id"]: r["ns"] for s in servers for r in s.records("evaluated")}
    overlapped = sum(
        1
        for server in servers
        for call in server.records("handling")
        if evaluated_by.get(call["id"]) not in (None, server.process.pid)
        and call["ns"] < evaluation_end.get(call["id"], 0)
    )
    assert overlapped >= EVENTS // 2, f"only {overlapped} events overlapped\n{observed}"

    assert all(evaluations[str(e.id)] == 1 for e in events), (evaluations, observed)
    assert [s.failed_calls() for s in servers] == [[], []], observed
    assert [s.errors_logged() for s in servers] == [[], []], observed


async def test_an_event_whose_server_dies_mid_evaluation_is_evaluated_by_the_other_one(
    tmp_path: Path,
    postgres_url: str,
    prefect_db_template: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    event = make_event(name="held.then.orphaned")
    holder_dir, other_dir = tmp_path / "holder", tmp_path / "other"
    holder = _start_server(
        tmp_path,
        "holder",
        prefect_db_template,
        postgres_url,
        [_phase(holder_dir, "hold", [event])],
        block=[str(event.id)],
    )
    other = _start_server(
        tmp_path,
        "other",
        prefect_db_template,
        postgres_url,
        [_phase(other_dir, "receive", [event])],
        delays={str(event.id): 0.1},
        periodic_every=PERIODIC_S,
        finish=str(other_dir / "finish"),
    )
    servers = [holder, other]
    try:
        await _start_together(servers)
        _signal(holder.spec["phases"][0]["start"])
        await _wait_until(
            "the holder to start evaluating", lambda: holder.records("blocked"), servers
        )
        _signal(other.spec["phases"][0]["start"])
        await _wait_until(
            "the other server to get the event", lambda: other.records("handling"), servers
        )
        await asyncio.sleep(0.5)  # the other server's handler is now running (or already done)
        holder.process.send_signal(signal.SIGKILL)
        holder.process.wait(timeout=10)
        killed_ns = time.monotonic_ns()

        deadline = time.monotonic() + TAKEOVER_DEADLINE_S
        while time.monotonic() < deadline and not (
            other.records("evaluated") and other.records("handled")
        ):
            if other.process.poll() is not None:
                pytest.fail(f"the other server exited early:\n{other.stderr()}")
            await asyncio.sleep(0.05)
        if not other.records("handled"):
            pytest.fail(
                f"the other server's handler had not returned {TAKEOVER_DEADLINE_S} s after the "
                f"kill\n{_observations(servers)}"
            )
        _signal(str(other_dir / "finish"))
        other.process.wait(timeout=CHILD_TIMEOUT_S)
        assert other.process.returncode == 0, other.stderr()
    finally:
        for server in servers:
            server.stop()

    observed = _observations(servers)
    assert holder.records("blocked"), observed
    assert [r["id"] for r in other.records("handled")] == [str(event.id)], observed
    assert other.failed_calls() == [], observed
    evaluated = [r for r in other.records("evaluating") if r["id"] == str(event.id)]
    after = [f"{(r['ns'] - killed_ns) / 1e9:.1f} s" for r in evaluated]
    assert len(evaluated) == 1, f"evaluated by the other server {after} after the kill\n{observed}"
    assert evaluated[0]["ns"] > killed_ns, "evaluated while its holder was still evaluating it"
    assert other.errors_logged() == [], observed
    assert holder.errors_logged() == [], observed

    monkeypatch.setenv("ORDERING_SQL_DATABASE_URL", postgres_url)
    ordering = ordering_sql.prefect.CausalOrdering(scope="triggers")
    assert await ordering.event_has_been_seen(event)
    assert await ordering.get_lost_followers() == []
    await ordering.close()
    await ordering_sql.dispose_engines()
