"""The delivery worker: sends the outbox, oldest first per sink, with capped backoff.

Rows stay pending until a sink accepts them, so a sink outage, a crash or a restart loses
nothing (at-least-once: a crash between sending and marking can send one row twice). A sink's
newer rows wait behind its oldest, so alerts arrive in the order they happened.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from monitor.core.alerting import FAMILIES
from monitor.errors import DeliveryError, StorageError
from monitor.metrics import Metrics
from monitor.storage.outbox import Outbox, PendingDelivery
from monitor.storage.queries import EventView
from monitor.timeutil import Clock

__all__ = ["DeliveryWorker", "Sink", "SinkPolicy", "retry_delay"]

log = logging.getLogger("monitor.alerts")

FIRST_RETRY = 1.0
REJECT_AFTER = 3  # attempts refused with a permanent 4xx before a row is set aside
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
    """Exponential backoff with "full jitter" between half and all of the step, capped."""
    step = min(cap, FIRST_RETRY * 2.0 ** min(attempts - 1, 30))
    return step * (rng or random).uniform(0.5, 1.0)


class DeliveryWorker:
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
        self._policies = list(policies)
        self._sinks = [policy.sink.name for policy in policies]
        for name in self._sinks:
            metrics.declare_sink(name)
        self._targets = set(targets)
        self._metrics = metrics
        self._clock = clock
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_sync: datetime | None = None

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="delivery", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def run_once(self) -> int:
        """One round over all sinks; returns the rows delivered."""
        now = self._clock()
        sent = 0
        for policy in self._policies:
            sent += self._deliver(policy, now)
        self._maintain(now)
        self._metrics.outbox_pending.set(self._outbox.pending_count(self._sinks))
        return sent

    def drain(self, timeout: float) -> int:
        """Deliver until nothing is due or ``timeout`` passes (``check``); the rows left.

        The wait is measured on the monotonic clock: it is real time spent by this process,
        whatever the injected clock says."""
        give_up = time.monotonic() + timeout
        while True:
            self.run_once()
            pending = self._outbox.pending_count(self._sinks)
            due = self._outbox.next_due(self._sinks)
            if not pending or due is None:
                return pending
            wait = (due - self._clock()).total_seconds()
            if time.monotonic() + wait > give_up:
                return pending
            self._stop.wait(max(0.05, min(1.0, wait)))

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
                wait = self._seconds_to_next()
            except StorageError as exc:
                log.warning(
                    "alert delivery paused: database unavailable", extra={"detail": str(exc)}
                )
                wait = 5.0
            except Exception:  # a bug in one sink must not stop delivery for good
                log.exception("alert delivery round failed")
                wait = 5.0
            self._wake.wait(wait)
            self._wake.clear()

    def _seconds_to_next(self) -> float:
        due = self._outbox.next_due(self._sinks)
        horizon = SYNC_EVERY
        if due is not None:
            horizon = min(horizon, (due - self._clock()).total_seconds())
        return max(0.05, min(horizon, 5.0))

    def _deliver(self, policy: SinkPolicy, now: datetime) -> int:
        sent = 0
        for row in self._outbox.due(policy.sink.name, now):
            try:
                policy.sink.send(row.event)
            except DeliveryError as exc:
                self._metrics.deliveries.labels(sink=policy.sink.name, outcome="failed").inc()
                if exc.permanent and row.attempts + 1 >= REJECT_AFTER:
                    self._set_aside(policy, row, exc, now)
                    continue
                self._retry_later(policy, row, exc, now)
                break  # keep this sink's order: newer rows wait behind the failed one
            self._outbox.delivered(row.id, self._clock())
            self._metrics.deliveries.labels(sink=policy.sink.name, outcome="sent").inc()
            log.info(
                "alert delivered",
                extra={"sink": policy.sink.name, "event_id": row.event.id, "kind": row.event.kind},
            )
            sent += 1
        return sent

    def _retry_later(
        self, policy: SinkPolicy, row: PendingDelivery, exc: DeliveryError, now: datetime
    ) -> None:
        delay = retry_delay(row.attempts + 1, policy.max_backoff)
        self._outbox.failed(row.id, str(exc), now + timedelta(seconds=delay))
        log.warning(
            "alert delivery failed; will retry",
            extra={
                "sink": policy.sink.name,
                "event_id": row.event.id,
                "attempts": row.attempts + 1,
                "detail": str(exc),
                "retry_in_s": round(delay, 1),
            },
        )

    def _set_aside(
        self, policy: SinkPolicy, row: PendingDelivery, exc: DeliveryError, now: datetime
    ) -> None:
        # The sink refuses this very payload: retrying it forever would block every alert
        # behind it. It stays in the outbox (`alerts pending --rejected`, `alerts retry`).
        self._outbox.rejected(row.id, str(exc), now)
        log.error(
            "alert delivery rejected by the sink; set aside, later alerts go on",
            extra={
                "sink": policy.sink.name,
                "event_id": row.event.id,
                "attempts": row.attempts + 1,
                "detail": str(exc),
            },
        )

    def sync_now(self) -> None:
        """Re-post firing alerts and queue repeats now instead of at the next period."""
        self._last_sync = None
        self._maintain(self._clock())

    def _maintain(self, now: datetime) -> None:
        """Every SYNC_EVERY: re-post firing alerts to Alertmanager sinks, queue repeats."""
        if self._last_sync is not None and (now - self._last_sync).total_seconds() < SYNC_EVERY:
            return
        self._last_sync = now
        firing = [
            event
            for event in self._outbox.firing(since_one_off=now - timedelta(hours=1))
            if event.target in self._targets
        ]
        for policy in self._policies:
            # Only what this sink was sent: its filters and the targets' ignored paths hold.
            routed = self._outbox.routed(policy.sink.name, [event.row_id for event in firing])
            mine = [event for event in firing if event.row_id in routed]
            sync = getattr(policy.sink, "sync", None)
            if sync is not None:
                try:
                    sync(mine)
                except DeliveryError as exc:
                    self._metrics.deliveries.labels(sink=policy.sink.name, outcome="failed").inc()
                    log.warning(
                        "alert re-sync failed", extra={"sink": policy.sink.name, "detail": str(exc)}
                    )
            if policy.repeat_interval:
                self._queue_repeats(policy, mine, now)

    def _queue_repeats(self, policy: SinkPolicy, firing: list[EventView], now: datetime) -> None:
        assert policy.repeat_interval is not None
        for event in firing:
            if event.kind not in FAMILIES or event.severity != "critical":
                continue
            last = self._outbox.last_delivery(policy.sink.name, event.row_id)
            if last is None or last[0] != "delivered" or last[1] is None:
                continue  # never routed to this sink, or a delivery still pending
            if (now - last[1]).total_seconds() >= policy.repeat_interval:
                self._outbox.requeue(policy.sink.name, event.row_id, now)
