"""Replicas on one PostgreSQL database: membership, heartbeats, claims, clock skew (SPEC §10).

Each ``run`` process is a member with a row in ``replicas`` and holds the targets whose claim
rows name it (:mod:`monitor.storage.claims` has the SQL). Every ``tick`` a member sends one
heartbeat statement, which renews its row and all its claims and says how many replicas are
live and how many claims are free; then it evens out the split:

- it aims at ``ceil(targets / live replicas)`` targets: below that it claims free ones (no
  owner, or a lease run out: a replica killed without a word), above it, and only when no
  claim is free (so somebody is waiting for work: a newcomer), it releases its surplus;
- a claim gained is polled first at the target's next slot at or after half an interval past
  the previous owner's last poll (``poll_state.last_attempt_at``), not at once: slots are the
  same on every replica (the phase comes from the target's name, on database time), so a
  handover keeps one poll per interval; a target never polled, or overdue (its owner was
  killed), is polled soon, spread as at a start;
- a claim lost (our lease ran out while the database was away, and another replica took it)
  is dropped from the schedule;
- the state gauges of the targets other replicas poll are refreshed from the database, every
  half of the shortest interval (at most every heartbeat).

A clean stop releases every claim and removes the row, so the others take over at their next
tick. Leases are on the database clock; ``clock_skew`` is this replica's clock minus the
database's, measured at each heartbeat (half the round trip is the error bar).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import secrets
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Protocol

from monitor.errors import ConfigError, StorageError
from monitor.storage.claims import (
    Beat,
    Claimed,
    ClaimStore,
    Member,
    MirroredState,
    NameInUse,
    OtherKey,
)
from monitor.timeutil import Clock, utc_now

__all__ = [
    "LEASE",
    "Cluster",
    "Holder",
    "default_replica_name",
    "key_check",
    "tick_for",
]

log = logging.getLogger("monitor.cluster")

LEASE: Final = 10.0  # seconds a claim or a member row lives without a heartbeat
TICK_MAX: Final = 2.0  # seconds between heartbeats at most (a claim survives four missed)
TICK_MIN: Final = 0.5
LEAVE_WAIT: Final = 2.0  # seconds a stopping replica waits for the database to take its leave


def default_replica_name() -> str:
    """Host name plus a random suffix: unique per process, and a pod's name says which pod."""
    return f"{socket.gethostname()[:100]}-{secrets.token_hex(3)}"


def key_check(key: bytes) -> str:
    """Says which fingerprint key a replica uses without saying the key: replicas with
    different keys would give one configuration different hashes (a change at each handover)."""
    return hmac.new(key, b"genauth-monitor replica key check", hashlib.sha256).hexdigest()[:32]


def tick_for(intervals: Sequence[float]) -> float:
    """Seconds between heartbeats: often enough that the mirrored gauges are at most one
    interval old, never more than TICK_MAX."""
    shortest = min(intervals, default=TICK_MAX)
    return max(TICK_MIN, min(TICK_MAX, shortest))


class Holder(Protocol):
    """What the cluster asks of the scheduler and the pollers."""

    def hold(
        self, name: str, *, not_before: datetime, skew: timedelta, soon: bool = False
    ) -> None: ...

    def drop(self, name: str) -> None: ...


@dataclass(frozen=True, slots=True)
class _Held:
    epoch: int


class Cluster:
    """One replica's membership and its share of ``targets`` (name -> interval in seconds)."""

    def __init__(
        self,
        *,
        claims: ClaimStore,
        targets: Mapping[str, float],
        holder: Holder,
        key_check: str,
        on_mirror: Callable[[list[MirroredState]], None],
        on_beat: Callable[[int, int, float], None],
        on_claimed: Callable[[list[str]], None] = lambda _names: None,
        clock: Clock = utc_now,
        tick: float | None = None,
    ) -> None:
        self.claims = claims
        self.name = claims.me
        self._targets = dict(targets)
        self._names = sorted(targets)
        self._holder = holder
        self._key_check = key_check
        self._on_mirror = on_mirror
        self._on_beat = on_beat
        self._on_claimed = on_claimed
        self._clock = clock
        self.tick = tick if tick is not None else tick_for(list(targets.values()))
        # The other replicas' targets' gauges are read from the database every half of the
        # shortest interval (so never more than an interval old), not at every heartbeat: at
        # 10,000 targets and 60 s a read every 2 s was most of a replica's coordination cost.
        self.mirror_every = max(self.tick, min(targets.values(), default=self.tick) / 2)
        self._mirrored_at: datetime | None = None
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.skew = 0.0  # seconds: our clock minus the database's

    # -- membership --------------------------------------------------------------------------

    def join(self) -> None:
        """Become a member, or stop the program (exit 2) when a live replica has our name.
        A row of our name left by a killed process of this host is taken over."""
        host, pid = socket.gethostname(), os.getpid()
        try:
            try:
                self.claims.join(host=host, pid=pid, key_check=self._key_check, targets=self._names)
            except NameInUse as taken:
                if not _dead_here(taken.holder.host, taken.holder.pid, host):
                    raise
                log.warning(
                    "a killed process of this host had this replica name; taking over",
                    extra={"replica": self.name, "pid": taken.holder.pid},
                )
                self.claims.join(
                    host=host,
                    pid=pid,
                    key_check=self._key_check,
                    targets=self._names,
                    may_replace=taken.holder,
                )
        except NameInUse as exc:
            raise ConfigError(
                [f"cluster.replica_name: {exc}; give each replica its own name"]
            ) from None
        except OtherKey as exc:
            raise ConfigError([f"monitor.fingerprint_key_env: {exc}"]) from None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="cluster", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop claiming, then give every claim back and leave, if the database answers
        within LEAVE_WAIT seconds (else the leases run out: the SIGKILL case)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(LEAVE_WAIT)
        leaving = threading.Thread(target=self._leave, name="cluster-leave", daemon=True)
        leaving.start()
        leaving.join(LEAVE_WAIT)
        if leaving.is_alive():
            log.warning("the database did not answer; our claims lapse with their leases")

    def _leave(self) -> None:
        try:
            self.claims.leave()
        except StorageError as exc:
            log.warning("could not release our claims", extra={"detail": str(exc)})
            return
        log.info("left the cluster; claims released", extra={"replica": self.name})

    # -- what it holds -----------------------------------------------------------------------

    def held(self) -> dict[str, int]:
        """Targets this replica holds, with the epoch of each claim."""
        with self._lock:
            return {name: held.epoch for name, held in self._held.items()}

    def epoch(self, name: str) -> int | None:
        """The epoch of our claim on ``name``, None when we do not hold it (a poll's outcome
        carries it, and its write is fenced by it)."""
        held = self._held.get(name)  # one dict read: atomic, no lock on the poll path
        return held.epoch if held is not None else None

    def members(self) -> list[Member]:
        return self.claims.members()

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except StorageError as exc:
                # The database is away: our claims run out with their leases, and the targets
                # stay scheduled here meanwhile (their outcomes are queued, then fenced).
                log.warning("heartbeat failed", extra={"detail": str(exc)})
            except Exception:  # a bug must not end the membership silently
                log.exception("cluster step failed")
            self._stop.wait(self.tick)

    def step(self) -> None:
        """One heartbeat and what follows from it."""
        sent = self._clock()
        beat = self.claims.beat(self._names)
        answered = self._clock()
        self.skew = ((sent + (answered - sent) / 2) - beat.db_now).total_seconds()
        if not beat.member:
            self._lost_membership()
            return
        owned = len(self._follow(beat))
        quota = math.ceil(len(self._names) / max(beat.live, 1))
        if owned > quota and beat.free == 0:
            self._release_surplus(list(self.held()), owned - quota)
        elif owned < quota and beat.free > 0:
            self._gain(self.claims.claim(self._names, quota - owned), beat.db_now)
        held = self.held()
        self._on_beat(beat.live, len(held), self.skew)
        if self._mirror_due():
            self._on_mirror(self.claims.states([n for n in self._names if n not in held]))

    def _mirror_due(self) -> bool:
        """True the first time, when due, or when the clock went back (and it is noted)."""
        now = self._clock()
        last = self._mirrored_at
        if last is not None and 0 <= (now - last).total_seconds() < self.mirror_every:
            return False
        self._mirrored_at = now
        return True

    def _follow(self, beat: Beat) -> dict[str, int]:
        """Drop what another replica took; give back what we hold but do not schedule (a
        claim renewed for a name we had before a restart). Returns what we hold now."""
        with self._lock:
            lost = [name for name in self._held if name not in beat.owned]
            for name in lost:
                del self._held[name]
            stray = [name for name in beat.owned if name not in self._held]
        for name in lost:
            log.warning("claim lost to another replica", extra={"target": name})
            self._holder.drop(name)
        if stray:
            self.claims.release(stray)
        return self.held()

    def _release_surplus(self, owned: list[str], count: int) -> None:
        # Let go of the targets we like least (the inverse of the order we claim in), so the
        # replicas do not trade the same targets back and forth.
        surplus = sorted(owned, key=lambda name: _preference(name, self.name))[-count:]
        with self._lock:
            for name in surplus:
                self._held.pop(name, None)
        for name in surplus:
            self._holder.drop(name)
        self.claims.release(surplus)
        log.info("released targets for another replica", extra={"targets": len(surplus)})

    def _gain(self, claimed: list[Claimed], db_now: datetime) -> None:
        if not claimed:
            return
        # The targets' states in one read, not one transaction each: a replica taking a
        # thousand targets would otherwise miss its own heartbeats for seconds, and lose them.
        self._on_claimed([c.target for c in claimed])
        skew = timedelta(seconds=self.skew)
        for one in claimed:
            interval = timedelta(seconds=self._targets[one.target])
            last = one.last_attempt_at
            # Never polled, or overdue (its owner was killed, or no daemon ran): poll soon,
            # spread as at a start; else at the slot after the previous owner's last poll.
            soon = last is None or last + interval <= db_now
            earliest = db_now if last is None else max(db_now, last + interval / 2)
            with self._lock:
                self._held[one.target] = _Held(one.epoch)
            self._holder.hold(one.target, not_before=earliest + skew, skew=skew, soon=soon)
            log.debug("target claimed", extra={"target": one.target, "epoch": one.epoch})
        log.info("targets claimed", extra={"targets": len(claimed)})

    def _lost_membership(self) -> None:
        """Our row is gone or another process's: hold nothing, and join again."""
        with self._lock:
            dropped, self._held = list(self._held), {}
        for name in dropped:
            self._holder.drop(name)
        log.error("this replica's membership was lost; joining again", extra={"replica": self.name})
        try:
            self.join()
        except ConfigError as exc:
            log.error("cannot join again", extra={"detail": "; ".join(exc.problems)})


def _preference(target: str, replica: str) -> str:
    """The order a replica claims free targets in (as the claim statement orders them)."""
    return hashlib.md5((target + replica).encode(), usedforsecurity=False).hexdigest()


def _dead_here(host: str, pid: int, this_host: str) -> bool:
    """True when the process ``pid`` of ``host`` is this host's and no longer runs."""
    if host != this_host or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # it runs, as another user
    return False
