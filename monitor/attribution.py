"""The attribution worker (SPEC §11): runs the pending lookups against each target's audit log.

One thread in the daemon (``attribution``); ``check`` runs it in its own thread until the
lookups it opened are settled or ``attribution_wait`` has passed. Each round:

1. queues the held deliveries of lookups past their deadline (``Attributions.release``), so no
   alert waits longer than ``attribution_wait`` whatever the audit log does;
2. claims each due lookup and asks the target's audit log over the window from the previous
   sighting to this one, widened by ``attribution_margin``;
3. settles it (``single``/``ambiguous`` at once; ``none`` once the retries over
   ``attribution_wait`` found nothing; ``unavailable`` at once for a permanent failure such as
   no permission, after the retries for a transient one), or sets its next attempt.

Lookups live in the database, so whichever process runs next (after a restart, or another
replica) finishes them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime

from monitor.audit_log import AuditLogError, AuditLogReader
from monitor.core.attribution import Verdict, judge, retry_at, window
from monitor.errors import StorageError
from monitor.metrics import Metrics
from monitor.storage.attribution import Attributions, Lookup
from monitor.timeutil import Clock

__all__ = ["AttributionWorker", "TargetLog"]

log = logging.getLogger("monitor.attribution")

ROUND_EVERY = 1.0  # seconds between rounds when nothing is due sooner
LEASE_SLACK = 5.0  # seconds a claim outlives the read's own deadline


@dataclass(frozen=True, slots=True)
class TargetLog:
    """One target's audit log and which resource types count (empty: every one)."""

    reader: AuditLogReader
    resource_types: tuple[str, ...] = ()


class AttributionWorker:
    def __init__(
        self,
        *,
        attributions: Attributions,
        logs: Mapping[str, TargetLog],
        metrics: Metrics,
        clock: Clock,
        margin: float,
    ) -> None:
        self._attributions = attributions
        self._logs = dict(logs)
        self._metrics = metrics
        self._clock = clock
        self._margin = margin
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the daemon's thread -----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="attribution", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop after the attempt in progress (the daemon aborts its HTTP request first)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            wait = ROUND_EVERY
            try:
                self.run_once()
                wait = self._seconds_to_next()
            except StorageError as exc:
                log.warning("attribution paused: database unavailable", extra={"detail": str(exc)})
            except Exception:  # a bug must not end attribution for good
                log.exception("attribution round failed")
            self._wake.wait(wait)
            self._wake.clear()

    # -- one round ---------------------------------------------------------------------------

    def run_once(self) -> int:
        """One attempt of each due lookup (the last one, at the deadline, settles), then the
        release of holds still past their deadline; the lookups settled."""
        now = self._clock()
        settled = 0
        for lookup in self._attributions.due(now):
            if self._stop.is_set():
                break
            settled += self._attempt(lookup)
        self._attributions.release(self._clock())
        return settled

    def _seconds_to_next(self) -> float:
        due = self._attributions.next_due()
        if due is None:
            return ROUND_EVERY
        return max(0.05, min(ROUND_EVERY, (due - self._clock()).total_seconds()))

    def settle(self, event_ids: Collection[int], timeout: float) -> int:
        """Run rounds until the lookups of these events are settled or ``timeout`` (monotonic
        seconds) passes (``check``); held deliveries still waiting are then released. The
        lookups left pending."""
        give_up = time.monotonic() + timeout
        while True:
            self.run_once()
            left = self._attributions.pending(event_ids)
            if not left or time.monotonic() >= give_up:
                break
            self._stop.wait(min(0.2, max(0.0, give_up - time.monotonic())))
        if left:
            # check is about to deliver: what is held goes out with what is known.
            self._attributions.release(self._clock(), event_ids)
        return len(left)

    def _attempt(self, lookup: Lookup) -> int:
        target_log = self._logs.get(lookup.target)
        if target_log is None:
            # A target no longer configured, or whose attribution was turned off since.
            return self._settle(lookup, Verdict("unavailable"), "target not attributed here")
        reader = target_log.reader
        if not self._attributions.claim(
            lookup, self._clock(), reader.deadline_seconds + LEASE_SLACK
        ):
            return 0
        span = window(lookup.since, lookup.until, self._margin)
        attempts = lookup.attempts + 1
        try:
            read = reader.read(span, resource_types=target_log.resource_types)
        except AuditLogError as exc:
            again = None if exc.permanent else self._next(lookup, attempts)
            if again is None:
                return self._settle(lookup, Verdict("unavailable"), str(exc))
            self._attributions.retry(lookup, attempts=attempts, at=again, error=str(exc))
            return 0
        verdict = judge(read.entries, span, resource_types=target_log.resource_types)
        if not read.complete and verdict.result == "single":
            # Entries beyond the page cap may name others: one admin is not proven.
            verdict = Verdict("ambiguous", verdict.actors)
        if verdict.result == "none":
            again = self._next(lookup, attempts)
            if again is not None:  # the log may lag behind the change: ask again
                self._attributions.retry(lookup, attempts=attempts, at=again, error=None)
                return 0
        return self._settle(lookup, verdict, None)

    def _next(self, lookup: Lookup, attempts: int) -> datetime | None:
        return retry_at(lookup.created_at, attempts, self._attributions.wait)

    def _settle(self, lookup: Lookup, verdict: Verdict, problem: str | None) -> int:
        if not self._attributions.settle(lookup, verdict, self._clock()):
            return 0  # another replica settled it first
        self._metrics.attributions.labels(target=lookup.target, result=verdict.result).inc()
        extra = {
            "target": lookup.target,
            "event_id": lookup.public_id,
            "kind": lookup.kind,
            "attribution": verdict.result,
            "admins": ",".join(verdict.admins[:5]),
        }
        if problem is not None:
            extra["detail"] = problem
        level = logging.WARNING if verdict.result in ("none", "unavailable") else logging.INFO
        log.log(level, "change attributed", extra=extra)
        return 1
