"""Quantities as the config file writes them: bounded durations, percentages, byte sizes.

The duration grammar itself is :func:`monitor.timeutil.parse_duration` (the CLI and the API
read ages with it too); what is config's own is the bounds of each duration key (SPEC §6,
docs/configuration.md): anything outside them is a typo, not a choice. Messages quote the value
as written: none of these is ever secret.
"""

from __future__ import annotations

import math
import re
from typing import Any, Final

from pydantic import BeforeValidator

from monitor.core.escape import shown
from monitor.timeutil import format_duration, parse_duration

__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "DEFAULT_UI_SESSION",
    "MAX_DURATION",
    "MAX_INTERVAL",
    "MAX_RESPONSE_BYTES",
    "MAX_TIMEOUT",
    "MAX_UI_SESSION",
    "MIN_INTERVAL",
    "MIN_RESPONSE_BYTES",
    "MIN_UI_SESSION",
    "duration_within",
    "format_size",
    "parse_percent",
    "parse_size",
    "response_size",
]

MINUTE: Final = 60.0
DAY: Final = 86400.0
MIN_INTERVAL: Final = 1.0
MAX_INTERVAL: Final = 7 * DAY
MAX_TIMEOUT: Final = 5 * MINUTE
MAX_DURATION: Final = 7 * DAY  # backoff_max, repeat_interval, max_backoff
MIN_UI_SESSION: Final = MINUTE  # [server] ui_session, the lifetime of a /ui login
MAX_UI_SESSION: Final = 7 * DAY
DEFAULT_UI_SESSION: Final = 8 * 3600.0

_PERCENT: Final = re.compile(r"(\d+(?:\.\d+)?)\s*%")

_SIZE_UNITS: Final = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_SIZE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")
KIB: Final = 1024
MIB: Final = 1024 * 1024
MIN_RESPONSE_BYTES: Final = 1 * KIB
MAX_RESPONSE_BYTES: Final = 64 * MIB
DEFAULT_MAX_RESPONSE_BYTES: Final = 1 * MIB
# Binary units first: 1MiB prints as 1MiB, 2000000 as 2MB, 1500 as 1500B.
_DISPLAY_UNITS: Final = (
    ("GiB", 1024**3),
    ("MiB", MIB),
    ("KiB", KIB),
    ("GB", 1000**3),
    ("MB", 1000**2),
    ("kB", 1000),
)


def duration_within(minimum: float, maximum: float, *, above: bool = False) -> BeforeValidator:
    """A duration field bounded to ``[minimum, maximum]`` (``(minimum, maximum]`` if
    ``above``); the message quotes the value as written."""
    low, high = format_duration(minimum), format_duration(maximum)
    bounds = f"more than {low} and at most {high}" if above else f"between {low} and {high}"

    def parse(value: Any) -> float:
        seconds = parse_duration(value)
        if seconds < minimum or (above and seconds == minimum) or seconds > maximum:
            raise ValueError(f"must be {bounds}, not {shown(value)}")
        return seconds

    return BeforeValidator(parse)


def parse_percent(value: str | float) -> float:
    """A fraction 0..1 from ``"10%"`` or ``0.1``."""
    match = _PERCENT.fullmatch(value.strip()) if isinstance(value, str) else None
    if match:
        fraction: float = float(match.group(1)) / 100
    elif isinstance(value, int | float) and not isinstance(value, bool):
        fraction = value  # compared as it is: an integer may be beyond any float
    else:
        raise ValueError(f"invalid percentage {shown(value)} (use e.g. 10% or 0.1)")
    if not 0 <= fraction <= 1:
        raise ValueError("must be between 0% and 100% (0 and 1)")
    return float(fraction)


def parse_size(value: str | int) -> int:
    """Bytes in ``"1MiB"``, ``"512KiB"``, ``"2MB"`` (decimal: 2,000,000), ``"64kB"``, ``"100B"``
    or an integer; units are case-insensitive. ValueError for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"invalid size {shown(value)} (must not be negative)")
        return value
    match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(
            f"invalid size {shown(value)} (use an integer number of bytes or e.g. 512KiB, "
            "1MiB, 2MB)"
        )
    size = float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if not math.isfinite(size):
        raise ValueError(f"invalid size {shown(value)} (too large)")
    return int(size)


def format_size(size: int) -> str:
    """A byte count for display, exact: ``1048576`` -> ``"1MiB"``, ``2000000`` -> ``"2MB"``."""
    for unit, factor in _DISPLAY_UNITS:
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def response_size(value: Any) -> int:
    """``max_response_bytes``: a size between 1KiB and 64MiB."""
    size = parse_size(value)
    if not MIN_RESPONSE_BYTES <= size <= MAX_RESPONSE_BYTES:
        raise ValueError(
            f"must be between {format_size(MIN_RESPONSE_BYTES)} and "
            f"{format_size(MAX_RESPONSE_BYTES)}, not {shown(value)}"
        )
    return size
