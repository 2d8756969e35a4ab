"""Upgrading 0001 -> 0002 keeps followers that were parked before it replayable."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from ordering_sql import CausalOrdering
from ordering_sql.migration import upgrade
from tests.conftest import BACKENDS, _admin, _with_database
from tests.support import make_event


@pytest.fixture(params=BACKENDS)
async def at_0001(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh database migrated to revision 0001 only."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
        cleanup = None
    else:
        admin = request.getfixturevalue("postgres_admin_url")
        name = f"ordering_old_{uuid.uuid4().hex[:12]}"
        await _admin(admin, f'CREATE DATABASE "{name}"')
        url = _with_database(admin, name)
        cleanup = (admin, name)
    engine = create_async_engine(url)
    try:
        await upgrade(engine, "0001")
    finally:
        await engine.dispose()
    yield url
    if cleanup is not None:
        await _admin(cleanup[0], f'DROP DATABASE IF EXISTS "{cleanup[1]}" WITH (FORCE)')
    shutil.rmtree(tmp_path, ignore_errors=True)


async def test_followers_parked_before_the_upgrade_are_replayed(at_0001: str) -> None:
    now = datetime.now(UTC)
    arrived, absent = make_event(), make_event()  # a leader with a row, one without
    waiting_on_arrived = make_event(follows=arrived)
    waiting_on_absent = make_event(follows=absent)
    engine = create_async_engine(at_0001)
    try:
        async with engine.begin() as conn:
            # What 0001 held: the leader's row (lease taken, not done) and two parked followers.
            await conn.execute(
                text(
                    "INSERT INTO ordering_events (scope, event_id, owner, lease_until, "
                    "expires_at) VALUES ('s', :id, :owner, :until, :until)"
                ),
                {
                    "id": _key(at_0001, arrived.id),
                    "owner": _key(at_0001, uuid.uuid4()),
                    "until": now - timedelta(seconds=1),
                },
            )
            for follower in (waiting_on_arrived, waiting_on_absent):
                await conn.execute(
                    text(
                        "INSERT INTO ordering_followers (scope, follower_id, leader_id, "
                        "occurred, received, event) VALUES ('s', :id, :leader, :t, :t, :event)"
                    ),
                    {
                        "id": _key(at_0001, follower.id),
                        "leader": _key(at_0001, follower.follows),
                        "t": now,
                        "event": follower.model_dump_json(),
                    },
                )
        await upgrade(engine)
    finally:
        await engine.dispose()

    ordering: CausalOrdering[Any] = CausalOrdering("s", database_url=at_0001)
    handled: list[uuid.UUID] = []

    async def handler(event: Any, depth: int = 0) -> None:
        async with ordering.preceding_event_confirmed(handler, event, depth):
            handled.append(event.id)

    try:
        await handler(arrived)
        await handler(absent)
    finally:
        await ordering.close()
    assert handled == [arrived.id, waiting_on_arrived.id, absent.id, waiting_on_absent.id]


def _key(url: str, value: Any) -> Any:
    """UUIDs as 0001 stored them: native on Postgres, 32 hex digits on SQLite."""
    return value.hex if url.startswith("sqlite") else value
