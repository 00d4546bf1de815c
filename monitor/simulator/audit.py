"""The simulated admin audit log of one pool (``POST /api/v3/get-admin-audit-logs``).

Every change made through the simulator's admin interface (:meth:`SimulatedGenAuth.set_data`)
records an entry as the vendor's console would: who (``adminUserId``, display name), from where
(``clientIp``, ``userAgent``, ``geoip``), what (``operationType``, ``resourceType``, free-text
``eventDetails``), the request id, and the vendor's free-text ``operationParam``,
``originValue`` and ``targetValue``, which hold the configuration *with its secrets*, as the
real log may: the monitor must never keep them. ``timestamp`` is written the vendor's way,
``2022-09-20T08:55:00.188+0800`` (the pool's UTC offset, +08:00 unless told otherwise).

A test says who made a change (``by=Admin(...)``), makes one the log never records
(``by=None``), adds any entry it likes (:meth:`AuditLog.record`, with its own time), and makes
the log lag (``lag``: an entry is served only ``lag`` seconds after it was recorded, whatever
its timestamp says, so a test can also place entries at times of a skewed clock). Queries filter by
``start``/``end`` (milliseconds since the epoch, inclusive) and the documented fields, newest
first, ``pagination.page`` from 1 and ``pagination.limit`` capped at :data:`MAX_LIMIT`.
"""

from __future__ import annotations

import copy
import json
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Final

__all__ = ["DEFAULT_ADMIN", "MAX_LIMIT", "Admin", "AuditLog", "AuditQuery", "vendor_time"]

MAX_LIMIT: Final = 50
# Entries kept at most, oldest dropped first: a long benchmark must not grow without end.
_MAX_ENTRIES: Final = 100_000


@dataclass(frozen=True, slots=True)
class Admin:
    """An administrator of the pool as the audit log names them."""

    user_id: str
    display_name: str
    client_ip: str = "198.51.100.10"
    user_agent: str = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0 Safari"
    country: str = "China"
    region: str = "Shanghai"
    city: str = "Shanghai"


#: Who makes a change when a test does not say.
DEFAULT_ADMIN: Final = Admin("console-admin", "Console Admin")


def vendor_time(epoch: float, utc_offset: timedelta = timedelta(hours=8)) -> str:
    """``2022-09-20T08:55:00.188+0800``: milliseconds and a colon-less offset."""
    moment = datetime.fromtimestamp(epoch, tz=timezone(utc_offset))
    millis = moment.microsecond // 1000
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{millis:03d}" + moment.strftime("%z")


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """A request's filters (each optional) and its page."""

    start_ms: int | None = None
    end_ms: int | None = None
    operation_type: str | None = None
    resource_type: str | None = None
    user_id: str | None = None
    client_ip: str | None = None
    request_id: str | None = None
    success: bool | None = None
    page: int = 1
    limit: int = 10


@dataclass(frozen=True, slots=True)
class _Entry:
    at: float  # its timestamp, seconds since the epoch (a test may place it anywhere)
    recorded: float  # when it was written (the pool's clock): the lag counts from here
    body: dict[str, Any]


def _operation(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    if old.get("enabled") is True and new.get("enabled") is False:
        return "disable"
    if old.get("enabled") is False and new.get("enabled") is True:
        return "enable"
    return "update"


class AuditLog:
    """The pool's admin audit log; thread-safe (the server reads while a test writes)."""

    def __init__(
        self, clock: Callable[[], float], *, utc_offset: timedelta = timedelta(hours=8)
    ) -> None:
        self._clock = clock
        self.utc_offset = utc_offset
        #: Seconds after its time before an entry is served (the vendor's log lags).
        self.lag = 0.0
        self._lock = threading.Lock()
        self._entries: list[_Entry] = []

    def record(
        self,
        admin: Admin,
        *,
        operation_type: str = "update",
        resource_type: str = "userpool",
        event_details: str = "",
        operation_param: str = "",
        origin_value: str = "",
        target_value: str = "",
        success: bool = True,
        at: float | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Add one entry (at ``at``, default now) and return it as served."""
        when = self._clock() if at is None else at
        body = {
            "adminUserId": admin.user_id,
            "adminUserDisplayName": admin.display_name,
            "adminUserAvatar": "https://files.example.com/avatar/" + admin.user_id + ".png",
            "clientIp": admin.client_ip,
            "operationType": operation_type,
            "resourceType": resource_type,
            "eventDetails": event_details,
            "operationParam": operation_param,
            "originValue": origin_value,
            "targetValue": target_value,
            "success": success,
            "userAgent": admin.user_agent,
            "ua": {"browser": "Chrome", "os": "Linux"},
            "geoip": {
                "country_name": admin.country,
                "region_name": admin.region,
                "city_name": admin.city,
            },
            "timestamp": vendor_time(when, self.utc_offset),
            "requestId": request_id or str(uuid.uuid4()),
        }
        with self._lock:
            self._entries.append(_Entry(when, self._clock(), body))
            if len(self._entries) > _MAX_ENTRIES:
                del self._entries[: len(self._entries) - _MAX_ENTRIES]
        return copy.deepcopy(body)

    def record_change(
        self, admin: Admin, old: Mapping[str, Any], new: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The entry of a change of the email provider made in the console: the whole old and
        new configuration in the free-text fields, secrets and all, as the vendor may log."""
        new_text = json.dumps(new, ensure_ascii=False, sort_keys=True)
        return self.record(
            admin,
            operation_type=_operation(old, new),
            resource_type="userpool",
            event_details="Updated the email provider settings (emailProvider)",
            operation_param=json.dumps({"emailProvider": new}, ensure_ascii=False),
            origin_value=json.dumps(old, ensure_ascii=False, sort_keys=True),
            target_value=new_text,
        )

    def query(self, query: AuditQuery) -> tuple[int, list[dict[str, Any]]]:
        """``(totalCount, the page)`` of entries visible now, newest first."""
        visible_until = self._clock() - self.lag
        with self._lock:
            entries = list(self._entries)
        matching = [e for e in entries if e.recorded <= visible_until and _matches(e, query)]
        matching.sort(key=lambda e: e.at, reverse=True)
        limit = max(1, min(query.limit, MAX_LIMIT))
        first = (max(query.page, 1) - 1) * limit
        return len(matching), [copy.deepcopy(e.body) for e in matching[first : first + limit]]


def _matches(entry: _Entry, query: AuditQuery) -> bool:
    millis = int(entry.at * 1000)
    if query.start_ms is not None and millis < query.start_ms:
        return False
    if query.end_ms is not None and millis > query.end_ms:
        return False
    body = entry.body
    wanted = (
        ("operationType", query.operation_type),
        ("resourceType", query.resource_type),
        ("adminUserId", query.user_id),
        ("clientIp", query.client_ip),
        ("requestId", query.request_id),
        ("success", query.success),
    )
    return all(value is None or body[key] == value for key, value in wanted)
