"""Writes fenced by the claim (SPEC §10), in-process on a real PostgreSQL database: a replica
that lost its claim records no duplicate, yet a change only it saw is never lost."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from monitor.app import Runtime, build_runtime
from monitor.recorder import Recorder
from monitor.simulator import SimulatedGenAuth
from tests.conftest import FakeClock
from tests.helpers import runtime_settings


class Replicas:
    """Two runtimes, replicas "a" and "b", on one database and one target 'prod'; the claim
    row says who holds it, at which epoch, as the cluster would."""

    def __init__(self, url: str, sim: SimulatedGenAuth, base: Path, clock: FakeClock) -> None:
        self.url = url
        settings = runtime_settings(url, sim, base)
        self.held: dict[str, int | None] = {"a": None, "b": None}
        self.runtimes: dict[str, Runtime] = {}
        for name in ("a", "b"):
            # "a" queues its polls (the daemon) and is flushed by hand, "b" writes at once.
            runtime = build_runtime(
                settings,
                clock=clock,
                replica=name,
                recorder=Recorder() if name == "a" else None,
            )
            runtime.pollers["prod"].claim = lambda name=name: self.held[name]
            self.runtimes[name] = runtime
        self._engine = create_engine(url)
        with self._engine.begin() as connection:
            connection.execute(text("INSERT INTO claims VALUES ('prod', NULL, 0, NULL)"))

    def give(self, owner: str) -> None:
        """The claim goes to ``owner`` with a new epoch; the other still believes its own."""
        with self._engine.begin() as connection:
            epoch = connection.execute(
                text(
                    "UPDATE claims SET owner = :owner, epoch = epoch + 1,"
                    " lease_until = now() + interval '1 minute' RETURNING epoch"
                ),
                {"owner": owner},
            ).scalar_one()
        self.held[owner] = int(epoch)

    def poll(self, name: str) -> Any:
        return self.runtimes[name].pollers["prod"].poll()

    def flush(self) -> Any:
        return self.runtimes["a"].pollers["prod"].flush()

    def rows(self, sql: str) -> list[Any]:
        with self._engine.connect() as connection:
            return list(connection.execute(text(sql)))

    def kinds(self) -> list[str]:
        return [row.kind for row in self.rows("SELECT kind FROM events ORDER BY id")]

    def close(self) -> None:
        self._engine.dispose()
        for runtime in self.runtimes.values():
            runtime.store.engine.dispose()


@pytest.fixture
def two(
    postgres_url: str, simulator: SimulatedGenAuth, tmp_path: Path, clock: FakeClock
) -> Iterator[Replicas]:
    replicas = Replicas(postgres_url, simulator, tmp_path, clock)
    replicas.give("a")
    replicas.poll("a")
    assert replicas.flush()[1]
    assert replicas.kinds() == ["first_seen"]
    yield replicas
    replicas.close()


def _disable(sim: SimulatedGenAuth, clock: FakeClock, enabled: bool = False) -> None:
    data = sim.data
    data["enabled"] = enabled
    sim.set_data(data)
    clock.advance(60)


def test_unchanged_sightings_under_a_lost_claim_are_dropped(
    two: Replicas, clock: FakeClock
) -> None:
    clock.advance(60)
    two.poll("a")  # polled under epoch 1 ...
    two.give("b")  # ... but b holds the target now
    assert two.flush()[1]  # nothing to retry: dropped, not kept
    [snapshot] = two.rows("SELECT seen_count FROM snapshots")
    assert snapshot.seen_count == 1
    [state] = two.rows("SELECT last_attempt_at FROM poll_state")
    assert state.last_attempt_at.timestamp() < clock.now.timestamp() - 30


def test_failures_under_a_lost_claim_are_dropped(
    two: Replicas, simulator: SimulatedGenAuth, clock: FakeClock
) -> None:
    simulator.set_fault("http_502_html")
    clock.advance(60)
    two.poll("a")
    two.give("b")
    assert two.flush()[1]
    assert two.rows("SELECT count(*) AS n FROM poll_errors")[0].n == 0


def test_a_change_only_the_old_owner_saw_is_still_recorded(
    two: Replicas, simulator: SimulatedGenAuth, clock: FakeClock
) -> None:
    _disable(simulator, clock)
    two.poll("a")  # the database was away when a saw it; b has the target now
    two.give("b")
    assert two.flush()[1]
    assert two.kinds() == ["first_seen", "provider_disabled"]


def test_a_change_the_new_owner_recorded_too_collapses_by_hash(
    two: Replicas, simulator: SimulatedGenAuth, clock: FakeClock
) -> None:
    _disable(simulator, clock)
    two.poll("a")
    two.give("b")
    clock.advance(1)
    two.poll("b")  # b records the same state
    assert two.kinds() == ["first_seen", "provider_disabled"]
    assert two.flush()[1]
    assert two.kinds() == ["first_seen", "provider_disabled"]
    assert len(two.rows("SELECT id FROM snapshots")) == 2


def test_a_change_older_than_what_the_new_owner_recorded_is_dropped(
    two: Replicas, simulator: SimulatedGenAuth, clock: FakeClock
) -> None:
    _disable(simulator, clock)
    two.poll("a")  # a saw "disabled" ...
    two.give("b")
    _disable(simulator, clock, enabled=True)
    data = simulator.data
    data["type"] = "sendgrid"
    simulator.set_data(data)
    two.poll("b")  # ... b then recorded a newer state (another type), not "disabled"
    before = two.kinds()
    assert two.flush()[1]
    assert two.kinds() == before  # a's older change would roll the history back: dropped


def test_a_write_under_the_current_claim_is_recorded(
    two: Replicas, simulator: SimulatedGenAuth, clock: FakeClock
) -> None:
    _disable(simulator, clock)
    two.give("b")
    two.give("a")  # a lost it and won it back: a new epoch, and a poll under it
    two.poll("a")
    assert two.flush()[1]
    assert two.kinds() == ["first_seen", "provider_disabled"]
