"""Concurrent callers share statements: a database's group commit, for the protocol's steps.

Within one Store (one engine, one event loop), a call of a step that arrives while an earlier
call of the same kind is in flight waits, with any others that arrive meanwhile, and the next
statement (Postgres) or transaction (SQLite) carries all of them at once: one round trip and one
commit (one flush to disk) for many events. A lone caller waits for nothing: its call runs at
once, alone.

Why it is safe:

* Each caller gets its own result, taken from the merged step's answer for its own request
  (the steps answer each request on its own: ``store/_steps.py``), and its own error: a failed
  merged step fails every request in it, as the same step would have failed each alone.
* A merged step is retried as a whole on a transient fault (``Store.run``); every step is
  harmless to repeat, merged or not, since each request carries its own owner token.
* Requests for the same event in one merged step are decided as concurrent callers would be:
  the backends run them in separate rounds, one after the other (``postgres._rounds``; SQLite
  runs them in turn in one transaction), so one wins and the others see its result.
* Only requests of one clock are merged (``key``): a Postgres statement takes one ``now``.
* The queue runs on the Store's one event loop, and nothing awaits between taking the
  pending requests and marking the queue busy, so no request is run twice or left behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Merging"]

Run = Callable[[Hashable, list[Any]], Awaitable[list[Any]]]


@dataclass(eq=False)
class _Queue:
    busy: bool = False
    pending: list[tuple[Any, asyncio.Future[Any]]] = field(default_factory=list)


class Merging:
    """Runs requests through ``run(key, requests) -> results``, merging the concurrent ones of
    one ``key``."""

    def __init__(self, run: Run) -> None:
        self._run = run
        self._queues: dict[Hashable, _Queue] = {}
        self._drains: set[asyncio.Task[None]] = set()

    async def call(self, key: Hashable, request: Any) -> Any:
        """``request``'s result, alone if nothing of ``key`` is in flight, else merged."""
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue()
        if queue.busy:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            queue.pending.append((request, future))
            return await future
        queue.busy = True
        try:
            (result,) = await self._run(key, [request])
            return result
        finally:
            self._hand_on(key, queue)

    def _hand_on(self, key: Hashable, queue: _Queue) -> None:
        """After a step of ``key`` ended: run what queued meanwhile, or let the queue rest."""
        if not queue.pending:
            queue.busy = False
            return
        task = asyncio.get_running_loop().create_task(self._drain(key, queue))
        self._drains.add(task)  # a strong reference until it is done
        task.add_done_callback(self._drains.discard)

    async def _drain(self, key: Hashable, queue: _Queue) -> None:
        try:
            while queue.pending:
                batch, queue.pending = queue.pending, []
                waiting = [(request, future) for request, future in batch if not future.done()]
                if not waiting:
                    continue
                try:
                    results = await self._run(key, [request for request, _ in waiting])
                except Exception as exc:  # every caller of the step gets its error
                    for _, future in waiting:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(waiting, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            queue.busy = False
            for _, future in queue.pending:  # only if cancelled mid-way (the loop is closing)
                if not future.done():
                    future.cancel()
            queue.pending.clear()
