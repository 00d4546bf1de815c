"""The write path of a poll: one transaction per outcome, events in the same transaction."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Engine, Integer, bindparam, insert, select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from monitor.core import EventDraft
from monitor.core.alerting import SinkRoute
from monitor.errors import StaleStateError, StorageError
from monitor.storage import chain, outbox
from monitor.storage.engine import WRITE, describe_error
from monitor.storage.schema import (
    UTCDateTime,
    events,
    poll_errors,
    poll_state,
    snapshots,
    targets,
)

__all__ = ["FailureRecord", "NewSnapshot", "StaleStateError", "Store", "TargetState"]

log = logging.getLogger("monitor.storage")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class TargetState:
    """What a poll needs to remember between polls of one target; mirrors the database."""

    target_id: int
    name: str
    snapshot_id: int | None = None
    hash: str | None = None
    document: Any = None
    enabled: bool | None = None
    provider_type: str | None = None
    drift: bool = False
    up: bool | None = None
    consecutive_failures: int = 0
    last_success_at: datetime | None = None
    last_change_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class FailureRecord:
    """A failed poll as kept in the database (never the raw body, never a secret)."""

    reason: str
    message: str
    http_status: int | None = None
    api_code: int | None = None
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class NewSnapshot:
    hash: str
    document: Any
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

_SEEN_AGAIN_PG = text(
    "WITH state AS (UPDATE poll_state SET up = true, consecutive_failures = 0,"
    " last_attempt_at = :p_now, last_success_at = :p_now"
    " WHERE target_id = :p_target AND current_snapshot_id = :p_snapshot RETURNING 1)"
    " UPDATE snapshots SET last_seen_at = :p_now, seen_count = seen_count + :p_times"
    " WHERE id = :p_snapshot AND EXISTS (SELECT 1 FROM state)"
).bindparams(
    bindparam("p_now", type_=UTCDateTime()),
    bindparam("p_times", type_=Integer()),
    bindparam("p_snapshot", type_=Integer()),
    bindparam("p_target", type_=Integer()),
)


class Store:
    """Writes of the poll path. Every method is one transaction; errors become StorageError."""

    def __init__(
        self,
        engine: Engine,
        *,
        routes: Sequence[SinkRoute] = (),
        on_outbox: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self._writer = engine.execution_options(**{WRITE: True})
        self._single_statement = engine.dialect.name == "postgresql"
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._routes = tuple(routes)
        # Called after a commit that queued deliveries, to wake the delivery worker.
        self._on_outbox = on_outbox

    def ping(self) -> bool:
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except SQLAlchemyError:
            return False
        return True

    def ensure_target(self, name: str, *, now: datetime) -> TargetState:
        """The stored state of target ``name``, creating the target on first use."""
        return self._write(lambda c: self._ensure_target(c, name, now))

    def record_unchanged(
        self,
        state: TargetState,
        *,
        now: datetime,
        times: int = 1,
        drift: bool | None = None,
        events_: Sequence[EventDraft] = (),
    ) -> TargetState:
        """Successful polls (``times`` of them) that saw the current snapshot again: no new row.
        ``drift`` updates the snapshot's baseline verdict when the baseline itself changed."""
        drift = state.drift if drift is None else drift
        after = replace(state, up=True, consecutive_failures=0, last_success_at=now, drift=drift)
        fast = not events_ and drift == state.drift and state.snapshot_id is not None
        if self._single_statement and fast:
            self._seen_again_at_once(state, now, times)
            return after

        def work(connection: Connection) -> TargetState:
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
            self._insert_events(connection, state, events_, now, state.hash, state.hash)
            return after

        return self._write(work)

    def _seen_again_at_once(self, state: TargetState, now: datetime, times: int) -> None:
        # PostgreSQL: one autocommitted statement (both updates in a data-modifying CTE) is
        # atomic and costs one round trip instead of BEGIN, two UPDATEs and COMMIT.
        try:
            with self._autocommit.connect() as connection:
                result = connection.execute(
                    _SEEN_AGAIN_PG,
                    {
                        "p_snapshot": state.snapshot_id,
                        "p_target": state.target_id,
                        "p_now": now,
                        "p_times": times,
                    },
                )
        except SQLAlchemyError as exc:
            raise StorageError(describe_error(exc)) from None
        if result.rowcount != 1:
            raise StaleStateError(state.name)

    def record_snapshot(
        self,
        state: TargetState,
        snapshot: NewSnapshot,
        *,
        now: datetime,
        events_: Sequence[EventDraft],
        last_seen: datetime | None = None,
        times: int = 1,
    ) -> TargetState:
        """A successful poll that saw a new configuration: a new snapshot row and its events.
        ``now`` is when it was first seen (the change's time); ``last_seen`` and ``times``
        cover sightings collapsed while the database was away."""
        last = last_seen or now

        def work(connection: Connection) -> TargetState:
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
                "document": json.dumps(snapshot.document, sort_keys=True, ensure_ascii=False),
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
            self._chain(connection, "snapshots", {**values, "id": snapshot_id})
            self._mark_success(
                connection,
                state.target_id,
                last,
                current_snapshot_id=snapshot_id,
                last_change_at=now,
            )
            self._insert_events(connection, state, events_, now, snapshot.hash, state.hash)
            return replace(
                state,
                snapshot_id=snapshot_id,
                hash=snapshot.hash,
                document=snapshot.document,
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
    ) -> TargetState:
        """A failed poll: the current snapshot stays, the failure is kept and counted."""

        def work(connection: Connection) -> TargetState:
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
            self._insert_events(connection, state, events_, now, state.hash, state.hash)
            return replace(state, up=False, consecutive_failures=failures)

        return self._write(work)

    # -- internals -------------------------------------------------------------------------

    def _write(self, work: Callable[[Connection], T]) -> T:
        try:
            with self._writer.connect() as connection:
                connection.info.pop("chain_head", None)
                connection.info.pop("outbox", None)
                with connection.begin():
                    result = work(connection)
                head = connection.info.pop("chain_head", None)
                queued = connection.info.pop("outbox", 0)
        except SQLAlchemyError as exc:
            raise StorageError(describe_error(exc), permanent=isinstance(exc, DataError)) from None
        if head is not None:
            log.info("audit chain head", extra={"chain_seq": head[0], "chain_hash": head[1]})
        if queued and self._on_outbox is not None:
            self._on_outbox()
        return result

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

    @staticmethod
    def _load_state(connection: Connection, target_id: int, name: str) -> TargetState:
        row = connection.execute(
            select(poll_state, snapshots)
            .select_from(poll_state)
            .outerjoin(snapshots, snapshots.c.id == poll_state.c.current_snapshot_id)
            .where(poll_state.c.target_id == target_id)
        ).first()
        if row is None:
            return TargetState(target_id=target_id, name=name)
        m = row._mapping
        return TargetState(
            target_id=target_id,
            name=name,
            snapshot_id=m[poll_state.c.current_snapshot_id],
            hash=m[snapshots.c.hash],
            document=json.loads(m[snapshots.c.document]) if m[snapshots.c.document] else None,
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
        connection: Connection,
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
            event_id = connection.execute(
                insert(events).values(values).returning(events.c.id)
            ).scalar_one()
            Store._chain(connection, "events", {**values, "id": event_id})
            if draft.notify and self._routes:
                queued = outbox.enqueue(
                    connection,
                    event_id=event_id,
                    kind=draft.kind,
                    severity=draft.severity,
                    routes=self._routes,
                    now=now,
                )
                connection.info["outbox"] = connection.info.get("outbox", 0) + queued

    @staticmethod
    def _chain(connection: Connection, table: str, row: dict[str, Any]) -> None:
        seq, digest = chain.append(connection, table, row)
        # After commit this is the chain head; logging it lets an outside log anchor the tail.
        connection.info["chain_head"] = (seq, digest)
