"""Schema migrations, driven through Alembic's programmatic API.

The Alembic scripts live in ``migrations/`` at the top of a checkout; the wheel carries the same
folder inside the package as ``ordering_sql/migrations``. ``script_location()`` finds whichever
is present, so migrating works from a checkout and from an installed copy, in any directory.
Our revisions are recorded in their own table, ``ordering_sql_version``, so a host application
that uses Alembic for its own schema in the same database is never disturbed.
"""

from __future__ import annotations

import io
import logging
from functools import cache
from pathlib import Path
from typing import Final
from uuid import UUID

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ordering_sql.errors import ConfigurationError
from ordering_sql.settings import Settings
from ordering_sql.store import Store
from ordering_sql.store._dialects import Dialect

__all__ = [
    "current",
    "head_revision",
    "is_known_revision",
    "known_revisions",
    "migrate",
    "script_location",
    "sql_script",
    "upgrade",
]

logger = logging.getLogger(__name__)

_PACKAGE_DIR: Final = Path(__file__).resolve().parent
#: Key under which concurrent migrations serialise (Postgres advisory lock).
_MIGRATION_LOCK: Final = UUID("6f7264e7-2d73-716c-0000-6d6967726174")


@cache
def script_location() -> str:
    """The folder holding ``env.py`` and ``versions/``: packaged copy first, then the checkout."""
    for candidate in (_PACKAGE_DIR / "migrations", _PACKAGE_DIR.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return str(candidate)
    msg = f"Cannot find the ordering-sql migration scripts next to {_PACKAGE_DIR}."
    raise ConfigurationError(msg)


def alembic_config() -> Config:
    """An Alembic config for our scripts; no ini file needed."""
    cfg = Config(stdout=io.StringIO())
    cfg.set_main_option("script_location", script_location())
    return cfg


@cache
def head_revision() -> str:
    """The revision this version of the code expects."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "the migration scripts define no revision"
    return head


@cache
def known_revisions() -> frozenset[str]:
    """Every revision this version of the code has a script for."""
    script = ScriptDirectory.from_config(alembic_config())
    return frozenset(rev.revision for rev in script.walk_revisions())


def is_known_revision(revision: str) -> bool:
    return revision in known_revisions()


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Bring the database behind a host's ``engine`` up to ``revision``; the engine stays open."""
    await Store.from_engine(engine).migrate(revision)


async def run_upgrade(conn: AsyncConnection, dialect: Dialect, revision: str = "head") -> None:
    """Run the Alembic upgrade on ``conn``, inside the transaction the caller opened."""
    cfg = alembic_config()

    def _run(sync_conn: Connection) -> None:
        cfg.attributes["connection"] = sync_conn
        command.upgrade(cfg, revision)

    # Two processes migrating at once (several servers starting together) take turns; the
    # second finds the schema at head and does nothing.
    await dialect.serialize(conn, "ordering_sql", _MIGRATION_LOCK)
    await conn.run_sync(_run)


async def current(engine: AsyncEngine) -> str | None:
    """The revision the database is at, or None when it has no ordering-sql schema."""
    from ordering_sql.store import _read_revision

    async with engine.connect() as conn:
        return await conn.run_sync(_read_revision)


async def migrate(database_url: str | None = None, *, engine: AsyncEngine | None = None) -> str:
    """Bring the database to the newest revision; returns that revision.

    ``database_url`` falls back to ``ORDERING_SQL_DATABASE_URL``, then to the embedded SQLite
    file. A host's own ``engine`` may be passed instead; it is left open.
    """
    store = (
        Store.from_engine(engine)
        if engine
        else Store.from_settings(Settings.from_env(database_url))
    )
    try:
        logger.info("migrating %s to %s", store.url, head_revision())
        await store.migrate()
    finally:
        await store.dispose()
    return head_revision()


def sql_script(database_url: str | None = None, revision: str = "head") -> str:
    """The DDL that ``migrate`` would run, as SQL text for review (Alembic's offline mode)."""
    settings = Settings.from_env(database_url)
    cfg = alembic_config()
    out = io.StringIO()
    cfg.stdout = out
    cfg.output_buffer = out
    cfg.attributes["offline_url"] = settings.url.render_as_string(hide_password=True)
    command.upgrade(cfg, revision, sql=True)
    return out.getvalue()
