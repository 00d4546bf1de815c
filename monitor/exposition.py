"""What ``/metrics`` serves: the exposition rendered at most once a second however many
scrapers ask, and rendered *ahead* of the scrapes it expects.

A render of 10,000 targets takes 15-20 ms of CPU, and in a busy daemon several times that of
waiting for the GIL behind the poll threads (zlib gives the GIL up for each block it writes),
all of it on the HTTP server's event loop. Scrapers are periodic: each one (its address, and
whether it takes gzip) is expected again one period after its last scrape, the period being
the gap between its last two. The ``metrics-lines`` thread renders for it a quarter of a
second before then, so the scrape finds the answer made and only sends it.

- At most one render ahead per expected scrape: a scraper that stops, or changes its
  period, costs one render, never one a second. A scrape that comes earlier, later (its
  render past a second old) or unexpected is rendered as it asks, as without any of this.
- A render serves every scraper within its second; only the forms asked for (plain, gzip)
  are made and kept.
- Scrapers are told apart by address: two behind one proxy look like one scraper with an
  irregular period, so their renders ahead come at the wrong times (at most one wasted render
  per scrape) and they are answered as without any of this.
- At most 16 scrapers are remembered (the least recent forgotten), and one not seen for
  10 minutes is expected no more.
"""

from __future__ import annotations

import gzip
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = ["Exposition"]

MAX_AGE: Final = 1.0  # seconds a render is served for
LEAD: Final = 0.25  # seconds before an expected scrape its render is made
FORGET_AFTER: Final = 600.0  # seconds after which a scraper not seen again is not expected
MAX_SCRAPERS: Final = 16


@dataclass(slots=True)
class _Scraper:
    last: float  # when it last scraped
    period: float | None  # the gap between its last two scrapes
    ready: bool = False  # its next scrape has been rendered ahead


class Exposition:
    """``render`` gives the plain text; ``render_gzip`` the same compressed (by default
    ``render``'s, compressed); ``clock`` is monotonic seconds."""

    def __init__(
        self,
        render: Callable[[], bytes],
        clock: Callable[[], float] = time.monotonic,
        render_gzip: Callable[[], bytes] | None = None,
    ) -> None:
        self._render = render
        self._render_gzip = render_gzip
        self._clock = clock
        self._lock = threading.Lock()
        self._at = -math.inf
        self._plain: bytes | None = None
        self._gzip: bytes | None = None
        self._scrapers: dict[tuple[str, bool], _Scraper] = {}

    def get(self, *, gzipped: bool, scraper: str = "") -> bytes:
        """The exposition for a scrape by ``scraper`` (its address)."""
        with self._lock:
            now = self._clock()
            self._saw((scraper, gzipped), now)
            self._fresh_for(now, now)
            return self._made(gzipped)

    def ahead_in(self) -> float | None:
        """Seconds until a render ahead is due (0 if now), None if no scrape is expected."""
        with self._lock:
            now = self._clock()
            due = [at for at, _, _ in self._expected(now)]
            return max(min(due) - now, 0.0) if due else None

    def render_ahead(self) -> bool:
        """Render now for the scrapes due (within :data:`LEAD` seconds, or late); whether
        there were any."""
        with self._lock:
            now = self._clock()
            due = [(gzipped, seen) for at, gzipped, seen in self._expected(now) if at <= now]
            if not due:
                return False
            for _, seen in due:
                seen.ready = True
            # A render still young enough at the scrape (another scraper's, just made) serves.
            self._fresh_for(now + LEAD, now)
            for gzipped in sorted({gzipped for gzipped, _ in due}):
                self._made(gzipped)
            return True

    def _expected(self, now: float) -> list[tuple[float, bool, _Scraper]]:
        """(when to render, gzip or not, the scraper) of each scraper expected again."""
        return [
            (seen.last + seen.period - LEAD, gzipped, seen)
            for (_, gzipped), seen in self._scrapers.items()
            if seen.period is not None and not seen.ready and now - seen.last < FORGET_AFTER
        ]

    def _saw(self, key: tuple[str, bool], now: float) -> None:
        seen = self._scrapers.pop(key, None)
        self._scrapers[key] = _Scraper(now, None if seen is None else now - seen.last)
        while len(self._scrapers) > MAX_SCRAPERS:
            del self._scrapers[next(iter(self._scrapers))]  # the least recent

    def _fresh_for(self, moment: float, now: float) -> None:
        """Drop the render kept if it would be past MAX_AGE at ``moment``; the next one made is
        of ``now``."""
        if moment - self._at > MAX_AGE:
            self._plain = self._gzip = None
            self._at = now

    def _made(self, gzipped: bool) -> bytes:
        if not gzipped:
            if self._plain is None:
                self._plain = self._render()
            return self._plain
        if self._gzip is None:
            if self._plain is None and self._render_gzip is not None:
                self._gzip = self._render_gzip()
            else:
                self._gzip = gzip.compress(self._plain or self._render(), compresslevel=1)
        return self._gzip
