"""Change attribution (SPEC §11): attribution rows in the audit chain, pending lookups, and
follow-up deliveries in the outbox.

``attributions``: one row per attributed event once its lookup settled (``result``, ``actors``
as JSON), chained like snapshots and events and never updated. ``attribution_lookups``: one row
per event still being attributed (outside the chain: it changes at every attempt and is deleted
when the attribution row is written), so a restart or another replica finishes it.
``outbox.follow_up``: a delivery that re-sends an event once its attribution settled.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "attributions",
        sa.Column("id", ID, autoincrement=True),
        sa.Column("event_id", ID, nullable=False),
        sa.Column("result", sa.String(16), nullable=False),
        sa.Column("actors", sa.Text(), nullable=False),
        sa.Column("settled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("chain_seq", ID),
        sa.Column("chain_hash", sa.String(64)),
        sa.PrimaryKeyConstraint("id", name="pk_attributions"),
        sa.ForeignKeyConstraint(
            ["event_id"], ["events.id"], name="fk_attributions_event_id_events"
        ),
        sa.UniqueConstraint("event_id", name="uq_attributions_event_id"),
        sa.UniqueConstraint("chain_seq", name="uq_attributions_chain_seq"),
    )
    op.create_table(
        "attribution_lookups",
        sa.Column("id", ID, autoincrement=True),
        sa.Column("event_id", ID, nullable=False),
        sa.Column("target_id", ID, nullable=False),
        sa.Column("since", sa.DateTime(timezone=True)),
        sa.Column("until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("hold_outbox", sa.Boolean(), nullable=False),
        sa.Column("last_error", sa.Text()),
        sa.PrimaryKeyConstraint("id", name="pk_attribution_lookups"),
        sa.ForeignKeyConstraint(
            ["event_id"], ["events.id"], name="fk_attribution_lookups_event_id_events"
        ),
        sa.ForeignKeyConstraint(
            ["target_id"], ["targets.id"], name="fk_attribution_lookups_target_id_targets"
        ),
        sa.UniqueConstraint("event_id", name="uq_attribution_lookups_event_id"),
    )
    op.create_index(
        "ix_attribution_lookups_next_attempt_at", "attribution_lookups", ["next_attempt_at"]
    )
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(
            sa.Column("follow_up", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("follow_up")
    op.drop_table("attribution_lookups")
    op.drop_table("attributions")
