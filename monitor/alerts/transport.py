"""POST for every sink, bounded in time and size; errors become DeliveryError without URL or
body."""

from __future__ import annotations

import time

import requests

from monitor import __version__
from monitor.errors import DeliveryError
from monitor.httpio import HttpFailure, bounded_request

__all__ = ["MAX_ANSWER_BYTES", "post"]

USER_AGENT = f"genauth-monitor/{__version__}"
# A sink's answer is only looked at for its status; a big one is a broken or hostile sink.
MAX_ANSWER_BYTES = 64 * 1024
_TRANSIENT_4XX = frozenset({408, 425, 429})


def post(
    session: requests.Session,
    url: str,
    body: bytes,
    *,
    timeout: float,
    headers: dict[str, str] | None = None,
) -> None:
    """POST ``body`` as JSON; any answer but 2xx within ``timeout`` is a DeliveryError."""
    request = requests.Request(
        "POST",
        url,
        data=body,
        headers={
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            **(headers or {}),
        },
    ).prepare()
    try:
        answer = bounded_request(
            session,
            request,
            timeout=timeout,
            deadline=time.monotonic() + timeout,
            max_bytes=MAX_ANSWER_BYTES,
        )
    except HttpFailure as failure:
        error = DeliveryError(_describe(failure, timeout))
    else:
        if 200 <= answer.status < 300:
            return
        status = answer.status
        error = DeliveryError(
            f"HTTP {status}", permanent=400 <= status < 500 and status not in _TRANSIENT_4XX
        )
    # Raised outside the except blocks so no requests exception (with the URL) is chained.
    raise error


def _describe(failure: HttpFailure, timeout: float) -> str:
    if failure.kind == "timeout":
        return f"no answer within {timeout:g}s"
    if failure.kind == "too_large":
        return f"answer larger than {MAX_ANSWER_BYTES} bytes"
    return failure.detail
