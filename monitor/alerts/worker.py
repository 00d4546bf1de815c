"""The delivery worker: sends the outbox, oldest first per lane, with capped backoff.

Rows stay pending until a sink accepts them, so a sink outage, a crash or a restart loses
nothing (at-least-once: a crash between sending and marking can send one row twice). A lane's
newer rows wait behind its oldest, so alerts arrive in the order they happened.

A *lane* is one URL of one sink (an ``alertmanager`` sink with ``urls`` has one per URL). Each
lane delivers in a thread of its own (its own queue position, backoff and re-sync), so a slow
or dead sink or Alertmanager never holds back another. A retry time stored in the outbox is
never trusted beyond the sink's ``max_backoff`` from now: a wall clock that jumped forward
while a sink was down cannot park its queue for a day.

Replicas sharing one database each run every lane, but a round of a lane runs only while this
process holds the lane's lease (:mod:`monitor.storage.lanes`, on the database clock): one
sender per lane at a time, so each row is sent once and in order whichever replica sends it.
The lease is taken when a round has work, extended before each send to outlast it (the sink's
timeout plus ``LEASE_MARGIN``), and given back when the round ends; a process killed
mid-round loses it when it runs out, and another replica sends the row. The one duplicate
left is SPEC §4's: a sender that dies (or stalls past its lease) after the sink accepted a row
and before it marked it delivered.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import secrets
import socket
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
from monitor.storage.lanes import LaneLeases
from monitor.storage.outbox import Lane, Outbox, PendingDelivery
from monitor.storage.queries import EventView
from monitor.timeutil import Clock

__all__ = ["DeliveryWorker", "Sink", "SinkPolicy", "default_holder", "retry_delay"]

log = logging.getLogger("monitor.alerts")

FIRST_RETRY = 1.0
REJECT_AFTER = 3  # attempts refused with a permanent 4xx before a row is set aside
COUNT_EVERY = 1.0  # seconds between refreshes of the pending gauge
SYNC_EVERY = 60.0  # Alertmanager wants firing alerts re-posted every 30 s to 3 min
# Seconds a lane's lease outlasts one send (the sink's timeout): the database round trips of
# marking the row and extending the lease again fit in it.
LEASE_MARGIN = 5.0
BUSY_WAIT = 1.0  # seconds before asking again for a lane another process holds


class Sink(Protocol):
    name: str

    def send(self, event: EventView) -> None: ...


@dataclass(frozen=True, slots=True)
class SinkPolicy:
    """One lane: a sink (for one of its URLs) and how to deliver to it."""

    sink: Sink
    max_backoff: float
    repeat_interval: float | None = None
    lane: int = 0  # the index of the sink's URL
    timeout: float = 10.0  # the longest one send to the sink may take


def default_holder() -> str:
    """A name for this process's leases: the host, the pid and a random part (unique even
    for two processes of one host, or a pid reused after a restart)."""
    return f"{socket.gethostname()[:96]}-{os.getpid()}-{secrets.token_hex(4)}"


def retry_delay(attempts: int, cap: float, rng: random.Random | None = None) -> float:
    """A delivery's retry: from FIRST_RETRY, doubling, capped, with half of it jittered."""
    return backoff(attempts, first=FIRST_RETRY, cap=cap, jitter=0.5, rng=rng)


class _Lane:
    """One lane's deliveries: its queue, its retries, its re-syncs, its lease."""

    def __init__(
        self,
        policy: SinkPolicy,
        *,
        outbox: Outbox,
        leases: LaneLeases,
        lease_margin: float,
        metrics: Metrics,
        clock: Clock,
        targets: Collection[str],
        stop: threading.Event,
    ) -> None:
        self.policy = policy
        self.sink = policy.sink.name
        self.key: Lane = (self.sink, policy.lane)
        self.busy = False  # another process held the lane at the last round
        self._lease = policy.timeout + lease_margin
        self._leases = leases
        self._outbox = outbox
        self._metrics = metrics
        self._clock = clock
        self._targets = targets
        self._stop = stop
        self.wake = threading.Event()
        self._last_sync: datetime | None = None
        metrics.declare_sink(self.sink)

    @property
    def thread_name(self) -> str:
        return f"deliver:{self.sink}" + (f"#{self.key[1]}" if self.key[1] else "")

    @property
    def _extra(self) -> dict[str, Any]:
        return {"sink": self.sink, "lane": self.key[1]}

    def run_once(self) -> int:
        """A round if there is work and the lane is ours: send what is due, re-sync."""
        now = self._clock()
        self.busy = False
        if not self._sync_due(now) and not self._outbox.due(
            self.key, now, limit=1, max_wait=self.policy.max_backoff
        ):
            return 0
        if not self._leases.acquire(*self.key, self._lease):
            self.busy = True  # another replica's round: it sends these rows
            return 0
        try:
            sent = self._deliver(now)
            self._maintain(now)
        finally:
            # At once, not at the lease's end: a replica stopping or idle holds nothing up. A
            # database that fails here lets the lease run out instead.
            with contextlib.suppress(StorageError):
                self._leases.release(*self.key)
        return sent

    def loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
                wait = BUSY_WAIT if self.busy else self._seconds_to_next()
            except StorageError as exc:
                log.warning(
                    "alert delivery paused: database unavailable",
                    extra={**self._extra, "detail": str(exc)},
                )
                wait = 5.0
            except Exception:  # a bug in one sink must not stop its delivery for good
                log.exception("alert delivery round failed", extra=self._extra)
                wait = 5.0
            self.wake.wait(wait)
            self.wake.clear()

    def drain(self, give_up: float) -> None:
        """Deliver until nothing is due before ``give_up`` (monotonic) or nothing is left."""
        while not self._stop.is_set():
            self.run_once()
            due = self._outbox.next_due([self.key])
            if due is None or not self._outbox.pending_count([self.key]):
                return
            wait = BUSY_WAIT if self.busy else self._wait_until(due)
            if time.monotonic() + wait > give_up:
                return
            self._stop.wait(max(0.05, min(1.0, wait)))

    def _seconds_to_next(self) -> float:
        due = self._outbox.next_due([self.key])
        horizon = SYNC_EVERY if due is None else self._wait_until(due)
        return max(0.05, min(horizon, 5.0))

    def _wait_until(self, due: datetime) -> float:
        # Never longer than the sink's backoff cap, whatever the stored time says.
        return min((due - self._clock()).total_seconds(), self.policy.max_backoff)

    def _deliver(self, now: datetime) -> int:
        policy, sent = self.policy, 0
        for index, row in enumerate(self._outbox.due(self.key, now, max_wait=policy.max_backoff)):
            # The lease was just taken for a whole send: extended from the second row on.
            if self._stop.is_set() or (index and not self._hold()):
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
                extra={**self._extra, "event_id": row.event.id, "kind": row.event.kind},
            )
            sent += 1
        return sent

    def _hold(self) -> bool:
        """Extend the lease to outlast the next send; False (and log) if it was lost."""
        if self._leases.extend(*self.key, self._lease):
            return True
        log.warning("alert lane taken over by another process; round ended", extra=self._extra)
        return False

    def _retry_later(self, row: PendingDelivery, exc: DeliveryError, now: datetime) -> None:
        delay = retry_delay(row.attempts + 1, self.policy.max_backoff)
        self._outbox.failed(row.id, str(exc), now + timedelta(seconds=delay))
        log.warning(
            "alert delivery failed; will retry",
            extra={
                **self._extra,
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
                **self._extra,
                "event_id": row.event.id,
                "attempts": row.attempts + 1,
                "detail": str(exc),
            },
        )

    def sync_now(self) -> None:
        """Re-sync at the next round (``run_once``) whatever the time since the last."""
        self._last_sync = None

    def _sync_due(self, now: datetime) -> bool:
        if getattr(self.policy.sink, "sync", None) is None and not self.policy.repeat_interval:
            return False
        last = self._last_sync
        return last is None or abs((now - last).total_seconds()) >= SYNC_EVERY

    def _maintain(self, now: datetime) -> None:
        """Every SYNC_EVERY: re-post firing alerts to an Alertmanager sink, queue repeats."""
        if not self._sync_due(now) or not self._hold():
            return
        self._last_sync = now
        policy = self.policy
        sync = getattr(policy.sink, "sync", None)
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
                log.warning("alert re-sync failed", extra={**self._extra, "detail": str(exc)})
        if policy.repeat_interval:
            self._queue_repeats(mine, now)

    def _queue_repeats(self, firing: list[EventView], now: datetime) -> None:
        interval = self.policy.repeat_interval
        assert interval is not None
        for event in firing:
            if event.kind not in FAMILIES or event.severity != "critical":
                continue
            last = self._outbox.last_delivery(self.key, event.row_id)
            if last is None or last[0] != "delivered" or last[1] is None:
                continue  # never routed to this lane, or a delivery still pending
            if (now - last[1]).total_seconds() >= interval:
                self._outbox.requeue(self.key, event.row_id, now)


class DeliveryWorker:
    """The lanes of every sink: started by the daemon, drained by ``check``.

    ``holder`` names this process in the lanes' leases (default: :func:`default_holder`);
    two workers must never share one."""

    def __init__(
        self,
        *,
        outbox: Outbox,
        policies: Sequence[SinkPolicy],
        metrics: Metrics,
        clock: Clock,
        targets: Collection[str] = (),
        holder: str | None = None,
        lease_margin: float = LEASE_MARGIN,
    ) -> None:
        self._outbox = outbox
        self._stop = threading.Event()
        self.leases = LaneLeases(outbox.engine, holder=holder or default_holder())
        self._lanes = [
            _Lane(
                policy,
                outbox=outbox,
                leases=self.leases,
                lease_margin=lease_margin,
                metrics=metrics,
                clock=clock,
                targets=set(targets),
                stop=self._stop,
            )
            for policy in policies
        ]
        self._keys = [lane.key for lane in self._lanes]
        self._metrics = metrics
        self._threads: list[threading.Thread] = []
        self._recount = threading.Event()

    def wake(self) -> None:
        for lane in self._lanes:
            lane.wake.set()
        self._recount.set()

    def start(self) -> None:
        self._threads = [self._thread(lane.loop, lane.thread_name) for lane in self._lanes]
        if self._lanes:
            self._threads.append(self._thread(self._count_loop, "deliver:pending"))

    def _count_loop(self) -> None:
        """The pending gauge, apart from the lanes: a lane stuck in a slow send must not
        leave its sink's count stale."""
        while not self._stop.is_set():
            with contextlib.suppress(StorageError):  # the lanes log the outage
                self._count()
            self._recount.wait(COUNT_EVERY)
            self._recount.clear()

    def _count(self) -> None:
        for sink, count in self._outbox.pending_counts(self._keys).items():
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
        threads = [self._thread(lane.drain, lane.thread_name, give_up) for lane in self._lanes]
        for thread in threads:
            thread.join(max(0.0, give_up - time.monotonic()) + 0.5)
        self._count()
        return self._outbox.pending_count(self._keys)

    def sync_now(self) -> None:
        """Re-post firing alerts and queue repeats now instead of at the next period (in
        this thread, on every lane this process can hold)."""
        for lane in self._lanes:
            lane.sync_now()
            lane.run_once()

    @staticmethod
    def _thread(target: Callable[..., None], name: str, *args: Any) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        return thread
