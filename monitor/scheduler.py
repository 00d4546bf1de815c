"""APScheduler wiring: one job per target on a grid of slots, never overlapping, with jitter
and backoff.

Each target polls once per **slot**: slot ``k`` is ``origin + k * interval``, and its run is
placed at a random offset within ``+- jitter * interval / 2`` of the slot. Jitter spreads the
runs and never adds up, so the mean period is exactly ``interval``. The origins of the targets
are spread over ``min(interval, 30 s)`` from start, so many targets never poll in one burst.

After a failed poll the job is rescheduled to the first slot at or after its backoff (SPEC §3:
retried with backoff); a success returns it to every slot. A watchdog thread fails polls past
their deadline (:meth:`TargetPoller.expire_if_overdue`), and moves every schedule along when
the wall clock jumps, so a clock set back by a day never stops polling for a day.

With replicas (``claimed=True``, :mod:`monitor.cluster`) no target is scheduled at start: the
cluster calls :meth:`~PollScheduler.hold` for each target this replica claims and
:meth:`~PollScheduler.drop` for each it gives up. Their grids are then the same on every
replica: the phase of a target's slots comes from a hash of its name, on the database's clock
(local time minus the measured skew), and so do the jitter offsets, so a target handed over
keeps its slots and is polled once per interval across the handover.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger

from monitor.core.backoff import backoff
from monitor.service import PollResult, TargetPoller
from monitor.timeutil import utc_now

__all__ = ["PollScheduler", "ScheduledTarget", "SlotTrigger", "backoff_delay", "shared_grid"]

log = logging.getLogger("monitor.scheduler")

WATCH_EVERY = 0.5  # seconds between the watchdog's looks at the polls in flight
FIRST_SPREAD_MAX = 30.0  # the first polls of all targets are spread over at most this
CLOCK_JUMP = 5.0  # seconds of difference between wall and monotonic time that count as a jump


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


class SlotTrigger(BaseTrigger):  # type: ignore[misc]  # APScheduler has no types
    """Fires once per slot ``origin + k * interval``, each run offset at random within
    ``+- jitter * interval / 2`` of its slot, and never before ``not_before``."""

    __slots__ = ("interval", "jitter", "not_before", "origin", "seed")

    def __init__(self, *, interval: float, jitter: float, origin: datetime, seed: int) -> None:
        self.interval = interval
        self.jitter = min(max(jitter, 0.0), 1.0)
        self.origin = origin
        self.seed = seed
        self.not_before: datetime | None = None

    def slot_time(self, k: int) -> datetime:
        """When slot ``k`` runs: its place on the grid plus its own fixed offset."""
        offset = 0.0
        if self.jitter:
            offset = _unit(self.seed * 1_000_003 + k) - 0.5
        return self.origin + timedelta(seconds=self.interval * (k + offset * self.jitter))

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        after = previous_fire_time or (self.origin - timedelta(seconds=self.interval))
        # Far behind (a process stopped for a while): missed slots are coalesced anyway, so
        # start from the last one instead of stepping through each.
        after = max(after, now - timedelta(seconds=self.interval))
        floor = self.not_before
        # The slot after `after` (offsets stay within half an interval of their slot).
        k = math.floor((after - self.origin).total_seconds() / self.interval + 0.5) + 1
        if floor is not None and floor > after:
            k = max(k, math.floor((floor - self.origin).total_seconds() / self.interval) - 1)
        while True:
            fire = self.slot_time(k)
            if fire > after and (floor is None or fire >= floor):
                return fire
            k += 1

    def shift(self, delta: timedelta) -> None:
        """Move the grid with the wall clock (it jumped by ``delta``)."""
        self.origin += delta
        if self.not_before is not None:
            self.not_before += delta

    def __getstate__(self) -> dict[str, Any]:  # APScheduler's interface (job stores)
        return {name: getattr(self, name) for name in self.__slots__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    def __repr__(self) -> str:
        return f"SlotTrigger(interval={self.interval:g}s, jitter={self.jitter:g})"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_GOLDEN: Final = 0x9E3779B97F4A7C15  # 2**64 / golden ratio, odd: Fibonacci hashing


def _unit(n: int) -> float:
    """A fixed pseudo-random number in [0, 1) for ``n``, the same in every process (each
    replica must place a slot where the others do); a multiply where a seeded
    ``random.Random`` cost more than the rest of the trigger."""
    mixed = (n * _GOLDEN) & 0xFFFF_FFFF_FFFF_FFFF
    mixed ^= mixed >> 29
    mixed = (mixed * _GOLDEN) & 0xFFFF_FFFF_FFFF_FFFF
    return (mixed >> 11) / 2**53


def shared_grid(name: str, interval: float, skew: timedelta) -> tuple[datetime, int]:
    """The origin (local time) and jitter seed of target ``name``'s slots as every replica
    computes them: slot ``k`` at database time ``k * interval + phase``, the phase a stable
    hash of the name within the interval; local time is database time plus ``skew``."""
    seed = zlib.crc32(name.encode())
    phase = interval * seed / 2**32
    return _EPOCH + skew + timedelta(seconds=phase), seed


def _first_spread(interval: float) -> float:
    """Seconds over which the first polls are spread."""
    return min(interval, FIRST_SPREAD_MAX)


class _Job:
    """The callable APScheduler runs for one target; after a failure it moves its own next
    run to the first slot after the backoff."""

    def __init__(
        self,
        target: ScheduledTarget,
        trigger: SlotTrigger,
        cap: float,
        reschedule: Callable[[str, datetime], None],
        running: dict[str, TargetPoller],
        now: Callable[[], datetime] = utc_now,
    ) -> None:
        self._target = target
        self._trigger = trigger
        self._cap = cap
        self._reschedule = reschedule
        self._running = running
        self._now = now

    def __call__(self) -> None:
        poller = self._target.poller
        # For the watchdog, which then looks at the polls in flight only, not at every target.
        self._running[poller.name] = poller
        try:
            result = poller.poll()
        except Exception:  # poll() turns its own bugs into failed polls; this is the last net
            log.exception("poll crashed", extra={"target": poller.name})
            return
        finally:
            self._running.pop(poller.name, None)
        self._plan_next(result)

    def _plan_next(self, result: PollResult) -> None:
        trigger = self._trigger
        if result.ok:
            trigger.not_before = None
            return
        retry_after = result.error.retry_after if result.error is not None else None
        interval = self._target.interval
        delay = backoff_delay(
            interval=interval,
            failures=result.failures_in_a_row,
            cap=self._cap,
            retry_after=retry_after,
        )
        # Half an interval of slack lets the slot at `delay` through although this poll took
        # a moment; the upstream's Retry-After is never cut short.
        wait = max(delay - interval * 0.5, min(retry_after or 0.0, delay))
        now = self._now()
        trigger.not_before = now + timedelta(seconds=wait)
        following = trigger.get_next_fire_time(now, now)
        assert following is not None
        self._reschedule(self._target.poller.name, following)


class PollScheduler:
    """One slot-trigger job per target; the first polls spread over min(interval, 30 s)."""

    def __init__(
        self,
        targets: Sequence[ScheduledTarget],
        *,
        backoff_max: float,
        max_workers: int = 10,
        now: Callable[[], datetime] = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
        claimed: bool = False,
    ) -> None:
        self._claimed = claimed
        self._by_name = {target.poller.name: target for target in targets}
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
        self.triggers: dict[str, SlotTrigger] = {}
        # The pollers whose poll is running now, by name (set and cleared by their jobs).
        self._running: dict[str, TargetPoller] = {}

    @property
    def running(self) -> bool:
        return bool(self._scheduler.running)

    def start(self) -> None:
        now = self._now()
        count = len(self._targets)
        for index, target in enumerate([] if self._claimed else self._targets):
            name = target.poller.name
            # Evenly spread first polls: index / count of the spread window.
            first = now + timedelta(seconds=_first_spread(target.interval) * index / count)
            trigger = SlotTrigger(
                interval=target.interval, jitter=target.jitter, origin=first, seed=index
            )
            self.triggers[name] = trigger
            self._scheduler.add_job(
                _Job(
                    target, trigger, self._backoff_max, self._reschedule, self._running, self._now
                ),
                trigger,
                id=name,
                name=f"poll {name}",
                next_run_time=first,
            )
        self._scheduler.start()
        self._watchdog = threading.Thread(target=self._watch, name="poll-watchdog", daemon=True)
        self._watchdog.start()

    def hold(self, name: str, *, not_before: datetime, skew: timedelta, soon: bool = False) -> None:
        """Poll ``name`` from its first shared slot at or after ``not_before`` (local time);
        ``soon`` (never polled, or overdue): first within min(interval, 30 s) of now, at a
        place of its own in that window, then on the shared slots."""
        target = self._by_name[name]
        origin, seed = shared_grid(name, target.interval, skew)
        trigger = SlotTrigger(
            interval=target.interval, jitter=target.jitter, origin=origin, seed=seed
        )
        trigger.not_before = not_before
        now = self._now()
        first = trigger.get_next_fire_time(None, now)
        if soon:
            spread = _first_spread(target.interval) * seed / 2**32
            first = max(now, not_before) + timedelta(seconds=spread)
        self.triggers[name] = trigger
        self._scheduler.add_job(
            _Job(target, trigger, self._backoff_max, self._reschedule, self._running, self._now),
            trigger,
            id=name,
            name=f"poll {name}",
            next_run_time=first,
            replace_existing=True,
        )

    def drop(self, name: str) -> None:
        """Poll ``name`` no more (a poll in flight finishes; its outcome is recorded)."""
        self.triggers.pop(name, None)
        with contextlib.suppress(JobLookupError):
            self._scheduler.remove_job(name)

    def _reschedule(self, name: str, when: datetime) -> None:
        if self._scheduler.running:
            # Dropped while its poll ran: another replica has it now.
            with contextlib.suppress(JobLookupError):
                self._scheduler.modify_job(name, next_run_time=when)

    def next_run_times(self) -> dict[str, datetime | None]:
        return {job.id: job.next_run_time for job in self._scheduler.get_jobs()}

    def shift(self, delta: timedelta) -> None:
        """The wall clock jumped by ``delta``: move every grid and next run along with it, so
        each target's next poll stays as far ahead in real time as it was."""
        for job in self._scheduler.get_jobs():
            trigger = self.triggers.get(job.id)
            if trigger is not None:
                trigger.shift(delta)
            if job.next_run_time is not None:
                job.modify(next_run_time=job.next_run_time + delta)
        self._scheduler.wakeup()

    def _watch(self) -> None:
        """Count polls that overran their deadline as failed, whatever they are stuck in (a
        DNS lookup, a proxy), and follow jumps of the wall clock. Its own thread, so that even
        a pool of stuck workers cannot stop it."""
        wall, mono = self._now(), self._monotonic()
        while not self._stop.wait(WATCH_EVERY):
            now = self._monotonic()
            for poller in list(self._running.values()):
                if poller.expire_if_overdue(now):
                    log.warning(
                        "poll overran its deadline; counted as failed",
                        extra={"target": poller.name, "deadline_s": poller.deadline},
                    )
            wall_now = self._now()
            jump = (wall_now - wall).total_seconds() - (now - mono)
            wall, mono = wall_now, now
            if abs(jump) > CLOCK_JUMP:
                log.warning("wall clock jumped; schedules follow", extra={"seconds": round(jump)})
                self.shift(timedelta(seconds=jump))

    def shutdown(self) -> None:
        self._stop.set()
        if self._scheduler.running:
            # Do not wait for a poll in flight: the daemon aborts its HTTP requests, and its
            # outcome, if any, is written like any other.
            self._scheduler.shutdown(wait=False)
