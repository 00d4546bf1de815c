"""Replicas: the daemons sharing one PostgreSQL database, and their claims on targets.

``replicas`` has a row per running ``run`` process (its name, a random instance id, where it
runs and its lease); ``claims`` a row per target naming the replica that polls it, until
``lease_until`` (database time), with an ``epoch`` raised by every change of owner, which
fences the writes of a replica that lost the claim. The tables are made on SQLite too (one
schema on both databases) and stay empty there: a SQLite database has one daemon.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("name", sa.String(128)),
        sa.Column("instance", sa.String(36), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("key_check", sa.String(32), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_replicas"),
    )
    op.create_table(
        "claims",
        sa.Column("target", sa.String(128)),
        sa.Column("owner", sa.String(128)),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True)),
        sa.PrimaryKeyConstraint("target", name="pk_claims"),
    )
    op.create_index("ix_claims_owner", "claims", ["owner"])


def downgrade() -> None:
    op.drop_table("claims")
    op.drop_table("replicas")
