"""Transient database faults are retried with back-off; past the bound they surface clearly."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from ordering_sql import CausalOrdering, StoreError
from ordering_sql.store import MAX_ATTEMPTS
from tests.support import make_event


class LockHolder(threading.Thread):
    """Another writer: holds SQLite's write lock until released or ``seconds`` passed."""

    def __init__(self, path: Path, seconds: float) -> None:
        super().__init__(daemon=True)
        self.path, self.seconds = path, seconds
        self.locked, self.release = threading.Event(), threading.Event()

    def run(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        try:
            conn.execute("BEGIN IMMEDIATE")
            self.locked.set()
            self.release.wait(self.seconds)
            conn.execute("ROLLBACK")
        finally:
            conn.close()

    def __enter__(self) -> LockHolder:
        self.start()
        assert self.locked.wait(5), "could not take the write lock"
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.join(5)


def _db_path(sqlite_url: str) -> Path:
    return Path(sqlite_url.removeprefix("sqlite+aiosqlite:///"))


@pytest.mark.sqlite
async def test_sqlite_writer_waits_for_a_lock_held_elsewhere(sqlite_url: str) -> None:
    ordering: CausalOrdering[object] = CausalOrdering("retries", database_url=sqlite_url)
    try:
        await ordering.event_has_been_seen(make_event())  # migrated and connected
        event = make_event()
        with LockHolder(_db_path(sqlite_url), 0.5):
            await ordering.record_event_as_seen(event)  # waits for the lock, then succeeds
        assert await ordering.event_has_been_seen(event)
    finally:
        await ordering.close()


@pytest.mark.sqlite
async def test_database_is_locked_is_retried_then_reported(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With a tiny busy timeout, "database is locked" is retried with back-off, then raised."""
    monkeypatch.setenv("ORDERING_SQL_BUSY_TIMEOUT", "0.01")
    ordering: CausalOrdering[object] = CausalOrdering("retries", database_url=sqlite_url)
    try:
        await ordering.event_has_been_seen(make_event())
        with LockHolder(_db_path(sqlite_url), 30), pytest.raises(StoreError) as info:
            await asyncio.wait_for(ordering.record_event_as_seen(make_event()), timeout=30)
        message = str(info.value)
        assert f"after {MAX_ATTEMPTS} attempts" in message
        assert "locked" in message
        retries = [r for r in caplog.records if "transient database fault" in r.getMessage()]
        assert len(retries) == MAX_ATTEMPTS - 1
    finally:
        await ordering.close()


@pytest.mark.sqlite
async def test_a_lock_released_during_the_retries_is_not_an_error(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORDERING_SQL_BUSY_TIMEOUT", "0.01")
    ordering: CausalOrdering[object] = CausalOrdering("retries", database_url=sqlite_url)
    try:
        await ordering.event_has_been_seen(make_event())
        event = make_event()
        with LockHolder(_db_path(sqlite_url), 0.3):
            await ordering.record_event_as_seen(event)  # retried until the lock is gone
        assert await ordering.event_has_been_seen(event)
    finally:
        await ordering.close()
