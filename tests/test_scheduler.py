"""Scheduling: immediate first poll, no overlap, backoff while failing."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from monitor.errors import UpstreamError
from monitor.genauth import GenAuthClient
from monitor.scheduler import PollScheduler, ScheduledTarget, _Job, backoff_delay
from monitor.service import PollResult
from monitor.simulator import SimulatedGenAuth


def test_backoff_doubles_caps_and_honours_retry_after() -> None:
    assert backoff_delay(interval=60, failures=0, cap=900) == 0
    assert backoff_delay(interval=60, failures=1, cap=900) == 60
    assert backoff_delay(interval=60, failures=2, cap=900) == 120
    assert backoff_delay(interval=60, failures=4, cap=900) == 480
    assert backoff_delay(interval=60, failures=30, cap=900) == 900
    assert backoff_delay(interval=60, failures=1, cap=900, retry_after=300) == 300
    assert backoff_delay(interval=1200, failures=3, cap=900) == 1200, "never below the interval"
    assert backoff_delay(interval=60, failures=1, cap=900, retry_after=3e8) == 900, "capped"


class _Poller:
    name = "p"

    def __init__(self, results: list[PollResult]) -> None:
        self.results = results
        self.calls = 0

    def poll(self) -> PollResult:
        self.calls += 1
        return self.results.pop(0)


def test_job_skips_runs_inside_the_backoff_window() -> None:
    now = [0.0]
    error = UpstreamError("http_status", "HTTP 503", http_status=503)
    failing = [PollResult("p", False, error=error, failures_in_a_row=n) for n in (1, 2, 3)]
    poller = _Poller([*failing] + [PollResult("p", True)] * 5)
    job = _Job(ScheduledTarget(poller, 10, 0), 1000, lambda: now[0])  # type: ignore[arg-type]
    fired = []
    for tick in range(0, 100, 10):  # the trigger fires every interval
        now[0] = tick
        before = poller.calls
        job()
        if poller.calls > before:
            fired.append(tick)
    # after failure 1: wait 10 (next tick), after 2: 20, after 3: 40; then every tick
    assert fired == [0, 10, 30, 70, 80, 90]


def test_job_never_cuts_retry_after_short() -> None:
    now = [0.0]
    error = UpstreamError("http_status", "HTTP 429", http_status=429, retry_after=25)
    poller = _Poller(
        [PollResult("p", False, error=error, failures_in_a_row=1)] + [PollResult("p", True)] * 5
    )
    job = _Job(ScheduledTarget(poller, 10, 0), 1000, lambda: now[0])  # type: ignore[arg-type]
    fired = []
    for tick in range(0, 60, 10):
        now[0] = tick
        before = poller.calls
        job()
        if poller.calls > before:
            fired.append(tick)
    assert fired == [0, 30, 40, 50]


class _Counting:
    """Wraps the real client to see whether two polls of one target ever overlap."""

    def __init__(self, client: GenAuthClient) -> None:
        self.client = client
        self.active = 0
        self.max_active = 0
        self.calls = 0
        self.lock = threading.Lock()

    def fetch_email_provider(self) -> dict[str, Any]:
        with self.lock:
            self.active += 1
            self.calls += 1
            self.max_active = max(self.max_active, self.active)
        try:
            return self.client.fetch_email_provider()
        finally:
            with self.lock:
                self.active -= 1


def test_scheduler_polls_at_once_and_never_overlaps(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from monitor.metrics import Metrics
    from monitor.service import TargetPoller
    from monitor.storage import Store, create_store_engine, upgrade
    from monitor.timeutil import utc_now

    engine = create_store_engine(f"sqlite:///{tmp_path / 's.db'}")
    upgrade(engine)
    with SimulatedGenAuth() as sim:
        fetcher = _Counting(
            GenAuthClient(
                base_url=sim.base_url,
                access_key_id=sim.access_key_id,
                access_key_secret=sim.access_key_secret,
                timeout=5,
            )
        )
        poller = TargetPoller(
            name="prod",
            fetcher=fetcher,
            store=Store(engine),
            metrics=Metrics(CollectorRegistry()),
            fingerprint_key=b"k",
            expect={},
            failure_threshold=3,
            clock=utc_now,
        )
        sim.set_fault("slow", delay=0.7)  # each poll takes longer than the interval
        scheduler = PollScheduler([ScheduledTarget(poller, 0.2, 0.0)], backoff_max=10)
        started = time.monotonic()
        scheduler.start()
        try:
            while fetcher.calls == 0 and time.monotonic() - started < 5:
                time.sleep(0.01)
            assert time.monotonic() - started < 1, "the first poll runs at once"
            time.sleep(2.0)
        finally:
            scheduler.shutdown()
    assert fetcher.max_active == 1
    assert 2 <= fetcher.calls <= 4, fetcher.calls  # missed runs coalesced, not queued
    engine.dispose()
