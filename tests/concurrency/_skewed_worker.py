"""One step of the protocol in a process of its own, on that process's own wall clock.

Usage: ``faketime --exclude-monotonic -f OFFSET python -m tests.concurrency._skewed_worker
SPEC.json`` from the repository root (``test_clock_skew.py`` starts it; without ``faketime`` it
runs on the machine's clock). It never passes ``clock=``: every time the engine uses is this
process's own ``datetime.now``, which ``faketime`` shifts.

It prints JSON lines on stdout. The first is ``{"clock": ...}``, its ``datetime.now(UTC)`` as it
starts, so the test can check that the shift is in effect. Then, per ``command``:

* ``take``: ``record_event_as_processing(event)``; prints ``{"took": bool}`` and exits without
  giving the lease back.
* ``hold``: takes the lease through ``event_is_processing(event)`` and prints
  ``{"holding": true}`` (or ``{"holding": false}`` if it is refused); the body then waits for
  ``release_file`` to appear (the lease is renewed meanwhile, as for any slow handler), and
  prints ``{"completed": true}``, or ``{"completed": false, "lease_lost": true}`` if the lease
  was taken over meanwhile.
* ``deliver``: the usual consumer: skip the event if ``event_has_been_seen``, else handle it
  through ``preceding_event_confirmed``; prints ``{"seen": bool, "ran": bool, "busy": bool}``
  (``ran``: the handler body ran; ``busy``: ``EventBeingProcessed`` was raised).
* ``purge``: the engine's own purge, which runs after this process's first completion: handles
  a fresh event in another scope (``SCOPE-purger``), and prints ``{"purged": n}``, the number
  of rows that purge logged as deleted (None if it logged nothing).
* ``cli``: runs the operator CLI in this process, as ``python -m ordering_sql ARGV`` does
  (``argv``, e.g. ``["purge", "--database-url", URL]``); prints ``{"exit": code, "output":
  text}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ordering_sql import (
    CausalOrdering,
    EventBeingProcessed,
    LeaseLostError,
    ReceivedEvent,
    dispose_engines,
)
from ordering_sql.cli import main as cli_main
from tests.support import make_event

#: The longest a ``hold`` waits for its release file before it gives up (and fails).
HOLD_TIMEOUT_S = 60.0


Command = Literal["take", "hold", "deliver", "purge", "cli"]


class SkewedSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    command: Command
    database_url: str
    scope: str
    event: ReceivedEvent | None = None
    lease_timeout: float = 5.0
    release_file: Path | None = None
    argv: list[str] = []


def say(**values: Any) -> None:
    print(json.dumps(values), flush=True)


def _exists(path: Path) -> bool:
    return path.exists()


async def _released(path: Path) -> None:
    deadline = time.monotonic() + HOLD_TIMEOUT_S
    while not _exists(path):
        if time.monotonic() > deadline:
            msg = f"not released through {path} within {HOLD_TIMEOUT_S} s"
            raise TimeoutError(msg)
        await asyncio.sleep(0.02)


async def _hold(ordering: CausalOrdering[ReceivedEvent], spec: SkewedSpec) -> None:
    assert spec.event is not None
    assert spec.release_file is not None
    try:
        async with ordering.event_is_processing(spec.event):
            say(holding=True)
            await _released(spec.release_file)
    except EventBeingProcessed:
        say(holding=False)
    except LeaseLostError:
        say(completed=False, lease_lost=True)
    else:
        say(completed=True)


async def _deliver(ordering: CausalOrdering[ReceivedEvent], spec: SkewedSpec) -> None:
    event = spec.event
    assert event is not None
    ran = busy = False

    async def handle(event: ReceivedEvent, depth: int = 0) -> None:
        nonlocal ran
        async with ordering.preceding_event_confirmed(handle, event, depth):
            ran = True

    seen = await ordering.event_has_been_seen(event)
    if not seen:
        try:
            await handle(event)
        except EventBeingProcessed:
            busy = True
    say(seen=seen, ran=ran, busy=busy)


class _PurgeCount(logging.Handler):
    """Catches the engine's ``purged N expired rows`` record."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.purged: int | None = None

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args
        if getattr(record, "action", None) == "purge" and isinstance(args, tuple) and args:
            purged = args[0]
            self.purged = purged if isinstance(purged, int) else None


async def _purge(spec: SkewedSpec) -> None:
    purger: CausalOrdering[ReceivedEvent] = CausalOrdering(
        f"{spec.scope}-purger", database_url=spec.database_url, lease_timeout=spec.lease_timeout
    )
    counter = _PurgeCount()
    store_logger = logging.getLogger("ordering_sql.store")
    store_logger.addHandler(counter)
    store_logger.setLevel(logging.DEBUG)
    try:
        async with purger.event_is_processing(make_event(name="purger.trigger")):
            pass
    finally:
        store_logger.removeHandler(counter)
        await purger.close()
    say(purged=counter.purged)


def _cli(spec: SkewedSpec) -> None:
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        try:
            cli_main(spec.argv)
            code: Any = 0
        except SystemExit as exit_:
            code = exit_.code
    say(exit=code, output=output.getvalue())


async def run(spec: SkewedSpec) -> None:
    ordering: CausalOrdering[ReceivedEvent] = CausalOrdering(
        spec.scope, database_url=spec.database_url, lease_timeout=spec.lease_timeout
    )
    try:
        if spec.command == "take":
            assert spec.event is not None
            say(took=await ordering.record_event_as_processing(spec.event))
        elif spec.command == "hold":
            await _hold(ordering, spec)
        elif spec.command == "deliver":
            await _deliver(ordering, spec)
        elif spec.command == "purge":
            await _purge(spec)
    finally:
        await ordering.close()
        await dispose_engines()


def main() -> None:
    say(clock=datetime.now(UTC).isoformat())
    spec = SkewedSpec.model_validate_json(Path(sys.argv[1]).read_text())
    if spec.command == "cli":
        _cli(spec)  # runs its own event loop, as the console entry point does
    else:
        asyncio.run(run(spec))


if __name__ == "__main__":
    main()
