"""What ``config check`` prints: one line per fact found in the settings, never a secret.

Presentation of the CLI, kept out of the config models.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import BaseModel

from monitor.config import Settings, format_size
from monitor.timeutil import format_duration

__all__ = ["summary"]


def summary(settings: Settings) -> list[str]:
    """The lines of ``config check``, in the order of the file's sections."""
    lines = [f"config: {settings.source}"] if settings.source else []
    lines += [_monitor(settings), _fingerprint_key(settings), _storage(settings)]
    lines.append(_server(settings))
    lines += _targets(settings)
    lines += _sinks(settings)
    return lines


def _monitor(settings: Settings) -> str:
    monitor = settings.monitor
    return (
        f"monitor: interval {format_duration(monitor.interval)}, jitter {monitor.jitter * 100:g}%, "
        f"timeout {format_duration(monitor.timeout)}, failure threshold "
        f"{monitor.failure_threshold}, backoff max {format_duration(monitor.backoff_max)}, "
        f"max response {format_size(monitor.max_response_bytes)}, log level {monitor.log_level}"
        f"{_attribution_timing(settings)}"
    )


def _attribution_timing(settings: Settings) -> str:
    """Change attribution's wait and margin (SPEC §11), said when not the defaults."""
    monitor = settings.monitor
    if (monitor.attribution_wait, monitor.attribution_margin) == (60.0, 120.0):
        return ""
    return (
        f", attribution wait {format_duration(monitor.attribution_wait)}, margin "
        f"{format_duration(monitor.attribution_margin)}"
    )


def _fingerprint_key(settings: Settings) -> str:
    monitor = settings.monitor
    if monitor.fingerprint_key is not None:
        return f"fingerprint key: {_origin(monitor, 'fingerprint_key')}"
    return "fingerprint key: not configured (a random key file is created on first start)"


def _storage(settings: Settings) -> str:
    kind = "SQLite" if settings.storage.is_sqlite else "PostgreSQL"
    return f"storage: {kind} {settings.storage.display_url}"


def _server(settings: Settings) -> str:
    server = settings.server
    token = (
        f"API token {_origin(server, 'api_token')}"
        if server.api_token is not None
        else "no API token (/api/v1 and /ui refuse every request)"
    )
    metrics = "/metrics requires the token" if server.metrics_require_token else "/metrics open"
    session = f"/ui logins last {format_duration(server.ui_session)}"
    return f"server: listening on {server.listen}, {token}, {metrics}, {session}"


def _targets(settings: Settings) -> list[str]:
    monitor, lines = settings.monitor, []
    for target in settings.targets:
        expect = f", {len(target.expect)} expected value(s)" if target.expect else ""
        ignore = f", {len(target.ignore)} ignored path(s)" if target.ignore else ""
        if not target.attribution:
            ignore += ", attribution off"
        elif target.attribution_resource_types:
            ignore += ", attribution of " + ", ".join(target.attribution_resource_types)
        lines.append(
            f"target {target.name}: {_without_userinfo(target.base_url)}, every "
            f"{format_duration(target.effective_interval(monitor))}, timeout "
            f"{format_duration(target.effective_timeout(monitor))}, max response "
            f"{format_size(target.effective_max_response_bytes(monitor))}, "
            f"secret {_origin(target, 'access_key_secret')}{expect}{ignore}"
        )
    return lines


def _sinks(settings: Settings) -> list[str]:
    if not settings.sinks:
        return ["sinks: none (events are recorded but not sent)"]
    lines = []
    for sink in settings.sinks:
        kinds = ", ".join(sink.kinds) if sink.kinds else "all kinds"
        signed = f", signed with secret {_origin(sink, 'secret')}" if sink.secret else ""
        lines.append(
            f"sink {sink.name}: {sink.type} to {sink.display_url} (URL {_origin(sink, 'url')}), "
            f"min severity {sink.min_severity}, {kinds}{signed}"
        )
    return lines


def _origin(model: BaseModel, key: str) -> str:
    """Where a secret came from, for display: never the value."""
    env, file = getattr(model, f"{key}_env", None), getattr(model, f"{key}_file", None)
    if env:
        return f"from environment variable {env}"
    if file:
        return f"from file {file}"
    return "in the config file"


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
