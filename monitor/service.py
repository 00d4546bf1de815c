"""One poll of one target: fetch -> redact -> hash -> events -> store, and the gauges.

A poll's outcome is queued before it is written, so a database outage loses nothing: the queue
is written in order once the database answers again (events computed then, with the times the
polls really happened). Repeated sightings of the same snapshot collapse into one queue entry.

The daemon polls and writes on different threads (``write_inline=False``): a poll fetches,
judges, sets the gauges and queues its outcome, and the recorder (:mod:`monitor.recorder`)
writes the queues. A slow or frozen database therefore never stops polling, and ``up`` and the
state gauges tell the truth meanwhile. ``check`` writes inline, to print what it recorded.

A poll that has not finished within its deadline is a failed poll (``timeout``) as soon as the
deadline passes (:meth:`TargetPoller.expire_if_overdue`, called by a watchdog); its late outcome
is discarded. A bug inside a poll is a failed poll too (``internal``), never silence.

With replicas each outcome carries the epoch of the claim it was polled under (``claim``), and
its write is fenced by it (:meth:`monitor.storage.Store._fence`). An outcome whose claim was
lost by the time it is written (the database was away from this replica while another took the
target over) is dropped when it is an unchanged sighting or a failure: the new owner's polls say
as much. A change is still recorded, against the state the database has then, unless that state
is the same (it collapses by hash) or was recorded after this change was seen (a newer state:
recording the older one would roll the history back).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from monitor.core import (
    EventDraft,
    baseline_events,
    baseline_mismatches,
    failure_events,
    fingerprint,
    is_secret_key,
    recovery_events,
    redact,
    snapshot_events,
    snapshot_hash,
)
from monitor.core.alerting import apply_ignore
from monitor.core.canonical import UnusableDocument
from monitor.errors import ClaimLost, StorageError, UpstreamError
from monitor.metrics import Metrics
from monitor.storage import FailureRecord, Store, TargetState
from monitor.storage.store import (
    NewSnapshot,
    Sighting,
    StaleStateError,
    document_of,
    document_text,
)
from monitor.timeutil import Clock

__all__ = ["Fetcher", "PollResult", "TargetPoller"]

log = logging.getLogger("monitor.poll")

# Beyond this many unwritten outcomes (a very long database outage) the oldest are dropped;
# sightings of an unchanged snapshot collapse, so this bounds failures and changes only.
MAX_PENDING = 10_000


class Fetcher(Protocol):
    def fetch_email_provider(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class _Judged:
    """A redacted answer as a poller keeps it between polls, the document as its stored text
    (:func:`document_text`)."""

    key: bytes  # the raw answer's key (_answer_key)
    text: str
    hash: str
    drift: bool
    enabled: bool
    provider_type: str | None

    @property
    def document(self) -> Any:
        return document_of(self.text)


@dataclass(slots=True)
class _Seen:
    at: datetime  # the first sighting: a change is dated when it was first seen
    judged: _Judged
    times: int = 1
    last_at: datetime | None = None  # the latest sighting, when sightings were collapsed
    writing: bool = False  # being written: later sightings must not collapse into it
    epoch: int | None = None  # the claim it was polled under (replicas)

    @property
    def seen_last(self) -> datetime:
        return self.last_at or self.at

    @property
    def hash(self) -> str:
        return self.judged.hash

    @property
    def drift(self) -> bool:
        return self.judged.drift

    @property
    def document(self) -> Any:
        return self.judged.document


@dataclass(slots=True)
class _Failed:
    at: datetime
    failure: FailureRecord
    epoch: int | None = None


@dataclass(frozen=True, slots=True)
class PollResult:
    """What one poll found, for ``check`` and the scheduler."""

    target: str
    ok: bool
    hash: str | None = None
    text: str | None = None  # the redacted document as JSON (see _Judged)
    drift: bool = False
    error: UpstreamError | None = None
    events: list[EventDraft] = field(default_factory=list)
    stored: bool = True
    failures_in_a_row: int = 0

    @property
    def document(self) -> Any:
        return document_of(self.text)


# The queue of a target with nothing to write: shared, so an idle target holds no deque of its
# own (an empty deque is about 600 bytes; 10,000 targets spend most of their time idle). Only
# _queue appends, and it swaps in a deque of the target's own first.
_NOTHING_PENDING: deque[Any] = deque(maxlen=0)


def _answer_key(data: dict[str, Any]) -> bytes:
    """A digest that is equal for two parsed answers exactly when they are the same JSON, types
    and key order included (``1``, ``1.0`` and ``true`` differ): it stands in for the previous
    raw answer, which costs about 2 KB per target to keep. Equal answers that differ only in
    key order get different keys and are simply judged again (same hash)."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), check_circular=False)
    return hashlib.sha256(text.encode("ascii")).digest()


class TargetPoller:
    """Polls one target; one instance per target, never called concurrently.

    Kept for the daemon's life, one per target: slots, and nothing per target that can be
    shared (see ``_NOTHING_PENDING``, ``_answer_key``)."""

    __slots__ = (
        "_abandoned",
        "_clock",
        "_expect",
        "_fetcher",
        "_ignore",
        "_in_flight",
        "_key",
        "_last_answer",
        "_lock",
        "_metrics",
        "_pending",
        "_state",
        "_store",
        "_threshold",
        "_write_inline",
        "_write_lock",
        "claim",
        "deadline",
        "failures_in_a_row",
        "name",
        "on_pending",
    )

    def __init__(
        self,
        *,
        name: str,
        fetcher: Fetcher,
        store: Store,
        metrics: Metrics,
        fingerprint_key: bytes,
        expect: Mapping[str, Any],
        failure_threshold: int,
        clock: Clock,
        ignore: Sequence[str] = (),
        deadline: float = 20.0,
        write_inline: bool = True,
        on_pending: Callable[[TargetPoller], None] | None = None,
        claim: Callable[[], int | None] | None = None,
    ) -> None:
        self.name = name
        # The epoch of this replica's claim on the target now (None: not held); unset
        # without replicas.
        self.claim = claim
        self._fetcher = fetcher
        self._store = store
        self._metrics = metrics
        self._key = fingerprint_key
        self._expect = _protect_expectations(expect, fingerprint_key)
        self._ignore = tuple(ignore)
        self._threshold = failure_threshold
        self._clock = clock
        self._state: TargetState | None = None
        self._pending: deque[_Seen | _Failed] = _NOTHING_PENDING
        self._last_answer: _Judged | None = None
        self.failures_in_a_row = 0
        self.deadline = deadline
        self._write_inline = write_inline
        # Called with this poller when it has outcomes to write (the recorder's ``mark``:
        # one bound method for every poller, not a closure each).
        self.on_pending = on_pending
        self._lock = threading.Lock()  # the queue and the in-flight mark
        self._write_lock = threading.Lock()  # one writer of this target's queue at a time
        self._in_flight: float | None = None  # monotonic start of the poll running now
        self._abandoned = False  # that poll overran its deadline and was counted as failed

    def restore(self, state: TargetState) -> None:
        """Start from a state read at start-up, and show it in the gauges before any poll."""
        self._metrics.declare_target(self.name)
        self._state = state
        self.failures_in_a_row = state.consecutive_failures
        if state.hash is not None and state.enabled is not None:
            self._metrics.set_config(
                self.name,
                enabled=state.enabled,
                provider_type=state.provider_type,
                hash_=state.hash,
                drift=state.drift,
            )
            self._metrics.set_last_change(self.name, state.last_change_at)
        if state.up is not None:
            self._metrics.set_up(self.name, state.up, state.last_success_at)

    def poll(self) -> PollResult:
        started = time.perf_counter()
        now = self._clock()
        with self._lock:
            self._in_flight, self._abandoned = time.monotonic(), False
        try:
            observed: _Judged | UpstreamError = self._observe()
        except Exception as exc:
            # A bug of ours (never an upstream fault): a failed poll, loudly, with the traceback.
            log.exception("poll failed: internal error", extra={"target": self.name})
            observed = UpstreamError(
                "internal", f"internal error in the poll ({type(exc).__name__}); see the log"
            )
        with self._lock:
            abandoned, self._in_flight = self._abandoned, None
        if abandoned:
            log.warning(
                "a poll that overran its deadline finished; its outcome is discarded",
                extra={"target": self.name, "seconds": round(time.perf_counter() - started, 1)},
            )
            return PollResult(
                self.name,
                False,
                error=self._overdue_error(),
                stored=False,
                failures_in_a_row=self.failures_in_a_row,
            )
        if isinstance(observed, UpstreamError):
            return self._failed(observed, now, started)
        self.failures_in_a_row = 0
        self._metrics.set_config(
            self.name,
            enabled=observed.enabled,
            provider_type=observed.provider_type,
            hash_=observed.hash,
            drift=observed.drift,
        )
        self._metrics.set_up(self.name, True, now)
        self._enqueue_seen(_Seen(now, observed, epoch=self._epoch()))
        events, stored = self._written()
        self._metrics.observe_poll(self.name, "success", time.perf_counter() - started)
        return PollResult(
            self.name,
            True,
            observed.hash,
            observed.text,
            observed.drift,
            events=events,
            stored=stored,
        )

    def _observe(self) -> _Judged | UpstreamError:
        """Fetch and judge; an upstream fault or an unusable answer as an UpstreamError."""
        try:
            data = self._fetcher.fetch_email_provider()
        except UpstreamError as error:
            return error
        try:
            return self._judged(data)
        except (UnusableDocument, RecursionError, UnicodeError) as exc:
            # JSON that parses but is not I-JSON (a lone surrogate, absurd nesting) must count
            # as a failure, raise poll_failing and turn `up` to 0, never pass silently.
            return UpstreamError(
                "invalid_response",
                f"get-email-provider: answer cannot be canonicalised ({type(exc).__name__})",
            )

    def expire_if_overdue(self, now: float) -> bool:
        """Count the poll in flight as failed once it has run past its deadline (monotonic
        ``now``); True when it did. Called by a watchdog thread, never by the poll itself."""
        with self._lock:
            if self._in_flight is None or self._abandoned or now - self._in_flight < self.deadline:
                return False
            self._abandoned = True
        self._failed(self._overdue_error(), self._clock(), time.perf_counter() - self.deadline)
        return True

    def _epoch(self) -> int | None:
        return self.claim() if self.claim is not None else None

    def _overdue_error(self) -> UpstreamError:
        return UpstreamError(
            "timeout", f"get-email-provider: poll did not finish within {self.deadline:g} s"
        )

    def _judged(self, data: dict[str, Any]) -> _Judged:
        """The redacted document, its hash and its baseline verdict, reused while the upstream
        answers the same.

        Redaction and JCS are most of a poll's own CPU; an unchanged answer (the common case)
        is recognised by a strict comparison with the previous raw answer instead, by its
        digest (:func:`_answer_key`); the raw answer itself is not kept.
        """
        key = _answer_key(data)
        last = self._last_answer
        if last is not None and key == last.key:
            return last
        document = redact(data, self._key)
        text = document_text(document)
        state = self._state
        if state is not None and state.document_text == text:
            text = state.document_text  # one string for both (after a restart, say)
        judged = _Judged(
            key,
            text,
            snapshot_hash(document),
            bool(baseline_mismatches(document, self._expect)),
            document.get("enabled") is True,
            _type_of(document),
        )
        self._last_answer = judged
        return judged

    def _failed(self, error: UpstreamError, now: datetime, started: float) -> PollResult:
        self.failures_in_a_row += 1
        log.warning(
            "poll failed",
            extra={
                "target": self.name,
                "reason": error.reason,
                "http_status": error.http_status,
                "api_code": error.api_code,
                "request_id": error.request_id,
                "detail": error.message,
                "failures_in_a_row": self.failures_in_a_row,
            },
        )
        self._metrics.set_up(self.name, False, None)
        failure = FailureRecord(
            reason=error.reason,
            message=error.message,
            http_status=error.http_status,
            api_code=error.api_code,
            request_id=_bounded(error.request_id, 128),
        )
        with self._lock:
            self._queue(_Failed(now, failure, self._epoch()))
        events, stored = self._written()
        self._metrics.observe_poll(self.name, error.reason, time.perf_counter() - started)
        return PollResult(
            self.name,
            False,
            error=error,
            events=events,
            stored=stored,
            failures_in_a_row=self.failures_in_a_row,
        )

    def _enqueue_seen(self, seen: _Seen) -> None:
        with self._lock:
            last = self._pending[-1] if self._pending else None
            if (
                isinstance(last, _Seen)
                and not last.writing
                and last.hash == seen.hash
                and last.drift == seen.drift
                and last.epoch == seen.epoch
            ):
                last.last_at, last.times = seen.at, last.times + 1
            else:
                self._queue(seen)

    def _written(self) -> tuple[list[EventDraft], bool]:
        """Write the queue now (``check``), or leave it to the recorder (the daemon)."""
        if self._write_inline:
            return self.flush()
        if self.on_pending is not None:
            self.on_pending(self)
        return [], False

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _queue(self, outcome: _Seen | _Failed) -> None:
        if len(self._pending) == MAX_PENDING:
            log.error(
                "database unavailable for too long; dropping the oldest unwritten poll",
                extra={"target": self.name, "pending": len(self._pending)},
            )
        if self._pending is _NOTHING_PENDING:
            self._pending = deque(maxlen=MAX_PENDING)
        self._pending.append(outcome)

    def sighting(self, *, seal: bool) -> Sighting | None:
        """The queue as one batchable :class:`Sighting` when it holds a lone sighting of the
        current snapshot with nothing else to record (no event, no baseline or failure-count
        change); None otherwise, and then :meth:`flush` writes it. With ``seal``, polls from now
        on queue behind it until :meth:`sighting_written` or :meth:`unseal`."""
        with self._lock:
            state = self._state
            head = self._pending[0] if len(self._pending) == 1 else None
            if (
                not isinstance(head, _Seen)
                or state is None
                or state.snapshot_id is None
                or state.consecutive_failures
                or (head.hash, head.drift) != (state.hash, state.drift)
            ):
                return None
            head.writing = seal
            return Sighting(state, head.seen_last, head.times, head.epoch)

    def sighting_written(self, state: TargetState) -> None:
        """The sealed sighting is in the database; ``state`` is the target's state after it."""
        with self._lock:
            self._pop_head()
            more = bool(self._pending)
        self._state = state
        if more and self.on_pending is not None:
            self.on_pending(self)

    def unseal(self) -> None:
        """The sealed sighting was not written; later polls may collapse into it again."""
        with self._lock:
            if self._pending and isinstance(head := self._pending[0], _Seen):
                head.writing = False

    def flush(self) -> tuple[list[EventDraft], bool]:
        """Write queued outcomes in order; stop at the first database failure. Returns the
        events written and whether the queue is now empty."""
        with self._write_lock:
            written: list[EventDraft] = []
            try:
                while (head := self._head()) is not None:
                    try:
                        written.extend(self._apply(head))
                    except StorageError as exc:
                        if not exc.permanent:
                            raise
                        # The database refuses this outcome's data itself: retrying it would
                        # block every later poll of the target, so it is dropped, loudly.
                        log.error(
                            "poll outcome the database cannot store; dropped",
                            extra={"target": self.name, "detail": str(exc)},
                        )
                    with self._lock:
                        self._pop_head()
            except StorageError as exc:
                if isinstance(head, _Seen):
                    with self._lock:
                        head.writing = False
                log.error(
                    "cannot record poll; kept in memory until the database answers",
                    extra={"target": self.name, "detail": str(exc), "pending": self.pending},
                )
                return written, False
            return written, True

    def _pop_head(self) -> None:
        """Drop the written head (under ``_lock``); an emptied queue goes back to the shared
        empty one, so its memory goes with it."""
        self._pending.popleft()
        if not self._pending:
            self._pending = _NOTHING_PENDING

    def _head(self) -> _Seen | _Failed | None:
        with self._lock:
            if not self._pending:
                return None
            head = self._pending[0]
            if isinstance(head, _Seen):
                head.writing = True
            return head

    def _apply(self, outcome: _Seen | _Failed) -> list[EventDraft]:
        fenced = True
        for _ in range(3):
            state = self._state or self._store.ensure_target(self.name, now=outcome.at)
            self._state = state
            events = apply_ignore(self._events_for(state, outcome), self._ignore)
            try:
                self._state = self._write(state, outcome, events, fenced=fenced)
            except StaleStateError:
                # Another process (a `check` beside the daemon) recorded something since we
                # last looked: read the current state and judge the outcome against it.
                self._state = None
                continue
            except ClaimLost:
                if not self._news_after_lost_claim(outcome):
                    return []
                fenced = False  # a change the database lacks: recorded all the same
                continue
            break
        else:
            raise StorageError("the target's state kept changing under this writer")
        for event in events:
            self._metrics.count_event(self.name, event.kind)
            log.log(
                logging.INFO if event.severity == "info" else logging.WARNING,
                event.message,
                extra={"target": self.name, "kind": event.kind, "severity": event.severity},
            )
        if isinstance(outcome, _Seen):
            self._metrics.set_last_change(self.name, self._state.last_change_at)
        return events

    def _news_after_lost_claim(self, outcome: _Seen | _Failed) -> bool:
        """Whether an outcome written under a lost claim must still be recorded: only a change
        the database has neither the same nor a newer state for. Reads the state again."""
        self._state = state = self._store.ensure_target(self.name, now=outcome.at)
        if isinstance(outcome, _Failed):
            why = "a failure"
        elif outcome.hash == state.hash:
            why = "a state recorded already"
        elif state.last_change_at is not None and state.last_change_at >= outcome.at:
            why = "older than the state recorded since"
        else:
            log.warning(
                "claim lost; recording a change the new owner has not recorded",
                extra={"target": self.name, "new_hash": outcome.hash},
            )
            return True
        log.info("claim lost; poll outcome dropped", extra={"target": self.name, "outcome": why})
        return False

    def _write(
        self,
        state: TargetState,
        outcome: _Seen | _Failed,
        events: list[EventDraft],
        *,
        fenced: bool = True,
    ) -> TargetState:
        if isinstance(outcome, _Failed):
            return self._store.record_failure(
                state, outcome.failure, now=outcome.at, events_=events, epoch=outcome.epoch
            )
        if outcome.hash == state.hash:
            return self._store.record_unchanged(
                state,
                now=outcome.seen_last,
                times=outcome.times,
                drift=outcome.drift,
                events_=events,
                epoch=outcome.epoch,
            )
        written = self._store.record_snapshot(
            state,
            self._new_snapshot(outcome),
            now=outcome.at,
            last_seen=outcome.seen_last,
            times=outcome.times,
            events_=events,
            epoch=outcome.epoch,
            fenced=fenced,
        )
        self._log_change(state, outcome)
        return written

    def _events_for(self, state: TargetState, outcome: _Seen | _Failed) -> list[EventDraft]:
        if isinstance(outcome, _Failed):
            return failure_events(
                target=self.name,
                failures=state.consecutive_failures + 1,
                threshold=self._threshold,
                reason=outcome.failure.reason,
            )
        events = recovery_events(
            target=self.name,
            failures_before=state.consecutive_failures,
            threshold=self._threshold,
        )
        if outcome.hash != state.hash:
            return events + self._snapshot_events(state, outcome)
        # Same configuration, but the baseline may have changed (a new `expect` after a restart).
        return events + baseline_events(
            target=self.name,
            current=outcome.document,
            expect=self._expect,
            was_drifting=state.drift,
        )

    def _snapshot_events(self, state: TargetState, outcome: _Seen) -> list[EventDraft]:
        return snapshot_events(
            target=self.name,
            previous=state.document,
            current=outcome.document,
            expect=self._expect,
            was_drifting=state.drift,
        )

    def _new_snapshot(self, outcome: _Seen) -> NewSnapshot:
        judged = outcome.judged
        return NewSnapshot(
            hash=judged.hash,
            text=judged.text,
            enabled=judged.enabled,
            provider_type=judged.provider_type,
            drift=judged.drift,
        )

    def _log_change(self, before: TargetState, outcome: _Seen) -> None:
        log.info(
            "configuration changed" if before.hash else "first snapshot recorded",
            extra={"target": self.name, "old_hash": before.hash, "new_hash": outcome.hash},
        )


def _protect_expectations(expect: Mapping[str, Any], key: bytes) -> dict[str, Any]:
    """A baseline value at a secret path is compared as its fingerprint, like the document
    it is checked against, so the plaintext in the config never reaches an event or a sink."""
    return {
        path: fingerprint(key, value)
        if any(is_secret_key(part) for part in path.split("."))
        else value
        for path, value in expect.items()
    }


def _type_of(document: Any) -> str | None:
    """The provider type for the summary column and metric label (the document keeps it
    whole): bounded and without NUL, which PostgreSQL text cannot hold."""
    value = document.get("type")
    return _bounded(value, 64) if isinstance(value, str) else None


def _bounded(value: str | None, width: int) -> str | None:
    return value.replace("\x00", "")[:width] if value is not None else None
