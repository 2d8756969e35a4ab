"""Keeping leases and claims alive while the work they protect runs.

A processing lease and a leader's claim on the followers it replays both expire, so that a
worker that dies lets go of them. A worker that is alive but slow must not lose them, so while
its work runs longer than a third of their lifetime a ``Renewal`` extends them, every third.
A ``Hold`` is one handling's leases with the renewal that keeps them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from uuid import UUID

from ordering_sql.errors import OrderingError

__all__ = ["Hold", "Renewal", "what_is_held"]

logger = logging.getLogger(__name__)


class Renewal:
    """Calls ``renew()`` every ``interval`` seconds from ``start()`` until ``stop()``.

    Nothing runs for work that ends within the first interval: a timer starts the renewer. A
    ``renew()`` that returns False (nothing left to keep alive: ended, or taken over) ends the
    renewal; one that raises an ``OrderingError`` is logged (``what`` names what could not be
    renewed) and tried again an interval later.

    Why stopping is safe: ``stop()`` cancels the timer, tells the renewer to end, and waits for
    a renewal in flight to finish. Once it returned, no renewal runs any more, so a holder that
    ends its lease or claims afterwards is never followed by a renewal that takes them back.
    """

    def __init__(
        self, renew: Callable[[], Awaitable[bool]], *, interval: float, what: str, scope: str
    ) -> None:
        self._renew = renew
        self._interval = interval
        self._what = what
        self._scope = scope
        self._stop = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """(Re)start renewing, from an interval from now."""
        self._stop.clear()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._interval, self._begin)

    async def stop(self) -> None:
        """Stop renewing; returns once no renewal is running."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stop.set()
        task, self._task = self._task, None
        if task is not None:
            await task  # lets a renewal in flight finish; the loop never raises

    async def __aenter__(self) -> Renewal:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _begin(self) -> None:
        self._timer = None
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not await self._renew():
                    return  # ended or taken over: nothing left to keep alive
            except OrderingError:
                logger.warning(
                    "could not renew %s; trying again in %.1fs",
                    self._what,
                    self._interval,
                    exc_info=True,
                    extra={"action": "renew", "scope": self._scope},
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._interval)


@dataclass(eq=False)
class Hold:
    """Leases this worker holds for one handling, and the renewal that keeps them alive."""

    token: UUID
    event_ids: list[UUID]
    renewal: Renewal | None = None
    #: Set once the leases were ended without a release (parked, or taken over meanwhile).
    ended: bool = False

    async def pause(self) -> None:
        if self.renewal is not None:
            await self.renewal.stop()

    def resume(self) -> None:
        if self.renewal is not None:
            self.renewal.start()


def what_is_held(event_ids: Sequence[UUID], noun: str = "the lease of event") -> str:
    """``the lease of event <id>``, or ``... <id> and N more``, for log lines."""
    more = f" and {len(event_ids) - 1} more" if len(event_ids) > 1 else ""
    return f"{noun} {event_ids[0]}{more}"
