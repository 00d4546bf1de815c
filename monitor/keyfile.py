"""The fingerprint key: configured, or a random key file generated once and reused.

A key file that cannot be created or read is a configuration problem (exit code 2) reported
under ``monitor.fingerprint_key_file``, the key an operator sets to choose the file instead;
the message says it was the generated file and where it is. Nothing here prints the key.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Final

from monitor.config import Settings
from monitor.errors import ConfigError

__all__ = ["KEY_FILE_SUFFIX", "fingerprint_key", "key_file_path"]

log = logging.getLogger("monitor")

KEY_FILE_SUFFIX: Final = ".fingerprint-key"
_KEY: Final = "monitor.fingerprint_key_file"
_INSTEAD: Final = "or set monitor.fingerprint_key_env or monitor.fingerprint_key_file"


def fingerprint_key(settings: Settings) -> bytes:
    """The HMAC key for secret fingerprints: configured, or a generated file reused later.
    ConfigError naming ``monitor.fingerprint_key_file`` if the generated file is unusable."""
    configured = settings.monitor.fingerprint_key
    if configured is not None:
        return configured.get_secret_value()
    path = key_file_path(settings)
    if not path.exists():
        _create_key_file(path)
    try:
        key = path.read_text().strip().encode()
    except OSError as exc:
        raise _problem(f"cannot read the generated key file {path}: {_reason(exc)}") from None
    except UnicodeDecodeError:
        raise _problem(
            f"the generated key file {path} is not UTF-8 text (restore it, {_INSTEAD})"
        ) from None
    if not key:
        raise _problem(f"the generated key file {path} is empty (restore it, {_INSTEAD})")
    return key


def key_file_path(settings: Settings) -> Path:
    """Beside the SQLite database, else beside the config file (or in the working directory)."""
    sqlite_path = settings.storage.sqlite_path
    if sqlite_path is not None:
        return sqlite_path.with_name(sqlite_path.name + KEY_FILE_SUFFIX)
    base = settings.source.parent if settings.source is not None else Path.cwd()
    return base / ("genauth-monitor" + KEY_FILE_SUFFIX)


def _create_key_file(path: Path) -> None:
    """Write a random key to a private temp file, then link it into place: a process racing
    us either wins (and we read its key) or finds the file complete, never half-written."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32) + "\n")
            os.link(temp, path)
            log.warning("created a new fingerprint key file", extra={"path": str(path)})
        except FileExistsError:
            pass
        finally:
            temp.unlink(missing_ok=True)
    except OSError as exc:
        raise _problem(
            f"cannot create the generated key file {path}: {_reason(exc)} "
            f"(make its directory writable, {_INSTEAD})"
        ) from None


def _problem(message: str) -> ConfigError:
    return ConfigError([f"{_KEY}: {message}"])


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__
