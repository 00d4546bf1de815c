"""The delivery worker: sends the outbox, oldest first per sink, with capped backoff.

Rows stay pending until a sink accepts them, so a sink outage, a crash or a restart loses
nothing (at-least-once: a crash between sending and marking can send one row twice). A sink's
newer rows wait behind its oldest, so alerts arrive in the order they happened.

Each sink delivers in its own lane (a thread with its own queue position, backoff and
re-sync), so a slow or dead sink never holds back another. A retry time stored in the outbox
is never trusted beyond the sink's ``max_backoff`` from now: a wall clock that jumped forward
while a sink was down cannot park its queue for a day.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from monitor.core.alerting import FAMILIES
from monitor.core.backoff import backoff
from monitor.errors import DeliveryError, StorageError
from monitor.metrics import Metrics
from monitor.storage.outbox import Outbox, PendingDelivery
from monitor.storage.queries import EventView
from monitor.timeutil import Clock

__all__ = ["DeliveryWorker", "Sink", "SinkPolicy", "retry_delay"]

log = logging.getLogger("monitor.alerts")

FIRST_RETRY = 1.0
REJECT_AFTER = 3  # attempts refused with a permanent 4xx before a row is set aside
COUNT_EVERY = 1.0  # seconds between refreshes of the pending gauge
SYNC_EVERY = 60.0  # Alertmanager wants firing alerts re-posted every 30 s to 3 min


class Sink(Protocol):
    name: str

    def send(self, event: EventView) -> None: ...


@dataclass(frozen=True, slots=True)
class SinkPolicy:
    sink: Sink
    max_backoff: float
    repeat_interval: float | None = None


def retry_delay(attempts: int, cap: float, rng: random.Random | None = None) -> float:
    """A delivery's retry: from FIRST_RETRY, doubling, capped, with half of it jittered."""
    return backoff(attempts, first=FIRST_RETRY, cap=cap, jitter=0.5, rng=rng)


class _Lane:
    """One sink's deliveries: its queue, its retries, its re-syncs."""

    def __init__(
        self,
        policy: SinkPolicy,
        *,
        outbox: Outbox,
        metrics: Metrics,
        clock: Clock,
        targets: Collection[str],
        stop: threading.Event,
    ) -> None:
        self.policy = policy
        self.sink = policy.sink.name
        self._outbox = outbox
        self._metrics = metrics
        self._clock = clock
        self._targets = targets
        self._stop = stop
        self.wake = threading.Event()
        self._last_sync: datetime | None = None
        metrics.declare_sink(self.sink)

    def run_once(self) -> int:
        now = self._clock()
        sent = self._deliver(now)
        self._maintain(now)
        return sent

    def loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
                wait = self._seconds_to_next()
            except StorageError as exc:
                log.warning(
                    "alert delivery paused: database unavailable",
                    extra={"sink": self.sink, "detail": str(exc)},
                )
                wait = 5.0
            except Exception:  # a bug in one sink must not stop its delivery for good
                log.exception("alert delivery round failed", extra={"sink": self.sink})
                wait = 5.0
            self.wake.wait(wait)
            self.wake.clear()

    def drain(self, give_up: float) -> None:
        """Deliver until nothing is due before ``give_up`` (monotonic) or nothing is left."""
        while not self._stop.is_set():
            self.run_once()
            due = self._outbox.next_due([self.sink])
            if due is None or not self._outbox.pending_count([self.sink]):
                return
            wait = self._wait_until(due)
            if time.monotonic() + wait > give_up:
                return
            self._stop.wait(max(0.05, min(1.0, wait)))

    def _seconds_to_next(self) -> float:
        due = self._outbox.next_due([self.sink])
        horizon = SYNC_EVERY if due is None else self._wait_until(due)
        return max(0.05, min(horizon, 5.0))

    def _wait_until(self, due: datetime) -> float:
        # Never longer than the sink's backoff cap, whatever the stored time says.
        return min((due - self._clock()).total_seconds(), self.policy.max_backoff)

    def _deliver(self, now: datetime) -> int:
        policy, sent = self.policy, 0
        for row in self._outbox.due(self.sink, now, max_wait=policy.max_backoff):
            if self._stop.is_set():
                break
            try:
                policy.sink.send(row.event)
            except DeliveryError as exc:
                self._metrics.deliveries.labels(sink=self.sink, outcome="failed").inc()
                if exc.permanent and row.attempts + 1 >= REJECT_AFTER:
                    self._set_aside(row, exc, now)
                    continue
                self._retry_later(row, exc, now)
                break  # keep this sink's order: newer rows wait behind the failed one
            self._outbox.delivered(row.id, self._clock())
            self._metrics.deliveries.labels(sink=self.sink, outcome="sent").inc()
            log.info(
                "alert delivered",
                extra={"sink": self.sink, "event_id": row.event.id, "kind": row.event.kind},
            )
            sent += 1
        return sent

    def _retry_later(self, row: PendingDelivery, exc: DeliveryError, now: datetime) -> None:
        delay = retry_delay(row.attempts + 1, self.policy.max_backoff)
        self._outbox.failed(row.id, str(exc), now + timedelta(seconds=delay))
        log.warning(
            "alert delivery failed; will retry",
            extra={
                "sink": self.sink,
                "event_id": row.event.id,
                "attempts": row.attempts + 1,
                "detail": str(exc),
                "retry_in_s": round(delay, 1),
            },
        )

    def _set_aside(self, row: PendingDelivery, exc: DeliveryError, now: datetime) -> None:
        # The sink refuses this very payload: retrying it forever would block every alert
        # behind it. It stays in the outbox (`alerts pending --rejected`, `alerts retry`).
        self._outbox.rejected(row.id, str(exc), now)
        log.error(
            "alert delivery rejected by the sink; set aside, later alerts go on",
            extra={
                "sink": self.sink,
                "event_id": row.event.id,
                "attempts": row.attempts + 1,
                "detail": str(exc),
            },
        )

    def sync_now(self) -> None:
        self._last_sync = None
        self._maintain(self._clock())

    def _maintain(self, now: datetime) -> None:
        """Every SYNC_EVERY: re-post firing alerts to an Alertmanager sink, queue repeats."""
        if (
            self._last_sync is not None
            and abs((now - self._last_sync).total_seconds()) < SYNC_EVERY
        ):
            return
        self._last_sync = now
        policy = self.policy
        sync = getattr(policy.sink, "sync", None)
        if sync is None and not policy.repeat_interval:
            return
        firing = [
            event
            for event in self._outbox.firing(since_one_off=now - timedelta(hours=1))
            if event.target in self._targets
        ]
        # Only what this sink was sent: its filters and the targets' ignored paths hold.
        routed = self._outbox.routed(self.sink, [event.row_id for event in firing])
        mine = [event for event in firing if event.row_id in routed]
        if sync is not None:
            try:
                sync(mine)
            except DeliveryError as exc:
                self._metrics.deliveries.labels(sink=self.sink, outcome="failed").inc()
                log.warning("alert re-sync failed", extra={"sink": self.sink, "detail": str(exc)})
        if policy.repeat_interval:
            self._queue_repeats(mine, now)

    def _queue_repeats(self, firing: list[EventView], now: datetime) -> None:
        interval = self.policy.repeat_interval
        assert interval is not None
        for event in firing:
            if event.kind not in FAMILIES or event.severity != "critical":
                continue
            last = self._outbox.last_delivery(self.sink, event.row_id)
            if last is None or last[0] != "delivered" or last[1] is None:
                continue  # never routed to this sink, or a delivery still pending
            if (now - last[1]).total_seconds() >= interval:
                self._outbox.requeue(self.sink, event.row_id, now)


class DeliveryWorker:
    """The lanes of every sink: started by the daemon, drained by ``check``."""

    def __init__(
        self,
        *,
        outbox: Outbox,
        policies: Sequence[SinkPolicy],
        metrics: Metrics,
        clock: Clock,
        targets: Collection[str] = (),
    ) -> None:
        self._outbox = outbox
        self._stop = threading.Event()
        self._lanes = [
            _Lane(
                policy,
                outbox=outbox,
                metrics=metrics,
                clock=clock,
                targets=set(targets),
                stop=self._stop,
            )
            for policy in policies
        ]
        self._sinks = [lane.sink for lane in self._lanes]
        self._metrics = metrics
        self._threads: list[threading.Thread] = []
        self._recount = threading.Event()

    def wake(self) -> None:
        for lane in self._lanes:
            lane.wake.set()
        self._recount.set()

    def start(self) -> None:
        self._threads = [self._thread(lane.loop, lane.sink) for lane in self._lanes]
        if self._lanes:
            self._threads.append(self._thread(self._count_loop, "pending"))

    def _count_loop(self) -> None:
        """The pending gauge, apart from the lanes: a lane stuck in a slow send must not
        leave its sink's count stale."""
        while not self._stop.is_set():
            with contextlib.suppress(StorageError):  # the lanes log the outage
                self._count()
            self._recount.wait(COUNT_EVERY)
            self._recount.clear()

    def _count(self) -> None:
        for sink, count in self._outbox.pending_counts(self._sinks).items():
            self._metrics.set_outbox_pending(sink, count)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop every lane; a lane in the middle of a send gets ``timeout`` seconds in all
        (the daemon aborts the sinks' HTTP requests before it stops)."""
        self._stop.set()
        self.wake()
        give_up = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, give_up - time.monotonic()))

    def run_once(self) -> int:
        """One round over every lane, in this thread; returns the rows delivered."""
        sent = sum(lane.run_once() for lane in self._lanes)
        self._count()
        return sent

    def drain(self, timeout: float) -> int:
        """Deliver until nothing is due or ``timeout`` passes (``check``); the rows left.

        Each lane drains in its own thread, so a slow sink leaves the others their time. The
        wait is measured on the monotonic clock: it is real time spent by this process,
        whatever the injected clock says."""
        give_up = time.monotonic() + timeout
        threads = [self._thread(lane.drain, lane.sink, give_up) for lane in self._lanes]
        for thread in threads:
            thread.join(max(0.0, give_up - time.monotonic()) + 0.5)
        self._count()
        return self._outbox.pending_count(self._sinks)

    def sync_now(self) -> None:
        """Re-post firing alerts and queue repeats now instead of at the next period."""
        for lane in self._lanes:
            lane.sync_now()

    @staticmethod
    def _thread(target: Callable[..., None], sink: str, *args: Any) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=f"deliver:{sink}", daemon=True)
        thread.start()
        return thread
