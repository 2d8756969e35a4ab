"""Steps inside the caller's own transaction (``Store.joined``), on every backend.

A consumer that writes its effects to the same database can complete the event in the same
transaction: the seen mark and the effect then commit together or not at all. The next issue
("Exactly-once effects") builds on this; here the steps layer is held to it directly.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ordering_sql import CausalOrdering
from ordering_sql.store import Store
from ordering_sql.store._steps import Complete, Completed, ReadMarks, TakeLeases
from tests.support import make_event

LEASE = timedelta(seconds=60)


async def _store(ordering: CausalOrdering[Any]) -> Store:
    await ordering.check()
    store = await ordering._db()
    async with store.engine.begin() as conn:
        await conn.execute(text("CREATE TABLE IF NOT EXISTS effects (id VARCHAR(36) PRIMARY KEY)"))
    return store


async def _effects(store: Store) -> set[str]:
    async with store.engine.connect() as conn:
        return {row[0] for row in await conn.execute(text("SELECT id FROM effects"))}


async def _take(store: Store, event_id: UUID, owner: UUID) -> None:
    now = await store.now()
    taken = await store.take(TakeLeases("test", owner, (event_id,), now, now + LEASE))
    assert taken.taken == {event_id}


async def _complete_with_effect(
    store: Store, conn: AsyncConnection, event_id: UUID, owner: UUID
) -> Completed:
    now = await store.now()
    await conn.execute(text("INSERT INTO effects (id) VALUES (:id)"), {"id": str(event_id)})
    return await store.joined(conn).complete(
        Complete(
            "test",
            owner,
            (event_id,),
            now,
            now + timedelta(seconds=600),
            now + timedelta(seconds=60),
        )
    )


async def _seen(store: Store, event_id: UUID) -> tuple[bool, bool]:
    marks = await store.marks(ReadMarks("test", (event_id,), await store.now()))
    found = marks.get(event_id)
    return (found.seen, found.processing) if found else (False, False)


async def test_a_completion_in_the_callers_transaction_commits_with_its_effect(
    ordering: CausalOrdering[Any],
) -> None:
    store = await _store(ordering)
    event_id, owner = make_event().id, uuid4()
    await _take(store, event_id, owner)

    async with store.engine.begin() as conn:
        completed = await _complete_with_effect(store, conn, event_id, owner)
        assert completed.done == {event_id}

    assert await _seen(store, event_id) == (True, False)
    assert await _effects(store) == {str(event_id)}


async def test_a_rolled_back_transaction_leaves_the_event_unhandled_and_held(
    ordering: CausalOrdering[Any],
) -> None:
    store = await _store(ordering)
    event_id, owner = make_event().id, uuid4()
    await _take(store, event_id, owner)

    async with store.engine.connect() as conn:
        transaction = await conn.begin()
        completed = await _complete_with_effect(store, conn, event_id, owner)
        assert completed.done == {event_id}  # as seen inside the transaction
        await transaction.rollback()  # the caller's work failed

    # Neither the effect nor the seen mark: the lease is still the holder's, who may retry.
    assert await _effects(store) == set()
    assert await _seen(store, event_id) == (False, True)
    async with store.engine.begin() as conn:
        retried = await _complete_with_effect(store, conn, event_id, owner)
    assert retried.done == {event_id}
    assert await _seen(store, event_id) == (True, False)
    assert await _effects(store) == {str(event_id)}


async def test_a_joined_completion_of_an_event_held_by_another_does_nothing(
    ordering: CausalOrdering[Any],
) -> None:
    store = await _store(ordering)
    event_id, holder = make_event().id, uuid4()
    await _take(store, event_id, holder)

    async with store.engine.begin() as conn:
        completed = await _complete_with_effect(store, conn, event_id, uuid4())
        assert completed.done == frozenset()  # the caller must not commit its effect now

    assert await _seen(store, event_id) == (False, True)
