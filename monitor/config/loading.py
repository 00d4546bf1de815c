"""A TOML file or a parsed document -> :class:`~monitor.config.models.Settings`, or one
:class:`~monitor.errors.ConfigError` listing every problem in the order of the file."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from monitor.config.context import Context
from monitor.config.messages import key_path, message
from monitor.config.models import Settings
from monitor.errors import ConfigError

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_FILE",
    "default_config_path",
    "load_settings",
    "parse_settings",
]

CONFIG_ENV: Final = "GENAUTH_MONITOR_CONFIG"
DEFAULT_CONFIG_FILE: Final = "genauth-monitor.toml"


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
    ctx = Context(
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
    raise ConfigError([f"{key_path(tuple(e['loc']))}: {message(e)}" for e in errors])


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
