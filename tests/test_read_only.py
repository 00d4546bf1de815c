"""The audit commands never write (SPEC §7): they open the database read-only, never create or
migrate it, exit 3 with one line when it is missing, unreadable or not at the current schema,
and work on a database on read-only media. Only run, check, db upgrade and alerts retry write.

Each case checks that the database file's bytes and mtime and its directory's listing (no
-wal, -shm or -journal appears) are unchanged afterwards.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import site
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text

import monitor
from monitor.cli import main
from monitor.simulator import SimulatedGenAuth
from monitor.storage import create_store_engine, upgrade
from monitor.storage import engine as storage_engine
from monitor.storage.engine import migrations_dir, open_read_only
from tests.externals import REQUIRE
from tests.helpers import run_main, write_config

SECRET = "Read-Only-Test-Access-Secret"
FAR_FUTURE = "2999-01-01T00:00:00Z"
OLD_REVISION = "0002"

# The commands that must never write, with placeholder arguments (they must fail before the
# arguments matter), and the writer that must not migrate or create either.
AUDIT = {
    "history": ["history"],
    "snapshots": ["snapshots"],
    "show": ["show", "sha256:00"],
    "diff": ["diff", "sha256:00", "sha256:11"],
    "at": ["at", "--target", "prod", FAR_FUTURE],
    "verify": ["verify"],
    "alerts pending": ["alerts", "pending"],
}
NO_MIGRATION = {**AUDIT, "alerts retry": ["alerts", "retry"]}


# -- fixtures and helpers --------------------------------------------------------------------


class Recorded:
    """A database at the current schema written by the real `check`: two snapshots of target
    'prod' (``old`` then ``new``), their events, and outbox rows a dead webhook never took."""

    def __init__(self, path: Path, old: str, new: str) -> None:
        self.path, self.old, self.new = path, old, new

    def place(self, directory: Path, name: str = "monitor.db") -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / name
        shutil.copyfile(self.path, target)
        return target


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    directory = tmp_path_factory.mktemp("recorded")
    env = {"GM_TEST_SECRET": SECRET, "GM_TEST_API_TOKEN": "t"}
    dead_hook = '[[sinks]]\ntype = "webhook"\nurl = "http://127.0.0.1:9/hook"\n'
    with SimulatedGenAuth(access_key_id="ro-pool", access_key_secret=SECRET) as sim:
        config = write_config(directory, sim, extra=dead_hook)
        hashes = []
        for host in (None, "smtp.changed.example"):
            if host is not None:
                data = sim.data
                data["smtpConfig"]["smtp_host"] = host
                sim.set_data(data)
            checked = run_main(
                "check", "-c", str(config), "--json", "--delivery-timeout", "0", env=env
            )
            assert checked.returncode == 0, checked.stdout + checked.stderr
            hashes.append(json.loads(checked.stdout)["targets"][0]["hash"])
    db = directory / "monitor.db"
    # The writer is done (its connections closed): WAL mode, everything checkpointed into the
    # file, no -wal left.
    assert not Path(f"{db}-wal").exists()
    assert db.read_bytes()[18:20] == b"\x02\x02", "a WAL-mode file"
    return Recorded(db, hashes[0], hashes[1])


def _config(directory: Path, db: Path | str) -> Path:
    url = db if isinstance(db, str) else f"sqlite:///{db}"
    path = directory / "c.toml"
    path.write_text(
        f'[storage]\nurl = "{url}"\n\n[[targets]]\nname = "prod"\n'
        'access_key_id = "x"\naccess_key_secret = "y"\n\n'
        '[[sinks]]\ntype = "webhook"\nurl = "http://127.0.0.1:9/hook"\n'
    )
    return path


def _state(directory: Path) -> dict[str, tuple[str, int, int]]:
    """Every file of ``directory``: its bytes' digest, size and mtime."""
    found = {}
    for entry in sorted(directory.iterdir()):
        info = entry.stat()
        digest = hashlib.sha256(entry.read_bytes()).hexdigest() if entry.is_file() else "dir"
        found[entry.name] = (digest, info.st_size, info.st_mtime_ns)
    return found


def _run(capsys: pytest.CaptureFixture[str], config: Path, argv: list[str]) -> tuple[int, str, str]:
    code = main([*argv, "-c", str(config)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _old_schema(path: Path, *, journal: str) -> None:
    """A backup made by a genauth-monitor two migrations back, with a row in it."""
    engine = create_store_engine(f"sqlite:///{path}")
    upgrade(engine, OLD_REVISION)
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO targets (name, created_at) VALUES ('prod', '2026-01-01 00:00:00')")
        )
    engine.dispose()
    if journal != "wal":
        with sqlite3.connect(path) as raw:
            raw.execute(f"PRAGMA journal_mode = {journal}")
        raw.close()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


# -- missing, old, empty, unreadable: exit 3, nothing written --------------------------------


@pytest.mark.parametrize("command", NO_MIGRATION)
def test_missing_database_is_exit_3_and_is_not_created(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mistyped = tmp_path / "monitr.db"
    config = _config(tmp_path, mistyped)
    before = _state(tmp_path)
    code, out, err = _run(capsys, config, NO_MIGRATION[command])
    assert code == 3, out + err
    assert f"no database file at {mistyped}" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "intact" not in out
    assert _state(tmp_path) == before, "nothing created"


@pytest.mark.parametrize("journal", ["wal", "delete"])
@pytest.mark.parametrize("command", NO_MIGRATION)
def test_old_schema_is_exit_3_and_is_not_migrated(
    command: str, journal: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    media = tmp_path / "backup"
    media.mkdir()
    old = media / "old.db"
    _old_schema(old, journal=journal)
    config = _config(tmp_path, old)
    before = _state(media)
    code, out, err = _run(capsys, config, NO_MIGRATION[command])
    assert code == 3, out + err
    assert f"at schema {OLD_REVISION}, older than" in err
    assert "run `genauth-monitor db upgrade`" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert _state(media) == before, "the backup is left exactly as it was"


def test_current_schema_is_the_head_of_the_shipped_scripts(
    recorded: Recorded,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A migration added later makes today's head "old": the head is read from the scripts."""
    scripts = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), scripts)
    head = ScriptDirectory(str(scripts)).get_current_head()
    (scripts / "versions" / "0099_later.py").write_text(
        f'revision = "0099"\ndown_revision = "{head}"\nbranch_labels = None\n'
        "depends_on = None\n\n\ndef upgrade() -> None:\n    pass\n\n\n"
        "def downgrade() -> None:\n    pass\n"
    )
    media = tmp_path / "media"
    db = recorded.place(media)
    config = _config(tmp_path, db)
    assert _run(capsys, config, ["snapshots"])[0] == 0, "at the head of the real scripts"
    monkeypatch.setattr(storage_engine, "migrations_dir", lambda: scripts)
    before = _state(media)
    code, _, err = _run(capsys, config, ["snapshots"])
    assert code == 3
    assert f"at schema {head}, older than this version's 0099" in err
    assert _state(media) == before


def test_newer_schema_than_this_version_is_exit_3(
    recorded: Recorded, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    media = tmp_path / "media"
    db = recorded.place(media)
    with sqlite3.connect(db) as raw:
        raw.execute("UPDATE alembic_version SET version_num = '9999'")
    raw.close()
    before = _state(media)
    code, _, err = _run(capsys, _config(tmp_path, db), ["history"])
    assert code == 3 and "at schema 9999, which this version" in err
    assert _state(media) == before


@pytest.mark.parametrize("kind", ["zero bytes", "other tables"])
@pytest.mark.parametrize("command", AUDIT)
def test_uninitialised_database_is_exit_3(
    command: str, kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    media = tmp_path / "media"
    media.mkdir()
    db = media / "empty.db"
    if kind == "zero bytes":
        db.touch()
    else:
        with sqlite3.connect(db) as raw:
            raw.execute("CREATE TABLE notes (x TEXT)")
        raw.close()
    before = _state(media)
    code, out, err = _run(capsys, _config(tmp_path, db), AUDIT[command])
    assert code == 3, out + err
    assert "is not an initialised genauth-monitor database" in err
    assert _state(media) == before


@pytest.mark.parametrize("command", AUDIT)
def test_unreadable_database_is_exit_3(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    media = tmp_path / "media"
    media.mkdir()
    db = media / "monitor.db"
    db.write_bytes(b"this is not a database, it only has its name\n" * 100)
    before = _state(media)
    code, out, err = _run(capsys, _config(tmp_path, db), AUDIT[command])
    assert code == 3, out + err
    assert f"cannot read {db}: file is not a database" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert _state(media) == before


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_read_only_engine_refuses_writes(journal: str, recorded: Recorded, tmp_path: Path) -> None:
    """Both ways of opening (immutable=1 for a WAL file alone, mode=ro otherwise) refuse."""
    db = recorded.place(tmp_path)
    if journal != "wal":
        with sqlite3.connect(db) as raw:
            raw.execute(f"PRAGMA journal_mode = {journal}")
        raw.close()
    before = _state(tmp_path)
    engine = open_read_only(f"sqlite:///{db}")
    with pytest.raises(Exception, match="readonly"), engine.begin() as connection:
        connection.execute(text("DELETE FROM events"))
    engine.dispose()
    assert _state(tmp_path) == before


def test_alerts_retry_writes_only_at_the_current_schema(
    recorded: Recorded, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = recorded.place(tmp_path / "media")
    config = _config(tmp_path, db)
    code, out, err = _run(capsys, config, ["alerts", "retry"])
    assert code == 0, err
    count = int(out.split()[0])
    assert count >= 1, out
    code, out, _ = _run(capsys, config, ["alerts", "pending", "--json"])
    assert code == 0 and len(json.loads(out)) == count


# -- read-only media, as a user who cannot write ---------------------------------------------

DRIVER = r"""
import contextlib, io, json, sys
from monitor.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    results.append({"code": code, "out": out.getvalue(), "err": err.getvalue()})
print(json.dumps(results))
"""


def _unavailable(message: str) -> Any:
    if os.environ.get(REQUIRE) == "1":
        pytest.fail(message)
    pytest.skip(message)


@functools.cache
def _unprivileged() -> tuple[tuple[str, ...], dict[str, str]] | str:
    """How to run Python as a user the file modes apply to: the command prefix and the
    environment, or why that is not possible here.

    Root ignores file modes, so as root the commands run as ``nobody`` through runuser. This
    interpreter may live where ``nobody`` cannot reach (a pyenv under a mode-700 /root): then a
    system interpreter of the same minor version runs the same code and the same installed
    packages, through PYTHONPATH."""
    source = str(Path(monitor.__file__).resolve().parent.parent)
    path = os.pathsep.join([source, *site.getsitepackages()])
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": path, "PYTHONDONTWRITEBYTECODE": "1"}
    if os.geteuid() != 0:
        return (sys.executable,), env
    runuser = shutil.which("runuser")
    if runuser is None:
        return "runuser is not installed"
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = dict.fromkeys(
        [
            sys.executable,
            shutil.which(version) or "",
            f"/usr/bin/{version}",
            f"/usr/local/bin/{version}",
        ]
    )
    for python in filter(None, candidates):
        prefix = (runuser, "-u", "nobody", "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()))
        probe = subprocess.run(
            [*prefix, python, "-c", "import monitor.cli"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if probe.returncode == 0:
            return (*prefix, python), {}
    return f"user nobody can run none of {list(filter(None, candidates))} with this checkout"


def _as_unprivileged(*argvs: list[str]) -> list[dict[str, Any]]:
    how = _unprivileged()
    if isinstance(how, str):
        _unavailable(how)
        raise AssertionError("unreachable")
    prefix, env = how
    done = subprocess.run(
        [*prefix, "-c", DRIVER, json.dumps(argvs)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env or None,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results: list[dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory of this test's own that the unprivileged user can reach (tmp_path's parents
    are private to root)."""
    directory = Path(tempfile.mkdtemp(prefix="gm-read-only-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        for path in directory.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(directory)


def _read_only_media(media: Path) -> None:
    for path in media.iterdir():
        path.chmod(0o444)
    media.chmod(0o555)


def _live_copy(recorded: Recorded, media: Path) -> list[str]:
    """The files of a database whose writer still has it open (or was killed): every page is
    in the -wal file, the main file holds none of them. Returns the names copied."""
    media.mkdir()
    live = media.parent / "live"
    live.mkdir()
    source = sqlite3.connect(recorded.path)
    writer = sqlite3.connect(live / "monitor.db")
    writer.execute("PRAGMA journal_mode = WAL")
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    source.backup(writer)
    source.close()
    names = sorted(p.name for p in live.iterdir())
    assert names == ["monitor.db", "monitor.db-shm", "monitor.db-wal"], names
    for name in names:
        shutil.copyfile(live / name, media / name)
    writer.close()
    return names


def _audit_argvs(recorded: Recorded, config: Path) -> list[list[str]]:
    c = ["-c", str(config)]
    return [
        ["history", "--json", *c],
        ["snapshots", "--json", *c],
        ["show", recorded.new, *c],
        ["diff", recorded.old, recorded.new, "--json", *c],
        ["at", "--target", "prod", FAR_FUTURE, "--json", *c],
        ["verify", *c],
        ["alerts", "pending", "--json", *c],
    ]


def _assert_correct_answers(recorded: Recorded, results: list[dict[str, Any]]) -> None:
    history, snapshots, show, diffed, at, verify, pending = results
    for result in results:
        assert result["code"] == 0, result
    kinds = [event["kind"] for event in json.loads(history["out"])]
    assert kinds == ["delivery_changed", "first_seen"], "newest first"
    assert [s["hash"] for s in json.loads(snapshots["out"])] == [recorded.new, recorded.old]
    document = json.loads(show["out"])
    assert document["hash"] == recorded.new
    assert document["document"]["smtpConfig"]["smtp_host"] == "smtp.changed.example"
    assert "smtpConfig.smtp_host" in [c["path"] for c in json.loads(diffed["out"])["changes"]]
    assert json.loads(at["out"])["hash"] == recorded.new
    assert verify["out"].startswith("audit chain intact:"), verify
    deliveries = json.loads(pending["out"])
    assert deliveries and {d["sink"] for d in deliveries} == {"webhook"}


@pytest.mark.slow
def test_audit_commands_work_on_read_only_media(recorded: Recorded, shared: Path) -> None:
    """A WAL-mode file alone in a read-only directory (a backup on read-only media): SQLite's
    mode=ro cannot open it (it would have to create the -wal and -shm files)."""
    media = shared / "media"
    recorded.place(media)
    config = _config(shared, media / "monitor.db")
    _read_only_media(media)
    before = _state(media)
    *audit, retry = _as_unprivileged(
        *_audit_argvs(recorded, config), ["alerts", "retry", "-c", str(config)]
    )
    _assert_correct_answers(recorded, audit)
    assert retry["code"] == 3, retry
    assert _state(media) == before


@pytest.mark.slow
def test_audit_commands_read_the_wal_of_a_live_database_on_read_only_media(
    recorded: Recorded, shared: Path
) -> None:
    """With its -wal and -shm files present the reader must see what is in the WAL (all of the
    history here): immutable=1 would silently show an empty database."""
    media = shared / "media"
    _live_copy(recorded, media)
    config = _config(shared, media / "monitor.db")
    _read_only_media(media)
    before = _state(media)
    _assert_correct_answers(recorded, _as_unprivileged(*_audit_argvs(recorded, config)))
    assert _state(media) == before


@pytest.mark.slow
def test_a_wal_without_its_shm_on_read_only_media_is_refused_not_hidden(
    recorded: Recorded, shared: Path
) -> None:
    media = shared / "media"
    _live_copy(recorded, media)
    (media / "monitor.db-shm").unlink()
    config = _config(shared, media / "monitor.db")
    _read_only_media(media)
    before = _state(media)
    for result in _as_unprivileged(*_audit_argvs(recorded, config)):
        assert result["code"] == 3, result
        assert "copy the database with its -wal file to writable storage" in result["err"]
    assert _state(media) == before


# -- PostgreSQL ------------------------------------------------------------------------------


def _tables(url: str) -> list[str]:
    engine = create_engine(url)
    with engine.connect() as connection:
        found = connection.execute(
            text("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
        )
        names = sorted(found.scalars())
    engine.dispose()
    return names


@pytest.mark.postgres
@pytest.mark.parametrize("command", NO_MIGRATION)
def test_postgres_without_schema_is_exit_3_and_stays_empty(
    command: str, postgres_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, postgres_url)
    code, out, err = _run(capsys, config, NO_MIGRATION[command])
    assert code == 3, out + err
    assert "is not an initialised genauth-monitor database" in err
    assert _tables(postgres_url) == [], "no table created"


@pytest.mark.postgres
def test_postgres_session_is_read_only(postgres_url: str) -> None:
    upgrade(create_store_engine(postgres_url))
    engine = open_read_only(postgres_url)
    with pytest.raises(Exception, match="read-only transaction"), engine.begin() as connection:
        connection.execute(text("CREATE TABLE intruder (x int)"))
    engine.dispose()
    assert "intruder" not in _tables(postgres_url)


@pytest.mark.postgres
def test_postgres_audit_commands_read_a_current_database(
    postgres_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, postgres_url)
    assert _run(capsys, config, ["db", "upgrade"])[0] == 0
    code, out, err = _run(capsys, config, ["verify"])
    assert code == 0 and out.startswith("audit chain intact: 0 rows"), out + err
    assert _run(capsys, config, ["history"])[1].strip() == "no events"
