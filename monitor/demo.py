"""``genauth-monitor demo``: the real daemon against the built-in simulated GenAuth API.

Only the base URL differs from production: the same client, storage, scheduler and server run,
on SQLite in a temporary directory, while the simulator changes its configuration every few
seconds (a host change, a rotated password, the provider disabled and enabled again, ...).
"""

from __future__ import annotations

import logging
import secrets
import socket
import tempfile
import threading
import time
from pathlib import Path

from monitor.app import Daemon
from monitor.config import parse_settings
from monitor.simulator import SimulatedGenAuth, run_scenario

__all__ = ["run_demo"]

log = logging.getLogger("monitor.demo")


def _free_listen(listen: str) -> str:
    host, _, port = listen.rpartition(":")
    with socket.socket() as probe:
        try:
            probe.bind((host, int(port)))
        except OSError:
            log.warning("listen address taken; using a free port", extra={"wanted": listen})
            return f"{host}:0"
    return listen


def run_demo(
    stop: threading.Event, *, listen: str, period: float, duration: float | None = None
) -> None:
    with tempfile.TemporaryDirectory(prefix="genauth-monitor-demo-") as tmp:
        simulator = SimulatedGenAuth()
        simulator.start()
        api_token = secrets.token_urlsafe(16)
        settings = parse_settings(
            {
                "monitor": {"interval": "2s", "jitter": "10%", "timeout": "5s"},
                "storage": {"url": f"sqlite:///{Path(tmp) / 'demo.db'}"},
                "server": {"listen": _free_listen(listen), "api_token_env": "DEMO_API_TOKEN"},
                "targets": [
                    {
                        "name": "demo",
                        "base_url": simulator.base_url,
                        "access_key_id": simulator.access_key_id,
                        "access_key_secret_env": "DEMO_SECRET",
                        "expect": {"enabled": True, "type": "custom"},
                    }
                ],
            },
            base_dir=Path(tmp),
            environ={"DEMO_SECRET": simulator.access_key_secret, "DEMO_API_TOKEN": api_token},
        )
        scenario_stop = threading.Event()
        changer = threading.Thread(
            target=run_scenario,
            args=(simulator,),
            kwargs={"period": period, "stop": scenario_stop},
            daemon=True,
        )
        daemon = Daemon(settings)
        try:
            daemon.start()
            changer.start()
            base = f"http://{settings.server.host}:{daemon.http.port}"
            print(f"genauth-monitor demo: simulated GenAuth API at {simulator.base_url}")
            print(f"  metrics:  {base}/metrics")
            print(f"  API:      curl -H 'Authorization: Bearer {api_token}' {base}/api/v1/events")
            print(f"  web view: {base}/ui/ (log in with the token {api_token})")
            print(f"  database: {Path(tmp) / 'demo.db'} (removed on exit)")
            print("  the upstream config changes every few seconds; Ctrl-C stops", flush=True)
            deadline = None if duration is None else time.monotonic() + duration
            while not stop.wait(0.2):
                if deadline is not None and time.monotonic() >= deadline:
                    break
        finally:
            scenario_stop.set()
            daemon.stop()
            simulator.stop()
