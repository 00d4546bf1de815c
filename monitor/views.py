"""The one model of each shape the product shows: an event, a snapshot, a target's state, a
diff, and their pages.

Built from the read side's views (``storage.queries``) by ``of``; the CLI's JSON, the HTTP
API's answers and ``/openapi.json``, the webhook body and the web view all come from these, so
no two surfaces can disagree on a field.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Final, Self

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from monitor.core import Change
from monitor.core.attribution import RESULTS
from monitor.core.kinds import EVENT_KINDS, SEVERITIES
from monitor.storage.claims import Member
from monitor.storage.queries import EventView, SnapshotView, TargetView
from monitor.timeutil import format_time

__all__ = [
    "ActorOut",
    "ChangeOut",
    "ClusterOut",
    "DiffOut",
    "ErrorOut",
    "EventOut",
    "EventPage",
    "KindName",
    "ReadyOut",
    "ReplicaOut",
    "SeverityName",
    "SnapshotDocumentOut",
    "SnapshotOut",
    "SnapshotPage",
    "TargetList",
    "TargetOut",
    "to_json",
]


STATUSES: Final = ("firing", "resolved")


def _one_of(values: tuple[str, ...], description: str) -> WithJsonSchema:
    """A string the schema says is one of ``values``; the command layer, not the model, checks
    a parameter (so the 400 names it), and our own answers hold nothing else."""
    return WithJsonSchema({"type": "string", "enum": list(values), "description": description})


#: An event kind (SPEC §4), in /openapi.json as an enum of :data:`EVENT_KINDS`.
KindName = Annotated[str, _one_of(EVENT_KINDS, "event kind (SPEC §4)")]
#: ``info``, ``warning`` or ``critical``.
SeverityName = Annotated[str, _one_of(SEVERITIES, "severity")]
StatusName = Annotated[str, _one_of(STATUSES, "firing, or resolved (ends an alert)")]
AttributionName = Annotated[
    str,
    WithJsonSchema(
        {
            "anyOf": [{"type": "string", "enum": list(RESULTS)}, {"type": "null"}],
            "description": "who made the change (SPEC §11); null: not caused by an upstream "
            "change, or attribution off for the target",
        }
    ),
]


def to_json(model: BaseModel) -> dict[str, Any]:
    """A model as the JSON object the product prints and sends (aliases, RFC 3339 strings)."""
    return model.model_dump(mode="json", by_alias=True)


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ErrorOut(_Out):
    error: str = Field(description="what is wrong; names the parameter for a 400")


class ReadyOut(_Out):
    ready: bool
    checks: dict[str, bool] = Field(description="database reachable, scheduler running")


class ChangeOut(_Out):
    path: str = Field(description="dotted path of the changed field, e.g. smtpConfig.smtp_host")
    old: Any = Field(description="value before (null: absent); secrets as hmac-sha256 prints")
    new: Any = Field(description="value after (null: absent); secrets as hmac-sha256 prints")


class ActorOut(_Out):
    """One admin audit log entry behind a change (SPEC §11). Upstream text, kept as sent (cut
    to length); the free-text fields of the entry are never kept."""

    admin_user_id: str
    display_name: str | None
    client_ip: str | None
    location: str | None = Field(description="city, region, country of the client IP")
    user_agent: str | None
    operation_type: str
    resource_type: str | None
    request_id: str | None
    at: str | None = Field(description="RFC 3339, UTC; the vendor's timestamp converted")
    success: bool
    likely: bool = Field(description="the entry's details mention the email provider")


class EventOut(_Out):
    id: str = Field(description="unique across databases and restores (a UUID); never reused")
    target: str
    kind: KindName
    severity: SeverityName
    status: StatusName
    at: str = Field(description="RFC 3339, UTC")
    snapshot: str | None
    previous: str | None
    changes: list[ChangeOut]
    message: str
    attribution: AttributionName | None
    actors: list[ActorOut] = Field(description="likely ones first, then newest first")

    @classmethod
    def of(cls, v: EventView) -> Self:
        return cls(
            id=v.id,
            target=v.target,
            kind=v.kind,
            severity=v.severity,
            status=v.status,
            at=_time(v.at),
            snapshot=v.snapshot,
            previous=v.previous,
            changes=[ChangeOut(**change) for change in v.changes],
            message=v.message,
            attribution=v.attribution,
            actors=[ActorOut(**actor) for actor in v.actors],
        )


class EventPage(_Out):
    events: list[EventOut]
    next_cursor: str | None = Field(description="pass as cursor for the next page; null at end")


class SnapshotOut(_Out):
    id: int
    target: str
    hash: str
    enabled: bool
    type: str | None
    drift: bool
    first_seen_at: str
    last_seen_at: str
    seen_count: int

    @classmethod
    def of(cls, v: SnapshotView) -> Self:
        return cls(**_snapshot_fields(v))


class SnapshotDocumentOut(SnapshotOut):
    document: dict[str, Any] = Field(description="the redacted configuration")

    @classmethod
    def of(cls, v: SnapshotView) -> Self:
        return cls(**_snapshot_fields(v), document=v.document)


def _snapshot_fields(v: SnapshotView) -> dict[str, Any]:
    return {
        "id": v.id,
        "target": v.target,
        "hash": v.hash,
        "enabled": v.enabled,
        "type": v.provider_type,
        "drift": v.drift,
        "first_seen_at": _time(v.first_seen_at),
        "last_seen_at": _time(v.last_seen_at),
        "seen_count": v.seen_count,
    }


class SnapshotPage(_Out):
    snapshots: list[SnapshotOut]
    next_cursor: str | None


class LastErrorOut(_Out):
    reason: str
    http_status: int | None
    api_code: int | None
    message: str | None
    request_id: str | None
    at: str | None


class TargetOut(_Out):
    name: str
    enabled: bool | None
    type: str | None
    hash: str | None
    drift: bool | None
    up: bool | None
    consecutive_failures: int
    last_attempt_at: str | None
    last_success_at: str | None
    last_change_at: str | None
    last_error: LastErrorOut | None
    last_change_actors: list[ActorOut] = Field(
        description="who made the most recent change the admin audit log attributed (SPEC §11)"
    )

    @classmethod
    def of(cls, v: TargetView) -> Self:
        return cls(
            name=v.name,
            enabled=v.enabled,
            type=v.provider_type,
            hash=v.hash,
            drift=v.drift,
            up=v.up,
            consecutive_failures=v.consecutive_failures,
            last_attempt_at=format_time(v.last_attempt_at),
            last_success_at=format_time(v.last_success_at),
            last_change_at=format_time(v.last_change_at),
            last_error=LastErrorOut(**v.last_error) if v.last_error is not None else None,
            last_change_actors=[ActorOut(**actor) for actor in v.last_change_actors],
        )


class TargetList(_Out):
    targets: list[TargetOut]


class DiffOut(_Out):
    from_: str = Field(alias="from")
    to: str
    changes: list[ChangeOut]

    @classmethod
    def of(cls, old: SnapshotView, new: SnapshotView, changes: Sequence[Change]) -> Self:
        return cls(
            from_=old.hash,
            to=new.hash,
            changes=[ChangeOut(**change.as_dict()) for change in changes],
        )


def _time(value: Any) -> str:
    text = format_time(value)
    assert text is not None
    return text


class ReplicaOut(_Out):
    name: str
    last_heartbeat: str = Field(description="RFC 3339, database time")
    targets: list[str] = Field(description="the targets it holds a live claim on")

    @classmethod
    def of(cls, v: Member) -> Self:
        return cls(name=v.name, last_heartbeat=_time(v.heartbeat_at), targets=v.targets)


class ClusterOut(_Out):
    replica: str = Field(description="the replica that answered")
    replicas: list[ReplicaOut] = Field(description="the live replicas, by name")
