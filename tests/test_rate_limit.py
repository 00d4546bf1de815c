"""``max_requests_per_second``: requests to one base_url from one process are spaced, and a
request that could only go after its deadline fails the poll as ``timeout`` at once."""

from __future__ import annotations

import time
from pathlib import Path

from monitor.app import build_runtime
from monitor.ratelimit import RateLimit
from monitor.simulator import SimulatedGenAuth
from tests.helpers import runtime_settings


def _settings(sim: SimulatedGenAuth, base: Path, rate: float, targets: int) -> object:
    return runtime_settings(
        f"sqlite:///{base / 'm.db'}",
        sim,
        base,
        monitor={"max_requests_per_second": rate},
        names=[f"t{i}" for i in range(targets)],
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
