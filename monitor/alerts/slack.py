"""The ``slack`` sink: a readable incoming-webhook message (target, what changed, severity).

Every string of the event that may come from upstream (message, paths, values, kind, ...) is
escaped for mrkdwn: control characters as visible escapes (:mod:`monitor.core.escape`), then
``&``, ``<``, ``>`` as ``&amp;``, ``&lt;``, ``&gt;`` (Slack's rule), so no ``<!channel>``
mention and no ``<url|label>`` link can be formed. Upstream text is only ever put inside a
code span, where Slack applies no formatting (and, as far as we know, links no bare URL); a
backtick in it, which would close the span, becomes U+02CB MODIFIER LETTER GRAVE ACCENT.
"""

from __future__ import annotations

import json
from typing import Any, Final

import requests

from monitor.alerts.transport import post
from monitor.core.attribution import describe
from monitor.core.escape import escape_text
from monitor.storage.queries import EventView
from monitor.timeutil import format_time

__all__ = ["SlackSink", "mrkdwn_escape", "slack_message"]

_ICONS: Final = {
    "critical": ":rotating_light:",
    "warning": ":warning:",
    "info": ":information_source:",
}
_MAX_CHANGES = 10


_BACKTICK_STANDIN: Final = "\u02cb"  # MODIFIER LETTER GRAVE ACCENT: a look-alike


def mrkdwn_escape(text: str) -> str:
    """``text`` safe as mrkdwn: one line, no control character, no ``<``, ``>`` or ``&``."""
    return escape_text(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _code(text: str) -> str:
    """``text`` as an inline code span that nothing in it can close."""
    return f"`{mrkdwn_escape(text).replace('`', _BACKTICK_STANDIN)}`"


def _value(value: Any) -> str:
    return "(absent)" if value is None else _code(json.dumps(value, ensure_ascii=False))


def slack_message(event: EventView) -> dict[str, Any]:
    icon = ":white_check_mark:" if event.status == "resolved" else _ICONS[event.severity]
    severity = mrkdwn_escape(event.severity.upper())
    title = f"{icon} *{severity}* {_code(event.kind)} on *{mrkdwn_escape(event.target)}*"
    if event.follow_up:
        title += " (follow-up: who made it)"
    lines = [
        f"• {_code(str(c['path']))}: {_value(c['old'])} → {_value(c['new'])}"
        for c in event.changes[:_MAX_CHANGES]
    ]
    if len(event.changes) > _MAX_CHANGES:
        lines.append(f"• … and {len(event.changes) - _MAX_CHANGES} more")
    snapshot = mrkdwn_escape((event.snapshot or "-")[:19])
    footer = f"{format_time(event.at)} · snapshot {snapshot}"
    # The message quotes upstream paths and values: a code span, so it cannot even auto-link.
    # Who made it (SPEC §11): admin names and IPs are upstream text, so a code span too.
    who = describe(event.kind, event.attribution, event.actors)
    attribution = [] if who is None else [f"• who: {_code(who)}"]
    text = "\n".join([title, _code(event.message), *attribution, *lines, footer])
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
