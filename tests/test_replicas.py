"""Replicas as real daemon processes (SPEC §10): several ``run`` processes on one PostgreSQL
database split the targets, poll each once per interval, take over from a killed replica, hand
over at once on SIGTERM, record every change once; a SQLite database has one daemon."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine, make_url, text

from monitor.errors import ConfigError
from monitor.simulator import SimulatedGenAuth
from monitor.startup import lock_sqlite
from tests.helpers import (
    free_port,
    metric_value,
    run_cli,
    run_main,
    runtime_settings,
    scrape,
    start_daemon,
    wait_for,
    write_config,
)
from tests.receiver import Receiver
from tests.tcp_proxy import FreezableProxy

SECRET = "Replica-Access-Secret-314"
TOKEN = "Replica-Api-Token-159"
ENV = {"GM_TEST_SECRET": SECRET, "GM_TEST_API_TOKEN": TOKEN, "GM_TEST_FP": "replica-fp-key"}
FAILOVER_BOUND = 30.0  # SPEC §10: 2 intervals (1 s here) or 30 s, whichever is longer


@dataclass
class Replica:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self) -> str:
        return scrape(self.base, timeout=3)

    def cluster(self) -> dict[str, list[str]]:
        answer = requests.get(
            f"{self.base}/api/v1/cluster", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=3
        ).json()
        return {r["name"]: r["targets"] for r in answer["replicas"]}

    def ready(self) -> bool:
        return requests.get(f"{self.base}/readyz", timeout=2).status_code == 200

    def disabled(self, target: str) -> bool:
        return metric_value(self.metrics(), "genauth_email_provider_enabled", target=target) == 0

    def owned(self) -> float | None:
        return metric_value(self.metrics(), "genauth_monitor_targets_owned", replica=self.name)


def _config(directory: Path, sims: list[SimulatedGenAuth], url: str, port: int, name: str) -> Path:
    targets = "".join(
        f'[[targets]]\nname = "t{i}"\nbase_url = "{sim.base_url}"\n'
        f'access_key_id = "{sim.access_key_id}"\naccess_key_secret_env = "GM_TEST_SECRET"\n'
        for i, sim in enumerate(sims)
    )
    path = directory / f"{name}.toml"
    path.write_text(
        f"""
[monitor]
interval = "1s"
jitter = "0%"
timeout = "2s"
fingerprint_key_env = "GM_TEST_FP"

[storage]
url = "{url}"

[server]
listen = "127.0.0.1:{port}"
api_token_env = "GM_TEST_API_TOKEN"

[cluster]
replica_name = "{name}"

{targets}
"""
    )
    return path


@contextmanager
def simulators(count: int) -> Iterator[list[SimulatedGenAuth]]:
    with ExitStack() as stack:
        yield [
            stack.enter_context(
                SimulatedGenAuth(access_key_id=f"pool-{i}", access_key_secret=SECRET)
            )
            for i in range(count)
        ]


@contextmanager
def replicas(
    tmp_path: Path, sims: list[SimulatedGenAuth], url: str, names: list[str], extra: str = ""
) -> Iterator[list[Replica]]:
    """Daemons started one right after the other (an empty database: they race to migrate)."""
    started: list[Replica] = []
    configs = []
    for name in names:
        port = free_port()
        config = _config(tmp_path, sims, url, port, name)
        config.write_text(config.read_text() + extra)
        configs.append((name, port, config))
    try:
        for name, port, config in configs:
            log = tmp_path / f"{name}.log"
            started.append(Replica(name, port, start_daemon(config, log, ENV), log))
        for replica in started:
            wait_for(replica.ready, timeout=60, what=f"{replica.name} ready")
        yield started
    finally:
        for replica in started:
            if replica.proc.poll() is None:
                replica.proc.kill()
            replica.proc.wait()


def _split_settled(live: list[Replica], targets: int) -> dict[str, list[str]]:
    """The claims once every target has exactly one live holder and each holds its share."""
    names = {r.name for r in live}
    view = live[0].cluster()
    held = [t for ts in view.values() for t in ts]
    share = -(-targets // len(live))
    whole = set(view) == names and sorted(held) == sorted(set(held)) and len(held) == targets
    if whole and all(len(ts) <= share for ts in view.values()):
        return view
    return {}


def _counts(sims: list[SimulatedGenAuth]) -> list[int]:
    return [sim.provider_requests for sim in sims]


def _events(url: str, kind: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return int(
                connection.execute(
                    text("SELECT count(*) FROM events WHERE kind = :kind"), {"kind": kind}
                ).scalar_one()
            )
    finally:
        engine.dispose()


@pytest.mark.slow
def test_three_replicas_poll_each_target_once_and_survive_two_kills(
    tmp_path: Path, postgres_url: str
) -> None:
    receiver = Receiver()
    sink = f'\n[[sinks]]\ntype = "webhook"\nurl = "{receiver.url}"\nmax_backoff = "1s"\n'
    try:
        with (
            simulators(5) as sims,
            replicas(tmp_path, sims, postgres_url, ["rep-a", "rep-b", "rep-c"], sink) as running,
        ):
            view = wait_for(lambda: _split_settled(running, 5), timeout=30, what="a settled split")
            assert sorted(len(ts) for ts in view.values()) == [1, 2, 2]
            for replica in running:
                text_ = replica.metrics()
                assert metric_value(text_, "genauth_monitor_replicas") == 3
                owned = [
                    line
                    for line in text_.splitlines()
                    if line.startswith("genauth_monitor_targets_owned{")
                ]
                assert owned == [
                    f'genauth_monitor_targets_owned{{replica="{replica.name}"}} '
                    f"{float(len(view[replica.name]))}"
                ]
                skew = metric_value(text_, "genauth_monitor_clock_skew_seconds")
                assert skew is not None and abs(skew) < 1

            # One poll per target per interval, in total.
            before, started = _counts(sims), time.monotonic()
            time.sleep(8)
            after, seconds = _counts(sims), time.monotonic() - started
            for index, (b, a) in enumerate(zip(before, after, strict=True)):
                assert seconds - 1.5 <= a - b <= seconds + 1.5, (index, a - b, seconds)

            # A change upstream: one event, delivered, and every replica's gauges show it.
            data = sims[2].data
            data["enabled"] = False
            sims[2].set_data(data)
            for replica in running:
                wait_for(
                    functools.partial(replica.disabled, "t2"),
                    timeout=10,
                    what=f"t2 disabled in {replica.name}'s /metrics",
                )
            wait_for(
                lambda: [b for b in receiver.bodies() if b["kind"] == "provider_disabled"],
                timeout=20,
                what="provider_disabled delivered",
            )
            time.sleep(3)
            assert _events(postgres_url, "provider_disabled") == 1
            # Once per sink across the replicas: one replica holds the sink's delivery lane.
            delivered = [b for b in receiver.bodies() if b["kind"] == "provider_disabled"]
            # (and its attribution's follow-up at most once: the same id, "follow_up": true)
            firsts = [b for b in delivered if not b.get("follow_up")]
            assert len(firsts) == 1 and len(delivered) - len(firsts) <= 1, delivered
            assert {b["id"] for b in delivered} == {firsts[0]["id"]}
            assert _events(postgres_url, "first_seen") == 5

            # SIGKILL two replicas: the third polls all five within the bound.
            survivor, *killed = running
            for replica in killed:
                replica.proc.send_signal(signal.SIGKILL)
            for replica in killed:
                replica.proc.wait()
            killed_at = time.monotonic()
            orphans = [int(t[1:]) for r in killed for t in view[r.name]]
            at_kill = _counts(sims)
            recovered: dict[int, float] = {}

            def all_recovered() -> bool:
                counts = _counts(sims)
                for index in orphans:
                    if index not in recovered and counts[index] > at_kill[index] + 1:
                        recovered[index] = time.monotonic() - killed_at
                return len(recovered) == len(orphans)

            wait_for(all_recovered, timeout=FAILOVER_BOUND + 5, what="the orphans polled again")
            failover = max(recovered.values())
            print(f"failover after SIGKILL: {failover:.1f} s for {len(orphans)} targets")
            assert failover <= FAILOVER_BOUND
            wait_for(lambda: survivor.owned() == 5, timeout=10)
            assert list(survivor.cluster()) == [survivor.name]
            assert metric_value(survivor.metrics(), "genauth_monitor_replicas") == 1

            # The survivor polls everything once per interval, and records changes once.
            before, started = _counts(sims), time.monotonic()
            time.sleep(5)
            after, seconds = _counts(sims), time.monotonic() - started
            for index, (b, a) in enumerate(zip(before, after, strict=True)):
                assert seconds - 1.5 <= a - b <= seconds + 1.5, (index, a - b, seconds)
            data = sims[orphans[0]].data
            data["smtpConfig"]["smtp_host"] = "smtp.after-failover.example"
            sims[orphans[0]].set_data(data)
            wait_for(lambda: _events(postgres_url, "delivery_changed") == 1, timeout=15)
            time.sleep(2)
            assert _events(postgres_url, "delivery_changed") == 1
            assert _events(postgres_url, "provider_disabled") == 1

            survivor.proc.send_signal(signal.SIGTERM)
            assert survivor.proc.wait(timeout=15) == 0, survivor.log.read_text()[-3000:]
            verify = run_main("verify", "-c", str(tmp_path / "rep-a.toml"), env=ENV)
            assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        receiver.stop()


@pytest.mark.slow
def test_sigterm_hands_the_targets_over_at_once(tmp_path: Path, postgres_url: str) -> None:
    with simulators(4) as sims, replicas(tmp_path, sims, postgres_url, ["one", "two"]) as running:
        view = wait_for(lambda: _split_settled(running, 4), timeout=30, what="a settled split")
        leaving, staying = running
        handed = [int(t[1:]) for t in view[leaving.name]]
        assert handed
        before = _counts(sims)
        stopped = time.monotonic()
        leaving.proc.send_signal(signal.SIGTERM)
        assert leaving.proc.wait(timeout=15) == 0
        wait_for(lambda: staying.owned() == 4, timeout=10, what="all four taken over")
        taken = time.monotonic() - stopped
        print(f"handover after SIGTERM: {taken:.1f} s")
        # Well within a lease (10 s): the claims were given back, not left to run out.
        assert taken < 5
        time.sleep(4)
        after, seconds = _counts(sims), time.monotonic() - stopped
        for index in handed:
            # Polled on across the handover, and never twice in one interval.
            assert seconds - 2 <= after[index] - before[index] <= seconds + 1.5
        assert list(staying.cluster()) == [staying.name]


@pytest.mark.slow
def test_a_second_daemon_on_one_sqlite_file_exits_2_naming_the_first(
    tmp_path: Path, simulator: SimulatedGenAuth
) -> None:
    port = free_port()
    config = write_config(tmp_path, simulator, port=port)
    env = {**ENV, "GM_TEST_SECRET": simulator.access_key_secret}
    first = start_daemon(config, tmp_path / "first.log", env)
    try:
        wait_for(lambda: (tmp_path / "monitor.db.lock").exists() and first.poll() is None)
        wait_for(lambda: (tmp_path / "monitor.db").exists(), what="the first daemon's database")
        wait_for(
            lambda: requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).ok,
            what="the first daemon ready",
        )
        # Another config (its own listen address) for the same database file.
        (tmp_path / "second").mkdir()
        other = write_config(
            tmp_path / "second", simulator, storage_url=f"sqlite:///{tmp_path / 'monitor.db'}"
        )
        second = run_cli("run", "-c", str(other), env=env)
        assert second.returncode == 2, second.stderr
        using = f"another genauth-monitor daemon is using {tmp_path / 'monitor.db'}"
        assert using in second.stderr
        assert f"(pid {first.pid})" in second.stderr
        # `check` beside the running daemon stays allowed.
        check = run_cli("check", "-c", str(config), env=env)
        assert check.returncode == 0, check.stderr
        first.send_signal(signal.SIGKILL)
        first.wait()
        # The OS let go of the lock with the killed process: the next daemon starts.
        after = start_daemon(config, tmp_path / "after.log", env)
        try:
            wait_for(
                lambda: requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).ok,
                what="the next daemon ready",
            )
            assert (tmp_path / "monitor.db.lock").read_text().strip() == str(after.pid)
        finally:
            after.send_signal(signal.SIGTERM)
            assert after.wait(timeout=15) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


def test_the_sqlite_lock_is_held_while_its_file_is_open(
    tmp_path: Path, simulator: SimulatedGenAuth
) -> None:
    settings = runtime_settings(f"sqlite:///{tmp_path / 'monitor.db'}", simulator, tmp_path)
    held = lock_sqlite(settings)
    assert held is not None
    with pytest.raises(
        ConfigError, match=r"another genauth-monitor daemon is using .* \(pid \d+\)"
    ):
        lock_sqlite(settings)
    held.close()
    again = lock_sqlite(settings)
    assert again is not None
    again.close()


def test_run_refuses_a_sqlite_database_another_daemon_holds(
    tmp_path: Path, simulator: SimulatedGenAuth
) -> None:
    # The same config as the running daemon: its listen address is taken too, but the
    # database is what the message names.
    listening = socket.create_server(("127.0.0.1", 0))
    config = write_config(tmp_path, simulator, port=listening.getsockname()[1])
    settings = runtime_settings(f"sqlite:///{tmp_path / 'monitor.db'}", simulator, tmp_path)
    held = lock_sqlite(settings)  # what the running daemon holds
    try:
        result = run_main(
            "run", "-c", str(config), env={**ENV, "GM_TEST_SECRET": simulator.access_key_secret}
        )
    finally:
        assert held is not None
        held.close()
        listening.close()
    assert result.returncode == 2
    assert f"another genauth-monitor daemon is using {tmp_path / 'monitor.db'}" in result.stderr
    assert f"(pid {os.getpid()})" in result.stderr
    assert "server.listen" not in result.stderr


def _snapshots(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(text("SELECT count(*) FROM snapshots")).scalar_one())
    finally:
        engine.dispose()


@pytest.mark.slow
def test_a_replica_cut_off_from_the_database_records_nothing_twice(
    tmp_path: Path, postgres_url: str
) -> None:
    """Replica a loses its database (a black-holed path) but keeps polling and queueing; b
    takes the target over and records two changes; when a's path comes back, its queued
    sightings and changes collapse into what b recorded: fenced by the claim's epoch."""
    url = make_url(postgres_url)
    with FreezableProxy(url.host or "127.0.0.1", url.port or 5432) as proxy, simulators(1) as sims:
        cut_off = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        with replicas(tmp_path, sims, cut_off, ["rep-a"]) as (a,):
            wait_for(lambda: a.owned() == 1, what="a holds the target")
            with replicas(tmp_path, sims, postgres_url, ["rep-b"]) as (b,):
                wait_for(lambda: _events(postgres_url, "first_seen") == 1)
                assert b.owned() == 0
                proxy.freeze()
                wait_for(lambda: b.owned() == 1, timeout=30, what="b takes over after the lease")
                before = metric_value(
                    a.metrics(), "genauth_monitor_polls_total", target="t0", outcome="success"
                )
                data = sims[0].data
                data["enabled"] = False
                sims[0].set_data(data)
                wait_for(lambda: _events(postgres_url, "provider_disabled") == 1, timeout=15)
                wait_for(lambda: a.disabled("t0"), timeout=10, what="a saw it too")
                data["enabled"] = True
                sims[0].set_data(data)
                wait_for(lambda: _events(postgres_url, "provider_enabled") == 1, timeout=15)
                time.sleep(2)
                after = metric_value(
                    a.metrics(), "genauth_monitor_polls_total", target="t0", outcome="success"
                )
                assert before is not None and after is not None and after >= before + 3, (
                    "a keeps polling the target it held while its database is away"
                )
                proxy.thaw()
                wait_for(lambda: a.owned() == 0, timeout=30, what="a learns it lost the claim")
                time.sleep(3)  # a's queue is written, or dropped, by now
                assert _events(postgres_url, "provider_disabled") == 1
                assert _events(postgres_url, "provider_enabled") == 1
                assert _snapshots(postgres_url) == 3  # enabled, disabled, enabled again
                assert "claim lost" in a.log.read_text()
                for replica in (a, b):
                    replica.proc.send_signal(signal.SIGTERM)
                    assert replica.proc.wait(timeout=15) == 0
        verify = run_main("verify", "-c", str(tmp_path / "rep-b.toml"), env=ENV)
        assert verify.returncode == 0, verify.stdout + verify.stderr
