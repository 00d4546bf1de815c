"""Times and durations as users write them and as the product prints them (RFC 3339, UTC).

The one duration grammar of genauth-monitor lives here: one or more ``<number><unit>`` parts,
units ``ms``, ``s``, ``m``, ``h``, ``d``, ``w`` (``"90s"``, ``"1h30m"``, ``"250ms"``, ``"1w"``).
The config file's durations and the relative ages of the CLI and the API (``--since 1h30m``,
``since=7d``) are both read by it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Final

from monitor.core.escape import shown

__all__ = [
    "Clock",
    "format_duration",
    "format_time",
    "parse_duration",
    "parse_time",
    "parse_time_strict",
    "utc_now",
]

Clock = Callable[[], datetime]

_UNIT_SECONDS: Final = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
}
_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)")
_DURATION: Final = re.compile(r"(?:\d+(?:\.\d+)?\s*(?:ms|s|m|h|d|w)\s*)+")


def utc_now() -> datetime:
    return datetime.now(UTC)


def _grammar_seconds(text: str) -> float | None:
    """Seconds in ``text`` if it is written in the duration grammar (``inf`` when a part
    overflows a float), else None."""
    if not _DURATION.fullmatch(text.strip()):
        return None
    return sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(text))


def _number_seconds(value: float) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer beyond any float
        return math.inf


def parse_duration(value: str | float) -> float:
    """Seconds in ``"30s"``, ``"5m"``, ``"1h"``, ``"1h30m"``, ``"250ms"``, ``"2d"``, ``"1w"``
    or a number; ValueError for anything else, a negative or a non-finite value."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = _number_seconds(value)
    elif isinstance(value, str) and (written := _grammar_seconds(value)) is not None:
        seconds = written
    elif isinstance(value, str):
        raise ValueError(f"invalid duration {shown(value)} (use e.g. 30s, 5m, 1h)")
    else:
        raise ValueError(
            "invalid duration (use a string such as 30s, 5m, 1h or a number of seconds)"
        )
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"invalid duration {shown(value)} (too large or not a number)")
    if seconds < 0:
        raise ValueError(f"invalid duration {shown(value)} (must not be negative)")
    return seconds


def format_duration(seconds: float) -> str:
    """The inverse of :func:`parse_duration` for display: ``90`` -> ``"1m30s"``."""
    millis = round(seconds * 1000)
    parts = []
    for unit in ("d", "h", "m", "s", "ms"):
        size = round(_UNIT_SECONDS[unit] * 1000)
        count, millis = divmod(millis, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


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
    """RFC 3339, or a relative age in the duration grammar (``24h``, ``7d``, ``1h30m``, ``1w``)
    meaning that long before ``now``."""
    seconds = _grammar_seconds(text)
    if seconds is not None:
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
