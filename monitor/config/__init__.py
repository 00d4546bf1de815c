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

The modules, one job each:

    loading      load_settings, parse_settings, default_config_path
    models       the settings models, one per table of the file
    fields       their field types and what each says about a bad value
    quantities   bounded durations, percentages, byte sizes
    sources      secrets from <key>_env / <key>_file / <key>
    messages     pydantic errors as "key.path: message" lines
    context      what validation may consult besides the document

The duration grammar is :mod:`monitor.timeutil`'s (re-exported here); what ``config check``
prints is the CLI's (:mod:`monitor.config_summary`).
"""

from __future__ import annotations

from monitor.config.loading import (
    CONFIG_ENV,
    DEFAULT_CONFIG_FILE,
    default_config_path,
    load_settings,
    parse_settings,
)
from monitor.config.models import (
    DEFAULT_BASE_URL,
    DEFAULT_DATABASE_URL,
    DEFAULT_LISTEN,
    MonitorSettings,
    ServerSettings,
    Settings,
    SinkSettings,
    StorageSettings,
    TargetSettings,
)
from monitor.config.quantities import DEFAULT_UI_SESSION, format_size, parse_percent, parse_size
from monitor.timeutil import format_duration, parse_duration

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_BASE_URL",
    "DEFAULT_CONFIG_FILE",
    "DEFAULT_DATABASE_URL",
    "DEFAULT_LISTEN",
    "DEFAULT_UI_SESSION",
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
