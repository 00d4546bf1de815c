"""The alertmanager sink against a real Alertmanager on a loopback port."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from monitor.app import build_runtime
from monitor.simulator import SimulatedGenAuth
from tests.externals import binary
from tests.helpers import free_port, runtime_settings, wait_for

SECRET = "Am-Access-Secret-321"


class Alertmanager:
    """A real Alertmanager with temp config and storage; a restart forgets every alert."""

    def __init__(self, tmp_path: Path) -> None:
        self.exe = binary("prometheus-alertmanager")
        self.tmp = tmp_path
        self.config = tmp_path / "alertmanager.yml"
        self.config.write_text(
            "route:\n  receiver: blackhole\n  group_wait: 1s\nreceivers:\n  - name: blackhole\n"
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.runs = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.runs += 1
        self.proc = subprocess.Popen(
            [
                self.exe,
                f"--config.file={self.config}",
                f"--storage.path={self.tmp / f'am-data-{self.runs}'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--cluster.listen-address=",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: requests.get(f"{self.url}/-/ready", timeout=1).ok, what="alertmanager")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[Alertmanager]:
    am = Alertmanager(tmp_path)
    try:
        yield am
    finally:
        am.stop()


def _alerts(url: str, name: str = "GenAuthEmailProviderDisabled") -> list[dict[str, Any]]:
    answer = requests.get(f"{url}/api/v2/alerts", timeout=2)
    answer.raise_for_status()
    return [a for a in answer.json() if a["labels"].get("alertname") == name]


def test_disabled_provider_fires_and_resolves(
    db_url: str, tmp_path: Path, alertmanager: Alertmanager
) -> None:
    url = alertmanager.url
    with SimulatedGenAuth(access_key_secret=SECRET) as sim:
        settings = runtime_settings(
            db_url,
            sim,
            tmp_path,
            sinks=[{"type": "alertmanager", "url": url, "min_severity": "warning"}],
        )
        runtime = build_runtime(settings)
        poller = runtime.pollers["prod"]
        poller.poll()
        data = sim.data
        data["enabled"] = False
        sim.set_data(data)
        poller.poll()
        assert runtime.delivery.drain(timeout=10) == 0

        [alert] = wait_for(lambda: _alerts(url), what="alert listed")
        assert alert["labels"] == {
            "alertname": "GenAuthEmailProviderDisabled",
            "target": "prod",
            "severity": "critical",
            "kind": "provider_disabled",
        }
        assert alert["status"]["state"] == "active"
        assert "disabled" in alert["annotations"]["summary"]
        assert set(alert["annotations"]) >= {"summary", "description"}

        alertmanager.stop()  # a restart with fresh storage forgets the alert ...
        alertmanager.start()
        assert _alerts(url) == []
        runtime.delivery.sync_now()  # ... and the periodic re-post brings it back
        wait_for(lambda: _alerts(url), what="alert re-posted after restart")
        assert _alerts(url, "GenAuthEmailProviderFirstSeen") == [], "the re-post keeps filters"

        data["enabled"] = True
        sim.set_data(data)
        poller.poll()
        assert runtime.delivery.drain(timeout=10) == 0
        wait_for(lambda: not _alerts(url), what="alert resolved")
        runtime.store.engine.dispose()
