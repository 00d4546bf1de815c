"""The ``slack`` sink: a readable incoming-webhook message (target, what changed, severity)."""

from __future__ import annotations

import json
from typing import Any, Final

import requests

from monitor.alerts.transport import post
from monitor.storage.queries import EventView
from monitor.timeutil import format_time

__all__ = ["SlackSink", "slack_message"]

_ICONS: Final = {
    "critical": ":rotating_light:",
    "warning": ":warning:",
    "info": ":information_source:",
}
_MAX_CHANGES = 10


def _value(value: Any) -> str:
    return "(absent)" if value is None else f"`{json.dumps(value, ensure_ascii=False)}`"


def slack_message(event: EventView) -> dict[str, Any]:
    icon = ":white_check_mark:" if event.status == "resolved" else _ICONS[event.severity]
    title = f"{icon} *{event.severity.upper()}* `{event.kind}` on *{event.target}*"
    lines = [
        f"• `{c['path']}`: {_value(c['old'])} → {_value(c['new'])}"
        for c in event.changes[:_MAX_CHANGES]
    ]
    if len(event.changes) > _MAX_CHANGES:
        lines.append(f"• … and {len(event.changes) - _MAX_CHANGES} more")
    footer = f"{format_time(event.at)} · snapshot {(event.snapshot or '-')[:19]}"
    text = "\n".join([title, event.message, *lines, footer])
    return {"text": text, "mrkdwn": True}


class SlackSink:
    def __init__(self, *, name: str, url: str, session: requests.Session, timeout: float) -> None:
        self.name = name
        self._url = url
        self._session = session
        self._timeout = timeout

    def send(self, event: EventView) -> None:
        body = json.dumps(slack_message(event), ensure_ascii=False).encode()
        post(self._session, self._url, body, timeout=self._timeout)
