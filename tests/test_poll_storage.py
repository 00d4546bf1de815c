"""The poll path end to end on real databases: client -> redaction -> hash -> rows -> events."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, func, select, text

from monitor.genauth import GenAuthClient
from monitor.metrics import Metrics
from monitor.service import TargetPoller
from monitor.simulator import SimulatedGenAuth
from monitor.storage import Queries, Store, create_store_engine, upgrade
from monitor.storage.schema import events, poll_errors, snapshots
from tests.conftest import FakeClock

KEY = b"test-fingerprint-key"
SMTP_PASS = "Smtp-Pa55word-XYZ"
SENDGRID_KEY = "SG.api-key-ABCDEF"

CONFIG: dict[str, Any] = {
    "enabled": True,
    "type": "custom",
    "smtpConfig": {
        "smtp_host": "smtp.example.com",
        "smtp_port": 465,
        "sender": "noreply@example.com",
        "senderPass": SMTP_PASS,
        "secure": True,
    },
    "sendGridConfig": {"sender": "sg@example.com", "apikey": SENDGRID_KEY},
    "futureField": {"nested": [1, 2, 3]},
}


class Rig:
    def __init__(self, url: str, sim: SimulatedGenAuth, clock: FakeClock, **kw: Any) -> None:
        self.url = url
        self.sim = sim
        self.clock = clock
        self.engine = create_store_engine(url)
        upgrade(self.engine)
        self.store = Store(self.engine)
        self.queries = Queries(self.engine)
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.poller = self.new_poller(**kw)
        self.poller.restore(self.store.ensure_target("prod", now=clock()))

    def new_poller(self, expect: dict[str, Any] | None = None, threshold: int = 3) -> TargetPoller:
        client = GenAuthClient(
            base_url=self.sim.base_url,
            access_key_id=self.sim.access_key_id,
            access_key_secret=self.sim.access_key_secret,
            timeout=2.0,
        )
        return TargetPoller(
            name="prod",
            fetcher=client,
            store=self.store,
            metrics=self.metrics,
            fingerprint_key=KEY,
            expect=expect or {},
            failure_threshold=threshold,
            clock=self.clock,
        )

    def poll(self) -> Any:
        self.clock.advance(60)
        return self.poller.poll()

    def count(self, table: Any) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(table)).scalar_one())

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, {"target": "prod", **labels})


@pytest.fixture
def rig(db_url: str, simulator: SimulatedGenAuth, clock: FakeClock) -> Iterator[Rig]:
    simulator.set_data(copy.deepcopy(CONFIG))
    made = Rig(db_url, simulator, clock, expect={"enabled": True, "type": "custom"})
    yield made
    made.engine.dispose()


def _set(sim: SimulatedGenAuth, path: str, value: Any) -> None:
    data = sim.data
    node = data
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value
    sim.set_data(data)


def test_unchanged_config_costs_no_rows(rig: Rig) -> None:
    first = rig.poll()
    assert first.ok and first.stored
    assert [e.kind for e in first.events] == ["first_seen"]
    for _ in range(5):
        again = rig.poll()
        assert again.ok and again.events == [] and again.hash == first.hash
    assert rig.count(snapshots) == 1
    assert rig.count(events) == 1
    [snap] = rig.queries.snapshots(target="prod")
    assert snap.seen_count == 6
    assert snap.last_seen_at == rig.clock.now
    assert snap.first_seen_at < snap.last_seen_at
    assert snap.document["futureField"] == {"nested": [1, 2, 3]}, "unknown fields are kept"
    assert rig.sample("genauth_monitor_polls_total", outcome="success") == 6
    assert rig.sample("genauth_email_provider_enabled") == 1


def test_changes_become_snapshots_and_events(rig: Rig) -> None:
    first = rig.poll()
    _set(rig.sim, "smtpConfig.smtp_host", "smtp.attacker.example")
    moved = rig.poll()
    assert [e.kind for e in moved.events] == ["delivery_changed"]
    assert [c.as_dict() for c in moved.events[0].changes] == [
        {"path": "smtpConfig.smtp_host", "old": "smtp.example.com", "new": "smtp.attacker.example"}
    ]
    _set(rig.sim, "smtpConfig.senderPass", "rotated-password-1")
    assert [e.kind for e in rig.poll().events] == ["secret_rotated"]
    _set(rig.sim, "enabled", False)
    disabled = rig.poll()
    assert [e.kind for e in disabled.events] == ["provider_disabled", "baseline_drift"]
    assert rig.sample("genauth_email_provider_enabled") == 0
    assert rig.sample("genauth_email_provider_drift") == 1
    _set(rig.sim, "enabled", True)
    assert [e.kind for e in rig.poll().events] == ["provider_enabled", "baseline_restored"]
    assert rig.count(snapshots) == 5

    history = rig.queries.events(target="prod")
    assert [e.kind for e in history] == [
        "baseline_restored",
        "provider_enabled",
        "baseline_drift",
        "provider_disabled",
        "secret_rotated",
        "delivery_changed",
        "first_seen",
    ]
    delivery = history[-2]
    assert delivery.previous == first.hash and delivery.snapshot == moved.hash
    assert rig.sample("genauth_email_provider_changes_total", kind="delivery_changed") == 1
    info = next(
        s for s in rig.registry.collect() if s.name == "genauth_email_provider_info"
    ).samples
    assert len(info) == 1, "only the current type/hash series remains"


def test_a_config_that_returns_makes_a_new_row(rig: Rig) -> None:
    original = rig.poll()
    _set(rig.sim, "smtpConfig.smtp_port", 587)
    rig.poll()
    _set(rig.sim, "smtpConfig.smtp_port", 465)
    back = rig.poll()
    assert back.hash == original.hash
    assert rig.count(snapshots) == 3
    rows = rig.queries.snapshots(target="prod")
    assert rig.queries.at("prod", rows[0].first_seen_at).hash == original.hash  # type: ignore[union-attr]
    assert rig.queries.at("prod", rows[1].first_seen_at).id == rows[1].id  # type: ignore[union-attr]


def test_failures_are_recorded_counted_and_raise_one_alert(rig: Rig) -> None:
    good = rig.poll()
    rig.sim.set_fault("http_502_html")
    for _ in range(5):
        failed = rig.poll()
        assert not failed.ok and failed.error is not None
        assert failed.error.reason == "http_status" and failed.error.http_status == 502
    assert [e.kind for e in rig.queries.events(target="prod", kinds=("poll_failing",))] == [
        "poll_failing"
    ]
    assert rig.count(snapshots) == 1, "a failed poll never changes the current snapshot"
    assert rig.count(poll_errors) == 1, "a run of identical failures is one row"
    [state] = rig.queries.targets()
    assert state.hash == good.hash and state.up is False and state.consecutive_failures == 5
    assert state.last_error is not None and state.last_error["http_status"] == 502
    assert rig.sample("genauth_monitor_up") == 0
    assert rig.sample("genauth_monitor_polls_total", outcome="http_status") == 5
    rig.sim.set_fault(None)
    recovered = rig.poll()
    assert [e.kind for e in recovered.events] == ["poll_recovered"]
    assert rig.sample("genauth_monitor_up") == 1
    with rig.engine.connect() as connection:
        count = connection.execute(select(poll_errors.c.count)).scalar_one()
    assert count == 5


def test_body_error_and_bad_shapes_are_classified(rig: Rig) -> None:
    rig.poll()
    for fault, reason in [
        ("status_500_body", "api_error"),
        ("non_json", "invalid_response"),
        ("missing_data", "invalid_response"),
        ("wrong_types", "invalid_response"),
    ]:
        rig.sim.set_fault(fault)
        result = rig.poll()
        assert result.error is not None and result.error.reason == reason, fault
    assert rig.count(poll_errors) == 4
    assert rig.count(snapshots) == 1


def test_state_and_gauges_come_back_after_restart(rig: Rig) -> None:
    rig.poll()
    _set(rig.sim, "type", "sendgrid")
    changed = rig.poll()
    fresh = Rig(rig.url, rig.sim, rig.clock, expect={"type": "custom"})
    assert fresh.sample("genauth_email_provider_drift") == 1
    assert (
        fresh.sample("genauth_email_provider_info", type="sendgrid", hash=changed.hash[7:19]) == 1
    )
    assert fresh.sample("genauth_monitor_up") == 1
    assert fresh.sample("genauth_email_provider_last_change_timestamp_seconds") == (
        rig.clock.now.timestamp()
    )
    # A kind's series appears when it first happens (few series per target); the shipped
    # rules alert on a series that appears as well as on an increase (rules.test.yml).
    assert fresh.sample("genauth_email_provider_changes_total", kind="type_changed") is None
    assert fresh.sample("genauth_monitor_polls_total", outcome="success") == 0
    again = fresh.poll()
    assert again.events == [], "the restarted monitor does not re-announce the same state"
    fresh.engine.dispose()


def test_no_secret_reaches_the_database(rig: Rig) -> None:
    rig.poll()
    _set(rig.sim, "smtpConfig.senderPass", "Second-Secret-Pass")
    rig.poll()
    rig.sim.set_fault("status_500_body")
    rig.poll()
    with rig.engine.connect() as connection:
        dump = []
        for table in ("snapshots", "events", "poll_state", "poll_errors", "targets"):
            dump += [
                json.dumps([str(v) for v in row])
                for row in connection.execute(text(f"SELECT * FROM {table}"))
            ]
    blob = "\n".join(dump)
    for secret in (SMTP_PASS, SENDGRID_KEY, "Second-Secret-Pass", rig.sim.access_key_secret):
        assert secret not in blob
    assert "hmac-sha256:" in blob


@contextmanager
def _database_outage(engine: Any) -> Iterator[None]:
    """The rig's PostgreSQL database refuses connections (existing ones are cut) inside."""
    name = engine.url.database
    admin = create_engine(engine.url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
        connection.execute(
            text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
        )
    try:
        yield
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()


def test_database_outage_loses_nothing(
    postgres_url: str, simulator: SimulatedGenAuth, clock: FakeClock
) -> None:
    simulator.set_data(copy.deepcopy(CONFIG))
    rig = Rig(postgres_url, simulator, clock)
    rig.poll()
    with _database_outage(rig.engine):
        _set(simulator, "smtpConfig.smtp_host", "smtp.during-outage.example")
        during = rig.poll()
        assert during.ok and not during.stored
        assert rig.sample("genauth_email_provider_enabled") == 1
        assert not rig.store.ping()
        _set(simulator, "enabled", False)
        assert not rig.poll().stored
    after = rig.poll()
    assert after.stored
    kinds = [e.kind for e in rig.queries.events(target="prod")]
    assert kinds[:2] == ["provider_disabled", "delivery_changed"], kinds
    assert rig.count(snapshots) == 3
    rig.engine.dispose()


def test_a_number_turning_into_a_bool_is_a_change(rig: Rig) -> None:
    _set(rig.sim, "futureField", 1)
    one = rig.poll()
    _set(rig.sim, "futureField", True)  # equal to 1 in Python, a different JSON document
    changed = rig.poll()
    assert changed.hash != one.hash
    assert [e.kind for e in changed.events] == ["config_changed"]


def test_answers_that_cannot_be_canonicalised_are_failures(rig: Rig) -> None:
    import sys

    rig.poll()
    deep: Any = "x"
    for _ in range(1500):
        deep = {"d": deep}
    for odd in ("\ud800", deep):
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(20_000)  # only so the simulator can take the document
        try:
            data = rig.sim.data
            data["futureField"] = odd
            rig.sim.set_data(data)
        finally:
            sys.setrecursionlimit(limit)
        result = rig.poll()
        assert not result.ok and result.error is not None, repr(odd)[:40]
        assert result.error.reason == "invalid_response"
    assert rig.sample("genauth_monitor_up") == 0
    assert rig.sample("genauth_monitor_polls_total", outcome="invalid_response") == 2


def test_odd_upstream_strings_never_wedge_recording(rig: Rig) -> None:
    rig.poll()
    _set(rig.sim, "type", "x" * 65 + "\x00")
    odd = rig.poll()
    assert odd.stored and [e.kind for e in odd.events] == ["type_changed", "baseline_drift"]
    _set(rig.sim, "enabled", False)
    assert [e.kind for e in rig.poll().events] == ["provider_disabled"]
    [current] = rig.queries.targets()
    assert current.enabled is False and len(current.provider_type or "") == 64


def test_a_baseline_on_a_secret_path_compares_fingerprints(
    db_url: str, simulator: SimulatedGenAuth, clock: FakeClock
) -> None:
    simulator.set_data(copy.deepcopy(CONFIG))
    rig = Rig(db_url, simulator, clock, expect={"smtpConfig.senderPass": SMTP_PASS})
    assert [e.kind for e in rig.poll().events] == ["first_seen"], "the right password: no drift"
    _set(simulator, "smtpConfig.senderPass", "Another-Pass")
    drifted = rig.poll()
    assert [e.kind for e in drifted.events] == ["secret_rotated", "baseline_drift"]
    with rig.engine.connect() as connection:
        rows = " ".join(str(r) for r in connection.execute(text("SELECT changes FROM events")))
    assert SMTP_PASS not in rows and "Another-Pass" not in rows
    rig.engine.dispose()


def test_a_second_writer_never_leaves_the_first_one_stale(rig: Rig) -> None:
    """`check` beside the daemon: two pollers, two processes' worth of cached state."""
    rig.poll()  # the daemon
    check = rig.new_poller(expect={"enabled": True, "type": "custom"})
    check.restore(rig.store.ensure_target("prod", now=rig.clock()))
    _set(rig.sim, "enabled", False)
    rig.clock.advance(60)
    assert [e.kind for e in check.poll().events] == ["provider_disabled", "baseline_drift"]
    _set(rig.sim, "enabled", True)
    back = rig.poll()  # the daemon still believes the first snapshot is current
    assert [e.kind for e in back.events] == ["provider_enabled", "baseline_restored"]
    [state] = rig.queries.targets()
    assert state.enabled is True and state.hash == back.hash and state.drift is False
    again = rig.poll()
    assert again.events == []
    assert rig.count(snapshots) == 3


def test_a_new_baseline_after_a_restart_is_judged_at_once(rig: Rig) -> None:
    rig.poll()  # expect enabled/custom: matches
    stricter = Rig(rig.url, rig.sim, rig.clock, expect={"smtpConfig.smtp_port": 587})
    drifted = stricter.poll()
    assert [e.kind for e in drifted.events] == ["baseline_drift"]
    assert stricter.queries.targets()[0].drift is True
    fixed = Rig(rig.url, rig.sim, rig.clock, expect={"smtpConfig.smtp_port": 465})
    restored = fixed.poll()
    assert [e.kind for e in restored.events] == ["baseline_restored"]
    assert fixed.queries.targets()[0].drift is False
    assert rig.count(snapshots) == 1, "the configuration itself never changed"
    stricter.engine.dispose()
    fixed.engine.dispose()


def test_a_change_during_a_database_outage_keeps_its_own_time(
    postgres_url: str, simulator: SimulatedGenAuth, clock: FakeClock
) -> None:
    simulator.set_data(copy.deepcopy(CONFIG))
    rig = Rig(postgres_url, simulator, clock)
    rig.poll()
    with _database_outage(rig.engine):
        _set(simulator, "enabled", False)
        changed_at = rig.clock.now + timedelta(seconds=60)
        for _ in range(5):
            assert not rig.poll().stored
        last_at = rig.clock.now
    rig.poll()
    newest = rig.queries.snapshots(target="prod")[0]
    assert newest.first_seen_at == changed_at, "dated when first seen, not when written"
    assert newest.seen_count == 6 and newest.last_seen_at == rig.clock.now > last_at
    [disabled] = rig.queries.events(target="prod", kinds=("provider_disabled",))
    assert disabled.at == changed_at
    assert rig.queries.at("prod", changed_at + timedelta(seconds=1)).enabled is False  # type: ignore[union-attr]
    rig.engine.dispose()


def test_a_success_ends_a_run_of_failures(rig: Rig) -> None:
    rig.poll()
    for _ in range(2):
        rig.sim.set_fault("http_502_html")
        rig.poll()
        rig.poll()
        rig.sim.set_fault(None)
        rig.poll()
    with rig.engine.connect() as connection:
        counts = connection.execute(select(poll_errors.c.count).order_by(poll_errors.c.id))
        assert list(counts.scalars()) == [2, 2]


def test_a_new_baseline_keeps_the_audit_chain_intact(rig: Rig) -> None:
    from monitor.storage.chain import verify_chain

    rig.poll()
    stricter = Rig(rig.url, rig.sim, rig.clock, expect={"smtpConfig.smtp_port": 587})
    assert [e.kind for e in stricter.poll().events] == ["baseline_drift"]
    report = verify_chain(rig.engine)
    assert report.intact, report.describe()
    stricter.engine.dispose()


def test_the_key_of_an_answer_tells_types_and_values_apart() -> None:
    # It stands in for the previous raw answer: equal keys must mean the same JSON exactly.
    from monitor.service import _answer_key

    base = {"enabled": True, "smtpConfig": {"port": 465, "host": "smtp.example"}}
    assert _answer_key(base) == _answer_key(json.loads(json.dumps(base)))
    for value in (1, 1.0, "true", None, [True], {"x": True}):
        assert _answer_key({**base, "enabled": value}) != _answer_key(base)
    assert _answer_key({"a": 1, "b": 2}) != _answer_key({"a": 2, "b": 1})
    assert _answer_key({"a": "\ud800"}) != _answer_key({"a": "\ud801"})  # lone surrogates
