"""The daemon as a service: a subprocess against the simulated API, scraped, then stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from monitor.simulator import SimulatedGenAuth
from tests.helpers import CLI, free_port, metric_value, run_main, scrape, wait_for, write_config

# The real daemon followed through changes and failures; test_cli.py keeps a quick smoke test
# of run and SIGTERM in the default tier.
pytestmark = pytest.mark.slow

SECRET = "Daemon-Access-Secret-777"
SMTP_PASS = "Daemon-Smtp-Password-888"
SG_KEY = "SG.Daemon-Sendgrid-Key-999"
API_TOKEN = "Daemon-Api-Token-000"


def _start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "GM_TEST_SECRET": SECRET, "GM_TEST_API_TOKEN": API_TOKEN}
    with log.open("wb") as out:
        return subprocess.Popen(
            [*CLI, "run", "-c", str(config), "--log-format", "json"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


def test_daemon_follows_upstream_and_stops_on_sigterm(tmp_path: Path) -> None:
    with SimulatedGenAuth(access_key_id="daemon-pool", access_key_secret=SECRET) as sim:
        data = sim.data
        data["smtpConfig"]["senderPass"] = SMTP_PASS
        data["sendGridConfig"] = {"sender": "sg", "apikey": SG_KEY}
        sim.set_data(data)
        port = free_port()
        config = write_config(tmp_path, sim, port=port, expect="[targets.expect]\nenabled = true")
        log = tmp_path / "daemon.log"
        proc = _start(config, log)
        base = f"http://127.0.0.1:{port}"
        try:

            def enabled_is(value: float) -> bool:
                text = scrape(base, timeout=2)
                return metric_value(text, "genauth_email_provider_enabled", target="prod") == value

            wait_for(lambda: enabled_is(1), what="first poll in /metrics")
            assert requests.get(f"{base}/healthz", timeout=2).status_code == 200
            wait_for(lambda: requests.get(f"{base}/readyz", timeout=2).status_code == 200)

            data["enabled"] = False
            sim.set_data(data)
            wait_for(lambda: enabled_is(0), what="disabled provider in /metrics")
            metrics = scrape(base, timeout=2)
            assert metric_value(metrics, "genauth_email_provider_drift", target="prod") == 1
            assert metric_value(metrics, "genauth_monitor_up", target="prod") == 1
            assert (
                metric_value(
                    metrics, "genauth_monitor_polls_total", target="prod", outcome="success"
                )
                or 0
            ) >= 2
            assert (
                metric_value(
                    metrics,
                    "genauth_email_provider_changes_total",
                    target="prod",
                    kind="provider_disabled",
                )
                == 1
            )

            sim.set_fault("http_502_html")
            wait_for(
                lambda: (
                    metric_value(
                        scrape(base, timeout=2),
                        "genauth_monitor_up",
                        target="prod",
                    )
                    == 0
                ),
                what="failing poll in /metrics",
            )
            sim.set_fault(None)

            events = requests.get(
                f"{base}/api/v1/events",
                headers={"Authorization": f"Bearer {API_TOKEN}"},
                timeout=2,
            ).json()["events"]
            assert "provider_disabled" in [e["kind"] for e in events]
            assert requests.get(f"{base}/api/v1/events", timeout=2).status_code == 401
        finally:
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=15)
        assert code == 0, log.read_text()
        assert time.monotonic() - started < 10

        # Secrets never leave: logs, database files, /metrics (above), CLI output.
        env = {"GM_TEST_SECRET": SECRET, "GM_TEST_API_TOKEN": API_TOKEN}
        outputs = [log.read_text()]
        for args in (
            ["history", "--json"],
            ["snapshots", "--json"],
            ["verify"],
            ["check", "--json"],
            ["config", "check"],
        ):
            result = run_main(*args, "-c", str(config), env=env)
            outputs += [result.stdout, result.stderr]
        blobs = (
            "\n".join(outputs).encode()
            + b"".join(
                p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("monitor.db")
            )
            + metrics.encode()
        )
        for secret in (SECRET, SMTP_PASS, SG_KEY, API_TOKEN):
            assert secret.encode() not in blobs, secret
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        assert any(line.get("kind") == "provider_disabled" for line in lines)
        assert any("chain_hash" in line for line in lines), "chain head is logged on change"
