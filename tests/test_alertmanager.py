"""The alertmanager sink against a real Alertmanager on a loopback port."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from monitor.alerts.alertmanager import alert_for
from monitor.app import build_runtime
from monitor.simulator import SimulatedGenAuth
from monitor.storage.queries import EventView
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


@pytest.mark.slow
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
            attribution=False,  # no worker runs here to release the held provider_enabled
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
        assert set(alert["annotations"]) >= {"summary", "description", "event_id"}
        [disabled] = runtime.queries.events(kinds=("provider_disabled",))
        assert alert["annotations"]["event_id"] == disabled.id

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


def _event(kind: str, severity: str, status: str, event_id: str, row_id: int) -> EventView:
    return EventView(
        row_id=row_id,
        id=event_id,
        target="prod",
        kind=kind,
        severity=severity,
        status=status,
        at=datetime(2026, 1, 1, 12, row_id, tzinfo=UTC),
        snapshot="sha256:" + "a" * 64,
        previous=None,
        changes=[{"path": "enabled", "old": True, "new": False}],
        message=f"prod: {kind}",
    )


def test_the_event_id_is_an_annotation_never_a_label() -> None:
    fired = _event("provider_disabled", "critical", "firing", str(uuid.uuid4()), 7)
    resolved = _event("provider_enabled", "info", "resolved", str(uuid.uuid4()), 8)
    firing, resolving = alert_for(fired), alert_for(resolved)
    assert firing["annotations"]["event_id"] == fired.id
    assert resolving["annotations"]["event_id"] == resolved.id
    assert firing["labels"] == resolving["labels"], "a resolution must carry the same labels"
    for alert, event in ((firing, fired), (resolving, resolved)):
        assert set(alert["labels"]) == {"alertname", "target", "severity", "kind"}
        values = [*alert["labels"].values()]
        assert event.id not in values and str(event.row_id) not in values


@pytest.mark.slow
def test_each_member_of_an_alertmanager_cluster_gets_every_alert_one_down_or_not(
    db_url: str, tmp_path: Path
) -> None:
    members = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        members.append(Alertmanager(tmp_path / name))
    up, down = members
    down.stop()
    try:
        with SimulatedGenAuth(access_key_secret=SECRET) as sim:
            settings = runtime_settings(
                db_url,
                sim,
                tmp_path,
                sinks=[
                    {
                        "type": "alertmanager",
                        "urls": [up.url, down.url],
                        "min_severity": "warning",
                        "max_backoff": "0.5s",
                    }
                ],
                attribution=False,  # no worker runs here to release the held provider_enabled
            )
            runtime = build_runtime(settings)
            poller = runtime.pollers["prod"]
            poller.poll()
            data = sim.data
            data["enabled"] = False
            sim.set_data(data)
            poller.poll()
            assert runtime.delivery.drain(timeout=2) == 1, "the down member's row waits"
            [alert] = wait_for(lambda: _alerts(up.url), what="alert on the member that is up")
            assert set(alert["labels"]) == {"alertname", "target", "severity", "kind"}

            down.start()  # back, with empty storage
            assert runtime.delivery.drain(timeout=10) == 0
            [same] = wait_for(lambda: _alerts(down.url), what="alert on the member back")
            assert same["labels"] == alert["labels"]
            assert same["annotations"]["event_id"] == alert["annotations"]["event_id"]

            data["enabled"] = True
            sim.set_data(data)
            poller.poll()
            assert runtime.delivery.drain(timeout=10) == 0
            wait_for(
                lambda: not any(_alerts(member.url) for member in members),
                what="resolved on every member",
            )
            runtime.store.engine.dispose()
    finally:
        for member in members:
            member.stop()
