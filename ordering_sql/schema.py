"""The ordering tables: the single source of truth for the schema (Alembic revisions follow it).

Two tables, every key led by ``scope``:

``ordering_events``
    One row per event this scope knows about. It holds both marks of the reference engine:

    * *processing*, as a lease: ``lease_until`` in the future means a handler holds the event;
      ``owner`` is the token of the last holder, so only that holder may complete or release it.
    * *seen*: ``seen_until`` in the future means the event was handled.
    * *has followers*: a follower parked on this event at some point.

    Keeping both marks in one row is what makes "take the lease unless it is held or already
    seen" a single atomic upsert on one row lock (see ``store/_queries.py``). ``expires_at`` is
    the later of the two, so purging is one indexed range delete.

``ordering_followers``
    Parked followers waiting for ``leader_id``, with the whole event as JSON. A leader that
    completes *claims* its followers (``claimed_by``/``claimed_until``); a row is deleted only when
    the follower itself completes, or when the lost-follower sweep hands it back.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Dialect,
    Index,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    Uuid,
    false,
)

__all__ = ["VERSION_TABLE", "events", "followers", "metadata"]

#: Alembic's version table for this project; never the host application's ``alembic_version``.
VERSION_TABLE: Final = "ordering_sql_version"

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    Values are converted to UTC before they are bound, so backends that store no offset still
    store comparable UTC values, and results always come back aware.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            msg = f"Refusing a naive datetime {value!r}: ordering-sql stores aware UTC times only."
            raise ValueError(msg)
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


SCOPE_LENGTH: Final = 200

events = Table(
    "ordering_events",
    metadata,
    Column("scope", String(SCOPE_LENGTH), primary_key=True),
    Column("event_id", Uuid(), primary_key=True),
    Column("owner", Uuid(), nullable=True),
    Column("lease_until", UtcDateTime(), nullable=True),
    Column("seen_until", UtcDateTime(), nullable=True),
    Column("expires_at", UtcDateTime(), nullable=False),
    # Set by every follower that parks on this event, in the same statement that reads this
    # row's seen mark under its row lock: the completion learns from it that it must look for
    # followers (see ``store/_queries.py``). A row of an event that never arrived ("placeholder")
    # holds only this flag.
    Column("has_followers", Boolean(), nullable=False, server_default=false()),
    Index(None, "expires_at"),
)

followers = Table(
    "ordering_followers",
    metadata,
    Column("scope", String(SCOPE_LENGTH), primary_key=True),
    Column("follower_id", Uuid(), primary_key=True),
    Column("leader_id", Uuid(), nullable=False),
    Column("occurred", UtcDateTime(), nullable=False),
    Column("received", UtcDateTime(), nullable=False),
    Column("event", Text(), nullable=False),
    Column("claimed_by", Uuid(), nullable=True),
    Column("claimed_until", UtcDateTime(), nullable=True),
    Index(None, "scope", "leader_id", "occurred"),
    Index(None, "scope", "received"),
    Index(None, "scope", "claimed_until"),
)
