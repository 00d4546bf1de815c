"""Delivery lanes: outbox.lane and the delivery_lanes leases, for replicas (SPEC §10).

An ``alertmanager`` sink may list several URLs; each is a lane of its own with its own outbox
rows (``outbox.lane``, the URL's index; 0 for every row written before, the one URL a sink
had). ``delivery_lanes`` holds one row per lane with the replica that may send its rows and
the end of its lease on the database's clock, so that replicas sharing one database deliver
each row once and in order.

Revision ID: 0006
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("lane", sa.Integer(), nullable=False, server_default="0"))
        batch.drop_index("ix_outbox_status_sink_id")
        batch.create_index("ix_outbox_status_sink_lane_id", ["status", "sink", "lane", "id"])
    op.create_table(
        "delivery_lanes",
        sa.Column("sink", sa.String(128)),
        sa.Column("lane", sa.Integer(), autoincrement=False),
        sa.Column("holder", sa.String(128)),
        sa.Column("lease_until", sa.DateTime(timezone=True)),
        sa.PrimaryKeyConstraint("sink", "lane", name="pk_delivery_lanes"),
    )


def downgrade() -> None:
    op.drop_table("delivery_lanes")
    # Rows of a second or later URL have no place in the older schema: they are dropped (the
    # older version sends each alert to the sink's one URL, lane 0).
    op.execute("DELETE FROM outbox WHERE lane <> 0")
    with op.batch_alter_table("outbox") as batch:
        batch.drop_index("ix_outbox_status_sink_lane_id")
        batch.create_index("ix_outbox_status_sink_id", ["status", "sink", "id"])
        batch.drop_column("lane")
