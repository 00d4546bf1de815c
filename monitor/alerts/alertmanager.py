"""The ``alertmanager`` sink: Alertmanager's v2 API, with its client rules.

Alertmanager forgets an alert ``resolve_timeout`` after its last post unless it carries an
``endsAt``; clients therefore re-post firing alerts periodically (``sync``), which also restores
them after an Alertmanager restart. A resolving event posts the firing alert's labels with an
``endsAt``. One-off notices (type changed, delivery changed, ...) are posted with an ``endsAt``
one ``notice_window`` later, so they show for a while and then resolve by themselves.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import requests

from monitor.alerts.transport import post
from monitor.core.alerting import ALERTNAMES, FAMILIES, FAMILY_SEVERITY, RESOLVES, firing_kind
from monitor.core.attribution import describe
from monitor.core.escape import escape_text
from monitor.storage.queries import EventView
from monitor.timeutil import format_time

__all__ = ["AlertmanagerSink", "alert_for"]

NOTICE_WINDOW = timedelta(hours=1)


def alert_for(event: EventView, *, notice_window: timedelta = NOTICE_WINDOW) -> dict[str, Any]:
    """The Alertmanager alert an event stands for (same labels for firing and resolving)."""
    kind = firing_kind(event.kind)
    severity = FAMILY_SEVERITY.get(kind, event.severity)
    changes = "; ".join(
        f"{c['path']}: {json.dumps(c['old'])} -> {json.dumps(c['new'])}" for c in event.changes
    )
    alert: dict[str, Any] = {
        "labels": {
            "alertname": ALERTNAMES[kind],
            "target": event.target,
            "severity": severity,
            "kind": kind,
        },
        "annotations": {
            "summary": event.message,
            "description": changes or event.message,
            "snapshot": event.snapshot or "",
            # The event's id: an annotation, never a label (the labels of an alert and of
            # its resolution must be equal, and each event has its own id).
            "event_id": event.id,
        },
        "startsAt": format_time(event.at),
    }
    who = describe(event.kind, event.attribution, event.actors)
    if who is not None:
        # SPEC §11: re-posts carry the actors once known (upstream text, escaped to one line).
        alert["annotations"]["attribution"] = event.attribution or ""
        alert["annotations"]["actors"] = escape_text(who)
    if event.kind in RESOLVES:
        alert["endsAt"] = format_time(event.at)
    elif event.kind not in FAMILIES:
        alert["endsAt"] = format_time(event.at + notice_window)
    return alert


class AlertmanagerSink:
    def __init__(self, *, name: str, url: str, session: requests.Session, timeout: float) -> None:
        self.name = name
        self._url = url.rstrip("/") + "/api/v2/alerts"
        self._session = session
        self._timeout = timeout

    def send(self, event: EventView) -> None:
        self._post([alert_for(event)])

    def sync(self, firing: Sequence[EventView]) -> None:
        """Re-post every alert still in force (keeps them alive, restores them after restarts)."""
        if firing:
            self._post([alert_for(event) for event in firing])

    def _post(self, alerts: list[dict[str, Any]]) -> None:
        post(self._session, self._url, json.dumps(alerts).encode(), timeout=self._timeout)
