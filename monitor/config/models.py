"""The settings models: frozen, unknown keys refused, one per table of the config file."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated, Any, ClassVar, Final, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    SecretBytes,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import make_url

from monitor.config.context import Context, context_of
from monitor.config.fields import (
    ConfigPath,
    DatabaseUrl,
    DottedPath,
    Duration,
    EnvName,
    EventKind,
    ExistingFile,
    Expectations,
    HttpUrl,
    Interval,
    Listen,
    LogLevel,
    Name,
    Percent,
    ResponseSize,
    Secret,
    Text,
    Timeout,
    UiSession,
    split_listen,
    sqlite_file,
)
from monitor.config.quantities import DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_UI_SESSION
from monitor.config.sources import Found, Source
from monitor.core.rules import Severity

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_DATABASE_URL",
    "DEFAULT_LISTEN",
    "MonitorSettings",
    "ServerSettings",
    "Settings",
    "SinkSettings",
    "StorageSettings",
    "TargetSettings",
]

DEFAULT_BASE_URL: Final = "https://api.genauth.ai"
DEFAULT_DATABASE_URL: Final = "sqlite:///genauth-monitor.db"
DEFAULT_LISTEN: Final = "127.0.0.1:9464"


class _Model(BaseModel):
    """Frozen, unknown keys refused; reads its secret sources before pydantic validates."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    _sources: ClassVar[tuple[Source, ...]] = ()

    @model_validator(mode="wrap")
    @classmethod
    def _read_raw(
        cls, data: Any, handler: ModelWrapValidatorHandler[Self], info: ValidationInfo
    ) -> Self:
        if not isinstance(data, dict):
            return handler(data)
        data = dict(data)
        found = Found()
        cls._prepare(data, context_of(info), found)
        try:
            model = handler(data)
        except ValidationError as exc:
            raise found.error(cls.__name__, exc.errors()) from None
        if found.problems:
            raise found.error(cls.__name__, [])
        return model

    @classmethod
    def _prepare(cls, data: dict[str, Any], ctx: Context, found: Found) -> None:
        """Complete ``data`` in place (secrets, defaults) and record cross-key problems."""
        for source in cls._sources:
            source.read(data, ctx, found)


class MonitorSettings(_Model):
    """``[monitor]``: defaults for every target and the fingerprint key."""

    _sources = (Source("fingerprint_key", inline=False, binary=True),)

    interval: Interval = 60.0
    jitter: Percent = 0.1
    timeout: Timeout = 10.0
    failure_threshold: Annotated[StrictInt, Field(ge=1)] = 3
    backoff_max: Duration = 900.0
    max_response_bytes: ResponseSize = DEFAULT_MAX_RESPONSE_BYTES
    # Requests per second to one base_url from this process (all its targets); unset: no cap.
    max_requests_per_second: Annotated[float, Field(gt=0, le=100_000)] | None = None
    # Change attribution (SPEC §11): how long a non-critical alert may wait for its actors, and
    # how far the audit-log window is widened for clock skew.
    attribution_wait: Duration = 60.0
    attribution_margin: Duration = 120.0
    fingerprint_key_env: EnvName | None = None
    fingerprint_key_file: ConfigPath | None = None
    fingerprint_key: SecretBytes | None = None
    log_level: LogLevel = "info"


class StorageSettings(_Model):
    """``[storage]``: the database. A relative SQLite path is relative to the config file."""

    _sources = (Source("url", always=True),)

    url: DatabaseUrl = Field(default=DEFAULT_DATABASE_URL, validate_default=True, repr=False)
    url_env: EnvName | None = None
    url_file: ConfigPath | None = None

    @property
    def is_sqlite(self) -> bool:
        return make_url(self.url).get_backend_name() == "sqlite"

    @property
    def sqlite_path(self) -> Path | None:
        """The database file (absolute), or None for PostgreSQL and in-memory SQLite."""
        url = make_url(self.url)
        return sqlite_file(url) if url.get_backend_name() == "sqlite" else None

    @property
    def display_url(self) -> str:
        """The URL with any password shown as ``***`` and no query string (libpq accepts a
        ``?password=`` there too): the only form fit to print."""
        url = make_url(self.url)
        shown = url.set(query={}).render_as_string(hide_password=True)
        return shown + ("?..." if url.query else "")


class ServerSettings(_Model):
    """``[server]``: the HTTP listener, the bearer token of ``/api/v1`` and ``/ui``, and the
    lifetime of a ``/ui`` login."""

    _sources = (Source("api_token", inline=False),)

    listen: Listen = DEFAULT_LISTEN
    api_token_env: EnvName | None = None
    api_token_file: ConfigPath | None = None
    api_token: Secret | None = None
    metrics_require_token: StrictBool = False
    ui_session: UiSession = DEFAULT_UI_SESSION

    @classmethod
    def _prepare(cls, data: dict[str, Any], ctx: Context, found: Found) -> None:
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
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]


class TargetSettings(_Model):
    """``[[targets]]``: one GenAuth user pool to watch."""

    _sources = (Source("access_key_secret", required=True),)

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
    expect: Expectations = Field(default_factory=dict)
    ignore: tuple[DottedPath, ...] = ()
    attribution: StrictBool = True  # SPEC §11: ask the admin audit log who made a change
    attribution_resource_types: tuple[Text, ...] = ()  # empty: every resource type

    def effective_interval(self, monitor: MonitorSettings) -> float:
        return self.interval if self.interval is not None else monitor.interval

    def effective_timeout(self, monitor: MonitorSettings) -> float:
        return self.timeout if self.timeout is not None else monitor.timeout

    def effective_max_response_bytes(self, monitor: MonitorSettings) -> int:
        """The cap on this target's upstream body after decompression."""
        own = self.max_response_bytes
        return own if own is not None else monitor.max_response_bytes


MAX_SINK_URLS: Final = 16  # Alertmanagers of one sink: each is a delivery lane (a thread)
_URL_KEYS: Final = ("url_env", "url_file", "url")


class SinkSettings(_Model):
    """``[[sinks]]``: where alerts go. The URL may be secret (Slack), so it is never printed.

    An ``alertmanager`` sink may give ``urls`` (every Alertmanager of a cluster, each sent
    every alert) instead of ``url``; ``url`` is then the first of them."""

    _url_source: ClassVar = Source("url", required=True, placeholder="https://not-read.invalid/")
    _sources = (_url_source, Source("secret"))

    type: Literal["webhook", "alertmanager", "slack"]
    name: Name
    url: HttpUrl = Field(repr=False)
    url_env: EnvName | None = None
    url_file: ConfigPath | None = None
    urls: tuple[HttpUrl, ...] | None = Field(default=None, repr=False)
    secret_env: EnvName | None = None
    secret_file: ConfigPath | None = None
    secret: Secret | None = None
    min_severity: Severity = "info"
    kinds: tuple[EventKind, ...] = ()
    timeout: Timeout = 10.0
    repeat_interval: Duration | None = None
    max_backoff: Duration = 600.0

    @classmethod
    def _prepare(cls, data: dict[str, Any], ctx: Context, found: Found) -> None:
        kind = data.get("type")
        if isinstance(kind, str):
            data.setdefault("name", kind)
        if kind in ("alertmanager", "slack"):
            for key in ("secret", "secret_env", "secret_file"):
                if key in data:
                    found.problem(key, "only webhook sinks sign their requests")
        several = data.get("urls") is not None
        if several:
            cls._several_urls(data, kind, found)
        elif kind == "alertmanager" and not any(data.get(key) is not None for key in _URL_KEYS):
            found.problem("url", "required key is missing (set url_env, url_file, url or urls)")
            found.superseded.add("url")
            several = True  # nothing for the url source to read
        for source in cls._sources:
            if not (several and source is cls._url_source):
                source.read(data, ctx, found)

    @classmethod
    def _several_urls(cls, data: dict[str, Any], kind: Any, found: Found) -> None:
        """``urls`` instead of ``url``: only on an alertmanager sink, never beside ``url``."""
        given = [key for key in _URL_KEYS if data.get(key) is not None]
        if given:
            found.problem("urls", f"give either urls or {given[0]}, not both")
        if kind != "alertmanager":
            found.problem("urls", "only alertmanager sinks take several URLs (use url)")
        urls = data["urls"]
        # ``url`` is the first of them (for what shows a sink's URL); its errors are those of
        # urls[0], reported there.
        found.superseded.add("url")
        first = urls[0] if isinstance(urls, list | tuple) and urls else None
        data["url"] = first if isinstance(first, str) else "https://not-read.invalid/"

    @field_validator("urls")
    @classmethod
    def _one_to_sixteen_distinct(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return value
        if not 1 <= len(value) <= MAX_SINK_URLS:
            raise ValueError(f"must list 1 to {MAX_SINK_URLS} URLs")
        if len(set(value)) != len(value):
            raise ValueError("lists one URL twice (each gets every alert once)")
        return value

    @property
    def lane_urls(self) -> tuple[str, ...]:
        """Each URL alerts go to: one delivery lane each, in the order given."""
        return self.urls if self.urls is not None else (self.url,)

    @property
    def display_url(self) -> str:
        """Scheme and host only: the path of a Slack or webhook URL is often a credential."""
        shown = []
        for url in self.lane_urls:
            parts = urlsplit(url)
            shown.append(f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/...")
        return ", ".join(shown)


class ClusterSettings(_Model):
    """``[cluster]`` (SPEC §10): replicas sharing one PostgreSQL database."""

    replica_name: Name | None = None  # default: host name plus a random suffix


class Settings(_Model):
    """The whole configuration file."""

    monitor: MonitorSettings = Field(default_factory=MonitorSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    targets: tuple[TargetSettings, ...] = Field(default=(), validate_default=True)
    sinks: tuple[SinkSettings, ...] = ()
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    source: Path | None = None

    @classmethod
    def _prepare(cls, data: dict[str, Any], ctx: Context, found: Found) -> None:
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
    types = Counter(
        sink["type"]
        for sink in sinks
        if isinstance(sink, dict) and isinstance(sink.get("type"), str)
    )
    return [
        {**sink, "name": f"{sink['type']}-{index}"}
        if isinstance(sink, dict)
        and "name" not in sink
        and isinstance(sink.get("type"), str)
        and types[sink["type"]] > 1
        else sink
        for index, sink in enumerate(sinks)
    ]


def _report_duplicate_names(items: Any, section: str, what: str, found: Found) -> None:
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
