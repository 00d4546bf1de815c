"""The field types of the settings models: each an ``Annotated`` type whose validators say,
in a config file's words, what is wrong with a value."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator, SecretStr, ValidationInfo
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from monitor.config.context import context_of
from monitor.config.messages import Problem, validation_error
from monitor.config.quantities import (
    MAX_DURATION,
    MAX_INTERVAL,
    MAX_TIMEOUT,
    MAX_UI_SESSION,
    MIN_INTERVAL,
    MIN_UI_SESSION,
    duration_within,
    parse_percent,
    response_size,
)
from monitor.config.sources import ENV_NAME
from monitor.core.diff import flatten
from monitor.core.escape import shown
from monitor.core.rules import EVENT_KINDS

__all__ = [
    "MAX_NAME",
    "ConfigPath",
    "DatabaseUrl",
    "DottedPath",
    "Duration",
    "EnvName",
    "EventKind",
    "ExistingFile",
    "Expectations",
    "HttpUrl",
    "Interval",
    "Listen",
    "LogLevel",
    "Name",
    "Percent",
    "ResponseSize",
    "Secret",
    "Text",
    "Timeout",
    "UiSession",
    "split_listen",
    "sqlite_file",
]

_NAME: Final = re.compile(r"[A-Za-z0-9_.-]+")
MAX_NAME: Final = 128  # the width of targets.name and outbox.sink in the database


def _config_path(value: Path, info: ValidationInfo) -> Path:
    return context_of(info).path(value)


def _existing_file(value: Path) -> Path:
    if not value.is_file():
        raise ValueError(f"file {value} does not exist")
    return value


def _env_name(value: str) -> str:
    if not ENV_NAME.fullmatch(value):
        raise ValueError("must be an environment variable name (letters, digits and _)")
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _secret_not_empty(value: SecretStr) -> SecretStr:
    if not value.get_secret_value():
        raise ValueError("must not be empty")
    return value


def _name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError("must be non-empty and use only letters, digits, '_', '.' and '-'")
    if len(value) > MAX_NAME:
        raise ValueError(f"must be at most {MAX_NAME} characters")
    return value


def _http_url(value: str) -> str:
    """An http(s) URL with a host; the message never quotes it (it may carry a token)."""
    try:
        parts = urlsplit(value.strip())
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        _ = parts.port  # raises on a bad port
    except ValueError:
        valid = False
    if not valid:
        raise ValueError("must be an http:// or https:// URL with a host")
    return value.strip()


def _dotted_path(value: str) -> str:
    if not value or not all(value.split(".")):
        raise ValueError("must be a dotted path such as smtpConfig.smtp_host")
    return value


def _event_kind(value: str) -> str:
    if value not in EVENT_KINDS:
        raise ValueError(f"unknown event kind {shown(value)} (known: {', '.join(EVENT_KINDS)})")
    return value


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


# -- listen address

_LISTEN: Final = re.compile(r"(?:\[(?P<ipv6>[^\]]+)\]|(?P<host>[^:\[\]\s]+)):(?P<port>\d{1,5})")


def split_listen(value: str) -> tuple[str, int]:
    """``host:port`` or ``[ipv6]:port`` -> the host (without brackets) and the port."""
    match = _LISTEN.fullmatch(value.strip())
    if match is None or not 0 <= int(match["port"]) <= 65535:
        raise ValueError("must be host:port, e.g. 127.0.0.1:9464, 0.0.0.0:9464 or [::1]:9464")
    if match["ipv6"] is not None:
        try:
            ipaddress.IPv6Address(match["ipv6"])
        except ValueError:
            raise ValueError(f"invalid IPv6 address {shown(match['ipv6'])}") from None
        return match["ipv6"], int(match["port"])
    return match["host"], int(match["port"])


def _listen(value: str) -> str:
    split_listen(value)
    return value.strip()


# -- database URL

_DRIVERS: Final = {
    "sqlite": "sqlite",
    "sqlite+pysqlite": "sqlite+pysqlite",
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
    "postgresql+psycopg": "postgresql+psycopg",
}


def sqlite_file(url: URL) -> Path | None:
    """The file of a SQLite URL; None for an in-memory or ``file:`` URI database."""
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def _database_url(value: str, info: ValidationInfo) -> str:
    """A SQLite or PostgreSQL URL with our driver; a relative SQLite file made absolute."""
    try:
        url = make_url(value.strip())
    except (ArgumentError, ValueError):
        raise ValueError(
            "not a database URL (use sqlite:///FILE or postgresql+psycopg://USER@HOST/DB)"
        ) from None
    driver = _DRIVERS.get(url.drivername)
    if driver is None:
        raise ValueError(
            f"unsupported database {url.drivername!r} (use sqlite or postgresql+psycopg)"
        )
    url = url.set(drivername=driver)
    if url.get_backend_name() == "sqlite" and sqlite_file(url) is not None:
        url = url.set(database=str(context_of(info).path(url.database or "")))
    return url.render_as_string(hide_password=False)


# -- a target's baseline


def _expectations(value: dict[str, Any]) -> dict[str, Any]:
    """Nested tables flattened to dotted paths; each expected value a string, number or bool."""
    expected = flatten(value) if value else {}
    bad: list[Problem] = []
    for path, wanted in expected.items():
        if not all(path.split(".")):
            bad.append(((path,), "must be a dotted path such as smtpConfig.smtp_host"))
        elif not isinstance(wanted, str | int | float):
            bad.append(((path,), "expected value must be a string, number or boolean"))
    if bad:
        raise validation_error("expect", bad)
    return expected


# Each duration field says its bounds; a value outside them is one line naming the key.
Interval = Annotated[float, duration_within(MIN_INTERVAL, MAX_INTERVAL)]
Timeout = Annotated[float, duration_within(0, MAX_TIMEOUT, above=True)]
Duration = Annotated[float, duration_within(0, MAX_DURATION, above=True)]
UiSession = Annotated[float, duration_within(MIN_UI_SESSION, MAX_UI_SESSION)]
ResponseSize = Annotated[int, BeforeValidator(response_size)]
Percent = Annotated[float, BeforeValidator(parse_percent)]
ConfigPath = Annotated[Path, AfterValidator(_config_path)]
ExistingFile = Annotated[ConfigPath, AfterValidator(_existing_file)]
EnvName = Annotated[str, AfterValidator(_env_name)]
Text = Annotated[str, AfterValidator(_not_blank)]
Secret = Annotated[SecretStr, AfterValidator(_secret_not_empty)]
Name = Annotated[str, AfterValidator(_name)]
HttpUrl = Annotated[str, AfterValidator(_http_url)]
DottedPath = Annotated[str, AfterValidator(_dotted_path)]
EventKind = Annotated[str, AfterValidator(_event_kind)]
LogLevel = Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower)]
Listen = Annotated[str, AfterValidator(_listen)]
DatabaseUrl = Annotated[str, AfterValidator(_database_url)]
Expectations = Annotated[dict[str, Any], AfterValidator(_expectations)]
