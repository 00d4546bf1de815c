"""The recorder: writes the pollers' queued outcomes on a thread of its own.

Polls only queue what they saw (see :mod:`monitor.service`); this thread writes the queues in
order. While the database is down or frozen the writes wait here, and polling, the gauges and
``/readyz`` carry on; once it answers, everything queued is written with the times the polls
really happened.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from monitor.service import TargetPoller

__all__ = ["Recorder"]

log = logging.getLogger("monitor.recorder")

RETRY_FIRST = 0.5  # seconds before writing again after a database failure, doubling
RETRY_MAX = 5.0
STUCK_AFTER = 5.0  # a write running this long means the database is not answering


class Recorder:
    def __init__(self, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._dirty: dict[str, TargetPoller] = {}  # insertion order: oldest outcome first
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._monotonic = monotonic
        self._writing_since: float | None = None
        self._failing = False

    def mark(self, poller: TargetPoller) -> None:
        """``poller`` has outcomes to write (the pollers' ``on_pending``)."""
        with self._lock:
            self._dirty.setdefault(poller.name, poller)
            self._lock.notify()

    @property
    def healthy(self) -> bool:
        """False while the last write failed or a write has hung for STUCK_AFTER seconds."""
        since = self._writing_since
        stuck = since is not None and self._monotonic() - since > STUCK_AFTER
        return not (self._failing or stuck)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="recorder", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop after writing what the database takes within ``timeout`` seconds."""
        self._stop.set()
        with self._lock:
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("database did not answer at shutdown; unwritten poll outcomes are lost")

    def _loop(self) -> None:
        delay = RETRY_FIRST
        while True:
            with self._lock:
                while not self._dirty and not self._stop.is_set():
                    self._lock.wait(1.0)
                batch, self._dirty = self._dirty, {}
            if not batch and self._stop.is_set():
                return
            if self._write(batch):
                delay = RETRY_FIRST
                continue
            if self._stop.is_set():
                return
            self._stop.wait(delay)  # the database is away: try again later, not in a spin
            delay = min(RETRY_MAX, delay * 2)

    def _write(self, batch: dict[str, TargetPoller]) -> bool:
        """Write each target's queue; at the first failure keep the rest for later (the
        database is away: trying every other target now would only wait on it again)."""
        pollers = list(batch.values())
        for index, poller in enumerate(pollers):
            self._writing_since = self._monotonic()
            try:
                done = poller.flush()[1]
            except Exception:  # a bug must not end recording for every target
                log.exception("recording failed", extra={"target": poller.name})
                done = False
            finally:
                self._writing_since = None
            if not done:
                for left in pollers[index:]:
                    self.mark(left)
                self._failing = True
                return False
        self._failing = False
        return True
