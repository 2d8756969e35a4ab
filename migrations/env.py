"""Alembic environment for ordering-sql.

Used in three ways:
* from ``ordering_sql.migration`` (``ordering-sql migrate``): a live connection is passed in
  ``config.attributes["connection"]`` and used as is;
* in offline mode (``ordering-sql migrate --sql``): SQL text is rendered for the URL's dialect;
* from the plain ``alembic`` command in a checkout: the URL comes from ``-x url=...``,
  ``ORDERING_SQL_DATABASE_URL`` or the embedded default, and an engine is made here.

Logging is left to the host: ``fileConfig`` is never called.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from ordering_sql.schema import VERSION_TABLE, metadata
from ordering_sql.settings import Settings

config = context.config


def _only_ours(name: str | None, type_: str, parent_names: object) -> bool:
    # The database may be shared with a host application: look only at our own tables.
    if type_ == "table":
        return bool(name and name.startswith("ordering_"))
    return True


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        include_name=_only_ours,
        compare_type=True,
        **kwargs,  # type: ignore[arg-type]
    )


def _run_online(connection: Connection) -> None:
    _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


async def _run_with_own_engine(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_run_online)
    finally:
        await engine.dispose()


def _url() -> str:
    given = context.get_x_argument(as_dictionary=True).get("url")
    return Settings.from_env(given).url.render_as_string(hide_password=False)


if context.is_offline_mode():
    offline_url = config.attributes.get("offline_url") or _url()
    _configure(url=offline_url, literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()
elif (connection := config.attributes.get("connection")) is not None:
    _run_online(connection)
else:
    asyncio.run(_run_with_own_engine(_url()))
