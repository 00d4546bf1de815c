"""Tamper evidence: edit, delete, reorder and cut rows directly in the database."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, text

from monitor.core import EventDraft
from monitor.storage import Store, create_store_engine, upgrade
from monitor.storage.chain import verify_chain

T0 = datetime(2026, 5, 1, tzinfo=UTC)


def _history(store: Store, target: str, n: int, start: datetime = T0) -> None:
    state = store.ensure_target(target, now=start)
    for i in range(n):
        draft = EventDraft("config_changed", "info", "firing", f"{target}: change {i}")
        state = store.record_unchanged(state, now=start + timedelta(seconds=i), events_=[draft])


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    made = create_store_engine(db_url)
    upgrade(made)
    _history(Store(made), "prod", 6)
    yield made
    made.dispose()


def _sql(engine: Engine, statement: str) -> None:
    with engine.begin() as c:
        c.execute(text(statement))


def _ids(engine: Engine) -> list[int]:
    with engine.connect() as c:
        return list(c.execute(text("SELECT id FROM events ORDER BY chain_seq")).scalars())


def test_intact_chain_verifies(engine: Engine) -> None:
    report = verify_chain(engine)
    assert report.intact and report.rows == 6 and len(report.head) == 64
    assert "6 rows checked" in report.describe()


def test_edited_row_is_named(engine: Engine) -> None:
    third = _ids(engine)[2]
    _sql(engine, f"UPDATE events SET message = 'nothing happened' WHERE id = {third}")
    report = verify_chain(engine)
    assert not report.intact and report.rows == 2
    assert f"events id={third} " in (report.problem or "")


def test_deleted_row_breaks_the_chain_at_the_next(engine: Engine) -> None:
    ids = _ids(engine)
    _sql(engine, f"DELETE FROM events WHERE id = {ids[3]}")
    report = verify_chain(engine)
    assert not report.intact and report.rows == 3
    assert f"events id={ids[4]} " in (report.problem or "")


def test_reordered_rows_are_found(engine: Engine) -> None:
    ids = _ids(engine)
    a, b = ids[1], ids[2]
    _sql(engine, f"UPDATE events SET chain_seq = -1 WHERE id = {a}")
    _sql(engine, f"UPDATE events SET chain_seq = 2 WHERE id = {b}")
    _sql(engine, f"UPDATE events SET chain_seq = 3 WHERE id = {a}")
    report = verify_chain(engine)
    assert not report.intact and report.rows == 1
    assert f"events id={b} " in (report.problem or "")


def test_cut_tail_is_found(engine: Engine) -> None:
    _sql(engine, f"DELETE FROM events WHERE id = {_ids(engine)[-1]}")
    report = verify_chain(engine)
    assert not report.intact and "at the end were deleted" in (report.problem or "")


def test_verify_is_consistent_while_the_daemon_writes(engine: Engine) -> None:
    stop = threading.Event()

    def writer() -> None:
        store = Store(engine)
        state = store.ensure_target("busy", now=T0)
        i = 0
        while not stop.is_set():
            i += 1
            draft = EventDraft("config_changed", "info", "firing", f"busy: {i}")
            state = store.record_unchanged(state, now=T0 + timedelta(seconds=i), events_=[draft])

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        reports = [verify_chain(engine) for _ in range(8)]
    finally:
        stop.set()
        thread.join()
    assert all(r.intact for r in reports), [r.describe() for r in reports if not r.intact]


def test_racing_writers_keep_one_chain(db_url: str) -> None:
    engine = create_store_engine(db_url)
    upgrade(engine)
    errors: list[BaseException] = []

    def writer(name: str) -> None:
        try:
            _history(Store(create_store_engine(db_url)), name, 25)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(f"t{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    report = verify_chain(engine)
    assert report.intact and report.rows == 100, report.describe()
    engine.dispose()


def test_verify_command_exit_codes(tmp_path: object) -> None:
    from pathlib import Path

    from tests.helpers import run_main

    base = Path(str(tmp_path))
    db = base / "audit.db"
    engine = create_store_engine(f"sqlite:///{db}")
    upgrade(engine)
    _history(Store(engine), "prod", 3)
    config = base / "c.toml"
    config.write_text(
        f'[storage]\nurl = "sqlite:///{db}"\n[[targets]]\nname = "prod"\n'
        'access_key_id = "x"\naccess_key_secret = "y"\n'
    )
    ok = run_main("verify", "-c", str(config))
    assert ok.returncode == 0 and "3 rows checked" in ok.stdout, ok.stdout + ok.stderr
    second = _ids(engine)[1]
    _sql(engine, f"UPDATE events SET kind = 'first_seen' WHERE id = {second}")
    bad = run_main("verify", "-c", str(config))
    assert bad.returncode == 1 and f"events id={second} " in bad.stdout
    _sql(engine, "DROP TABLE chain_head")
    unreadable = run_main("verify", "-c", str(config))
    assert unreadable.returncode == 3, unreadable.stdout + unreadable.stderr
    assert "cannot verify" in unreadable.stderr and "Traceback" not in unreadable.stderr
    engine.dispose()


def test_verify_still_runs_on_a_database_whose_rows_were_deleted(tmp_path: object) -> None:
    """Deleting events leaves their outbox rows dangling; that must not stop `verify`."""
    from pathlib import Path

    from monitor.core.alerting import SinkRoute
    from tests.helpers import run_main

    base = Path(str(tmp_path))
    db = base / "cut.db"
    engine = create_store_engine(f"sqlite:///{db}")
    upgrade(engine)
    store = Store(engine, routes=[SinkRoute("hook")])
    _history(store, "prod", 3)
    last = _ids(engine)[-1]
    engine.dispose()
    import sqlite3

    with sqlite3.connect(db) as raw:  # as a tamperer would: the sqlite3 shell, no FK checks
        raw.execute(f"DELETE FROM events WHERE id = {last}")
    config = base / "c.toml"
    config.write_text(
        f'[storage]\nurl = "sqlite:///{db}"\n[[targets]]\nname = "prod"\n'
        'access_key_id = "x"\naccess_key_secret = "y"\n'
    )
    cut = run_main("verify", "-c", str(config))
    assert cut.returncode == 1, cut.stdout + cut.stderr
    assert "at the end were deleted" in cut.stdout
    engine.dispose()


def _reseal(engine: Engine, seqs: list[int]) -> None:
    """Give the event rows at ``seqs`` the chain hash of their own content, chained on the
    stored hash of the row before them: what a tamperer who knows the formula would do."""
    from sqlalchemy import select, update

    from monitor.storage.chain import event_content, link
    from monitor.storage.schema import events

    with engine.begin() as c:
        for seq in seqs:
            before = c.execute(select(events.c.chain_hash).where(events.c.chain_seq == seq - 1))
            row = c.execute(select(events).where(events.c.chain_seq == seq)).mappings().one()
            digest = link(before.scalar_one(), seq, event_content(row, string_id=True))
            c.execute(update(events).where(events.c.id == row["id"]).values(chain_hash=digest))


def test_an_edited_row_resealed_with_its_own_hash_breaks_the_chain_at_the_next(
    engine: Engine,
) -> None:
    """Each hash covers the one before it, so fixing up an edited row is not enough."""
    ids = _ids(engine)
    _sql(engine, f"UPDATE events SET message = 'nothing happened' WHERE id = {ids[2]}")
    _reseal(engine, [3])
    report = verify_chain(engine)
    assert not report.intact and report.rows == 3, report.describe()
    assert f"events id={ids[3]} " in (report.problem or "")


def test_reordered_rows_resealed_in_their_new_order_are_found(engine: Engine) -> None:
    ids = _ids(engine)
    a, b = ids[1], ids[2]
    _sql(engine, f"UPDATE events SET chain_seq = -1 WHERE id = {a}")
    _sql(engine, f"UPDATE events SET chain_seq = 2 WHERE id = {b}")
    _sql(engine, f"UPDATE events SET chain_seq = 3 WHERE id = {a}")
    _reseal(engine, [2, 3])
    report = verify_chain(engine)
    assert not report.intact and report.rows == 3, report.describe()
    assert f"events id={ids[3]} " in (report.problem or "")


def test_every_field_of_an_event_is_under_the_chain(engine: Engine) -> None:
    """Editing any stored field of an event (severity included) is reported at that row."""
    from sqlalchemy import select, update

    from monitor.storage.schema import events

    third = _ids(engine)[2]
    other = Store(engine).ensure_target("other", now=T0).target_id
    edits: dict[str, Any] = {
        "kind": "provider_disabled",
        "severity": "critical",
        "status": "resolved",
        "at": T0 - timedelta(days=1),
        "snapshot_hash": "sha256:" + "f" * 64,
        "previous_hash": "sha256:" + "e" * 64,
        "changes": '[{"path": "enabled", "old": true, "new": false}]',
        "message": "nothing happened",
        "target_id": other,
    }
    with engine.connect() as c:
        original = dict(c.execute(select(events).where(events.c.id == third)).mappings().one())
    for column, value in edits.items():
        assert original[column] != value, column
        with engine.begin() as c:
            c.execute(update(events).where(events.c.id == third).values({column: value}))
        report = verify_chain(engine)
        assert not report.intact and report.rows == 2, (column, report.describe())
        assert f"events id={third} " in (report.problem or ""), column
        with engine.begin() as c:
            c.execute(update(events).where(events.c.id == third).values({column: original[column]}))
        assert verify_chain(engine).intact, column
