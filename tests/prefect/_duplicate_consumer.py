"""One Prefect server's triggers consumer in its own OS process, for ``test_two_servers.py``.

Usage: ``python -m tests.prefect._duplicate_consumer SPEC.json`` (from the repository root),
with the environment of ``tests.prefect.conftest.prefect_child_env`` (this server's own Prefect
home and database, ``PREFECT_SERVER_EVENTS_CAUSAL_ORDERING=ordering_sql.prefect``, and the
shared ordering database in ``ORDERING_SQL_DATABASE_URL``).

As ``_consumer.py`` does, it runs Prefect's own ``triggers.consumer`` and hands each event to its
message handler as Prefect's event pipeline would; unlike it, every observation goes to one JSON
lines file (``spec["records"]``), each record with ``time.monotonic_ns()`` (one clock for every
process of the machine) and the process id:

* ``evaluating`` / ``evaluated``: an event reached trigger evaluation (``find_interested_triggers``,
  wrapped here), and that evaluation ended. Evaluation takes ``spec["delays"][event id]`` seconds
  (``find_interested_triggers`` is synchronous, so the delay holds this server's event loop, as a
  CPU-bound evaluation would); for an id in ``spec["block"]`` it never ends (``blocked``): the
  process waits there to be killed.
* ``handling`` / ``handled``: a call of the message handler began, and returned or raised (with
  the exception's type, text and traceback). An exception escaping the handler is what Prefect's
  ``consume_loop`` logs at ERROR ("Failed in consume_loop") before retrying the message and
  dead-lettering it.
* ``log``: every record at WARNING or above of the ``prefect`` and ``ordering_sql`` loggers.

Sequence: create ``imported``, wait for ``start``, start the consumer, open the ordering's pool,
create ``ready``; with ``spec["periodic_every"]`` seconds, also run Prefect's own
``triggers.evaluate_periodically`` at that interval (the lost-follower sweep included). Then for
each phase: wait for its ``start`` file, whose text, if any, is a ``time.monotonic_ns()`` at
which event ``i`` of the phase is handed over at ``t0 + i * phase["slot"]`` seconds (so two
servers get each event at about the same moment); create the phase's ``done`` file. Finally,
wait for ``finish`` (if given) and leave.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO
from uuid import uuid4

import anyio
from prefect.server.events import triggers
from prefect.server.events.ordering import get_triggers_causal_ordering
from prefect.server.events.schemas.events import ReceivedEvent

import ordering_sql
from tests.prefect.support import message, triggers_consumer

#: How long a phase waits for its start file before the process gives up.
SIGNAL_TIMEOUT_S = 90.0


class Records:
    """The JSON lines file this process reports through."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def write(self, kind: str, **fields: Any) -> None:
        record = {"kind": kind, "ns": time.monotonic_ns(), "pid": os.getpid(), **fields}
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()


class Capture(logging.Handler):
    """Reports every log record it receives as a ``log`` record."""

    def __init__(self, records: Records) -> None:
        super().__init__(level=logging.WARNING)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a record that does not format: report it raw
            text = repr(record.msg)
        exc = None
        if record.exc_info:
            exc = "".join(traceback.format_exception(*record.exc_info))
        self.records.write("log", logger=record.name, level=record.levelname, message=text, exc=exc)


async def _wait_for(name: str) -> str:
    path, deadline = anyio.Path(name), time.monotonic() + SIGNAL_TIMEOUT_S
    while not await path.exists():
        if time.monotonic() > deadline:
            msg = f"gave up waiting for {path}"
            raise TimeoutError(msg)
        await asyncio.sleep(0.01)
    return (await path.read_text()).strip()


def _instrument(spec: dict[str, Any], records: Records) -> None:
    delays: dict[str, float] = spec.get("delays", {})
    block = set(spec.get("block", []))
    original = triggers.find_interested_triggers

    def evaluating(event: ReceivedEvent) -> Any:
        event_id = str(event.id)
        records.write("evaluating", id=event_id)
        if event_id in block:
            records.write("blocked", id=event_id)
            while True:  # the evaluation hangs here until the process is killed
                time.sleep(0.1)
        time.sleep(delays.get(event_id, 0.0))
        records.write("evaluated", id=event_id)
        return original(event)

    triggers.find_interested_triggers = evaluating  # type: ignore[assignment]


async def _handle(handle: Any, raw: dict[str, Any], records: Records) -> None:
    event = ReceivedEvent.model_validate(raw)
    records.write("handling", id=str(event.id))
    try:
        await handle(message(event))
    except Exception as exc:
        records.write(
            "handled",
            id=str(event.id),
            error=type(exc).__name__,
            error_module=type(exc).__module__,
            text=str(exc),
            traceback="".join(traceback.format_exception(exc)),
        )
    else:
        records.write("handled", id=str(event.id), error=None)


async def _run_phase(handle: Any, phase: dict[str, Any], records: Records) -> None:
    start = await _wait_for(phase["start"])
    t0 = int(start) if start else None
    for i, raw in enumerate(phase["events"]):
        if t0 is not None:
            at = t0 + int(i * phase["slot"] * 1e9)
            await asyncio.sleep(max(0.0, (at - time.monotonic_ns()) / 1e9))
        await _handle(handle, raw, records)
    await anyio.Path(phase["done"]).touch()


async def main(spec: dict[str, Any], records: Records) -> None:
    capture = Capture(records)
    for name in ("prefect", "ordering_sql"):
        logging.getLogger(name).addHandler(capture)
    _instrument(spec, records)

    await anyio.Path(spec["imported"]).touch()
    await _wait_for(spec["start"])
    async with triggers_consumer() as handle:
        # Open this server's pool now, so that the first event does not pay for it.
        await get_triggers_causal_ordering().event_has_been_seen(uuid4())
        periodic = None
        if spec.get("periodic_every"):
            every = timedelta(seconds=spec["periodic_every"])
            periodic = asyncio.create_task(triggers.evaluate_periodically(every))
        await anyio.Path(spec["ready"]).touch()
        for phase in spec["phases"]:
            await _run_phase(handle, phase, records)
        if spec.get("finish"):
            await _wait_for(spec["finish"])
        if periodic is not None:
            periodic.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await periodic
    await ordering_sql.dispose_engines()
    records.write("exit")


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    with Path(spec["records"]).open("a") as out:
        asyncio.run(main(spec, Records(out)))
