"""Shared fixtures: real databases (SQLite always, PostgreSQL when configured) and the
simulated GenAuth API on a loopback port."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import URL, Connection, Engine, create_engine, text
from sqlalchemy.engine import make_url

from monitor.simulator import SimulatedGenAuth
from tests.receiver import Receiver

PG_ENV = "GENAUTH_MONITOR_TEST_POSTGRES_URL"


def _postgres_admin_url() -> str | None:
    return os.environ.get(PG_ENV) or None


# The schemas of a new PostgreSQL database; anything else makes a database unfit for reuse.
_BUILT_IN_SCHEMAS = {"public", "information_schema", "pg_catalog", "pg_toast"}


class EmptyDatabases:
    """PostgreSQL databases, each used by one test and empty when it gets it.

    CREATE DATABASE copies template1 (the better part of a second on a busy machine), so a
    database a test has finished with is emptied for the next one instead of dropped: no
    connection may reach it any more (``ALLOW_CONNECTIONS false``, every session of it
    terminated), it is renamed, so that an engine left over from the last test cannot find
    it, its settings are reset, and its public schema is made again as PostgreSQL 15 makes
    it. A database with anything outside the public schema is dropped instead, and so is
    every one on an older server (its public schema is another); the rest are dropped at the
    end of the session."""

    def __init__(self, url: URL) -> None:
        self.url = url
        self._admin: Engine = create_engine(url, isolation_level="AUTOCOMMIT")
        with self._admin.connect() as admin:
            version = int(admin.execute(text("SHOW server_version_num")).scalar_one())
        self._reuse = version >= 150000
        self._spare: list[str] = []

    def take(self) -> str:
        if self._spare:
            return self._spare.pop()
        name = _database_name()
        with self._admin.connect() as admin:
            admin.execute(text(f'CREATE DATABASE "{name}"'))
        return name

    def give_back(self, used: str) -> None:
        name = _database_name()
        with self._admin.connect() as admin:
            admin.execute(text(f'ALTER DATABASE "{used}" ALLOW_CONNECTIONS false'))
            _end_sessions(admin, used)
            admin.execute(text(f'ALTER DATABASE "{used}" RENAME TO "{name}"'))
            admin.execute(text(f'ALTER DATABASE "{name}" RESET ALL'))
            admin.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        engine = create_engine(self.url.set(database=name), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                schemas = connection.execute(text("SELECT nspname FROM pg_namespace")).scalars()
                reusable = self._reuse and set(schemas) <= _BUILT_IN_SCHEMAS
                if reusable:
                    # Owner, privileges and comment as in a new database.
                    connection.execute(text("DROP SCHEMA public CASCADE"))
                    connection.execute(text("CREATE SCHEMA public AUTHORIZATION pg_database_owner"))
                    connection.execute(text("GRANT USAGE ON SCHEMA public TO PUBLIC"))
                    connection.execute(text("COMMENT ON SCHEMA public IS 'standard public schema'"))
        finally:
            engine.dispose()
        if reusable:
            self._spare.append(name)
        else:
            self._drop(name)

    def close(self) -> None:
        for name in self._spare:
            self._drop(name)
        self._admin.dispose()

    def _drop(self, name: str) -> None:
        with self._admin.connect() as admin:
            admin.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _database_name() -> str:
    return f"gm_test_{uuid.uuid4().hex[:12]}"


def _end_sessions(admin: Connection, database: str, timeout: float = 10.0) -> None:
    """Terminate every session of ``database`` and wait until they are gone."""
    others = text(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = :database AND pid <> pg_backend_pid()"
    )
    deadline = time.monotonic() + timeout
    while admin.execute(others, {"database": database}).first() is not None:
        if time.monotonic() > deadline:
            raise AssertionError(f"sessions of {database} outlived pg_terminate_backend")
        time.sleep(0.01)


@pytest.fixture(scope="session")
def empty_databases() -> Iterator[EmptyDatabases]:
    admin = _postgres_admin_url()
    if admin is None:
        pytest.skip(f"{PG_ENV} is not set")
    url = make_url(admin)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    databases = EmptyDatabases(url)
    try:
        yield databases
    finally:
        databases.close()


@pytest.fixture
def postgres_url(empty_databases: EmptyDatabases) -> Iterator[str]:
    """An empty PostgreSQL database of this test's own, under a name no other test used."""
    name = empty_databases.take()
    try:
        yield empty_databases.url.set(database=name).render_as_string(hide_password=False)
    finally:
        empty_databases.give_back(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'monitor.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def simulator() -> Iterator[SimulatedGenAuth]:
    with SimulatedGenAuth(access_key_id="pool-1", access_key_secret="S3cret-ACCESS-key") as sim:
        yield sim


class FakeClock:
    """A settable UTC clock for pollers and queries."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sink_receiver() -> Iterator[Receiver]:
    """A loopback receiver for alert sinks (tests/receiver.py), stopped afterwards."""
    made = Receiver()
    yield made
    made.stop()
