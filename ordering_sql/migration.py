"""Schema migrations, for operators and host applications: ``migrate``, ``upgrade``, ``current``.

The revisions themselves and how they are found and run are in ``store/_migrations.py``; a
Store checks the schema (and migrates an embedded SQLite database) on its first use.
"""

from __future__ import annotations

import logging

from sqlalchemy.ext.asyncio import AsyncEngine

from ordering_sql.settings import Settings
from ordering_sql.store import Store
from ordering_sql.store._migrations import (
    head_revision,
    is_known_revision,
    known_revisions,
    offline_script,
    read_revision,
    script_location,
)

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


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Bring the database behind a host's ``engine`` up to ``revision``; the engine stays open.

    Raises ``SchemaNotReadyError`` if a newer ordering-sql migrated it already, and
    ``StoreError`` (or ``DatabaseUnavailableError``) if the database fails.
    """
    await Store.from_engine(engine).migrate(revision)


async def current(engine: AsyncEngine) -> str | None:
    """The revision the database is at, or None when it has no ordering-sql schema."""
    async with engine.connect() as conn:
        return await conn.run_sync(read_revision)


async def migrate(database_url: str | None = None, *, engine: AsyncEngine | None = None) -> str:
    """Bring the database to the newest revision; returns that revision.

    ``database_url`` falls back to ``ORDERING_SQL_DATABASE_URL``, then to the embedded SQLite
    file. A host's own ``engine`` may be passed instead; it is left open. Raises what
    ``upgrade`` raises, and ``ConfigurationError`` for a bad URL.
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
    url = Settings.from_env(database_url).url.render_as_string(hide_password=True)
    return offline_script(url, revision)
