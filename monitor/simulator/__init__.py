"""A simulated GenAuth (Authing V3) management API on loopback, for ``demo``, tests and benchmarks.

It is a real HTTP/1.1 server (Starlette on uvicorn, in a background thread) that speaks the
endpoints the monitor uses, so the client is exercised over real sockets:

``POST /api/v3/get-management-token``
    Body ``{"accessKeyId": ..., "accessKeySecret": ...}``. Right credentials::

        200 {"statusCode": 200, "message": "success",
             "data": {"access_token": <JWT>, "expires_in": <token_ttl>}}

    The JWT is HS256-signed with a random per-server key; its payload carries
    ``scoped_userpool_id``, ``iat``, ``exp`` (simulator clock) and a unique ``jti``. Wrong
    credentials answer HTTP 200 with a failure envelope (as the V3 API does for business
    errors)::

        200 {"statusCode": 401, "message": "accessKeyId or accessKeySecret is invalid",
             "apiCode": 2000, "requestId": <uuid4>}

    A body that is not a JSON object answers HTTP 400 with ``statusCode`` 400, apiCode 1000.

``GET /api/v3/get-email-provider``
    Needs ``Authorization: Bearer <token>`` of an issued, unexpired token and the pool id in
    ``x-authing-userpool-id`` or ``x-genauth-userpool-id``. Success (no ``requestId``)::

        200 {"statusCode": 200, "message": "Success", "data": <current config>}

    Missing, unknown or expired token::

        401 {"statusCode": 401, "message": "invalid token" | "token expired",
             "apiCode": 2001 | 2002, "requestId": <uuid4>}

    Pool header missing or not this pool: ``403`` with ``statusCode`` 403, apiCode 2003.

``POST /api/v3/get-admin-audit-logs``
    The same token and pool checks; body ``{start?, end? (ms since the epoch), operationType?,
    resourceType?, userId?, clientIp?, requestId?, success?, pagination: {page, limit}}``.
    Answers ``{"statusCode": 200, "data": {"totalCount": n, "list": [...]}}`` of the admin audit
    log (:mod:`.audit`): one entry per change made with :meth:`SimulatedGenAuth.set_data`
    (``by=`` names the admin; ``by=None`` records nothing), newest first, ``limit`` capped at 50.
    ``sim.audit.lag`` delays entries; faults ``forbidden`` (403) and ``not_offered`` (404).

Any other path or method answers 404 with an envelope (``statusCode`` 404, apiCode 1000), except
``HEAD`` of get-email-provider, answered like its ``GET`` without the body (as Starlette routes
do). JSON is ASCII with ``\\u`` escapes, so any string can be served, lone surrogates included.

Faults (:mod:`.faults` lists the kinds and their exact answers) are set per endpoint with
:meth:`SimulatedGenAuth.inject_fault`, or :meth:`~SimulatedGenAuth.set_fault` (provider) and
:meth:`~SimulatedGenAuth.set_token_fault` (token). The token clock is injectable;
:meth:`SimulatedGenAuth.expire_tokens` expires every issued token at once.

The package by job: :mod:`.wire` (endpoints, apiCodes, envelopes), :mod:`.state` (the pool:
config, tokens, clock, per-endpoint counters and faults), :mod:`.faults` (fault kinds and their
answers), :mod:`.http` (the app, the server, :class:`SimulatedGenAuth`), :mod:`.scenario` (the
demo's changing configuration and ``python -m monitor.simulator --port 8080``).
"""

from monitor.simulator.audit import DEFAULT_ADMIN, Admin
from monitor.simulator.faults import FAULT_KINDS, STREAM_FAULT_KINDS, TOKEN_FAULT_KINDS
from monitor.simulator.http import SimulatedGenAuth
from monitor.simulator.scenario import DEMO_SCENARIO, main, run_scenario
from monitor.simulator.state import DEFAULT_DATA
from monitor.simulator.wire import (
    API_CODE_BAD_REQUEST,
    API_CODE_FORBIDDEN,
    API_CODE_INTERNAL_ERROR,
    API_CODE_INVALID_CREDENTIALS,
    API_CODE_INVALID_TOKEN,
    API_CODE_POOL_MISMATCH,
    API_CODE_RATE_LIMITED,
    API_CODE_TOKEN_EXPIRED,
    AUDIT_LOG_PATH,
    PROVIDER_PATH,
    TOKEN_PATH,
    Endpoint,
)

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
    "DEFAULT_ADMIN",
    "DEFAULT_DATA",
    "DEMO_SCENARIO",
    "FAULT_KINDS",
    "PROVIDER_PATH",
    "STREAM_FAULT_KINDS",
    "TOKEN_FAULT_KINDS",
    "TOKEN_PATH",
    "Admin",
    "Endpoint",
    "SimulatedGenAuth",
    "main",
    "run_scenario",
]
