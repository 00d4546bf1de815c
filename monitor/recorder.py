"""The recorder: writes the pollers' queued outcomes on a thread of its own.

Polls only queue what they saw (see :mod:`monitor.service`); this thread writes the queues in
order. While the database is down or frozen the writes wait here, and polling, the gauges and
``/readyz`` carry on; once it answers, everything queued is written with the times the polls
really happened.

Changes and failures are written as soon as they are queued. A poll that saw the current
snapshot again, the common case, only moves ``last_seen_at`` and the counters: such sightings
wait for the next tick (at most TICK seconds) and every target's are written in one
transaction. A run of changes longer than the tick (a fleet's first snapshots) stops at the tick
for them, so ``last_seen_at`` in the database is at most TICK (plus one write) behind;
a stop writes what is waiting, and a SIGKILL loses at most one tick of unchanged sightings,
never a change, a failure or an event.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from monitor.errors import ClaimLost, StaleStateError, StorageError
from monitor.service import TargetPoller
from monitor.storage import Store
from monitor.storage.store import Sighting

__all__ = ["Recorder"]

log = logging.getLogger("monitor.recorder")

TICK = 0.5  # seconds an unchanged sighting may wait to share a transaction with the others
RETRY_FIRST = 0.5  # seconds before writing again after a database failure, doubling
RETRY_MAX = 5.0
STUCK_AFTER = 5.0  # a write running this long means the database is not answering


class Recorder:
    def __init__(
        self, *, tick: float = TICK, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._dirty: dict[str, TargetPoller] = {}  # insertion order: oldest outcome first
        self._urgent = False  # a change or a failure is dirty: write before the tick
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store: Store | None = None
        self._tick = tick
        self._monotonic = monotonic
        self._writing_since: float | None = None
        self._failing = False

    def mark(self, poller: TargetPoller) -> None:
        """``poller`` has outcomes to write (the pollers' ``on_pending``). A lone unchanged
        sighting, the common case, does not wake the recorder: it waits for the tick anyway,
        and a wake per poll cost more CPU than writing the poll."""
        urgent = poller.sighting(seal=False) is None
        with self._lock:
            self._dirty.setdefault(poller.name, poller)
            if urgent:
                self._urgent = True
                self._lock.notify()

    @property
    def healthy(self) -> bool:
        """False while the last write failed or a write has hung for STUCK_AFTER seconds."""
        since = self._writing_since
        stuck = since is not None and self._monotonic() - since > STUCK_AFTER
        return not (self._failing or stuck)

    def start(self, store: Store) -> None:
        self._store = store
        self._thread = threading.Thread(target=self._loop, name="recorder", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop after writing what the database takes within ``timeout`` seconds."""
        self._stop.set()
        with self._lock:
            self._urgent = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("database did not answer at shutdown; unwritten poll outcomes are lost")

    def _loop(self) -> None:
        delay = RETRY_FIRST
        waiting: dict[str, TargetPoller] = {}  # lone unchanged sightings, for the next tick
        tick_at = self._monotonic() + self._tick
        while True:
            dirty = self._next_batch(tick_at if waiting else None)
            stopping = self._stop.is_set()
            now: dict[str, TargetPoller] = {}
            for name, poller in dirty.items():
                if poller.sighting(seal=False) is not None:
                    waiting.setdefault(name, poller)
                else:
                    waiting.pop(name, None)
                    now[name] = poller
            # A long run of changes (a fleet's first snapshots) yields to the tick, so the
            # sightings waiting for it are not starved past their bound.
            done = self._write(now, until=None if stopping or not waiting else tick_at)
            if done and (stopping or self._monotonic() >= tick_at):
                done = self._write_sightings(waiting)
                waiting = {}
                tick_at = self._monotonic() + self._tick
            if done:
                delay = RETRY_FIRST
                if stopping and not waiting and not self._dirty:
                    return
                continue
            if stopping:
                return
            self._stop.wait(delay)  # the database is away: try again later, not in a spin
            delay = min(RETRY_MAX, delay * 2)

    def _next_batch(self, tick_at: float | None) -> dict[str, TargetPoller]:
        """Wait for a change or failure to write, the tick (when sightings wait for it, else
        one tick from now, for sightings marked meanwhile) or the stop."""
        with self._lock:
            wake_at = self._monotonic() + self._tick if tick_at is None else tick_at
            while not self._urgent and not self._stop.is_set():
                left = wake_at - self._monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            batch, self._dirty = self._dirty, {}
            self._urgent = False
        return batch

    def _write(self, batch: dict[str, TargetPoller], *, until: float | None = None) -> bool:
        """Write each target's queue; at the first failure keep the rest for later (the
        database is away: trying every other target now would only wait on it again). Past
        ``until`` the rest waits for the next round too, and True says nothing failed."""
        pollers = list(batch.values())
        for index, poller in enumerate(pollers):
            if until is not None and index and self._monotonic() >= until:
                for left in pollers[index:]:
                    self.mark(left)
                return True
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

    def _write_sightings(self, waiting: dict[str, TargetPoller]) -> bool:
        """One transaction for every target whose queue is still a lone unchanged sighting;
        the others (a change queued behind it since) are written one by one."""
        sealed: list[TargetPoller] = []
        alone: dict[str, TargetPoller] = {}
        sightings: list[Sighting] = []
        for name, poller in waiting.items():
            sighting = poller.sighting(seal=True)
            if sighting is None:
                alone[name] = poller
            else:
                sealed.append(poller)
                sightings.append(sighting)
        if sightings and not self._record(sealed, sightings, alone):
            for poller in [*sealed, *alone.values()]:
                self.mark(poller)
            self._failing = True
            return False
        return self._write(alone)

    def _record(
        self,
        sealed: list[TargetPoller],
        sightings: list[Sighting],
        alone: dict[str, TargetPoller],
    ) -> bool:
        """Write the sealed sightings in one transaction; False when the database failed."""
        assert self._store is not None, "start() gives the recorder its store"
        self._writing_since = self._monotonic()
        try:
            states = self._store.record_sightings(sightings)
        except (StaleStateError, ClaimLost):
            # Another writer recorded a change for one of them, or another replica took one
            # over: one by one finds which (and drops what a lost claim makes stale).
            for poller in sealed:
                poller.unseal()
                alone[poller.name] = poller
            return True
        except StorageError as exc:
            log.error("cannot record unchanged polls; kept in memory", extra={"detail": str(exc)})
        except Exception:  # a bug must not end recording: keep them, say so loudly
            log.exception("recording unchanged polls failed")
        else:
            for poller, state in zip(sealed, states, strict=True):
                poller.sighting_written(state)
            return True
        finally:
            self._writing_since = None
        for poller in sealed:
            poller.unseal()
        return False
