"""What the simulated API says on the wire: its endpoints, apiCodes and JSON envelopes.

Shared by :mod:`.state` (the pre-encoded success body, the JWT), :mod:`.faults` (the fault
answers) and :mod:`.http` (the endpoints). The paths are spelled here rather than imported from
``monitor.genauth``, so a wrong path in the client fails against the simulator.
"""

from __future__ import annotations

import json
import uuid
from enum import StrEnum
from typing import Any, Final

__all__ = [
    "API_CODE_BAD_REQUEST",
    "API_CODE_FORBIDDEN",
    "API_CODE_INTERNAL_ERROR",
    "API_CODE_INVALID_CREDENTIALS",
    "API_CODE_INVALID_TOKEN",
    "API_CODE_POOL_MISMATCH",
    "API_CODE_RATE_LIMITED",
    "API_CODE_TOKEN_EXPIRED",
    "AUDIT_LOG_PATH",
    "JSON_TYPE",
    "PROVIDER_PATH",
    "TOKEN_PATH",
    "Endpoint",
    "dumps",
    "error_body",
    "success_body",
]

TOKEN_PATH: Final = "/api/v3/get-management-token"
PROVIDER_PATH: Final = "/api/v3/get-email-provider"
AUDIT_LOG_PATH: Final = "/api/v3/get-admin-audit-logs"

API_CODE_BAD_REQUEST: Final = 1000
API_CODE_INVALID_CREDENTIALS: Final = 2000
API_CODE_INVALID_TOKEN: Final = 2001
API_CODE_TOKEN_EXPIRED: Final = 2002
API_CODE_POOL_MISMATCH: Final = 2003
API_CODE_FORBIDDEN: Final = 2004  # the key may not read this (the audit log needs a permission)
API_CODE_RATE_LIMITED: Final = 4290
API_CODE_INTERNAL_ERROR: Final = 5000

JSON_TYPE: Final = "application/json; charset=utf-8"


class Endpoint(StrEnum):
    """The endpoints the simulator serves, as its state and faults name them (counters and
    faults are kept per endpoint, so a new endpoint is one member here, one route in
    :mod:`.http`, and the fault kinds it takes in :mod:`.faults`)."""

    TOKEN = "token"
    PROVIDER = "provider"
    AUDIT_LOG = "audit_log"


def dumps(obj: Any) -> bytes:
    """Compact JSON in ASCII with ``\\u`` escapes: valid JSON for any string, lone surrogates
    included, as a real server may send them (``NaN`` and ``Infinity`` are written as Python
    writes them, also as a real server might)."""
    return json.dumps(obj, separators=(",", ":")).encode("ascii")


def success_body(data: Any) -> bytes:
    return dumps({"statusCode": 200, "message": "Success", "data": data})


def error_body(status: int, message: str, api_code: int) -> bytes:
    """A failure envelope; every failure carries a fresh ``requestId`` like the real API's."""
    return dumps(
        {
            "statusCode": status,
            "message": message,
            "apiCode": api_code,
            "requestId": str(uuid.uuid4()),
        }
    )
