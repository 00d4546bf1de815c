"""``verify`` on demand for the web view, without letting a token holder load the daemon.

A check walks the whole audit chain, so it runs on a thread of its own, one at a time, and
not more often than every ``min_interval`` seconds: asking again sooner, or while one runs,
only shows the result kept from the last run, with the time it was taken.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from monitor.errors import StorageError
from monitor.storage.chain import ChainReport
from monitor.timeutil import Clock

__all__ = ["MIN_INTERVAL", "ChainCheck", "CheckResult", "CheckState"]

log = logging.getLogger("monitor.web")

MIN_INTERVAL: Final = 60.0  # seconds between the starts of two checks


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One finished check: a report, or why there is none (the database could not be read)."""

    started_at: datetime
    finished_at: datetime
    report: ChainReport | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class CheckState:
    running_since: datetime | None
    last: CheckResult | None
    next_allowed_at: datetime | None  # a new check may start from then on (None: now)


class ChainCheck:
    """Runs ``verify`` (a function returning a ChainReport) on demand, one run at a time."""

    def __init__(
        self,
        verify: Callable[[], ChainReport],
        *,
        clock: Clock,
        min_interval: float = MIN_INTERVAL,
    ) -> None:
        self._verify = verify
        self._clock = clock
        self._min_interval = timedelta(seconds=min_interval)
        self._lock = threading.Lock()
        self._running_since: datetime | None = None
        self._last_start: datetime | None = None
        self._last: CheckResult | None = None
        self._done = threading.Event()

    def start(self) -> bool:
        """Start a check unless one runs or the last started less than ``min_interval`` ago;
        whether one was started."""
        with self._lock:
            now = self._clock()
            if self._running_since is not None:
                return False
            if self._last_start is not None and now < self._last_start + self._min_interval:
                return False
            self._running_since = self._last_start = now
            self._done = threading.Event()
            thread = threading.Thread(target=self._run, args=(now,), name="ui-verify", daemon=True)
        thread.start()
        return True

    def state(self) -> CheckState:
        with self._lock:
            allowed = None
            if self._last_start is not None and self._clock() < (
                self._last_start + self._min_interval
            ):
                allowed = self._last_start + self._min_interval
            return CheckState(self._running_since, self._last, allowed)

    def wait(self, timeout: float) -> bool:
        """Wait for the check in progress (if any) to end; for tests and the screenshot script."""
        with self._lock:
            done = self._done if self._running_since is not None else None
        return done is None or done.wait(timeout)

    def _run(self, started: datetime) -> None:
        report, error = None, None
        try:
            report = self._verify()
        except StorageError as exc:
            error = f"could not check: {exc}"
        except Exception:  # a bug of ours: say so on the page, the traceback goes to the log
            log.exception("audit chain check failed")
            error = "could not check: internal error (see the daemon's log)"
        with self._lock:
            self._last = CheckResult(started, self._clock(), report, error)
            self._running_since = None
            self._done.set()
