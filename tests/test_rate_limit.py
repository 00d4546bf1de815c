"""``max_requests_per_second``: requests to one base_url from one process are spaced, and a
request that could only go after its deadline fails the poll as ``timeout`` at once."""

from __future__ import annotations

import time
from pathlib import Path

from monitor.app import build_runtime
from monitor.config import parse_settings
from monitor.ratelimit import RateLimit
from monitor.simulator import SimulatedGenAuth


def _settings(sim: SimulatedGenAuth, base: Path, rate: float, targets: int) -> object:
    return parse_settings(
        {
            "monitor": {"fingerprint_key_env": "FP", "max_requests_per_second": rate},
            "storage": {"url": f"sqlite:///{base / 'm.db'}"},
            "targets": [
                {
                    "name": f"t{i}",
                    "base_url": sim.base_url,
                    "access_key_id": sim.access_key_id,
                    "access_key_secret_env": "SECRET",
                }
                for i in range(targets)
            ],
        },
        base_dir=base,
        environ={"FP": "k", "SECRET": sim.access_key_secret},
    )


def test_targets_of_one_base_url_share_the_cap(tmp_path: Path) -> None:
    with SimulatedGenAuth() as sim:
        runtime = build_runtime(_settings(sim, tmp_path, 20, 3))  # type: ignore[arg-type]
        pollers = list(runtime.pollers.values())
        for poller in pollers:  # tokens fetched: from now on one request per poll
            assert poller.poll().ok
        sim.reset_counters()
        started = time.monotonic()
        for _ in range(4):
            for poller in pollers:
                assert poller.poll().ok
        took = time.monotonic() - started
        runtime.store.engine.dispose()
    assert sim.provider_requests == 12
    # 12 requests at 20 per second, shared by the three targets: at least 11 spacings.
    assert took >= 11 / 20 * 0.95, took


def test_a_request_that_cannot_go_before_its_deadline_is_refused_at_once() -> None:
    now = [100.0]
    limit = RateLimit(1.0, monotonic=lambda: now[0])
    assert limit.acquire(deadline=200.0)  # the first goes at once
    assert not limit.acquire(deadline=100.5), "its turn is at 101, after the deadline"
    now[0] = 101.0  # its turn has come: it goes without waiting
    assert limit.acquire(deadline=101.0)
