"""Start-up checks of ``run`` and ``db upgrade``: everything that can be found wrong before the
program does anything is a ConfigError naming its key (exit code 2), one line each.

- ``server.listen``: the address can be bound (:func:`check_listen`);
- ``storage.url``: the database opens (:func:`open_storage`): the SQLite directory exists and is
  writable, PostgreSQL answers and accepts us;
- ``monitor.fingerprint_key_file``: the key (or the generated key file) is usable
  (:func:`monitor.keyfile.fingerprint_key`);
- ``storage.url``: no other daemon uses the SQLite database (:func:`lock_sqlite`).

Messages show the database only as ``display_url`` (no password, no query string) and give the
reason from a fixed list, never the driver's text: that can carry the URL with its password.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Final, TextIO

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from monitor.config import Settings
from monitor.errors import ConfigError
from monitor.listen import bind
from monitor.storage import create_store_engine, upgrade
from monitor.storage.engine import describe_error

__all__ = ["LOCK_SUFFIX", "check_listen", "check_sqlite_free", "lock_sqlite", "open_storage"]

LOCK_SUFFIX: Final = ".lock"


def check_listen(settings: Settings) -> None:
    """Bind the listen address once and let it go, so a taken or foreign address stops the
    program before it touches the database. (The daemon binds again; should the address be
    taken in between, that bind fails with the same ConfigError.)"""
    bind(settings.server.host, settings.server.port).close()


def open_storage(settings: Settings, *, migrate: bool) -> Engine:
    """An engine for ``[storage]`` that has been connected to once, migrated to the newest
    schema if ``migrate``. ConfigError naming ``storage.url`` when the database cannot be
    opened; a failing migration of a database that opens stays a StorageError
    ("migration failed", exit code 1)."""
    storage = settings.storage
    where = f"cannot open the database at {storage.display_url}"
    path = storage.sqlite_path
    if path is not None:
        problem = _sqlite_path_problem(path)
        if problem is not None:
            raise ConfigError([f"storage.url: {where}: {problem}"])
    engine = create_store_engine(storage.url)
    try:
        # Connecting logs in to PostgreSQL, and runs SQLite's pragmas, which read the file:
        # one that is not a database fails here.
        engine.connect().close()
    except SQLAlchemyError as exc:
        engine.dispose()
        raise ConfigError([f"storage.url: {where}: {_reason(exc)}"]) from None
    if migrate:
        try:
            upgrade(engine)
        except BaseException:
            engine.dispose()
            raise
    return engine


def check_sqlite_free(settings: Settings) -> None:
    """ConfigError when another daemon holds the SQLite database's lock. Checked before the
    listen address: a second daemon started with the same config would find that taken too,
    and the database is what the operator must hear about. The daemon takes the lock itself."""
    path = settings.storage.sqlite_path
    if path is None or not path.parent.is_dir():
        return  # no other daemon there; open_storage names what is wrong with the directory
    held = lock_sqlite(settings)
    if held is not None:
        held.close()


def lock_sqlite(settings: Settings) -> TextIO | None:
    """The lock of the one daemon a SQLite database may have: ``DB.lock`` beside it, locked
    (``flock``) for as long as the returned file stays open, holding the daemon's pid. The
    operating system lets go of it when the process ends however it ends, SIGKILL included, so
    a stale file never blocks a restart. None for PostgreSQL (replicas coordinate by claims).
    ConfigError when another process holds it: ``check`` and the audit commands take no lock
    and stay allowed beside a daemon."""
    path = settings.storage.sqlite_path
    if path is None:
        return None
    lock_path = path.with_name(path.name + LOCK_SUFFIX)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigError(
            [f"storage.url: cannot open the lock file {lock_path}: {exc.strerror}"]
        ) from None
    file = os.fdopen(fd, "r+", encoding="ascii")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        file.seek(0)
        holder = file.read(20).strip() or "unknown"
        file.close()
        raise ConfigError(
            [f"storage.url: another genauth-monitor daemon is using {path} (pid {holder})"]
        ) from None
    file.seek(0)
    file.truncate()
    file.write(f"{os.getpid()}\n")
    file.flush()
    return file


def _sqlite_path_problem(path: Path) -> str | None:
    """Why SQLite could not create or write ``path`` (not for root's ignored modes, but a
    read-only mount is refused to root too), or None."""
    directory = path.parent
    if not directory.exists():
        return f"directory {directory} does not exist"
    if not directory.is_dir():
        return f"{directory} is not a directory"
    # SQLite writes its -wal and -shm files beside the database.
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"directory {directory} is not writable"
    if path.exists() and not path.is_file():
        return f"{path} is not a file"
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        return f"file {path} is not readable and writable"
    return None


# Fixed phrases for what the drivers say; the first whose marker is in the (lower-cased) driver
# message wins. Only the phrase is shown, never the message.
_PHRASES: Final = (
    ("connection refused", "connection refused (is the server running on that host and port?)"),
    ("timeout expired", "connection timed out"),
    ("timed out", "connection timed out"),
    ("failed to resolve host", "cannot resolve the host name"),
    ("could not translate host name", "cannot resolve the host name"),
    ("name or service not known", "cannot resolve the host name"),
    ("no route to host", "no route to the host"),
    ("network is unreachable", "network unreachable"),
    ("no such file or directory", "no server socket at that path"),
    ("password authentication failed", "authentication failed"),
    ("authentication failed", "authentication failed"),
    ("no password supplied", "the server requires a password"),
    ("no pg_hba.conf entry", "the server refuses connections from this host or user"),
    ('role "', "the user (role) does not exist"),
    ('database "', "the database does not exist"),
    ("permission denied", "permission denied"),
    ("too many connections", "the server has too many connections"),
    ("remaining connection slots", "the server has too many connections"),
    ("starting up", "the server is starting up"),
    ("shutting down", "the server is shutting down"),
    ("certificate", "the TLS certificate was not accepted"),
    ("ssl error", "TLS negotiation failed"),
    ("ssl syscall", "TLS negotiation failed"),
    ("ssl negotiation", "TLS negotiation failed"),
    ("does not support ssl", "the server does not support TLS"),
)
_SQLITE_PHRASES: Final = {
    "SQLITE_CANTOPEN": "unable to open the database file",
    "SQLITE_NOTADB": "the file is not a SQLite database",
    "SQLITE_CORRUPT": "the database file is corrupt",
    "SQLITE_READONLY": "the database is read-only",
    "SQLITE_PERM": "permission denied",
    "SQLITE_BUSY": "the database is locked by another process",
    "SQLITE_FULL": "the disk is full",
}


def _reason(exc: SQLAlchemyError) -> str:
    """A short reason safe to print: a fixed phrase chosen by the driver's error, else the
    error class as :func:`describe_error` gives it."""
    original = getattr(exc, "orig", None) or exc
    name = getattr(original, "sqlite_errorname", None)
    if isinstance(name, str):
        for prefix, phrase in _SQLITE_PHRASES.items():
            if name.startswith(prefix):
                return phrase
    message = str(original).lower()
    for marker, phrase in _PHRASES:
        if marker in message:
            return phrase
    return describe_error(exc)
