"""Times as users write them and as the product prints them (RFC 3339, UTC)."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

__all__ = ["Clock", "format_time", "parse_time", "parse_time_strict", "utc_now"]

Clock = Callable[[], datetime]

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def utc_now() -> datetime:
    return datetime.now(UTC)


def format_time(value: datetime | None) -> str | None:
    """RFC 3339 in UTC with a ``Z``; microseconds only when there are any."""
    if value is None:
        return None
    if value.tzinfo is None:  # databases hand back naive UTC
        value = value.replace(tzinfo=UTC)
    text = value.astimezone(UTC).isoformat()
    return text.replace("+00:00", "Z")


def parse_time_strict(text: str) -> datetime:
    """An RFC 3339 time (a time zone is required); ValueError otherwise."""
    value = datetime.fromisoformat(text.strip().replace("z", "Z"))
    if value.tzinfo is None:
        raise ValueError(f"time {text!r} has no time zone (add Z or an offset)")
    return value.astimezone(UTC)


def parse_time(text: str, *, now: datetime) -> datetime:
    """RFC 3339, or a relative age such as ``24h`` / ``7d`` meaning that long before ``now``."""
    match = _RELATIVE.match(text)
    if match:
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        try:
            return now - timedelta(seconds=seconds)
        except OverflowError:
            raise ValueError(f"time {text!r} is too far back") from None
    try:
        return parse_time_strict(text)
    except ValueError:
        raise ValueError(
            f"invalid time {text!r} (use RFC 3339 like 2026-01-31T12:00:00Z, or 24h, 7d)"
        ) from None
