"""The GenAuth (Authing V3) management API client (HTTP through :mod:`monitor.httpio`).

One call, :meth:`GenAuthClient.fetch_email_provider`, returns the ``data`` object of
``GET /api/v3/get-email-provider`` exactly as sent (unknown fields kept) or raises
:class:`~monitor.errors.UpstreamError` with a ``reason``:

============== ====================================================================
``network``    no connection, connection reset or closed without an answer, TLS failure
``timeout``    a request did not finish (connect, headers and body) within ``timeout``, or
               the whole call within its deadline of twice ``timeout``
``http_status`` an HTTP status other than 2xx (and other than a 401 that a new token cures);
               ``retry_after`` is set from ``Retry-After`` when present
``api_error``  HTTP 2xx but the envelope's ``statusCode`` is not 200
``auth``       the credentials were refused, or a freshly issued token was refused too
``invalid_response`` a body over ``max_response_bytes`` after decompression, not JSON, no
               ``data``, ``data`` not an object, ``enabled`` not a bool,
               a known sub-config or ``type`` of the wrong type
============== ====================================================================

The management token is cached until shortly before it expires (``min(60 s, 10 %)`` of its
lifetime, measured with the injected clock). On HTTP 401, or an envelope saying the token is
invalid or expired, the token is dropped, a new one fetched once and the request retried once.

No message raised here carries the access key secret, the token or a raw upstream body; every
``requests`` exception is translated here and raised without its context.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType, TracebackType
from typing import Any, Final, NoReturn, Self, TypeGuard

import requests

from monitor import __version__
from monitor.errors import UpstreamError
from monitor.httpio import (
    ACCEPT_ENCODING,
    Answer,
    HttpFailure,
    body_budget,
    bounded_request,
    bounded_session,
)
from monitor.ratelimit import RateLimit

__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "PROVIDER_PATH",
    "TOKEN_PATH",
    "GenAuthClient",
    "Route",
]

DEFAULT_MAX_RESPONSE_BYTES: Final = 1024 * 1024
MAX_JSON_VALUES: Final = 10_000

TOKEN_PATH: Final = "/api/v3/get-management-token"
PROVIDER_PATH: Final = "/api/v3/get-email-provider"

_TOKEN_EP: Final = "get-management-token"
_PROVIDER_EP: Final = "get-email-provider"
_SUBCONFIGS: Final = ("smtpConfig", "sendGridConfig", "aliExmailConfig", "tencentExmailConfig")
_MAX_MESSAGE: Final = 200
_MAX_REQUEST_ID: Final = 100
_MAX_ERROR_BODY: Final = 64 * 1024
_MAX_SKEW: Final = 60.0
_SKEW_FRACTION: Final = 0.1

# A header value we are willing to send: visible ASCII (tokens), or with inner spaces (pool ids).
_TOKEN_CHARS: Final = re.compile(r"[\x21-\x7e]+")
_POOL_CHARS: Final = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]+")
_TOKEN_WORDS: Final = ("token", "令牌", "凭证")
_BAD_TOKEN_WORDS: Final = ("expire", "invalid", "not valid", "过期", "无效", "失效", "非法")


class _TokenRejected(Exception):
    """Internal: get-email-provider refused the token (HTTP 401 or an envelope saying so)."""

    def __init__(
        self,
        message: str,
        *,
        http_status: int,
        api_code: int | None,
        request_id: str | None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.api_code = api_code
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class Route:
    """How requests reach one ``base_url``, shared by every client of it: the proxies and the
    CA verification, read from the environment once (with ``trust_env`` requests re-reads the
    environment and ~/.netrc on every call, a quarter of a poll's CPU, and a ~/.netrc entry for
    the API host would replace the bearer token), and the endpoints' URLs as requests
    normalises them. Built once per base URL and process (``build_runtime``), not per target:
    reading the proxy environment was a tenth of the daemon's start-up at 10,000 targets."""

    base_url: str
    proxies: Mapping[str, str]
    verify: bool | str
    token_url: str
    provider_url: str

    @classmethod
    def of(cls, base_url: str, *, ca_bundle: str | None = None) -> Route:
        """The route to ``base_url`` as the environment has it now; ``ca_bundle`` (a path)
        before ``REQUESTS_CA_BUNDLE`` and ``CURL_CA_BUNDLE``, else the default bundle."""
        base = base_url.strip().rstrip("/")
        if not base.lower().startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        env_ca = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        provider = requests.Request("GET", base + PROVIDER_PATH).prepare().url
        assert provider is not None
        return cls(
            base_url=base,
            proxies=MappingProxyType(requests.utils.get_environ_proxies(base)),
            verify=ca_bundle or env_ca or True,
            token_url=base + TOKEN_PATH,
            provider_url=provider,
        )


# Shared by every prepared request: requests gives each its own hooks (a dict and a list)
# and cookie jar, which nothing here uses (redirects are not followed, cookies not sent).
_NO_HOOKS: Final[Mapping[str, list[Any]]] = MappingProxyType({"response": []})


class GenAuthClient:
    """Fetches one user pool's email-provider configuration from the management API.

    One per target, kept for the daemon's life: slots, and what all clients of one base URL
    have in common in their shared :class:`Route`."""

    __slots__ = (
        "_auth",
        "_bearer",
        "_clock",
        "_lock",
        "_owns_session",
        "_rate_limit",
        "_route",
        "_secret",
        "_session",
        "_user_agent",
        "access_key_id",
        "max_response_bytes",
        "timeout",
        "userpool_id",
    )

    def __init__(
        self,
        *,
        base_url: str,
        access_key_id: str,
        access_key_secret: str,
        userpool_id: str | None = None,
        timeout: float = 10.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        rate_limit: RateLimit | None = None,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.monotonic,
        ca_bundle: str | None = None,
        user_agent: str = f"genauth-monitor/{__version__}",
        route: Route | None = None,
    ) -> None:
        """``route``: shared by the clients of one base URL (its ``base_url`` must be this
        one's; it holds the CA verification, so ``ca_bundle`` is then not read); by default
        read from the environment for this client alone."""
        if route is None:
            route = Route.of(base_url, ca_bundle=ca_bundle)
        elif route.base_url != base_url.strip().rstrip("/"):
            raise ValueError("route is for another base_url")
        if not timeout > 0:
            raise ValueError("timeout must be > 0")
        self._route = route
        self.access_key_id = access_key_id
        self.userpool_id = userpool_id
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self._rate_limit = rate_limit
        self._secret = access_key_secret
        self._owns_session = session is None
        self._session = bounded_session() if session is None else session
        self._clock = clock
        self._user_agent = user_agent
        self._lock = threading.Lock()
        # (the prepared get-email-provider request carrying the token, clock time after which
        # the token is refreshed): prepared once per token, sent as is by every poll.
        self._auth: tuple[requests.PreparedRequest, float] | None = None
        # "Bearer <token>", the very string the request sends: the token is not kept apart
        # (260 bytes a target), and messages are cleaned of what follows "Bearer ".
        self._bearer: str | None = None

    @property
    def base_url(self) -> str:
        return self._route.base_url

    def __repr__(self) -> str:
        return f"GenAuthClient(base_url={self.base_url!r}, access_key_id={self.access_key_id!r})"

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Close the HTTP session if this client created it."""
        if self._owns_session:
            self._session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the one public call --------------------------------------------------------------

    def fetch_email_provider(self) -> dict[str, Any]:
        """The pool's ``EmailProviderDto`` as sent; :class:`UpstreamError` on any failure.

        The whole call (a token if needed, the request, one re-authentication and retry) has
        a deadline of twice the timeout; each request within it is bounded by both."""
        with body_budget():
            return self._fetch_within(time.monotonic() + 2 * self.timeout)

    def _fetch_within(self, deadline: float) -> dict[str, Any]:
        request = self._current_request(deadline)
        try:
            return self._fetch(request, deadline)
        except _TokenRejected:
            pass
        self._invalidate(request)
        request = self._current_request(deadline)
        try:
            return self._fetch(request, deadline)
        except _TokenRejected as rejected:
            error = UpstreamError(
                "auth",
                f"{_PROVIDER_EP} refused a freshly issued token: {rejected.message}",
                http_status=rejected.http_status,
                api_code=rejected.api_code,
                request_id=rejected.request_id,
            )
        self._invalidate(request)
        raise error from None

    def call(self, path: str, payload: dict[str, Any], *, deadline: float) -> Any:
        """POST ``payload`` as JSON to another management endpoint (``path``, such as the
        admin audit log) with the cached token and the pool headers of ``get-email-provider``;
        the envelope's ``data``. The same bounds (``timeout`` per request, ``deadline``,
        monotonic, for the whole call), the same re-authentication once on a refused token and
        the same failure reasons (:class:`UpstreamError`) as :meth:`fetch_email_provider`."""
        endpoint = path.rsplit("/", 1)[-1]
        body = json.dumps(payload, separators=(",", ":")).encode()
        rejected: _TokenRejected | None = None
        with body_budget():
            for _ in range(2):
                auth = self._current_request(deadline)
                headers = {**auth.headers, "Content-Type": "application/json"}
                request = requests.Request(
                    "POST", self.base_url + path, headers=headers, data=body
                ).prepare()
                try:
                    return self._call(request, endpoint, deadline)
                except _TokenRejected as exc:
                    rejected = exc
                self._invalidate(auth)
        assert rejected is not None
        raise UpstreamError(
            "auth",
            f"{endpoint} refused a freshly issued token: {rejected.message}",
            http_status=rejected.http_status,
            api_code=rejected.api_code,
            request_id=rejected.request_id,
        ) from None

    def _call(self, request: requests.PreparedRequest, endpoint: str, deadline: float) -> Any:
        response = self._send(request, endpoint, deadline)
        if response.status == 401:
            self._reject(response, None)
        if not 200 <= response.status < 300:
            self._fail_status(response, endpoint)
        body = self._decode(response, endpoint)
        if type(body) is not dict:
            self._invalid(response, endpoint, f"body is {_kind(body)}, expected an object")
        if body.get("statusCode") != 200:
            self._fail_envelope(response, body, endpoint)
        return body.get("data")

    # -- get-email-provider ---------------------------------------------------------------

    def _fetch(self, request: requests.PreparedRequest, deadline: float) -> dict[str, Any]:
        response = self._send(request, _PROVIDER_EP, deadline)
        status = response.status
        if status == 401:
            self._reject(response, None)
        if not 200 <= status < 300:
            self._fail_status(response, _PROVIDER_EP)
        body = self._decode(response, _PROVIDER_EP)
        if type(body) is not dict:
            self._invalid(response, _PROVIDER_EP, f"body is {_kind(body)}, expected an object")
        if body.get("statusCode") != 200:
            self._fail_envelope(response, body, _PROVIDER_EP)
        data = body.get("data")
        if type(data) is not dict:
            if data is None:
                self._invalid(response, _PROVIDER_EP, "envelope has no data")
            self._invalid(response, _PROVIDER_EP, f"data is {_kind(data)}, expected an object")
        if type(data.get("enabled")) is not bool:
            if "enabled" not in data:
                self._invalid(response, _PROVIDER_EP, "data.enabled is missing")
            self._invalid(
                response, _PROVIDER_EP, f"data.enabled is {_kind(data['enabled'])}, expected a bool"
            )
        kind = data.get("type")
        if kind is not None and type(kind) is not str:
            self._invalid(response, _PROVIDER_EP, f"data.type is {_kind(kind)}, expected a string")
        for key in _SUBCONFIGS:
            sub = data.get(key)
            if sub is not None and type(sub) is not dict:
                self._invalid(
                    response, _PROVIDER_EP, f"data.{key} is {_kind(sub)}, expected an object"
                )
        return data

    def _reject(self, response: Answer, body: dict[str, Any] | None) -> NoReturn:
        if body is None:
            body = _small_json_object(response)
        api_code, request_id, message = self._envelope_fields(body)
        http = response.status
        what = f"HTTP {http}" if http == 401 else f"statusCode {body and body.get('statusCode')}"
        raise _TokenRejected(
            f"{what}: {message}" if message else what,
            http_status=http,
            api_code=api_code,
            request_id=request_id,
        )

    # -- get-management-token -------------------------------------------------------------

    def _current_request(self, deadline: float) -> requests.PreparedRequest:
        auth = self._auth
        if auth is not None and self._clock() < auth[1]:
            return auth[0]
        with self._lock:
            auth = self._auth
            if auth is not None and self._clock() < auth[1]:
                return auth[0]
            headers, refresh_at = self._new_token(deadline)
            # Kept until the token expires, one per target: built by hand without the cookie
            # jar and hooks requests gives each (the URL was prepared by requests in the
            # Route), with requests' own check of every header (no CR, LF or leading space).
            for header in headers.items():
                requests.utils.check_header_validity(header)
            request = requests.PreparedRequest()
            request.method, request.url = "GET", self._route.provider_url
            # A plain dict, not requests' CaseInsensitiveDict: its lower-cased key and tuple per
            # header cost about 1 KB per target for nothing, as the adapter only passes the
            # headers to urllib3 (and looks for Content-Length), and nothing else reads them.
            request.headers = headers  # type: ignore[assignment]
            request.hooks = _NO_HOOKS  # read only by requests
            self._auth = (request, refresh_at)
            return request

    def _invalidate(self, request: requests.PreparedRequest) -> None:
        with self._lock:
            if self._auth is not None and self._auth[0] is request:
                self._auth = None

    def _new_token(self, deadline: float) -> tuple[dict[str, str], float]:
        started = self._clock()
        payload = {"accessKeyId": self.access_key_id, "accessKeySecret": self._secret}
        headers = {
            "User-Agent": self._user_agent,
            "Accept": "application/json",
            "Accept-Encoding": ACCEPT_ENCODING,
            "Content-Type": "application/json",
        }
        request = requests.Request(
            "POST", self._route.token_url, headers=headers, data=json.dumps(payload)
        ).prepare()
        response = self._send(request, _TOKEN_EP, deadline)
        status = response.status
        if status in (401, 403):
            body = _small_json_object(response)
            self._auth_failure(response, body, f"HTTP {status}")
        if not 200 <= status < 300:
            self._fail_status(response, _TOKEN_EP)
        body = self._decode(response, _TOKEN_EP)
        if type(body) is not dict:
            self._invalid(response, _TOKEN_EP, f"body is {_kind(body)}, expected an object")
        code = body.get("statusCode")
        if code != 200:
            if type(code) is int and code in (400, 401, 403):
                self._auth_failure(response, body, f"statusCode {code}")
            self._fail_envelope(response, body, _TOKEN_EP)
        data = body.get("data")
        if type(data) is not dict:
            what = "envelope has no data" if data is None else f"data is {_kind(data)}"
            self._invalid(response, _TOKEN_EP, what)
        token = data.get("access_token")
        if type(token) is not str or not _TOKEN_CHARS.fullmatch(token):
            self._invalid(response, _TOKEN_EP, "data.access_token is missing or not a token")
        claims = _jwt_claims(token)
        lifetime = _lifetime(data.get("expires_in"), claims)
        if lifetime is None:
            self._invalid(
                response, _TOKEN_EP, "data.expires_in is missing or not a positive number"
            )
        self._bearer = f"Bearer {token}"
        pool = self.userpool_id
        if pool is None:
            scoped = claims.get("scoped_userpool_id")
            if isinstance(scoped, str) and _POOL_CHARS.fullmatch(scoped):
                pool = scoped
            else:
                pool = self.access_key_id
        headers = {
            "Authorization": self._bearer,
            "x-authing-userpool-id": pool,
            "x-genauth-userpool-id": pool,
            "User-Agent": self._user_agent,
            "Accept": "application/json",
            "Accept-Encoding": ACCEPT_ENCODING,
        }
        skew = min(_MAX_SKEW, _SKEW_FRACTION * lifetime)
        return headers, started + lifetime - skew

    def _auth_failure(self, response: Answer, body: dict[str, Any] | None, what: str) -> NoReturn:
        api_code, request_id, message = self._envelope_fields(body)
        text = f"{_TOKEN_EP} refused the access key ({what})"
        raise UpstreamError(
            "auth",
            f"{text}: {message}" if message else text,
            http_status=response.status,
            api_code=api_code,
            request_id=request_id,
        )

    # -- shared ---------------------------------------------------------------------------

    def _send(self, request: requests.PreparedRequest, endpoint: str, deadline: float) -> Answer:
        if self._rate_limit is not None and not self._rate_limit.acquire(deadline):
            raise UpstreamError(
                "timeout",
                f"{endpoint}: max_requests_per_second ({self._rate_limit.rate:g}) left no room "
                "for this request before its deadline",
            )
        try:
            return bounded_request(
                self._session,
                request,
                timeout=self.timeout,
                deadline=deadline,
                max_bytes=self.max_response_bytes,
                verify=self._route.verify,
                proxies=self._route.proxies,
            )
        except HttpFailure as failure:
            error = _upstream_error(failure, endpoint, self)
        # Raised outside the except block: no __context__ holding URLs or bodies.
        raise error from None

    def _decode(self, response: Answer, endpoint: str) -> Any:
        values = _json_values(response.body)
        if values > MAX_JSON_VALUES:
            # Parsing, redacting and hashing cost memory and CPU per value, not per byte: a
            # 1 MiB body of [{},{},...] would build a third of a million objects, times every
            # poll in flight. A real answer holds a few dozen.
            self._invalid(
                response, endpoint, f"answer holds more than {MAX_JSON_VALUES} JSON values"
            )
        try:
            return json.loads(
                response.body, parse_constant=_reject_constant, parse_float=_finite_float
            )
        except (ValueError, RecursionError):
            pass
        self._invalid(response, endpoint, f"body is not JSON ({_describe_body(response)})")

    def _fail_status(self, response: Answer, endpoint: str) -> NoReturn:
        status = response.status
        body = _small_json_object(response)
        api_code, request_id, message = self._envelope_fields(body)
        text = f"HTTP {status} from {endpoint} ({_describe_body(response)})"
        raise UpstreamError(
            "http_status",
            f"{text}: {message}" if message else text,
            http_status=status,
            api_code=api_code,
            request_id=request_id,
            retry_after=_retry_after(response.headers.get("Retry-After")),
        )

    def _fail_envelope(self, response: Answer, body: dict[str, Any], endpoint: str) -> NoReturn:
        code = body.get("statusCode")
        if type(code) is not int:
            if code is None:
                self._invalid(response, endpoint, "envelope has no statusCode")
            self._invalid(
                response, endpoint, f"envelope statusCode is {_kind(code)}, expected a number"
            )
        # Any endpoint but the token's own may say the token went bad.
        if endpoint != _TOKEN_EP and _says_bad_token(code, body.get("message")):
            self._reject(response, body)
        api_code, request_id, message = self._envelope_fields(body)
        text = f"{endpoint} failed with statusCode {code}"
        if api_code is not None:
            text += f", apiCode {api_code}"
        raise UpstreamError(
            "api_error",
            f"{text}: {message}" if message else text,
            http_status=response.status,
            api_code=api_code,
            request_id=request_id,
        )

    def _invalid(self, response: Answer, endpoint: str, what: str) -> NoReturn:
        status = response.status
        raise UpstreamError("invalid_response", f"{endpoint}: {what}", http_status=status)

    def _envelope_fields(
        self, body: dict[str, Any] | None
    ) -> tuple[int | None, str | None, str | None]:
        """``(apiCode, requestId, message)`` of an envelope, each checked and made safe."""
        if body is None:
            return None, None, None
        raw_code = body.get("apiCode")
        api_code: int | None = None
        if type(raw_code) is int:
            api_code = raw_code
        elif type(raw_code) is str and raw_code.isascii() and raw_code.isdigit():
            api_code = int(raw_code[:18])
        raw_id = body.get("requestId")
        request_id = self._safe_text(raw_id, _MAX_REQUEST_ID) if type(raw_id) is str else None
        raw_message = body.get("message")
        message = self._safe_text(raw_message, _MAX_MESSAGE) if type(raw_message) is str else None
        return api_code, request_id or None, message or None

    def _safe_text(self, text: str, limit: int) -> str:
        """Upstream text made fit for a log line: one line, no secret, no token, short."""
        token = self._bearer.removeprefix("Bearer ") if self._bearer is not None else None
        for secret in (self._secret, token):
            if secret:
                text = text.replace(secret, "***")
        text = _CONTROL.sub(" ", text).strip()
        return text if len(text) <= limit else text[: limit - 1] + "…"


def _kind(value: Any) -> str:
    """A JSON-ish name of ``value``'s type for messages (never the value itself)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _says_bad_token(code: int, message: Any) -> bool:
    if code == 401:
        return True
    if type(message) is not str:
        return False
    text = message.lower()
    return any(w in text for w in _TOKEN_WORDS) and any(w in text for w in _BAD_TOKEN_WORDS)


def _describe_body(response: Answer) -> str:
    ctype = (response.headers.get("Content-Type") or "").split(";", 1)[0].strip()
    ctype = _CONTROL.sub("", ctype)[:60] or "no content type"
    return f"{ctype}, {len(response.body)} bytes"


_JSON_STRING: Final = re.compile(rb'"(?:[^"\\]|\\.)*"')


def _json_values(body: bytes | bytearray) -> int:
    """How many values a JSON text holds, about (each opening bracket and each comma outside
    strings), counted without building any of them."""
    total = _structure(body, 0, len(body))
    if total <= MAX_JSON_VALUES:
        return total  # the common case: no need to look inside strings
    for string in _JSON_STRING.finditer(body):
        total -= _structure(body, string.start(), string.end())
    return total + 1


def _structure(body: bytes | bytearray, start: int, end: int) -> int:
    # Counted in place: a copy of a body up to the cap, per poll in flight, is what the value
    # limit is there to avoid.
    return sum(body.count(mark, start, end) for mark in (b",", b"{", b"["))


def _reject_constant(name: str) -> Any:
    # Python's parser accepts NaN and Infinity; JSON has no such numbers, and a document
    # holding them could neither be hashed canonically nor served back as JSON.
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    # 1e400 parses to inf: as unrepresentable as the NaN/Infinity literals.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _small_json_object(response: Answer) -> dict[str, Any] | None:
    """The body as a JSON object if it is a small one (error paths only), else None."""
    content = response.body
    if not content or len(content) > _MAX_ERROR_BODY:
        return None
    try:
        body = json.loads(content)
    except (ValueError, RecursionError):
        return None
    return body if type(body) is dict else None


def _jwt_claims(token: str) -> dict[str, Any]:
    """The JWT payload, unverified (only read for the pool id and lifetime); {} if not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    segment = parts[1]
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        claims = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError):
        return {}
    return claims if type(claims) is dict else {}


def _lifetime(expires_in: Any, claims: dict[str, Any]) -> float | None:
    """Seconds the token lives: ``expires_in``, else the JWT's ``exp - iat``; None if neither."""
    if _is_number(expires_in) and 0 < expires_in < float("inf"):
        return float(expires_in)
    if type(expires_in) is str:
        try:
            value = float(expires_in)
        except ValueError:
            value = 0.0
        if 0 < value < float("inf"):
            return value
    exp, iat = claims.get("exp"), claims.get("iat")
    if _is_number(exp) and _is_number(iat) and exp > iat:
        return float(exp - iat)
    return None


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP-date); None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if 0 <= seconds < float("inf") else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _upstream_error(failure: HttpFailure, endpoint: str, client: GenAuthClient) -> UpstreamError:
    if failure.kind == "timeout":
        return UpstreamError(
            "timeout",
            f"{endpoint}: {failure.detail} (timeout {client.timeout:g} s, "
            f"poll deadline {2 * client.timeout:g} s)",
        )
    if failure.kind == "too_large":
        return UpstreamError(
            "invalid_response",
            f"{endpoint}: answer too large (limit {client.max_response_bytes} bytes); "
            "nothing of it was kept",
        )
    if failure.kind == "undecodable":
        return UpstreamError("invalid_response", f"{endpoint}: {failure.detail}")
    return UpstreamError("network", f"{endpoint}: {failure.detail}")
