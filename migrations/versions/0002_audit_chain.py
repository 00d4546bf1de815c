"""Audit hash chain: chain_seq/chain_hash on snapshots and events, the chain head, back-fill.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import heapq
from typing import Any

import sqlalchemy as sa
from alembic import op

from monitor.storage.chain import GENESIS, event_content, link, snapshot_content

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    for table in ("snapshots", "events"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("chain_seq", ID, nullable=True))
            batch.add_column(sa.Column("chain_hash", sa.String(64), nullable=True))
            batch.create_unique_constraint(f"uq_{table}_chain_seq", ["chain_seq"])
    op.create_table(
        "chain_head",
        sa.Column("id", sa.Integer(), autoincrement=False),
        sa.Column("seq", ID, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_chain_head"),
    )
    _backfill(op.get_bind())


def _backfill(connection: sa.engine.Connection) -> None:
    """Chain the rows written before this revision, oldest first (snapshot before its events)."""
    meta = sa.MetaData()
    snapshots = sa.Table("snapshots", meta, autoload_with=connection)
    events = sa.Table("events", meta, autoload_with=connection)

    def rows(table: sa.Table, time_column: str, rank: int) -> Any:
        query = sa.select(table).order_by(table.c[time_column], table.c.id)
        for row in connection.execute(query).mappings():
            yield (row[time_column], rank, row["id"]), table, row

    previous, seq = GENESIS, 0
    merged = heapq.merge(
        rows(snapshots, "first_seen_at", 0), rows(events, "at", 1), key=lambda item: item[0]
    )
    for _, table, row in merged:
        seq += 1
        content = (
            snapshot_content(row)
            if table.name == "snapshots"
            else event_content(row, string_id=False)
        )
        previous = link(previous, seq, content)
        connection.execute(
            sa.update(table)
            .where(table.c.id == row["id"])
            .values(chain_seq=seq, chain_hash=previous)
        )
    connection.execute(
        sa.text("INSERT INTO chain_head (id, seq, hash) VALUES (1, :s, :h)"),
        {"s": seq, "h": previous},
    )


def downgrade() -> None:
    op.drop_table("chain_head")
    for table in ("snapshots", "events"):
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(f"uq_{table}_chain_seq", type_="unique")
            batch.drop_column("chain_hash")
            batch.drop_column("chain_seq")
