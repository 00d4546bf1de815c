"""The shipped alert rules in a real Prometheus that scrapes the real daemon: disabling the email
provider upstream (the simulated GenAuth API) makes GenAuthEmailProviderDisabled fire."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from monitor.simulator import SimulatedGenAuth
from tests.externals import binary
from tests.helpers import CLI, free_port, wait_for, write_config

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
SECRET = "E2e-Prometheus-Access-Secret-4711"

pytestmark = pytest.mark.slow  # the real daemon and a real Prometheus, as processes
ALERT_TIMEOUT = 60.0


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"({path.name} missing)"
    return f"--- {path.name} ---\n" + "\n".join(
        path.read_text(errors="replace").splitlines()[-lines:]
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextmanager
def _process(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[Any]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield proc
    finally:
        _stop(proc)


def _prometheus_config(tmp_path: Path, daemon_port: int) -> Path:
    # The shipped rules.yml, copied unmodified: GenAuthEmailProviderDisabled has no `for:`, so it
    # fires on the first evaluation that sees the disabled provider (test_deploy checks that).
    rules = tmp_path / "rules.yml"
    shutil.copyfile(RULES, rules)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(rules)],
                "scrape_configs": [
                    {
                        # The job name the shipped rules (GenAuthMonitorAbsent) expect.
                        "job_name": "genauth-monitor",
                        "scrape_timeout": "1s",
                        "static_configs": [{"targets": [f"127.0.0.1:{daemon_port}"]}],
                    }
                ],
            }
        )
    )
    return config


class _Prometheus:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = requests.get(f"{self.base}/api/v1/query", params={"query": expr}, timeout=5)
        answer.raise_for_status()
        result: list[dict[str, Any]] = answer.json()["data"]["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        answer = requests.get(f"{self.base}/api/v1/alerts", timeout=5)
        answer.raise_for_status()
        alerts: list[dict[str, Any]] = answer.json()["data"]["alerts"]
        return alerts

    def firing(self, name: str, **labels: str) -> dict[str, Any] | None:
        """The firing alert ``name`` whose labels include ``labels``, if any."""
        for alert in self.alerts():
            if (
                alert["state"] == "firing"
                and alert["labels"].get("alertname") == name
                and labels.items() <= alert["labels"].items()
            ):
                return alert
        return None


def test_disabling_the_provider_fires_the_shipped_alert(tmp_path: Path) -> None:
    prometheus_bin = binary("prometheus")
    daemon_port, prometheus_port = free_port(), free_port()
    daemon_log, prometheus_log = tmp_path / "daemon.log", tmp_path / "prometheus.log"
    env = {**os.environ, "GM_TEST_SECRET": SECRET, "GM_TEST_API_TOKEN": "x"}
    with SimulatedGenAuth(access_key_id="e2e-pool", access_key_secret=SECRET) as sim:
        config = write_config(tmp_path, sim, port=daemon_port, interval="1s")
        prometheus_config = _prometheus_config(tmp_path, daemon_port)
        prometheus = _Prometheus(prometheus_port)
        daemon_args = [*CLI, "run", "-c", str(config)]
        prometheus_args = [
            prometheus_bin,
            f"--config.file={prometheus_config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ]
        with (
            _process(daemon_args, daemon_log, env) as daemon,
            _process(prometheus_args, prometheus_log) as server,
        ):
            try:
                wait_for(
                    lambda: requests.get(f"{prometheus.base}/-/ready", timeout=2).ok,
                    timeout=30,
                    what="Prometheus ready",
                )
                # Prometheus scrapes the daemon and sees the provider enabled.
                wait_for(
                    lambda: prometheus.query(
                        'genauth_email_provider_enabled{job="genauth-monitor", target="prod"} == 1'
                    ),
                    timeout=30,
                    what="the enabled provider in Prometheus",
                )
                assert prometheus.query('up{job="genauth-monitor"} == 1')
                assert prometheus.firing("GenAuthEmailProviderDisabled", target="prod") is None
                assert prometheus.firing("GenAuthEmailProviderTypeChanged", target="prod") is None

                # Disable the provider (and switch its type) upstream.
                data = sim.data
                assert data["enabled"] is True and data["type"] == "custom"
                data["enabled"] = False
                data["type"] = "sendgrid"
                sim.set_data(data)

                alert = wait_for(
                    lambda: prometheus.firing("GenAuthEmailProviderDisabled", target="prod"),
                    timeout=ALERT_TIMEOUT,
                    what="GenAuthEmailProviderDisabled firing in Prometheus",
                )
                # Aggregated over replicas (max by target): no job or instance label, so two
                # replicas exporting prod fire one alert (deploy/prometheus/rules.test.yml).
                assert alert["labels"] == {
                    "alertname": "GenAuthEmailProviderDisabled",
                    "target": "prod",
                    "severity": "critical",
                    "kind": "provider_disabled",
                }
                assert alert["annotations"]["summary"] == (
                    "GenAuth email provider of prod is disabled"
                )
                assert alert["annotations"]["runbook_url"].endswith(
                    "docs/runbook.md#genauthemailproviderdisabled"
                )
                # A change counted for the first time since the daemon started (a new series).
                wait_for(
                    lambda: prometheus.firing("GenAuthEmailProviderTypeChanged", target="prod"),
                    timeout=ALERT_TIMEOUT,
                    what="GenAuthEmailProviderTypeChanged firing in Prometheus",
                )
                # The monitor is up and polling: its health alerts are not even pending.
                health = {
                    "GenAuthMonitorAbsent",
                    "GenAuthMonitorPollFailing",
                    "GenAuthMonitorStale",
                }
                assert not [a for a in prometheus.alerts() if a["labels"]["alertname"] in health]

                # Enabled again: the alert resolves.
                data["enabled"] = True
                sim.set_data(data)
                wait_for(
                    lambda: (
                        prometheus.firing("GenAuthEmailProviderDisabled", target="prod") is None
                    ),
                    timeout=ALERT_TIMEOUT,
                    what="GenAuthEmailProviderDisabled resolved",
                )
                assert daemon.poll() is None and server.poll() is None
            except AssertionError as exc:
                raise AssertionError(
                    f"{exc}\n{_tail(daemon_log)}\n{_tail(prometheus_log)}"
                ) from exc
