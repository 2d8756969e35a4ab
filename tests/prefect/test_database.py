"""Which database ``ordering_sql.prefect`` uses, and its migration on first use.

Without ``ORDERING_SQL_DATABASE_URL`` the ordering tables go into Prefect's own database, beside
Prefect's tables, which they never touch; the first use creates them, also when several
instances start at once.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from prefect.server.events.ordering import get_triggers_causal_ordering
from prefect.server.events.schemas.events import ReceivedEvent
from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings

import ordering_sql
import ordering_sql.prefect
from ordering_sql.migration import head_revision
from tests.conftest import BACKENDS
from tests.prefect.support import make_event, schema_versions

OURS = {"ordering_events", "ordering_followers", "ordering_sql_version"}


def _schema(path: Path) -> dict[str, tuple[str, str]]:
    """Every table, index and trigger of a SQLite file: its table and DDL, by name."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT name, tbl_name, sql FROM sqlite_master")
        return {name: (table, sql) for name, table, sql in rows}


def _one_column(path: Path, query: str) -> list[Any]:
    with sqlite3.connect(path) as conn:
        return [row[0] for row in conn.execute(query)]


def _status_json(url: str) -> Any:
    """``ordering-sql status --scope triggers --json --database-url URL``, parsed."""
    command = ["status", "--scope", "triggers", "--json", "--database-url", url]
    status = subprocess.run(
        [sys.executable, "-m", "ordering_sql", *command],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(status.stdout)


async def _park_one_follower() -> Any:
    """Through the ordering Prefect builds: park a follower, and give everything back."""
    ordering = get_triggers_causal_ordering()
    follower = make_event(follows=make_event())
    await ordering.record_follower(follower)
    await ordering.close()
    await ordering_sql.dispose_engines()
    return follower


@pytest.mark.sqlite
async def test_tables_go_into_prefects_database_and_leave_prefects_tables_alone(
    prefect_with_db: Path,
) -> None:
    before = _schema(prefect_with_db)
    prefects_revision = _one_column(prefect_with_db, "SELECT version_num FROM alembic_version")
    assert "automation" in before
    assert not OURS & set(before)
    assert ordering_sql.prefect.database_url() == f"sqlite+aiosqlite:///{prefect_with_db}"

    follower = await _park_one_follower()

    after = _schema(prefect_with_db)
    assert set(after) >= OURS
    assert {name: after[name] for name in before} == before, "Prefect's schema is unchanged"
    assert all(after[name][0].startswith("ordering_") for name in set(after) - set(before))
    assert _one_column(prefect_with_db, "SELECT version_num FROM alembic_version") == (
        prefects_revision
    )
    assert _one_column(prefect_with_db, "SELECT version_num FROM ordering_sql_version") == [
        head_revision()
    ]
    stored = _one_column(prefect_with_db, "SELECT event FROM ordering_followers")
    assert [ReceivedEvent.model_validate_json(event) for event in stored] == [follower]

    # The README's check: the operator command, pointed at Prefect's database URL.
    status = _status_json(ordering_sql.prefect.database_url())
    assert [(row["scope"], row["parked"]) for row in status] == [("triggers", 1)]


@pytest.mark.sqlite
async def test_prefects_default_database_is_used_when_nothing_is_configured(
    prefect_settings: dict[Any, Any], prefect_home: Path
) -> None:
    """No connection URL at all: Prefect's default, ``<PREFECT_HOME>/prefect.db``."""
    default = prefect_home / "prefect.db"
    assert ordering_sql.prefect.database_url() == f"sqlite+aiosqlite:///{default}"
    assert not default.exists()
    await _park_one_follower()
    assert set(_schema(default)) >= OURS


@pytest.mark.sqlite
async def test_ordering_sql_database_url_wins_over_prefects(
    prefect_with_db: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORDERING_SQL_DATABASE_URL", sqlite_url)
    follower = await _park_one_follower()
    assert not OURS & set(_schema(prefect_with_db)), "Prefect's database is left alone"
    ordering = ordering_sql.prefect.CausalOrdering(scope="triggers")
    assert await ordering.get_followers(follower.follows) == [follower]
    await ordering.close()


@pytest.fixture(params=BACKENDS)
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database without the ordering schema: a new SQLite file, or an empty Postgres."""
    if request.param == "postgres":
        return str(request.getfixturevalue("empty_postgres_url"))
    return f"sqlite+aiosqlite:///{tmp_path / 'new.db'}"


async def test_instances_starting_together_migrate_an_empty_database_once(
    empty_database: str, prefect_settings: dict[Any, Any]
) -> None:
    """Four servers' first calls at the same moment, each with its own engine and connection.

    The database is Prefect's own (``PREFECT_SERVER_DATABASE_CONNECTION_URL``): the fallback,
    on an empty database, with no ``ordering-sql migrate`` run beforehand.
    """
    servers = 4
    barrier = threading.Barrier(servers)
    errors: list[BaseException] = []
    followers = [make_event(follows=make_event()) for _ in range(servers)]

    async def first_use(follower: Any) -> None:
        ordering = get_triggers_causal_ordering()
        barrier.wait(timeout=30)
        await ordering.record_follower(follower)
        await ordering.close()

    def server(follower: Any, context: contextvars.Context) -> None:
        try:
            context.run(asyncio.run, first_use(follower))  # its own loop, so its own engine
        except BaseException as exc:
            errors.append(exc)

    with temporary_settings(updates={PREFECT_SERVER_DATABASE_CONNECTION_URL: empty_database}):
        threads = [
            threading.Thread(target=server, args=(follower, contextvars.copy_context()))
            for follower in followers
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []

        ordering = get_triggers_causal_ordering()
        for follower in followers:
            assert await ordering.get_followers(follower.follows) == [follower]
        await ordering.close()
        await ordering_sql.dispose_engines()

    assert await schema_versions(empty_database) == [(head_revision(),)]
