"""Backend fixtures: every integration test runs on SQLite and on a real Postgres.

Postgres comes from ``ORDERING_SQL_TEST_POSTGRES_URL`` (for example
``postgresql+asyncpg://postgres@127.0.0.1:5432/test``). Without it the suite starts a throwaway
cluster of its own for the session where Postgres's server binaries are installed
(``tests/pg_servers.py``), and skips the Postgres half with a reason only where they are not;
under ``CI=true`` a missing or unreachable Postgres fails the run instead of skipping it.

Isolation: a template database (Postgres) or file (SQLite) is migrated once per session; each
test gets a fresh copy of it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from ordering_sql import CausalOrdering, dispose_engines, migrate
from ordering_sql.settings import ENV_DIRECT_DRIVER
from tests.pg_servers import ThrowawayPostgres
from tests.support import Clock

PG_ENV = "ORDERING_SQL_TEST_POSTGRES_URL"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

BACKENDS = [
    pytest.param("sqlite", marks=pytest.mark.sqlite),
    pytest.param("postgres", marks=pytest.mark.postgres),
]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the developer's own ORDERING_SQL_* settings."""
    for name in list(os.environ):
        if name.startswith("ORDERING_SQL_") and name != PG_ENV:
            monkeypatch.delenv(name)


def _asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _with_database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


async def _admin(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(_asyncpg_dsn(url), timeout=10)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """The URL of a Postgres database the suite may create databases from.

    ``ORDERING_SQL_TEST_POSTGRES_URL`` if set. Unset, a throwaway cluster of the session's own
    (``tests/pg_servers.py``), with a database ``test``, stopped and deleted at the end of the
    session; only where Postgres's server binaries are missing, a skip (a failure under CI=true).
    """
    url = os.environ.get(PG_ENV)
    if not url:
        missing = ThrowawayPostgres.unavailable_reason()
        if missing is None:
            with ThrowawayPostgres() as server:
                asyncio.run(_admin(server.url(), 'CREATE DATABASE "test"'))
                yield server.url("test")
            return
        reason = (
            f"Postgres tests need {PG_ENV}, e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/test,"
            f" or Postgres's server binaries for a throwaway cluster, but {missing}"
        )
        if IN_CI:
            pytest.fail(f"CI=true but {PG_ENV} is not set. {reason}")
        pytest.skip(reason)
    try:
        asyncio.run(_admin(url, "SELECT 1"))
    except (OSError, asyncpg.PostgresError) as exc:
        message = f"Postgres at {make_url(url).render_as_string()} is unreachable: {exc}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    yield url


@pytest.fixture(scope="session")
def postgres_template(postgres_admin_url: str) -> Iterator[str]:
    """A database migrated to head, copied for each test."""
    name = f"ordering_tmpl_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(postgres_admin_url, f'CREATE DATABASE "{name}"'))
    asyncio.run(migrate(_with_database(postgres_admin_url, name)))
    yield name
    asyncio.run(_admin(postgres_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    asyncio.run(migrate(f"sqlite+aiosqlite:///{path}"))
    return path


@pytest.fixture
async def postgres_url(postgres_admin_url: str, postgres_template: str) -> AsyncIterator[str]:
    name = f"ordering_test_{uuid.uuid4().hex[:12]}"
    await _admin(postgres_admin_url, f'CREATE DATABASE "{name}" TEMPLATE "{postgres_template}"')
    yield _with_database(postgres_admin_url, name)
    await dispose_engines()
    await _admin(postgres_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def empty_postgres_url(postgres_admin_url: str) -> AsyncIterator[str]:
    """A Postgres database with no ordering-sql tables at all; dropped afterwards."""
    name = f"ordering_empty_{uuid.uuid4().hex[:12]}"
    await _admin(postgres_admin_url, f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(postgres_admin_url, name)
    finally:
        await dispose_engines()
        await _admin(postgres_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def sqlite_url(sqlite_template: Path, tmp_path: Path) -> AsyncIterator[str]:
    path = tmp_path / "ordering.db"
    shutil.copyfile(sqlite_template, path)
    yield f"sqlite+aiosqlite:///{path}"
    await dispose_engines()


#: The engine's own tests also run on Postgres with every statement through SQLAlchemy
#: (``ORDERING_SQL_DIRECT_DRIVER=0``), the path that instrumented applications and other
#: Postgres drivers take.
ENGINE_BACKENDS = [
    *BACKENDS,
    pytest.param("postgres_sqlalchemy", marks=pytest.mark.postgres),
]


@pytest.fixture(params=ENGINE_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def postgres_sqlalchemy_url(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(ENV_DIRECT_DRIVER, "0")
    return postgres_url


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest) -> str:
    """A fresh, migrated database on each backend."""
    return str(request.getfixturevalue(f"{backend}_url"))


@pytest.fixture
def clock() -> Clock:
    return Clock()


OrderingFactory = Callable[..., CausalOrdering[Any]]


@pytest.fixture
async def make_ordering(database_url: str, clock: Clock) -> AsyncIterator[OrderingFactory]:
    """Build CausalOrdering instances on the test database with the test clock; closed after."""
    made: list[CausalOrdering[Any]] = []

    def factory(scope: str = "test", **kwargs: Any) -> CausalOrdering[Any]:
        kwargs.setdefault("database_url", database_url)
        kwargs.setdefault("clock", clock)
        ordering: CausalOrdering[Any] = CausalOrdering(scope, **kwargs)
        made.append(ordering)
        return ordering

    yield factory
    for ordering in made:
        await ordering.close()
    await dispose_engines()


@pytest.fixture
def ordering(make_ordering: OrderingFactory) -> CausalOrdering[Any]:
    return make_ordering()
