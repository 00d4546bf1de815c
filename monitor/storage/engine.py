"""Engines for SQLite and PostgreSQL, and schema upgrades through Alembic."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import StaticPool

from monitor.errors import StorageError

__all__ = [
    "WRITE",
    "connect",
    "create_store_engine",
    "describe_error",
    "migrations_dir",
    "upgrade",
]

# Execution option a writer sets so SQLite takes the write lock when its transaction begins;
# a deferred BEGIN that later upgrades to a write can fail with "database is locked" at once,
# bypassing the busy timeout, when two writers race.
WRITE = "genauth_monitor_write"
_BUSY_TIMEOUT_MS = 30_000


def create_store_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and foreign keys."""
    if url.startswith("sqlite"):
        if make_url(url).database in (None, "", ":memory:"):
            # One shared connection: the default pool would give each thread its own empty
            # in-memory database.
            kwargs.setdefault("poolclass", StaticPool)
        engine = create_engine(url, connect_args={"check_same_thread": False}, **kwargs)
        _tune_sqlite(engine)
        return engine
    # No pre-ping: it costs a round trip per transaction on the hot path, and a write that
    # fails on a dropped connection is kept and retried by the poller anyway (the pool
    # replaces connections after a disconnect error).
    # A lock held elsewhere (a migration, VACUUM FULL) must not freeze polling: after
    # lock_timeout the write fails, is kept in memory and retried like any outage.
    connect_args = {"connect_timeout": 10, "options": "-c lock_timeout=10000"}
    return create_engine(url, connect_args=connect_args, **kwargs)


def _tune_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" hook below decide how transactions start.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        if engine.url.database not in (None, "", ":memory:"):
            cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get(WRITE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def describe_error(exc: SQLAlchemyError) -> str:
    """A message for a database failure that is safe to log and show."""
    # The driver's own text can carry the connection URL (with its password) or row values.
    original = getattr(exc, "orig", None)
    kind = type(original).__name__ if original is not None else type(exc).__name__
    return f"database error ({kind})"


@contextmanager
def connect(engine: Engine) -> Iterator[Connection]:
    """A connection whose database errors arrive as StorageError with a safe message."""
    try:
        with engine.connect() as connection:
            yield connection
    except SQLAlchemyError as exc:
        raise StorageError(describe_error(exc)) from None


def migrations_dir() -> Path:
    """Where the Alembic scripts are: inside the wheel, or beside the package in a checkout."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_migrations", here.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise StorageError("the Alembic migrations are missing from this installation")


def alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database to ``revision``; running it again changes nothing."""
    sqlite = engine.dialect.name == "sqlite"
    try:
        with engine.connect() as connection:
            if sqlite:
                # SQLite alters a table by rebuilding it; with foreign keys on, rows that point
                # at the table being rebuilt would fail it. The pragma only works outside a
                # transaction, so it goes to the driver before SQLAlchemy begins one.
                _driver_pragma(connection, "foreign_keys = OFF")
            try:
                with connection.begin():
                    before = _broken_references(connection) if sqlite else set()
                    command.upgrade(alembic_config(connection), revision)
                    # Only what the migration broke counts: rows deleted by hand before it (a
                    # tampered database that `verify` must still be able to examine) do not.
                    if sqlite and _broken_references(connection) - before:
                        raise StorageError("migration left rows with broken references")
            finally:
                if sqlite:
                    _driver_pragma(connection, "foreign_keys = ON")
    except SQLAlchemyError as exc:
        raise StorageError("migration failed: " + describe_error(exc)) from None


def _broken_references(connection: Connection) -> set[tuple[Any, ...]]:
    return {tuple(row) for row in connection.exec_driver_sql("PRAGMA foreign_key_check")}


def _driver_pragma(connection: Connection, pragma: str) -> None:
    raw = connection.connection.driver_connection
    assert raw is not None
    raw.execute(f"PRAGMA {pragma}")
