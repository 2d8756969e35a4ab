"""Create the ordering tables: events (seen marks and processing leases) and parked followers.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from ordering_sql.schema import UtcDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ordering_events",
        sa.Column("scope", sa.String(length=200), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("owner", sa.Uuid(), nullable=True),
        sa.Column("lease_until", UtcDateTime(), nullable=True),
        sa.Column("seen_until", UtcDateTime(), nullable=True),
        sa.Column("expires_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "event_id", name="pk_ordering_events"),
    )
    op.create_index("ix_ordering_events_expires_at", "ordering_events", ["expires_at"])

    op.create_table(
        "ordering_followers",
        sa.Column("scope", sa.String(length=200), nullable=False),
        sa.Column("follower_id", sa.Uuid(), nullable=False),
        sa.Column("leader_id", sa.Uuid(), nullable=False),
        sa.Column("occurred", UtcDateTime(), nullable=False),
        sa.Column("received", UtcDateTime(), nullable=False),
        sa.Column("event", sa.Text(), nullable=False),
        sa.Column("claimed_by", sa.Uuid(), nullable=True),
        sa.Column("claimed_until", UtcDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("scope", "follower_id", name="pk_ordering_followers"),
    )
    op.create_index(
        "ix_ordering_followers_scope_leader_id_occurred",
        "ordering_followers",
        ["scope", "leader_id", "occurred"],
    )
    op.create_index(
        "ix_ordering_followers_scope_received", "ordering_followers", ["scope", "received"]
    )
    op.create_index(
        "ix_ordering_followers_scope_claimed_until",
        "ordering_followers",
        ["scope", "claimed_until"],
    )


def downgrade() -> None:
    op.drop_table("ordering_followers")
    op.drop_table("ordering_events")
