"""Fixtures for the Prefect adapter: a private Prefect home, Prefect settings per test, and a
migrated Prefect database (migrated once per session, copied for each test).

Prefect reads its settings once, when it is first imported, and creates its home directory
then. This conftest is loaded before any test module of this directory imports Prefect, so the
first import happens here, with ``PREFECT_HOME`` pointing at a private temporary directory: the
suite never writes to ``~/.prefect``. The environment is restored right after the import.
Every test then sees Prefect settings only through ``prefect.settings.temporary_settings``
(a context variable), which ends with the test, so nothing leaks into other tests.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def _import_prefect_with_a_private_home() -> None:
    if "prefect" in sys.modules:  # pragma: no cover - another module imported it first
        return
    home = tempfile.mkdtemp(prefix="ordering-sql-prefect-home-")
    atexit.register(shutil.rmtree, home, True)
    saved = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = home
    try:
        import prefect.context  # noqa: F401  (creates the home and freezes the settings)
    finally:
        if saved is None:
            del os.environ["PREFECT_HOME"]
        else:
            os.environ["PREFECT_HOME"] = saved


_import_prefect_with_a_private_home()

from prefect.settings import (  # noqa: E402
    PREFECT_HOME,
    PREFECT_SERVER_DATABASE_CONNECTION_URL,
    PREFECT_SERVER_EVENTS_CAUSAL_ORDERING,
    temporary_settings,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
ADAPTER = "ordering_sql.prefect"

_MIGRATE_PREFECT = """
import asyncio
from prefect.server.database import provide_database_interface

asyncio.run(provide_database_interface().create_db())
"""


def prefect_child_env(home: Path, prefect_db: Path, **extra: str) -> dict[str, str]:
    """The environment of a child process running Prefect: its own home and database."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("PREFECT_", "ORDERING_SQL_"))
    }
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{prefect_db}",
        PREFECT_SERVER_EVENTS_CAUSAL_ORDERING=ADAPTER,
        PREFECT_LOGGING_LEVEL="WARNING",
        PYTHONPATH=str(REPO_ROOT),
    )
    env.update(extra)
    return env


class _TemplateBuilder:
    """Makes the migrated Prefect database in a child process, started as early as possible.

    Prefect's migrations take about 10 s of CPU, so the file is kept in pytest's cache directory,
    one per Prefect version, and renamed into place only once complete. When the file is missing
    and a selected test needs it, the migration starts in the background right after collection,
    while the tests that need no Prefect database run. The child has its own home, so this
    process's Prefect engines and settings are untouched.
    """

    def __init__(self) -> None:
        self.path: Path | None = None
        self.child: subprocess.Popen[bytes] | None = None
        self.partial: Path | None = None
        self.home: str | None = None

    def start(self, config: pytest.Config) -> None:
        import prefect

        if self.path is not None:
            return
        name = f"prefect-{prefect.__version__}.db"
        cache = getattr(config, "cache", None)
        if cache is not None:
            where = cache.mkdir("ordering-sql-prefect-db")
        else:  # pragma: no cover - pytest run with -p no:cacheprovider
            where = Path(tempfile.mkdtemp(prefix="ordering-sql-prefect-db-"))
            atexit.register(shutil.rmtree, where, True)
        self.path = where / name
        if self.path.exists():
            return
        self.partial = where / f"{name}.{os.getpid()}.partial"
        self.home = tempfile.mkdtemp(prefix="ordering-sql-prefect-home-")
        with (Path(self.home) / "stderr.txt").open("wb") as stderr:
            self.child = subprocess.Popen(
                [sys.executable, "-c", _MIGRATE_PREFECT],
                env=prefect_child_env(Path(self.home), self.partial),
                cwd=REPO_ROOT,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        atexit.register(self.abandon)

    def wait(self) -> Path:
        assert self.path is not None
        if self.child is not None:
            assert self.partial is not None
            assert self.home is not None
            if self.child.wait(timeout=180) != 0:
                stderr = (Path(self.home) / "stderr.txt").read_text()
                pytest.fail(f"Prefect's migration failed:\n{stderr[-4000:]}")
            os.replace(self.partial, self.path)
            self.abandon()
        return self.path

    def abandon(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.kill()
            self.child.wait()
        self.child = None
        if self.partial is not None:
            self.partial.unlink(missing_ok=True)
        if self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)


_template = _TemplateBuilder()


@pytest.hookimpl(trylast=True)  # after deselection by -m and -k
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any("prefect_db_template" in getattr(item, "fixturenames", ()) for item in items):
        _template.start(config)


@pytest.fixture(scope="session")
def prefect_db_template(request: pytest.FixtureRequest) -> Path:
    """A SQLite file holding Prefect's own schema, made by Prefect's migrations."""
    _template.start(request.config)
    return _template.wait()


@pytest.fixture
def prefect_db(prefect_db_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the migrated Prefect database, for one test."""
    path = tmp_path / "prefect.db"
    shutil.copyfile(prefect_db_template, path)
    return path


@pytest.fixture
def prefect_home(tmp_path: Path) -> Path:
    home = tmp_path / "prefect-home"
    home.mkdir()
    return home


@pytest.fixture
def prefect_settings(prefect_home: Path) -> Iterator[dict[Any, Any]]:
    """Prefect configured to use ``ordering_sql.prefect``, with this test's own home.

    Prefect's database is then Prefect's default, ``<home>/prefect.db``; tests that need
    another one enter ``temporary_settings`` once more. A sync fixture on purpose: the context
    variable it sets is inherited by the test's event loop tasks.
    """
    updates: dict[Any, Any] = {
        PREFECT_HOME: str(prefect_home),
        PREFECT_SERVER_EVENTS_CAUSAL_ORDERING: ADAPTER,
    }
    with temporary_settings(updates=updates):
        yield updates


@pytest.fixture
def prefect_with_db(prefect_settings: dict[Any, Any], prefect_db: Path) -> Iterator[Path]:
    """``prefect_settings`` with Prefect's database at a migrated copy; yields its path."""
    updates = {PREFECT_SERVER_DATABASE_CONNECTION_URL: f"sqlite+aiosqlite:///{prefect_db}"}
    with temporary_settings(updates=updates):
        yield prefect_db
