"""Scheduling: immediate first poll, no overlap, backoff while failing."""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from monitor.errors import UpstreamError
from monitor.genauth import GenAuthClient
from monitor.scheduler import (
    PollScheduler,
    ScheduledTarget,
    SlotTrigger,
    backoff_delay,
    next_run,
)
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
    """Seconds (from the first) at which the target polls, each poll taking no time."""
    origin = datetime(2026, 1, 1, tzinfo=UTC)
    clock = origin
    trigger = SlotTrigger(interval=interval, jitter=0.0, origin=origin, seed=0)
    fired = []
    for _ in range(runs):
        fired.append((clock - origin).total_seconds())
        clock = next_run(trigger, poller.poll(), fired=clock, now=clock, cap=1000)
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


def test_slots_missed_while_a_poll_hung_are_polled_once_not_once_each() -> None:
    origin = datetime(2026, 1, 1, tzinfo=UTC)
    trigger = SlotTrigger(interval=10, jitter=0.0, origin=origin, seed=0)
    ended = origin + timedelta(seconds=55)  # the poll of slot 0 hung through slots 1 to 5
    following = next_run(trigger, PollResult("p", True), fired=origin, now=ended, cap=1000)
    assert following == origin + timedelta(seconds=60), "on the grid, the missed slots skipped"
    after = next_run(trigger, PollResult("p", True), fired=following, now=following, cap=1000)
    assert after == origin + timedelta(seconds=70)


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


def _seconds_after(start: datetime, run_time: datetime | None) -> float:
    assert run_time is not None, "every target is scheduled"
    return (run_time - start).total_seconds()


def _scheduled(
    pollers: list[_Stuck], interval: float, now: Callable[[], datetime], *, jitter: float = 0.1
) -> PollScheduler:
    targets = [ScheduledTarget(poller, interval, jitter) for poller in pollers]  # type: ignore[arg-type]
    return PollScheduler(targets, backoff_max=900, now=now)


def test_first_polls_spread_over_the_interval_at_most_30_seconds() -> None:
    # The clock stands still: the first target is due at once and hangs, so it stays at its
    # first run; no other is ever due.
    now = datetime.now(UTC)
    pollers = [_Stuck(f"t{i}") for i in range(100)]
    scheduler = _scheduled(pollers, 60, lambda: now)
    scheduler.start()
    try:
        firsts = sorted(_seconds_after(now, t) for t in scheduler.next_run_times().values())
    finally:
        scheduler.shutdown()
        for poller in pollers:
            poller.release.set()
    assert firsts[0] == 0 and 29 < firsts[-1] < 30
    gaps = [b - a for a, b in itertools.pairwise(firsts)]
    assert max(gaps) - min(gaps) < 0.01, "no burst, no gap"


def test_the_watchdog_fails_a_stuck_poll_and_looks_only_at_polls_in_flight() -> None:
    stuck = _Stuck("stuck")
    idle = _Stuck("idle")  # due in 15 s of a clock that stands still: never in flight
    now = datetime.now(UTC)
    scheduler = _scheduled([stuck, idle], 3600, lambda: now)
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
    wall = datetime.now(UTC)
    polling, waiting = _Stuck("t0"), _Stuck("t1")  # t0 polls (and hangs) at once, t1 in 15 s
    scheduler = _scheduled([polling, waiting], 30, lambda: wall, jitter=0)
    scheduler.start()
    try:
        before = scheduler.next_run_times()
        scheduler.shift(timedelta(days=-1))  # the clock was set back a day
        after = scheduler.next_run_times()
        assert after == {name: at - timedelta(days=1) for name, at in before.items()}, (
            "as far ahead in real time as before"
        )
        trigger = scheduler.triggers["t1"]
        at = after["t1"]
        assert trigger.get_next_fire_time(at, at) - at == timedelta(seconds=30)
    finally:
        scheduler.shutdown()
        polling.release.set()


class _Ticking:
    """A poller that records when it polls and can be made to hang."""

    deadline = 20.0

    def __init__(self, name: str, *, hang: bool = False, work: float = 0.0) -> None:
        self.name = name
        self.work = work
        self.hang = threading.Event()
        if hang:
            self.hang.set()
        self.release = threading.Event()
        self.times: list[float] = []
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()

    def poll(self) -> PollResult:
        with self.lock:
            self.times.append(time.monotonic())
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.hang.is_set():
                self.release.wait(10)
            time.sleep(self.work)
            return PollResult(self.name, True)
        finally:
            with self.lock:
                self.active -= 1

    def expire_if_overdue(self, now: float) -> bool:
        return False


def test_a_hung_poll_holds_up_no_other_target() -> None:
    hung = _Ticking("hung", hang=True)
    others = [_Ticking(f"t{i}", work=0.25) for i in range(4)]
    # Three workers: the hung poll keeps one; the other two, polling at once, keep the rest on
    # time (one alone could not: 4 x 0.25 s of polls per 0.5 s).
    targets = [ScheduledTarget(p, 0.5, 0.0) for p in [hung, *others]]  # type: ignore[arg-type]
    scheduler = PollScheduler(targets, backoff_max=10, max_workers=3)
    scheduler.start()
    try:
        time.sleep(3)
    finally:
        scheduler.shutdown()
        hung.release.set()
    assert len(hung.times) == 1
    for poller in others:
        assert len(poller.times) >= 5, (poller.name, len(poller.times))
        assert max(b - a for a, b in itertools.pairwise(poller.times)) < 0.75


def test_a_target_held_anew_while_polling_never_polls_twice_at_once() -> None:
    poller = _Ticking("prod", hang=True)
    target = ScheduledTarget(poller, 0.2, 0.0)  # type: ignore[arg-type]
    scheduler = PollScheduler([target], backoff_max=10, claimed=True)
    scheduler.start()
    try:
        now = datetime.now(UTC)
        scheduler.hold("prod", not_before=now, skew=timedelta(0))
        deadline = time.monotonic() + 2
        while not poller.times and time.monotonic() < deadline:
            time.sleep(0.01)
        assert poller.times, "held: polled"
        scheduler.hold("prod", not_before=now, skew=timedelta(0))  # replaced mid-poll
        time.sleep(0.6)  # three slots of the new entry pass while the old poll hangs
        assert poller.max_active == 1 and len(poller.times) == 1
        poller.hang.clear()
        poller.release.set()
        time.sleep(0.5)
        assert len(poller.times) >= 2, "polled again once the hung poll ended"
        scheduler.drop("prod")
        time.sleep(0.3)  # a poll in flight when dropped ends; then nothing
        dropped = len(poller.times)
        time.sleep(0.5)
    finally:
        scheduler.shutdown()
        poller.release.set()
    assert poller.max_active == 1
    assert len(poller.times) == dropped, "dropped: never polled again"


def test_a_target_held_earlier_than_the_next_run_wakes_the_scheduler() -> None:
    late, early = _Ticking("late"), _Ticking("early")
    # `early` held soon: its first poll within its 1 s interval.
    targets = [ScheduledTarget(late, 3600, 0.0), ScheduledTarget(early, 1, 0.0)]  # type: ignore[arg-type]
    scheduler = PollScheduler(targets, backoff_max=10, claimed=True)
    scheduler.start()
    try:
        now = datetime.now(UTC)
        scheduler.hold("late", not_before=now + timedelta(minutes=30), skew=timedelta(0))
        time.sleep(0.2)  # the leader now sleeps for half an hour
        held = time.monotonic()
        scheduler.hold("early", not_before=datetime.now(UTC), skew=timedelta(0), soon=True)
        expected = scheduler.next_run_times()["early"]
        wait = (expected - datetime.now(UTC)).total_seconds()
        deadline = time.monotonic() + wait + 2
        while not early.times and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        scheduler.shutdown()
    assert early.times and early.times[0] - held < wait + 1, "polled on time"
    assert not late.times


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


class _Garbled(_Ticking):
    """A poller whose poll returns what is not a PollResult (a bug of its own)."""

    def poll(self) -> PollResult:
        super().poll()
        return "not a result"  # type: ignore[return-value]


def test_a_result_the_scheduler_cannot_read_keeps_the_target_on_its_grid() -> None:
    poller = _Garbled("prod")
    target = ScheduledTarget(poller, 0.2, 0.0)  # type: ignore[arg-type]
    scheduler = PollScheduler([target], backoff_max=10, max_workers=1)
    scheduler.start()
    try:
        time.sleep(1.1)
        assert scheduler.running, "its worker lives on"
    finally:
        scheduler.shutdown()
    assert len(poller.times) >= 4, len(poller.times)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_scheduler_whose_threads_died_is_not_running() -> None:
    calls = [0]

    def failing_clock() -> datetime:
        calls[0] += 1
        if calls[0] > 3:
            raise RuntimeError("the clock broke")
        return datetime.now(UTC)

    poller = _Ticking("prod")
    scheduler = PollScheduler(
        [ScheduledTarget(poller, 0.2, 0.0)],  # type: ignore[arg-type]
        backoff_max=10,
        max_workers=2,
        now=failing_clock,
    )
    scheduler.start()
    try:
        deadline = time.monotonic() + 3
        while scheduler.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not scheduler.running, "/readyz must see it"
    finally:
        scheduler.shutdown()


def _pool(pollers: Sequence[_Ticking], interval: float, **options: Any) -> PollScheduler:
    """A scheduler of ``pollers`` whose pool may grow; the process never busy with the CPU
    unless ``cpu_time`` says otherwise."""
    targets = [ScheduledTarget(p, interval, 0.0) for p in pollers]  # type: ignore[arg-type]
    return PollScheduler(targets, backoff_max=10, **{"cpu_time": lambda: 0.0, **options})


def _hung_and_quick() -> tuple[list[_Ticking], _Ticking]:
    return [_Ticking(f"hung{i}", hang=True) for i in range(3)], _Ticking("quick")


def test_workers_are_added_while_every_one_polls_and_end_once_idle() -> None:
    hung, quick = _hung_and_quick()
    scheduler = _pool(
        [*hung, quick], 0.2, min_workers=1, max_workers=4, idle_exit=0.3, grow_every=0.05
    )
    scheduler.start()
    try:
        # Added by the watchdog, one per look once it knows the CPU (0.5 s): the fourth at
        # about 1.5 s.
        time.sleep(3.0)
        peak = scheduler.workers
        # The three hung polls hold three workers; a fourth, the last allowed, polls the quick
        # target on time.
        assert peak == 4, peak
        assert sum(len(p.times) for p in hung) == 3
        assert len(quick.times) >= 5
        assert max(b - a for a, b in itertools.pairwise(quick.times[1:])) < 0.45
        for poller in hung:
            poller.hang.clear()
            poller.release.set()
        # Unhung, the four targets need about one worker: the others end once idle 0.3 s.
        wait_until = time.monotonic() + 5
        while scheduler.workers > 2 and time.monotonic() < wait_until:
            time.sleep(0.05)
        assert scheduler.workers <= 2, scheduler.workers
        assert scheduler.running
    finally:
        scheduler.shutdown()
        for poller in hung:
            poller.release.set()


def test_no_worker_is_added_while_the_process_is_busy_with_the_cpu() -> None:
    hung = _Ticking("hung", hang=True)
    quick = _Ticking("quick")
    # A whole core, all the time: more threads would not help.
    scheduler = _pool([hung, quick], 0.2, min_workers=1, max_workers=4, cpu_time=time.monotonic)
    scheduler.start()
    try:
        time.sleep(1.5)
        assert scheduler.workers == 1
        assert not quick.times, "it waits for the one worker"
    finally:
        scheduler.shutdown()
        hung.release.set()


def test_workers_are_added_one_at_a_time() -> None:
    # A backlog (a process resumed after a stop) finds every worker busy at once: workers are
    # added one per `grow_every`, so the CPU rule can look before the pool is at its largest.
    hung = [_Ticking(f"hung{i}", hang=True) for i in range(8)]
    scheduler = _pool(hung, 0.1, min_workers=1, max_workers=10, grow_every=0.4)
    scheduler.start()
    try:
        time.sleep(1.1)  # the CPU known at 0.5 s: one worker then, one at 0.9 s
        assert 2 <= scheduler.workers <= 3, scheduler.workers
    finally:
        scheduler.shutdown()
        for poller in hung:
            poller.release.set()


def test_idle_workers_at_the_minimum_stay_ready_to_lead() -> None:
    # Grown past the minimum, then idle: the extra workers end, and those at the minimum, whose
    # timed waits ran out as well, stay listed as followers once each, so a hand-off finds one.
    hung, quick = _hung_and_quick()
    scheduler = _pool(
        [*hung, quick], 0.1, min_workers=3, max_workers=5, idle_exit=0.2, grow_every=0.05
    )
    scheduler.start()
    try:
        wait_until = time.monotonic() + 5
        while scheduler.workers < 5 and time.monotonic() < wait_until:
            time.sleep(0.05)
        assert scheduler.workers == 5
        for poller in hung:
            poller.hang.clear()
            poller.release.set()
        time.sleep(1.5)  # several idle waits run out, at the minimum too
        assert scheduler.workers == 3
        with scheduler._lock:
            followers = list(scheduler._followers)
        assert len({id(f) for f in followers}) == len(followers) <= 2, len(followers)
        # A hand-off still works: one target hangs, the others are polled on time.
        hung[0].hang.set()
        hung[0].release.clear()
        time.sleep(0.3)
        before = len(quick.times)
        time.sleep(1.0)
        assert len(quick.times) - before >= 7, len(quick.times) - before
    finally:
        scheduler.shutdown()
        for poller in hung:
            poller.release.set()


def test_no_worker_is_added_while_nothing_is_due() -> None:
    hung = _Ticking("hung", hang=True)  # due at once, holds the one worker
    later = _Ticking("later")  # due in 15 s
    scheduler = _pool([hung, later], 3600, min_workers=1, max_workers=4)
    scheduler.start()
    try:
        time.sleep(1.6)  # three looks of the watchdog
        assert scheduler.workers == 1
    finally:
        scheduler.shutdown()
        hung.release.set()


class _BadWatch(_Ticking):
    """A poller whose deadline check raises (a bug of its own)."""

    def expire_if_overdue(self, now: float) -> bool:
        raise RuntimeError("broken deadline check")


def test_the_watchdog_outlives_a_bug_in_what_it_watches() -> None:
    poller = _BadWatch("prod", hang=True)
    target = ScheduledTarget(poller, 1, 0.0)  # type: ignore[arg-type]
    scheduler = PollScheduler([target], backoff_max=10)
    scheduler.start()
    try:
        time.sleep(1.2)  # two looks of the watchdog, each raising
        assert scheduler.running, "the watchdog goes on: readiness depends on it"
    finally:
        scheduler.shutdown()
        poller.release.set()
