"""Two Prefect servers' triggers consumers, in two OS processes, sharing one Postgres.

One server is a child process (``_consumer.py``) and gets the leaders; the other is this test's
own process and gets the followers. Each has its own Prefect database (SQLite); the ordering
tables are on one Postgres database, through ``ORDERING_SQL_DATABASE_URL``, which starts EMPTY:
both servers' first use migrates it, at about the same moment.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import anyio
import pytest
from prefect.server.events import triggers
from prefect.server.events.schemas.events import ReceivedEvent

import ordering_sql
import ordering_sql.prefect
from ordering_sql.migration import head_revision
from tests.prefect.conftest import REPO_ROOT, prefect_child_env
from tests.prefect.support import make_event, message, schema_versions, triggers_consumer

CHILD_TIMEOUT_S = 90.0
#: A follower evaluated later than this after its leader was not released by its leader (the
#: lost-follower sweep would take 15 minutes, and does not run during the test).
PROMPTLY_S = 5.0


def _start_child(child_dir: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with (child_dir / "stderr.txt").open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.prefect._consumer", str(child_dir / "spec.json")],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


def _stderr_of(child_dir: Path) -> str:
    return (child_dir / "stderr.txt").read_text()[-4000:]


async def _wait_for(path: Path, child: subprocess.Popen[bytes], child_dir: Path) -> None:
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not await anyio.Path(path).exists():
        if child.poll() is not None:
            pytest.fail(f"the leaders' server exited early:\n{_stderr_of(child_dir)}")
        assert time.monotonic() < deadline, f"timed out waiting for {path.name}"
        await asyncio.sleep(0.01)


@pytest.mark.postgres
@pytest.mark.slow
async def test_leaders_and_followers_on_two_servers_are_evaluated_in_order(
    tmp_path: Path,
    empty_postgres_url: str,
    prefect_db_template: Path,
    prefect_with_db: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Phase 1: every follower reaches its server before its leader reaches the other one.
    # Phase 2: leaders and followers race, one server each.
    phase1 = [(leader, make_event(follows=leader)) for leader in (make_event() for _ in range(8))]
    phase2 = [(leader, make_event(follows=leader)) for leader in (make_event() for _ in range(16))]
    files = {
        name: tmp_path / name
        for name in ("imported", "start", "ready", "followers1", "leaders1", "go2", "leaders2")
    }
    log = tmp_path / "evaluated.jsonl"

    def phase(start: str, done: str, events: list[ReceivedEvent]) -> dict[str, Any]:
        return {
            "start": str(files[start]),
            "done": str(files[done]),
            "events": [event.model_dump(mode="json") for event in events],
        }

    spec = {
        "log": str(log),
        **{name: str(files[name]) for name in ("imported", "start", "ready")},
        "phases": [
            phase("followers1", "leaders1", [leader for leader, _ in phase1]),
            phase("go2", "leaders2", [leader for leader, _ in phase2]),
        ],
    }
    child_dir = tmp_path / "leaders-server"
    child_dir.mkdir()
    shutil.copyfile(prefect_db_template, child_dir / "prefect.db")
    (child_dir / "spec.json").write_text(json.dumps(spec))
    env = prefect_child_env(
        child_dir / "home", child_dir / "prefect.db", ORDERING_SQL_DATABASE_URL=empty_postgres_url
    )
    child = _start_child(child_dir, env)

    # This process is the followers' server, on the same ordering database.
    monkeypatch.setenv("ORDERING_SQL_DATABASE_URL", empty_postgres_url)
    here: list[dict[str, Any]] = []
    original = triggers.find_interested_triggers

    def recording(event: ReceivedEvent) -> Any:
        here.append({"id": str(event.id), "ns": time.monotonic_ns(), "pid": os.getpid()})
        return original(event)

    monkeypatch.setattr(triggers, "find_interested_triggers", recording)

    async def deliver_followers(handle: Any, pairs: list[tuple[Any, Any]]) -> None:
        for _, follower in pairs:
            await handle(message(follower))

    try:
        await _wait_for(files["imported"], child, child_dir)
        files["start"].touch()  # both servers start now, and both migrate the empty database
        async with triggers_consumer() as handle:
            await _wait_for(files["ready"], child, child_dir)
            await deliver_followers(handle, phase1)
            files["followers1"].touch()
            await _wait_for(files["leaders1"], child, child_dir)
            files["go2"].touch()
            await deliver_followers(handle, phase2)
            await _wait_for(files["leaders2"], child, child_dir)
        child.wait(timeout=CHILD_TIMEOUT_S)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, _stderr_of(child_dir)

    records: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in [json.loads(line) for line in log.read_text().splitlines()] + here:
        records[record["id"]].append(record)
    for number, pairs in ((1, phase1), (2, phase2)):
        for leader, follower in pairs:
            assert len(records[str(leader.id)]) == 1, f"phase {number}: leader evaluated once"
            assert len(records[str(follower.id)]) == 1, f"phase {number}: follower evaluated once"
            (led,), (followed,) = records[str(leader.id)], records[str(follower.id)]
            assert led["pid"] == child.pid
            assert led["ns"] < followed["ns"], f"phase {number}: follower before its leader"
            assert (followed["ns"] - led["ns"]) / 1e9 < PROMPTLY_S, f"phase {number}: late"
            if number == 1:  # it had been parked here; the leaders' server released it
                assert followed["pid"] == child.pid
    assert len(records) == 2 * (len(phase1) + len(phase2))

    ordering = ordering_sql.prefect.CausalOrdering(scope="triggers")
    assert await triggers.get_lost_followers() == []
    for leader, _ in phase1 + phase2:
        assert await ordering.get_followers(leader) == []
    await ordering.close()
    await ordering_sql.dispose_engines()

    assert await schema_versions(empty_postgres_url) == [(head_revision(),)]
