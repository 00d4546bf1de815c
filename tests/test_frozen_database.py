"""A frozen PostgreSQL (every process of a server of the test's own SIGSTOPped, as a black-holed
network would look): polling goes on, the gauges and /readyz tell the truth, and a change seen
during the freeze is recorded and alerted afterwards with the time it was first seen."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
import requests
from sqlalchemy import create_engine, text

from monitor.simulator import SimulatedGenAuth
from monitor.timeutil import parse_time_strict
from tests.helpers import CLI, free_port, metric_value, scrape, wait_for, write_config
from tests.own_postgres import own_postgres
from tests.receiver import Receiver

SECRET = "Frozen-Db-Access-Secret-271"

pytestmark = pytest.mark.slow  # the real daemon and a PostgreSQL server of its own


def test_polling_outlives_a_frozen_database(tmp_path: Path) -> None:
    receiver = Receiver()
    with (
        own_postgres() as database,
        SimulatedGenAuth(access_key_id="frozen-pool", access_key_secret=SECRET) as sim,
    ):
        port = free_port()
        config = write_config(
            tmp_path,
            sim,
            port=port,
            storage_url=database.url,
            extra=f'[[sinks]]\ntype = "webhook"\nurl = "{receiver.url}"\nmax_backoff = "1s"\n',
        )
        env = {**os.environ, "GM_TEST_SECRET": SECRET, "GM_TEST_API_TOKEN": "frozen-api-token"}
        with (tmp_path / "daemon.log").open("wb") as log:
            proc = subprocess.Popen(
                [*CLI, "run", "-c", str(config)], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        base = f"http://127.0.0.1:{port}"

        def value(name: str) -> float | None:
            return metric_value(scrape(base, timeout=2), name, target="prod")

        try:
            wait_for(lambda: [b["kind"] for b in receiver.bodies()] == ["first_seen"], timeout=30)
            assert requests.get(f"{base}/readyz", timeout=2).status_code == 200

            database.freeze()
            frozen_at = time.time()
            # The freeze is real: a new connection gets no answer.
            started = time.monotonic()
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(
                    f"host=127.0.0.1 port={database.port} user=postgres connect_timeout=2"
                )
            assert time.monotonic() - started >= 1.5

            data = sim.data
            data["enabled"] = False
            sim.set_data(data)
            changed_at = time.time()
            polls_before = sim.provider_requests

            # The gauges tell the truth from memory; /readyz says 503 within a second.
            wait_for(lambda: value("genauth_email_provider_enabled") == 0, timeout=10)
            assert value("genauth_monitor_up") == 1
            ready_started = time.monotonic()
            ready = requests.get(f"{base}/readyz", timeout=5)
            assert time.monotonic() - ready_started < 1.0
            assert ready.status_code == 503
            assert ready.json()["checks"]["database"] is False
            time.sleep(3)
            assert sim.provider_requests >= polls_before + 2, "polling stopped"
            success = value("genauth_monitor_last_success_timestamp_seconds")
            assert success is not None and success > changed_at
            assert [b["kind"] for b in receiver.bodies()] == ["first_seen"]

            database.thaw()
            thawed_at = time.time()
            wait_for(
                lambda: "provider_disabled" in [b["kind"] for b in receiver.bodies()],
                timeout=30,
                what="the change seen during the freeze alerted after it",
            )
            [disabled] = [b for b in receiver.bodies() if b["kind"] == "provider_disabled"]
            at = parse_time_strict(disabled["at"]).timestamp()
            assert frozen_at <= at <= thawed_at, "dated when first seen, during the freeze"
            wait_for(lambda: requests.get(f"{base}/readyz", timeout=2).status_code == 200)

            engine = create_engine(database.url)
            with engine.connect() as connection:
                count = connection.execute(
                    text("SELECT count(*) FROM events WHERE kind = 'provider_disabled'")
                ).scalar_one()
            engine.dispose()
            assert count == 1
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            receiver.stop()
