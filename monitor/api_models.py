"""Response shapes of the HTTP API, so /openapi.json describes exactly what is served."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "DiffOut",
    "ErrorOut",
    "EventPage",
    "ReadyOut",
    "SnapshotDocumentOut",
    "SnapshotPage",
    "TargetList",
]


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


class EventOut(_Out):
    id: str = Field(description="unique across databases and restores (a UUID); never reused")
    target: str
    kind: str
    severity: str
    status: str
    at: str = Field(description="RFC 3339, UTC")
    snapshot: str | None
    previous: str | None
    changes: list[ChangeOut]
    message: str


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


class SnapshotDocumentOut(SnapshotOut):
    document: dict[str, Any] = Field(description="the redacted configuration")


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


class TargetList(_Out):
    targets: list[TargetOut]


class DiffOut(_Out):
    from_: str = Field(alias="from")
    to: str
    changes: list[ChangeOut]
