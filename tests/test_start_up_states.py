"""A daemon's start-up reads (and creates) every target's state a chunk of targets per
transaction, not one transaction per target; two processes starting together on an empty
database agree on the targets."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import event, func, select

from monitor.app import build_runtime
from monitor.simulator import SimulatedGenAuth
from monitor.storage import Store, TargetState, create_store_engine, upgrade
from monitor.storage.schema import poll_state, targets
from tests.conftest import FakeClock
from tests.helpers import change_and_poll, runtime_settings

pytestmark = pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)

NAMES = [f"pool-{i:04d}" for i in range(1200)]


def test_many_targets_are_created_and_restored_in_a_few_transactions(
    db_url: str, simulator: SimulatedGenAuth, tmp_path: Path, clock: FakeClock
) -> None:
    runtime = build_runtime(runtime_settings(db_url, simulator, tmp_path), clock=clock)
    change_and_poll(runtime, simulator, clock, enabled=False)  # "prod" has a snapshot now
    recorded = runtime.pollers["prod"]._state
    runtime.store.engine.dispose()
    store = Store(create_store_engine(db_url))
    commits: list[int] = []
    event.listen(store.engine, "commit", lambda _c: commits.append(1))
    try:
        states = store.ensure_targets(["prod", *NAMES], now=clock())
        assert len(commits) == 3  # 1,201 targets, 500 per transaction
        assert states["prod"] == recorded and states["prod"].enabled is False
        assert all(states[name] == TargetState(states[name].target_id, name) for name in NAMES)
        again = store.ensure_targets(list(reversed(NAMES)), now=clock())
        assert {name: s.target_id for name, s in again.items()} == {
            name: states[name].target_id for name in NAMES
        }
        with store.engine.connect() as connection:
            assert connection.execute(select(func.count()).select_from(poll_state)).scalar() == 1201
    finally:
        store.engine.dispose()


def test_two_processes_creating_the_same_targets_at_once_agree(db_url: str) -> None:
    engine = create_store_engine(db_url)
    upgrade(engine)
    engine.dispose()
    stores = [Store(create_store_engine(db_url)) for _ in range(2)]
    results: list[dict[str, TargetState]] = []
    start = threading.Barrier(2)
    clock = FakeClock()

    def starting(store: Store) -> None:
        start.wait()
        results.append(store.ensure_targets(NAMES, now=clock()))

    threads = [threading.Thread(target=starting, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert len(results) == 2
        first, second = ({n: s.target_id for n, s in r.items()} for r in results)
        assert first == second and len(set(first.values())) == len(NAMES)
        with stores[0].engine.connect() as connection:
            assert connection.execute(select(func.count()).select_from(targets)).scalar() == len(
                NAMES
            )
    finally:
        for store in stores:
            store.engine.dispose()
