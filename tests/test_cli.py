"""The command line through ``monitor.cli.main`` in-process (``run_main``), and a few smoke
tests of the real entry point in subprocesses (``run_cli``)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from monitor import __version__
from monitor.simulator import SimulatedGenAuth
from tests.helpers import CLI, EVENT_FIELDS, free_port, run_cli, run_main, wait_for, write_config

SECRET = "Acc3ss-Key-Secret-For-CLI"


@pytest.fixture
def sim() -> Iterator[SimulatedGenAuth]:
    with SimulatedGenAuth(access_key_id="cli-pool", access_key_secret=SECRET) as s:
        yield s


@pytest.fixture
def env() -> dict[str, str]:
    return {"GM_TEST_SECRET": SECRET, "GM_TEST_API_TOKEN": "api-token-cli"}


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "genauth-monitor"
    assert script.exists() or shutil.which("genauth-monitor")


def test_python_m_monitor_version_in_a_subprocess() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"genauth-monitor {__version__}"


def test_check_in_a_subprocess(tmp_path: Path, sim: SimulatedGenAuth, env: dict[str, str]) -> None:
    """The real entry point end to end: one poll recorded, its exit code and JSON."""
    config = write_config(tmp_path, sim)
    result = run_cli("check", "-c", str(config), "--json", env=env)
    assert result.returncode == 0, result.stderr
    [target] = json.loads(result.stdout)["targets"]
    assert target["ok"] and [e["kind"] for e in target["events"]] == ["first_seen"]
    assert SECRET not in result.stdout + result.stderr


def test_run_in_a_subprocess_serves_and_stops_on_sigterm(
    tmp_path: Path, sim: SimulatedGenAuth, env: dict[str, str]
) -> None:
    """The daemon's smoke test (tests/test_daemon.py, in the slow tier, follows it further)."""
    port = free_port()
    config = write_config(tmp_path, sim, port=port)
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*CLI, "run", "-c", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
    try:
        ready = f"http://127.0.0.1:{port}/readyz"
        wait_for(lambda: requests.get(ready, timeout=2).status_code == 200, what="/readyz")
    finally:
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
    assert code == 0, log.read_text()
    assert time.monotonic() - started < 10
    assert SECRET not in log.read_text()


def test_config_check(tmp_path: Path, sim: SimulatedGenAuth, env: dict[str, str]) -> None:
    config = write_config(tmp_path, sim)
    ok = run_main("config", "check", "-c", str(config), env=env)
    assert ok.returncode == 0, ok.stderr
    assert "prod" in ok.stdout
    missing = run_main("config", "check", "-c", str(config), env={"GM_TEST_SECRET": ""})
    assert missing.returncode == 2
    assert "targets[0].access_key_secret_env" in missing.stderr


def test_bad_config_reports_every_problem_and_no_secret(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        """
[monitor]
interval = "soon"
failure_threshold = 0

[[targets]]
name = "prod"
access_key_id = "x"
access_key_secret = "Inline-Secret-Value-123"
access_key_secret_env = "ALSO_SET"
base_url = "ftp://nowhere"
"""
    )
    result = run_main("check", "-c", str(config), env={"ALSO_SET": "Env-Secret-Value-456"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert any(line.startswith("monitor.interval:") for line in lines), lines
    assert any(line.startswith("monitor.failure_threshold:") for line in lines), lines
    assert any(line.startswith("targets[0].base_url:") for line in lines), lines
    assert any("targets[0]" in line and "access_key_secret" in line for line in lines), lines
    assert "Inline-Secret-Value-123" not in result.stderr + result.stdout
    assert "Env-Secret-Value-456" not in result.stderr + result.stdout


def test_check_exit_codes_and_json(
    tmp_path: Path, sim: SimulatedGenAuth, env: dict[str, str]
) -> None:
    config = write_config(tmp_path, sim, expect="[targets.expect]\nenabled = true")
    fine = run_main("check", "-c", str(config), "--json", env=env)
    assert fine.returncode == 0, fine.stderr
    report = json.loads(fine.stdout)
    [target] = report["targets"]
    assert target["ok"] and target["enabled"] is True and target["drift"] is False
    assert target["hash"].startswith("sha256:")
    [event] = target["events"]
    assert event["kind"] == "first_seen"
    assert set(event) == EVENT_FIELDS, "the event JSON of SPEC §4"

    data = sim.data
    data["enabled"] = False
    sim.set_data(data)
    disabled = run_main("check", "-c", str(config), env=env)
    assert disabled.returncode == 1, disabled.stdout + disabled.stderr
    assert "DISABLED" in disabled.stdout

    sim.set_fault("http_500_html")
    failed = run_main("check", "-c", str(config), "--json", env=env)
    assert failed.returncode == 3
    error = json.loads(failed.stdout)["targets"][0]["error"]
    assert error["reason"] == "http_status" and error["http_status"] == 500

    assert run_main("check", "-c", str(config), "--target", "nope", env=env).returncode == 2


def test_history_and_audit_commands(
    tmp_path: Path, sim: SimulatedGenAuth, env: dict[str, str]
) -> None:
    config = write_config(tmp_path, sim)
    c = ["-c", str(config)]
    assert run_main("db", "upgrade", *c, env=env).returncode == 0
    assert run_main("db", "upgrade", *c, env=env).returncode == 0
    assert run_main("check", *c, env=env).returncode == 0
    data = sim.data
    data["smtpConfig"]["smtp_host"] = "smtp.changed.example"
    sim.set_data(data)
    assert run_main("check", *c, env=env).returncode == 0

    history = run_main("history", *c, "--json", env=env)
    assert history.returncode == 0
    events = json.loads(history.stdout)
    assert [e["kind"] for e in events] == ["delivery_changed", "first_seen"]
    assert set(events[0]) >= EVENT_FIELDS
    [change] = events[0]["changes"]
    assert change["path"] == "smtpConfig.smtp_host" and change["new"] == "smtp.changed.example"
    assert run_main("history", *c, "--kind", "bogus", env=env).returncode == 2
    before = run_main("-c", str(config), "history", "--json", env=env)
    assert before.returncode == 0 and json.loads(before.stdout) == events, "-c before the command"
    only = json.loads(run_main("history", *c, "--json", "--kind", "first_seen", env=env).stdout)
    assert [e["kind"] for e in only] == ["first_seen"]
    table = run_main("history", *c, env=env)
    assert "delivery_changed" in table.stdout and "KIND" in table.stdout
    csv_out = run_main("history", *c, "--format", "csv", env=env).stdout.splitlines()
    assert csv_out[0].startswith("id,at,target,kind") and len(csv_out) == 3

    snaps = json.loads(run_main("snapshots", *c, "--json", env=env).stdout)
    assert len(snaps) == 2
    new, old = snaps[0]["hash"], snaps[1]["hash"]
    assert new == events[0]["snapshot"] and old == events[0]["previous"]

    shown = run_main("show", *c, new, env=env)
    assert shown.returncode == 0
    doc = json.loads(shown.stdout)["document"]
    assert doc["smtpConfig"]["smtp_host"] == "smtp.changed.example"
    assert doc["smtpConfig"]["senderPass"].startswith("hmac-sha256:")
    assert run_main("show", *c, "sha256:" + "0" * 64, env=env).returncode == 4
    assert run_main("show", *c, new[7:19], env=env).returncode == 0, "unique prefix"

    diffed = json.loads(run_main("diff", *c, old, new, "--json", env=env).stdout)
    assert [ch["path"] for ch in diffed["changes"]] == ["smtpConfig.smtp_host"]

    at_now = run_main("at", *c, "--target", "prod", "2999-01-01T00:00:00Z", "--json", env=env)
    assert at_now.returncode == 0 and json.loads(at_now.stdout)["hash"] == new
    before = run_main("at", *c, "--target", "prod", "2000-01-01T00:00:00Z", env=env)
    assert before.returncode == 4
    assert run_main("at", *c, "--target", "prod", "yesterday", env=env).returncode == 2

    verify = run_main("verify", *c, env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "5 rows" in verify.stdout, "2 snapshots, 2 events, the change's attribution"


def test_read_only_commands_need_no_credentials(
    tmp_path: Path, sim: SimulatedGenAuth, env: dict[str, str]
) -> None:
    config = write_config(
        tmp_path, sim, extra='[[sinks]]\ntype = "slack"\nurl_env = "GM_TEST_SLACK_URL"\n'
    )
    c = ["-c", str(config)]
    full = {**env, "GM_TEST_SLACK_URL": "https://hooks.slack.invalid/T/B/X"}
    assert run_main("check", *c, "--delivery-timeout", "0", env=full).returncode == 0
    bare = {"GM_TEST_SECRET": "", "GM_TEST_API_TOKEN": "", "GM_TEST_SLACK_URL": ""}
    for args in (["history"], ["snapshots"], ["verify"], ["alerts", "pending"], ["db", "upgrade"]):
        result = run_main(*args, *c, env=bare)
        assert result.returncode == 0, (args, result.stderr)
    assert run_main("check", *c, env=bare).returncode == 2, "polling does need them"


def test_taken_port_is_one_clear_line(
    tmp_path: Path, sim: SimulatedGenAuth, env: dict[str, str]
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = write_config(tmp_path, sim, port=taken.getsockname()[1])
        result = run_main("run", "-c", str(config), env=env)
    assert result.returncode == 2, "a start-up problem is a configuration error (SPEC §7)"
    assert result.stderr.startswith("server.listen: cannot listen on 127.0.0.1:")
    assert "Traceback" not in result.stderr


def test_unreachable_database_is_not_drift(
    tmp_path: Path, sim: SimulatedGenAuth, env: dict[str, str]
) -> None:
    url = "postgresql+psycopg://postgres@127.0.0.1:9/nowhere?password=Db-Pass-In-Query"
    config = write_config(tmp_path, sim, storage_url=url)
    text = config.read_text().replace("[monitor]", '[monitor]\nfingerprint_key_env = "GM_FP"')
    config.write_text(text)
    env = {**env, "GM_FP": "k"}
    checked = run_main("check", "-c", str(config), env=env)
    assert checked.returncode == 3, checked.stdout + checked.stderr
    shown = run_main("config", "check", "-c", str(config), env=env)
    assert shown.returncode == 0
    for out in (checked, shown):
        assert "Db-Pass-In-Query" not in out.stdout + out.stderr


def test_fingerprint_key_file_is_made_once_private_and_reused(
    tmp_path: Path, sim: SimulatedGenAuth, env: dict[str, str]
) -> None:
    import stat

    config = write_config(tmp_path, sim)
    assert run_main("check", "-c", str(config), "--json", env=env).returncode == 0
    key_file = tmp_path / "monitor.db.fingerprint-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text()
    first = json.loads(run_main("snapshots", "-c", str(config), "--json", env=env).stdout)
    assert run_main("check", "-c", str(config), env=env).returncode == 0
    assert key_file.read_text() == key, "reused, not replaced"
    again = json.loads(run_main("snapshots", "-c", str(config), "--json", env=env).stdout)
    assert len(again) == 1 and again[0]["hash"] == first[0]["hash"], "same key, same hash"


@pytest.fixture
def cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> Iterator[Callable[..., tuple[int, str, str]]]:
    """``main(argv)`` in-process with ``env`` set; returns (exit code, stdout, stderr). The CLI
    sets up logging: put it back."""
    from monitor.cli import main

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    root.handlers[:] = handlers
    root.setLevel(level)


def test_history_ages_are_durations(
    tmp_path: Path, sim: SimulatedGenAuth, cli: Callable[..., tuple[int, str, str]]
) -> None:
    """``--since`` and ``--until`` read ages in the config's duration grammar (SPEC §7)."""
    c = ["-c", str(write_config(tmp_path, sim))]
    assert cli("check", *c)[0] == 0

    def kinds(*args: str) -> list[str]:
        code, out, err = cli("history", *c, "--json", *args)
        assert code == 0, err
        return [event["kind"] for event in json.loads(out)]

    assert kinds("--since", "1h30m") == ["first_seen"]
    assert kinds("--since", "1w") == ["first_seen"]
    assert kinds("--since", "90s", "--until", "0s") == ["first_seen"]
    assert kinds("--until", "1h30m") == []
    code, _, err = cli("history", *c, "--since", "1h30")
    assert code == 2 and err.startswith("genauth-monitor: --since: invalid time '1h30'"), err
