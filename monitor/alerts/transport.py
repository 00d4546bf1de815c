"""POST with requests for every sink; errors become DeliveryError without URL or body."""

from __future__ import annotations

import requests

from monitor import __version__
from monitor.errors import DeliveryError

__all__ = ["post"]

USER_AGENT = f"genauth-monitor/{__version__}"
_TRANSIENT_4XX = frozenset({408, 425, 429})


def post(
    session: requests.Session,
    url: str,
    body: bytes,
    *,
    timeout: float,
    headers: dict[str, str] | None = None,
) -> None:
    """POST ``body`` as JSON; any answer but 2xx is a DeliveryError."""
    try:
        response = session.post(
            url,
            data=body,
            headers={
                "Content-Type": "application/json",
                "User-Agent": USER_AGENT,
                **(headers or {}),
            },
            timeout=timeout,
            allow_redirects=False,
        )
    except requests.Timeout:
        error = DeliveryError(f"no answer within {timeout:g}s")
    except requests.ConnectionError as exc:
        error = DeliveryError(f"connection failed ({type(exc).__name__})")
    except requests.RequestException as exc:
        error = DeliveryError(f"request failed ({type(exc).__name__})")
    else:
        if 200 <= response.status_code < 300:
            return
        status = response.status_code
        error = DeliveryError(
            f"HTTP {status}", permanent=400 <= status < 500 and status not in _TRANSIENT_4XX
        )
    # Raised outside the except blocks so no requests exception (with the URL) is chained.
    raise error
