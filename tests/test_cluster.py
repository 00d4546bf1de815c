"""Replicas in-process on a real PostgreSQL database: membership, the split of the targets,
handover, leases on the database clock, names, and the schedule a claim gets."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, text

from monitor.api import create_app
from monitor.cluster import Cluster, key_check
from monitor.errors import ConfigError
from monitor.http_server import HttpServer
from monitor.metrics import Metrics
from monitor.scheduler import shared_grid
from monitor.simulator import SimulatedGenAuth
from monitor.storage import Queries, Store, create_store_engine, upgrade
from monitor.storage.claims import ClaimStore, MirroredState
from tests.helpers import run_main, write_config

TARGETS = {f"t{i}": 60.0 for i in range(5)}
KEY = key_check(b"the fingerprint key")


@dataclass
class Holder:
    """The scheduler as the cluster sees it: what it was told to poll, and from when."""

    held: dict[str, datetime] = field(default_factory=dict)

    soon: set[str] = field(default_factory=set)

    def hold(self, name: str, *, not_before: datetime, skew: timedelta, soon: bool = False) -> None:
        assert name not in self.held, f"{name} held twice"
        self.held[name] = not_before
        if soon:
            self.soon.add(name)

    def drop(self, name: str) -> None:
        del self.held[name]


@pytest.fixture
def engine(postgres_url: str) -> Iterator[Engine]:
    engine = create_store_engine(postgres_url)
    upgrade(engine)
    store = Store(engine)
    for name in TARGETS:
        store.ensure_target(name, now=datetime.now(UTC))
    yield engine
    engine.dispose()


def replica(
    engine: Engine, name: str, *, lease: float = 10.0, key: str = KEY
) -> tuple[Cluster, Holder]:
    holder = Holder()
    cluster = Cluster(
        claims=ClaimStore(engine, me=name, instance=f"{name}-instance", lease=lease),
        targets=TARGETS,
        holder=holder,
        key_check=key,
        on_mirror=lambda _states: None,
        on_beat=lambda _live, _owned, _skew: None,
    )
    cluster.join()
    return cluster, holder


def owners(engine: Engine) -> dict[str, str | None]:
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT target, owner FROM claims WHERE lease_until > now()")
        )
        return {row.target: row.owner for row in rows}


def settle(*clusters: Cluster, rounds: int = 3) -> None:
    for _ in range(rounds):
        for cluster in clusters:
            cluster.step()


def test_replicas_split_the_targets_without_overlap(engine: Engine) -> None:
    (a, held_a), (b, held_b), (c, held_c) = (replica(engine, n) for n in "abc")
    settle(a, b, c)
    sizes = sorted(len(h.held) for h in (held_a, held_b, held_c))
    assert sizes == [1, 2, 2]
    assert set(held_a.held) | set(held_b.held) | set(held_c.held) == set(TARGETS)
    assert sum(sizes) == len(TARGETS)  # no target held twice
    db = owners(engine)
    for name, holder in (("a", held_a), ("b", held_b), ("c", held_c)):
        assert {t for t, o in db.items() if o == name} == set(holder.held)
    assert {m.name: sorted(m.targets) for m in a.members()} == {
        name: sorted(holder.held) for name, holder in (("a", held_a), ("b", held_b), ("c", held_c))
    }


def test_a_newcomer_gets_work_from_a_replica_holding_everything(engine: Engine) -> None:
    a, held_a = replica(engine, "a")
    a.step()
    assert len(held_a.held) == 5
    b, held_b = replica(engine, "b")
    settle(b, a, b)
    assert sorted([len(held_a.held), len(held_b.held)]) == [2, 3]
    assert not set(held_a.held) & set(held_b.held)


def test_leaving_hands_the_targets_over_at_the_next_beat(engine: Engine) -> None:
    (a, _), (b, held_b) = replica(engine, "a"), replica(engine, "b")
    settle(a, b)
    a.claims.leave()
    b.step()
    assert set(held_b.held) == set(TARGETS)
    assert [m.name for m in b.members()] == ["b"]


def test_the_claims_of_a_silent_replica_lapse_with_their_lease(engine: Engine) -> None:
    a, held_a = replica(engine, "a", lease=1.0)
    a.step()
    b, held_b = replica(engine, "b", lease=1.0)
    b.step()
    assert held_b.held == {}  # a holds everything, and b does not take a live claim
    assert b.claims.claim(list(TARGETS), 5) == []  # not even when it asks
    time.sleep(1.2)  # a is "killed": no heartbeat, its leases run out (database time)
    b.step()
    assert set(held_b.held) == set(TARGETS)
    a.step()  # a wakes up: it has lost everything and knows it
    assert held_a.held == {}


def test_heartbeats_keep_the_claims_past_their_first_lease(engine: Engine) -> None:
    a, held_a = replica(engine, "a", lease=1.0)
    b, held_b = replica(engine, "b", lease=1.0)
    a.step()
    for _ in range(3):  # 1.5 s: longer than a lease, renewed by each beat
        time.sleep(0.5)
        a.step()
    assert b.claims.claim(list(TARGETS), 5) == []
    assert len(held_a.held) == 5 and held_b.held == {}


def test_a_claim_is_first_polled_half_an_interval_after_the_last_poll(engine: Engine) -> None:
    with engine.begin() as connection:
        last = connection.execute(text("SELECT now() - interval '10 seconds'")).scalar_one()
        for name, at in (("t0", last), ("t1", last - timedelta(seconds=80))):
            connection.execute(
                text(
                    "UPDATE poll_state SET last_attempt_at = :at"
                    " WHERE target_id = (SELECT id FROM targets WHERE name = :name)"
                ),
                {"at": at, "name": name},
            )
    a, held = replica(engine, "a")
    before = datetime.now(UTC)
    a.step()
    # t0 was polled 10 s ago (a handover): on its slots, not before 30 s after that poll.
    assert abs((held.held["t0"] - (last + timedelta(seconds=30))).total_seconds()) < 1
    assert "t0" not in held.soon
    # t1 is overdue (its owner was killed), t2-t4 were never polled: soon.
    assert held.soon == {"t1", "t2", "t3", "t4"}
    for name in ("t1", "t2", "t3", "t4"):
        assert abs((held.held[name] - before).total_seconds()) < 1


def test_the_clock_skew_is_this_clock_minus_the_database_clock(engine: Engine) -> None:
    holder = Holder()
    seen: list[float] = []
    cluster = Cluster(
        claims=ClaimStore(engine, me="skewed", instance="i", lease=10.0),
        targets=TARGETS,
        holder=holder,
        key_check=KEY,
        on_mirror=lambda _states: None,
        on_beat=lambda _live, _owned, skew: seen.append(skew),
        clock=lambda: datetime.now(UTC) + timedelta(seconds=42),
    )
    cluster.join()
    cluster.step()
    assert seen and abs(seen[0] - 42) < 0.5
    # The claim's first poll is on local time: database time plus the skew.
    assert all(
        abs((at - datetime.now(UTC)).total_seconds() - 42) < 1 for at in holder.held.values()
    )


def test_a_live_replica_name_is_refused(engine: Engine) -> None:
    replica(engine, "same")
    with pytest.raises(ConfigError, match=r"cluster\.replica_name: replica name 'same' is in use"):
        replica(engine, "same")


def test_a_killed_process_of_this_host_gives_its_name_to_its_successor(engine: Engine) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO replicas VALUES ('mon-a', 'old', :host, :pid, :key, now(), now(),"
                " now() + interval '1 minute')"
            ),
            {"host": socket.gethostname(), "pid": dead.pid, "key": KEY},
        )
        connection.execute(
            text(
                "INSERT INTO claims SELECT name, 'mon-a', 0, now() + interval '1 minute'"
                " FROM targets"
            )
        )
    a, held = replica(engine, "mon-a")  # taken over, and the old claims given back first
    a.step()
    assert set(held.held) == set(TARGETS)
    with engine.connect() as connection:
        epochs = connection.execute(text("SELECT DISTINCT epoch FROM claims")).scalars().all()
    assert epochs == [1]  # claimed anew: a write of the dead process would be fenced


def test_a_replica_with_another_fingerprint_key_is_refused(engine: Engine) -> None:
    replica(engine, "a")
    with pytest.raises(ConfigError, match="fingerprint_key"):
        replica(engine, "b", key=key_check(b"another key"))


def test_other_replicas_targets_are_mirrored_from_the_database(engine: Engine) -> None:
    store = Store(engine)
    state = store.ensure_target("t3", now=datetime.now(UTC))
    from monitor.storage.store import NewSnapshot

    store.record_snapshot(
        state,
        NewSnapshot("sha256:" + "ab" * 32, '{"enabled": false}', False, "custom", True),
        now=datetime.now(UTC),
        events_=[],
    )
    a, _ = replica(engine, "a")
    a.step()  # a holds everything
    mirrored: list[MirroredState] = []
    b = Cluster(
        claims=ClaimStore(engine, me="b", instance="b", lease=10.0),
        targets=TARGETS,
        holder=Holder(),
        key_check=KEY,
        on_mirror=mirrored.extend,
        on_beat=lambda _live, _owned, _skew: None,
    )
    b.join()
    b.step()
    [t3] = [m for m in mirrored if m.name == "t3"]
    assert (t3.enabled, t3.provider_type, t3.drift, t3.up) == (False, "custom", True, True)


def test_mirrored_states_are_read_every_half_interval_not_at_every_heartbeat(
    engine: Engine,
) -> None:
    a, _ = replica(engine, "a")
    a.step()  # a holds everything
    reads: list[int] = []
    clock = [datetime(2026, 12, 1, tzinfo=UTC)]
    b = Cluster(
        claims=ClaimStore(engine, me="b", instance="b", lease=10.0),
        targets=TARGETS,  # every 60 s: mirrored every 30 s, heartbeats every 2 s
        holder=Holder(),
        key_check=KEY,
        on_mirror=lambda states: reads.append(len(states)),
        on_beat=lambda _live, _owned, _skew: None,
        clock=lambda: clock[0],
    )
    b.join()
    b.step()
    assert len(reads) == 1 and reads[0] > 0, "the first heartbeat mirrors at once"
    for _ in range(14):  # 28 s of heartbeats
        clock[0] += timedelta(seconds=b.tick)
        b.step()
    assert len(reads) == 1
    clock[0] += timedelta(seconds=b.tick)  # 30 s after the first read
    b.step()
    assert len(reads) == 2
    clock[0] -= timedelta(hours=1)  # the wall clock set back: mirror now, not in an hour
    b.step()
    assert len(reads) == 3


def test_shared_grid_is_the_same_on_every_replica_and_follows_the_skew() -> None:
    first, seed = shared_grid("prod", 60.0, timedelta(0))
    again, seed_again = shared_grid("prod", 60.0, timedelta(0))
    skewed, _ = shared_grid("prod", 60.0, timedelta(seconds=3))
    other, other_seed = shared_grid("staging", 60.0, timedelta(0))
    assert (first, seed) == (again, seed_again)
    assert skewed - first == timedelta(seconds=3)
    assert (other - first) % timedelta(seconds=60) != timedelta(0) and other_seed != seed


def test_cluster_api_lists_live_replicas_with_their_targets(engine: Engine) -> None:
    (a, _), (b, _) = replica(engine, "a"), replica(engine, "b")
    settle(a, b)
    registry = CollectorRegistry()
    Metrics(registry)
    app = create_app(
        registry=registry,
        queries=Queries(engine),
        ready=lambda: (True, {}),
        api_token="cluster-token",
        clock=lambda: datetime.now(UTC),
        cluster=lambda: ("a", a.members()),
    )
    server = HttpServer(app, host="127.0.0.1", port=0)
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/api/v1/cluster"
        assert requests.get(url, timeout=5).status_code == 401
        body = requests.get(url, headers={"Authorization": "Bearer cluster-token"}, timeout=5)
        data = body.json()
    finally:
        server.stop()
    assert data["replica"] == "a"
    assert [r["name"] for r in data["replicas"]] == ["a", "b"]
    assert sorted(t for r in data["replicas"] for t in r["targets"]) == sorted(TARGETS)
    for r in data["replicas"]:
        beat = datetime.fromisoformat(r["last_heartbeat"].replace("Z", "+00:00"))
        assert abs((datetime.now(UTC) - beat).total_seconds()) < 10


def test_replicas_migrating_an_empty_database_at_once_both_succeed(postgres_url: str) -> None:
    engines = [create_store_engine(postgres_url) for _ in range(3)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(engines))

    def migrate(engine: Engine) -> None:
        start.wait()
        try:
            upgrade(engine)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=migrate, args=(e,)) for e in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for engine in engines:
        engine.dispose()
    assert errors == []


class _Poller:
    """Enough of a TargetPoller for the scheduler's bookkeeping (it is never run here)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def expire_if_overdue(self, _now: float) -> bool:
        return False


def test_a_held_target_runs_on_its_shared_slots_from_not_before_and_dropped_not_at_all() -> None:
    from monitor.scheduler import PollScheduler, ScheduledTarget

    now = datetime(2026, 12, 2, 1, 0, 0, tzinfo=UTC)
    targets = [ScheduledTarget(_Poller(name), 60.0, 0.0) for name in ("prod", "staging")]  # type: ignore[arg-type]
    scheduler = PollScheduler(targets, backoff_max=300, now=lambda: now, claimed=True)
    scheduler.start()
    try:
        assert scheduler.next_run_times() == {}  # nothing before the cluster says so
        skew = timedelta(seconds=2)
        not_before = now + timedelta(seconds=100)
        scheduler.hold("prod", not_before=not_before, skew=skew)
        first = scheduler.next_run_times()["prod"]
        assert first is not None
        origin, _ = shared_grid("prod", 60.0, skew)
        assert not_before <= first < not_before + timedelta(seconds=60)
        assert (first - origin) % timedelta(seconds=60) == timedelta(0)  # on the shared grid
        scheduler.drop("prod")
        scheduler.drop("prod")  # twice is harmless
        assert scheduler.next_run_times() == {}
        # Soon (never polled, or overdue): within min(interval, 30 s) of not_before.
        scheduler.hold("staging", not_before=now, skew=skew, soon=True)
        soon = scheduler.next_run_times()["staging"]
        assert soon is not None and now <= soon < now + timedelta(seconds=30)
    finally:
        scheduler.shutdown()


def test_run_refuses_a_replica_name_a_live_replica_has(
    engine: Engine, postgres_url: str, simulator: SimulatedGenAuth, tmp_path: Path
) -> None:
    replica(engine, "mon-a")  # alive on another host, as far as this process can tell
    with engine.begin() as connection:
        connection.execute(text("UPDATE replicas SET host = 'elsewhere' WHERE name = 'mon-a'"))
    config = write_config(
        tmp_path, simulator, storage_url=postgres_url, extra='[cluster]\nreplica_name = "mon-a"\n'
    )
    env = {"GM_TEST_SECRET": simulator.access_key_secret, "GM_TEST_API_TOKEN": "t"}
    result = run_main("run", "-c", str(config), env=env)
    assert result.returncode == 2
    assert "cluster.replica_name: replica name 'mon-a' is in use by a live replica" in result.stderr
    assert "host elsewhere" in result.stderr


def test_a_replica_taking_many_targets_reads_their_states_in_bulk(
    postgres_url: str, tmp_path: Path
) -> None:
    """A replica that takes a thousand targets at once (the first of a fleet, or the survivor
    of a failover) must not spend a transaction per target between two heartbeats: that kept
    its heartbeat away for longer than the lease, and it lost every claim it had just taken."""
    from sqlalchemy import event

    from monitor.app import Daemon
    from monitor.config import parse_settings

    many = [f"pool-{i:04d}" for i in range(1200)]
    settings = parse_settings(
        {
            "monitor": {"fingerprint_key_env": "FP"},
            "storage": {"url": postgres_url},
            "server": {"listen": "127.0.0.1:0"},
            "cluster": {"replica_name": "bulk"},
            "targets": [
                {
                    "name": name,
                    "base_url": "http://127.0.0.1:9",
                    "access_key_id": "id",
                    "access_key_secret_env": "SECRET",
                }
                for name in many
            ],
        },
        base_dir=tmp_path,
        environ={"FP": "k", "SECRET": "s"},
    )
    daemon = Daemon(settings)
    try:
        assert daemon.cluster is not None
        commits: list[int] = []
        event.listen(daemon.runtime.store.engine, "commit", lambda _c: commits.append(1))
        daemon.cluster.step()  # alone: it takes all 1,200
        assert len(daemon.cluster.held()) == len(many)
        assert len(commits) <= 4, len(commits)  # states in chunks of 500, not 1,200 writes
    finally:
        daemon.stop()
