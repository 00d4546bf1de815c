"""CPU per poll that scheduling costs, apart from the poll: what the daemon's scheduler adds
around each poll, against leaner and heavier ways of running the same polls.

Run from the repository root::

    .venv/bin/python bench/scheduling.py                  # 1,000 targets at 5 s, 20 s each
    .venv/bin/python bench/scheduling.py --targets 100 --interval 1

Every variant runs the same "poll": a 2 ms sleep (a wait on I/O, as a poll's HTTP request is),
for ``--targets`` targets once per ``--interval``, with ten threads, and reports the CPU of
this process (user + system, all threads) per poll over ``--seconds`` (rounded up to whole
intervals) after the first round:

``daemon``       ``monitor.scheduler.PollScheduler`` as the daemon builds it: leader and
                 followers over one heap of slot triggers, ten workers, the watchdog
``pool``         one thread sleeping until each next run and submitting it to a
                 ``ThreadPoolExecutor`` of ten: the hand-off alone
``per-worker``   ten threads, each owning a tenth of the targets in a heap, sleeping until
                 its own next slot and polling itself: one wake-up per poll, no hand-off
``leader``       the daemon's design bare: ten threads over one heap of plain numbers, the
                 leader sleeping until the earliest, handing the lead on and polling

Until 2026-12-04 the daemon ran on APScheduler (a scheduler thread handing each due job to a
pool); its figure, kept in ``docs/benchmarks.md``, is why it no longer does.
``bench/fleet.py`` gives the whole daemon's CPU per poll beside the naive loop.
"""

from __future__ import annotations

import argparse
import heapq
import math
import statistics
import threading
import time
from collections.abc import Callable

from monitor.scheduler import PollScheduler, ScheduledTarget
from monitor.service import PollResult

WORKERS = 10
WORK = 0.002  # seconds each poll waits, as on a socket


class _Counter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs = 0

    def poll(self) -> None:
        time.sleep(WORK)
        with self.lock:
            self.runs += 1


class _Poller:
    """What PollScheduler runs: a TargetPoller's surface, polling by waiting."""

    deadline = 10.0

    def __init__(self, name: str, counter: _Counter) -> None:
        self.name = name
        self._counter = counter

    def poll(self) -> PollResult:
        self._counter.poll()
        return PollResult(self.name, True)

    def expire_if_overdue(self, now: float) -> bool:
        return False


def with_daemon(targets: int, interval: float, counter: _Counter) -> Callable[[], None]:
    scheduled = [
        ScheduledTarget(_Poller(f"t{i}", counter), interval, 0.1)  # type: ignore[arg-type]
        for i in range(targets)
    ]
    scheduler = PollScheduler(scheduled, backoff_max=900, max_workers=WORKERS)
    scheduler.start()
    return scheduler.shutdown


def with_pool(targets: int, interval: float, counter: _Counter) -> Callable[[], None]:
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(WORKERS)
    stop = threading.Event()

    def feed() -> None:
        due = time.monotonic()
        while not stop.wait(max(due - time.monotonic(), 0.0)):
            pool.submit(counter.poll)
            due += interval / targets

    feeder = threading.Thread(target=feed)
    feeder.start()

    def end() -> None:
        stop.set()
        feeder.join()
        pool.shutdown()

    return end


def with_per_worker(targets: int, interval: float, counter: _Counter) -> Callable[[], None]:
    stop = threading.Event()
    start = time.monotonic()

    def work(first: int) -> None:
        heap = [(start + interval * i / targets, i) for i in range(first, targets, WORKERS)]
        heapq.heapify(heap)
        while True:
            at, i = heap[0]
            if stop.wait(max(at - time.monotonic(), 0.0)):
                return
            counter.poll()
            heapq.heapreplace(heap, (at + interval, i))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(WORKERS)]
    for thread in threads:
        thread.start()

    def end() -> None:
        stop.set()
        for thread in threads:
            thread.join()

    return end


def with_leader(targets: int, interval: float, counter: _Counter) -> Callable[[], None]:
    lock = threading.Lock()
    leader_cv = threading.Condition(lock)
    followers = threading.Condition(lock)
    stopped = [False]
    has_leader = [False]
    start = time.monotonic()
    heap = [(start + interval * i / targets, i) for i in range(targets)]

    def work() -> None:
        with lock:
            while not stopped[0]:
                if has_leader[0]:
                    followers.wait()
                    continue
                wait = heap[0][0] - time.monotonic()
                if wait > 0:
                    has_leader[0] = True
                    leader_cv.wait(wait)
                    has_leader[0] = False
                    continue
                at, i = heapq.heappop(heap)
                followers.notify()
                lock.release()
                try:
                    counter.poll()
                finally:
                    lock.acquire()
                heapq.heappush(heap, (at + interval, i))

    threads = [threading.Thread(target=work) for _ in range(WORKERS)]
    for thread in threads:
        thread.start()

    def end() -> None:
        with lock:
            stopped[0] = True
            leader_cv.notify_all()
            followers.notify_all()
        for thread in threads:
            thread.join()

    return end


VARIANTS = {
    "daemon": with_daemon,
    "pool": with_pool,
    "per-worker": with_per_worker,
    "leader": with_leader,
}


def measure(name: str, targets: int, interval: float, seconds: float) -> float:
    counter = _Counter()
    end = VARIANTS[name](targets, interval, counter)
    # Whole intervals: each target polls once per interval, a window of part of one would
    # see a part of the targets (at 60 s, 30 s of the first round, then a 30 s gap).
    window = math.ceil(seconds / interval) * interval
    try:
        time.sleep(min(interval, 30.0) + 2)  # the first polls spread, then steady
        cpu, runs = time.process_time(), counter.runs
        time.sleep(window)
        cpu, runs = time.process_time() - cpu, counter.runs - runs
    finally:
        end()
    return cpu / max(runs, 1) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="measured per round (whole intervals)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each (median)")
    args = parser.parse_args()
    figures: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(args.rounds):
        names = list(VARIANTS) if round_ % 2 == 0 else list(reversed(VARIANTS))
        for name in names:
            figures[name].append(measure(name, args.targets, args.interval, args.seconds))
    rate = args.targets / args.interval
    print(f"{args.targets} targets at {args.interval:g} s ({rate:.0f} polls/s), {WORKERS} threads")
    for name, values in figures.items():
        rounds = ", ".join(f"{v:.0f}" for v in values)
        print(f"{name:<12} {statistics.median(values):6.0f} us CPU per poll  [{rounds}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
