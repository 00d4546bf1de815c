"""Change attribution (SPEC §11): who, from where, made the change an event reports.

Pure: the entries of the vendor's admin audit log come in as parsed JSON, times as arguments.
The rules, one function each:

* :func:`applies`: only an event caused by an upstream change is attributed (not ``first_seen``,
  ``poll_failing``, ``poll_recovered``, an event on a target's first snapshot, or one raised by
  an edit of ``[targets.expect]``, whose snapshot is the one before it).
* :func:`window`: from the previous sighting to this one, widened by the margin for clock skew.
* :func:`judge`: keeps the entries that succeeded, write (any ``operationType`` that is not a
  read), are of a wanted resource type and fall in the window; ranks first those whose
  ``eventDetails``/``operationParam`` mention the email provider (``likely``); the result is
  ``single`` (one distinct ``adminUserId``), ``ambiguous`` (several) or ``none``.
* :func:`retry_at`: when to ask again while the log may lag.

``operationParam``, ``originValue`` and ``targetValue`` may hold the very secrets that changed:
nothing of them leaves :func:`judge` but whether they mention the email provider.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final, Literal

__all__ = [
    "MAX_ACTORS",
    "NOT_ATTRIBUTED",
    "RESULTS",
    "Actor",
    "Result",
    "Verdict",
    "Window",
    "applies",
    "describe",
    "judge",
    "mentions_email_provider",
    "parse_vendor_time",
    "retry_at",
    "window",
    "writes",
]

Result = Literal["single", "ambiguous", "none", "unavailable", "pending"]
RESULTS: Final[tuple[Result, ...]] = ("single", "ambiguous", "none", "unavailable", "pending")

#: Kinds never caused by an upstream change of the configuration.
NOT_ATTRIBUTED: Final = frozenset({"first_seen", "poll_failing", "poll_recovered"})

#: Operation types that read (or sign in) and so change nothing; every other one writes, also
#: one the vendor adds later (an unknown operation is more likely a change than a read).
_READS: Final = ("read", "get", "list", "query", "view", "search", "find", "describe", "export")
_READS_EXACT: Final = frozenset({"login", "logout", "download", "check"})

#: Words that make an entry about the email provider (lower case): "mail" covers email and
#: exmail; the Chinese console says 邮件 (mail) and 邮箱 (mailbox).
_EMAIL_MARKERS: Final = ("mail", "smtp", "sendgrid", "邮件", "邮箱")

#: Actors kept per event, the likely ones first: enough to name every candidate a person can
#: weigh, bounded whatever the log returns.
MAX_ACTORS: Final = 50
# Column widths of what is kept of each field (upstream text: bounded, never trusted).
_WIDTH: Final = {"id": 128, "name": 128, "ip": 64, "agent": 256, "location": 128, "type": 64}

# Fractions of attribution_wait after the change at which an empty log is asked again; at the
# last the answer is settled.
_RETRIES: Final = (0.1, 0.25, 0.5, 1.0)

_VENDOR_TIME: Final = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(Z|[+-]\d{2}:?\d{2})?"
)


def applies(kind: str, snapshot: str | None, previous: str | None) -> bool:
    """Whether an event of ``kind`` with these snapshot hashes reports an upstream change.

    An event on a target's first snapshot has no previous one; an event raised because the
    baseline changed (or a failure run) is recorded against the unchanged snapshot, so its
    snapshot equals its previous one."""
    return (
        kind not in NOT_ATTRIBUTED
        and previous is not None
        and snapshot is not None
        and snapshot != previous
    )


@dataclass(frozen=True, slots=True)
class Window:
    """The times an audit entry behind a change may carry (inclusive)."""

    start: datetime
    end: datetime

    def holds(self, moment: datetime) -> bool:
        return self.start <= moment <= self.end


def window(since: datetime | None, until: datetime, margin: float) -> Window:
    """From the previous sighting ``since`` (None: only the margin before ``until``) to this
    sighting ``until``, each widened by ``margin`` seconds for the clocks of both sides."""
    skew = timedelta(seconds=margin)
    start = min(since, until) if since is not None else until
    return Window(start - skew, until + skew)


def writes(operation_type: str) -> bool:
    """Whether an ``operationType`` changes something (anything not a read)."""
    op = operation_type.strip().lower()
    if not op or op in _READS_EXACT:
        return False
    return not op.startswith(_READS)


def mentions_email_provider(*texts: Any) -> bool:
    """Whether any of these free-text fields speaks of email (only strings are looked at)."""
    for text in texts:
        if isinstance(text, str):
            lowered = text.lower()
            if any(marker in lowered for marker in _EMAIL_MARKERS):
                return True
    return False


def parse_vendor_time(value: Any) -> datetime | None:
    """An audit entry's ``timestamp`` as an aware UTC time: ``2022-09-20T08:55:00.188+0800``
    (the vendor's form), RFC 3339, or milliseconds since the epoch; None when it is none of
    these."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value / 1000, tz=UTC)
        except (OverflowError, OSError, ValueError):
            return None
    if not isinstance(value, str):
        return None
    match = _VENDOR_TIME.fullmatch(value.strip())
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    micros = int((fraction or "0")[:6].ljust(6, "0"))
    offset = UTC
    if zone and zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        offset = timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
    try:
        moment = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), micros, offset
        )
    except ValueError:
        return None
    return moment.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Actor:
    """One audit entry behind a change, as the monitor keeps it (no free-text field)."""

    admin_user_id: str
    display_name: str | None
    client_ip: str | None
    location: str | None
    user_agent: str | None
    operation_type: str
    resource_type: str | None
    request_id: str | None
    at: datetime | None
    success: bool
    likely: bool

    def as_dict(self) -> dict[str, Any]:
        """The actor of the event JSON (SPEC §11), ``at`` in RFC 3339 UTC."""
        return {
            "admin_user_id": self.admin_user_id,
            "display_name": self.display_name,
            "client_ip": self.client_ip,
            "location": self.location,
            "user_agent": self.user_agent,
            "operation_type": self.operation_type,
            "resource_type": self.resource_type,
            "request_id": self.request_id,
            "at": None if self.at is None else _rfc3339(self.at),
            "success": self.success,
            "likely": self.likely,
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    result: Result
    actors: tuple[Actor, ...] = ()

    @property
    def admins(self) -> list[str]:
        """The distinct admin ids, in the actors' order."""
        return list(dict.fromkeys(actor.admin_user_id for actor in self.actors))


def judge(entries: Iterable[Any], span: Window, *, resource_types: Collection[str] = ()) -> Verdict:
    """The attribution of a change from the audit entries read over ``span``: only entries
    that succeeded, write, are of a resource type in ``resource_types`` (empty: any) and carry
    a time inside ``span`` (one without a readable time is trusted to be, as the log was asked
    for that window) count."""
    kept: list[Actor] = []
    for entry in entries:
        actor = _actor(entry, span, resource_types)
        if actor is not None:
            kept.append(actor)
    # Likely first, then the newest: the entry nearest the change is the better candidate.
    kept.sort(key=lambda a: a.at or datetime.min.replace(tzinfo=UTC), reverse=True)
    kept.sort(key=lambda a: not a.likely)
    admins = {actor.admin_user_id for actor in kept}
    if not admins:
        return Verdict("none")
    return Verdict("single" if len(admins) == 1 else "ambiguous", tuple(kept[:MAX_ACTORS]))


def _actor(entry: Any, span: Window, resource_types: Collection[str]) -> Actor | None:
    if not isinstance(entry, Mapping) or entry.get("success") is not True:
        return None
    operation = _text(entry.get("operationType"), "type")
    admin = _text(entry.get("adminUserId"), "id")
    if operation is None or admin is None or not writes(operation):
        return None
    resource = _text(entry.get("resourceType"), "type")
    if resource_types and resource not in resource_types:
        return None
    at = parse_vendor_time(entry.get("timestamp"))
    if at is not None and not span.holds(at):
        return None
    return Actor(
        admin_user_id=admin,
        display_name=_text(entry.get("adminUserDisplayName"), "name"),
        client_ip=_text(entry.get("clientIp"), "ip"),
        location=_location(entry.get("geoip")),
        user_agent=_text(entry.get("userAgent"), "agent"),
        operation_type=operation,
        resource_type=resource,
        request_id=_text(entry.get("requestId"), "id"),
        at=at,
        success=True,
        likely=mentions_email_provider(entry.get("eventDetails"), entry.get("operationParam")),
    )


def _text(value: Any, width: str) -> str | None:
    """A string field cut to its width, NUL removed (PostgreSQL refuses it); None if empty."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    value = value.replace("\x00", "").strip()[: _WIDTH[width]]
    return value or None


def _location(geoip: Any) -> str | None:
    """``city, region, country`` from ``geoip``, a repeated part once (Shanghai, China)."""
    if not isinstance(geoip, Mapping):
        return None
    parts: list[str] = []
    for key in ("city_name", "region_name", "country_name"):
        part = _text(geoip.get(key), "location")
        if part is not None and part not in parts:
            parts.append(part)
    return _text(", ".join(parts), "location") if parts else None


def _rfc3339(moment: datetime) -> str:
    text = moment.astimezone(UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def retry_at(created: datetime, attempts: int, wait: float) -> datetime | None:
    """When to ask an empty (or failing) log again after ``attempts`` tries of a lookup made
    at ``created``; None once ``attempts`` tries have covered ``wait`` (settle then)."""
    if attempts < 1 or attempts > len(_RETRIES):
        return None
    return created + timedelta(seconds=_RETRIES[attempts - 1] * wait)


# -- words for alerts --------------------------------------------------------------------------

_VERBS: Final = {
    "provider_disabled": "disabled",
    "provider_enabled": "enabled",
    "type_changed": "type changed",
    "secret_rotated": "secret rotated",
}
_NAMED: Final = 3  # candidates an alert names before "and N more"


def _who(actor: Mapping[str, Any]) -> str:
    admin, name, ip = actor.get("admin_user_id"), actor.get("display_name"), actor.get("client_ip")
    who = f"{name} ({admin})" if name and name != admin else str(admin)
    return f"{who} from {ip}" if ip else who


def describe(kind: str, result: str | None, actors: Sequence[Mapping[str, Any]]) -> str | None:
    """One line for an alert: "disabled by Alice (alice@corp) from 203.0.113.7", the
    candidates of an ambiguous change, or what is unknown; None when not applicable. ``actors``
    in the event JSON's form. Plain text: each renderer escapes it for its own format."""
    if result is None:
        return None
    verb = _VERBS.get(kind, "changed")
    if result == "single" and actors:
        return f"{verb} by {_who(actors[0])}"
    if result == "ambiguous" and actors:
        first: dict[Any, Mapping[str, Any]] = {}
        for actor in actors:
            first.setdefault(actor.get("admin_user_id"), actor)
        named = [_who(actor) for actor in list(first.values())[:_NAMED]]
        more = len(first) - len(named)
        tail = f" and {more} more" if more > 0 else ""
        return f"{verb} by one of {len(first)} admins: {'; '.join(named)}{tail}"
    return {
        "none": "no admin audit log entry found for this change",
        "unavailable": "the admin audit log could not be read",
        "pending": "attribution pending (asking the admin audit log)",
    }.get(result, f"attribution {result}")
