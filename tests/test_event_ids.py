"""Event ids are never reused, not even after the database is restored from a backup (SPEC §4).

The integer row ids of SQLite (and PostgreSQL sequences restored with the data) hand out the
numbers of lost rows again; a receiver that deduplicates by ``id`` would then drop real alerts.
"""

from __future__ import annotations

import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor.app import Runtime, build_runtime
from monitor.simulator import SimulatedGenAuth
from monitor.storage.queries import EventView
from tests.helpers import runtime_settings
from tests.receiver import Receiver

SECRET = "Ids-Access-Secret-789"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made = Receiver()
    yield made
    made.stop()


def _runtime(db_url: str, sim: SimulatedGenAuth, tmp_path: Path, receiver: Receiver) -> Runtime:
    sinks = [{"type": "webhook", "url": receiver.url, "max_backoff": "0.2s"}]
    # attribution off: no worker runs here to release the warnings it would hold.
    settings = runtime_settings(db_url, sim, tmp_path, sinks=sinks, attribution=False)
    return build_runtime(settings)


def _changes(runtime: Runtime, sim: SimulatedGenAuth, ports: list[int]) -> None:
    """One poll per port: each a delivery_changed event, delivered to the webhook."""
    poller = runtime.pollers["prod"]
    for port in ports:
        data = sim.data
        data["smtpConfig"]["smtp_port"] = port
        sim.set_data(data)
        assert poller.poll().events, f"port {port} raised no event"
    assert runtime.delivery.drain(timeout=10) == 0


def _close(runtime: Runtime, db: Path) -> None:
    """Close every connection and fold the WAL into the file, so the file alone is the
    database (as a backup tool would copy it)."""
    runtime.store.engine.dispose()
    with sqlite3.connect(db) as raw:
        raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw.close()


def _history(runtime: Runtime) -> dict[str, EventView]:
    rows = runtime.queries.events(limit=10_000)
    by_id = {row.id: row for row in rows}
    assert len(by_id) == len(rows), "two rows of one database share an id"
    return by_id


def _same_event(a: EventView, b: EventView) -> bool:
    return (a.row_id, a.kind, a.at, a.message, a.changes) == (
        b.row_id,
        b.kind,
        b.at,
        b.message,
        b.changes,
    )


def test_no_event_id_is_reused_after_a_restore(tmp_path: Path, receiver: Receiver) -> None:
    db = tmp_path / "monitor.db"
    url = f"sqlite:///{db}"
    with SimulatedGenAuth(access_key_secret=SECRET) as sim:
        first = _runtime(url, sim, tmp_path, receiver)
        first.pollers["prod"].poll()  # first_seen
        _changes(first, sim, [466, 467])
        _close(first, db)
        backup = tmp_path / "backup.db"
        shutil.copyfile(db, backup)
        assert not Path(f"{backup}-wal").exists() or Path(f"{backup}-wal").stat().st_size == 0

        # The first timeline goes on, then is lost.
        first = _runtime(url, sim, tmp_path, receiver)
        _changes(first, sim, [468, 469, 470])
        lost_timeline = _history(first)
        _close(first, db)

        for leftover in (Path(f"{db}-wal"), Path(f"{db}-shm")):
            leftover.unlink(missing_ok=True)
        shutil.copyfile(backup, db)  # the restore

        second = _runtime(url, sim, tmp_path, receiver)
        _changes(second, sim, [471, 472, 473])
        restored_timeline = _history(second)
        _close(second, db)

    shared = lost_timeline.keys() & restored_timeline.keys()
    lost = {i: e for i, e in lost_timeline.items() if i not in shared}
    new = {i: e for i, e in restored_timeline.items() if i not in shared}
    assert len(shared) == 3 and len(lost) == 3 and len(new) == 3, (shared, lost, new)
    # The rows both timelines hold (from before the backup) are the same events, same ids.
    assert all(_same_event(lost_timeline[i], restored_timeline[i]) for i in shared)
    # The scenario bites: the restored database handed out the lost events' row numbers again ...
    assert {e.row_id for e in lost.values()} == {e.row_id for e in new.values()}
    # ... but no id of a lost event was given to a different one.
    assert not lost.keys() & new.keys()
    everything: list[str] = [*lost_timeline, *new]
    assert len(everything) == len(set(everything)) == 9
    assert all(str(uuid.UUID(i)) == i and uuid.UUID(i).version in (4, 5) for i in everything)

    bodies: list[dict[str, Any]] = receiver.bodies()
    ids = [body["id"] for body in bodies]
    assert len(bodies) == 9, [b["kind"] for b in bodies]
    assert len(set(ids)) == 9, "a receiver deduplicating by id would drop a real alert"
    assert set(ids) == set(everything)
    ports = [
        change["new"]
        for body in bodies
        if body["kind"] == "delivery_changed"
        for change in body["changes"]
    ]
    assert ports == [466, 467, 468, 469, 470, 471, 472, 473], "each change delivered once"
