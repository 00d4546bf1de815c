"""Initial schema: targets, snapshots, poll state, poll errors, events.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _time() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "targets",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_targets"),
        sa.UniqueConstraint("name", name="uq_targets_name"),
    )
    op.create_table(
        "snapshots",
        sa.Column("id", ID, autoincrement=True),
        sa.Column("target_id", ID, nullable=False),
        sa.Column("hash", sa.String(71), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("provider_type", sa.String(64)),
        sa.Column("drift", sa.Boolean(), nullable=False),
        sa.Column("first_seen_at", _time(), nullable=False),
        sa.Column("last_seen_at", _time(), nullable=False),
        sa.Column("seen_count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_snapshots"),
        sa.ForeignKeyConstraint(
            ["target_id"], ["targets.id"], name="fk_snapshots_target_id_targets"
        ),
    )
    op.create_index(
        "ix_snapshots_target_id_first_seen_at", "snapshots", ["target_id", "first_seen_at"]
    )
    op.create_index("ix_snapshots_hash", "snapshots", ["hash"])
    op.create_table(
        "poll_state",
        sa.Column("target_id", ID),
        sa.Column("current_snapshot_id", ID),
        sa.Column("up", sa.Boolean()),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("last_attempt_at", _time()),
        sa.Column("last_success_at", _time()),
        sa.Column("last_change_at", _time()),
        sa.Column("last_error_reason", sa.String(32)),
        sa.Column("last_error_status", sa.Integer()),
        sa.Column("last_error_api_code", sa.Integer()),
        sa.Column("last_error_message", sa.Text()),
        sa.Column("last_error_request_id", sa.String(128)),
        sa.Column("last_error_at", _time()),
        sa.PrimaryKeyConstraint("target_id", name="pk_poll_state"),
        sa.ForeignKeyConstraint(
            ["target_id"], ["targets.id"], name="fk_poll_state_target_id_targets"
        ),
        sa.ForeignKeyConstraint(
            ["current_snapshot_id"],
            ["snapshots.id"],
            name="fk_poll_state_current_snapshot_id_snapshots",
        ),
    )
    op.create_table(
        "poll_errors",
        sa.Column("id", ID, autoincrement=True),
        sa.Column("target_id", ID, nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("http_status", sa.Integer()),
        sa.Column("api_code", sa.Integer()),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("request_id", sa.String(128)),
        sa.Column("first_at", _time(), nullable=False),
        sa.Column("last_at", _time(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_poll_errors"),
        sa.ForeignKeyConstraint(
            ["target_id"], ["targets.id"], name="fk_poll_errors_target_id_targets"
        ),
    )
    op.create_index("ix_poll_errors_target_id_last_at", "poll_errors", ["target_id", "last_at"])
    op.create_table(
        "events",
        sa.Column("id", ID, autoincrement=True),
        sa.Column("target_id", ID, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("at", _time(), nullable=False),
        sa.Column("snapshot_hash", sa.String(71)),
        sa.Column("previous_hash", sa.String(71)),
        sa.Column("changes", sa.Text(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
        sa.ForeignKeyConstraint(["target_id"], ["targets.id"], name="fk_events_target_id_targets"),
    )
    op.create_index("ix_events_target_id_at", "events", ["target_id", "at"])
    op.create_index("ix_events_at", "events", ["at"])


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("poll_errors")
    op.drop_table("poll_state")
    op.drop_table("snapshots")
    op.drop_table("targets")
