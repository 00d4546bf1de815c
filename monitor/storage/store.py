"""The write path of a poll: one transaction per outcome, events in the same transaction."""

from __future__ import annotations

import functools
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Engine, Integer, bindparam, insert, select, text, update
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from monitor.core import EventDraft
from monitor.core.alerting import SinkRoute
from monitor.errors import ClaimLost, StaleStateError
from monitor.storage import chain, outbox, transaction
from monitor.storage.attribution import Attributions
from monitor.storage.claims import HELD
from monitor.storage.engine import WRITE
from monitor.storage.schema import (
    UTCDateTime,
    events,
    poll_errors,
    poll_state,
    snapshots,
    targets,
)
from monitor.storage.transaction import Tx as _Tx

__all__ = [
    "FailureRecord",
    "NewSnapshot",
    "Sighting",
    "StaleStateError",
    "Store",
    "TargetState",
    "document_of",
    "document_text",
]

log = logging.getLogger("monitor.storage")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class TargetState:
    """What a poll needs to remember between polls of one target; mirrors the database."""

    target_id: int
    name: str
    snapshot_id: int | None = None
    hash: str | None = None
    document_text: str | None = None  # as stored (document_text): parsed only when read
    enabled: bool | None = None
    provider_type: str | None = None
    drift: bool = False
    up: bool | None = None
    consecutive_failures: int = 0
    last_success_at: datetime | None = None
    last_change_at: datetime | None = None

    @property
    def document(self) -> Any:
        return document_of(self.document_text)


def document_text(document: Any) -> str:
    """A redacted document as a snapshot row stores it, and as a daemon keeps it between polls:
    the text is a fifth of the parsed document's size (about 500 bytes against 2.3 KB per
    target), and only a change or a baseline check parses it again."""
    return json.dumps(document, sort_keys=True, ensure_ascii=False)


def document_of(text: str | None) -> Any:
    """The document of a :func:`document_text` (None for None)."""
    return None if text is None else json.loads(text)


@dataclass(frozen=True, slots=True)
class FailureRecord:
    """A failed poll as kept in the database (never the raw body, never a secret)."""

    reason: str
    message: str
    http_status: int | None = None
    api_code: int | None = None
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class Sighting:
    """Polls that saw a target's current snapshot again with nothing else to record (no
    event, no baseline change): what the recorder batches, many targets per transaction."""

    state: TargetState
    at: datetime  # the latest of the sightings
    times: int = 1
    epoch: int | None = None  # the claim they were polled under (replicas)


@dataclass(frozen=True, slots=True)
class NewSnapshot:
    hash: str
    text: str  # the redacted document as stored (document_text)
    enabled: bool
    provider_type: str | None
    drift: bool


# The statements of an unchanged poll, the hot path, built once: building them per call cost
# more CPU than executing them.
_SEEN_AGAIN = (
    update(snapshots)
    .where(snapshots.c.id == bindparam("p_snapshot"))
    .values(
        last_seen_at=bindparam("p_now", type_=UTCDateTime()),
        seen_count=snapshots.c.seen_count + bindparam("p_times", type_=Integer()),
    )
)
# Guarded by the snapshot this writer believes current: another process (a `check` beside
# the daemon) may have recorded a change since, and then this writer must look again.
_SUCCEEDED = (
    update(poll_state)
    .where(
        poll_state.c.target_id == bindparam("p_target"),
        poll_state.c.current_snapshot_id.is_not_distinct_from(
            bindparam("p_snapshot", type_=Integer())
        ),
    )
    .values(
        up=True,
        consecutive_failures=0,
        last_attempt_at=bindparam("p_now", type_=UTCDateTime()),
        last_success_at=bindparam("p_now", type_=UTCDateTime()),
    )
)


# A target's poll state with its current snapshot, as a poller resumes from it.
_STATE = (
    select(poll_state, snapshots)
    .select_from(poll_state)
    .outerjoin(snapshots, snapshots.c.id == poll_state.c.current_snapshot_id)
)
_CHUNK = 500  # targets per start-up transaction: bounded IN lists and statement sizes


class Store:
    """Writes of the poll path. Every method is one transaction; errors become StorageError."""

    def __init__(
        self,
        engine: Engine,
        *,
        routes: Sequence[SinkRoute] = (),
        on_outbox: Callable[[], None] | None = None,
        replica: str | None = None,
        attribution: Attributions | None = None,
    ) -> None:
        self.engine = engine
        # A replica's writes are fenced by its claims: each carries the epoch of the claim it
        # was polled under, and is refused (ClaimLost) when the claim has another owner or
        # epoch by the time it is written. None (SQLite, `check`): nothing is fenced.
        self._replica = replica
        self._writer = engine.execution_options(**{WRITE: True})
        self._routes = tuple(routes)
        # Called after a commit that queued deliveries, to wake the delivery worker.
        self._on_outbox = on_outbox
        # Opens the attribution lookup of each event in its transaction (SPEC §11).
        self._attribution = attribution

    def ping(self) -> bool:
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except SQLAlchemyError:
            return False
        return True

    def ensure_target(self, name: str, *, now: datetime) -> TargetState:
        """The stored state of target ``name``, creating the target on first use."""
        return self._write(lambda tx: self._ensure_target(tx.connection, name, now))

    def ensure_targets(self, names: Sequence[str], *, now: datetime) -> dict[str, TargetState]:
        """The stored states of many targets, creating the missing ones: one transaction per
        _CHUNK targets instead of one per target, so a daemon with 10,000 targets starts in
        seconds rather than half a minute."""
        states: dict[str, TargetState] = {}
        for start in range(0, len(names), _CHUNK):
            chunk = list(names[start : start + _CHUNK])
            states.update(self._write(functools.partial(self._ensure_many, names=chunk, now=now)))
        return states

    def record_unchanged(
        self,
        state: TargetState,
        *,
        now: datetime,
        times: int = 1,
        drift: bool | None = None,
        events_: Sequence[EventDraft] = (),
        epoch: int | None = None,
    ) -> TargetState:
        """Successful polls (``times`` of them) that saw the current snapshot again: no new row.
        ``drift`` updates the snapshot's baseline verdict when the baseline itself changed."""
        drift = state.drift if drift is None else drift
        after = replace(state, up=True, consecutive_failures=0, last_success_at=now, drift=drift)

        def work(tx: _Tx) -> TargetState:
            self._fence(tx, {state.name: epoch})
            connection = tx.connection
            guarded = connection.execute(
                _SUCCEEDED,
                {"p_target": state.target_id, "p_now": now, "p_snapshot": state.snapshot_id},
            )
            if guarded.rowcount != 1:
                raise StaleStateError(state.name)
            if state.snapshot_id is not None:
                connection.execute(
                    _SEEN_AGAIN, {"p_snapshot": state.snapshot_id, "p_now": now, "p_times": times}
                )
                if drift != state.drift:
                    connection.execute(
                        update(snapshots)
                        .where(snapshots.c.id == state.snapshot_id)
                        .values(drift=drift)
                    )
            self._insert_events(tx, state, events_, now, state.hash, state.hash)
            return after

        return self._write(work)

    def record_sightings(self, sightings: Sequence[Sighting]) -> list[TargetState]:
        """Unchanged sightings of many targets in one transaction, the same two statements as
        :meth:`record_unchanged` executed once for all. When any target's state is stale (another
        writer recorded a change) nothing is written and StaleStateError is raised: the caller
        then writes them one by one, which finds the stale one and re-judges it."""
        if not sightings:
            return []
        succeeded = [
            {"p_target": s.state.target_id, "p_now": s.at, "p_snapshot": s.state.snapshot_id}
            for s in sightings
        ]
        seen = [
            {"p_snapshot": s.state.snapshot_id, "p_now": s.at, "p_times": s.times}
            for s in sightings
        ]

        def work(tx: _Tx) -> list[TargetState]:
            self._fence(tx, {s.state.name: s.epoch for s in sightings})
            if tx.connection.execute(_SUCCEEDED, succeeded).rowcount != len(sightings):
                raise StaleStateError(", ".join(s.state.name for s in sightings))
            tx.connection.execute(_SEEN_AGAIN, seen)
            return [
                replace(s.state, up=True, consecutive_failures=0, last_success_at=s.at)
                for s in sightings
            ]

        return self._write(work)

    def record_snapshot(
        self,
        state: TargetState,
        snapshot: NewSnapshot,
        *,
        now: datetime,
        events_: Sequence[EventDraft],
        last_seen: datetime | None = None,
        times: int = 1,
        epoch: int | None = None,
        fenced: bool = True,
    ) -> TargetState:
        """A successful poll that saw a new configuration: a new snapshot row and its events.
        ``now`` is when it was first seen (the change's time); ``last_seen`` and ``times``
        cover sightings collapsed while the database was away. ``fenced=False`` records a
        change seen under a claim lost since, which the database does not have yet (see
        :meth:`monitor.service.TargetPoller`)."""
        last = last_seen or now

        def work(tx: _Tx) -> TargetState:
            if fenced:
                self._fence(tx, {state.name: epoch})
            connection = tx.connection
            guarded = connection.execute(
                update(poll_state)
                .where(
                    poll_state.c.target_id == state.target_id,
                    poll_state.c.current_snapshot_id.is_not_distinct_from(state.snapshot_id),
                )
                .values(last_attempt_at=last)
            )
            if guarded.rowcount != 1:
                raise StaleStateError(state.name)
            values = {
                "target_id": state.target_id,
                "hash": snapshot.hash,
                "document": snapshot.text,
                "enabled": snapshot.enabled,
                "provider_type": snapshot.provider_type,
                "drift": snapshot.drift,
                "first_seen_at": now,
                "last_seen_at": last,
                "seen_count": times,
            }
            snapshot_id = connection.execute(
                insert(snapshots).values(values).returning(snapshots.c.id)
            ).scalar_one()
            self._chain(tx, "snapshots", {**values, "id": snapshot_id})
            self._mark_success(
                connection,
                state.target_id,
                last,
                current_snapshot_id=snapshot_id,
                last_change_at=now,
            )
            self._insert_events(tx, state, events_, now, snapshot.hash, state.hash)
            return replace(
                state,
                snapshot_id=snapshot_id,
                hash=snapshot.hash,
                document_text=snapshot.text,
                enabled=snapshot.enabled,
                provider_type=snapshot.provider_type,
                drift=snapshot.drift,
                up=True,
                consecutive_failures=0,
                last_success_at=last,
                last_change_at=now,
            )

        return self._write(work)

    def record_failure(
        self,
        state: TargetState,
        failure: FailureRecord,
        *,
        now: datetime,
        events_: Sequence[EventDraft] = (),
        epoch: int | None = None,
    ) -> TargetState:
        """A failed poll: the current snapshot stays, the failure is kept and counted."""

        def work(tx: _Tx) -> TargetState:
            self._fence(tx, {state.name: epoch})
            connection = tx.connection
            failures = state.consecutive_failures + 1
            connection.execute(
                update(poll_state)
                .where(poll_state.c.target_id == state.target_id)
                .values(
                    up=False,
                    consecutive_failures=failures,
                    last_attempt_at=now,
                    last_error_reason=failure.reason,
                    last_error_status=failure.http_status,
                    last_error_api_code=failure.api_code,
                    last_error_message=failure.message,
                    last_error_request_id=failure.request_id,
                    last_error_at=now,
                )
            )
            self._append_error(connection, state, failure, now)
            self._insert_events(tx, state, events_, now, state.hash, state.hash)
            return replace(state, up=False, consecutive_failures=failures)

        return self._write(work)

    # -- internals -------------------------------------------------------------------------

    def _fence(self, tx: _Tx, claims: dict[str, int | None]) -> None:
        """Refuse the write (ClaimLost, naming the targets) unless this replica still holds
        each claim at the epoch its outcome was polled under; hold those claims until commit."""
        if self._replica is None:
            return
        rows = tx.connection.execute(HELD, {"me": self._replica, "targets": list(claims)})
        held = {str(row.target): int(row.epoch) for row in rows}
        lost = [name for name, epoch in claims.items() if epoch is None or held.get(name) != epoch]
        if lost:
            raise ClaimLost(lost)

    def _write(self, work: Callable[[_Tx], T]) -> T:
        return transaction.write(self._writer, work, on_outbox=self._on_outbox)

    def _ensure_target(self, connection: Connection, name: str, now: datetime) -> TargetState:
        target_id = connection.execute(select(targets.c.id).where(targets.c.name == name)).scalar()
        if target_id is None:
            try:
                with connection.begin_nested():
                    target_id = connection.execute(
                        insert(targets).values(name=name, created_at=now).returning(targets.c.id)
                    ).scalar_one()
                    connection.execute(
                        insert(poll_state).values(target_id=target_id, consecutive_failures=0)
                    )
            except IntegrityError:
                # Another process created it between our select and insert.
                target_id = connection.execute(
                    select(targets.c.id).where(targets.c.name == name)
                ).scalar_one()
        return self._load_state(connection, target_id, name)

    def _ensure_many(self, tx: _Tx, *, names: list[str], now: datetime) -> dict[str, TargetState]:
        connection = tx.connection
        ids = self._target_ids(connection, names)
        missing = [name for name in names if name not in ids]
        if missing:
            try:
                with connection.begin_nested():
                    created = connection.execute(
                        insert(targets).returning(targets.c.id, targets.c.name),
                        [{"name": name, "created_at": now} for name in missing],
                    ).all()
                    connection.execute(
                        insert(poll_state),
                        [{"target_id": id_, "consecutive_failures": 0} for id_, _ in created],
                    )
                ids.update((name, id_) for id_, name in created)
            except IntegrityError:
                # Another process (a replica starting at the same moment) created some of
                # them meanwhile: one by one, which copes with that.
                for name in missing:
                    ids[name] = self._ensure_target(connection, name, now).target_id
        names_of = {id_: name for name, id_ in ids.items()}
        rows = connection.execute(_STATE.where(poll_state.c.target_id.in_(list(names_of)))).all()
        found = (
            self._state_of(row, names_of[row._mapping[poll_state.c.target_id]]) for row in rows
        )
        states = {state.name: state for state in found}
        return {
            name: states.get(name) or TargetState(target_id=ids[name], name=name) for name in names
        }

    @staticmethod
    def _target_ids(connection: Connection, names: list[str]) -> dict[str, int]:
        rows = connection.execute(
            select(targets.c.name, targets.c.id).where(targets.c.name.in_(names))
        ).all()
        return {name: id_ for name, id_ in rows}

    @staticmethod
    def _load_state(connection: Connection, target_id: int, name: str) -> TargetState:
        row = connection.execute(_STATE.where(poll_state.c.target_id == target_id)).first()
        if row is None:
            return TargetState(target_id=target_id, name=name)
        return Store._state_of(row, name)

    @staticmethod
    def _state_of(row: Row[Any], name: str) -> TargetState:
        m = row._mapping
        return TargetState(
            target_id=m[poll_state.c.target_id],
            name=name,
            snapshot_id=m[poll_state.c.current_snapshot_id],
            hash=m[snapshots.c.hash],
            document_text=m[snapshots.c.document] or None,
            enabled=m[snapshots.c.enabled],
            provider_type=m[snapshots.c.provider_type],
            drift=bool(m[snapshots.c.drift]),
            up=m[poll_state.c.up],
            consecutive_failures=m[poll_state.c.consecutive_failures],
            last_success_at=m[poll_state.c.last_success_at],
            last_change_at=m[poll_state.c.last_change_at],
        )

    @staticmethod
    def _mark_success(connection: Connection, target_id: int, now: datetime, **extra: Any) -> None:
        connection.execute(
            update(poll_state)
            .where(poll_state.c.target_id == target_id)
            .values(
                up=True, consecutive_failures=0, last_attempt_at=now, last_success_at=now, **extra
            )
        )

    @staticmethod
    def _append_error(
        connection: Connection, state: TargetState, failure: FailureRecord, now: datetime
    ) -> None:
        """Extend the open run of identical failures, or start a new run (after a success, or
        when the failure differs)."""
        target_id = state.target_id
        last = connection.execute(
            select(poll_errors)
            .where(poll_errors.c.target_id == target_id)
            .order_by(poll_errors.c.id.desc())
            .limit(1)
        ).first()
        same = last is not None and (
            last.reason,
            last.http_status,
            last.api_code,
            last.message,
        ) == (failure.reason, failure.http_status, failure.api_code, failure.message)
        succeeded_since = (
            last is not None
            and state.last_success_at is not None
            and state.last_success_at > last.last_at
        )
        if last is not None and same and not succeeded_since:
            connection.execute(
                update(poll_errors)
                .where(poll_errors.c.id == last.id)
                .values(last_at=now, count=poll_errors.c.count + 1, request_id=failure.request_id)
            )
            return
        connection.execute(
            insert(poll_errors).values(
                target_id=target_id,
                reason=failure.reason,
                http_status=failure.http_status,
                api_code=failure.api_code,
                message=failure.message,
                request_id=failure.request_id,
                first_at=now,
                last_at=now,
                count=1,
            )
        )

    def _insert_events(
        self,
        tx: _Tx,
        state: TargetState,
        drafts: Sequence[EventDraft],
        now: datetime,
        snapshot_hash: str | None,
        previous_hash: str | None,
    ) -> None:
        for draft in drafts:
            values = {
                # The public id: random, so a restored backup can never hand it out again.
                "public_id": str(uuid.uuid4()),
                "target_id": state.target_id,
                "kind": draft.kind,
                "severity": draft.severity,
                "status": draft.status,
                "at": now,
                "snapshot_hash": snapshot_hash,
                "previous_hash": previous_hash,
                "changes": json.dumps(
                    [change.as_dict() for change in draft.changes], ensure_ascii=False
                ),
                "message": draft.message,
            }
            event_id = tx.connection.execute(
                insert(events).values(values).returning(events.c.id)
            ).scalar_one()
            Store._chain(tx, "events", {**values, "id": event_id})
            # A non-critical event waiting for its actors is queued when they are known.
            held = self._attribution is not None and self._attribution.open(
                tx.connection,
                target=state.name,
                target_id=state.target_id,
                event_id=event_id,
                values=values,
                since=state.last_success_at,
                notify=draft.notify,
            )
            if draft.notify and self._routes and not held:
                tx.queued += outbox.enqueue(
                    tx.connection,
                    event_id=event_id,
                    kind=draft.kind,
                    severity=draft.severity,
                    routes=self._routes,
                    now=now,
                )

    @staticmethod
    def _chain(tx: _Tx, table: str, row: dict[str, Any]) -> None:
        # After commit this is the chain head; logging it lets an outside log anchor the tail.
        tx.chain_head = chain.append(tx.connection, table, row)
