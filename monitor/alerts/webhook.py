"""The ``webhook`` sink: the event JSON, signed with HMAC-SHA256 when a secret is set."""

from __future__ import annotations

import hashlib
import hmac
import json

import requests

from monitor.alerts.transport import post
from monitor.storage.queries import EventView
from monitor.views import EventOut, to_json

__all__ = ["SIGNATURE_HEADER", "WebhookSink", "sign"]

SIGNATURE_HEADER = "X-GenAuth-Monitor-Signature"


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class WebhookSink:
    def __init__(
        self,
        *,
        name: str,
        url: str,
        session: requests.Session,
        timeout: float,
        secret: str | None = None,
    ) -> None:
        self.name = name
        self._url = url
        self._session = session
        self._timeout = timeout
        self._secret = secret.encode() if secret is not None else None

    def send(self, event: EventView) -> None:
        payload = to_json(EventOut.of(event))
        if event.follow_up:
            # SPEC §4: the same event (same id) again, once its attribution settled.
            payload["follow_up"] = True
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        headers = {"X-GenAuth-Monitor-Event": event.kind}
        if event.follow_up:
            headers["X-GenAuth-Monitor-Follow-Up"] = "true"
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = sign(self._secret, body)
        post(self._session, self._url, body, timeout=self._timeout, headers=headers)
