"""Sharing engines: every ``CausalOrdering`` on one URL and event loop uses one ``Store``."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ordering_sql.settings import Settings
from ordering_sql.store._store import Store

__all__ = ["acquire_store", "dispose_engines", "release_store"]


@dataclass(eq=False)
class _Shared:
    store: Store
    users: int = 0


@dataclass(eq=False)
class _LoopStores:
    """The shared stores of one event loop."""

    stores: dict[str, _Shared] = field(default_factory=dict)
    sentinel: AsyncIterator[None] | None = None

    async def dispose_all(self) -> None:
        shared = list(self.stores.values())
        self.stores.clear()
        for item in shared:
            await item.store.dispose()


# Engines hold connections bound to the event loop that opened them, so sharing is per loop.
# Keyed weakly: when a loop is garbage-collected its entry goes too.
_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopStores] = (
    weakref.WeakKeyDictionary()
)


def _loop_stores() -> _LoopStores:
    loop = asyncio.get_running_loop()
    entry = _by_loop.get(loop)
    if entry is None:
        entry = _by_loop[loop] = _LoopStores()
    return entry


async def acquire_store(settings: Settings) -> Store:
    """The shared Store for ``settings.database_url`` on the running loop; counts one more user.

    Why this is safe without a lock: it runs on one event loop and never awaits between looking
    up and inserting the entry, so two coroutines cannot both create a Store for one URL.
    """
    entry = _loop_stores()
    key = settings.url.render_as_string(hide_password=False)
    shared = entry.stores.get(key)
    if shared is None:
        shared = entry.stores[key] = _Shared(Store.from_settings(settings))
        if entry.sentinel is None:
            entry.sentinel = sentinel = _dispose_at_shutdown(entry)
            await sentinel.__anext__()  # runs to the first ``yield`` without suspending
    shared.users += 1
    return shared.store


async def release_store(store: Store) -> None:
    """One user fewer; the last user of a shared Store disposes its engine."""
    entry = _by_loop.get(asyncio.get_running_loop())
    if entry is None:
        return
    for key, shared in list(entry.stores.items()):
        if shared.store is store:
            shared.users -= 1
            if shared.users <= 0:
                del entry.stores[key]
                await store.dispose()
            return


async def dispose_engines() -> None:
    """Dispose every engine shared on the running event loop (tests and short scripts)."""
    entry = _by_loop.get(asyncio.get_running_loop())
    if entry is None:
        return
    await entry.dispose_all()


async def _dispose_at_shutdown(entry: _LoopStores) -> AsyncIterator[None]:
    """Dispose this loop's engines when the loop shuts down.

    ``asyncio.run`` (and pytest-asyncio's runner) call ``loop.shutdown_asyncgens()`` before
    closing a loop: every async generator that has started and not finished is closed, while
    the loop still runs. This generator is started here and parked at its ``yield``; closing it
    runs its ``finally``, which disposes the engines. Without it, code that runs several loops
    in turn would leave pooled connections bound to a dead loop (and aiosqlite's worker
    threads, which are not daemons, would keep the process from exiting). The entry keeps the
    generator alive: the loop itself only holds async generators weakly.
    """
    try:
        yield
    finally:
        await entry.dispose_all()
