"""Event string ids: events.public_id (a UUID, never reused) and the meta table.

The integer ``events.id`` stays the internal key; a restored backup hands out the integers of
lost rows again, so the event JSON's ``id`` becomes ``public_id``. Events written before this
revision get a derived id (``monitor.storage.chain.derived_event_id``) so every copy of one
database gives them the same id. Their chain content stays as it was (the integer id), so the
chain heads already logged stay valid; ``meta.string_ids_from_chain_seq`` records where rows
chaining the string id begin.

``database_id``: for a database that already has chained rows, a UUID derived from the chain
hash of its first row, so two copies of one backup upgraded separately agree (and databases
with different histories do not); for an empty one, a random UUID.

Downgrading drops the string ids: rows written since this revision then no longer verify on
the older version (their chain content holds the string id).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

from monitor.storage.chain import DATABASE_ID, STRING_IDS_FROM, derived_event_id

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# uuid5 namespace of database ids derived from a chain's first link. Never change it.
DATABASE_ID_NAMESPACE = uuid.UUID("6f1c3a52-4be4-4c8e-9d7e-2a0b5c9e1d47")


def upgrade() -> None:
    op.create_table(
        "meta",
        sa.Column("key", sa.String(64)),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_meta"),
    )
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("public_id", sa.String(36), nullable=True))
    connection = op.get_bind()
    database_id = _database_id(connection)
    # Rows chained from here on chain their string id: the position after the last one so far.
    head = connection.execute(
        sa.text(
            "SELECT max(seq) FROM ("
            " SELECT seq FROM chain_head"
            " UNION ALL SELECT chain_seq FROM snapshots"
            " UNION ALL SELECT chain_seq FROM events"
            ") AS positions"
        )
    ).scalar()
    connection.execute(
        sa.text("INSERT INTO meta (key, value) VALUES (:k, :v)"),
        [
            {"k": DATABASE_ID, "v": database_id},
            {"k": STRING_IDS_FROM, "v": str((head or 0) + 1)},
        ],
    )
    rows = connection.execute(sa.text("SELECT id, chain_hash FROM events")).all()
    if rows:
        connection.execute(
            sa.text("UPDATE events SET public_id = :p WHERE id = :i"),
            [{"p": derived_event_id(database_id, i, h), "i": i} for i, h in rows],
        )
    with op.batch_alter_table("events") as batch:
        batch.alter_column("public_id", existing_type=sa.String(36), nullable=False)
        batch.create_unique_constraint("uq_events_public_id", ["public_id"])


def _database_id(connection: sa.engine.Connection) -> str:
    first = connection.execute(
        sa.text(
            "SELECT chain_hash FROM ("
            " SELECT chain_seq, chain_hash FROM snapshots WHERE chain_seq IS NOT NULL"
            " UNION ALL"
            " SELECT chain_seq, chain_hash FROM events WHERE chain_seq IS NOT NULL"
            ") AS chained ORDER BY chain_seq LIMIT 1"
        )
    ).scalar()
    if first is None:
        return str(uuid.uuid4())
    return str(uuid.uuid5(DATABASE_ID_NAMESPACE, first))


def downgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.drop_constraint("uq_events_public_id", type_="unique")
        batch.drop_column("public_id")
    op.drop_table("meta")
