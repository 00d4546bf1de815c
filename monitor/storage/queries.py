"""The read side: one query layer that both the CLI and the HTTP API call."""

from __future__ import annotations

import base64
import json
import re
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Select, and_, func, or_, select
from sqlalchemy.engine import Connection, RowMapping

from monitor.errors import MonitorError
from monitor.storage.engine import connect
from monitor.storage.schema import (
    attribution_lookups,
    attributions,
    chain_head,
    events,
    poll_state,
    snapshots,
    targets,
)
from monitor.timeutil import format_time, parse_time_strict

__all__ = [
    "AmbiguousReference",
    "ChainHead",
    "EventView",
    "Queries",
    "SnapshotView",
    "TargetView",
    "decode_cursor",
    "encode_cursor",
    "event_select",
    "event_view",
]

_HEX_PREFIX = re.compile(r"^(?:sha256:)?([0-9a-f]{6,64})$")


@dataclass(frozen=True, slots=True)
class SnapshotView:
    id: int
    target: str
    hash: str
    document: Any
    enabled: bool
    provider_type: str | None
    drift: bool
    first_seen_at: datetime
    last_seen_at: datetime
    seen_count: int

    def cursor(self) -> str:
        return encode_cursor(self.first_seen_at, self.id)


@dataclass(frozen=True, slots=True)
class EventView:
    row_id: int  # internal: order, cursors, the outbox; never shown (reused after a restore)
    id: str  # the public id (a UUID), the "id" of the event JSON
    target: str
    kind: str
    severity: str
    status: str
    at: datetime
    snapshot: str | None
    previous: str | None
    changes: list[dict[str, Any]]
    message: str
    # SPEC §11: single | ambiguous | none | unavailable | pending, None when not attributed;
    # the actors in the event JSON's form; follow_up: this delivery re-sends a settled event.
    attribution: str | None = None
    actors: list[dict[str, Any]] = field(default_factory=list)
    follow_up: bool = False

    def cursor(self) -> str:
        return encode_cursor(self.at, self.row_id)


@dataclass(frozen=True, slots=True)
class TargetView:
    name: str
    enabled: bool | None
    provider_type: str | None
    hash: str | None
    drift: bool | None
    up: bool | None
    consecutive_failures: int
    last_attempt_at: datetime | None
    last_success_at: datetime | None
    last_change_at: datetime | None
    last_error: dict[str, Any] | None
    # The actors of the target's most recent attributed change (SPEC §11), [] when none.
    last_change_actors: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The end of the audit chain: the last ``chain_seq`` and its ``chain_hash``."""

    seq: int
    hash: str


def encode_cursor(at: datetime, row_id: int) -> str:
    """An opaque keyset cursor: the position after the row (at, id) in newest-first order."""
    raw = f"{format_time(at)}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    """The (at, id) a cursor stands for; ValueError when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at_text, id_text = raw.split("|")
        return parse_time_strict(at_text), int(id_text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("not a valid cursor") from exc


class AmbiguousReference(MonitorError):
    """A hash prefix that more than one snapshot hash starts with."""


class Queries:
    """Read-only questions about the recorded history."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def targets(self, name: str | None = None) -> list[TargetView]:
        query = (
            select(targets.c.name, poll_state, snapshots)
            .select_from(targets)
            .join(poll_state, poll_state.c.target_id == targets.c.id)
            .outerjoin(snapshots, snapshots.c.id == poll_state.c.current_snapshot_id)
            .order_by(targets.c.name)
        )
        if name is not None:
            query = query.where(targets.c.name == name)
        with self._connect() as connection:
            rows = [row._mapping for row in connection.execute(query)]
            actors = self._last_actors(connection) if rows else {}
        return [_target_view(m, actors.get(m[poll_state.c.target_id], [])) for m in rows]

    @staticmethod
    def _last_actors(connection: Connection) -> dict[int, list[dict[str, Any]]]:
        """Per target id, the actors of its newest event whose attribution named any."""
        latest = (
            select(func.max(events.c.id))
            .join(attributions, attributions.c.event_id == events.c.id)
            .where(attributions.c.result.in_(("single", "ambiguous")))
            .group_by(events.c.target_id)
        )
        found = connection.execute(
            select(events.c.target_id, attributions.c.actors)
            .join(attributions, attributions.c.event_id == events.c.id)
            .where(events.c.id.in_(latest.scalar_subquery()))
        )
        return {row.target_id: json.loads(row.actors) for row in found}

    def target_exists(self, name: str) -> bool:
        with self._connect() as connection:
            found = connection.execute(select(targets.c.id).where(targets.c.name == name))
            return found.first() is not None

    def snapshots(
        self,
        *,
        target: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> list[SnapshotView]:
        """Snapshots newest first (by first seen)."""
        query = _snapshot_select()
        if target is not None:
            query = query.where(targets.c.name == target)
        if since is not None:
            query = query.where(snapshots.c.last_seen_at >= since)
        if until is not None:
            query = query.where(snapshots.c.first_seen_at <= until)
        if cursor is not None:
            query = query.where(_after(cursor, snapshots.c.first_seen_at, snapshots.c.id))
        query = query.order_by(snapshots.c.first_seen_at.desc(), snapshots.c.id.desc())
        with self._connect() as connection:
            rows = connection.execute(query.limit(limit))
            return [_snapshot_view(row._mapping) for row in rows]

    def snapshot(self, ref: str) -> SnapshotView | None:
        """A snapshot by numeric id, full hash or unique hash prefix (newest row of that hash).
        A prefix shared by several hashes raises AmbiguousReference."""
        query = _snapshot_select()
        if ref.isascii() and ref.isdigit() and len(ref) < 12:
            query = query.where(snapshots.c.id == int(ref))
        else:
            match = _HEX_PREFIX.match(ref.lower())
            if match is None:
                return None
            digits = match.group(1)
            if len(digits) == 64:
                query = query.where(snapshots.c.hash == "sha256:" + digits)
            else:
                prefix = snapshots.c.hash.startswith("sha256:" + digits)
                self._require_unique(prefix, ref)
                query = query.where(prefix)
        query = query.order_by(snapshots.c.id.desc()).limit(1)
        with self._connect() as connection:
            row = connection.execute(query).first()
            return _snapshot_view(row._mapping) if row is not None else None

    def neighbours(self, snapshot: SnapshotView) -> tuple[SnapshotView | None, SnapshotView | None]:
        """The snapshots of the same target just before and just after ``snapshot`` (by first
        seen, then id): the versions one change back and one change on."""
        target = targets.c.name == snapshot.target
        at, row_id = snapshot.first_seen_at, snapshot.id
        older = (
            _snapshot_select()
            .where(target, _after(snapshot.cursor(), snapshots.c.first_seen_at, snapshots.c.id))
            .order_by(snapshots.c.first_seen_at.desc(), snapshots.c.id.desc())
            .limit(1)
        )
        newer = (
            _snapshot_select()
            .where(
                target,
                or_(
                    snapshots.c.first_seen_at > at,
                    and_(snapshots.c.first_seen_at == at, snapshots.c.id > row_id),
                ),
            )
            .order_by(snapshots.c.first_seen_at, snapshots.c.id)
            .limit(1)
        )
        with self._connect() as connection:
            found = [connection.execute(query).first() for query in (older, newer)]
        before, after = (_snapshot_view(row._mapping) if row else None for row in found)
        return before, after

    def _require_unique(self, condition: Any, ref: str) -> None:
        with self._connect() as connection:
            found = connection.execute(
                select(snapshots.c.hash).where(condition).distinct().limit(2)
            ).all()
        if len(found) > 1:
            raise AmbiguousReference(f"{ref!r} is the start of several snapshot hashes")

    def at(self, target: str, when: datetime) -> SnapshotView | None:
        """The snapshot in force for ``target`` at ``when``: greatest first_seen_at <= when."""
        query = (
            _snapshot_select()
            .where(targets.c.name == target, snapshots.c.first_seen_at <= when)
            .order_by(snapshots.c.first_seen_at.desc(), snapshots.c.id.desc())
            .limit(1)
        )
        with self._connect() as connection:
            row = connection.execute(query).first()
            return _snapshot_view(row._mapping) if row is not None else None

    def events(
        self,
        *,
        target: str | None = None,
        kinds: tuple[str, ...] = (),
        severity: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        cursor: str | None = None,
        actor: str | None = None,
    ) -> list[EventView]:
        """Events newest first; pass the last row's cursor to read the next page. ``actor``:
        only events one of whose actors has this admin id or display name."""
        query = event_select()
        if actor is not None:
            query = query.where(_has_actor(actor))
        if target is not None:
            query = query.where(targets.c.name == target)
        if kinds:
            query = query.where(events.c.kind.in_(kinds))
        if severity is not None:
            query = query.where(events.c.severity == severity)
        if since is not None:
            query = query.where(events.c.at >= since)
        if until is not None:
            query = query.where(events.c.at <= until)
        if cursor is not None:
            query = query.where(_after(cursor, events.c.at, events.c.id))
        query = query.order_by(events.c.at.desc(), events.c.id.desc()).limit(limit)
        with self._connect() as connection:
            return [event_view(row._mapping) for row in connection.execute(query)]

    def chain_head(self) -> ChainHead:
        """The chain head as the table holds it (what the logs' ``audit chain head`` lines
        are compared with); not a verdict: ``verify_chain`` checks the rows up to it."""
        with self._connect() as connection:
            row = connection.execute(select(chain_head.c.seq, chain_head.c.hash)).one()
            return ChainHead(row.seq, row.hash)

    def _connect(self) -> AbstractContextManager[Connection]:
        return connect(self.engine)


def _after(cursor: str, at_column: Any, id_column: Any) -> Any:
    """Rows after the cursor's row in (time, id) newest-first order: the keyset condition that
    keeps pages stable while newer rows arrive."""
    at, row_id = decode_cursor(cursor)
    return or_(at_column < at, and_(at_column == at, id_column < row_id))


def _snapshot_select() -> Select[Any]:
    return select(snapshots, targets.c.name).join(targets, targets.c.id == snapshots.c.target_id)


def _snapshot_view(m: RowMapping) -> SnapshotView:
    return SnapshotView(
        id=m[snapshots.c.id],
        target=m[targets.c.name],
        hash=m[snapshots.c.hash],
        document=json.loads(m[snapshots.c.document]),
        enabled=m[snapshots.c.enabled],
        provider_type=m[snapshots.c.provider_type],
        drift=m[snapshots.c.drift],
        first_seen_at=m[snapshots.c.first_seen_at],
        last_seen_at=m[snapshots.c.last_seen_at],
        seen_count=m[snapshots.c.seen_count],
    )


def event_select() -> Select[Any]:
    """Events with their target's name and their attribution (settled, or a lookup pending)."""
    return (
        select(
            events,
            targets.c.name,
            attributions.c.result.label("attribution_result"),
            attributions.c.actors.label("attribution_actors"),
            attribution_lookups.c.id.label("attribution_lookup"),
        )
        .join(targets, targets.c.id == events.c.target_id)
        .outerjoin(attributions, attributions.c.event_id == events.c.id)
        .outerjoin(attribution_lookups, attribution_lookups.c.event_id == events.c.id)
    )


def _like_literal(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _has_actor(actor: str) -> Any:
    """The stored actors (JSON, keys sorted, as ``actors_json`` writes them) hold ``actor`` as
    an admin id or display name: matched as the exact JSON text of that field, ignoring ASCII
    case (the same on SQLite and PostgreSQL)."""
    value = json.dumps(actor, ensure_ascii=False).lower()
    stored = func.lower(attributions.c.actors)
    fields = [f'"{key}": {value}' for key in ("admin_user_id", "display_name")]
    return or_(*(stored.like("%" + _like_literal(f) + "%", escape="\\") for f in fields))


def event_view(m: RowMapping) -> EventView:
    return EventView(
        row_id=m[events.c.id],
        id=m[events.c.public_id],
        target=m[targets.c.name],
        kind=m[events.c.kind],
        severity=m[events.c.severity],
        status=m[events.c.status],
        at=m[events.c.at],
        snapshot=m[events.c.snapshot_hash],
        previous=m[events.c.previous_hash],
        changes=json.loads(m[events.c.changes]),
        message=m[events.c.message],
        **_attribution_of(m),
    )


def _attribution_of(m: RowMapping) -> dict[str, Any]:
    """The attribution fields of an event row from :func:`event_select` (``pending`` while a
    lookup is open), and ``follow_up`` of a row read with its outbox row."""
    fields: dict[str, Any] = {"follow_up": bool(m.get("outbox_follow_up") or False)}
    result = m.get("attribution_result")
    if result is not None:
        fields.update(attribution=result, actors=json.loads(m["attribution_actors"]))
    elif m.get("attribution_lookup") is not None:
        fields["attribution"] = "pending"
    return fields


def _target_view(m: RowMapping, last_change_actors: list[dict[str, Any]]) -> TargetView:
    error = None
    if m[poll_state.c.last_error_reason] is not None:
        error = {
            "reason": m[poll_state.c.last_error_reason],
            "http_status": m[poll_state.c.last_error_status],
            "api_code": m[poll_state.c.last_error_api_code],
            "message": m[poll_state.c.last_error_message],
            "request_id": m[poll_state.c.last_error_request_id],
            "at": format_time(m[poll_state.c.last_error_at]),
        }
    return TargetView(
        name=m[targets.c.name],
        enabled=m[snapshots.c.enabled],
        provider_type=m[snapshots.c.provider_type],
        hash=m[snapshots.c.hash],
        drift=m[snapshots.c.drift],
        up=m[poll_state.c.up],
        consecutive_failures=m[poll_state.c.consecutive_failures],
        last_attempt_at=m[poll_state.c.last_attempt_at],
        last_success_at=m[poll_state.c.last_success_at],
        last_change_at=m[poll_state.c.last_change_at],
        last_error=error,
        last_change_actors=last_change_actors,
    )
