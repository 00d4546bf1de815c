"""The recorder batches unchanged sightings: every target seen unchanged within a tick is
written in one transaction, on SQLite and on PostgreSQL alike; changes and failures do not wait
for the tick; a stop writes what waits; a batch with a stale target falls back to writing one by
one, losing nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, select

from monitor.app import Runtime, build_runtime
from monitor.recorder import Recorder
from monitor.simulator import SimulatedGenAuth
from monitor.storage.schema import events, poll_state, snapshots, targets
from tests.conftest import FakeClock
from tests.helpers import runtime_settings, wait_for

NAMES = ("a", "b", "c", "d", "e")
pytestmark = pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)


def _settings(db_url: str, sim: SimulatedGenAuth, base_dir: Path) -> Any:
    return runtime_settings(db_url, sim, base_dir, names=NAMES)


@contextmanager
def _recording(
    db_url: str, sim: SimulatedGenAuth, tmp_path: Path, clock: FakeClock, tick: float
) -> Iterator[tuple[Runtime, Recorder]]:
    recorder = Recorder(tick=tick)
    runtime = build_runtime(_settings(db_url, sim, tmp_path), clock=clock, recorder=recorder)
    recorder.start(runtime.store)
    try:
        yield runtime, recorder
    finally:
        recorder.stop()
        runtime.store.engine.dispose()


@contextmanager
def _commits(engine: Engine) -> Iterator[list[int]]:
    seen: list[int] = []
    lock = threading.Lock()

    def count(_connection: Any) -> None:
        with lock:
            seen.append(1)

    event.listen(engine, "commit", count)
    try:
        yield seen
    finally:
        event.remove(engine, "commit", count)


def _poll_all(runtime: Runtime, clock: FakeClock) -> datetime:
    now = clock.advance(1)
    for name in NAMES:
        assert runtime.pollers[name].poll().ok
    return now


def _written(runtime: Runtime) -> bool:
    return all(poller.pending == 0 for poller in runtime.pollers.values())


def _seen(engine: Engine) -> dict[str, tuple[int, datetime]]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(targets.c.name, snapshots.c.seen_count, snapshots.c.last_seen_at)
            .join(poll_state, poll_state.c.target_id == targets.c.id)
            .join(snapshots, snapshots.c.id == poll_state.c.current_snapshot_id)
        ).all()
    return {name: (count, last) for name, count, last in rows}


def test_unchanged_sightings_of_every_target_share_one_transaction(
    db_url: str, simulator: SimulatedGenAuth, tmp_path: Path, clock: FakeClock
) -> None:
    # A tick longer than the test: the sightings wait for it, and the stop writes them.
    with _recording(db_url, simulator, tmp_path, clock, tick=60) as (runtime, recorder):
        _poll_all(runtime, clock)  # first snapshots: each written at once, one by one
        wait_for(lambda: _written(runtime), timeout=10, what="first snapshots written")
        engine = runtime.store.engine
        with _commits(engine) as commits:
            _poll_all(runtime, clock)
            last = _poll_all(runtime, clock)
            assert _seen(engine) == {name: (1, _seen(engine)[name][1]) for name in NAMES}
            recorder.stop()
        # Ten unchanged sightings of five targets: one transaction.
        assert len(commits) == 1
        assert _seen(engine) == {name: (3, last) for name in NAMES}


def test_unchanged_sightings_are_written_within_a_tick(
    db_url: str, simulator: SimulatedGenAuth, tmp_path: Path, clock: FakeClock
) -> None:
    with _recording(db_url, simulator, tmp_path, clock, tick=0.2) as (runtime, _recorder):
        _poll_all(runtime, clock)
        wait_for(lambda: _written(runtime), timeout=10, what="first snapshots written")
        last = _poll_all(runtime, clock)
        engine = runtime.store.engine
        wait_for(
            lambda: _seen(engine) == {name: (2, last) for name in NAMES},
            timeout=5,
            what="sightings written at the tick, without a stop",
        )


def test_a_change_does_not_wait_for_the_tick_and_a_stop_writes_what_waits(
    db_url: str, simulator: SimulatedGenAuth, tmp_path: Path, clock: FakeClock
) -> None:
    with _recording(db_url, simulator, tmp_path, clock, tick=60) as (runtime, recorder):
        _poll_all(runtime, clock)
        wait_for(lambda: _written(runtime), timeout=10, what="first snapshots written")
        last = _poll_all(runtime, clock)  # unchanged: they wait for the (long) tick
        data = simulator.data
        data["enabled"] = False
        simulator.set_data(data)
        clock.advance(1)
        assert runtime.pollers["a"].poll().ok  # a change: written now, whatever the tick
        engine = runtime.store.engine

        def disabled_recorded() -> bool:
            with engine.connect() as connection:
                kinds = connection.execute(select(events.c.kind)).scalars().all()
            return "provider_disabled" in kinds

        wait_for(disabled_recorded, timeout=5, what="the change recorded before the tick")
        seen = _seen(engine)
        assert all(seen[name][0] == 1 for name in NAMES if name != "a")  # still waiting
        recorder.stop()
        assert {name: seen for name, seen in _seen(engine).items() if name != "a"} == {
            name: (2, last) for name in NAMES if name != "a"
        }


def test_a_batch_with_a_stale_target_is_written_one_by_one(
    db_url: str, simulator: SimulatedGenAuth, tmp_path: Path, clock: FakeClock
) -> None:
    with _recording(db_url, simulator, tmp_path, clock, tick=60) as (runtime, recorder):
        _poll_all(runtime, clock)
        wait_for(lambda: _written(runtime), timeout=10, what="first snapshots written")
        last = _poll_all(runtime, clock)  # sightings wait for the tick
        # Meanwhile another writer (a `check` beside the daemon) records a change of "c".
        data = simulator.data
        data["smtpConfig"]["smtp_host"] = "smtp.elsewhere.example"
        simulator.set_data(data)
        other = build_runtime(_settings(db_url, simulator, tmp_path), clock=clock)
        try:
            assert other.pollers["c"].poll().ok
        finally:
            other.store.engine.dispose()
        recorder.stop()
        seen = _seen(runtime.store.engine)
        assert {name: seen[name] for name in NAMES if name != "c"} == {
            name: (2, last) for name in NAMES if name != "c"
        }
        # The stale sighting was judged again against what the other writer recorded: the
        # daemon's poll saw the old host, so the database now says so again.
        with runtime.store.engine.connect() as connection:
            kinds = (
                connection.execute(
                    select(events.c.kind)
                    .join(targets, targets.c.id == events.c.target_id)
                    .where(targets.c.name == "c")
                    .order_by(events.c.id)
                )
                .scalars()
                .all()
            )
        assert kinds == ["first_seen", "delivery_changed", "delivery_changed"]
        assert runtime.pollers["c"].pending == 0


def test_a_long_run_of_changes_yields_to_the_tick(
    db_url: str, simulator: SimulatedGenAuth, tmp_path: Path, clock: FakeClock
) -> None:
    """Changes queued faster than they are written (a fleet's first snapshots) must not starve
    the sightings waiting for the tick past their bound: the run of changes stops at the tick,
    the sightings are written, then the rest of the run."""
    with _recording(db_url, simulator, tmp_path, clock, tick=0.2) as (runtime, recorder):
        _poll_all(runtime, clock)
        wait_for(lambda: _written(runtime), timeout=10, what="first snapshots written")
        order: list[str] = []
        gate = threading.Event()

        def slow_changes(
            _conn: Any, _cursor: Any, statement: str, _params: Any, _context: Any, many: bool
        ) -> None:
            if statement.startswith("INSERT INTO snapshots"):
                order.append("change")
                gate.wait(10)  # the first change holds the recorder while the rest queue
                time.sleep(0.3)  # each change outlasts the tick
            elif many and statement.startswith("UPDATE snapshots"):
                order.append("sightings")

        engine = runtime.store.engine
        event.listen(engine, "before_cursor_execute", slow_changes)
        old = simulator.data
        new = {**old, "smtpConfig": {**old["smtpConfig"], "smtp_host": "smtp.elsewhere.example"}}

        def poll(names: str, data: dict[str, Any]) -> None:
            simulator.set_data(data)
            clock.advance(1)
            for name in names:
                assert runtime.pollers[name].poll().ok

        try:
            poll("c", new)  # a change: the recorder writes it and waits at the gate
            wait_for(lambda: order == ["change"], timeout=5, what="the first change in flight")
            poll("ab", old)  # two lone unchanged sightings, for the tick
            poll("de", new)  # two more changes queued behind them
            gate.set()
            wait_for(lambda: _written(runtime), timeout=10, what="everything written")
        finally:
            event.remove(engine, "before_cursor_execute", slow_changes)
        recorder.stop()
        assert order.count("change") == 3
        assert order.index("sightings") < len(order) - 1, order  # between d and e, not last
        seen = _seen(engine)
        assert {name: seen[name][0] for name in NAMES} == {"a": 2, "b": 2, "c": 1, "d": 1, "e": 1}


def test_unchanged_sightings_do_not_wake_the_recorder(
    db_url: str, simulator: SimulatedGenAuth, tmp_path: Path, clock: FakeClock
) -> None:
    """A sighting waits for the tick anyway: waking the recorder thread for each one cost more
    CPU than writing it. Each wake reads the recorder's clock, so the reads count the wakes."""
    reads: list[float] = []

    def monotonic() -> float:
        reads.append(now := time.monotonic())
        return now

    recorder = Recorder(tick=5.0, monotonic=monotonic)  # a tick longer than the test
    runtime = build_runtime(_settings(db_url, simulator, tmp_path), clock=clock, recorder=recorder)
    recorder.start(runtime.store)
    try:
        _poll_all(runtime, clock)  # first snapshots: changes, written at once
        wait_for(lambda: _written(runtime), timeout=10, what="first snapshots written")
        time.sleep(0.1)
        reads.clear()
        for _ in range(10):
            last = _poll_all(runtime, clock)  # fifty unchanged sightings
        time.sleep(0.2)
        assert len(reads) < 10, f"{len(reads)} clock reads: the recorder woke per sighting"
        assert not _written(runtime)  # they wait for the tick (or the stop)
        recorder.stop()
        assert _seen(runtime.store.engine) == {name: (11, last) for name in NAMES}
    finally:
        recorder.stop()
        runtime.store.engine.dispose()
