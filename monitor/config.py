"""Configuration: a TOML file -> validated, frozen settings (SPEC §6).

``load_settings(path)`` reads the file, ``parse_settings(raw, ...)`` validates a parsed document.
Both take the environment as an argument (``os.environ`` at call time when omitted); nothing is
read at import time.

Any problem raises :class:`~monitor.errors.ConfigError` with one line per problem, key path
first (``targets[0].access_key_secret_env: environment variable X is not set``); every problem
of the document is reported at once. Lines are built from the key path and a message of our own
or pydantic's ``msg``, never from the offending value where it may be secret.

Secrets come from ``<key>_env`` (an environment variable), ``<key>_file`` (a file, trailing
newlines stripped) or, where allowed, ``<key>`` itself; exactly one of them. Relative paths
(``*_file``, ``ca_bundle``, a relative SQLite database) are relative to the config file's
directory.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import tomllib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Final, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    SecretBytes,
    SecretStr,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from monitor.core.diff import flatten
from monitor.core.escape import shown
from monitor.core.rules import EVENT_KINDS, Severity
from monitor.errors import ConfigError
from monitor.timeutil import format_duration, parse_duration

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_BASE_URL",
    "DEFAULT_CONFIG_FILE",
    "DEFAULT_DATABASE_URL",
    "DEFAULT_LISTEN",
    "MonitorSettings",
    "ServerSettings",
    "Settings",
    "SinkSettings",
    "StorageSettings",
    "TargetSettings",
    "default_config_path",
    "format_duration",
    "format_size",
    "load_settings",
    "parse_duration",
    "parse_percent",
    "parse_settings",
    "parse_size",
]

CONFIG_ENV: Final = "GENAUTH_MONITOR_CONFIG"
DEFAULT_CONFIG_FILE: Final = "genauth-monitor.toml"
DEFAULT_BASE_URL: Final = "https://api.genauth.ai"
DEFAULT_DATABASE_URL: Final = "sqlite:///genauth-monitor.db"
DEFAULT_LISTEN: Final = "127.0.0.1:9464"

# --------------------------------------------------------------------------- durations, percents
# The grammar of durations is monitor.timeutil's (the CLI and the API read ages with it too);
# the bounds of each duration key are config's own.

_PERCENT: Final = re.compile(r"(\d+(?:\.\d+)?)\s*%")

MINUTE: Final = 60.0
DAY: Final = 86400.0
# The bounds of SPEC §6 (docs/configuration.md): anything outside them is a typo, not a choice.
MIN_INTERVAL: Final = 1.0
MAX_INTERVAL: Final = 7 * DAY
MAX_TIMEOUT: Final = 5 * MINUTE
MAX_DURATION: Final = 7 * DAY  # backoff_max, repeat_interval, max_backoff


def _duration_within(minimum: float, maximum: float, *, above: bool = False) -> BeforeValidator:
    """A duration field bounded to ``[minimum, maximum]`` (``(minimum, maximum]`` if
    ``above``); the message quotes the value as written (durations are never secret)."""
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
        fraction = float(match.group(1)) / 100
    elif isinstance(value, int | float) and not isinstance(value, bool):
        fraction = float(value)
    else:
        raise ValueError(f"invalid percentage {shown(value)} (use e.g. 10% or 0.1)")
    if not 0 <= fraction <= 1:
        raise ValueError("must be between 0% and 100% (0 and 1)")
    return fraction


# --------------------------------------------------------------------------- sizes

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
    for unit, factor in (("GiB", 1024**3), ("MiB", MIB), ("KiB", KIB)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    for unit, factor in (("GB", 1000**3), ("MB", 1000**2), ("kB", 1000)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def _response_size(value: Any) -> int:
    size = parse_size(value)
    if not MIN_RESPONSE_BYTES <= size <= MAX_RESPONSE_BYTES:
        raise ValueError(
            f"must be between {format_size(MIN_RESPONSE_BYTES)} and "
            f"{format_size(MAX_RESPONSE_BYTES)}, not {shown(value)}"
        )
    return size


# --------------------------------------------------------------------------- validation context


@dataclass(frozen=True, slots=True)
class _Context:
    """What validation may consult besides the document: passed in, never global."""

    environ: Mapping[str, str]
    base_dir: Path
    from_file: bool  # validating a config file, not settings built in code
    source: Path | None = None
    # False for read-only commands (history, show, verify, ...): an auditor needs the
    # database, not the upstream or sink credentials, so those are not read at all.
    resolve_secrets: bool = True

    def path(self, value: str | os.PathLike[str]) -> Path:
        return self.base_dir / value


def _context(info: ValidationInfo) -> _Context:
    if isinstance(info.context, _Context):
        return info.context
    return _Context(os.environ, Path.cwd(), from_file=False)


Loc = tuple[str | int, ...]


@dataclass
class _Found:
    """What reading the raw document found before pydantic validates it."""

    problems: list[tuple[Loc, str]] = field(default_factory=list)
    # fields whose own errors a problem of their source already explains
    superseded: set[str] = field(default_factory=set)
    # resolved field -> (key the value came from, where it came from)
    origins: dict[str, tuple[str, str]] = field(default_factory=dict)

    def problem(self, loc: str | Loc, message: str, *, supersedes: str | None = None) -> None:
        self.problems.append(((loc,) if isinstance(loc, str) else loc, message))
        if supersedes is not None:
            self.superseded.add(supersedes)

    def error(self, title: str, errors: list[ErrorDetails]) -> ValidationError:
        lines = list(self.problems)
        for error in errors:
            loc = tuple(error["loc"])
            head = loc[0] if loc else None
            if head in self.superseded and len(loc) == 1:
                continue
            if isinstance(head, str) and head in self.origins:
                key, origin = self.origins[head]
                lines.append(((key, *loc[1:]), f"{origin}: {_message(error)}"))
            else:
                lines.append((loc, _message(error)))
        return _validation_error(title, lines)


def _validation_error(title: str, lines: list[tuple[Loc, str]]) -> ValidationError:
    details = [
        InitErrorDetails(
            type=PydanticCustomError("config", "{message}", {"message": message}),
            loc=loc,
            input=None,
        )
        for loc, message in lines
    ]
    return ValidationError.from_exception_data(title, details)


_PLAIN_MESSAGES: Final = {
    "missing": "required key is missing",
    "extra_forbidden": "unknown key",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "dict_type": "must be a table",
    "tuple_type": "must be an array",
    "list_type": "must be an array",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "int_type": "must be an integer",
    "float_type": "must be a number",
}


def _message(error: ErrorDetails) -> str:
    """The message of a pydantic error, worded for a config file; never quotes the input."""
    kind, message = error["type"], error["msg"]
    if kind == "config":
        return message
    if kind in _PLAIN_MESSAGES:
        return _PLAIN_MESSAGES[kind]
    message = message.removeprefix("Value error, ")
    if message.startswith("Input should be "):
        message = "must be " + message.removeprefix("Input should be ")
    return message


# --------------------------------------------------------------------------- secret sources

_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class _Source:
    """A value given by exactly one of ``<key>_env``, ``<key>_file`` or (if inline) ``<key>``."""

    key: str
    required: bool = False
    inline: bool = True  # may the config file hold the value itself?
    binary: bool = False
    placeholder: str = "(not read)"  # stands in for the value when secrets are not resolved
    always: bool = False  # resolved even for read-only commands (the database URL)

    @property
    def keys(self) -> tuple[str, ...]:
        alternatives = (f"{self.key}_env", f"{self.key}_file")
        return (*alternatives, self.key) if self.inline else alternatives

    def read(self, data: dict[str, Any], ctx: _Context, found: _Found) -> None:
        """Put the value into ``data[key]``, or record why it cannot be had."""
        key, choices = self.key, _one_of(self.keys)
        given = [name for name in self.keys if data.get(name) is not None]
        if ctx.from_file and not self.inline and key in data:
            found.problem(key, f"unknown key (use {choices})", supersedes=key)
        elif len(given) > 1:
            found.problem(key, f"give only one of {choices}, not {_all(given)}", supersedes=key)
        elif not given and self.required:
            found.problem(key, f"required key is missing (set {choices})", supersedes=key)
        elif given and not ctx.resolve_secrets and not self.always:
            data[self.key] = self.placeholder.encode() if self.binary else self.placeholder
            for name in self.keys:
                if name != self.key:
                    data.pop(name, None)
        elif given and given[0] != key:
            self._fetch(given[0], data, ctx, found)
        # otherwise absent and optional, or given inline: the field itself validates it

    def _fetch(self, key: str, data: dict[str, Any], ctx: _Context, found: _Found) -> None:
        where = data[key]
        if key.endswith("_env"):
            if not isinstance(where, str) or not _ENV_NAME.fullmatch(where):
                found.superseded.add(self.key)  # the *_env field reports the bad name
                return
            origin, problem, value = f"environment variable {where}", None, ctx.environ.get(where)
            if value is None:
                problem = f"{origin} is not set"
            elif not value:
                problem = f"{origin} is empty"
            content: str | bytes | None = value.encode() if self.binary and value else value
        else:
            if not isinstance(where, str | os.PathLike):
                found.superseded.add(self.key)  # the *_file field reports the bad type
                return
            path = ctx.path(where)
            origin = f"file {path}"
            problem, content = _read_secret_file(path, binary=self.binary)
        if problem is not None:
            found.problem(key, problem, supersedes=self.key)
        else:
            data[self.key] = content
            found.origins[self.key] = (key, origin)


def _read_secret_file(path: Path, *, binary: bool) -> tuple[str | None, str | bytes | None]:
    """``(problem, None)`` or ``(None, content)`` with trailing newlines stripped."""
    try:
        content = path.read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        return f"cannot read file {path}: {exc.strerror or type(exc).__name__}", None
    if not content:
        return f"file {path} is empty", None
    if binary:
        return None, content
    try:
        return None, content.decode("utf-8")
    except UnicodeDecodeError:
        return f"file {path} is not UTF-8 text", None


def _one_of(keys: tuple[str, ...]) -> str:
    return ", ".join(keys[:-1]) + " or " + keys[-1]


def _all(keys: list[str]) -> str:
    return ", ".join(keys[:-1]) + " and " + keys[-1]


# --------------------------------------------------------------------------- field types


def _config_path(value: Path, info: ValidationInfo) -> Path:
    return _context(info).path(value)


def _existing_file(value: Path) -> Path:
    if not value.is_file():
        raise ValueError(f"file {value} does not exist")
    return value


def _env_name(value: str) -> str:
    if not _ENV_NAME.fullmatch(value):
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


_NAME: Final = re.compile(r"[A-Za-z0-9_.-]+")


MAX_NAME = 128  # the width of targets.name and outbox.sink in the database


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


# Each duration field says its bounds; a value outside them is one line naming the key.
Interval = Annotated[float, _duration_within(MIN_INTERVAL, MAX_INTERVAL)]
Timeout = Annotated[float, _duration_within(0, MAX_TIMEOUT, above=True)]
Duration = Annotated[float, _duration_within(0, MAX_DURATION, above=True)]
ResponseSize = Annotated[int, BeforeValidator(_response_size)]
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


# --------------------------------------------------------------------------- models


class _Model(BaseModel):
    """Frozen, unknown keys refused; reads its secret sources before pydantic validates."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    _sources: ClassVar[tuple[_Source, ...]] = ()

    @model_validator(mode="wrap")
    @classmethod
    def _read_raw(
        cls, data: Any, handler: ModelWrapValidatorHandler[Self], info: ValidationInfo
    ) -> Self:
        if not isinstance(data, dict):
            return handler(data)
        data = dict(data)
        found = _Found()
        cls._prepare(data, _context(info), found)
        try:
            model = handler(data)
        except ValidationError as exc:
            raise found.error(cls.__name__, exc.errors()) from None
        if found.problems:
            raise found.error(cls.__name__, [])
        return model

    @classmethod
    def _prepare(cls, data: dict[str, Any], ctx: _Context, found: _Found) -> None:
        """Complete ``data`` in place (secrets, defaults) and record cross-key problems."""
        for source in cls._sources:
            source.read(data, ctx, found)


class MonitorSettings(_Model):
    """``[monitor]``: defaults for every target and the fingerprint key."""

    _sources = (_Source("fingerprint_key", inline=False, binary=True),)

    interval: Interval = 60.0
    jitter: Percent = 0.1
    timeout: Timeout = 10.0
    failure_threshold: Annotated[StrictInt, Field(ge=1)] = 3
    backoff_max: Duration = 900.0
    max_response_bytes: ResponseSize = DEFAULT_MAX_RESPONSE_BYTES
    fingerprint_key_env: EnvName | None = None
    fingerprint_key_file: ConfigPath | None = None
    fingerprint_key: SecretBytes | None = None
    log_level: LogLevel = "info"


class StorageSettings(_Model):
    """``[storage]``: the database. A relative SQLite path is relative to the config file."""

    _sources = (_Source("url", always=True),)

    url: str = Field(default=DEFAULT_DATABASE_URL, validate_default=True, repr=False)
    url_env: EnvName | None = None
    url_file: ConfigPath | None = None

    @field_validator("url")
    @classmethod
    def _database_url(cls, value: str, info: ValidationInfo) -> str:
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
        if url.get_backend_name() == "sqlite" and _sqlite_file(url) is not None:
            url = url.set(database=str(_context(info).path(url.database or "")))
        return url.render_as_string(hide_password=False)

    @property
    def is_sqlite(self) -> bool:
        return make_url(self.url).get_backend_name() == "sqlite"

    @property
    def sqlite_path(self) -> Path | None:
        """The database file (absolute), or None for PostgreSQL and in-memory SQLite."""
        url = make_url(self.url)
        return _sqlite_file(url) if url.get_backend_name() == "sqlite" else None

    @property
    def display_url(self) -> str:
        """The URL with any password shown as ``***`` and no query string (libpq accepts a
        ``?password=`` there too): the only form fit to print."""
        url = make_url(self.url)
        shown = url.set(query={}).render_as_string(hide_password=True)
        return shown + ("?..." if url.query else "")


_DRIVERS: Final = {
    "sqlite": "sqlite",
    "sqlite+pysqlite": "sqlite+pysqlite",
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
    "postgresql+psycopg": "postgresql+psycopg",
}


def _sqlite_file(url: URL) -> Path | None:
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


_LISTEN: Final = re.compile(r"(?:\[(?P<ipv6>[^\]]+)\]|(?P<host>[^:\[\]\s]+)):(?P<port>\d{1,5})")


def _split_listen(value: str) -> tuple[str, int]:
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
    _split_listen(value)
    return value.strip()


class ServerSettings(_Model):
    """``[server]``: the HTTP listener and the bearer token of ``/api/v1``."""

    _sources = (_Source("api_token", inline=False),)

    listen: Annotated[str, AfterValidator(_listen)] = DEFAULT_LISTEN
    api_token_env: EnvName | None = None
    api_token_file: ConfigPath | None = None
    api_token: Secret | None = None
    metrics_require_token: StrictBool = False

    @classmethod
    def _prepare(cls, data: dict[str, Any], ctx: _Context, found: _Found) -> None:
        super()._prepare(data, ctx, found)
        if data.get("metrics_require_token") is True and not any(
            data.get(key) is not None for key in ("api_token", "api_token_env", "api_token_file")
        ):
            found.problem(
                "metrics_require_token", "needs a token: set api_token_env or api_token_file"
            )

    @property
    def host(self) -> str:
        """The address to bind, without brackets for IPv6."""
        return _split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return _split_listen(self.listen)[1]


def _expectations(value: dict[str, Any]) -> dict[str, Any]:
    """Nested tables flattened to dotted paths; each expected value a string, number or bool."""
    expected = flatten(value) if value else {}
    bad: list[tuple[Loc, str]] = []
    for path, wanted in expected.items():
        if not all(path.split(".")):
            bad.append(((path,), "must be a dotted path such as smtpConfig.smtp_host"))
        elif not isinstance(wanted, str | int | float):
            bad.append(((path,), "expected value must be a string, number or boolean"))
    if bad:
        raise _validation_error("expect", bad)
    return expected


class TargetSettings(_Model):
    """``[[targets]]``: one GenAuth user pool to watch."""

    _sources = (_Source("access_key_secret", required=True),)

    name: Name
    base_url: Annotated[HttpUrl, AfterValidator(lambda url: url.rstrip("/"))] = DEFAULT_BASE_URL
    access_key_id: Text
    access_key_secret_env: EnvName | None = None
    access_key_secret_file: ConfigPath | None = None
    access_key_secret: Secret
    userpool_id: Text | None = None
    interval: Interval | None = None
    timeout: Timeout | None = None
    max_response_bytes: ResponseSize | None = None
    ca_bundle: ExistingFile | None = None
    expect: Annotated[dict[str, Any], AfterValidator(_expectations)] = Field(default_factory=dict)
    ignore: tuple[DottedPath, ...] = ()

    def effective_interval(self, monitor: MonitorSettings) -> float:
        return self.interval if self.interval is not None else monitor.interval

    def effective_timeout(self, monitor: MonitorSettings) -> float:
        return self.timeout if self.timeout is not None else monitor.timeout

    def effective_max_response_bytes(self, monitor: MonitorSettings) -> int:
        """The cap on this target's upstream body after decompression."""
        own = self.max_response_bytes
        return own if own is not None else monitor.max_response_bytes


class SinkSettings(_Model):
    """``[[sinks]]``: where alerts go. The URL may be secret (Slack), so it is never printed."""

    _sources = (
        _Source("url", required=True, placeholder="https://not-read.invalid/"),
        _Source("secret"),
    )

    type: Literal["webhook", "alertmanager", "slack"]
    name: Name
    url: HttpUrl = Field(repr=False)
    url_env: EnvName | None = None
    url_file: ConfigPath | None = None
    secret_env: EnvName | None = None
    secret_file: ConfigPath | None = None
    secret: Secret | None = None
    min_severity: Severity = "info"
    kinds: tuple[EventKind, ...] = ()
    timeout: Timeout = 10.0
    repeat_interval: Duration | None = None
    max_backoff: Duration = 600.0

    @classmethod
    def _prepare(cls, data: dict[str, Any], ctx: _Context, found: _Found) -> None:
        kind = data.get("type")
        if isinstance(kind, str):
            data.setdefault("name", kind)
        if kind in ("alertmanager", "slack"):
            for key in ("secret", "secret_env", "secret_file"):
                if key in data:
                    found.problem(key, "only webhook sinks sign their requests")
        super()._prepare(data, ctx, found)

    @property
    def display_url(self) -> str:
        """Scheme and host only: the path of a Slack or webhook URL is often a credential."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/..."


class Settings(_Model):
    """The whole configuration file."""

    monitor: MonitorSettings = Field(default_factory=MonitorSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    targets: tuple[TargetSettings, ...] = Field(default=(), validate_default=True)
    sinks: tuple[SinkSettings, ...] = ()
    source: Path | None = None

    @classmethod
    def _prepare(cls, data: dict[str, Any], ctx: _Context, found: _Found) -> None:
        for section in ("monitor", "storage", "server"):
            data.setdefault(section, {})  # so their defaults see the config directory
        if ctx.from_file:
            if "source" in data:
                found.problem("source", "unknown key")
            data["source"] = ctx.source
        sinks = data.get("sinks")
        if isinstance(sinks, list):
            data["sinks"] = _name_sinks(sinks)
        for section, what in (("targets", "target"), ("sinks", "sink")):
            _report_duplicate_names(data.get(section), section, what, found)

    @field_validator("targets")
    @classmethod
    def _some_targets(cls, value: tuple[TargetSettings, ...]) -> tuple[TargetSettings, ...]:
        if not value:
            raise ValueError("at least one [[targets]] table is required")
        return value

    def target(self, name: str) -> TargetSettings:
        """The target called ``name``; KeyError if there is none."""
        for target in self.targets:
            if target.name == name:
                return target
        raise KeyError(name)


def _name_sinks(sinks: list[Any]) -> list[Any]:
    """An unnamed sink is called by its type, or ``<type>-<index>`` when the type repeats."""
    types = Counter(sink.get("type") for sink in sinks if isinstance(sink, dict))
    return [
        {**sink, "name": f"{sink['type']}-{index}"}
        if isinstance(sink, dict)
        and "name" not in sink
        and isinstance(sink.get("type"), str)
        and types[sink["type"]] > 1
        else sink
        for index, sink in enumerate(sinks)
    ]


def _report_duplicate_names(items: Any, section: str, what: str, found: _Found) -> None:
    if not isinstance(items, list | tuple):
        return
    seen: set[str] = set()
    for index, item in enumerate(items):
        name = item.get("name") if isinstance(item, dict) else getattr(item, "name", None)
        if not isinstance(name, str):
            continue
        if name in seen:
            found.problem((section, index, "name"), f"duplicate {what} name {name!r}")
        seen.add(name)


# --------------------------------------------------------------------------- loading

_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


def _key_path(loc: Loc) -> str:
    """``('targets', 0, 'expect', 'a.b')`` -> ``targets[0].expect."a.b"`` (TOML's spelling)."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
            continue
        key = part if _BARE_KEY.fullmatch(part) else json.dumps(part)
        text += f".{key}" if text else key
    return text or "config"


def _document_order(error: ErrorDetails) -> tuple[int, int]:
    """Section, then array index: problems are listed in the order the file has them."""
    loc = error["loc"]
    sections = list(Settings.model_fields)
    section = sections.index(loc[0]) if loc and loc[0] in sections else -1
    index = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else -1
    return section, index


def parse_settings(
    raw: Mapping[str, Any],
    *,
    base_dir: Path,
    environ: Mapping[str, str] | None = None,
    source: Path | None = None,
    resolve_secrets: bool = True,
) -> Settings:
    """Validate a parsed config document; relative paths are taken from ``base_dir``.

    With ``resolve_secrets=False`` (read-only commands) credentials are neither read nor
    required to be readable; their fields hold placeholders.
    """
    ctx = _Context(
        environ=os.environ if environ is None else environ,
        base_dir=base_dir.absolute(),
        from_file=True,
        source=source,
        resolve_secrets=resolve_secrets,
    )
    try:
        return Settings.model_validate(raw, context=ctx)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
    errors.sort(key=_document_order)
    raise ConfigError([f"{_key_path(tuple(e['loc']))}: {_message(e)}" for e in errors])


def load_settings(
    path: Path, environ: Mapping[str, str] | None = None, *, resolve_secrets: bool = True
) -> Settings:
    """Read and validate the TOML file at ``path`` (``environ`` defaults to ``os.environ``)."""
    try:
        with path.open("rb") as file:
            raw = tomllib.load(file)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config: {exc.strerror or exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
    except ValueError:  # tomllib lets int() refuse an integer of more than 4300 digits
        raise ConfigError([f"{path}: invalid TOML: a number is too long"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: invalid TOML: the file is not UTF-8 text"]) from None
    return parse_settings(
        raw,
        base_dir=path.absolute().parent,
        environ=environ,
        source=path.absolute(),
        resolve_secrets=resolve_secrets,
    )


def default_config_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$GENAUTH_MONITOR_CONFIG`` if set, else ``./genauth-monitor.toml``."""
    env = os.environ if environ is None else environ
    return Path(env.get(CONFIG_ENV) or DEFAULT_CONFIG_FILE)
