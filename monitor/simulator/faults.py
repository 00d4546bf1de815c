"""Fault kinds and their answers: one table says which endpoints take a kind and what it answers.

Kinds and what a request meets while one is set (``delay`` seconds are slept first, except by
the streaming kinds, for which ``delay`` is the pace):

======================== =========================================================================
``http_500_html``,       HTTP 500 / 502 with an nginx-style HTML page (``text/html``)
``http_502_html``
``status_500_body``      HTTP 200, envelope ``statusCode`` 500 with apiCode, message, requestId
``non_json``             HTTP 200, ``text/plain`` garbage
``missing_data``         HTTP 200, a success envelope without ``data``
``wrong_types``          success envelope whose ``data.enabled`` is the string ``"true"`` [1]
``data_not_object``      success envelope whose ``data`` is a list [1]
``subconfig_not_object`` success envelope whose ``data.smtpConfig`` is a string [1]
``slow``                 sleeps ``delay`` seconds, then answers normally
``rate_limit``           HTTP 429 with ``Retry-After: <retry_after>`` and a JSON envelope
``unauthorized``         HTTP 401 "invalid token" even for a valid token [2]
``expired_token_body``   HTTP 200, envelope ``statusCode`` 401 "token expired" [1]
``close``                the connection is closed without any answer [raw]
``huge_body``            HTTP 200 with a Content-Length, a success envelope padded to ``size``
                         bytes [stream]
``gzip_bomb``            HTTP 200, ``Content-Encoding: gzip``: a small body that inflates to
                         ``size`` bytes of valid JSON [stream]
``endless``              HTTP 200, a chunked body that never ends [stream]
``drip``                 HTTP 200 with a Content-Length, a valid success body sent one byte
                         every ``delay`` seconds [stream]
``drip_headers``         the status line and headers sent one byte every ``delay`` seconds, the
                         headers never ending [stream, raw]
``dense_json``           HTTP 200, a valid config padded with ``size`` bytes of tiny JSON objects
                         (``[{},{},...]``: the most Python objects per byte a parser can be made
                         to build) [stream]
``forbidden``            HTTP 403, envelope ``statusCode`` 403 "no permission", apiCode 2004 [3]
``not_offered``          HTTP 404 with the unknown-path envelope, as a private deployment without
                         the endpoint answers [3]
======================== =========================================================================

[1] get-email-provider only, answered in place of the configuration once the token and pool
checks pass. [2] get-email-provider only, answered before the checks. [3] get-admin-audit-logs
only, answered before the checks. Every other kind applies to every endpoint and is answered
before the endpoint looks at the request.

How each answer reaches the wire: the ordinary ones are Starlette responses. Of the hostile
[stream] ones, ``huge_body``, ``endless`` and ``drip`` are ``StreamingResponse`` bodies (uvicorn
writes the status line and headers at once and each chunk as it comes, with the declared
Content-Length or chunked framing, which is exactly the old hand-written bytes), and
``gzip_bomb`` and ``dense_json`` are plain responses of pre-built bytes. Two kinds cannot be said
in ASGI at all: ``close`` (an ASGI app that sends nothing makes uvicorn answer 500) and
``drip_headers`` (uvicorn writes a response head whole). They are a :class:`RawAnswer`: bytes
written straight to the request's own connection, which :mod:`.http` takes over for them.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, TypedDict, Unpack

from starlette.responses import Response, StreamingResponse

from monitor.simulator.wire import (
    API_CODE_BAD_REQUEST,
    API_CODE_FORBIDDEN,
    API_CODE_INTERNAL_ERROR,
    API_CODE_INVALID_TOKEN,
    API_CODE_RATE_LIMITED,
    API_CODE_TOKEN_EXPIRED,
    JSON_TYPE,
    Endpoint,
    dumps,
    error_body,
    success_body,
)

__all__ = [
    "DEFAULT_SIZE",
    "FAULT_KINDS",
    "STREAM_FAULT_KINDS",
    "TOKEN_FAULT_KINDS",
    "Answer",
    "Fault",
    "FaultOptions",
    "Pause",
    "RawAnswer",
    "early_answer",
    "json_response",
    "late_body",
    "make_fault",
]

#: ``size`` of ``huge_body``, ``gzip_bomb`` and ``dense_json`` when none is given: 200 MB.
DEFAULT_SIZE: Final = 200 * 1024 * 1024

#: ``await pause(seconds)`` sleeps unless the server stops first; True when it is stopping.
#: ``pause(0)`` only yields to the event loop, which a stream needs to be cancelled at all once
#: its client hangs up (uvicorn's ``send`` returns at once on a closed connection).
Pause = Callable[[float], Awaitable[bool]]


@dataclass(frozen=True)
class Fault:
    """A fault as set: its kind and options (``times`` is how many requests it answers,
    None for every request until cleared)."""

    kind: str
    times: int | None = None
    delay: float = 0.0
    retry_after: int = 1
    size: int = DEFAULT_SIZE

    @property
    def paced(self) -> bool:
        """Its ``delay`` is the pace of its own answer, never a wait before it."""
        return _KINDS[self.kind].stream


class FaultOptions(TypedDict, total=False):
    """The options of :meth:`SimulatedGenAuth.inject_fault` and its wrappers."""

    times: int | None
    delay: float
    retry_after: int
    size: int


@dataclass(frozen=True)
class RawAnswer:
    """Bytes for the connection itself, outside HTTP framing: ``data`` one byte every ``pace``
    seconds (all at once when 0), then the connection is closed."""

    data: bytes
    pace: float = 0.0


Answer = Response | RawAnswer


def json_response(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> Response:
    # The content type is given as a header, not as ``media_type``: Starlette would add a
    # charset to it, and the answers keep the exact headers they had.
    return Response(
        body, status_code=status, headers={"content-type": JSON_TYPE, **(headers or {})}
    )


# -- the bodies of the hostile answers -------------------------------------------------------

_PAD_CHUNK: Final = b" " * 65536
_HTML_PAGE: Final = (
    "<html>\r\n<head><title>{code} {phrase}</title></head>\r\n<body>\r\n"
    "<center><h1>{code} {phrase}</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)
# Header lines without the blank line that would end them: a client reads forever.
_ENDLESS_HEAD: Final = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" * 1000


def _padded_parts(size: int) -> tuple[bytes, bytes, int]:
    """Head and tail of a success envelope whose ``data.padding`` string of spaces makes the
    whole body ``size`` bytes (at least the envelope itself), and the number of spaces."""
    head = b'{"statusCode":200,"message":"Success","data":{"enabled":true,"padding":"'
    tail = b'"}}'
    return head, tail, max(0, size - len(head) - len(tail))


@functools.cache
def _gzip_bomb(size: int) -> bytes:
    """A gzip body inflating to ``size`` bytes of JSON; built once per size (it takes about a
    second for 200 MB, so :func:`make_fault` builds it before the server needs it)."""
    head, tail, pad = _padded_parts(size)
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [packer.compress(head)]
    full, rest = divmod(pad, len(_PAD_CHUNK))
    parts.extend(packer.compress(_PAD_CHUNK) for _ in range(full))
    parts += [packer.compress(b" " * rest), packer.compress(tail), packer.flush()]
    return b"".join(parts)


@functools.lru_cache(maxsize=4)
def _dense_json(size: int) -> bytes:
    """A valid success envelope of ``size`` bytes that is mostly ``{},{},...``."""
    head = b'{"statusCode":200,"message":"Success","data":{"enabled":true,"dense":['
    count = max(1, (size - len(head) - 2) // 3)
    return head + b"{}," * (count - 1) + b"{}]}}"


async def _padded(size: int, pause: Pause) -> AsyncIterator[bytes]:
    head, tail, pad = _padded_parts(size)
    yield head
    full, rest = divmod(pad, len(_PAD_CHUNK))
    for _ in range(full):
        if await pause(0):
            return
        yield _PAD_CHUNK
    yield b" " * rest + tail


async def _endless(pause: Pause) -> AsyncIterator[bytes]:
    while not await pause(0):
        yield _PAD_CHUNK


async def _dripping(body: bytes, pace: float, pause: Pause) -> AsyncIterator[bytes]:
    for index in range(len(body)):
        yield body[index : index + 1]
        if await pause(pace):
            return


def _html(code: int) -> Response:
    page = _HTML_PAGE.format(code=code, phrase=HTTPStatus(code).phrase).encode("ascii")
    return Response(page, status_code=code, headers={"content-type": "text/html"})


def _huge_body(fault: Fault, pause: Pause) -> Response:
    head, tail, pad = _padded_parts(fault.size)
    length = str(len(head) + pad + len(tail))
    headers = {"content-type": "application/json", "content-length": length}
    return StreamingResponse(_padded(fault.size, pause), headers=headers)


def _drip(fault: Fault, pause: Pause) -> Response:
    body = success_body({"enabled": True})
    headers = {"content-type": "application/json", "content-length": str(len(body))}
    return StreamingResponse(_dripping(body, fault.delay, pause), headers=headers)


def _whole(body: bytes, extra: Mapping[str, str] | None = None) -> Response:
    """A hostile body sent whole with its Content-Length (and ``extra`` headers)."""
    return Response(body, headers={"content-type": "application/json", **(extra or {})})


def _with_data(data: dict[str, Any], **changes: Any) -> bytes:
    return success_body({**data, **changes})


# -- the table -------------------------------------------------------------------------------

EarlyAnswer = Callable[[Fault, Pause], Answer]
LateBody = Callable[[dict[str, Any]], bytes]


@dataclass(frozen=True)
class _Kind:
    #: Answered before the endpoint looks at the request.
    early: EarlyAnswer | None = None
    #: Answered in place of the configuration, once the token and pool checks have passed.
    late: LateBody | None = None
    #: The only endpoint that takes it; None for every endpoint.
    only: Endpoint | None = None
    #: Streams a hostile answer itself: ``delay`` is its pace, not a wait before it.
    stream: bool = False
    needs_delay: bool = False


_KINDS: Final[dict[str, _Kind]] = {
    "http_500_html": _Kind(early=lambda fault, pause: _html(500)),
    "http_502_html": _Kind(early=lambda fault, pause: _html(502)),
    "status_500_body": _Kind(
        early=lambda fault, pause: json_response(
            200, error_body(500, "internal server error", API_CODE_INTERNAL_ERROR)
        )
    ),
    "non_json": _Kind(
        early=lambda fault, pause: Response(
            b"OK <not json> \x00\x01 upstream gateway says hi",
            headers={"content-type": "text/plain"},
        )
    ),
    "missing_data": _Kind(
        early=lambda fault, pause: json_response(
            200, dumps({"statusCode": 200, "message": "Success"})
        )
    ),
    "wrong_types": _Kind(
        late=lambda data: _with_data(data, enabled="true"), only=Endpoint.PROVIDER
    ),
    "data_not_object": _Kind(late=lambda data: success_body([data]), only=Endpoint.PROVIDER),
    "subconfig_not_object": _Kind(
        late=lambda data: _with_data(data, smtpConfig="smtp://smtp.example.com:465"),
        only=Endpoint.PROVIDER,
    ),
    "slow": _Kind(needs_delay=True),
    "rate_limit": _Kind(
        early=lambda fault, pause: json_response(
            429,
            error_body(429, "too many requests", API_CODE_RATE_LIMITED),
            {"retry-after": str(fault.retry_after)},
        )
    ),
    "unauthorized": _Kind(
        early=lambda fault, pause: json_response(
            401, error_body(401, "invalid token", API_CODE_INVALID_TOKEN)
        ),
        only=Endpoint.PROVIDER,
    ),
    "expired_token_body": _Kind(
        late=lambda data: error_body(401, "token expired", API_CODE_TOKEN_EXPIRED),
        only=Endpoint.PROVIDER,
    ),
    "close": _Kind(early=lambda fault, pause: RawAnswer(b"")),
    "huge_body": _Kind(early=_huge_body, stream=True),
    "gzip_bomb": _Kind(
        early=lambda fault, pause: _whole(_gzip_bomb(fault.size), {"content-encoding": "gzip"}),
        stream=True,
    ),
    "endless": _Kind(
        early=lambda fault, pause: StreamingResponse(
            _endless(pause), headers={"content-type": "application/json"}
        ),
        stream=True,
    ),
    "drip": _Kind(early=_drip, stream=True, needs_delay=True),
    "drip_headers": _Kind(
        early=lambda fault, pause: RawAnswer(_ENDLESS_HEAD, pace=fault.delay),
        stream=True,
        needs_delay=True,
    ),
    "dense_json": _Kind(early=lambda fault, pause: _whole(_dense_json(fault.size)), stream=True),
    "forbidden": _Kind(
        early=lambda fault, pause: json_response(
            403, error_body(403, "no permission", API_CODE_FORBIDDEN)
        ),
        only=Endpoint.AUDIT_LOG,
    ),
    "not_offered": _Kind(
        early=lambda fault, pause: json_response(
            404, error_body(404, "not found", API_CODE_BAD_REQUEST)
        ),
        only=Endpoint.AUDIT_LOG,
    ),
}


def _kinds_of(endpoint: Endpoint) -> frozenset[str]:
    return frozenset(name for name, kind in _KINDS.items() if kind.only in (None, endpoint))


#: The kinds each endpoint takes.
KINDS_BY_ENDPOINT: Final[Mapping[Endpoint, frozenset[str]]] = {
    endpoint: _kinds_of(endpoint) for endpoint in Endpoint
}
#: Fault kinds of get-email-provider (every kind).
FAULT_KINDS: Final = KINDS_BY_ENDPOINT[Endpoint.PROVIDER]
#: Fault kinds of get-management-token (``missing_data`` answers a success envelope without
#: ``data`` there too).
TOKEN_FAULT_KINDS: Final = KINDS_BY_ENDPOINT[Endpoint.TOKEN]
#: Faults that stream a hostile answer themselves (any ``delay`` is their pace, not a wait).
STREAM_FAULT_KINDS: Final = frozenset(name for name, kind in _KINDS.items() if kind.stream)


def make_fault(
    endpoint: Endpoint, kind: str | None, **options: Unpack[FaultOptions]
) -> Fault | None:
    """The fault ``kind`` with ``options`` for ``endpoint``, checked; None for ``kind=None``
    (no fault). A bad kind or option is a ValueError."""
    if kind is None:
        return None
    allowed = KINDS_BY_ENDPOINT[endpoint]
    if kind not in allowed:
        raise ValueError(f"unknown fault kind {kind!r}; one of {sorted(allowed)}")
    fault = Fault(kind, **options)
    if fault.times is not None and fault.times < 1:
        raise ValueError("times must be >= 1 or None")
    if _KINDS[kind].needs_delay and fault.delay <= 0:
        raise ValueError(f"the {kind!r} fault needs delay > 0")
    if kind == "gzip_bomb":
        _gzip_bomb(fault.size)  # built now, so the first answer is not late
    return fault


async def early_answer(fault: Fault, pause: Pause) -> Answer | None:
    """What a request meets before its endpoint looks at it, or None to go on (``slow`` after
    its delay, and the kinds answered by :func:`late_body`). Stopping during the delay closes
    the connection without an answer."""
    if fault.delay > 0 and not fault.paced and await pause(fault.delay):
        return RawAnswer(b"")
    answer = _KINDS[fault.kind].early
    return None if answer is None else answer(fault, pause)


def late_body(fault: Fault, data: dict[str, Any]) -> bytes | None:
    """The body served in place of the configuration ``data`` (a copy it may change), or None
    when the fault does not replace it."""
    late = _KINDS[fault.kind].late
    return None if late is None else late(data)
