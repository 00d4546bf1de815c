"""The state of one simulated user pool: credentials, the configuration served, tokens, the
injectable clock, and per endpoint its request counters and the fault set on it.

Everything here is guarded by one lock: the server's event loop reads it for every request
while a test or the demo changes it from another thread. Nothing here knows HTTP; per-endpoint
state is keyed by :class:`~monitor.simulator.wire.Endpoint`, so a new endpoint needs no new
fields here, only what it serves.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from monitor.simulator.audit import AuditLog
from monitor.simulator.faults import Fault
from monitor.simulator.wire import Endpoint, dumps, success_body

__all__ = ["DEFAULT_DATA", "Clock", "PoolState"]

#: Seconds since the epoch, like ``time.time`` (the default).
Clock = Callable[[], float]

DEFAULT_DATA: Final[dict[str, Any]] = {
    "enabled": True,
    "type": "custom",
    "smtpConfig": {
        "smtp_host": "smtp.example.com",
        "smtp_port": 465,
        "sender": "noreply@example.com",
        "senderPass": "demo-smtp-passw0rd-1",
        "secure": True,
    },
    "sendGridConfig": {"sender": "noreply@example.com", "apikey": "SG.demo-sendgrid-key-1"},
    "aliExmailConfig": {"sender": "noreply@example.cn", "senderPass": "demo-ali-passw0rd"},
    "tencentExmailConfig": {"sender": "noreply@example.cn", "senderPass": "demo-qq-passw0rd"},
}

# Expired tokens are dropped once this many are kept, so a long benchmark does not grow it.
_MAX_TOKENS: Final = 1000
_JWT_HEADER: Final = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")


def _b64url(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


@dataclass
class _Armed:
    fault: Fault
    remaining: int | None


class PoolState:
    """One user pool as the simulated API sees it."""

    def __init__(
        self,
        *,
        access_key_id: str,
        access_key_secret: str,
        userpool_id: str | None = None,
        token_ttl: int = 7200,
        data: Mapping[str, Any] | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.access_key_id = access_key_id
        self.access_key_secret = access_key_secret
        self.userpool_id = userpool_id if userpool_id is not None else access_key_id
        self.token_ttl = token_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._signing_key = secrets.token_bytes(32)
        self._tokens: dict[str, float] = {}
        self._requests: Counter[Endpoint] = Counter()
        self._last_headers: dict[Endpoint, dict[str, str]] = {}
        self._faults: dict[Endpoint, _Armed] = {}
        self._data: dict[str, Any] = {}
        self._body = b""
        #: The admin audit log (get-admin-audit-logs), on this pool's clock.
        self.audit = AuditLog(clock)
        self.set_data(DEFAULT_DATA if data is None else data)

    # -- the configuration served ---------------------------------------------------------

    @property
    def data(self) -> dict[str, Any]:
        """A deep copy of the configuration currently served."""
        with self._lock:
            return copy.deepcopy(self._data)

    def set_data(self, data: Mapping[str, Any]) -> None:
        """Serve ``data`` (deep-copied) from now on."""
        snapshot = copy.deepcopy(dict(data))
        body = success_body(snapshot)  # encoded once here, not once a request
        with self._lock:
            self._data = snapshot
            self._body = body

    def success_body(self) -> bytes:
        with self._lock:
            return self._body

    # -- requests and faults --------------------------------------------------------------

    def arrive(self, endpoint: Endpoint, headers: Mapping[str, str]) -> Fault | None:
        """Count a request to ``endpoint`` (keeping its headers, names lower-cased) and take
        the fault it meets, if any: one lock for all of it, as this runs for every request."""
        recorded = {name.lower(): value for name, value in headers.items()}
        with self._lock:
            self._requests[endpoint] += 1
            self._last_headers[endpoint] = recorded
            armed = self._faults.get(endpoint)
            if armed is None:
                return None
            if armed.remaining is not None:
                armed.remaining -= 1
                if armed.remaining <= 0:
                    del self._faults[endpoint]
            return armed.fault

    def set_fault(self, endpoint: Endpoint, fault: Fault | None) -> None:
        """Answer requests to ``endpoint`` with ``fault`` (None clears it)."""
        with self._lock:
            if fault is None:
                self._faults.pop(endpoint, None)
            else:
                self._faults[endpoint] = _Armed(fault, fault.times)

    def requests(self, endpoint: Endpoint) -> int:
        with self._lock:
            return self._requests[endpoint]

    def last_headers(self, endpoint: Endpoint) -> dict[str, str]:
        with self._lock:
            return dict(self._last_headers.get(endpoint, {}))

    def reset_counters(self) -> None:
        with self._lock:
            self._requests.clear()

    # -- credentials and tokens -----------------------------------------------------------

    def credentials_match(self, key_id: str, key_secret: str) -> bool:
        # Both compared, in constant time, so a wrong id and a wrong secret take as long.
        id_ok = hmac.compare_digest(key_id.encode(), self.access_key_id.encode())
        secret_ok = hmac.compare_digest(key_secret.encode(), self.access_key_secret.encode())
        return id_ok and secret_ok

    def issue_token(self) -> tuple[str, int]:
        """A new HS256 JWT carrying ``scoped_userpool_id``, ``iat``, ``exp`` (this pool's
        clock) and a unique ``jti``, and its lifetime in seconds."""
        now = self._clock()
        ttl = self.token_ttl
        claims = {
            "scoped_userpool_id": self.userpool_id,
            "iat": int(now),
            "exp": int(now + ttl),
            "jti": secrets.token_hex(8),
        }
        signing_input = _JWT_HEADER + b"." + _b64url(dumps(claims))
        signature = hmac.new(self._signing_key, signing_input, hashlib.sha256).digest()
        token = (signing_input + b"." + _b64url(signature)).decode("ascii")
        with self._lock:
            if len(self._tokens) > _MAX_TOKENS:
                self._tokens = {t: exp for t, exp in self._tokens.items() if exp > now}
            self._tokens[token] = now + ttl
        return token, ttl

    def check_token(self, token: str) -> str | None:
        """None if ``token`` is good, else the upstream's complaint."""
        with self._lock:
            expires = self._tokens.get(token)
        if expires is None:
            return "invalid token"
        if self._clock() >= expires:
            return "token expired"
        return None

    def expire_tokens(self) -> None:
        """Every token issued so far is now expired."""
        with self._lock:
            for token in self._tokens:
                self._tokens[token] = float("-inf")
