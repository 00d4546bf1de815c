"""HTTP with a deadline and a size cap on everything read: the one way genauth-monitor talks HTTP.

``requests`` bounds each socket read by its timeout, not a request as a whole: an upstream that
drips one byte a second keeps a poll alive for ever, and a body (or a gzip bomb) of any size is
read into memory. Here every request has

- a **deadline** (monotonic time) for connect, headers and body together: the socket of a
  request still running at its deadline is shut down by one reaper thread, which wakes any read
  blocked on it at once (a drip of headers or body, a stalled TLS handshake after connect);
- a **size cap** on the body *after* decompression: the body is read raw in chunks and
  decompressed here with a bounded output (``Accept-Encoding`` offers only gzip and deflate),
  so neither an endless chunked stream nor a bomb costs more than the cap;
- a **process-wide budget** of body bytes in flight (:func:`body_budget`): however many
  requests run, the bodies held at once stay under it (a request waits for room, up to its
  deadline), so a hostile upstream cannot multiply the cap by the number of workers;
- :func:`abort` shuts down every request in flight on a session and refuses new ones (SIGTERM
  must not wait for a slow peer).

Failures are :class:`HttpFailure` with a ``kind`` the caller maps onto its own error class;
messages never carry a URL or a body.
"""

from __future__ import annotations

import heapq
import itertools
import os
import socket
import threading
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

import requests
from requests.adapters import DEFAULT_CA_BUNDLE_PATH, HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from monitor.errors import MonitorError

if TYPE_CHECKING:  # the stubs' names for requests' pool-key dicts
    from requests.adapters import _HostParams, _PoolKwargs

__all__ = [
    "ACCEPT_ENCODING",
    "Answer",
    "HttpFailure",
    "abort",
    "body_budget",
    "bounded_request",
    "bounded_session",
    "set_body_budget",
]

ACCEPT_ENCODING: Final = "gzip, deflate"
_CHUNK: Final = 64 * 1024

FailureKind = Literal["timeout", "network", "tls", "too_large", "undecodable"]


class HttpFailure(MonitorError):
    """A request that did not give a complete, bounded answer."""

    def __init__(self, kind: FailureKind, detail: str) -> None:
        super().__init__(detail)
        self.kind: FailureKind = kind
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole answer: status, headers and the decoded body, read within the bounds."""

    status: int
    headers: Mapping[str, str]
    body: bytes


# -- the reaper: sockets of requests in flight, shut down at their deadline -------------------


# How late past its deadline a request may be shut down (the reaper's wake-up grain).
REAP_GRAIN: Final = 0.05


class _Reaper:
    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._live: dict[int, tuple[float, int, socket.socket]] = {}
        self._heap: list[tuple[float, int]] = []
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._local = threading.local()
        self._aborted: set[int] = set()  # sessions (by id) whose requests are refused

    # The deadline of the request this thread is making; the connection classes below read it.
    def begin(self, deadline: float, group: int) -> None:
        self._local.deadline = deadline
        self._local.group = group
        self._local.tickets = []

    def end(self) -> None:
        tickets: list[int] = getattr(self._local, "tickets", [])
        self._local.deadline = None
        self._local.tickets = []
        with self._lock:
            for ticket in tickets:
                self._live.pop(ticket, None)

    def expired(self) -> bool:
        deadline = getattr(self._local, "deadline", None)
        if getattr(self._local, "group", None) in self._aborted:
            return True
        return deadline is not None and time.monotonic() >= deadline

    def refused(self, group: int) -> bool:
        return group in self._aborted

    def watch(self, sock: socket.socket | None) -> None:
        deadline = getattr(self._local, "deadline", None)
        if sock is None or deadline is None:
            return
        group: int = self._local.group
        with self._lock:
            if group in self._aborted:
                _shut(sock)
                return
            ticket = next(self._ids)
            self._live[ticket] = (deadline, group, sock)
            # The reaper sleeps until the earliest deadline; it needs waking only when this one
            # comes first (rarely: a request's deadline is mostly later than those before it),
            # not for every request.
            earlier = not self._heap or deadline < self._heap[0][0]
            heapq.heappush(self._heap, (deadline, ticket))
            self._local.tickets.append(ticket)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="http-reaper", daemon=True)
                self._thread.start()
            elif earlier:
                self._lock.notify()

    def abort(self, group: int) -> None:
        with self._lock:
            self._aborted.add(group)
            for ticket, (_, owner, sock) in list(self._live.items()):
                if owner == group:
                    _shut(sock)
                    del self._live[ticket]

    def _run(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    _, ticket = heapq.heappop(self._heap)
                    entry = self._live.pop(ticket, None)
                    if entry is not None:
                        _shut(entry[2])
                # Most entries are of requests that ended long before their deadline, one per
                # request: waking for each would cost a thread switch per request. Waking at
                # most every REAP_GRAIN pops them in batches; a deadline is kept to that grain.
                wait = self._heap[0][0] - now if self._heap else 60.0
                self._lock.wait(min(max(wait, REAP_GRAIN), 60.0))


def _shut(sock: socket.socket) -> None:
    # The plain socket's shutdown, also for an SSLSocket: it wakes a thread blocked in a read
    # of it, where close() would not. A socket closed meanwhile has fileno -1 and is skipped,
    # so a descriptor number reused by another connection is never touched.
    try:
        if sock.fileno() >= 0:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


_REAPER: Final = _Reaper()


def abort(session: requests.Session) -> None:
    """Shut down every request in flight on ``session`` and refuse new ones on it (the process
    is stopping)."""
    _REAPER.abort(id(session))


class _WatchedHTTPConnection(HTTPConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        super().request(*args, **kwargs)
        # Connected now (a new connection or a kept-alive one): from here the headers and the
        # body are read from this socket, under the request's deadline.
        _REAPER.watch(self.sock)


class _WatchedHTTPSConnection(HTTPSConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        super().request(*args, **kwargs)
        _REAPER.watch(self.sock)


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _WatchedAdapter(HTTPAdapter):
    """requests' adapter with the watched pools, and its CA-location checks made once.

    requests asks the file system on every request whether the CA bundle is a directory
    (``os.path.isdir``, twice on HTTPS, and ``os.path.exists`` too), although the answer
    chooses only which urllib3 attribute gets the path (``ca_cert_dir`` or ``ca_certs``).
    Here each location is looked at once per adapter and the answer kept; everything else is
    requests' own: certificates stay required, a location that does not exist is refused on
    every request until it does (never remembered), and a verification that fails still fails.
    A bundle removed after its first use fails the next new connection (urllib3 cannot load
    it) instead of the next request.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Before super(): it builds the pool manager, which reads nothing of this.
        self._ca_kinds: dict[str, str] = {}  # location -> "ca_cert_dir" or "ca_certs"
        super().__init__(*args, **kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _WatchedHTTPPool,
            "https": _WatchedHTTPSPool,
        }

    def _ca_kind(self, location: str) -> str:
        """Which urllib3 attribute takes ``location``; OSError (requests' own message) when
        nothing is there."""
        kind = self._ca_kinds.get(location)
        if kind is None:
            if not os.path.exists(location):
                raise OSError(
                    f"Could not find a suitable TLS CA certificate bundle, invalid path: {location}"
                )
            kind = "ca_cert_dir" if os.path.isdir(location) else "ca_certs"
            self._ca_kinds[location] = kind
        return kind

    def build_connection_pool_key_attributes(
        self,
        request: requests.PreparedRequest,
        verify: bool | str,
        cert: str | tuple[str, str] | None = None,
    ) -> tuple[_HostParams, _PoolKwargs]:
        if not isinstance(verify, str):
            return super().build_connection_pool_key_attributes(request, verify, cert)
        # requests' answer for verify=True (certificates required) plus the location under
        # the key requests would choose: the same pool key, without the isdir.
        host, pool = super().build_connection_pool_key_attributes(request, True, cert)
        if self._pool_key_of(verify) == "ca_cert_dir":
            pool["ca_cert_dir"] = verify
        else:
            pool["ca_certs"] = verify
        return host, pool

    def _pool_key_of(self, location: str) -> str:
        # A missing location is keyed as a file, as requests does (isdir is false); on HTTPS
        # cert_verify refuses the request right after, and HTTP needs no CA.
        try:
            return self._ca_kind(location)
        except OSError:
            return "ca_certs"

    def cert_verify(self, conn: Any, url: str, verify: bool | str, cert: Any) -> None:
        if cert is not None or not verify or not url.lower().startswith("https"):
            super().cert_verify(conn, url, verify, cert)  # type: ignore[no-untyped-call]
            return
        location = DEFAULT_CA_BUNDLE_PATH if verify is True else verify
        kind = self._ca_kind(location)
        conn.cert_reqs = "CERT_REQUIRED"
        setattr(conn, kind, location)


def bounded_session(pool_size: int = 10) -> requests.Session:
    """A session whose connections honour :func:`bounded_request`'s deadline. It does not read
    the environment per call (``trust_env`` off): callers resolve proxies once."""
    session = requests.Session()
    session.trust_env = False
    adapter = _WatchedAdapter(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


# -- the budget of body bytes in flight ------------------------------------------------------

DEFAULT_BUDGET: Final = 4 * 1024 * 1024


class _Budget:
    """Room for bodies in flight. A body up to SMALL bytes (every real answer) needs none; a
    larger one reserves its whole cap at once, so a holder never waits again and readers
    cannot deadlock each holding part of the room."""

    SMALL: Final = 64 * 1024

    def __init__(self, total: int) -> None:
        self.total = total
        self._reserved = 0
        self._cond = threading.Condition()
        self._local = threading.local()

    def take(self, size: int, cap: int, deadline: float) -> None:
        """Account ``size`` more bytes of the current scope's body (at most ``cap`` in all)."""
        local = self._local
        if getattr(local, "read", None) is None:
            return  # not within a budget scope (the sinks: their answers are tiny)
        local.read += size
        if local.read <= self.SMALL or local.reserved:
            return
        with self._cond:
            # An empty budget always lets one reader in: a body up to its cap must be
            # readable even when that cap alone exceeds the budget.
            while self._reserved and self._reserved + cap > self.total:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HttpFailure("timeout", "no room for the body before the deadline")
                self._cond.wait(left)
            self._reserved += cap
            local.reserved = cap

    def enter(self) -> None:
        self._local.read, self._local.reserved = 0, 0

    def leave(self) -> None:
        reserved = getattr(self._local, "reserved", 0)
        self._local.read, self._local.reserved = None, 0
        if reserved:
            with self._cond:
                self._reserved -= reserved
                self._cond.notify_all()


_BUDGET: Final = _Budget(DEFAULT_BUDGET)


def set_body_budget(total: int) -> None:
    """The process-wide room for bodies in flight (at least the largest ``max_bytes`` used)."""
    _BUDGET.total = max(total, 64 * 1024)


class body_budget:
    """Bodies read in this thread within the ``with`` count against the budget until it ends
    (the caller's parsing of them included)."""

    def __enter__(self) -> None:
        _BUDGET.enter()

    def __exit__(self, *exc: object) -> None:
        _BUDGET.leave()


# -- one bounded request ----------------------------------------------------------------------


def bounded_request(
    session: requests.Session,
    request: requests.PreparedRequest,
    *,
    timeout: float,
    deadline: float,
    max_bytes: int,
    verify: bool | str = True,
    proxies: Mapping[str, str] | None = None,
) -> Answer:
    """Send ``request`` and read its whole answer within ``timeout`` seconds and by
    ``deadline`` (monotonic; the caller's larger budget), with at most ``max_bytes`` of decoded
    body; :class:`HttpFailure` otherwise."""
    now = time.monotonic()
    deadline = min(deadline, now + timeout)
    step = deadline - now
    if step <= 0:
        raise HttpFailure("timeout", "no time left before the deadline")
    if _REAPER.refused(id(session)):
        raise HttpFailure("network", "stopping: no new requests")
    _REAPER.begin(deadline, id(session))
    try:
        try:
            # The session's adapter itself, not Session.send: what Session.send adds (hooks,
            # a cookie jar, redirects, timing) is unused here and cost about 5% of a poll.
            response = session.get_adapter(request.url or "").send(
                request,
                stream=True,
                timeout=(step, step),
                verify=verify,
                proxies=dict(proxies or {}),
            )
        except requests.RequestException as exc:
            raise _translate(exc) from None
        try:
            body = _read_body(response, max_bytes, deadline)
        except BaseException:
            response.close()  # an unread rest: the connection cannot be reused
            raise
        response.raw.release_conn()  # read to the end: keep the connection alive
        return Answer(response.status_code, response.headers, body)
    finally:
        _REAPER.end()


def _read_body(response: requests.Response, max_bytes: int, deadline: float) -> bytes:
    declared = response.headers.get("Content-Length", "")
    encoding = (response.headers.get("Content-Encoding") or "identity").strip().lower()
    if encoding == "identity" and declared.isdigit() and int(declared) > max_bytes:
        raise HttpFailure("too_large", f"body of {int(declared)} bytes exceeds {max_bytes}")
    decoder = _Decoder(encoding, max_bytes, deadline)
    try:
        for chunk in response.raw.stream(_CHUNK, decode_content=False):
            decoder.feed(chunk)
    except HttpFailure:
        raise
    except Exception as exc:  # urllib3/http.client raise many kinds mid-body
        raise _translate(exc) from None
    return decoder.finish()


class _Decoder:
    """Content-Encoding undone with a bounded output."""

    def __init__(self, encoding: str, limit: int, deadline: float) -> None:
        self._limit = limit
        self._deadline = deadline
        self._parts: list[bytes] = []
        self._size = 0
        self._inflate: Any = None
        if encoding in ("gzip", "x-gzip"):
            self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._inflate = zlib.decompressobj()
        elif encoding != "identity":
            raise HttpFailure("undecodable", "body has an unsupported content encoding")
        self._first = True

    def feed(self, chunk: bytes) -> None:
        if self._inflate is None:
            self._add(chunk)
            return
        data = chunk
        while data:
            try:
                out = self._inflate.decompress(data, self._limit - self._size + 1)
            except zlib.error:
                if not (self._first and self._retry_raw_deflate(data)):
                    raise HttpFailure("undecodable", "body could not be decompressed") from None
                return
            self._first = False
            self._add(out)
            data = self._inflate.unconsumed_tail

    def _retry_raw_deflate(self, data: bytes) -> bool:
        # Some servers send "deflate" without the zlib header (raw DEFLATE).
        self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        self._first = False
        self.feed(data)
        return True

    def _add(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit:
            raise HttpFailure("too_large", f"body exceeds {self._limit} bytes")
        if data:
            _BUDGET.take(len(data), self._limit, self._deadline)
            self._parts.append(data)

    def finish(self) -> bytes:
        if self._inflate is not None:
            self._add(self._inflate.flush())
        # One allocation of the final size (a growing buffer would leave a trail of copies).
        return b"".join(self._parts)


def _translate(exc: BaseException) -> HttpFailure:
    """A library exception as an HttpFailure without URL or body (no chained context)."""
    if _REAPER.expired():
        return HttpFailure("timeout", "did not finish before its deadline")
    if isinstance(exc, requests.Timeout | TimeoutError | socket.timeout):
        phase = "connect" if isinstance(exc, requests.ConnectTimeout) else "read"
        return HttpFailure("timeout", f"{phase} timed out")
    if isinstance(exc, requests.exceptions.SSLError):
        return HttpFailure("tls", f"TLS failed ({root_cause(exc)})")
    if isinstance(exc, requests.exceptions.ContentDecodingError):
        return HttpFailure("undecodable", "body could not be decoded")
    text = root_cause(exc)
    if "timed out" in text.lower():
        return HttpFailure("timeout", "read timed out")
    return HttpFailure("network", f"connection failed ({text})")


def root_cause(exc: BaseException) -> str:
    """A short, URL-free reason: the OS error text if there is one, else a class name."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    deepest = type(exc).__name__
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        if current is not exc:
            deepest = type(current).__name__
        linked = [a for a in current.args if isinstance(a, BaseException)]
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            linked.append(reason)
        for link in (current.__cause__, current.__context__):
            if link is not None:
                linked.append(link)
        stack.extend(reversed(linked))
    return deepest
