"""The schema's revisions, through Alembic: what the Store checks and runs.

The Alembic scripts live in ``migrations/`` at the top of a checkout; the wheel carries the same
folder inside the package as ``ordering_sql/migrations``. ``script_location()`` finds whichever
is present, so migrating works from a checkout and from an installed copy, in any directory.
Our revisions are recorded in their own table, ``ordering_sql_version``, so a host application
that uses Alembic for its own schema in the same database is never disturbed.

Alembic is imported here, and this module only where a schema is checked or changed (once per
Store), so importing the engine does not pull Alembic in.
"""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable
from functools import cache
from pathlib import Path
from typing import Final
from uuid import UUID

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import AsyncConnection

from ordering_sql.errors import ConfigurationError
from ordering_sql.schema import VERSION_TABLE

__all__ = [
    "MIGRATION_LOCK",
    "alembic_config",
    "head_revision",
    "is_known_revision",
    "known_revisions",
    "read_revision",
    "run_upgrade",
    "script_location",
]

_PACKAGE_DIR: Final = Path(__file__).resolve().parents[1]
#: Key under which concurrent migrations serialise (Postgres advisory lock).
MIGRATION_LOCK: Final = UUID("6f7264e7-2d73-716c-0000-6d6967726174")


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


def read_revision(sync_conn: Connection) -> str | None:
    """The revision a database is at (None: no ordering-sql schema), on a sync connection."""
    if not inspect(sync_conn).has_table(VERSION_TABLE):
        return None
    row = sync_conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).first()
    return None if row is None else str(row[0])


async def run_upgrade(
    conn: AsyncConnection,
    serialize: Callable[[AsyncConnection], Awaitable[None]],
    revision: str = "head",
) -> None:
    """Run the Alembic upgrade on ``conn``, inside the transaction the caller opened.

    ``serialize(conn)`` makes concurrent migrations take turns (several servers starting
    together); the second one then finds the schema at head and does nothing.
    """
    cfg = alembic_config()

    def _run(sync_conn: Connection) -> None:
        cfg.attributes["connection"] = sync_conn
        command.upgrade(cfg, revision)

    await serialize(conn)
    await conn.run_sync(_run)


def offline_script(url: str, revision: str = "head") -> str:
    """The DDL an upgrade to ``revision`` runs, as SQL text (Alembic's offline mode)."""
    cfg = alembic_config()
    out = io.StringIO()
    cfg.stdout = out
    cfg.output_buffer = out
    cfg.attributes["offline_url"] = url
    command.upgrade(cfg, revision, sql=True)
    return out.getvalue()
