"""Alert delivery end to end: outbox rows, real HTTP sinks that fail, backoff, restarts."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor.alerts.slack import slack_message
from monitor.app import Runtime, build_runtime
from monitor.simulator import SimulatedGenAuth
from tests.helpers import CLI, EVENT_FIELDS, run_main, runtime_settings, wait_for, write_config
from tests.receiver import Receiver

SECRET = "Alert-Access-Secret-123"
HOOK_SECRET = "Webhook-Signing-Secret-456"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made = Receiver()
    yield made
    made.stop()


def _runtime(
    db_url: str,
    sim: SimulatedGenAuth,
    tmp_path: Path,
    sinks: list[dict[str, Any]],
    **target: Any,
) -> Runtime:
    # Delivery alone: no attribution worker runs here to release held alerts (SPEC §11's hold
    # and follow-ups are tested in test_attribution.py).
    target.setdefault("attribution", False)
    settings = runtime_settings(
        db_url, sim, tmp_path, sinks=sinks, monitor={"failure_threshold": 2}, **target
    )
    return build_runtime(settings)


def _change(sim: SimulatedGenAuth, **fields: Any) -> None:
    data = sim.data
    data.update(fields)
    sim.set_data(data)


def test_webhook_keeps_alerts_through_outages_and_signs(
    db_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    with SimulatedGenAuth(access_key_secret=SECRET) as sim:
        runtime = _runtime(
            db_url,
            sim,
            tmp_path,
            [
                {
                    "type": "webhook",
                    "url": receiver.url,
                    "secret_env": "HOOK",
                    "max_backoff": "0.2s",
                }
            ],
        )
        poller, worker = runtime.pollers["prod"], runtime.delivery
        receiver.status = 503
        poller.poll()
        assert worker.drain(timeout=0.5) == 1, "kept while the sink answers 503"
        pending = runtime_pending(runtime)
        assert pending[0].attempts >= 1 and pending[0].last_error == "HTTP 503"

        receiver.status = 200
        assert worker.drain(timeout=5) == 0
        [first] = receiver.bodies()
        assert first["kind"] == "first_seen" and first["target"] == "prod"
        assert set(first) == EVENT_FIELDS
        raw = receiver.requests[0]
        expected = (
            "sha256=" + hmac.new(HOOK_SECRET.encode(), raw["body"], hashlib.sha256).hexdigest()
        )
        assert raw["headers"]["X-GenAuth-Monitor-Signature"] == expected

        receiver.stop()  # connection refused
        _change(sim, enabled=False)
        poller.poll()
        assert worker.drain(timeout=0.5) == 1
        receiver.start()
        assert worker.drain(timeout=5) == 0
        assert [b["kind"] for b in receiver.bodies()] == ["first_seen", "provider_disabled"]

        for _ in range(3):  # the same state again sends nothing new
            poller.poll()
        assert worker.drain(timeout=1) == 0
        assert len(receiver.requests) == 2
        assert (
            runtime.metrics.registry.get_sample_value(
                "genauth_monitor_alert_deliveries_total", {"sink": "webhook", "outcome": "sent"}
            )
            == 2
        )
        assert runtime.metrics.registry.get_sample_value("genauth_monitor_outbox_pending") == 0
        all_payloads = b"".join(r["body"] for r in receiver.requests)
        assert SECRET.encode() not in all_payloads
        runtime.store.engine.dispose()


def runtime_pending(runtime: Runtime) -> Any:
    from monitor.storage.outbox import Outbox

    return Outbox(runtime.store.engine).pending()


def test_filters_and_ignored_paths(tmp_path: Path, receiver: Receiver) -> None:
    with SimulatedGenAuth(access_key_secret=SECRET) as sim:
        runtime = _runtime(
            f"sqlite:///{tmp_path / 'm.db'}",
            sim,
            tmp_path,
            [
                {
                    "type": "webhook",
                    "name": "critical-only",
                    "url": receiver.url,
                    "min_severity": "critical",
                },
                {
                    "type": "webhook",
                    "name": "rotations",
                    "url": receiver.url,
                    "kinds": ["secret_rotated"],
                },
            ],
            ignore=["smtpConfig.sender"],
        )
        poller = runtime.pollers["prod"]
        poller.poll()  # first_seen: info, not a rotation -> nobody
        data = sim.data
        data["smtpConfig"]["sender"] = "other@example.com"  # ignored path
        sim.set_data(data)
        assert [e.kind for e in poller.poll().events] == ["delivery_changed"]
        data["smtpConfig"]["senderPass"] = "new-password"
        sim.set_data(data)
        poller.poll()
        _change(sim, enabled=False)
        poller.poll()
        _change(sim, enabled=True)  # info, but it resolves a critical alert: goes along
        poller.poll()
        runtime.delivery.drain(timeout=5)
        got = sorted((r["path"], json.loads(r["body"])["kind"]) for r in receiver.requests)
        assert [kind for _, kind in got] == sorted(
            ["secret_rotated", "provider_disabled", "provider_enabled"]
        )
        history = [e.kind for e in runtime.queries.events(target="prod")]
        assert "delivery_changed" in history, "an ignored change is still recorded"
        runtime.store.engine.dispose()


def test_slack_message_is_readable() -> None:
    from datetime import UTC, datetime

    from monitor.storage.queries import EventView

    event = EventView(
        row_id=1,
        id="0b6f0c2e-3d5a-4f1b-9c8e-7a6d5e4f3c2b",
        target="prod",
        kind="delivery_changed",
        severity="warning",
        status="firing",
        at=datetime(2026, 1, 1, tzinfo=UTC),
        snapshot="sha256:" + "a" * 64,
        previous=None,
        changes=[{"path": "smtpConfig.smtp_host", "old": "a.example", "new": "b.example"}],
        message="prod: delivery settings changed",
    )
    text = slack_message(event)["text"]
    assert "*WARNING*" in text and "prod" in text
    assert '`smtpConfig.smtp_host`: `"a.example"` → `"b.example"`' in text


@pytest.mark.slow
def test_pending_delivery_survives_sigkill(tmp_path: Path, receiver: Receiver) -> None:
    with SimulatedGenAuth(access_key_id="kill-pool", access_key_secret=SECRET) as sim:
        config = write_config(
            tmp_path,
            sim,
            # A short sink timeout: a daemon killed mid-send holds the lane's lease for the
            # timeout plus 5 s, and the next one waits for it to run out.
            extra=f'[[sinks]]\ntype = "webhook"\nurl = "{receiver.url}"\nmax_backoff = "1s"\n'
            'timeout = "2s"\n',
        )
        env = {**os.environ, "GM_TEST_SECRET": SECRET, "GM_TEST_API_TOKEN": "t"}
        receiver.status = 503
        log = (tmp_path / "d1.log").open("wb")
        first = subprocess.Popen(
            [*CLI, "run", "-c", str(config)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:

            def pending() -> list[Any]:
                out = run_main("alerts", "pending", "-c", str(config), "--json", env=env)
                return json.loads(out.stdout) if out.returncode == 0 else []

            rows = wait_for(
                lambda: [r for r in pending() if r["attempts"] >= 1], what="a failed delivery"
            )
            assert rows[0]["event"]["kind"] == "first_seen"
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
        receiver.status = 200
        second = subprocess.Popen(
            [*CLI, "run", "-c", str(config)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_for(lambda: receiver.bodies(), what="delivery after restart")
            wait_for(lambda: not pending(), what="outbox empty")
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=15) == 0
        kinds = [b["kind"] for b in receiver.bodies()]
        assert kinds == ["first_seen"], kinds


def test_check_delivers_or_says_what_is_left(tmp_path: Path, receiver: Receiver) -> None:
    with SimulatedGenAuth(access_key_id="check-pool", access_key_secret=SECRET) as sim:
        config = write_config(
            tmp_path, sim, extra=f'[[sinks]]\ntype = "webhook"\nurl = "{receiver.url}"\n'
        )
        env = {"GM_TEST_SECRET": SECRET, "GM_TEST_API_TOKEN": "t"}
        receiver.status = 503
        left = run_main("check", "-c", str(config), "--delivery-timeout", "1", env=env)
        assert left.returncode == 0
        assert "1 alert deliveries still pending" in left.stderr
        receiver.status = 200
        data = sim.data
        data["enabled"] = False
        sim.set_data(data)
        sent = run_main("check", "-c", str(config), "--json", env=env)
        assert sent.returncode == 1
        assert json.loads(sent.stdout)["alerts_pending"] == 0
        assert [b["kind"] for b in receiver.bodies()] == ["first_seen", "provider_disabled"]
        assert SECRET not in left.stdout + left.stderr + sent.stdout + sent.stderr


def test_a_payload_the_sink_refuses_is_set_aside_not_blocking(
    tmp_path: Path, receiver: Receiver
) -> None:
    with SimulatedGenAuth(access_key_secret=SECRET) as sim:
        runtime = _runtime(
            f"sqlite:///{tmp_path / 'r.db'}",
            sim,
            tmp_path,
            [{"type": "webhook", "url": receiver.url, "max_backoff": "0.1s"}],
        )
        poller, worker = runtime.pollers["prod"], runtime.delivery
        receiver.status = 400  # this sink refuses the payload itself
        poller.poll()
        assert worker.drain(timeout=5) == 0, "set aside after a few refusals"
        [aside] = runtime_pending_all(runtime)
        assert aside.status == "rejected" and aside.last_error == "HTTP 400"
        receiver.status = 200
        _change(sim, enabled=False)
        poller.poll()
        assert worker.drain(timeout=5) == 0
        assert [b["kind"] for b in receiver.bodies()] == ["provider_disabled"], "not blocked"
        from monitor.storage.outbox import Outbox
        from monitor.timeutil import utc_now

        assert Outbox(runtime.store.engine).retry_now(utc_now()) == 1
        assert worker.drain(timeout=5) == 0
        assert [b["kind"] for b in receiver.bodies()] == ["provider_disabled", "first_seen"]
        runtime.store.engine.dispose()


def runtime_pending_all(runtime: Runtime) -> Any:
    from monitor.storage.outbox import Outbox

    return Outbox(runtime.store.engine).pending(rejected=True)


def test_repeat_interval_resends_a_still_firing_critical_alert(
    tmp_path: Path, receiver: Receiver
) -> None:
    from tests.conftest import FakeClock

    clock = FakeClock()
    with SimulatedGenAuth(access_key_secret=SECRET) as sim:
        settings = runtime_settings(
            f"sqlite:///{tmp_path / 'rep.db'}",
            sim,
            tmp_path,
            attribution=False,  # delivery alone, as in _runtime
            sinks=[
                {
                    "type": "webhook",
                    "url": receiver.url,
                    "min_severity": "critical",
                    "repeat_interval": "1h",
                }
            ],
        )
        runtime = build_runtime(settings, clock=clock)
        poller, worker = runtime.pollers["prod"], runtime.delivery
        _change(sim, enabled=False)
        poller.poll()
        worker.drain(timeout=5)
        clock.advance(1800)
        worker.sync_now()  # half an hour: not yet
        worker.drain(timeout=5)
        assert [b["kind"] for b in receiver.bodies()] == ["provider_disabled"]
        clock.advance(1900)
        worker.sync_now()  # over an hour since the delivery: once more
        worker.drain(timeout=5)
        kinds = [b["kind"] for b in receiver.bodies()]
        assert kinds == ["provider_disabled", "provider_disabled"]
        _change(sim, enabled=True)
        clock.advance(60)
        poller.poll()
        worker.drain(timeout=5)
        clock.advance(7200)
        worker.sync_now()  # resolved: no more repeats
        worker.drain(timeout=5)
        assert [b["kind"] for b in receiver.bodies()] == [
            "provider_disabled",
            "provider_disabled",
            "provider_enabled",
        ]
        runtime.store.engine.dispose()


def test_check_gives_up_on_a_dead_sink_with_a_queue_behind_it(
    tmp_path: Path, receiver: Receiver
) -> None:
    """Newer rows due earlier than the failing head must not make `check` spin forever."""
    import time

    with SimulatedGenAuth(access_key_id="dead-pool", access_key_secret=SECRET) as sim:
        config = write_config(
            tmp_path, sim, extra=f'[[sinks]]\ntype = "webhook"\nurl = "{receiver.url}"\n'
        )
        env = {"GM_TEST_SECRET": SECRET, "GM_TEST_API_TOKEN": "t"}
        receiver.status = 503
        for enabled in (False, True, False):
            data = sim.data
            data["enabled"] = enabled
            sim.set_data(data)
            started = time.monotonic()
            result = run_main("check", "-c", str(config), "--delivery-timeout", "1", env=env)
            assert time.monotonic() - started < 20
            assert "still pending" in result.stderr


def test_polling_that_keeps_failing_is_alerted_and_its_recovery_too(
    db_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    with SimulatedGenAuth(access_key_secret=SECRET) as sim:
        runtime = _runtime(db_url, sim, tmp_path, [{"type": "webhook", "url": receiver.url}])
        poller, worker = runtime.pollers["prod"], runtime.delivery
        poller.poll()
        sim.set_fault("http_502_html")
        for _ in range(3):  # failure_threshold is 2: the second failure raises it, once
            assert not poller.poll().ok
        assert worker.drain(timeout=5) == 0
        assert [b["kind"] for b in receiver.bodies()] == ["first_seen", "poll_failing"]
        failing = receiver.bodies()[1]
        assert (failing["severity"], failing["status"]) == ("warning", "firing")
        assert "http_status" in failing["message"]
        sim.set_fault(None)
        poller.poll()
        assert worker.drain(timeout=5) == 0
        assert [b["kind"] for b in receiver.bodies()][2:] == ["poll_recovered"]
        runtime.store.engine.dispose()


def test_an_ignored_path_does_not_hide_a_change_made_beside_it(
    tmp_path: Path, receiver: Receiver
) -> None:
    with SimulatedGenAuth(access_key_secret=SECRET) as sim:
        runtime = _runtime(
            f"sqlite:///{tmp_path / 'i.db'}",
            sim,
            tmp_path,
            [{"type": "webhook", "url": receiver.url}],
            ignore=["smtpConfig.sender"],
        )
        poller, worker = runtime.pollers["prod"], runtime.delivery
        poller.poll()
        data = sim.data
        data["smtpConfig"]["sender"] = "quiet@example.com"  # ignored alone: recorded, not sent
        sim.set_data(data)
        poller.poll()
        data["smtpConfig"]["sender"] = "reset@attacker.example"  # ignored ...
        data["smtpConfig"]["smtp_host"] = "smtp.attacker.example"  # ... but this is not
        sim.set_data(data)
        [event] = poller.poll().events
        assert event.kind == "delivery_changed" and len(event.changes) == 2
        assert worker.drain(timeout=5) == 0
        kinds = [b["kind"] for b in receiver.bodies()]
        assert kinds == ["first_seen", "delivery_changed"], kinds
        sent = receiver.bodies()[1]["changes"]
        assert {c["path"] for c in sent} == {"smtpConfig.sender", "smtpConfig.smtp_host"}, (
            "sent in full, the ignored change included"
        )
        runtime.store.engine.dispose()


def test_retry_delay_doubles_with_jitter_up_to_the_cap() -> None:
    import random

    from monitor.alerts.worker import retry_delay

    for attempts in range(1, 12):
        step = 2.0 ** (attempts - 1)
        delay = retry_delay(attempts, 1e9, random.Random(attempts))
        assert step / 2 <= delay <= step, (attempts, delay)
        # The same random draw gives exactly twice the delay one attempt later.
        assert retry_delay(attempts + 1, 1e9, random.Random(7)) == 2 * retry_delay(
            attempts, 1e9, random.Random(7)
        )
    for attempts in (10, 40, 10_000):
        assert 300 <= retry_delay(attempts, 600, random.Random(attempts)) <= 600


def test_retries_of_a_failing_sink_back_off_further_each_time(
    tmp_path: Path, receiver: Receiver
) -> None:
    """The delays stored in the outbox (next_attempt_at) grow 1 s, 2 s, 4 s, ... to the cap."""
    from tests.conftest import FakeClock

    clock = FakeClock()
    with SimulatedGenAuth(access_key_secret=SECRET) as sim:
        settings = runtime_settings(
            f"sqlite:///{tmp_path / 'b.db'}",
            sim,
            tmp_path,
            sinks=[{"type": "webhook", "url": receiver.url, "max_backoff": "10s"}],
        )
        runtime = build_runtime(settings, clock=clock)
        receiver.status = 503
        runtime.pollers["prod"].poll()
        delays = []
        for _ in range(6):
            runtime.delivery.run_once()
            [row] = runtime_pending(runtime)
            delays.append((row.next_attempt_at - clock.now).total_seconds())
            clock.now = row.next_attempt_at  # due exactly now: the next round tries it
        assert row.attempts == 6
        bands = [(0.5, 1), (1, 2), (2, 4), (4, 8), (5, 10), (5, 10)]  # the cap is 10 s
        for delay, (low, high) in zip(delays, bands, strict=True):
            assert low - 1e-3 <= delay <= high + 1e-3, delays
        runtime.store.engine.dispose()


@pytest.mark.parametrize("status", [408, 425, 429])
def test_a_sink_asking_to_slow_down_gets_the_alert_later(
    tmp_path: Path, receiver: Receiver, status: int
) -> None:
    """429 (and 408, 425) is "not now", not a refusal: never set aside however often."""
    from monitor.alerts.worker import REJECT_AFTER

    with SimulatedGenAuth(access_key_secret=SECRET) as sim:
        runtime = _runtime(
            f"sqlite:///{tmp_path / 's.db'}",
            sim,
            tmp_path,
            [{"type": "webhook", "url": receiver.url, "max_backoff": "0.1s"}],
        )
        worker = runtime.delivery
        receiver.status = status
        runtime.pollers["prod"].poll()
        # Retried every 0.05 to 0.1 s meanwhile (each attempt takes and gives back the lane:
        # two more small writes, so on a loaded machine give it time for a few).
        assert worker.drain(timeout=2.0) == 1
        [row] = runtime_pending_all(runtime)
        assert row.status == "pending" and row.attempts > REJECT_AFTER, row
        assert row.last_error == f"HTTP {status}"
        receiver.status = 200
        assert worker.drain(timeout=5) == 0
        assert [b["kind"] for b in receiver.bodies()] == ["first_seen"]
        runtime.store.engine.dispose()
