"""Flag events that followers parked on, so completing an event without followers is one statement.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain ADD COLUMN (no batch copy): SQLite supports it with a constant default.
    op.add_column(
        "ordering_events",
        sa.Column("has_followers", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    # Leaders that followers are parked on now must know it, or their completion would not
    # look for them. Leaders with no row yet (they never arrived) get a placeholder row.
    events = sa.table(
        "ordering_events",
        sa.column("scope"),
        sa.column("event_id"),
        sa.column("expires_at"),
        sa.column("has_followers"),
    )
    followers = sa.table(
        "ordering_followers",
        sa.column("scope"),
        sa.column("leader_id"),
        sa.column("received"),
    )
    waiting = sa.exists().where(
        followers.c.scope == events.c.scope, followers.c.leader_id == events.c.event_id
    )
    op.execute(events.update().where(waiting).values(has_followers=sa.true()))
    has_row = sa.exists().where(
        events.c.scope == followers.c.scope, events.c.event_id == followers.c.leader_id
    )
    placeholders = (
        sa.select(
            followers.c.scope,
            followers.c.leader_id,
            sa.func.max(followers.c.received),
            sa.true(),
        )
        .where(~has_row)
        .group_by(followers.c.scope, followers.c.leader_id)
    )
    op.execute(
        events.insert().from_select(
            ["scope", "event_id", "expires_at", "has_followers"], placeholders
        )
    )


def downgrade() -> None:
    with op.batch_alter_table("ordering_events") as batch:
        batch.drop_column("has_followers")
