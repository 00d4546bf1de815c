"""APScheduler wiring: one job per target, never overlapping, with jitter and backoff."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from monitor.core.backoff import backoff
from monitor.service import PollResult, TargetPoller
from monitor.timeutil import utc_now

__all__ = ["PollScheduler", "ScheduledTarget", "backoff_delay"]

log = logging.getLogger("monitor.scheduler")

WATCH_EVERY = 0.5  # seconds between the watchdog's looks at the polls in flight


@dataclass(frozen=True, slots=True)
class ScheduledTarget:
    poller: TargetPoller
    interval: float
    jitter: float  # fraction of the interval


def backoff_delay(
    *, interval: float, failures: int, cap: float, retry_after: float | None = None
) -> float:
    """Seconds to wait after ``failures`` consecutive failures: the interval doubled per
    failure after the first, capped, but never shorter than the upstream's Retry-After."""
    if failures <= 0:
        return 0.0
    ceiling = max(cap, interval)
    delay = backoff(failures, first=interval, cap=ceiling)
    # An absurd Retry-After (a proxy's, or years ahead) must not stop polling: it is honoured
    # up to the backoff cap.
    return max(delay, min(retry_after or 0.0, ceiling))


class _Job:
    """The callable APScheduler runs for one target; skips runs inside a backoff window."""

    def __init__(self, target: ScheduledTarget, cap: float, monotonic: Callable[[], float]) -> None:
        self._target = target
        self._cap = cap
        self._monotonic = monotonic
        self._not_before = 0.0

    def __call__(self) -> None:
        if self._monotonic() < self._not_before:
            return
        try:
            result = self._target.poller.poll()
        except Exception:  # the daemon must outlive any bug in one poll
            log.exception("poll crashed", extra={"target": self._target.poller.name})
            return
        self._plan_next(result)

    def _plan_next(self, result: PollResult) -> None:
        if result.ok:
            self._not_before = 0.0
            return
        retry_after = result.error.retry_after if result.error is not None else None
        delay = backoff_delay(
            interval=self._target.interval,
            failures=result.failures_in_a_row,
            cap=self._cap,
            retry_after=retry_after,
        )
        # The job fires every interval, so the gate opens half an interval early to catch the
        # run at ``delay``; the upstream's Retry-After is never cut short.
        self._not_before = self._monotonic() + max(
            delay - self._target.interval * 0.5, min(retry_after or 0.0, delay)
        )


class PollScheduler:
    """Starts one interval job per target; the first poll runs at once (within the jitter)."""

    def __init__(
        self,
        targets: Sequence[ScheduledTarget],
        *,
        backoff_max: float,
        max_workers: int = 10,
        now: Callable[[], datetime] = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=max_workers)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone="UTC",
        )
        self._targets = list(targets)
        self._backoff_max = backoff_max
        self._now = now
        self._monotonic = monotonic
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return bool(self._scheduler.running)

    def _watch(self) -> None:
        """Count polls that overran their deadline as failed, whatever they are stuck in (a
        DNS lookup, a proxy): a poll can never keep ``up`` at 1 by not finishing. Its own
        thread, so that even a pool of stuck workers cannot stop it."""
        while not self._stop.wait(WATCH_EVERY):
            now = self._monotonic()
            for target in self._targets:
                if target.poller.expire_if_overdue(now):
                    log.warning(
                        "poll overran its deadline; counted as failed",
                        extra={"target": target.poller.name, "deadline_s": target.poller.deadline},
                    )

    def start(self) -> None:
        now = self._now()
        for target in self._targets:
            spread = target.interval * target.jitter
            self._scheduler.add_job(
                _Job(target, self._backoff_max, self._monotonic),
                IntervalTrigger(seconds=target.interval, jitter=spread or None),
                id=target.poller.name,
                name=f"poll {target.poller.name}",
                next_run_time=now + timedelta(seconds=random.uniform(0, min(spread, 5.0))),
            )
        self._scheduler.start()
        self._watchdog = threading.Thread(target=self._watch, name="poll-watchdog", daemon=True)
        self._watchdog.start()

    def shutdown(self) -> None:
        self._stop.set()
        if self._scheduler.running:
            # Do not wait for a poll in flight: the daemon aborts its HTTP requests, and its
            # outcome, if any, is written like any other.
            self._scheduler.shutdown(wait=False)
