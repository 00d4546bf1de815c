"""Test helpers: the real CLI in a subprocess or in-process, config files, free ports, polling
waits."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from unittest import mock

import requests
from sqlalchemy import Connection, Engine, event

from monitor.simulator import SimulatedGenAuth

CLI = [sys.executable, "-m", "monitor"]
# The event JSON of SPEC §4 (webhook body, API, CLI --json).
EVENT_FIELDS = {
    "id",
    "target",
    "kind",
    "severity",
    "status",
    "at",
    "snapshot",
    "previous",
    "changes",
    "message",
    "attribution",
    "actors",
}


class QuietJsonHandler(BaseHTTPRequestHandler):
    """The handler of a test's own loopback server: JSON answers, no request log on stderr."""

    def send_json(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m monitor ARGS`` in a subprocess, ``env`` added to this environment."""
    merged = {**os.environ, **(env or {})}
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env=merged, timeout=timeout, check=False
    )


@dataclass(frozen=True)
class CliResult:
    """What ``run_cli`` returns, for its in-process twin ``run_main``."""

    returncode: int
    stdout: str
    stderr: str


def run_main(*args: str, env: dict[str, str] | None = None) -> CliResult:
    """``monitor.cli.main(ARGS)`` in this process, the same shape as ``run_cli``.

    ``env`` is added to ``os.environ`` for the call only; stdout and stderr (where the CLI's
    logging handler goes) are captured; an ``argparse`` exit (``--version``, a bad option) is
    its exit code; the root logger and the logger levels the CLI sets are put back. A ``run``
    that gets past its start-up checks would block the test: it fails instead (blocking
    commands stay subprocesses). What the end of its process would do is done: the alert
    delivery threads of ``check`` are waited for, and the database connections the call opened
    are closed (SQLite then checkpoints its WAL, as after a process)."""
    from monitor import cli as cli_module
    from monitor import cli_commands

    def started(_run: object) -> None:
        raise AssertionError("in-process run_main(): run/demo would block; use run_cli")

    before = set(threading.enumerate())
    out, err = io.StringIO(), io.StringIO()
    with (
        _engines_disposed_after(),
        _logging_restored(),
        mock.patch.dict(os.environ, env or {}),
        mock.patch.object(cli_commands, "_run_until_signal", started),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            code = cli_module.main(list(args))
        except SystemExit as exc:
            code = _exit_code(exc, err)
        _join_deliveries(before)
    return CliResult(code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _engines_disposed_after() -> Iterator[None]:
    """Every SQLAlchemy engine that connects inside the block is disposed of at its end."""
    engines: weakref.WeakSet[Engine] = weakref.WeakSet()

    def connected(connection: Connection) -> None:
        engines.add(connection.engine)

    event.listen(Engine, "engine_connect", connected)
    try:
        yield
    finally:
        event.remove(Engine, "engine_connect", connected)
        for engine in list(engines):
            engine.dispose()


def _exit_code(exc: SystemExit, stderr: io.StringIO) -> int:
    """The status the interpreter would exit with for ``sys.exit(exc.code)``."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=stderr)
    return 1


@contextlib.contextmanager
def _logging_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {
        name: logger.level
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, logger in logging.Logger.manager.loggerDict.items():
            if isinstance(logger, logging.Logger):
                logger.setLevel(levels.get(name, logging.NOTSET))


def _join_deliveries(before: set[threading.Thread], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    for thread in set(threading.enumerate()) - before:
        if thread.name.startswith("deliver:"):
            thread.join(max(0.0, deadline - time.monotonic()))
            assert not thread.is_alive(), f"in-process run_main() left thread {thread.name} running"


def write_config(
    directory: Path,
    sim: SimulatedGenAuth,
    *,
    port: int | None = None,
    interval: str = "1s",
    expect: str = "",
    extra: str = "",
    storage_url: str | None = None,
    monitor: str = "",
) -> Path:
    """A config for one target 'prod' on the simulator; the secret comes from GM_TEST_SECRET.
    ``monitor``: more lines of the [monitor] table; ``expect``: lines of the target's table
    (and its [targets.expect]); ``extra``: tables after it (sinks)."""
    url = storage_url or f"sqlite:///{directory / 'monitor.db'}"
    path = directory / "genauth-monitor.toml"
    path.write_text(
        f"""
[monitor]
interval = "{interval}"
jitter = "0%"
timeout = "2s"
failure_threshold = 2
{monitor}

[storage]
url = "{url}"

[server]
listen = "127.0.0.1:{port or free_port()}"
api_token_env = "GM_TEST_API_TOKEN"

[[targets]]
name = "prod"
base_url = "{sim.base_url}"
access_key_id = "{sim.access_key_id}"
access_key_secret_env = "GM_TEST_SECRET"
{expect}
{extra}
"""
    )
    return path


def start_daemon(config: Path, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``run -c CONFIG`` in a subprocess (``env`` added to this environment), its output in
    ``log``; the caller stops it."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [*CLI, "run", "-c", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )


def wait_for(predicate: Callable[[], Any], *, timeout: float = 20, what: str = "") -> Any:
    """The first true value of ``predicate``, asked again after 10 ms, then less and less
    often (every 100 ms at most, so a long wait does not hammer what it asks)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    pause = 0.01
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (requests.RequestException, OSError):
            last = None
        if last:
            return last
        time.sleep(pause)
        pause = min(pause * 2, 0.1)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def scrape(base: str, *, timeout: float = 5.0) -> str:
    """``GET /metrics`` of a daemon at ``base``. While the daemon is being built its starting
    server answers 503 (monitor/listen.py): that raises a RequestException, so ``wait_for``
    asks again, as it does while nothing listens yet."""
    answer = requests.get(f"{base}/metrics", timeout=timeout)
    answer.raise_for_status()
    return answer.text


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def runtime_settings(
    db_url: str,
    sim: SimulatedGenAuth,
    base_dir: Path,
    *,
    sinks: list[dict[str, Any]] | None = None,
    monitor: dict[str, Any] | None = None,
    names: Sequence[str] = ("prod",),
    **target: Any,
) -> Any:
    """Settings for in-process targets on the simulator (one, 'prod', unless ``names``),
    fingerprint key 'k'; ``target``: more keys of every target's table."""
    from monitor.config import parse_settings

    return parse_settings(
        {
            "monitor": {"fingerprint_key_env": "FP", **(monitor or {})},
            "storage": {"url": db_url},
            "targets": [
                {
                    "name": name,
                    "base_url": sim.base_url,
                    "access_key_id": sim.access_key_id,
                    "access_key_secret_env": "SECRET",
                    **target,
                }
                for name in names
            ],
            "sinks": sinks or [],
        },
        base_dir=base_dir,
        environ={"FP": "k", "SECRET": sim.access_key_secret, "HOOK": "Webhook-Signing-Secret-456"},
    )


def change_and_poll(runtime: Any, sim: SimulatedGenAuth, clock: Any, **fields: Any) -> Any:
    """Change the simulator's config (``smtpConfig__smtp_host=...`` for nested keys), move
    the clock a minute on, and poll target 'prod' of ``runtime`` once."""
    data = sim.data
    for path, value in fields.items():
        node = data
        parts = path.split("__")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    sim.set_data(data)
    clock.advance(60)
    return runtime.pollers["prod"].poll()


def serve_app(runtime: Any, clock: Any, token: str | None) -> tuple[Any, Any]:
    """The daemon's FastAPI app over ``runtime`` (always ready), served on a free loopback
    port by its HttpServer, started: ``(app, server)``; the caller stops the server."""
    from monitor.api import create_app
    from monitor.http_server import HttpServer

    app = create_app(
        registry=runtime.registry,
        queries=runtime.queries,
        ready=lambda: (True, {}),
        api_token=token,
        clock=clock,
        targets=runtime.targets,
    )
    server = HttpServer(app, host="127.0.0.1", port=0)
    server.start()
    return app, server
