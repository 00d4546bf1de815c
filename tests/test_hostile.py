"""The real daemon process against a hostile upstream and a crawling sink: never blind, never
big, never stuck, and one sink never holds back another."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from monitor.simulator import SimulatedGenAuth
from tests.helpers import CLI, free_port, metric_value, scrape, wait_for
from tests.receiver import Receiver

SECRET = "Hostile-Access-Secret-314"
TARGETS = 100
RSS_LIMIT_MIB = 150


def _config(
    directory: Path, sim: SimulatedGenAuth, port: int, *, targets: int, extra: str = ""
) -> Path:
    lines = [
        "[monitor]",
        'interval = "1s"',
        'max_response_bytes = "1MiB"',
        'jitter = "0%"',
        'timeout = "2s"',
        "failure_threshold = 2",
        "[storage]",
        f'url = "sqlite:///{directory / "monitor.db"}"',
        "[server]",
        f'listen = "127.0.0.1:{port}"',
    ]
    for index in range(targets):
        lines += [
            "[[targets]]",
            f'name = "pool-{index:03d}"',
            f'base_url = "{sim.base_url}"',
            f'access_key_id = "{sim.access_key_id}"',
            'access_key_secret_env = "GM_TEST_SECRET"',
        ]
    path = directory / "genauth-monitor.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


@pytest.fixture
def hostile_sim() -> Iterator[SimulatedGenAuth]:
    with SimulatedGenAuth(access_key_id="hostile-pool", access_key_secret=SECRET) as sim:
        yield sim


class _Daemon:
    def __init__(self, config: Path, port: int, log: Path) -> None:
        env = {**os.environ, "GM_TEST_SECRET": SECRET}
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*CLI, "run", "-c", str(config), "--log-format", "json"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.base = f"http://127.0.0.1:{port}"
        self.log = log

    def metrics(self) -> str:
        return scrape(self.base, timeout=5)

    def value(self, name: str, **labels: str) -> float | None:
        return metric_value(self.metrics(), name, **labels)

    def peak_rss_mib(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024

    def stop(self) -> float:
        """SIGTERM; the seconds until the process was gone."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        return time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _failures(daemon: _Daemon, target: str, reason: str) -> float:
    return daemon.value("genauth_monitor_polls_total", target=target, outcome=reason) or 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "options", "reason", "targets"),
    [
        ("huge_body", {"size": 200 * 1024 * 1024}, "invalid_response", TARGETS),
        ("gzip_bomb", {"size": 200 * 1024 * 1024}, "invalid_response", TARGETS),
        ("endless", {}, "invalid_response", TARGETS),
        # A drip holds a poll worker for the whole deadline: with as many dripping targets as
        # the workers kept (10) each poll starts on time (more wait for the workers added one
        # per half second, see docs/operations.md).
        ("drip", {"delay": 0.3}, "timeout", 10),
        # Within the cap, valid, and as many Python objects per byte as JSON allows.
        ("dense_json", {"size": 1024 * 1024 - 1024}, "invalid_response", TARGETS),
    ],
)
def test_a_hostile_upstream_turns_up_to_0_in_time_and_stays_small(
    tmp_path: Path,
    hostile_sim: SimulatedGenAuth,
    fault: str,
    options: dict[str, float],
    reason: str,
    targets: int,
) -> None:
    port = free_port()
    daemon = _Daemon(
        _config(tmp_path, hostile_sim, port, targets=targets), port, tmp_path / "d.log"
    )
    try:
        wait_for(
            lambda: daemon.value("genauth_monitor_up", target=f"pool-{targets - 1:03d}") == 1,
            timeout=60,
            what="every target polled once",
        )
        hostile_sim.set_fault(fault, **options)  # type: ignore[arg-type]
        changed = time.monotonic()
        wait_for(
            lambda: (
                daemon.value("genauth_monitor_up", target="pool-000") == 0
                and _failures(daemon, "pool-000", reason) >= 1
            ),
            timeout=30,
            what=f"up = 0 with outcome {reason}",
        )
        # The next poll starts within the interval (1 s); it must fail within 2 x timeout.
        assert time.monotonic() - changed < 1 + 2 * 2 + 1.5
        time.sleep(4)  # every target meets the fault (some may wait for room in the budget)
        assert daemon.value("genauth_monitor_up", target=f"pool-{targets - 1:03d}") == 0
        peak = daemon.peak_rss_mib()
        print(f"peak RSS {peak:.0f} MiB after {fault}")
        assert peak < RSS_LIMIT_MIB, f"peak RSS {peak:.0f} MiB"
        # Nothing of the body is stored or logged.
        log = daemon.log.read_bytes()
        assert b"padding" not in log
        assert max(len(line) for line in log.splitlines()) < 4096
        assert (tmp_path / "monitor.db").stat().st_size < 5 * 1024 * 1024
        took = daemon.stop()
        assert daemon.proc.returncode == 0
        assert took < 5, f"SIGTERM took {took:.1f} s during {fault}"
    finally:
        daemon.kill()


@pytest.mark.slow
def test_sigterm_mid_read_stops_within_5_seconds(
    tmp_path: Path, hostile_sim: SimulatedGenAuth
) -> None:
    port = free_port()
    config = _config(tmp_path, hostile_sim, port, targets=3)
    config.write_text(config.read_text().replace('timeout = "2s"', 'timeout = "60s"'))
    daemon = _Daemon(config, port, tmp_path / "d.log")
    try:
        wait_for(lambda: daemon.value("genauth_monitor_up", target="pool-002") == 1, timeout=30)
        hostile_sim.set_fault("drip_headers", delay=1.0)
        time.sleep(3)  # every poll is now stuck reading headers, one byte a second
        took = daemon.stop()
        assert daemon.proc.returncode == 0
        assert took < 5, f"SIGTERM took {took:.1f} s"
    finally:
        daemon.kill()


@pytest.mark.slow
def test_a_crawling_sink_holds_back_no_other_sink(
    tmp_path: Path, hostile_sim: SimulatedGenAuth
) -> None:
    slow, good = Receiver(), Receiver()
    slow.drip = 2.0  # one byte of the answer every 2 s: "HTTP/1.1 200 OK..." takes a minute
    sinks = "".join(
        f'[[sinks]]\ntype = "webhook"\nname = "{name}"\nurl = "{receiver.url}"\ntimeout = "30s"\n'
        for name, receiver in (("slow", slow), ("good", good))
    )
    port = free_port()
    daemon = _Daemon(
        _config(tmp_path, hostile_sim, port, targets=1, extra=sinks), port, tmp_path / "d.log"
    )
    try:
        wait_for(lambda: [b["kind"] for b in good.bodies()] == ["first_seen"], timeout=30)
        data = hostile_sim.data
        data["enabled"] = False
        hostile_sim.set_data(data)

        def disabled() -> dict[str, object] | None:
            for body, at in zip(good.bodies(), good.received_at, strict=True):
                if body["kind"] == "provider_disabled":
                    return {"body": body, "received": at}
            return None

        found = wait_for(disabled, timeout=30, what="provider_disabled at the good sink")
        body = found["body"]
        assert isinstance(body, dict)
        event_at = _unix(str(body["at"]))
        assert float(str(found["received"])) - event_at < 1.0
        # The slow sink is still on its first row, and the gauge says so per sink.
        wait_for(
            lambda: daemon.value("genauth_monitor_outbox_pending", sink="good") == 0,
            timeout=5,
            what="the good sink's gauge at 0 (refreshed every second)",
        )
        metrics = daemon.metrics()
        assert (metric_value(metrics, "genauth_monitor_outbox_pending", sink="slow") or 0) >= 1
        totals = [
            line
            for line in metrics.splitlines()
            if line.startswith("genauth_monitor_outbox_pending ")
        ]
        assert len(totals) == 1 and float(totals[0].split()[1]) >= 1
        assert daemon.stop() < 5
    finally:
        daemon.kill()
        slow.stop()
        good.stop()


def _unix(text: str) -> float:
    from monitor.timeutil import parse_time_strict

    return parse_time_strict(text).timestamp()


def test_outbox_gauge_has_a_series_per_sink_and_a_total(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from monitor.metrics import Metrics

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.declare_sink("a")
    metrics.set_outbox_pending("a", 2)
    metrics.set_outbox_pending("b", 3)
    text = generate_latest(registry).decode()
    assert metric_value(text, "genauth_monitor_outbox_pending", sink="a") == 2
    assert metric_value(text, "genauth_monitor_outbox_pending", sink="b") == 3
    lines = [x for x in text.splitlines() if x.startswith("genauth_monitor_outbox_pending ")]
    assert lines == ["genauth_monitor_outbox_pending 5.0"]
    assert json.dumps(text)  # one exposition, parseable above
