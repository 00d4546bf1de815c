"""Every row of the SPEC §4 table of event kinds, produced by the real rules.

The expected values are a literal copy of the SPEC table written here on purpose: a test that
read them from ``monitor.core.kinds`` would agree with any change made there.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from monitor.alerts.alertmanager import alert_for
from monitor.core import (
    EVENT_KINDS,
    EventDraft,
    baseline_events,
    failure_events,
    fingerprint,
    recovery_events,
    redact,
    snapshot_events,
)
from monitor.core.alerting import SinkRoute
from monitor.storage.queries import EventView

# SPEC §4: kind -> (severity, status). first_seen is not in the SPEC table: info/firing is the
# project's choice (docs/alerts.md, docs/design.md).
SPEC_TABLE: dict[str, tuple[str, str]] = {
    "first_seen": ("info", "firing"),
    "provider_disabled": ("critical", "firing"),
    "provider_enabled": ("info", "resolved"),
    "type_changed": ("critical", "firing"),
    "delivery_changed": ("warning", "firing"),
    "secret_rotated": ("info", "firing"),
    "config_changed": ("info", "firing"),
    "baseline_drift": ("critical", "firing"),
    "baseline_restored": ("info", "resolved"),
    "poll_failing": ("warning", "firing"),
    "poll_recovered": ("info", "resolved"),
}

# The Alertmanager labels each kind posts: (alertname, kind label, severity label). A resolving
# kind posts its family's labels, so Alertmanager ends the very alert that fired.
ALERT_LABELS: dict[str, tuple[str, str, str]] = {
    "first_seen": ("GenAuthEmailProviderFirstSeen", "first_seen", "info"),
    "provider_disabled": ("GenAuthEmailProviderDisabled", "provider_disabled", "critical"),
    "provider_enabled": ("GenAuthEmailProviderDisabled", "provider_disabled", "critical"),
    "type_changed": ("GenAuthEmailProviderTypeChanged", "type_changed", "critical"),
    "delivery_changed": ("GenAuthEmailProviderDeliveryChanged", "delivery_changed", "warning"),
    "secret_rotated": ("GenAuthEmailProviderSecretRotated", "secret_rotated", "info"),
    "config_changed": ("GenAuthEmailProviderConfigChanged", "config_changed", "info"),
    "baseline_drift": ("GenAuthEmailProviderBaselineDrift", "baseline_drift", "critical"),
    "baseline_restored": ("GenAuthEmailProviderBaselineDrift", "baseline_drift", "critical"),
    "poll_failing": ("GenAuthMonitorPollFailing", "poll_failing", "warning"),
    "poll_recovered": ("GenAuthMonitorPollFailing", "poll_failing", "warning"),
}
# resolving kind -> the firing kind it ends (SPEC §4 "resolved (ends ...)")
ENDS: dict[str, str] = {
    "provider_enabled": "provider_disabled",
    "baseline_restored": "baseline_drift",
    "poll_recovered": "poll_failing",
}

KEY = b"k" * 32
DOC: dict[str, Any] = redact(
    {
        "enabled": True,
        "type": "custom",
        "smtpConfig": {
            "smtp_host": "smtp.example.com",
            "smtp_port": 465,
            "sender": "noreply@example.com",
            "senderPass": "hunter2-smtp",
            "secure": True,
        },
        "sendGridConfig": {"sender": "sg", "apikey": "SG.secret-key"},
    },
    KEY,
)
AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _with(**fields: Any) -> dict[str, Any]:
    """DOC with ``a__b=value`` set at path ``a.b``."""
    doc = copy.deepcopy(DOC)
    for path, value in fields.items():
        node = doc
        *parents, leaf = path.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return doc


def _after(previous: dict[str, Any] | None, current: dict[str, Any]) -> list[EventDraft]:
    return snapshot_events(
        target="prod", previous=previous, current=current, expect={}, was_drifting=False
    )


# How to make the real rules raise each kind: a poll outcome the kind is for.
PRODUCERS: dict[str, Callable[[], list[EventDraft]]] = {
    "first_seen": lambda: _after(None, DOC),
    "provider_disabled": lambda: _after(DOC, _with(enabled=False)),
    "provider_enabled": lambda: _after(_with(enabled=False), DOC),
    "type_changed": lambda: _after(DOC, _with(type="sendgrid")),
    "delivery_changed": lambda: _after(DOC, _with(smtpConfig__smtp_host="smtp.evil.example")),
    "secret_rotated": lambda: _after(DOC, _with(smtpConfig__senderPass=fingerprint(KEY, "new"))),
    "config_changed": lambda: _after(DOC, _with(sendGridConfig__sender="other")),
    "baseline_drift": lambda: baseline_events(
        target="prod", current=DOC, expect={"type": "ali"}, was_drifting=False
    ),
    "baseline_restored": lambda: baseline_events(
        target="prod", current=DOC, expect={"type": "custom"}, was_drifting=True
    ),
    "poll_failing": lambda: failure_events(target="prod", failures=3, threshold=3, reason="auth"),
    "poll_recovered": lambda: recovery_events(target="prod", failures_before=3, threshold=3),
}


def _produce(kind: str) -> EventDraft:
    [event] = [event for event in PRODUCERS[kind]() if event.kind == kind]
    return event


def _view(event: EventDraft) -> EventView:
    return EventView(
        row_id=1,
        id="3c2b1a09-0000-4000-8000-000000000001",
        target="prod",
        kind=event.kind,
        severity=event.severity,
        status=event.status,
        at=AT,
        snapshot=None,
        previous=None,
        changes=[change.as_dict() for change in event.changes],
        message=event.message,
    )


def test_the_code_knows_exactly_the_kinds_of_the_spec() -> None:
    assert set(EVENT_KINDS) == set(SPEC_TABLE) == set(PRODUCERS)
    assert len(EVENT_KINDS) == len(set(EVENT_KINDS))


@pytest.mark.parametrize("kind", sorted(SPEC_TABLE))
def test_each_kind_has_the_severity_and_status_of_the_spec(kind: str) -> None:
    event = _produce(kind)
    assert (event.severity, event.status) == SPEC_TABLE[kind]


@pytest.mark.parametrize("kind", sorted(ALERT_LABELS))
def test_each_kind_posts_its_family_alert_to_alertmanager(kind: str) -> None:
    alert = alert_for(_view(_produce(kind)))
    alertname, label_kind, severity = ALERT_LABELS[kind]
    assert alert["labels"] == {
        "alertname": alertname,
        "target": "prod",
        "severity": severity,
        "kind": label_kind,
    }
    assert alert["startsAt"] == "2026-03-01T12:00:00Z"
    if kind in ENDS:  # a resolution ends the alert now
        assert alert["endsAt"] == alert["startsAt"]
    elif kind in ENDS.values():  # a family alert stays open until resolved
        assert "endsAt" not in alert
    else:  # a one-off notice shows for an hour
        assert alert["endsAt"] == "2026-03-01T13:00:00Z"


@pytest.mark.parametrize("resolving", sorted(ENDS))
def test_a_resolution_goes_wherever_its_alert_went(resolving: str) -> None:
    firing = ENDS[resolving]
    severity = SPEC_TABLE[firing][0]
    resolution = _produce(resolving)
    for route in (SinkRoute("by-kind", kinds=(firing,)), SinkRoute("by-sev", severity)):
        assert route.accepts(firing, severity)
        assert route.accepts(resolution.kind, resolution.severity), (route, resolving)
    above = {"warning": "critical", "critical": None}.get(severity)
    if above is not None:  # a sink that never got the alert does not get its end either
        assert not SinkRoute("above", above).accepts(resolution.kind, resolution.severity)


def test_the_docs_table_matches_the_code() -> None:
    """docs/alerts.md shows the kinds table; it must say what the code does."""
    from monitor.core import KINDS
    from monitor.core.kinds import FAMILIES, FAMILY_SEVERITY

    text = (Path(__file__).parent.parent / "docs" / "alerts.md").read_text()
    rows = re.findall(
        r"^\| `(\w+)` \| .* \| (\w+) \| (\w+) \| `(\w+)` \|$",
        text.split("## Event kinds", 1)[1].split("\n## ", 1)[0],
        flags=re.MULTILINE,
    )
    documented = {name: (severity, status, alertname) for name, severity, status, alertname in rows}
    assert documented == {k.name: (k.severity, k.status, k.alertname) for k in KINDS}
    families = re.findall(
        r"^\| `(\w+)` \| `(\w+)` \| (\w+) \|$",
        text.split("## Alert families and lifecycle", 1)[1].split("\n## ", 1)[0],
        flags=re.MULTILINE,
    )
    assert {firing: (resolving, severity) for firing, resolving, severity in families} == {
        firing: (resolving, FAMILY_SEVERITY[firing]) for firing, resolving in FAMILIES.items()
    }
