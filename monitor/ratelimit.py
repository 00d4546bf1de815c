"""``max_requests_per_second``: requests to one base_url from this process, evenly spaced.

Each request reserves the next free moment (``1 / rate`` after the one before) and waits for
it; one that would have to wait past its deadline is refused at once instead, and the poll
fails as ``timeout`` like any request that could not finish in time. Spacing instead of a
bucket: 10,000 pools on one host never reach it in a burst.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["RateLimit"]


class RateLimit:
    def __init__(self, rate: float, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        if not rate > 0:
            raise ValueError("rate must be > 0")
        self.rate = rate
        self._spacing = 1.0 / rate
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._next = 0.0

    def acquire(self, deadline: float) -> bool:
        """Wait for this request's turn; False (without waiting) when it comes after
        ``deadline`` (monotonic)."""
        with self._lock:
            now = self._monotonic()
            start = max(now, self._next)
            if start > deadline:
                return False
            self._next = start + self._spacing
        if start > now:
            time.sleep(start - now)
        return True
