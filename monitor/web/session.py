"""Who may read ``/ui``: the bearer token, or the session cookie a login with it sets.

The cookie is ``v1.<issued>.<mac>``: the issue time in whole seconds since the epoch and
HMAC-SHA256 over ``v1.<issued>`` with a key derived from the API token,
``HMAC-SHA256(token, "genauth-monitor ui session")``. So it needs no server-side store: a
restarted daemon and every replica with the same token accept it, and changing the token
ends every session at once. The server refuses a cookie older than ``[server] ui_session``
(whatever the browser does with Max-Age) or issued in the future (beyond a clock skew between
replicas). The cookie holds nothing secret itself and never the token.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

from monitor.timeutil import Clock

__all__ = ["CLOCK_SKEW", "COOKIE", "Sessions", "bearer_matches", "token_matches"]

COOKIE: Final = "genauth_monitor_ui"
CLOCK_SKEW: Final = 300.0  # seconds a cookie's issue time may be ahead of this replica's clock
_PURPOSE: Final = b"genauth-monitor ui session"
_VERSION: Final = "v1"
_MAX_COOKIE: Final = 200  # ours are about 80 characters; anything longer is not one of ours


def bearer_matches(header: str, api_token: str) -> bool:
    """Whether an ``Authorization`` header is ``Bearer <api_token>`` (scheme in any case),
    compared in constant time."""
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), api_token.encode()
    )


def token_matches(given: str, api_token: str) -> bool:
    """Whether a token typed into the login form is the API token (constant time)."""
    return hmac.compare_digest(given.strip().encode(), api_token.encode())


class Sessions:
    """Issues and checks login cookies for one API token; ``lifetime`` in seconds."""

    def __init__(self, api_token: str, *, lifetime: float, clock: Clock) -> None:
        self._key = hmac.new(api_token.encode(), _PURPOSE, hashlib.sha256).digest()
        self.lifetime = lifetime
        self._clock = clock

    def __repr__(self) -> str:
        return f"Sessions(lifetime={self.lifetime!r})"

    def issue(self) -> str:
        """A new cookie value, issued now."""
        body = f"{_VERSION}.{int(self._clock().timestamp())}"
        return f"{body}.{self._mac(body)}"

    def valid(self, cookie: str | None) -> bool:
        """Whether ``cookie`` is one this token issued, less than ``lifetime`` ago."""
        if not cookie or len(cookie) > _MAX_COOKIE:
            return False
        body, _, mac = cookie.rpartition(".")
        version, _, issued_text = body.partition(".")
        if version != _VERSION or not issued_text.isascii() or not issued_text.isdigit():
            return False
        if not hmac.compare_digest(mac.encode(), self._mac(body).encode()):
            return False
        age = self._clock().timestamp() - int(issued_text)
        return -CLOCK_SKEW <= age < self.lifetime

    def _mac(self, body: str) -> str:
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()
