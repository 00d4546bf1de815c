"""Scheduling: immediate first poll, no overlap, backoff while failing."""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from monitor.errors import UpstreamError
from monitor.genauth import GenAuthClient
from monitor.scheduler import PollScheduler, ScheduledTarget, SlotTrigger, _Job, backoff_delay
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


def _fire_times(poller: _Poller, *, interval: float, runs: int) -> list[float]:
    """Seconds (from the first) at which the job runs, stepping APScheduler's part by hand:
    the trigger's next slot, unless the job rescheduled itself."""
    origin = datetime(2026, 1, 1, tzinfo=UTC)
    clock = [origin]
    trigger = SlotTrigger(interval=interval, jitter=0.0, origin=origin, seed=0)
    moved: list[datetime] = []
    job = _Job(
        ScheduledTarget(poller, interval, 0),  # type: ignore[arg-type]
        trigger,
        1000,
        lambda _name, when: moved.append(when),
        {},
        lambda: clock[0],
    )
    fired = []
    for _ in range(runs):
        fired.append((clock[0] - origin).total_seconds())
        following = trigger.get_next_fire_time(clock[0], clock[0])
        job()
        assert following is not None
        clock[0] = moved.pop() if moved else following
    return fired


def test_a_failing_target_is_rescheduled_after_its_backoff() -> None:
    error = UpstreamError("http_status", "HTTP 503", http_status=503)
    failing = [PollResult("p", False, error=error, failures_in_a_row=n) for n in (1, 2, 3)]
    poller = _Poller([*failing] + [PollResult("p", True)] * 5)
    # after failure 1: wait 10 (next slot), after 2: 20, after 3: 40; then every slot
    assert _fire_times(poller, interval=10, runs=6) == [0, 10, 30, 70, 80, 90]


def test_job_never_cuts_retry_after_short() -> None:
    error = UpstreamError("http_status", "HTTP 429", http_status=429, retry_after=25)
    poller = _Poller(
        [PollResult("p", False, error=error, failures_in_a_row=1)] + [PollResult("p", True)] * 5
    )
    assert _fire_times(poller, interval=10, runs=4) == [0, 30, 40, 50]


def test_jitter_spreads_runs_around_their_slots_and_never_adds_up() -> None:
    origin = datetime(2026, 1, 1, tzinfo=UTC)
    trigger = SlotTrigger(interval=60, jitter=0.1, origin=origin, seed=3)
    fire: datetime | None = origin
    times = []
    for _ in range(1000):
        assert fire is not None
        times.append((fire - origin).total_seconds())
        fire = trigger.get_next_fire_time(fire, fire)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert abs(statistics.mean(gaps) - 60) < 0.05, "the mean period is the interval"
    assert max(abs(t - 60 * k) for k, t in enumerate(times[1:], 1)) <= 3.0, "within the slot"
    assert statistics.pstdev(gaps) > 1, "runs are spread"


class _Idle:
    """A poller that is never due to be watched (the tests look at schedules only)."""

    deadline = 20.0

    def __init__(self, name: str) -> None:
        self.name = name

    def poll(self) -> PollResult:
        return PollResult(self.name, True)

    def expire_if_overdue(self, now: float) -> bool:
        return False


def _seconds_after(start: datetime, run_time: datetime | None) -> float:
    assert run_time is not None, "every target is scheduled"
    return (run_time - start).total_seconds()


def test_first_polls_spread_over_the_interval_at_most_30_seconds() -> None:
    now = datetime.now(UTC) + timedelta(hours=1)  # nothing runs during the test
    targets = [
        ScheduledTarget(_Idle(f"t{i}"), 60, 0.1)  # type: ignore[arg-type]
        for i in range(100)
    ]
    scheduler = PollScheduler(targets, backoff_max=900, now=lambda: now)
    scheduler.start()
    try:
        firsts = sorted(_seconds_after(now, t) for t in scheduler.next_run_times().values())
    finally:
        scheduler.shutdown()
    assert firsts[0] == 0 and 29 < firsts[-1] < 30
    gaps = [b - a for a, b in itertools.pairwise(firsts)]
    assert max(gaps) - min(gaps) < 0.01, "no burst, no gap"


class _Stuck:
    """A poller whose poll hangs until released; it counts the watchdog's looks at it."""

    deadline = 0.2

    def __init__(self, name: str) -> None:
        self.name = name
        self.release = threading.Event()
        self.started: float | None = None
        self.looks = 0
        self.expired = threading.Event()

    def poll(self) -> PollResult:
        self.started = time.monotonic()
        self.release.wait(10)
        return PollResult(self.name, True)

    def expire_if_overdue(self, now: float) -> bool:
        self.looks += 1
        if self.started is None or now - self.started < self.deadline or self.expired.is_set():
            return False
        self.expired.set()
        return True


def test_the_watchdog_fails_a_stuck_poll_and_looks_only_at_polls_in_flight() -> None:
    stuck = _Stuck("stuck")
    idle = _Stuck("idle")  # due in an hour: never in flight, so never looked at
    now = datetime.now(UTC)
    scheduler = PollScheduler(
        [ScheduledTarget(stuck, 3600, 0), ScheduledTarget(idle, 3600, 0)],  # type: ignore[arg-type]
        backoff_max=900,
        now=lambda: now,
    )
    scheduler.start()
    try:
        assert stuck.expired.wait(5), "the stuck poll was counted as failed"
    finally:
        stuck.release.set()
        scheduler.shutdown()
    assert idle.started is None and idle.looks == 0, (
        "a target not polling costs the watchdog nothing"
    )


def test_a_wall_clock_jump_moves_every_schedule_along() -> None:
    wall = [datetime.now(UTC) + timedelta(hours=1)]
    target = ScheduledTarget(_Idle("t0"), 60, 0)  # type: ignore[arg-type]
    scheduler = PollScheduler([target], backoff_max=900, now=lambda: wall[0])
    scheduler.start()
    try:
        before = scheduler.next_run_times()["t0"]
        assert before is not None
        scheduler.shift(timedelta(days=-1))  # the clock was set back a day
        after = scheduler.next_run_times()["t0"]
        assert after == before - timedelta(days=1), "as far ahead in real time as before"
        trigger = scheduler.triggers["t0"]
        assert trigger.get_next_fire_time(after, after) == after + timedelta(seconds=60)
    finally:
        scheduler.shutdown()


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
