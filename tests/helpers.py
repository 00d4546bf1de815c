"""Test helpers: the real CLI in a subprocess, config files, free ports, polling waits."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

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
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
    merged = {**os.environ, **(env or {})}
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env=merged, timeout=timeout, check=False
    )


def write_config(
    directory: Path,
    sim: SimulatedGenAuth,
    *,
    port: int | None = None,
    interval: str = "1s",
    expect: str = "",
    extra: str = "",
    storage_url: str | None = None,
) -> Path:
    """A config for one target 'prod' on the simulator; the secret comes from GM_TEST_SECRET."""
    url = storage_url or f"sqlite:///{directory / 'monitor.db'}"
    path = directory / "genauth-monitor.toml"
    path.write_text(
        f"""
[monitor]
interval = "{interval}"
jitter = "0%"
timeout = "2s"
failure_threshold = 2

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


def wait_for(predicate: Callable[[], Any], *, timeout: float = 20, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (requests.RequestException, OSError):
            last = None
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what or predicate}")


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
    **target: Any,
) -> Any:
    """Settings for one in-process target 'prod' on the simulator (fingerprint key 'k')."""
    from monitor.config import parse_settings

    return parse_settings(
        {
            "monitor": {"fingerprint_key_env": "FP", **(monitor or {})},
            "storage": {"url": db_url},
            "targets": [
                {
                    "name": "prod",
                    "base_url": sim.base_url,
                    "access_key_id": sim.access_key_id,
                    "access_key_secret_env": "SECRET",
                    **target,
                }
            ],
            "sinks": sinks or [],
        },
        base_dir=base_dir,
        environ={"FP": "k", "SECRET": sim.access_key_secret, "HOOK": "Webhook-Signing-Secret-456"},
    )
