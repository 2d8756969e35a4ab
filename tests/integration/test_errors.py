"""What a user sees when the database or the call is wrong: clear ordering-sql errors."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ordering_sql import (
    CausalOrdering,
    ClosedError,
    ConfigurationError,
    DatabaseUnavailableError,
    ReceivedEvent,
    SchemaNotReadyError,
    StoreError,
    dispose_engines,
    migrate,
)
from ordering_sql.migration import current, head_revision
from tests.conftest import OrderingFactory, _with_database
from tests.support import make_event

SECRET = "s3cr3t-pw"
UNREACHABLE_PG = f"postgresql+asyncpg://app:{SECRET}@127.0.0.1:1/ordering"


def _password(url: str) -> str | None:
    return make_url(url).password


@pytest.fixture
async def ordering_cleanup() -> AsyncIterator[list[CausalOrdering[Any]]]:
    """Orderings a test builds by hand; closed, and the shared engines disposed, afterwards."""
    made: list[CausalOrdering[Any]] = []
    yield made
    for ordering in made:
        await ordering.close()
    await dispose_engines()


async def _tables(url: str) -> set[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: sa_inspect(c).get_table_names()))
    finally:
        await engine.dispose()


async def _revision(url: str) -> str | None:
    engine: AsyncEngine = create_async_engine(url)
    try:
        return await current(engine)
    finally:
        await engine.dispose()


# -- unreachable databases ------------------------------------------------------------------------


async def test_unreachable_postgres_is_unavailable_and_masks_the_password(
    ordering_cleanup: list[CausalOrdering[Any]],
) -> None:
    ordering: CausalOrdering[Any] = CausalOrdering("errors", database_url=UNREACHABLE_PG)
    ordering_cleanup.append(ordering)

    with pytest.raises(DatabaseUnavailableError) as info:
        await ordering.event_has_been_seen(make_event())

    message = str(info.value)
    assert SECRET not in message
    assert "app:***@127.0.0.1:1/ordering" in message
    assert info.value.url is not None
    assert SECRET not in info.value.url
    assert isinstance(info.value, StoreError)


async def test_nonexistent_postgres_database_is_unavailable(
    postgres_admin_url: str, ordering_cleanup: list[CausalOrdering[Any]]
) -> None:
    name = f"ordering_missing_{uuid.uuid4().hex[:12]}"
    url = _with_database(postgres_admin_url, name)
    ordering: CausalOrdering[Any] = CausalOrdering("errors", database_url=url)
    ordering_cleanup.append(ordering)

    with pytest.raises(DatabaseUnavailableError) as info:
        await ordering.record_event_as_seen(make_event())

    assert name in str(info.value)
    if password := _password(postgres_admin_url):
        assert password not in str(info.value)


async def test_sqlite_in_a_missing_directory_is_unavailable(
    tmp_path: Path, ordering_cleanup: list[CausalOrdering[Any]]
) -> None:
    missing_dir = tmp_path / "no" / "such" / "dir"
    ordering: CausalOrdering[Any] = CausalOrdering(
        "errors", database_url=f"sqlite+aiosqlite:///{missing_dir}/ordering.db"
    )
    ordering_cleanup.append(ordering)

    with pytest.raises(DatabaseUnavailableError) as info:
        await ordering.record_event_as_seen(make_event())

    assert str(missing_dir / "ordering.db") in str(info.value)
    assert not missing_dir.exists()  # nothing was created on the way


async def test_migrate_of_an_unreachable_database_is_unavailable() -> None:
    with pytest.raises(DatabaseUnavailableError) as info:
        await migrate(UNREACHABLE_PG)
    assert SECRET not in str(info.value)


# -- schema readiness -------------------------------------------------------------------------


async def test_unmigrated_postgres_raises_schema_not_ready(
    empty_postgres_url: str, ordering_cleanup: list[CausalOrdering[Any]]
) -> None:
    ordering: CausalOrdering[Any] = CausalOrdering("errors", database_url=empty_postgres_url)
    ordering_cleanup.append(ordering)

    with pytest.raises(SchemaNotReadyError) as info:
        await ordering.event_has_been_seen(make_event())

    error = info.value
    assert "ordering-sql migrate" in str(error)
    assert error.current is None
    assert error.expected == head_revision()
    if password := _password(empty_postgres_url):
        assert password not in str(error)
    # A shared server's schema is never changed behind the operator's back.
    assert not {t for t in await _tables(empty_postgres_url) if t.startswith("ordering_")}


async def test_unmigrated_postgres_works_once_migrated(
    empty_postgres_url: str, ordering_cleanup: list[CausalOrdering[Any]]
) -> None:
    ordering: CausalOrdering[Any] = CausalOrdering("errors", database_url=empty_postgres_url)
    ordering_cleanup.append(ordering)
    event = make_event()
    with pytest.raises(SchemaNotReadyError):
        await ordering.record_event_as_seen(event)

    assert await migrate(empty_postgres_url) == head_revision()

    # The same instance recovers without being rebuilt.
    await ordering.record_event_as_seen(event)
    assert await ordering.event_has_been_seen(event)


async def test_postgres_at_an_unknown_revision_raises_schema_not_ready(
    empty_postgres_url: str, ordering_cleanup: list[CausalOrdering[Any]]
) -> None:
    engine = create_async_engine(empty_postgres_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE ordering_sql_version (version_num text)"))
            await conn.execute(text("INSERT INTO ordering_sql_version VALUES ('0000')"))
    finally:
        await engine.dispose()
    ordering: CausalOrdering[Any] = CausalOrdering("errors", database_url=empty_postgres_url)
    ordering_cleanup.append(ordering)

    with pytest.raises(SchemaNotReadyError) as info:
        await ordering.get_lost_followers()

    assert info.value.current == "0000"
    assert "'0000'" in str(info.value)
    assert "ordering-sql migrate" in str(info.value)


@pytest.fixture
def unmigrated_sqlite(tmp_path: Path) -> Path:
    """A SQLite file that already holds an application's own table, but no ordering tables."""
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    try:
        conn.execute("CREATE TABLE app_things (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO app_things (name) VALUES ('kept')")
        conn.commit()
    finally:
        conn.close()
    return path


async def test_unmigrated_sqlite_is_migrated_on_first_use(
    unmigrated_sqlite: Path, ordering_cleanup: list[CausalOrdering[Any]]
) -> None:
    url = f"sqlite+aiosqlite:///{unmigrated_sqlite}"
    assert await _revision(url) is None
    ordering: CausalOrdering[Any] = CausalOrdering("errors", database_url=url)
    ordering_cleanup.append(ordering)
    event = make_event()

    await ordering.record_event_as_seen(event)

    assert await ordering.event_has_been_seen(event)
    assert await _revision(url) == head_revision()
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT name FROM app_things"))).all()
    finally:
        await engine.dispose()
    assert [tuple(r) for r in rows] == [("kept",)]


async def test_missing_sqlite_file_is_created_and_migrated(
    tmp_path: Path, ordering_cleanup: list[CausalOrdering[Any]]
) -> None:
    path = tmp_path / "new.db"
    url = f"sqlite+aiosqlite:///{path}"
    ordering: CausalOrdering[Any] = CausalOrdering("errors", database_url=url)
    ordering_cleanup.append(ordering)

    assert await ordering.get_followers(uuid.uuid4()) == []

    assert path.is_file()
    assert await _revision(url) == head_revision()


# -- wrong calls ----------------------------------------------------------------------------------


async def test_naive_clock_is_a_configuration_error(make_ordering: OrderingFactory) -> None:
    naive = make_ordering(clock=lambda: datetime.now())  # naive on purpose
    event = make_event()

    with pytest.raises(ConfigurationError, match="naive"):
        await naive.record_event_as_seen(event)
    with pytest.raises(ConfigurationError, match="naive"):
        await naive.record_event_as_processing(event)

    good = make_ordering()
    assert not await good.event_has_been_seen(event)
    assert not await good.event_has_started_processing(event)


async def test_instance_is_unusable_after_close(make_ordering: OrderingFactory) -> None:
    ordering = make_ordering()
    event = make_event()
    await ordering.record_event_as_seen(event)
    await ordering.close()

    with pytest.raises(ClosedError):
        await ordering.event_has_been_seen(event)
    with pytest.raises(ClosedError):
        await ordering.record_event_as_seen(make_event())
    with pytest.raises(ClosedError):
        await ordering.get_lost_followers()
    with pytest.raises(ClosedError):
        async with ordering.event_is_processing(make_event()):
            pytest.fail("the body must not run on a closed instance")
    await ordering.close()  # closing twice is harmless


async def test_closing_one_instance_leaves_others_on_the_same_database_working(
    make_ordering: OrderingFactory,
) -> None:
    first, second = make_ordering("one"), make_ordering("two")
    event = make_event()
    await first.record_event_as_seen(event)
    await second.record_event_as_seen(event)

    await first.close()

    assert await second.event_has_been_seen(event)


async def test_record_follower_of_an_event_following_nothing_is_rejected(
    make_ordering: OrderingFactory,
) -> None:
    ordering = make_ordering()
    event: ReceivedEvent = make_event()

    with pytest.raises(ConfigurationError, match=str(event.id)):
        await ordering.record_follower(event)

    assert await ordering.followers_by_id([event.id]) == []


async def test_bad_event_id_string_is_a_configuration_error(
    make_ordering: OrderingFactory,
) -> None:
    ordering = make_ordering()
    with pytest.raises(ConfigurationError, match="not-a-uuid"):
        await ordering.event_has_been_seen("not-a-uuid")
