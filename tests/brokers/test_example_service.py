"""The example service (``examples/service``) run as a user runs it, on a real RabbitMQ.

The service is an OS process on a SQLite file of the test's own, a queue of its own and a free
metrics port; the publisher sends a seeded, shuffled order stream with duplicates and waits with
``--check`` until the service wrote it. Then what the service reports over HTTP to Prometheus is
held against what happened:

* ``ordering_sql_events_handled_total`` is the number of distinct events, and the ``orders``
  table holds exactly one row per event, each after its leader's row;
* the service's own count of settled messages: every message published acknowledged once,
  none rejected; and every delivery (acknowledged or handed back) is one engine outcome, so
  ``acked + nacked == handled + parked + duplicates + busy - replayed`` (a replayed follower is
  handled, or refused, without a delivery of its own);
* one follower wait recorded per replay; no lost follower, no lost lease;

and nothing is left behind: no message on the queue or dead-lettered, nothing parked, claimed or
held in the ordering's tables. SIGTERM then stops the service cleanly (exit 0, no traceback).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sqlite3
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ordering_sql import ReceivedEvent
from ordering_sql.admin import ScopeStatus, status
from ordering_sql.settings import Settings as StoreSettings
from ordering_sql.store import Store
from tests.brokers.conftest import require
from tests.brokers.support import Kit, channel_name, make_kit
from tests.support import REPO_ROOT, child_env

pytestmark = [pytest.mark.slow, pytest.mark.sqlite]

SERVICE = REPO_ROOT / "examples" / "service"
ORDERS = 150  # three events each
SEED = 11
SCOPE = "orders"  # the service's default scope


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """The samples of ``/metrics``, summed over labels but ``settled`` (``name:settled``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name
            if "settled" in sample.labels:
                key += ":" + sample.labels["settled"]
            found[key] += sample.value
    return found


def ours(found: dict[str, float]) -> dict[str, float]:
    """The engine's and the service's samples, for a failure's message."""
    return {k: v for k, v in found.items() if k.startswith(("ordering_sql_", "orders_service_"))}


async def scope_status(url: str) -> ScopeStatus:
    store = Store.from_settings(StoreSettings(database_url=url))
    try:
        found = await status(store, now=datetime.now(UTC), scope=SCOPE)
    finally:
        await store.dispose()
    return found[0] if found else ScopeStatus(scope=SCOPE)


def table_rows(path: Path) -> list[tuple[int, str, str | None]]:
    """The orders table: (row id, event id, follows), read-only."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return list(db.execute("SELECT id, event_id, follows FROM orders ORDER BY id"))


@pytest.fixture
def rabbit() -> Kit:
    """RabbitMQ, or a skip (a failure under CI=true) as ``conftest.require`` says."""
    require("rabbit")
    return make_kit("rabbit")


@pytest.fixture
async def queue(rabbit: Kit) -> AsyncIterator[str]:
    """A queue name of the test's own; the example declares the queue (and its dead-letter
    queue), and both are deleted afterwards."""
    name = channel_name("ordering-sql-example")
    try:
        yield name
    finally:
        await rabbit.remove(name)


async def test_the_example_service_reports_what_happened(
    rabbit: Kit, queue: str, tmp_path: Path
) -> None:
    kit, name = rabbit, queue
    began = time.monotonic()
    database = tmp_path / "orders.db"
    url = f"sqlite+aiosqlite:///{database}"
    port = free_port()
    log = tmp_path / "service.log"
    with log.open("wb") as sink:
        service = await asyncio.create_subprocess_exec(
            sys.executable,
            str(SERVICE / "service.py"),
            *("--database-url", url, "--rabbitmq-url", kit.url, "--queue", name),
            *("--metrics-port", str(port), "--sweep-every", "1"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
            cwd=str(tmp_path),
            env=child_env(),
        )

    def output() -> str:
        return log.read_text()[-4000:]

    try:
        deadline = time.monotonic() + 30
        while "consuming queue" not in log.read_text():
            if service.returncode is not None or time.monotonic() > deadline:
                pytest.fail(f"the service did not start: {output()}")
            await asyncio.sleep(0.1)

        saved = tmp_path / "published.jsonl"
        publisher = await asyncio.create_subprocess_exec(
            sys.executable,
            str(SERVICE / "publish.py"),
            *("--queue", name, "--rabbitmq-url", kit.url, "--database-url", url),
            *("--orders", str(ORDERS), "--seed", str(SEED), "--save", str(saved)),
            *("--check", "--timeout", "30"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=str(tmp_path),
            env=child_env(),
        )
        said = (await asyncio.wait_for(publisher.communicate(), 60))[0].decode()
        assert publisher.returncode == 0, said + output()
        assert "ok: " in said, said

        messages = [ReceivedEvent.model_validate_json(line) for line in saved.read_text().split()]
        events = {event.id: event for event in messages}
        assert len(events) == ORDERS * 3 < len(messages)

        # Every message settled: nothing more can happen (the sweep finds nothing lost).
        deadline = time.monotonic() + 20
        while True:
            seen = await asyncio.to_thread(scrape, port)
            handled = seen["ordering_sql_events_handled_total"]
            acked = seen["orders_service_messages_total:acked"]
            if (handled, acked) == (len(events), len(messages)):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"not settled: {ours(seen)}\n{output()}")
            await asyncio.sleep(0.2)
        parked = seen["ordering_sql_events_parked_total"]
        replayed = seen["ordering_sql_events_replayed_total"]
        duplicates = seen["ordering_sql_events_duplicates_total"]
        busy = seen["ordering_sql_events_busy_total"]
        nacked = seen["orders_service_messages_total:nacked"]
        state = await scope_status(url)
        backlog = await kit.backlog(name)
        rows = table_rows(database)
    finally:
        if service.returncode is None:
            service.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(service.wait(), 15)
        except TimeoutError:
            service.kill()
            await service.wait()
            pytest.fail(f"the service did not stop on SIGTERM: {output()}")

    print(
        f"\nexample service: {len(messages)} messages, {len(events)} events of {ORDERS} orders; "
        f"acked {acked:g}, nacked {nacked:g}; handled {handled:g}, parked {parked:g}, "
        f"replayed {replayed:g}, duplicates {duplicates:g}, busy {busy:g}; "
        f"rows {len(rows)}; in {time.monotonic() - began:.1f} s"
    )
    assert code == 0, output()
    assert f"the orders table holds {len(events)} rows" in output(), output()
    assert "Traceback" not in output(), output()
    assert " ERROR " not in output(), output()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 2):
        pass  # the metrics server stopped with the service

    # The service's and the engine's counts agree with each other and with what was sent.
    assert seen["orders_service_messages_total:rejected"] == 0, ours(seen)
    assert seen["orders_service_messages_total:unsettled"] == 0, ours(seen)
    assert acked + nacked == handled + parked + duplicates + busy - replayed, ours(seen)
    assert seen["ordering_sql_follower_wait_duration_seconds_count"] == replayed, ours(seen)
    assert seen["ordering_sql_followers_lost_total"] == 0, ours(seen)
    assert seen["ordering_sql_leases_lost_total"] == 0, ours(seen)
    assert seen["ordering_sql_step_duration_seconds_count"] > 0, ours(seen)
    # The shuffled stream sent followers before their leaders, and events twice.
    assert parked > 0, ours(seen)
    assert replayed > 0, ours(seen)
    assert duplicates > 0, ours(seen)

    # One row per event, none else; each follower's row after its leader's.
    row_of = {event_id: row_id for row_id, event_id, _ in rows}
    assert len(rows) == len(row_of) == len(events), len(rows)
    assert set(row_of) == {str(event_id) for event_id in events}
    late = [
        event_id
        for row_id, event_id, follows in rows
        if follows is not None and not row_of[follows] < row_id
    ]
    assert late == [], late
    sent = {str(event_id): event for event_id, event in events.items()}
    assert all(
        follows == (None if sent[event_id].follows is None else str(sent[event_id].follows))
        for _, event_id, follows in rows
    )

    # Nothing left: not on the broker, not in the ordering's tables.
    assert (backlog.waiting, backlog.rejected) == (0, 0), backlog
    assert (state.seen, state.parked, state.claimed, state.processing) == (len(events), 0, 0, 0)
