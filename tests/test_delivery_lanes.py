"""Delivery across replicas (SPEC §4, §10): lane leases on the database clock, two workers on
one database, a worker killed mid-send, an alertmanager sink's several URLs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from monitor.app import Runtime, build_runtime
from monitor.simulator import SimulatedGenAuth
from monitor.storage import create_store_engine, upgrade
from monitor.storage.lanes import LaneLeases
from monitor.storage.outbox import Outbox
from monitor.storage.queries import Queries
from monitor.storage.schema import attribution_lookups, delivery_lanes
from tests.helpers import CLI, run_main, runtime_settings, wait_for, write_config
from tests.receiver import Receiver

SECRET = "Lanes-Access-Secret-789"


@pytest.fixture
def receivers() -> Iterator[Callable[[], Receiver]]:
    """``make()``: a new loopback receiver, stopped at the end of the test."""
    made: list[Receiver] = []

    def make() -> Receiver:
        made.append(Receiver())
        return made[-1]

    yield make
    for receiver in made:
        receiver.stop()


def _toggle(sim: SimulatedGenAuth, runtime: Runtime, times: int) -> None:
    """Disable and enable the provider ``times`` times, polling after each change: a firing
    and a resolving alert for target prod each time."""
    for _ in range(times):
        for enabled in (False, True):
            data = sim.data
            data["enabled"] = enabled
            sim.set_data(data)
            runtime.pollers["prod"].poll()


def _sample(runtime: Runtime, name: str, **labels: str) -> float:
    return runtime.metrics.registry.get_sample_value(name, labels) or 0.0


# -- the lease ------------------------------------------------------------------------------


def test_a_lane_has_one_holder_at_a_time_until_its_lease_ends(db_url: str) -> None:
    engine = create_store_engine(db_url)
    upgrade(engine)
    a, b = LaneLeases(engine, holder="a"), LaneLeases(engine, holder="b")
    assert a.acquire("hook", 0, 30)
    assert not b.acquire("hook", 0, 30), "held by a"
    assert b.acquire("hook", 1, 30), "another lane of the same sink is free"
    assert a.acquire("hook", 0, 30), "a holder may take its own lane again"
    assert not b.extend("hook", 0, 30), "only the holder extends a lease"
    a.release("hook", 0)
    assert b.acquire("hook", 0, 0.3), "released: free at once"
    assert not a.acquire("hook", 0, 30)
    wait_for(lambda: a.acquire("hook", 0, 30), timeout=10, what="b's lease to run out")
    assert not b.extend("hook", 0, 30), "the old holder learns it lost the lane"
    b.release("hook", 0)  # a release by a former holder leaves the lane alone
    assert not b.acquire("hook", 0, 30)
    engine.dispose()


def test_processes_racing_for_a_new_lane_get_one_holder(db_url: str) -> None:
    """The lane's row made by whichever comes first, the lease taken by exactly one."""
    engine = create_store_engine(db_url)
    upgrade(engine)
    racers = [LaneLeases(create_store_engine(db_url), holder=f"r{i}") for i in range(6)]
    start, won = threading.Barrier(len(racers)), []

    def race(leases: LaneLeases) -> None:
        start.wait()
        if leases.acquire("am", 3, 30):
            won.append(leases.holder)

    threads = [threading.Thread(target=race, args=(leases,)) for leases in racers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(won) == 1, won
    with engine.connect() as c:
        rows = c.execute(select(delivery_lanes.c.holder)).scalars().all()
    assert rows == won
    engine.dispose()


def test_a_late_mark_of_a_former_holder_leaves_a_delivered_row_alone(
    db_url: str, tmp_path: Path, receivers: Callable[[], Receiver]
) -> None:
    """A holder that lost its lane mid-send and then saw the sink refuse must not set aside
    (to be sent again by `alerts retry`) the row the new holder has delivered."""
    receiver = receivers()
    with SimulatedGenAuth(access_key_secret=SECRET) as sim:
        settings = runtime_settings(
            db_url, sim, tmp_path, sinks=[{"type": "webhook", "url": receiver.url}]
        )
        runtime = build_runtime(settings)
        runtime.pollers["prod"].poll()
        outbox = Outbox(runtime.store.engine)
        [row] = outbox.pending()
        now = row.next_attempt_at
        outbox.delivered(row.id, now)  # by the new holder
        outbox.rejected(row.id, "HTTP 400", now)  # the former holder's late mark
        outbox.failed(row.id, "HTTP 503", now)
        assert outbox.pending(rejected=True) == []
        assert outbox.retry_now(now) == 0
        runtime.store.engine.dispose()


# -- two workers on one database ------------------------------------------------------------


def test_two_workers_deliver_every_alert_once_and_in_order_after_an_outage(
    postgres_url: str, tmp_path: Path, receivers: Callable[[], Receiver]
) -> None:
    receiver = receivers()
    with SimulatedGenAuth(access_key_secret=SECRET) as sim:
        settings = runtime_settings(
            postgres_url,
            sim,
            tmp_path,
            sinks=[{"type": "webhook", "url": receiver.url, "max_backoff": "0.2s"}],
            attribution=False,  # delivery alone: no worker runs here to release held alerts
        )
        # Two runtimes: two engines, two workers with their own lease holders (two replicas).
        first, second = build_runtime(settings), build_runtime(settings)
        receiver.stop()  # the sink refuses connections
        try:
            first.delivery.start()
            second.delivery.start()
            first.pollers["prod"].poll()  # first_seen
            _toggle(sim, first, 3)
            failed = "genauth_monitor_alert_deliveries_total"
            wait_for(
                lambda: all(
                    _sample(r, failed, sink="webhook", outcome="failed") >= 2
                    for r in (first, second)
                ),
                what="both workers trying during the outage",
            )
            receiver.start()
            outbox = Outbox(first.store.engine)
            wait_for(lambda: not outbox.pending(), what="every alert delivered")
        finally:
            first.delivery.stop()
            second.delivery.stop()
        recorded = [e.id for e in reversed(first.queries.events(target="prod"))]
        sent = [body["id"] for body in receiver.bodies()]
        assert sent == recorded, "each alert once, in the order it happened"
        assert [b["kind"] for b in receiver.bodies()] == [
            "first_seen",
            *["provider_disabled", "provider_enabled"] * 3,
        ]
        total = sum(
            _sample(r, "genauth_monitor_alert_deliveries_total", sink="webhook", outcome="sent")
            for r in (first, second)
        )
        assert total == len(recorded) == 7
        for runtime in (first, second):
            runtime.store.engine.dispose()


# -- an alertmanager sink with several URLs -------------------------------------------------


def _posted(receiver: Receiver) -> list[dict[str, Any]]:
    return [alert for body in receiver.bodies() for alert in body]


def _first_posts(receiver: Receiver) -> list[str]:
    """The event ids posted, in order, each once (a re-sync posts firing alerts again)."""
    ids = [alert["annotations"]["event_id"] for alert in _posted(receiver)]
    return list(dict.fromkeys(ids))


def test_each_url_of_an_alertmanager_sink_is_a_lane_of_its_own(
    db_url: str, tmp_path: Path, receivers: Callable[[], Receiver]
) -> None:
    live, dead = receivers(), receivers()
    # Down, but keeping its port: a stopped server's port may be taken by another test's
    # server meanwhile (xdist), which would then accept these alerts.
    dead.status = 503
    with SimulatedGenAuth(access_key_secret=SECRET) as sim:
        settings = runtime_settings(
            db_url,
            sim,
            tmp_path,
            sinks=[
                {
                    "type": "alertmanager",
                    "name": "am",
                    "urls": [live.base_url, dead.base_url],
                    "max_backoff": "0.2s",
                }
            ],
            attribution=False,  # delivery alone: no worker runs here to release held alerts
        )
        runtime = build_runtime(settings)
        runtime.pollers["prod"].poll()
        _toggle(sim, runtime, 1)
        recorded = [e.id for e in reversed(runtime.queries.events(target="prod"))]
        assert runtime.delivery.drain(timeout=1.5) == 3, "the dead one's rows wait"
        assert _first_posts(live) == recorded, "the dead Alertmanager held back nothing"
        for alert in _posted(live):  # Alertmanager dedups: no replica or URL in the labels
            assert set(alert["labels"]) == {"alertname", "target", "severity", "kind"}
        pending = Outbox(runtime.store.engine).pending()
        assert {(p.sink, p.lane) for p in pending} == {("am", 1)}
        metric = "genauth_monitor_alert_deliveries_total"
        assert _sample(runtime, metric, sink="am", outcome="sent") == 3
        assert _sample(runtime, metric, sink="am", outcome="failed") >= 1
        assert _sample(runtime, "genauth_monitor_outbox_pending", sink="am") == 3

        dead.status = 200  # back
        assert runtime.delivery.drain(timeout=10) == 0
        assert _first_posts(dead) == recorded, "the one that came back gets every alert"
        assert _sample(runtime, metric, sink="am", outcome="sent") == 6
        assert _sample(runtime, "genauth_monitor_outbox_pending", sink="am") == 0
        runtime.store.engine.dispose()


# -- a replica killed mid-delivery ----------------------------------------------------------


def _daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "GM_TEST_SECRET": SECRET, "GM_TEST_API_TOKEN": "t", "GM_TEST_FP": "fp"}
    with log.open("ab") as out:
        return subprocess.Popen(
            [*CLI, "run", "-c", str(config)], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _replica_configs(
    tmp_path: Path, sim: SimulatedGenAuth, postgres_url: str, sink: str, interval: str
) -> dict[str, Path]:
    """Configs of two replicas on one database, watching one target each ("one", "two"):
    both deliver the sink's one lane (until the replicas' claims split shared targets, one
    target per daemon keeps each change recorded once)."""
    configs = {}
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        path = write_config(
            tmp_path / name, sim, interval=interval, storage_url=postgres_url, extra=sink
        )
        text = path.read_text().replace('name = "prod"', f'name = "{name}"')
        # Replicas share one fingerprint key (a replica with another is refused).
        path.write_text(text.replace("[monitor]", '[monitor]\nfingerprint_key_env = "GM_TEST_FP"'))
        configs[name] = path
    return configs


def _lookups_pending(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(select(func.count()).select_from(attribution_lookups)) or 0)


def _stop_all(daemons: dict[str, subprocess.Popen[bytes]]) -> None:
    for daemon in daemons.values():
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=15)


@pytest.mark.slow
def test_two_replicas_through_a_sink_outage_deliver_every_alert_once(
    postgres_url: str, tmp_path: Path, receivers: Callable[[], Receiver]
) -> None:
    receiver = receivers()
    receiver.stop()  # refusing from the start
    sink = f'[[sinks]]\ntype = "webhook"\nurl = "{receiver.url}"\nmax_backoff = "1s"\n'
    with SimulatedGenAuth(access_key_secret=SECRET) as sim:
        configs = _replica_configs(tmp_path, sim, postgres_url, sink, "1s")
        daemons = {}
        engine = create_store_engine(postgres_url)
        upgrade(engine)  # read before the first replica has migrated it
        queries = Queries(engine)

        def recorded(kind: str) -> int:
            return len(queries.events(kinds=(kind,)))

        def recorded_is(kind: str, count: int) -> Callable[[], bool]:
            # Settled too: an info alert waits for its attribution (SPEC §11), and the next
            # change's critical alert would otherwise be queued before it.
            return lambda: recorded(kind) == count and not _lookups_pending(engine)

        try:
            daemons["one"] = _daemon(configs["one"], tmp_path / "one.log")
            wait_for(lambda: recorded("first_seen") == 1, what="one up")
            daemons["two"] = _daemon(configs["two"], tmp_path / "two.log")
            wait_for(lambda: recorded("first_seen") == 2, what="two up")
            for round_ in (1, 2, 3):  # each change seen by both replicas, while the sink is down
                for enabled, kind in ((False, "provider_disabled"), (True, "provider_enabled")):
                    data = sim.data
                    data["enabled"] = enabled
                    sim.set_data(data)
                    wait_for(recorded_is(kind, 2 * round_), what=kind)
            receiver.start()
            outbox = Outbox(engine)
            # Info alerts are held until their attribution settles (SPEC §11): an empty outbox
            # with a lookup still pending is not yet "every alert delivered".
            wait_for(
                lambda: not outbox.pending() and not _lookups_pending(engine),
                timeout=60,
                what="every alert delivered",
            )
        finally:
            _stop_all(daemons)
        events = list(reversed(queries.events()))
        engine.dispose()
        for name in daemons:  # both tried the sink while it was down
            assert "alert delivery failed" in (tmp_path / f"{name}.log").read_text(), name
        assert len(events) == 14
        # A critical alert sent before its attribution settled gets a follow-up with its id.
        firsts = [body for body in receiver.bodies() if not body.get("follow_up")]
        sent = [body["id"] for body in firsts]
        assert sorted(sent) == sorted(e.id for e in events), "each alert exactly once"
        for target in ("one", "two"):  # and in order per target
            mine = [body["kind"] for body in firsts if body["target"] == target]
            assert mine == ["first_seen", *["provider_disabled", "provider_enabled"] * 3]


@pytest.mark.slow
def test_a_replica_killed_mid_delivery_leaves_the_alert_to_the_other(
    postgres_url: str, tmp_path: Path, receivers: Callable[[], Receiver]
) -> None:
    receiver = receivers()
    sink = f'[[sinks]]\ntype = "webhook"\nurl = "{receiver.url}"\ntimeout = "5s"\n'
    with SimulatedGenAuth(access_key_secret=SECRET) as sim:
        configs = _replica_configs(tmp_path, sim, postgres_url, sink, "1h")
        daemons = {"one": _daemon(configs["one"], tmp_path / "one.log")}
        engine = create_store_engine(postgres_url)
        try:
            wait_for(lambda: len(receiver.bodies()) == 1, what="one's first_seen delivered")
            receiver.hold()  # the next request is received, never accepted
            daemons["two"] = _daemon(configs["two"], tmp_path / "two.log")
            wait_for(lambda: receiver.held == 1, what="two's first_seen in flight")

            with engine.connect() as c:
                holder = c.execute(select(delivery_lanes.c.holder)).scalar_one()
            pid = int(holder.rsplit("-", 2)[1])  # host-pid-random (default_holder)
            [(killed, daemon)] = [(n, d) for n, d in daemons.items() if d.pid == pid]
            daemon.send_signal(signal.SIGKILL)
            daemon.wait(timeout=10)
            receiver.release()

            # The survivor takes the lane once the lease ends (timeout 5 s + 5 s margin).
            wait_for(lambda: len(receiver.bodies()) == 2, timeout=40, what="taken over")
            config = configs["one" if killed == "two" else "two"]
            out = run_main("alerts", "pending", "-c", str(config), "--json", env=_env())
            assert json.loads(out.stdout) == []
        finally:
            _stop_all(daemons)
            engine.dispose()
        bodies = receiver.bodies()
        assert [(b["target"], b["kind"]) for b in bodies] == [
            ("one", "first_seen"),
            ("two", "first_seen"),
        ]
        assert len({b["id"] for b in bodies}) == 2


def _env() -> dict[str, str]:
    return {"GM_TEST_SECRET": SECRET, "GM_TEST_API_TOKEN": "t"}
