"""Engines for SQLite and PostgreSQL, and schema upgrades through Alembic."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sqlalchemy import Engine, create_engine, event, inspect, make_url
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool, StaticPool

from monitor.errors import StorageError

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

__all__ = [
    "WRITE",
    "UnusableDatabase",
    "at_shipped_heads",
    "connect",
    "create_store_engine",
    "describe_error",
    "head_revisions",
    "migrations_dir",
    "open_read_only",
    "require_current_schema",
    "upgrade",
]

# Execution option a writer sets so SQLite takes the write lock when its transaction begins;
# a deferred BEGIN that later upgrades to a write can fail with "database is locked" at once,
# bypassing the busy timeout, when two writers race.
WRITE = "genauth_monitor_write"
_BUSY_TIMEOUT_MS = 30_000
STATEMENT_TIMEOUT_MS = 30_000
# pg_advisory_xact_lock key of migrations ("gm-migrate" as a number): replicas starting at
# once migrate one after the other; the others then find the schema at head.
MIGRATION_LOCK = 0x676D2D6D696772
MIGRATION_LOCK_WAIT = "300s"  # how long a replica waits for another one's migration


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
    # statement_timeout bounds a query the server is slow to answer (a migration lifts it).
    connect_args = {
        "connect_timeout": 10,
        "options": f"-c lock_timeout=10000 -c statement_timeout={STATEMENT_TIMEOUT_MS}",
    }
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
    from alembic.config import Config  # Alembic only where migrations run: a fast CLI

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database to ``revision``; running it again changes nothing."""
    sqlite = engine.dialect.name == "sqlite"
    try:
        if revision == "head" and at_shipped_heads(engine):
            # Every start of the daemon gets here: Alembic and Mako are about 10 MiB of the
            # daemon's memory and a few tenths of a second of its start, for nothing to do.
            return
        with engine.connect() as connection:
            if sqlite:
                # SQLite alters a table by rebuilding it; with foreign keys on, rows that point
                # at the table being rebuilt would fail it. The pragma only works outside a
                # transaction, so it goes to the driver before SQLAlchemy begins one.
                _driver_pragma(connection, "foreign_keys = OFF")
            try:
                with connection.begin():
                    if not sqlite:
                        # A migration of a large history may take longer than any query.
                        connection.exec_driver_sql("SET LOCAL statement_timeout = 0")
                        _serialise_migrations(connection)
                    before = _broken_references(connection) if sqlite else set()
                    _alembic_upgrade(connection, revision)
                    # Only what the migration broke counts: rows deleted by hand before it (a
                    # tampered database that `verify` must still be able to examine) do not.
                    if sqlite and _broken_references(connection) - before:
                        raise StorageError("migration left rows with broken references")
            finally:
                if sqlite:
                    _driver_pragma(connection, "foreign_keys = ON")
    except SQLAlchemyError as exc:
        raise StorageError("migration failed: " + describe_error(exc)) from None


def _alembic_upgrade(connection: Connection, revision: str) -> None:
    from alembic import command
    from alembic.util import CommandError

    try:
        command.upgrade(alembic_config(connection), revision)
    except CommandError as exc:
        # A database of a newer version of this program, or a revision that is not shipped:
        # Alembic says which in one line, without the URL.
        raise StorageError(f"migration failed: {exc}") from None


def at_shipped_heads(engine: Engine) -> bool:
    """Whether the database is at the newest shipped revision(s), read without Alembic. Only
    the same revisions count: a newer database goes on to Alembic, which refuses it."""
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return False
        rows = connection.exec_driver_sql("SELECT version_num FROM alembic_version")
        return {str(row[0]) for row in rows} == shipped_heads()


def _serialise_migrations(connection: Connection) -> None:
    """Wait for any other process migrating this database (a replica started at the same
    moment). A transaction-level advisory lock: released by the commit or rollback, so it is
    never held for a connection's life (connection poolers in transaction mode keep working),
    and Alembic, reading the version after it, finds what the other one did."""
    usual = connection.exec_driver_sql("SHOW lock_timeout").scalar()
    connection.exec_driver_sql(f"SET LOCAL lock_timeout = '{MIGRATION_LOCK_WAIT}'")
    connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
    connection.exec_driver_sql(f"SET LOCAL lock_timeout = '{usual}'")


def _broken_references(connection: Connection) -> set[tuple[Any, ...]]:
    return {tuple(row) for row in connection.exec_driver_sql("PRAGMA foreign_key_check")}


def _driver_pragma(connection: Connection, pragma: str) -> None:
    raw = connection.connection.driver_connection
    assert raw is not None
    raw.execute(f"PRAGMA {pragma}")


# -- reading without writing (the audit commands) --------------------------------------------


class UnusableDatabase(StorageError):
    """A database a reader will not use: missing, unreadable, or not at the schema of this
    version. The message is one line fit to show (no password, no row values)."""


def open_read_only(url: str, *, shown: str | None = None) -> Engine:
    """An engine that can only read ``url``, checked to open. It never creates, migrates or
    writes the database and never creates a file beside a SQLite one (``-wal``, ``-shm``,
    ``-journal``); ``shown`` names the database in messages (default: the URL without password
    or query).

    SQLite is opened through a URI with ``mode=ro`` plus ``PRAGMA query_only``. A WAL-mode file
    without its ``-wal`` file is opened ``immutable=1``: no connection has it open, everything
    committed is in the file, and ``mode=ro`` would create ``-wal``/``-shm`` beside it (or fail
    where it cannot). docs/audit.md, "Read-only by design", has the caveat. PostgreSQL gets a
    session whose every transaction is read-only (``default_transaction_read_only``).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_read_only(parsed)
    return _postgres_read_only(parsed, shown or _shown(parsed))


def head_revisions() -> frozenset[str]:
    """The current schema: the Alembic head(s) of the shipped migration scripts."""
    return frozenset(_scripts().get_heads())


def require_current_schema(engine: Engine, *, shown: str | None = None) -> None:
    """Raise :class:`UnusableDatabase` unless the database is at :func:`head_revisions`.

    Only reads: an empty database (no ``alembic_version``) is "not initialised", an older
    revision asks for ``genauth-monitor db upgrade``, an unknown one (a newer genauth-monitor
    migrated it) is refused too.
    """
    shown = shown or _shown(engine.url)
    try:
        with engine.connect() as connection:
            current: set[str] = set()
            if inspect(connection).has_table("alembic_version"):
                rows = connection.exec_driver_sql("SELECT version_num FROM alembic_version")
                current = {str(row[0]) for row in rows}
    except SQLAlchemyError as exc:
        raise UnusableDatabase(f"cannot read {shown}: {describe_error(exc)}") from None
    if current == shipped_heads():
        return
    scripts = _scripts()
    heads = set(scripts.get_heads())
    have, want = ", ".join(sorted(current)), ", ".join(sorted(heads))
    if not current:
        raise UnusableDatabase(
            f"{shown} is not an initialised genauth-monitor database (it has no schema "
            "version; check storage.url)"
        )
    if current <= {script.revision for script in scripts.walk_revisions()}:
        raise UnusableDatabase(
            f"{shown} is at schema {have}, older than this version's {want}: "
            "run `genauth-monitor db upgrade` (after a backup), then try again"
        )
    raise UnusableDatabase(
        f"{shown} is at schema {have}, which this version of genauth-monitor (schema {want}) "
        "does not know: it was migrated by a newer version; use that one"
    )


_REVISION = re.compile(r'^(down_revision|revision)\s*=\s*["\']([^"\']+)["\']', re.MULTILINE)


def shipped_heads() -> set[str]:
    """The newest revisions of the shipped migrations, read from the scripts' own
    ``revision``/``down_revision`` lines: what Alembic calls the heads, without importing it
    (a read-only command should start at once)."""
    revisions, parents = set(), set()
    for script in (migrations_dir() / "versions").glob("*.py"):
        found = dict(_REVISION.findall(script.read_text(encoding="utf-8")))
        if "revision" in found:
            revisions.add(found["revision"])
            parents.add(found.get("down_revision", ""))
    return revisions - parents


def _scripts() -> ScriptDirectory:
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    try:
        return ScriptDirectory(str(migrations_dir()))
    except CommandError as exc:
        raise StorageError(f"the Alembic migrations are unusable: {exc}") from None


def _shown(url: URL) -> str:
    shown = url.set(query={}).render_as_string(hide_password=True)
    return shown + ("?..." if url.query else "")


def _sqlite_read_only(url: URL) -> Engine:
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        raise UnusableDatabase(
            "storage.url: an in-memory or URI-form SQLite database cannot be read by another "
            "process; give the database file (sqlite:///PATH)"
        )
    path = Path(database)
    if not path.exists():
        raise UnusableDatabase(f"no database file at {path} (check storage.url); none was created")
    if not path.is_file():
        raise UnusableDatabase(f"{path} is not a database file (check storage.url)")
    try:
        with path.open("rb") as file:
            header = file.read(100)
    except OSError as exc:
        raise UnusableDatabase(f"cannot read {path}: {exc.strerror}") from None
    # Bytes 18 and 19 of the header are the read and write format versions: 2 is WAL mode.
    wal_mode = header.startswith(b"SQLite format 3\x00") and header[18:20] == b"\x02\x02"
    wal = Path(f"{path}-wal")
    if wal_mode and not wal.exists():
        return _sqlite_engine(path, immutable=True)
    try:
        return _sqlite_engine(path, immutable=False)
    except UnusableDatabase:
        if not (wal_mode and not Path(f"{path}-shm").exists()):
            raise
        # mode=ro could not open a WAL-mode file because its -shm file is missing and cannot
        # be created here. An empty -wal holds nothing, so the file alone is the database; a
        # non-empty one would be ignored by immutable=1, silently hiding its rows.
        if _size(wal) == 0:
            return _sqlite_engine(path, immutable=True)
        raise UnusableDatabase(
            f"cannot read {path} read-only: its write-ahead log {wal.name} has no "
            f"{path.name}-shm and none can be made here; copy the database with its -wal file "
            "to writable storage and read the copy"
        ) from None


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _sqlite_engine(path: Path, *, immutable: bool) -> Engine:
    uri = f"file:{quote(str(path))}?mode=ro" + ("&immutable=1" if immutable else "")

    def open_connection() -> sqlite3.Connection:
        return sqlite3.connect(uri, uri=True, check_same_thread=False)

    # No pool: no connection (nor file handle) outlives the query that needed it.
    engine = create_engine("sqlite+pysqlite://", creator=open_connection, poolclass=NullPool)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA query_only = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # One read transaction per connection: queries that span statements (verify) see one
        # snapshot, as with the writer's engine.
        connection.exec_driver_sql("BEGIN")

    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT count(*) FROM sqlite_master").scalar()
    except SQLAlchemyError as exc:
        engine.dispose()
        # SQLite's own text ("file is not a database", "unable to open database file") names
        # no value or password, and says more than the driver's class name.
        original = getattr(exc, "orig", None)
        reason = str(original) if isinstance(original, sqlite3.Error) else describe_error(exc)
        raise UnusableDatabase(f"cannot read {path}: {reason}") from None
    return engine


def _postgres_read_only(url: URL, shown: str) -> Engine:
    given = url.query.get("options")
    options = " ".join(
        part for part in (given if isinstance(given, str) else "", _READ_ONLY_SESSION) if part
    )
    engine = create_engine(url, connect_args={"connect_timeout": 10, "options": options})
    try:
        with engine.connect() as connection:
            read_only = connection.exec_driver_sql("SHOW transaction_read_only").scalar()
    except SQLAlchemyError as exc:
        engine.dispose()
        raise UnusableDatabase(f"cannot open {shown} read-only: {describe_error(exc)}") from None
    if read_only != "on":
        engine.dispose()
        raise UnusableDatabase(
            f"cannot open {shown} read-only: the server did not make the session read-only "
            "(a connection pooler that drops startup options?)"
        )
    return engine


_READ_ONLY_SESSION = "-c default_transaction_read_only=on"
