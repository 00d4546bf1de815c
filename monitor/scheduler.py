"""The poll scheduler: every target on a grid of slots, never overlapping, with jitter and
backoff, run by a few worker threads over one heap of next runs.

Each target polls once per **slot**: slot ``k`` is ``origin + k * interval``, and its run is
placed at a random offset within ``+- jitter * interval / 2`` of the slot. Jitter spreads the
runs and never adds up, so the mean period is exactly ``interval``. The origins of the targets
are spread over ``min(interval, 30 s)`` from start, so many targets never poll in one burst.
Missed slots (a process stopped, a poll longer than its interval) are coalesced: a target is
polled once for them, never once per slot, and two polls of one target never overlap.

After a failed poll the target waits for the first slot at or after its backoff (SPEC §3:
retried with backoff); a success returns it to every slot. A watchdog thread fails polls past
their deadline (:meth:`TargetPoller.expire_if_overdue`), and moves every schedule along when
the wall clock jumps, so a clock set back by a day never stops polling for a day.

How it runs: leader and followers over one heap. One idle worker, the leader, sleeps until the
earliest next run; when it is due it takes that target, hands the lead to another idle worker
(the one that went idle last: its thread is the warmest, and a light load keeps to a few
threads) and polls. So whichever worker is free takes the next due target (one hung upstream
never holds up the others behind it), and each poll costs one wake-up and one hand-off. The
pool grows: when a run is due and every worker polls (slow upstreams), one more starts, up to
``max_workers``, unless the process is busy with the CPU; one idle long beyond
``min_workers`` ends. This replaced APScheduler, whose scheduler thread, job store and
executor futures cost twice the CPU per poll (``bench/scheduling.py``: 138 against 69 µs,
more than the poll's own work besides HTTP; ``docs/benchmarks.md``).

With replicas (``claimed=True``, :mod:`monitor.cluster`) no target is scheduled at start: the
cluster calls :meth:`~PollScheduler.hold` for each target this replica claims and
:meth:`~PollScheduler.drop` for each it gives up. Their grids are then the same on every
replica: the phase of a target's slots comes from a hash of its name, on the database's clock
(local time minus the measured skew), and so do the jitter offsets, so a target handed over
keeps its slots and is polled once per interval across the handover.
"""

from __future__ import annotations

import heapq
import logging
import math
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from monitor.core.backoff import backoff
from monitor.service import PollResult, TargetPoller
from monitor.timeutil import utc_now

__all__ = [
    "PollScheduler",
    "ScheduledTarget",
    "SlotTrigger",
    "backoff_delay",
    "next_run",
    "shared_grid",
]

log = logging.getLogger("monitor.scheduler")

WATCH_EVERY = 0.5  # seconds between the watchdog's looks at the polls in flight
FIRST_SPREAD_MAX = 30.0  # the first polls of all targets are spread over at most this
CLOCK_JUMP = 5.0  # seconds of difference between wall and monotonic time that count as a jump
GROW_EVERY = 0.5  # seconds between two workers added
CPU_BOUND = 0.8  # CPU seconds per second of the process above which no worker is added
IDLE_EXIT = 60.0  # seconds a worker beyond the minimum may stay idle before it ends
WAIT_MAX = 60.0  # the leader looks at the heap at least this often, whatever it expects


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


class SlotTrigger:
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

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime:
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


def next_run(
    trigger: SlotTrigger, result: PollResult | None, *, fired: datetime, now: datetime, cap: float
) -> datetime:
    """When a target polls next, its poll of the run at ``fired`` having ended at ``now`` with
    ``result`` (``None``: the poll crashed, which counts as nothing): the next slot after a
    success, the first slot at or after the backoff after a failure."""
    if result is None or result.ok:
        trigger.not_before = None
        return trigger.get_next_fire_time(fired, now)
    retry_after = result.error.retry_after if result.error is not None else None
    interval = trigger.interval
    delay = backoff_delay(
        interval=interval, failures=result.failures_in_a_row, cap=cap, retry_after=retry_after
    )
    # Half an interval of slack lets the slot at `delay` through although this poll took a
    # moment; the upstream's Retry-After is never cut short.
    wait = max(delay - interval * 0.5, min(retry_after or 0.0, delay))
    trigger.not_before = now + timedelta(seconds=wait)
    return trigger.get_next_fire_time(now, now)


@dataclass(eq=False, slots=True)
class _Entry:
    """One target as the scheduler holds it; replaced whole by :meth:`PollScheduler.hold`."""

    target: ScheduledTarget
    trigger: SlotTrigger
    at: datetime  # its next run, or while it polls the run being polled
    seq: int = 0  # the heap item that is current; any other item of this entry is stale
    live: bool = True  # False once dropped or replaced
    polling: bool = False


class PollScheduler:
    """Leader/followers over one heap of next runs; the first polls spread over
    min(interval, 30 s)."""

    def __init__(
        self,
        targets: Sequence[ScheduledTarget],
        *,
        backoff_max: float,
        max_workers: int = 10,
        min_workers: int | None = None,
        idle_exit: float = IDLE_EXIT,
        grow_every: float = GROW_EVERY,
        now: Callable[[], datetime] = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
        cpu_time: Callable[[], float] = time.process_time,
        claimed: bool = False,
    ) -> None:
        self._claimed = claimed
        self._by_name = {target.poller.name: target for target in targets}
        self._targets = list(targets)
        self._backoff_max = backoff_max
        # Workers: `min_workers` from start; one more whenever a run is due and every worker
        # polls (a slow upstream's latency, not the CPU, is what needs them), up to
        # `max_workers`, while the process is not busy with the CPU; one idle for `idle_exit`
        # seconds beyond the minimum ends.
        self._max_workers = max(max_workers, 1)
        self._min_workers = min(max(min_workers or self._max_workers, 1), self._max_workers)
        self._idle_exit = idle_exit
        # At most one worker added per `grow_every` seconds: the CPU rule below looks every
        # WATCH_EVERY, and a backlog (a process resumed after a stop) must not add them all
        # before it has looked.
        self._grow_every = grow_every
        self._grown_at = -math.inf
        self._alive = 0  # worker threads running
        self._spawned = 0  # worker threads ever started: the next one's name, poll-N
        self._broken = False  # a worker ended by an exception: a bug, and readiness says so
        # The process spent most of a core in the watchdog's last look: more threads would wait
        # for the CPU (the GIL), not for the network, so none is added meanwhile (a burst of
        # first polls at 10,000 targets otherwise grew the pool to 64 for nothing).
        self._cpu_time = cpu_time
        self._cpu_bound = True  # until the watchdog's first look
        self._now = now
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the leader's: an earlier run, or stop
        # The followers, each waiting on a condition of its own: the lead goes to the one that
        # came last (its thread ran last, the warmest), so a light load keeps to a few threads
        # (measured: about 15-30 us of CPU a poll less than waking them in turn).
        self._followers: list[threading.Condition] = []
        self._leading = False
        self._heap: list[tuple[datetime, int, _Entry]] = []
        self._seq = 0
        self._entries: dict[str, _Entry] = {}
        self._started = False
        self._watchdog: threading.Thread | None = None
        self._stop = threading.Event()
        # The pollers whose poll is running now, by name: for the watchdog, which then looks
        # at the polls in flight only, not at every target.
        self._running: dict[str, TargetPoller] = {}

    @property
    def running(self) -> bool:
        """Started, not shut down, and no thread of it ended by an exception (``/readyz``: a
        scheduler whose threads died must not look healthy)."""
        watchdog = self._watchdog
        return (
            self._started
            and not self._stop.is_set()
            and not self._broken
            and watchdog is not None
            and watchdog.is_alive()
        )

    @property
    def workers(self) -> int:
        """Worker threads running now."""
        with self._lock:
            return self._alive

    @property
    def triggers(self) -> dict[str, SlotTrigger]:
        with self._lock:
            return {name: entry.trigger for name, entry in self._entries.items()}

    def start(self) -> None:
        now = self._now()
        count = len(self._targets)
        with self._lock:
            for index, target in enumerate([] if self._claimed else self._targets):
                # Evenly spread first polls: index / count of the spread window.
                first = now + timedelta(seconds=_first_spread(target.interval) * index / count)
                trigger = SlotTrigger(
                    interval=target.interval, jitter=target.jitter, origin=first, seed=index
                )
                self._enter(target, trigger, first)
            for _ in range(self._min_workers):
                self._spawn()
        self._watchdog = threading.Thread(target=self._watch, name="poll-watchdog", daemon=True)
        self._watchdog.start()
        self._started = True

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
        with self._lock:
            self._retire(name)
            self._enter(target, trigger, first)

    def drop(self, name: str) -> None:
        """Poll ``name`` no more (a poll in flight finishes; its outcome is recorded)."""
        with self._lock:
            self._retire(name)

    def next_run_times(self) -> dict[str, datetime]:
        with self._lock:
            return {name: entry.at for name, entry in self._entries.items()}

    def shift(self, delta: timedelta) -> None:
        """The wall clock jumped by ``delta``: move every grid and next run along with it, so
        each target's next poll stays as far ahead in real time as it was."""
        with self._lock:
            self._heap.clear()
            for entry in self._entries.values():
                entry.trigger.shift(delta)
                entry.at += delta
                if not entry.polling:
                    self._queue(entry, entry.at)
            self._wake.notify()

    def shutdown(self) -> None:
        """Stop at once. A poll in flight is not waited for: the daemon aborts its HTTP
        requests, and its outcome, if any, is written like any other."""
        self._stop.set()
        with self._lock:
            self._wake.notify_all()
            for follower in self._followers:
                follower.notify()
            self._followers.clear()

    # -- under the lock ----------------------------------------------------------------------

    def _enter(self, target: ScheduledTarget, trigger: SlotTrigger, first: datetime) -> None:
        entry = _Entry(target, trigger, first)
        self._entries[target.poller.name] = entry
        self._queue(entry, first)

    def _retire(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        if entry is not None:
            entry.live = False  # its heap item is skipped; a poll in flight is not requeued

    def _queue(self, entry: _Entry, at: datetime) -> None:
        self._seq += 1
        entry.at, entry.seq = at, self._seq
        item = (at, self._seq, entry)
        heapq.heappush(self._heap, item)
        if self._heap[0] is item:
            self._wake.notify()  # earlier than what the leader sleeps for

    def _head(self) -> _Entry | None:
        """The earliest live entry, the stale heap items above it dropped on the way."""
        heap = self._heap
        while heap:
            _, seq, entry = heap[0]
            if entry.live and entry.seq == seq:
                return entry
            heapq.heappop(heap)
        return None

    def _take_due(self) -> tuple[_Entry | None, float | None]:
        """The due entry to poll now, marked as polling; else how long until the next one
        (``None``: nothing is scheduled)."""
        heap = self._heap
        while (entry := self._head()) is not None:
            at, now = entry.at, self._now()
            wait = (at - now).total_seconds()
            if wait > 0:
                return None, min(wait, WAIT_MAX)
            heapq.heappop(heap)
            poller = entry.target.poller
            if poller.name in self._running:
                # Held anew while the entry it replaced still polls: never two polls of one
                # target at once, this run is coalesced into the next slot.
                self._queue(entry, entry.trigger.get_next_fire_time(at, now))
                continue
            entry.polling = True
            self._running[poller.name] = poller
            return entry, None
        return None, None

    def _finish(self, entry: _Entry, result: PollResult | None) -> None:
        entry.polling = False
        self._running.pop(entry.target.poller.name, None)
        if not entry.live:
            return
        now, trigger, cap = self._now(), entry.trigger, self._backoff_max
        try:
            following = next_run(trigger, result, fired=entry.at, now=now, cap=cap)
        except Exception:  # a result it cannot read: the target polls again an interval later
            log.exception("poll result unreadable", extra={"target": entry.target.poller.name})
            following = now + timedelta(seconds=trigger.interval)
        self._queue(entry, following)

    # -- threads -----------------------------------------------------------------------------

    def _grow(self) -> None:
        """Every worker polls, none leads: one more worker to lead, unless there are as many as
        allowed, or the process is busy with the CPU (more threads would wait for it, not for
        an upstream)."""
        if self._alive >= self._max_workers or self._cpu_bound:
            return
        now = self._monotonic()
        if now - self._grown_at >= self._grow_every:
            self._grown_at = now
            self._spawn()

    def _spawn(self) -> None:
        """One more worker (under the lock: it starts by waiting for it)."""
        name = f"poll-{self._spawned}"
        self._alive += 1
        self._spawned += 1
        threading.Thread(target=self._work, name=name, daemon=True).start()

    def _work(self) -> None:
        try:
            self._serve()
        except BaseException:
            with self._lock:
                self._alive -= 1
                self._broken = True
            raise

    def _serve(self) -> None:
        """A worker: the leader sleeps until the next run is due, takes it, passes the lead
        on and polls; the others wait for the lead. Returns on stop, or when idle too long
        beyond the minimum of workers (it counts itself out under the lock, where it decided)."""
        mine = threading.Condition(self._lock)
        with self._lock:
            while not self._stop.is_set():
                if self._leading:
                    self._followers.append(mine)
                    spare = self._alive > self._min_workers
                    # A wait that ran out leaves `mine` listed, unless the lead was handed to
                    # it just then: never listed twice, never listed once gone.
                    if (
                        not mine.wait(self._idle_exit if spare else None)
                        and mine in self._followers
                    ):
                        self._followers.remove(mine)
                        if self._alive > self._min_workers:  # idle that long: not needed now
                            self._alive -= 1
                            return
                    continue
                entry, wait = self._take_due()
                if entry is None:
                    self._leading = True
                    self._wake.wait(wait)
                    self._leading = False
                    continue
                if self._followers:
                    self._followers.pop().notify()  # the lead is free: one of them takes it
                else:
                    self._grow()
                self._lock.release()
                try:
                    result = _poll(entry.target.poller)
                finally:
                    self._lock.acquire()
                self._finish(entry, result)
            self._alive -= 1

    def _watch(self) -> None:
        """Count polls that overran their deadline as failed, whatever they are stuck in (a
        DNS lookup, a proxy), measure the process's CPU (the rule for adding workers), add a
        worker for a due run that no worker is free for, and follow jumps of the wall clock.
        Its own thread, so that even a pool of stuck workers cannot stop it."""
        wall, mono, cpu = self._now(), self._monotonic(), self._cpu_time()
        while not self._stop.wait(WATCH_EVERY):
            # Wall and monotonic time read together: what the looks below take is no jump.
            now, wall_now, cpu_now = self._monotonic(), self._now(), self._cpu_time()
            try:
                self._look(now, wall_now, cpu_busy=cpu_now - cpu > CPU_BOUND * (now - mono))
            except Exception:  # its bug must not end the watch: readiness depends on it
                log.exception("scheduler watchdog failed; it goes on")
            jump = (wall_now - wall).total_seconds() - (now - mono)
            wall, mono, cpu = wall_now, now, cpu_now
            if abs(jump) > CLOCK_JUMP:
                log.warning("wall clock jumped; schedules follow", extra={"seconds": round(jump)})
                self.shift(timedelta(seconds=jump))

    def _look(self, now: float, wall_now: datetime, *, cpu_busy: bool) -> None:
        with self._lock:
            self._cpu_bound = cpu_busy
            if not self._leading and not self._followers:
                head = self._head()
                if head is not None and head.at <= wall_now:
                    self._grow()  # due, all were polling while the CPU was busy: none added
        for poller in list(self._running.values()):
            if poller.expire_if_overdue(now):
                log.warning(
                    "poll overran its deadline; counted as failed",
                    extra={"target": poller.name, "deadline_s": poller.deadline},
                )


def _poll(poller: TargetPoller) -> PollResult | None:
    try:
        return poller.poll()
    except Exception:  # poll() turns its own bugs into failed polls; this is the last net
        log.exception("poll crashed", extra={"target": poller.name})
        return None
