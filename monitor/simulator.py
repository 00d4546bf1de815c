"""A simulated GenAuth (Authing V3) management API on loopback, for ``demo`` and the tests.

It is a real HTTP/1.1 server (``http.server.ThreadingHTTPServer`` in a daemon thread) that
speaks the two endpoints the monitor uses, so the client is exercised over real sockets:

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

Unknown paths answer 404 with an envelope. Faults (see :data:`FAULT_KINDS`) are switched on with
:meth:`SimulatedGenAuth.set_fault` (provider endpoint) and :meth:`SimulatedGenAuth.set_token_fault`
(token endpoint). The token clock is injectable; :meth:`SimulatedGenAuth.expire_tokens` expires
every issued token at once.

Run standalone with ``python -m monitor.simulator --port 8080``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import hashlib
import hmac
import json
import secrets
import socket
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Final, Self, cast

__all__ = [
    "API_CODE_BAD_REQUEST",
    "API_CODE_INTERNAL_ERROR",
    "API_CODE_INVALID_CREDENTIALS",
    "API_CODE_INVALID_TOKEN",
    "API_CODE_POOL_MISMATCH",
    "API_CODE_RATE_LIMITED",
    "API_CODE_TOKEN_EXPIRED",
    "DEFAULT_DATA",
    "DEMO_SCENARIO",
    "FAULT_KINDS",
    "PROVIDER_PATH",
    "TOKEN_FAULT_KINDS",
    "TOKEN_PATH",
    "SimulatedGenAuth",
    "main",
    "run_scenario",
]

TOKEN_PATH: Final = "/api/v3/get-management-token"
PROVIDER_PATH: Final = "/api/v3/get-email-provider"

API_CODE_BAD_REQUEST: Final = 1000
API_CODE_INVALID_CREDENTIALS: Final = 2000
API_CODE_INVALID_TOKEN: Final = 2001
API_CODE_TOKEN_EXPIRED: Final = 2002
API_CODE_POOL_MISMATCH: Final = 2003
API_CODE_RATE_LIMITED: Final = 4290
API_CODE_INTERNAL_ERROR: Final = 5000

#: Fault kinds of the get-email-provider endpoint:
#:
#: - ``http_500_html`` / ``http_502_html``: HTTP 500 / 502 with an nginx-style HTML page
#: - ``status_500_body``: HTTP 200, envelope ``statusCode`` 500 with apiCode, message, requestId
#: - ``non_json``: HTTP 200, ``text/plain`` garbage
#: - ``missing_data``: HTTP 200, success envelope without ``data``
#: - ``wrong_types``: success envelope whose ``data.enabled`` is the string ``"true"``
#: - ``data_not_object``: success envelope whose ``data`` is a list
#: - ``subconfig_not_object``: success envelope whose ``data.smtpConfig`` is a string
#: - ``slow``: sleeps ``delay`` seconds, then answers normally
#: - ``rate_limit``: HTTP 429 with ``Retry-After: <retry_after>`` and a JSON envelope
#: - ``unauthorized``: HTTP 401 "invalid token" even for a valid token
#: - ``expired_token_body``: HTTP 200, envelope ``statusCode`` 401 "token expired"
#: - ``close``: closes the connection without answering
#: - ``huge_body``: HTTP 200, a success envelope padded to ``size`` bytes (Content-Length set)
#: - ``gzip_bomb``: HTTP 200, ``Content-Encoding: gzip``: a small body that inflates to
#:   ``size`` bytes of valid JSON
#: - ``endless``: HTTP 200, a chunked body that never ends
#: - ``drip``: HTTP 200, a valid success body sent one byte every ``delay`` seconds
#: - ``drip_headers``: the status line and headers sent one byte every ``delay`` seconds
#: - ``dense_json``: HTTP 200, a valid config padded with ``size`` bytes of tiny JSON objects
#:   (``[{},{},...]``: the most Python objects per byte a parser can be made to build)
#:
#: The last six apply to both endpoints. A ``delay`` given with any other kind is slept
#: before that fault's answer too.
FAULT_KINDS: Final = frozenset(
    {
        "http_500_html",
        "http_502_html",
        "status_500_body",
        "non_json",
        "missing_data",
        "wrong_types",
        "data_not_object",
        "subconfig_not_object",
        "slow",
        "rate_limit",
        "unauthorized",
        "expired_token_body",
        "close",
        "huge_body",
        "gzip_bomb",
        "endless",
        "drip",
        "drip_headers",
        "dense_json",
    }
)
#: Faults that stream a hostile answer themselves (any ``delay`` is their pace, not a wait).
STREAM_FAULT_KINDS: Final = frozenset(
    {"huge_body", "gzip_bomb", "endless", "drip", "drip_headers", "dense_json"}
)

#: Fault kinds of the get-management-token endpoint (same meaning as above;
#: ``missing_data`` answers a success envelope without ``data``).
TOKEN_FAULT_KINDS: Final = frozenset(
    {
        "http_500_html",
        "http_502_html",
        "status_500_body",
        "non_json",
        "missing_data",
        "slow",
        "rate_limit",
        "close",
        "huge_body",
        "gzip_bomb",
        "endless",
        "drip",
        "drip_headers",
        "dense_json",
    }
)

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


def _step(base: Mapping[str, Any], **changes: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with top-level keys, or ``sub__key`` nested keys, replaced."""
    out = copy.deepcopy(dict(base))
    for path, value in changes.items():
        head, _, tail = path.partition("__")
        if tail:
            out[head][tail] = value
        else:
            out[head] = value
    return out


_HOST_MOVED = _step(DEFAULT_DATA, smtpConfig__smtp_host="smtp.mail-relay.example.net")
_ROTATED = _step(_HOST_MOVED, smtpConfig__senderPass="demo-smtp-passw0rd-2")
_DISABLED = _step(_ROTATED, enabled=False)
_REENABLED = _step(_ROTATED, enabled=True)
_SENDGRID = _step(_REENABLED, type="sendgrid")

#: One demo cycle; each step differs from the one before in a way the monitor reports:
#: SMTP host moved, SMTP password rotated, provider disabled, re-enabled, switched to SendGrid,
#: and (wrapping around to the first step) back to custom SMTP on the original host.
DEMO_SCENARIO: Final[list[dict[str, Any]]] = [
    copy.deepcopy(DEFAULT_DATA),
    _HOST_MOVED,
    _ROTATED,
    _DISABLED,
    _REENABLED,
    _SENDGRID,
]

_HTML_PAGE = (
    "<html>\r\n<head><title>{code} {phrase}</title></head>\r\n<body>\r\n"
    "<center><h1>{code} {phrase}</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)
_JSON: Final = "application/json; charset=utf-8"
_STATUS_LINES: Final = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode("ascii") for s in HTTPStatus
}


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _dumps(obj: Any) -> bytes:
    # ASCII with \u escapes: valid JSON for any string, lone surrogates included, as a real
    # server may send them.
    return json.dumps(obj, separators=(",", ":")).encode("ascii")


def _envelope_error(status: int, message: str, api_code: int) -> bytes:
    return _dumps(
        {
            "statusCode": status,
            "message": message,
            "apiCode": api_code,
            "requestId": str(uuid.uuid4()),
        }
    )


@dataclass
class _Fault:
    kind: str
    remaining: int | None
    delay: float
    retry_after: int
    size: int = 200 * 1024 * 1024


_PAD_CHUNK: Final = b" " * 65536


def _padded_parts(size: int) -> tuple[bytes, bytes, int]:
    """Head and tail of a success envelope whose ``data.padding`` string of spaces makes the
    whole body ``size`` bytes (at least the envelope itself)."""
    head = b'{"statusCode":200,"message":"Success","data":{"enabled":true,"padding":"'
    tail = b'"}}'
    return head, tail, max(0, size - len(head) - len(tail))


_BOMBS: dict[int, bytes] = {}
_BOMBS_LOCK = threading.Lock()


def _dense_json(size: int) -> bytes:
    """A valid success envelope of ``size`` bytes that is mostly ``{},{},...``."""
    head = b'{"statusCode":200,"message":"Success","data":{"enabled":true,"dense":['
    count = max(1, (size - len(head) - 2) // 3)
    return head + b"{}," * (count - 1) + b"{}]}}"


def _gzip_bomb(size: int) -> bytes:
    """A gzip body inflating to ``size`` bytes of JSON; built once per size."""
    with _BOMBS_LOCK:
        if size not in _BOMBS:
            head, tail, pad = _padded_parts(size)
            packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
            parts = [packer.compress(head)]
            full, rest = divmod(pad, len(_PAD_CHUNK))
            parts.extend(packer.compress(_PAD_CHUNK) for _ in range(full))
            parts += [packer.compress(b" " * rest), packer.compress(tail), packer.flush()]
            _BOMBS[size] = b"".join(parts)
        return _BOMBS[size]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], sim: SimulatedGenAuth) -> None:
        self.sim = sim
        self.live: set[socket.socket] = set()
        self.live_lock = threading.Lock()
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up (timeouts, the "close" fault, stop()) are normal here.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "genauth-simulator"
    sys_version = ""

    # -- plumbing -------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        server = cast(_Server, self.server)
        with server.live_lock:
            server.live.add(self.connection)

    def finish(self) -> None:
        server = cast(_Server, self.server)
        with server.live_lock:
            server.live.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: no access log on stderr."""

    def _reply(
        self,
        status: int,
        body: bytes,
        content_type: str = _JSON,
        extra: Sequence[tuple[str, str]] = (),
    ) -> None:
        head = [
            _STATUS_LINES[status],
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n".encode("ascii"),
        ]
        head.extend(f"{name}: {value}\r\n".encode("latin-1") for name, value in extra)
        if self.close_connection:
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        head.append(body)
        self.wfile.write(b"".join(head))

    def _read_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        return self.rfile.read(length) if length > 0 else b""

    # -- routing --------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.partition("?")[0]
        if path == PROVIDER_PATH:
            self._provider()
        else:
            self._not_found()

    def do_POST(self) -> None:
        body = self._read_body()
        path = self.path.partition("?")[0]
        if path == TOKEN_PATH:
            self._token(body)
        else:
            self._not_found()

    def _not_found(self) -> None:
        self._reply(404, _envelope_error(404, "not found", API_CODE_BAD_REQUEST))

    # -- faults ---------------------------------------------------------------------------

    def _generic_fault(self, fault: _Fault) -> bool:
        """Answer a fault both endpoints share; False when ``fault`` is not one of them."""
        kind = fault.kind
        if kind in ("http_500_html", "http_502_html"):
            code = 500 if kind == "http_500_html" else 502
            page = _HTML_PAGE.format(code=code, phrase=HTTPStatus(code).phrase)
            self._reply(code, page.encode("ascii"), "text/html")
        elif kind == "status_500_body":
            self._reply(200, _envelope_error(500, "internal server error", API_CODE_INTERNAL_ERROR))
        elif kind == "non_json":
            self._reply(200, b"OK <not json> \x00\x01 upstream gateway says hi", "text/plain")
        elif kind == "missing_data":
            self._reply(200, _dumps({"statusCode": 200, "message": "Success"}))
        elif kind == "rate_limit":
            body = _envelope_error(429, "too many requests", API_CODE_RATE_LIMITED)
            self._reply(429, body, extra=[("Retry-After", str(fault.retry_after))])
        elif kind == "close":
            self.close_connection = True
        elif kind in STREAM_FAULT_KINDS:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._stream_fault(fault)
        else:
            return False
        return True

    def _stream_fault(self, fault: _Fault) -> None:
        """Hostile answers that only a bounded client survives; each stops when the client
        hangs up (a write fails) or the simulator stops."""
        stopping = cast(_Server, self.server).sim._stopping
        kind = fault.kind
        if kind == "drip_headers":
            for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" * 1000:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                if stopping.wait(fault.delay):
                    return
            return
        if kind == "gzip_bomb":
            body = _gzip_bomb(fault.size)
            self.wfile.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Encoding: gzip\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            return
        if kind == "drip":
            body = _dumps({"statusCode": 200, "message": "Success", "data": {"enabled": True}})
            self.wfile.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
            )
            for byte in body:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                if stopping.wait(fault.delay):
                    return
            return
        if kind == "dense_json":
            body = _dense_json(fault.size)
            self.wfile.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            return
        if kind == "endless":
            self.wfile.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            chunk = b"%x\r\n%s\r\n" % (len(_PAD_CHUNK), _PAD_CHUNK)
            while not stopping.is_set():
                self.wfile.write(chunk)
            return
        head, tail, pad = _padded_parts(fault.size)
        self.wfile.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(head) + pad + len(tail)}\r\n\r\n".encode()
            + head
        )
        full, rest = divmod(pad, len(_PAD_CHUNK))
        for _ in range(full):
            if stopping.is_set():
                return
            self.wfile.write(_PAD_CHUNK)
        self.wfile.write(b" " * rest + tail)

    # -- endpoints ------------------------------------------------------------------------

    def _token(self, body: bytes) -> None:
        sim = cast(_Server, self.server).sim
        sim._count_token()
        fault = sim._take_fault(token=True)
        if fault is not None:
            paced = fault.kind in STREAM_FAULT_KINDS
            if fault.delay > 0 and not paced and sim._stopping.wait(fault.delay):
                self.close_connection = True
                return
            if fault.kind != "slow" and self._generic_fault(fault):
                return
        try:
            request = json.loads(body)
        except (ValueError, RecursionError):
            request = None
        if not isinstance(request, dict):
            self._reply(400, _envelope_error(400, "invalid request body", API_CODE_BAD_REQUEST))
            return
        key_id, key_secret = request.get("accessKeyId"), request.get("accessKeySecret")
        if not (
            isinstance(key_id, str)
            and isinstance(key_secret, str)
            and sim._credentials_match(key_id, key_secret)
        ):
            message = "accessKeyId or accessKeySecret is invalid"
            self._reply(200, _envelope_error(401, message, API_CODE_INVALID_CREDENTIALS))
            return
        token, ttl = sim._issue_token()
        data = {"access_token": token, "expires_in": ttl}
        self._reply(200, _dumps({"statusCode": 200, "message": "success", "data": data}))

    def _provider(self) -> None:
        sim = cast(_Server, self.server).sim
        headers = self.headers
        sim._count_provider(headers)
        fault = sim._take_fault(token=False)
        if fault is not None:
            paced = fault.kind in STREAM_FAULT_KINDS
            if fault.delay > 0 and not paced and sim._stopping.wait(fault.delay):
                self.close_connection = True
                return
            if fault.kind == "unauthorized":
                self._reply(401, _envelope_error(401, "invalid token", API_CODE_INVALID_TOKEN))
                return
            if fault.kind != "slow" and self._generic_fault(fault):
                return
        auth = headers.get("Authorization") or ""
        scheme, _, token = auth.partition(" ")
        problem = sim._check_token(token.strip()) if scheme.lower() == "bearer" else "invalid token"
        if problem is not None:
            code = API_CODE_TOKEN_EXPIRED if problem == "token expired" else API_CODE_INVALID_TOKEN
            self._reply(401, _envelope_error(401, problem, code))
            return
        pool = headers.get("x-authing-userpool-id") or headers.get("x-genauth-userpool-id")
        if pool != sim.userpool_id:
            message = "userpool id missing or does not match the token"
            self._reply(403, _envelope_error(403, message, API_CODE_POOL_MISMATCH))
            return
        if fault is not None and fault.kind != "slow":
            self._reply(200, sim._fault_body(fault.kind))
            return
        self._reply(200, sim._success_body())


class SimulatedGenAuth:
    """The simulated API. ``start()`` binds and serves; ``stop()`` (or ``with``) ends it."""

    def __init__(
        self,
        *,
        access_key_id: str = "demo-userpool",
        access_key_secret: str = "demo-secret",
        userpool_id: str | None = None,
        token_ttl: int = 7200,
        data: Mapping[str, Any] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.access_key_id = access_key_id
        self._access_key_secret = access_key_secret
        self.userpool_id = userpool_id if userpool_id is not None else access_key_id
        self.token_ttl = token_ttl
        self.host = host
        self.port = port
        self._clock = clock
        self._lock = threading.Lock()
        self._signing_key = secrets.token_bytes(32)
        self._tokens: dict[str, float] = {}
        self._token_requests = 0
        self._provider_requests = 0
        self._last_provider_headers: dict[str, str] = {}
        self._fault: _Fault | None = None
        self._token_fault: _Fault | None = None
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._base_url: str | None = None
        self._data: dict[str, Any] = {}
        self._body = b""
        self.set_data(DEFAULT_DATA if data is None else data)

    def __repr__(self) -> str:
        where = self._base_url or "not started"
        return f"SimulatedGenAuth({where}, userpool_id={self.userpool_id!r})"

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("simulator already started")
        self._stopping.clear()
        server = _Server((self.host, self.port), self)
        self._server = server
        self.port = int(server.server_address[1])
        self._base_url = f"http://{self.host}:{self.port}"
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"genauth-simulator:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and cut every open keep-alive connection."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        with server.live_lock:
            live = list(server.live)
        for conn in live:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """``http://host:port`` once started (still answers after ``stop()``, for refusals)."""
        if self._base_url is None:
            raise RuntimeError("simulator not started")
        return self._base_url

    # -- state the tests and the demo drive ----------------------------------------------

    @property
    def access_key_secret(self) -> str:
        return self._access_key_secret

    @property
    def data(self) -> dict[str, Any]:
        """A deep copy of the configuration currently served."""
        with self._lock:
            return copy.deepcopy(self._data)

    def set_data(self, data: Mapping[str, Any]) -> None:
        """Serve ``data`` (deep-copied) from now on."""
        snapshot = copy.deepcopy(dict(data))
        body = _dumps({"statusCode": 200, "message": "Success", "data": snapshot})
        with self._lock:
            self._data = snapshot
            self._body = body

    @property
    def token_requests(self) -> int:
        with self._lock:
            return self._token_requests

    @property
    def provider_requests(self) -> int:
        with self._lock:
            return self._provider_requests

    @property
    def last_provider_headers(self) -> dict[str, str]:
        """Headers of the last get-email-provider request, names lower-cased."""
        with self._lock:
            return dict(self._last_provider_headers)

    def reset_counters(self) -> None:
        with self._lock:
            self._token_requests = 0
            self._provider_requests = 0

    def expire_tokens(self) -> None:
        """Every token issued so far is now expired."""
        with self._lock:
            for token in self._tokens:
                self._tokens[token] = float("-inf")

    def set_fault(
        self,
        kind: str | None,
        *,
        times: int | None = None,
        delay: float = 0.0,
        retry_after: int = 1,
        size: int = 200 * 1024 * 1024,
    ) -> None:
        """Inject a fault into get-email-provider; ``times=None`` lasts until cleared.
        ``size`` is the decoded body size of ``huge_body`` and ``gzip_bomb``."""
        fault = self._make_fault(kind, FAULT_KINDS, times, delay, retry_after, size)
        with self._lock:
            self._fault = fault

    def set_token_fault(
        self,
        kind: str | None,
        *,
        times: int | None = None,
        delay: float = 0.0,
        retry_after: int = 1,
        size: int = 200 * 1024 * 1024,
    ) -> None:
        """Inject a fault into get-management-token (kinds in :data:`TOKEN_FAULT_KINDS`)."""
        fault = self._make_fault(kind, TOKEN_FAULT_KINDS, times, delay, retry_after, size)
        with self._lock:
            self._token_fault = fault

    @staticmethod
    def _make_fault(
        kind: str | None,
        allowed: frozenset[str],
        times: int | None,
        delay: float,
        retry_after: int,
        size: int = 200 * 1024 * 1024,
    ) -> _Fault | None:
        if kind is None:
            return None
        if kind not in allowed:
            raise ValueError(f"unknown fault kind {kind!r}; one of {sorted(allowed)}")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None")
        if kind in ("slow", "drip", "drip_headers") and delay <= 0:
            raise ValueError(f"the {kind!r} fault needs delay > 0")
        if kind == "gzip_bomb":
            _gzip_bomb(size)  # built now, so the first answer is not late
        return _Fault(kind, times, max(0.0, delay), retry_after, size)

    # -- called by the handler ------------------------------------------------------------

    def _count_token(self) -> None:
        with self._lock:
            self._token_requests += 1

    def _count_provider(self, headers: Any) -> None:
        recorded = {name.lower(): value for name, value in headers.items()}
        with self._lock:
            self._provider_requests += 1
            self._last_provider_headers = recorded

    def _take_fault(self, *, token: bool) -> _Fault | None:
        with self._lock:
            fault = self._token_fault if token else self._fault
            if fault is None:
                return None
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    if token:
                        self._token_fault = None
                    else:
                        self._fault = None
            return fault

    def _credentials_match(self, key_id: str, key_secret: str) -> bool:
        id_ok = hmac.compare_digest(key_id.encode(), self.access_key_id.encode())
        secret_ok = hmac.compare_digest(key_secret.encode(), self._access_key_secret.encode())
        return id_ok and secret_ok

    def _issue_token(self) -> tuple[str, int]:
        now = self._clock()
        ttl = self.token_ttl
        header = _b64url(b'{"alg":"HS256","typ":"JWT"}')
        claims = {
            "scoped_userpool_id": self.userpool_id,
            "iat": int(now),
            "exp": int(now + ttl),
            "jti": secrets.token_hex(8),
        }
        payload = _b64url(_dumps(claims))
        signing_input = f"{header}.{payload}"
        signature = hmac.new(self._signing_key, signing_input.encode("ascii"), hashlib.sha256)
        token = f"{signing_input}.{_b64url(signature.digest())}"
        with self._lock:
            if len(self._tokens) > 1000:
                self._tokens = {t: exp for t, exp in self._tokens.items() if exp > now}
            self._tokens[token] = now + ttl
        return token, ttl

    def _check_token(self, token: str) -> str | None:
        """None if ``token`` is good, else the upstream's complaint."""
        with self._lock:
            expires = self._tokens.get(token)
        if expires is None:
            return "invalid token"
        if self._clock() >= expires:
            return "token expired"
        return None

    def _success_body(self) -> bytes:
        with self._lock:
            return self._body

    def _fault_body(self, kind: str) -> bytes:
        data = self.data
        if kind == "wrong_types":
            data["enabled"] = "true"
            return _dumps({"statusCode": 200, "message": "Success", "data": data})
        if kind == "data_not_object":
            return _dumps({"statusCode": 200, "message": "Success", "data": [data]})
        if kind == "subconfig_not_object":
            data["smtpConfig"] = "smtp://smtp.example.com:465"
            return _dumps({"statusCode": 200, "message": "Success", "data": data})
        if kind == "expired_token_body":
            return _envelope_error(401, "token expired", API_CODE_TOKEN_EXPIRED)
        raise AssertionError(f"unhandled fault kind {kind!r}")  # pragma: no cover


def run_scenario(sim: SimulatedGenAuth, *, period: float, stop: threading.Event) -> None:
    """Serve :data:`DEMO_SCENARIO` step by step, one step every ``period`` s, until ``stop``.

    The first step is served at once; after the last one the cycle starts again.
    """
    if period <= 0:
        raise ValueError("period must be > 0")
    step = 0
    sim.set_data(DEMO_SCENARIO[step])
    while not stop.wait(period):
        step = (step + 1) % len(DEMO_SCENARIO)
        sim.set_data(DEMO_SCENARIO[step])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m monitor.simulator",
        description="Serve a simulated GenAuth management API (email provider) on loopback.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--access-key-id", default="demo-userpool")
    parser.add_argument("--access-key-secret", default="demo-secret")
    parser.add_argument("--token-ttl", type=int, default=7200, help="token lifetime in seconds")
    parser.add_argument(
        "--scenario-period",
        type=float,
        default=0.0,
        help="cycle through the demo configurations every N seconds (0 = serve a fixed config)",
    )
    args = parser.parse_args(argv)
    sim = SimulatedGenAuth(
        access_key_id=args.access_key_id,
        access_key_secret=args.access_key_secret,
        token_ttl=args.token_ttl,
        host=args.host,
        port=args.port,
    )
    stop = threading.Event()
    with sim:
        print(f"base_url          = {sim.base_url}")
        print(f"access_key_id     = {sim.access_key_id}")
        print(f"access_key_secret = {sim.access_key_secret}")
        print(f"userpool_id       = {sim.userpool_id}")
        print("Ctrl-C to stop.", flush=True)
        scenario: threading.Thread | None = None
        if args.scenario_period > 0:
            scenario = threading.Thread(
                target=run_scenario,
                args=(sim,),
                kwargs={"period": args.scenario_period, "stop": stop},
                daemon=True,
            )
            scenario.start()
        try:
            while not stop.wait(3600):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            stop.set()
            if scenario is not None:
                scenario.join(timeout=5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
