"""Processes whose wall clocks disagree: every expiry is decided on the database's clock.

Each contender is a real OS process (``_skewed_worker.py``) started under ``faketime``, which
shifts its wall clock by a minute or half an hour; it passes no ``clock=``, so it runs on that
shifted clock, as a service on a machine whose clock drifted would. The processes on the
machine's own clock are either unshifted workers or this test process itself. A lease of 5 s
against 60 s of skew: if any process decided expiry on its own clock, it would take over a live
lease (ahead), write leases that are already over for everybody else (behind), purge live rows
(ahead), or handle a duplicate again (half an hour ahead).

``faketime`` runs with ``--exclude-monotonic``: with the monotonic clock shifted too, CPython's
timed waits on locks (``threading.Event.wait(timeout)``, ``queue.Queue.get(timeout=...)``,
which aiosqlite's worker thread uses) never return, because libfaketime shifts the clock the
deadline is computed from but not ``sem_clockwait``. A drifting wall clock with a sound
monotonic clock is also the real case. Every worker prints its ``datetime.now(UTC)`` first and
the tests check the shift, so a ``faketime`` that does nothing cannot make them pass.

``faketime`` forks: the process started is the wrapper, the worker its child. Each is started
in a session of its own, and a leftover one is killed as a whole process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from ordering_sql import CausalOrdering, EventBeingProcessed, ReceivedEvent
from tests.concurrency._skewed_worker import Command, SkewedSpec
from tests.conftest import BACKENDS, IN_CI
from tests.support import REPO_ROOT, child_env, make_event

pytestmark = pytest.mark.slow

FAKETIME = shutil.which("faketime")
WORKER = "tests.concurrency._skewed_worker"

#: Short against the skew: a lease is live for LEASE_S, the clocks disagree by a minute.
LEASE_S = 4.0
AHEAD = timedelta(seconds=60)
BEHIND = -AHEAD
#: Past the 30-minute life of a seen mark (the default ``seen_expiration``).
FAR_AHEAD = timedelta(minutes=31)
#: How far a worker's clock may be from its intended shift, start-up lag included.
CLOCK_TOLERANCE = timedelta(seconds=10)
#: The longest a worker may take to reply, or to finish, before the test fails.
REPLY_TIMEOUT_S = 30.0
#: How long the finalizer lets a released worker finish before it is killed.
GRACE_S = 10.0


def _faketime_offset(shift: timedelta) -> str:
    return f"{int(shift.total_seconds()):+d}s"


@pytest.fixture(autouse=True)
def _needs_faketime() -> None:
    if FAKETIME is None:
        reason = "these tests shift worker clocks with faketime (apt-get install faketime)"
        if IN_CI:
            pytest.fail(f"CI=true but faketime is not installed: {reason}")
        pytest.skip(reason)


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest) -> str:
    """A fresh, migrated database; SQLite as one file shared by the processes."""
    return str(request.getfixturevalue(f"{request.param}_url"))


# -- workers -------------------------------------------------------------------------------------


@dataclass
class Worker:
    name: str
    shift: timedelta | None
    process: asyncio.subprocess.Process
    stderr: Path
    release_file: Path
    replies: list[dict[str, Any]] = field(default_factory=list)

    def errors(self) -> str:
        return self.stderr.read_text()[-3000:] if self.stderr.exists() else ""

    async def reply(self, seconds: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
        """The worker's next JSON line."""
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), seconds)
        except TimeoutError:
            pytest.fail(f"worker {self.name} said nothing within {seconds} s: {self.errors()}")
        if not line:
            code = await self._exit_code(seconds)
            pytest.fail(f"worker {self.name} exited ({code}) without a reply: {self.errors()}")
        reply: dict[str, Any] = json.loads(line)
        self.replies.append(reply)
        return reply

    async def check_clock(self) -> datetime:
        """Read the first reply, the worker's clock, and check that it is shifted as asked."""
        reply = await self.reply()
        ours = datetime.now(UTC)
        theirs = datetime.fromisoformat(reply["clock"])
        wanted = self.shift or timedelta(0)
        assert abs(theirs - ours - wanted) < CLOCK_TOLERANCE, (
            f"worker {self.name}'s clock is {(theirs - ours).total_seconds():+.1f} s from this "
            f"process's, not {wanted.total_seconds():+.0f} s: faketime is not in effect"
        )
        return theirs

    def release(self) -> None:
        self.release_file.touch()

    async def finish(self, seconds: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
        """Wait for a clean exit; the worker's last reply."""
        assert self.process.stdout is not None
        try:
            rest = await asyncio.wait_for(self.process.stdout.read(), seconds)
        except TimeoutError:
            pytest.fail(f"worker {self.name} did not finish within {seconds} s: {self.errors()}")
        self.replies += [json.loads(line) for line in rest.decode().splitlines() if line]
        code = await self._exit_code(seconds)
        assert code == 0, f"worker {self.name} exited with {code}: {self.errors()}"
        assert self.replies, f"worker {self.name} replied nothing: {self.errors()}"
        return self.replies[-1]

    async def _exit_code(self, seconds: float) -> int:
        try:
            return await asyncio.wait_for(self.process.wait(), seconds)
        except TimeoutError:
            self.kill()
            pytest.fail(f"worker {self.name} did not exit within {seconds} s: {self.errors()}")

    def kill(self) -> None:
        """Kill the worker's whole process group: ``faketime`` and the worker it forked."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def forget_faketime_memory(self) -> None:
        """A ``faketime`` killed before its child ended leaves its shared memory behind."""
        if self.shift is not None:
            for name in (
                f"faketime_shm_{self.process.pid}",
                f"sem.faketime_sem_{self.process.pid}",
            ):
                (Path("/dev/shm") / name).unlink(missing_ok=True)


@dataclass
class Workers:
    folder: Path
    url: str
    scope: str = field(default_factory=lambda: f"skew-{uuid4().hex[:8]}")
    running: list[Worker] = field(default_factory=list)

    async def start(
        self,
        name: str,
        command: Command,
        *,
        shift: timedelta | None = None,
        event: ReceivedEvent | None = None,
        argv: list[str] | None = None,
    ) -> Worker:
        """Start a worker, on a wall clock ``shift`` from the machine's (None: not shifted)."""
        release_file = self.folder / f"{name}.release"
        spec = SkewedSpec(
            command=command,
            database_url=self.url,
            scope=self.scope,
            event=event,
            lease_timeout=LEASE_S,
            release_file=release_file,
            argv=argv or [],
        )
        spec_path, stderr = self.folder / f"{name}.json", self.folder / f"{name}.err"
        spec_path.write_text(spec.model_dump_json())
        python = [sys.executable, "-m", WORKER, str(spec_path)]
        if shift is not None:
            assert FAKETIME is not None
            python = [FAKETIME, "--exclude-monotonic", "-f", _faketime_offset(shift), *python]
        with stderr.open("wb") as errors:
            process = await asyncio.create_subprocess_exec(
                *python,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=errors,
                cwd=str(REPO_ROOT),
                env=child_env(),
                start_new_session=True,  # killed as a group: faketime forks the worker
            )
        worker = Worker(name, shift, process, stderr, release_file)
        self.running.append(worker)
        await worker.check_clock()
        return worker


@pytest.fixture
async def workers(tmp_path: Path, url: str) -> AsyncIterator[Workers]:
    """Starts workers; at the end each is released, and killed if it does not finish."""
    made = Workers(tmp_path, url)
    yield made
    for worker in made.running:
        worker.release()
    for worker in made.running:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(worker.process.wait(), GRACE_S)
        if worker.process.returncode is None:
            worker.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(worker.process.wait(), GRACE_S)
            worker.forget_faketime_memory()


@pytest.fixture
async def here(workers: Workers) -> AsyncIterator[CausalOrdering[ReceivedEvent]]:
    """This test process as a worker on the machine's clock (no ``clock=`` either)."""
    ordering: CausalOrdering[ReceivedEvent] = CausalOrdering(
        workers.scope, database_url=workers.url, lease_timeout=LEASE_S
    )
    yield ordering
    await ordering.close()


async def handle_here(ordering: CausalOrdering[ReceivedEvent], event: ReceivedEvent) -> None:
    async def handle(event: ReceivedEvent, depth: int = 0) -> None:
        async with ordering.preceding_event_confirmed(handle, event, depth):
            pass

    await handle(event)
    assert await ordering.event_has_been_seen(event)


async def holding(workers: Workers, name: str, event: ReceivedEvent, **shift: Any) -> Worker:
    """A worker that holds the lease of ``event``, its handler blocked until released."""
    holder = await workers.start(name, "hold", event=event, **shift)
    assert await holder.reply() == {"holding": True}, f"{name} could not take the lease"
    return holder


async def completed(holder: Worker) -> dict[str, Any]:
    holder.release()
    return await holder.finish()


# -- 1. a process ahead does not take a live lease ------------------------------------------------


async def test_a_process_ahead_does_not_take_a_live_lease(workers: Workers) -> None:
    event = make_event()
    holder = await holding(workers, "holder", event)
    ahead = await workers.start("ahead", "take", shift=AHEAD, event=event)
    took = await ahead.finish()

    assert took == {"took": False}, (
        "a process 60 s ahead took a lease that is live for another 4 s: two handlers of the "
        "same event run at once"
    )
    assert await completed(holder) == {"completed": True}


# -- 2. a process behind writes leases that others see as live ------------------------------------


async def test_a_lease_held_by_a_process_behind_is_live_for_the_others(
    workers: Workers, here: CausalOrdering[ReceivedEvent]
) -> None:
    event = make_event()
    behind = await holding(workers, "behind", event, shift=BEHIND)

    assert not await here.record_event_as_processing(event), (
        "the lease of a process 60 s behind was already over for a process on time: it took "
        "the event while that handler still runs"
    )
    await asyncio.sleep(LEASE_S * 1.5)  # the lease is renewed meanwhile, not just taken
    assert await here.event_has_started_processing(event)
    assert not await here.record_event_as_processing(event), "taken after a renewal"
    assert await completed(behind) == {"completed": True}


# -- 3. a purge run ahead leaves live leases alone ------------------------------------------------


@pytest.mark.parametrize("purge", ["cli", "automatic"])
async def test_a_purge_run_ahead_leaves_a_live_lease_alone(
    workers: Workers, here: CausalOrdering[ReceivedEvent], purge: str
) -> None:
    event = make_event()
    holder = await holding(workers, "holder", event)
    if purge == "cli":
        argv = ["purge", "--database-url", workers.url]
        purger = await workers.start("purger", "cli", shift=AHEAD, argv=argv)
    else:
        purger = await workers.start("purger", "purge", shift=AHEAD)
    purged = await purger.finish()

    assert await here.event_has_started_processing(event), (
        f"the {purge} purge of a process 60 s ahead deleted a lease live for another 4 s ({purged})"
    )
    assert not await here.record_event_as_processing(event), (
        "a third process took the event while its holder still runs"
    )
    assert await completed(holder) == {"completed": True}


# -- 4. a process half an hour ahead does not handle a duplicate ---------------------------------


async def test_a_process_far_ahead_does_not_handle_a_duplicate_again(
    workers: Workers, here: CausalOrdering[ReceivedEvent]
) -> None:
    event = make_event()
    await handle_here(here, event)
    duplicate = await workers.start("far-ahead", "deliver", shift=FAR_AHEAD, event=event)
    delivered = await duplicate.finish()

    assert not delivered["ran"], (
        "a process 31 minutes ahead saw the 30-minute seen mark as expired and handled a "
        f"duplicate again ({delivered})"
    )
    assert delivered["seen"] or delivered["busy"], delivered


# -- 5. a purge run half an hour ahead keeps seen marks -------------------------------------------


async def test_a_purge_run_far_ahead_keeps_the_seen_marks(
    workers: Workers, here: CausalOrdering[ReceivedEvent]
) -> None:
    event = make_event()
    await handle_here(here, event)
    argv = ["purge", "--database-url", workers.url]
    purger = await workers.start("purger", "cli", shift=FAR_AHEAD, argv=argv)
    purged = await purger.finish()

    assert await here.event_has_been_seen(event), (
        f"the purge of a process 31 minutes ahead deleted a seen mark live for 30 ({purged})"
    )
    with pytest.raises(EventBeingProcessed):
        async with here.event_is_processing(event):
            pytest.fail("a duplicate was handled again")
