"""Every migration on both databases: upgrade, back-fill, downgrade, and schema == models."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect, make_url, select, text

from monitor.core import EventDraft, snapshot_hash
from monitor.errors import StorageError
from monitor.simulator import SimulatedGenAuth
from monitor.storage import Store, create_store_engine, upgrade
from monitor.storage.chain import (
    DATABASE_ID,
    STRING_IDS_FROM,
    derived_event_id,
    event_content,
    link,
    verify_chain,
)
from monitor.storage.engine import alembic_config, shipped_heads
from monitor.storage.migrate_apart import upgrade_apart
from monitor.storage.outbox import Outbox
from monitor.storage.schema import events, metadata
from tests.helpers import free_port, start_daemon, wait_for, write_config


def test_upgrade_is_idempotent_and_matches_the_models(db_url: str) -> None:
    engine = create_store_engine(db_url)
    upgrade(engine)
    upgrade(engine)
    with engine.connect() as connection:
        diffs = compare_metadata(MigrationContext.configure(connection), metadata)
        version = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    assert diffs == []
    assert {version} == shipped_heads()
    engine.dispose()


def test_upgrade_of_a_current_database_does_not_load_alembic(db_url: str) -> None:
    # Every daemon start migrates: at the current schema that must cost neither Alembic's
    # import (about 10 MiB of the daemon's memory) nor a write.
    engine = create_store_engine(db_url)
    upgrade(engine)
    engine.dispose()
    script = (
        "import sys\n"
        "from monitor.storage import create_store_engine, upgrade\n"
        f"engine = create_store_engine({db_url!r})\n"
        "upgrade(engine)\n"
        "engine.dispose()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('alembic', 'mako')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"
    downgrade = create_store_engine(db_url)
    with downgrade.begin() as connection:  # an older schema still goes through Alembic
        command.downgrade(alembic_config(connection), "-1")
    upgrade(downgrade)
    with downgrade.connect() as connection:
        version = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    assert {version} == shipped_heads()
    downgrade.dispose()


def test_run_migrates_in_a_child_and_keeps_alembic_out_of_the_daemon(db_url: str) -> None:
    # `run` on a database that needs migrating (its first start, or the first after an
    # upgrade): Alembic and Mako (about 13 MiB) would stay in the daemon for its whole life.
    script = (
        "import sys\n"
        "from monitor.storage.migrate_apart import upgrade_apart\n"
        "upgrade_apart(sys.stdin.read())\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('alembic', 'mako')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        input=db_url,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert done.stdout.strip() == "[]"
    engine = create_store_engine(db_url)
    with engine.connect() as connection:
        version = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
        diffs = compare_metadata(MigrationContext.configure(connection), metadata)
    engine.dispose()
    assert {version} == shipped_heads()
    assert diffs == []


def test_a_migration_failing_in_its_child_is_the_parents_one_line_error(db_url: str) -> None:
    engine = create_store_engine(db_url)
    upgrade(engine)
    with engine.begin() as connection:  # a database of a newer release
        connection.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    engine.dispose()
    with_password = make_url(db_url)
    if with_password.drivername.startswith("postgresql"):
        # Trust authentication ignores it; it must still never be shown.
        with_password = with_password.set(password="child-secret-pw")
    url = with_password.render_as_string(hide_password=False)
    with pytest.raises(StorageError) as caught:
        upgrade_apart(url)
    message = str(caught.value)
    assert message.startswith("migration failed: ")
    assert "9999_future" in message
    assert "child-secret-pw" not in message and "\n" not in message


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


# -- 0004: string event ids -----------------------------------------------------------------


@contextmanager
def _databases(db_url: str) -> Iterator[Callable[..., str]]:
    """``database(name, copy_of=None)``: the URL of another database of the kind of ``db_url``,
    empty or a byte-for-byte copy of one nobody is connected to (a restored backup); the
    PostgreSQL ones are dropped afterwards."""
    if db_url.startswith("sqlite"):
        directory = Path(make_url(db_url).database or "").parent

        def sqlite_database(name: str, copy_of: str | None = None) -> str:
            path = directory / f"{name}.db"
            if copy_of is not None:
                shutil.copyfile(make_url(copy_of).database or "", path)
            return f"sqlite:///{path}"

        yield sqlite_database
        return
    admin = create_engine(make_url(db_url), isolation_level="AUTOCOMMIT")
    made: list[str] = []

    def postgres_database(name: str, copy_of: str | None = None) -> str:
        real = f"{make_url(db_url).database}_{name}"
        template = f' TEMPLATE "{make_url(copy_of).database}"' if copy_of else ""
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{real}"{template}'))
        made.append(real)
        return make_url(db_url).set(database=real).render_as_string(hide_password=False)

    try:
        yield postgres_database
    finally:
        with admin.connect() as c:
            for name in made:
                c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _at_0003(url: str, t0: datetime) -> None:
    """A database at revision 0003 with 3 snapshots, 3 events, an outbox row, its chain."""
    engine = create_store_engine(url)
    upgrade(engine, "0001")
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
                    " true, 'custom', false, :t, :t, 1)"
                ),
                {"i": i + 1, "h": snapshot_hash({"n": i}), "d": f'{{"n": {i}}}', "t": at},
            )
            c.execute(
                text(
                    "INSERT INTO events (id, target_id, kind, severity, status, at, snapshot_hash,"
                    " previous_hash, changes, message) VALUES (:i, 1, 'config_changed', 'info',"
                    " 'firing', :t, :h, NULL, '[]', :m)"
                ),
                {"i": i + 1, "h": snapshot_hash({"n": i}), "t": at, "m": f"change {i}"},
            )
        c.execute(
            text(
                "INSERT INTO poll_state (target_id, current_snapshot_id, consecutive_failures)"
                " VALUES (1, 3, 0)"
            )
        )
    if engine.dialect.name == "postgresql":  # the rows above were given their ids
        with engine.begin() as c:
            for table in ("targets", "snapshots", "events"):
                c.execute(
                    text(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                        f" (SELECT max(id) FROM {table}))"
                    )
                )
    upgrade(engine, "0003")
    with engine.begin() as c:  # an alert still to deliver points at an event
        c.execute(
            text(
                "INSERT INTO outbox (event_id, sink, status, attempts, created_at,"
                " next_attempt_at) VALUES (3, 'hook', 'pending', 0, :t, :t)"
            ),
            {"t": t0},
        )
    engine.dispose()


def _old_event(url: str, row_id: int, message: str) -> None:
    """An event appended as the code of revision 0003 did: chained with its integer id."""
    engine = create_store_engine(url)
    at = datetime(2026, 3, 2, tzinfo=UTC)
    with engine.begin() as c:
        c.execute(
            text(
                "INSERT INTO events (id, target_id, kind, severity, status, at, snapshot_hash,"
                " previous_hash, changes, message) VALUES (:i, 1, 'config_changed', 'info',"
                " 'firing', :t, NULL, NULL, '[]', :m)"
            ),
            {"i": row_id, "t": at, "m": message},
        )
        seq, previous = c.execute(text("SELECT seq, hash FROM chain_head")).one()
        at_0003 = [column for column in events.c if column.name != "public_id"]
        row = c.execute(select(*at_0003).where(events.c.id == row_id)).mappings().one()
        digest = link(previous, seq + 1, event_content(row, string_id=False))
        c.execute(
            text("UPDATE events SET chain_seq = :s, chain_hash = :h WHERE id = :i"),
            {"s": seq + 1, "h": digest, "i": row_id},
        )
        c.execute(text("UPDATE chain_head SET seq = :s, hash = :h"), {"s": seq + 1, "h": digest})
    engine.dispose()


def _chain(engine: Engine) -> dict[int, str]:
    with engine.connect() as c:
        rows = c.execute(
            text(
                "SELECT chain_seq, chain_hash FROM snapshots UNION ALL"
                " SELECT chain_seq, chain_hash FROM events"
            )
        ).all()
    return {seq: digest for seq, digest in rows}


def _head(engine: Engine) -> tuple[int, str]:
    with engine.connect() as c:
        seq, digest = c.execute(text("SELECT seq, hash FROM chain_head")).one()
    return int(seq), str(digest)


def _meta(engine: Engine) -> dict[str, str]:
    with engine.connect() as c:
        return {k: v for k, v in c.execute(text("SELECT key, value FROM meta"))}


def _event_ids(engine: Engine) -> dict[int, str]:
    with engine.connect() as c:
        return {i: p for i, p in c.execute(text("SELECT id, public_id FROM events"))}


def _event_row(engine: Engine, row_id: int) -> dict[str, Any]:
    with engine.connect() as c:
        return dict(c.execute(select(events).where(events.c.id == row_id)).mappings().one())


def _set_public_id(engine: Engine, row_id: int, public_id: str) -> None:
    with engine.begin() as c:
        c.execute(
            text("UPDATE events SET public_id = :p WHERE id = :i"), {"p": public_id, "i": row_id}
        )


def test_0004_gives_old_events_derived_ids_and_keeps_their_chain(db_url: str) -> None:
    t0 = datetime(2026, 3, 1, 8, 30, 15, 123456, tzinfo=UTC)
    _at_0003(db_url, t0)
    engine = create_store_engine(db_url)
    before, head_before = _chain(engine), _head(engine)
    assert len(before) == 6 and head_before[0] == 6
    upgrade(engine)

    meta = _meta(engine)
    database_id = meta[DATABASE_ID]
    assert str(uuid.UUID(database_id)) == database_id
    assert meta[STRING_IDS_FROM] == "7", "rows after the old head chain their string id"
    old = _event_ids(engine)
    assert sorted(old) == [1, 2, 3]
    for row_id, public_id in old.items():
        assert public_id == derived_event_id(
            database_id, row_id, _event_row(engine, row_id)["chain_hash"]
        )
    assert len(set(old.values())) == 3
    assert _chain(engine) == before and _head(engine) == head_before, "logged heads stay valid"
    report = verify_chain(engine)
    assert report.intact and report.rows == 6 and report.head == head_before[1], report.describe()
    pending = Outbox(engine).pending()
    assert [(p.sink, p.event.id, p.event.row_id) for p in pending] == [("hook", old[3], 3)]

    # A new event chains its string id.
    store = Store(engine)
    state = store.ensure_target("prod", now=t0 + timedelta(hours=1))
    draft = EventDraft("config_changed", "info", "firing", "prod: new")
    store.record_unchanged(state, now=t0 + timedelta(hours=1), events_=[draft])
    [new_id] = set(_event_ids(engine)) - set(old)
    row = _event_row(engine, new_id)
    assert str(uuid.UUID(row["public_id"])) == row["public_id"] and row["chain_seq"] == 7
    assert uuid.UUID(row["public_id"]).version == 4
    assert link(head_before[1], 7, event_content(row, string_id=True)) == row["chain_hash"]
    assert link(head_before[1], 7, event_content(row, string_id=False)) != row["chain_hash"]
    assert verify_chain(engine).intact and verify_chain(engine).rows == 7

    # Editing the string id of a new row breaks the chain at that row ...
    _set_public_id(engine, new_id, str(uuid.uuid4()))
    report = verify_chain(engine)
    assert not report.intact and report.rows == 6, report.describe()
    assert f"events id={new_id} (chain_seq 7): content does not match" in (report.problem or "")
    _set_public_id(engine, new_id, row["public_id"])
    assert verify_chain(engine).intact

    # ... and editing that of an old row is found too: it must be the derived one.
    _set_public_id(engine, 2, str(uuid.uuid4()))
    report = verify_chain(engine)
    assert not report.intact and report.rows == 3, report.describe()
    assert "events id=2 (chain_seq 4): its event id is not the one derived" in (
        report.problem or ""
    )
    _set_public_id(engine, 2, old[2])
    assert verify_chain(engine).intact

    # The record of where string ids begin is itself needed: moving it breaks the chain.
    with engine.begin() as c:
        c.execute(text("UPDATE meta SET value = '8' WHERE key = :k"), {"k": STRING_IDS_FROM})
    report = verify_chain(engine)
    assert not report.intact and "chain_seq 7" in (report.problem or ""), report.describe()
    with engine.begin() as c:
        c.execute(text("DELETE FROM meta WHERE key = :k"), {"k": STRING_IDS_FROM})
    report = verify_chain(engine)
    assert not report.intact and STRING_IDS_FROM in (report.problem or "")
    engine.dispose()


def test_0004_ids_agree_between_copies_and_differ_between_databases(db_url: str) -> None:
    t0 = datetime(2026, 3, 1, 8, 30, 15, 123456, tzinfo=UTC)
    with _databases(db_url) as database:
        _at_0003(db_url, t0)
        copy, other = database("copy", copy_of=db_url), database("other")
        _at_0003(other, t0 + timedelta(microseconds=1))  # another database, nearly the same
        # Both copies ran on at 0003 (a restore before this version): each wrote an event 4.
        _old_event(db_url, 4, "written by the original")
        _old_event(copy, 4, "written by the restored copy")

        ids, database_ids = [], []
        for url in (db_url, copy, other):
            engine = create_store_engine(url)
            upgrade(engine)
            ids.append(_event_ids(engine))
            database_ids.append(_meta(engine)[DATABASE_ID])
            assert verify_chain(engine).intact
            engine.dispose()
        assert database_ids[0] == database_ids[1]
        shared = {i: p for i, p in ids[0].items() if i <= 3}
        assert len(shared) == 3 and shared == {i: p for i, p in ids[1].items() if i <= 3}, (
            "copies agree on the rows they share"
        )
        assert sorted(ids[0]) == sorted(ids[1]) == [1, 2, 3, 4]
        assert ids[0][4] != ids[1][4], "the two events numbered 4 are different events"
        assert database_ids[2] != database_ids[0]
        assert not set(ids[2].values()) & set(ids[0].values()), "different databases differ"

        # Going down to 0003 and up again gives the old rows the same ids.
        engine = create_store_engine(copy)
        _downgrade(engine, "0003")
        assert "meta" not in inspect(engine).get_table_names()
        assert "public_id" not in {c["name"] for c in inspect(engine).get_columns("events")}
        upgrade(engine)
        assert _event_ids(engine) == ids[1] and verify_chain(engine).intact
        engine.dispose()


def _downgrade(engine: Engine, revision: str) -> None:
    """As ``upgrade`` does it: on SQLite with foreign keys off while tables are rebuilt."""
    with engine.connect() as connection:
        raw = connection.connection.driver_connection
        if engine.dialect.name == "sqlite":
            raw.execute("PRAGMA foreign_keys = OFF")  # type: ignore[union-attr]
        with connection.begin():
            command.downgrade(alembic_config(connection), revision)
        if engine.dialect.name == "sqlite":
            raw.execute("PRAGMA foreign_keys = ON")  # type: ignore[union-attr]


def test_a_new_database_gets_a_random_id_and_chains_string_ids_from_the_start(
    db_url: str,
) -> None:
    with _databases(db_url) as database:
        second = database("second")
        found = []
        for url in (db_url, second):
            engine = create_store_engine(url)
            upgrade(engine)
            found.append(_meta(engine))
            engine.dispose()
    assert found[0][STRING_IDS_FROM] == found[1][STRING_IDS_FROM] == "1"
    assert uuid.UUID(found[0][DATABASE_ID]).version == 4
    assert found[0][DATABASE_ID] != found[1][DATABASE_ID]


_ALEMBIC_TRAP = """\
import os, sys

class _Trap:
    # Notes which process imports Alembic, and lets the import go on.
    def find_spec(self, name, path=None, target=None):
        if name == "alembic":
            with open(os.environ["GM_TRAP_FILE"], "a") as out:
                out.write(f"{os.getpid()}\\n")
        return None

sys.meta_path.insert(0, _Trap())
"""


def test_run_migrates_through_its_child_never_in_the_daemon(
    db_url: str, simulator: SimulatedGenAuth, tmp_path: Path
) -> None:
    trap = tmp_path / "trap"
    trap.mkdir()
    (trap / "sitecustomize.py").write_text(_ALEMBIC_TRAP)
    imported_by = tmp_path / "alembic-imported-by"
    port = free_port()
    config = write_config(tmp_path, simulator, storage_url=db_url, port=port)
    env = {
        "GM_TEST_SECRET": simulator.access_key_secret,
        "GM_TEST_API_TOKEN": "t",
        "PYTHONPATH": str(trap),
        "GM_TRAP_FILE": str(imported_by),
    }
    process = start_daemon(config, tmp_path / "daemon.log", env)
    try:
        wait_for(
            lambda: requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200,
            timeout=60,
            what="/readyz 200",
        )
    finally:
        process.terminate()
        process.wait(timeout=30)
    pids = imported_by.read_text().split() if imported_by.exists() else []
    assert pids, "the new database was migrated, by a child that imported Alembic"
    assert str(process.pid) not in pids, "Alembic never enters the daemon"
