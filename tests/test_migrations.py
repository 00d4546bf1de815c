"""Every migration on both databases: upgrade, back-fill, downgrade, and schema == models."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from monitor.core import snapshot_hash
from monitor.storage import create_store_engine, upgrade
from monitor.storage.chain import verify_chain
from monitor.storage.engine import alembic_config
from monitor.storage.schema import metadata


def test_upgrade_is_idempotent_and_matches_the_models(db_url: str) -> None:
    engine = create_store_engine(db_url)
    upgrade(engine)
    upgrade(engine)
    with engine.connect() as connection:
        diffs = compare_metadata(MigrationContext.configure(connection), metadata)
        version = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    assert diffs == []
    assert version == "0004"
    engine.dispose()


def test_chain_backfill_of_rows_written_before_it(db_url: str) -> None:
    engine = create_store_engine(db_url)
    upgrade(engine, "0001")
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    with engine.begin() as c:
        c.execute(
            text("INSERT INTO targets (id, name, created_at) VALUES (1, 'prod', :t)"), {"t": t0}
        )
        for i in range(3):
            at = t0 + timedelta(minutes=i)
            c.execute(
                text(
                    "INSERT INTO snapshots (id, target_id, hash, document, enabled, provider_type,"
                    " drift, first_seen_at, last_seen_at, seen_count) VALUES (:i, 1, :h, :d,"
                    " :e, 'custom', :dr, :t, :t, 1)"
                ),
                {
                    "i": i + 1,
                    "h": snapshot_hash({"enabled": True, "n": i}),
                    "d": f'{{"enabled": true, "n": {i}}}',
                    "e": True,
                    "dr": False,
                    "t": at,
                },
            )
            c.execute(
                text(
                    "INSERT INTO events (id, target_id, kind, severity, status, at, snapshot_hash,"
                    " previous_hash, changes, message) VALUES (:i, 1, 'config_changed', 'info',"
                    " 'firing', :t, :h, NULL, '[]', 'changed')"
                ),
                {"i": i + 1, "h": f"sha256:{i:064d}", "t": at},
            )
        # A poll state pointing at a snapshot: SQLite's table rebuild must not trip over it.
        c.execute(
            text(
                "INSERT INTO poll_state (target_id, current_snapshot_id, consecutive_failures)"
                " VALUES (1, 3, 0)"
            )
        )
    upgrade(engine)
    report = verify_chain(engine)
    assert report.intact and report.rows == 6, report.describe()
    with engine.connect() as c:
        order = c.execute(text("SELECT chain_seq FROM snapshots ORDER BY id")).scalars().all()
    assert order == [1, 3, 5], "each snapshot comes before the events of its moment"
    engine.dispose()


def test_downgrade_to_base_and_up_again(db_url: str) -> None:
    engine = create_store_engine(db_url)
    upgrade(engine)
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade(engine)
    assert {"targets", "snapshots", "events", "chain_head"} <= set(
        inspect(engine).get_table_names()
    )
    engine.dispose()
