"""The database's clock, as one process reads it: the time every expiry decision is made on.

Leases, seen marks, claims and purges are compared across processes, so they must all be
compared against one clock that every process shares. A process's own wall clock is not one:
a machine whose clock is a minute ahead would see other workers' live leases as expired and
take them over. So each ``Store`` reads the database's clock and keeps its own estimate of it:

* Postgres: the server's ``clock_timestamp()``.
* SQLite: SQLite has no clock of its own (its ``'now'`` is the calling process's clock), but
  every process that shares a SQLite file runs on the machine that holds the file. Their
  shared clock is that machine's kernel clock, read as the modification time the kernel stamps
  on a small file beside the database (``<file>-clock``) when it is written: a process whose
  wall clock is shifted (a faked clock, a time namespace) still reads the host's time. Where
  that file cannot be written (a read-only folder) or there is no file (``:memory:``, private to
  one process anyway), the process's own clock is the database's clock.

Between readings the estimate advances with the process's monotonic clock, which a step of the
wall clock (NTP, a suspended VM) does not move; it is read again every ``RESYNC_EVERY``.

Why the estimate is safe: it is anchored at the moment the reading *arrived*, so it never runs
ahead of the database's clock, only behind it by at most one round trip (Postgres) or one kernel
tick (SQLite). A clock that runs behind makes leases, seen marks and claims look alive a little
longer, never expired early, and purges delete a little later; the leases this process writes
end that much sooner, well within their renewal margin.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

__all__ = ["RESYNC_EVERY", "DatabaseClock", "host_time", "process_time"]

#: How often the estimate is corrected by a fresh reading (the drift of a quartz clock over
#: this interval is well under a millisecond).
RESYNC_EVERY: Final = timedelta(minutes=1)


class DatabaseClock:
    """This process's estimate of the database's clock.

    ``read`` returns the database's time; ``sync`` calls it when a reading is due. ``now()``
    needs one reading first (a Store makes it before its first unit of work).
    """

    def __init__(self, read: Callable[[], Awaitable[datetime]]) -> None:
        self._read = read
        self._base: datetime | None = None
        self._anchor = 0.0  # time.monotonic() when the reading ``_base`` arrived
        self._next = 0.0

    @property
    def due(self) -> bool:
        return self._base is None or time.monotonic() >= self._next

    async def sync(self) -> None:
        """Read the database's clock now."""
        reading = await self._read()
        arrived = time.monotonic()
        self._base, self._anchor = reading, arrived
        self._next = arrived + RESYNC_EVERY.total_seconds()

    async def sync_if_due(self) -> None:
        if self.due:
            await self.sync()

    def now(self) -> datetime:
        """The database's current time (aware, UTC), as estimated from the last reading."""
        if self._base is None:
            msg = "The database clock was not read yet; call sync() first."
            raise RuntimeError(msg)
        return self._base + timedelta(seconds=time.monotonic() - self._anchor)


def host_time(database: str) -> datetime | None:
    """The kernel's time on the machine holding ``database``, or None if it cannot be read.

    Written to, a file gets its modification time from the kernel, not from the writing
    process's (possibly shifted) view of the clock. The file lies beside the database, so on a
    network file system it is the file server's clock, which is the clock every client shares.
    """
    path = Path(database).expanduser().absolute()
    clock_file = path.with_name(path.name + "-clock")
    try:
        fd = os.open(clock_file, os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError:
        return None
    try:
        os.pwrite(fd, b"\0", 0)
        stamped = os.fstat(fd).st_mtime_ns
    except OSError:
        return None
    finally:
        os.close(fd)
    seconds, nanoseconds = divmod(stamped, 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=nanoseconds // 1000)


def process_time() -> datetime:
    """This process's own wall clock, where no shared clock can be read."""
    return datetime.now(UTC)
