"""Start-up errors of ``run`` and ``db upgrade`` (SPEC §7): whatever is found wrong before the
program does anything — the listen address, the database, the fingerprint key file — is exit
code 2 with one line naming the key, no traceback, and never the database password.

``run`` is called in-process: each failure here returns before anything is started (no
signal handler, no thread, no socket left open), so no subprocess is needed. The one exception
is the unwritable key directory, which needs an unprivileged user (root ignores file modes).
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from monitor.config import parse_settings
from monitor.errors import ConfigError
from monitor.keyfile import fingerprint_key
from tests.conftest import PG_ENV
from tests.helpers import free_port

PASSWORD = "Db-Passw0rd-Never-Shown-4711"
SECRET = "Access-Key-Secret-Startup-0815"

Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Cli]:
    """``main(argv)`` in-process -> (exit code, stdout, stderr); the CLI sets up logging on
    the root logger, which is put back afterwards. Should a check let ``run`` through, the
    daemon is not left running (the test would hang): starting it fails the test."""
    from monitor import cli as cli_module
    from monitor import cli_commands

    def started(_run: object) -> None:
        raise AssertionError("run got past its start-up checks and started the daemon")

    monkeypatch.setattr(cli_commands, "_run_until_signal", started)
    main = cli_module.main
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    def call(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    yield call
    root.handlers[:] = handlers
    root.setLevel(level)


def write_config(
    directory: Path,
    *,
    storage_url: str | None = None,
    listen: str = "127.0.0.1:0",
) -> Path:
    """One target that is never polled (every case fails before), no fingerprint key
    configured: the generated key file beside the database is used."""
    url = storage_url or f"sqlite:///{directory / 'monitor.db'}"
    path = directory / "genauth-monitor.toml"
    path.write_text(
        f"""
[storage]
url = "{url}"

[server]
listen = "{listen}"

[[targets]]
name = "prod"
base_url = "http://127.0.0.1:9"
access_key_id = "pool"
access_key_secret = "{SECRET}"
"""
    )
    return path


def assert_one_line(result: tuple[int, str, str], key: str, *needles: str) -> str:
    code, out, err = result
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    [line] = lines
    assert line.startswith(f"{key}: "), line
    for needle in needles:
        assert needle in line, line
    shown = out + err
    assert "Traceback" not in shown
    assert PASSWORD not in shown and SECRET not in shown
    return line


# ----------------------------------------------------------------------------- server.listen


def test_run_with_the_listen_address_taken_does_nothing(tmp_path: Path, cli: Cli) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, listen=f"127.0.0.1:{port}")
        result = cli("run", "-c", str(config))
    line = assert_one_line(result, "server.listen")
    assert line == f"server.listen: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert not (tmp_path / "monitor.db").exists(), "the database was touched before the check"
    assert not (tmp_path / "monitor.db.fingerprint-key").exists()


def test_run_with_a_listen_address_that_is_not_local(tmp_path: Path, cli: Cli) -> None:
    config = write_config(tmp_path, listen="192.0.2.1:9464")  # TEST-NET-1: never ours
    line = assert_one_line(cli("run", "-c", str(config)), "server.listen")
    assert line.startswith("server.listen: cannot listen on 192.0.2.1:9464: ")
    assert not (tmp_path / "monitor.db").exists()


# ----------------------------------------------------------------------------- storage.url


@pytest.mark.parametrize("command", [("run",), ("db", "upgrade")])
def test_sqlite_in_a_missing_directory(tmp_path: Path, cli: Cli, command: tuple[str, ...]) -> None:
    missing = tmp_path / "no" / "such"
    config = write_config(tmp_path, storage_url=f"sqlite:///{missing / 'monitor.db'}")
    assert_one_line(
        cli(*command, "-c", str(config)),
        "storage.url",
        f"cannot open the database at sqlite:///{missing / 'monitor.db'}: ",
        f"directory {missing} does not exist",
    )
    assert not (tmp_path / "no").exists(), "nothing is created"


@pytest.mark.parametrize("command", [("run",), ("db", "upgrade")])
def test_sqlite_under_a_file_is_an_unusable_directory(
    tmp_path: Path, cli: Cli, command: tuple[str, ...]
) -> None:
    blocker = tmp_path / "plain-file"
    blocker.write_text("not a directory\n")
    config = write_config(tmp_path, storage_url=f"sqlite:///{blocker / 'monitor.db'}")
    assert_one_line(
        cli(*command, "-c", str(config)), "storage.url", f"{blocker} is not a directory"
    )


def test_sqlite_file_that_is_not_a_database_is_left_alone(tmp_path: Path, cli: Cli) -> None:
    database = tmp_path / "monitor.db"
    database.write_bytes(b"just text, not SQLite " * 50)
    before = database.read_bytes()
    config = write_config(tmp_path)
    assert_one_line(
        cli("run", "-c", str(config)), "storage.url", "the file is not a SQLite database"
    )
    assert database.read_bytes() == before
    assert not (tmp_path / "monitor.db.fingerprint-key").exists()


@pytest.mark.parametrize("command", [("run",), ("db", "upgrade")])
def test_postgresql_unreachable_is_quick_and_shows_no_password(
    tmp_path: Path, cli: Cli, command: tuple[str, ...]
) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql+psycopg://monitor:{PASSWORD}@127.0.0.1:{port}/genauth"
    config = write_config(tmp_path, storage_url=url)
    started = time.monotonic()
    result = cli(*command, "-c", str(config))
    assert time.monotonic() - started < 10
    line = assert_one_line(
        result,
        "storage.url",
        f"cannot open the database at postgresql+psycopg://monitor:***@127.0.0.1:{port}/genauth: ",
        "connection refused",
    )
    assert "monitor:***@" in line


def test_postgresql_password_in_the_query_string_is_not_shown(tmp_path: Path, cli: Cli) -> None:
    port = free_port()
    url = f"postgresql+psycopg://monitor@127.0.0.1:{port}/genauth?password={PASSWORD}"
    config = write_config(tmp_path, storage_url=url)
    assert_one_line(cli("db", "upgrade", "-c", str(config)), "storage.url", "?...")


def _refusing_url(**change: str) -> tuple[str, str]:
    """A URL on the shared test server that it refuses, with a password in it, and that
    password (the real one, if the server needs it, so it is the one checked for)."""
    admin = os.environ.get(PG_ENV)
    if not admin:
        pytest.skip(f"{PG_ENV} is not set")
    url = make_url(admin).set(drivername="postgresql+psycopg")
    password = url.password or PASSWORD
    refused = url.set(password=password, **change)  # type: ignore[arg-type]
    return refused.render_as_string(hide_password=False), str(password)


@pytest.mark.parametrize("command", [("run",), ("db", "upgrade")])
def test_postgresql_refusing_an_unknown_database(
    tmp_path: Path, cli: Cli, command: tuple[str, ...]
) -> None:
    url, password = _refusing_url(database=f"gm_missing_{uuid.uuid4().hex[:12]}")
    config = write_config(tmp_path, storage_url=url)
    code, out, err = cli(*command, "-c", str(config))
    assert password not in out + err
    assert_one_line((code, out, err), "storage.url", "the database does not exist")


def test_postgresql_refusing_an_unknown_user(tmp_path: Path, cli: Cli) -> None:
    url, password = _refusing_url(username=f"gm_nobody_{uuid.uuid4().hex[:12]}")
    config = write_config(tmp_path, storage_url=url)
    code, out, err = cli("run", "-c", str(config))
    assert password not in out + err
    line = assert_one_line((code, out, err), "storage.url")
    assert line.endswith(("the user (role) does not exist", "authentication failed")), line


# ----------------------------------------------------------------------------- key file


def _tables(database: Path) -> list[str]:
    """The tables of a SQLite file (opening it to check it may have created it empty)."""
    with closing(sqlite3.connect(database)) as connection:
        return [name for (name,) in connection.execute("SELECT name FROM sqlite_master")]


def test_empty_generated_key_file(tmp_path: Path, cli: Cli) -> None:
    key_file = tmp_path / "monitor.db.fingerprint-key"
    key_file.write_text("\n")
    config = write_config(tmp_path)
    assert_one_line(
        cli("run", "-c", str(config)),
        "monitor.fingerprint_key_file",
        f"the generated key file {key_file} is empty",
    )
    assert key_file.read_text() == "\n", "an empty key file is never replaced silently"
    assert _tables(tmp_path / "monitor.db") == [], "checked before the database is migrated"


def test_unreadable_generated_key_file(tmp_path: Path, cli: Cli) -> None:
    key_file = tmp_path / "monitor.db.fingerprint-key"
    key_file.mkdir()  # exists, but cannot be read as a file
    config = write_config(tmp_path)
    assert_one_line(
        cli("run", "-c", str(config)),
        "monitor.fingerprint_key_file",
        f"cannot read the generated key file {key_file}: ",
    )
    assert _tables(tmp_path / "monitor.db") == [], "checked before the database is migrated"


def test_key_file_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    settings = parse_settings(
        {
            "storage": {"url": f"sqlite:///{blocker / 'monitor.db'}"},
            "targets": [{"name": "p", "access_key_id": "id", "access_key_secret": SECRET}],
        },
        base_dir=tmp_path,
        environ={},
    )
    with pytest.raises(ConfigError) as caught:
        fingerprint_key(settings)
    [line] = caught.value.problems
    assert line.startswith(
        f"monitor.fingerprint_key_file: cannot create the generated key file "
        f"{blocker / 'monitor.db.fingerprint-key'}: Not a directory"
    ), line


def _unprivileged() -> str | None:
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        return None
    try:
        return pwd.getpwnam("nobody").pw_name
    except KeyError:
        return None


def _run_as(user: str, *args: str) -> subprocess.CompletedProcess[str] | None:
    """``python -m monitor ARGS`` as ``user``, with this checkout and its dependencies. This
    interpreter may live where the user cannot go (/root/.pyenv), so a system Python of the
    same version is tried too; None if the user can run none of them."""
    root = Path(__file__).resolve().parent.parent
    paths = [str(root), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [sys.executable, shutil.which(version), f"/usr/bin/{version}"]
    for python in dict.fromkeys(p for p in candidates if p is not None and _open_to_all(p)):
        result = subprocess.run(
            ["runuser", "-u", user, "--", python, "-m", "monitor", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd="/",
            env=env,
        )
        if "failed to execute" not in result.stderr and "Error while finding" not in result.stderr:
            return result
    return None


def _open_to_all(executable: str) -> bool:
    """Can any user reach and run ``executable`` (every directory on its real path o+x)?"""
    real = Path(executable).resolve()
    if not real.is_file() or not real.stat().st_mode & stat.S_IXOTH:
        return False
    return all(parent.stat().st_mode & stat.S_IXOTH for parent in real.parents)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory an unprivileged user can reach (tmp_path is root's and private)."""
    base = Path("/tmp") / f"gm-startup-{uuid.uuid4().hex[:12]}"
    base.mkdir(mode=0o755)
    try:
        yield base
    finally:
        for path in (base, *base.rglob("*")):
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(base)


@pytest.mark.slow
@pytest.mark.skipif(_unprivileged() is None, reason="needs root, runuser and user nobody")
def test_sqlite_directory_not_writable_as_an_unprivileged_user(shared_dir: Path) -> None:
    """A real permission problem: the database directory exists but is not writable."""
    user = _unprivileged()
    assert user is not None
    state = shared_dir / "state"
    state.mkdir(mode=0o555)
    config = write_config(shared_dir, storage_url=f"sqlite:///{state / 'monitor.db'}")
    config.chmod(0o644)
    result = _run_as(user, "db", "upgrade", "-c", str(config))
    if result is None:
        pytest.skip(f"user {user} can run no Python with this checkout")
    assert_one_line(
        (result.returncode, result.stdout, result.stderr),
        "storage.url",
        f"directory {state} is not writable",
    )
    assert list(state.iterdir()) == []


@pytest.mark.slow
@pytest.mark.skipif(_unprivileged() is None, reason="needs root, runuser and user nobody")
def test_key_directory_not_writable_as_an_unprivileged_user(shared_dir: Path) -> None:
    """A real permission problem: the generated key file's directory (beside the config file,
    with an in-memory database) is not writable by the user running the daemon."""
    user = _unprivileged()
    assert user is not None
    config = write_config(shared_dir, storage_url="sqlite://")
    config.chmod(0o644)
    shared_dir.chmod(0o555)  # readable, not writable
    result = _run_as(user, "run", "-c", str(config))
    if result is None:
        pytest.skip(f"user {user} can run no Python with this checkout")
    assert_one_line(
        (result.returncode, result.stdout, result.stderr),
        "monitor.fingerprint_key_file",
        f"cannot create the generated key file {shared_dir / 'genauth-monitor.fingerprint-key'}",
        "Permission denied",
    )
