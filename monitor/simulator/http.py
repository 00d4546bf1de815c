"""The simulated API over HTTP: a Starlette app served by uvicorn on its own event loop in a
background thread, and :class:`SimulatedGenAuth`, which starts and stops it.

The server differs from a plain ``uvicorn.Server`` in three ways, each for the tests:

- **it stops at once and cuts every connection.** ``stop()`` closes the listening socket (new
  clients are refused), aborts every open connection (a client holding a kept-alive connection
  sees it closed, then is refused), and ends the pauses of answers still in progress (``slow``,
  ``drip``, ...). uvicorn's own shutdown instead drains connections for up to its graceful
  timeout and looks at ``should_exit`` only every 0.1 s, which hundreds of short-lived
  simulators in the suite would each pay.
- **idle keep-alive connections stay open** (an hour, where uvicorn's default is 5 s), like the
  old ``http.server`` simulator's: a server closing an idle connection just as a client reuses
  it makes that client's request fail as a network error, which a test would read as a fault.
- **a raw side path on the same connection** for the two faults that ASGI cannot express (see
  :mod:`.faults`): for a :class:`~.faults.RawAnswer` the app looks up the request's connection
  among uvicorn's open ones (by the client address, which is why proxy headers are off), writes
  the bytes to its transport itself, closes it, and returns only once uvicorn has seen the
  connection gone, so uvicorn adds nothing of its own (an app returning without an answer on a
  live connection would get a 500 from it).

``h11`` is uvicorn's HTTP implementation here because it is the one installed with uvicorn
(httptools is not a dependency; ``http="httptools"`` here would cut the CPU of a request to half
or less); no access log, no lifespan, no ``Date`` or ``Server`` header (the old simulator sent
neither), nothing but the two routes and a 404 envelope for the rest. Two things differ on the
wire from the old ``http.server`` simulator, neither of which matters to an HTTP client: header
names go out lower-case (Starlette writes them so), and after a hostile answer that was sent
whole (``gzip_bomb``, ``dense_json``, a ``huge_body`` read to its end) the connection stays open
for the next request instead of being closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Final, Self, Unpack

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from monitor.simulator.audit import DEFAULT_ADMIN, Admin, AuditLog, AuditQuery
from monitor.simulator.faults import (
    Fault,
    FaultOptions,
    RawAnswer,
    early_answer,
    json_response,
    late_body,
    make_fault,
)
from monitor.simulator.state import Clock, PoolState
from monitor.simulator.wire import (
    API_CODE_BAD_REQUEST,
    API_CODE_INVALID_CREDENTIALS,
    API_CODE_INVALID_TOKEN,
    API_CODE_POOL_MISMATCH,
    API_CODE_TOKEN_EXPIRED,
    AUDIT_LOG_PATH,
    PROVIDER_PATH,
    TOKEN_PATH,
    Endpoint,
    dumps,
    error_body,
)

__all__ = ["SimulatedGenAuth"]

# How long stop() lets the answers in progress finish once their connections are cut and their
# pauses ended (they finish at their next await; this only bounds a bug).
_GRACE: Final = 2.0
_START_TIMEOUT: Final = 10.0
_IDLE_KEEP_ALIVE: Final = 3600


class _Server(uvicorn.Server):
    """uvicorn serving one pool, stopped the way the module docstring says."""

    def __init__(self, pool: PoolState) -> None:
        # Both events are bound to the server's loop on first use (in that loop); stop()
        # reaches them through call_soon_threadsafe.
        self._exit_requested = asyncio.Event()
        self._stopping = asyncio.Event()
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        super().__init__(
            uvicorn.Config(
                _app(pool, self),
                http="h11",
                ws="none",
                loop="asyncio",
                interface="asgi3",
                lifespan="off",
                log_config=None,
                access_log=False,
                proxy_headers=False,
                server_header=False,
                date_header=False,
                timeout_keep_alive=_IDLE_KEEP_ALIVE,
            )
        )

    # -- the thread -----------------------------------------------------------------------

    def serve_in_background(self, sock: socket.socket, name: str) -> None:
        """Serve on ``sock`` (bound) in a daemon thread; returns once it accepts connections."""
        self._socket = sock
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT) or not self.started:
            self.stop()
            raise RuntimeError("the simulated GenAuth API did not start")

    def _run(self) -> None:
        assert self._socket is not None
        try:
            self.run(sockets=[self._socket])
        finally:
            self._ready.set()  # also when start-up failed, so serve_in_background returns

    def stop(self) -> None:
        loop = self._event_loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                loop.call_soon_threadsafe(self._exit_requested.set)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._socket is not None:
            self._socket.close()

    # -- uvicorn's life cycle, changed ----------------------------------------------------

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._event_loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        self._ready.set()

    async def main_loop(self) -> None:
        # uvicorn's ticks only refresh the Date and Server headers (both off here) and poll
        # should_exit; one tick sets the default headers, then stop() wakes this at once.
        await self.on_tick(0)
        await self._exit_requested.wait()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for connection in self._connections():
            connection.transport.abort()
        # One turn of the loop runs the connection_lost callbacks the aborts queued, so every
        # answer in progress is marked disconnected before it can see the stop: a stream that
        # ends early then sends nothing more (else uvicorn would try to end its body, short of
        # its Content-Length, and log an error).
        await asyncio.sleep(0)
        self._stopping.set()
        tasks = list(self.server_state.tasks)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=_GRACE)
            for task in late:
                task.cancel()
        for server in self.servers:
            await server.wait_closed()

    # -- for the app ----------------------------------------------------------------------

    async def pause(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless the server stops first; True when it is stopping."""
        if seconds <= 0:
            await asyncio.sleep(0)
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._stopping.wait()
        return self._stopping.is_set()

    def transport_of(self, client: object) -> asyncio.Transport | None:
        """The transport of the open connection from ``client`` (the scope's address)."""
        for connection in self._connections():
            if connection.client == client:
                return connection.transport
        return None

    def _connections(self) -> list[H11Protocol]:
        # A list, as connections leave the set when they close. All are H11Protocol (http="h11");
        # the isinstance only tells mypy.
        return [c for c in self.server_state.connections if isinstance(c, H11Protocol)]


class _RawResponse(Response):
    """A :class:`RawAnswer` written to the request's own connection, outside uvicorn."""

    def __init__(self, answer: RawAnswer, server: _Server) -> None:
        super().__init__()  # never sent: the bytes below are the answer
        self._answer = answer
        self._server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        transport = self._server.transport_of(scope.get("client"))
        if transport is None:
            return  # gone already (the client hung up, or stop() cut it): nothing to answer
        await self._write(transport)
        transport.close()
        # Returning before uvicorn has seen the connection go would make it send a 500.
        while (await receive())["type"] != "http.disconnect":
            pass

    async def _write(self, transport: asyncio.Transport) -> None:
        data, pace = self._answer.data, self._answer.pace
        if pace <= 0:
            transport.write(data)
            return
        for index in range(len(data)):
            if transport.is_closing():  # the client hung up
                return
            transport.write(data[index : index + 1])
            if await self._server.pause(pace):
                return


class _Endpoints:
    """The endpoints of the V3 API the monitor uses."""

    def __init__(self, pool: PoolState, server: _Server) -> None:
        self._pool = pool
        self._server = server

    async def _fault_first(
        self, endpoint: Endpoint, request: Request
    ) -> tuple[Fault | None, Response | None]:
        """Count the request; the fault it meets and that fault's early answer, if any."""
        fault = self._pool.arrive(endpoint, request.headers)
        if fault is None:
            return None, None
        answer = await early_answer(fault, self._server.pause)
        if isinstance(answer, RawAnswer):
            return fault, _RawResponse(answer, self._server)
        return fault, answer

    async def token(self, request: Request) -> Response:
        body = await request.body()
        _, answer = await self._fault_first(Endpoint.TOKEN, request)
        if answer is not None:
            return answer
        try:
            sent = json.loads(body)
        except (ValueError, RecursionError):
            sent = None
        if not isinstance(sent, dict):
            return json_response(400, error_body(400, "invalid request body", API_CODE_BAD_REQUEST))
        key_id, key_secret = sent.get("accessKeyId"), sent.get("accessKeySecret")
        if not (
            isinstance(key_id, str)
            and isinstance(key_secret, str)
            and self._pool.credentials_match(key_id, key_secret)
        ):
            # HTTP 200 with a failure envelope, as the V3 API answers business errors.
            message = "accessKeyId or accessKeySecret is invalid"
            return json_response(200, error_body(401, message, API_CODE_INVALID_CREDENTIALS))
        token, ttl = self._pool.issue_token()
        data = {"access_token": token, "expires_in": ttl}
        return json_response(200, dumps({"statusCode": 200, "message": "success", "data": data}))

    def _refused(self, request: Request) -> Response | None:
        """The answer to a request without a good token and this pool's id, else None."""
        headers = request.headers
        scheme, _, token = (headers.get("authorization") or "").partition(" ")
        problem = (
            self._pool.check_token(token.strip()) if scheme.lower() == "bearer" else "invalid token"
        )
        if problem is not None:
            code = API_CODE_TOKEN_EXPIRED if problem == "token expired" else API_CODE_INVALID_TOKEN
            return json_response(401, error_body(401, problem, code))
        pool_id = headers.get("x-authing-userpool-id") or headers.get("x-genauth-userpool-id")
        if pool_id != self._pool.userpool_id:
            message = "userpool id missing or does not match the token"
            return json_response(403, error_body(403, message, API_CODE_POOL_MISMATCH))
        return None

    async def provider(self, request: Request) -> Response:
        fault, answer = await self._fault_first(Endpoint.PROVIDER, request)
        if answer is not None:
            return answer
        refused = self._refused(request)
        if refused is not None:
            return refused
        body = None if fault is None else late_body(fault, self._pool.data)
        return json_response(200, self._pool.success_body() if body is None else body)

    async def audit_log(self, request: Request) -> Response:
        body = await request.body()
        _, answer = await self._fault_first(Endpoint.AUDIT_LOG, request)
        if answer is not None:
            return answer
        refused = self._refused(request)
        if refused is not None:
            return refused
        query = _audit_query(body)
        if query is None:
            return json_response(400, error_body(400, "invalid request body", API_CODE_BAD_REQUEST))
        total, entries = self._pool.audit.query(query)
        data = {"totalCount": total, "list": entries}
        return json_response(200, dumps({"statusCode": 200, "message": "Success", "data": data}))


def _audit_query(body: bytes) -> AuditQuery | None:
    """The filters and page of a get-admin-audit-logs body; None when it is not one."""
    try:
        sent = json.loads(body or b"{}")
    except (ValueError, RecursionError):
        return None
    if not isinstance(sent, dict):
        return None
    paging = sent.get("pagination") or {}
    texts = ("operationType", "resourceType", "userId", "clientIp", "requestId")
    numbers = [sent.get("start"), sent.get("end"), paging.get("page", 1), paging.get("limit", 10)]
    if (
        not isinstance(paging, dict)
        or any(v is not None and not isinstance(v, str) for v in map(sent.get, texts))
        or any(v is not None and (type(v) is not int) for v in numbers)
        or sent.get("success") not in (None, True, False)
    ):
        return None
    start, end, page, limit = numbers
    return AuditQuery(
        start_ms=start,
        end_ms=end,
        operation_type=sent.get("operationType"),
        resource_type=sent.get("resourceType"),
        user_id=sent.get("userId"),
        client_ip=sent.get("clientIp"),
        request_id=sent.get("requestId"),
        success=sent.get("success"),
        page=page if page is not None else 1,
        limit=limit if limit is not None else 10,
    )


async def _not_found(request: Request, exc: Exception) -> Response:
    return json_response(404, error_body(404, "not found", API_CODE_BAD_REQUEST))


def _app(pool: PoolState, server: _Server) -> Starlette:
    endpoints = _Endpoints(pool, server)
    return Starlette(
        routes=[
            Route(TOKEN_PATH, endpoints.token, methods=["POST"]),
            Route(PROVIDER_PATH, endpoints.provider, methods=["GET"]),
            Route(AUDIT_LOG_PATH, endpoints.audit_log, methods=["POST"]),
        ],
        # A known path with another method is as unknown as any other path (the old
        # simulator's answer; Starlette's would be a 405).
        exception_handlers={404: _not_found, 405: _not_found},
    )


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP spelled out: asyncio turns Nagle's algorithm off only on sockets whose proto
    # says TCP, and with it on, the body of every answer after the first on a connection waits
    # for the client's delayed ACK (40 ms: 20 requests a second).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        # A restarted standalone simulator gets its port back at once.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class SimulatedGenAuth:
    """The simulated API of one user pool. ``start()`` binds and serves; ``stop()`` (or
    ``with``) ends it. The state tests drive is :attr:`pool`; the properties and methods here
    are the names tests and the demo use for it."""

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
        clock: Clock = time.time,
    ) -> None:
        self.pool = PoolState(
            access_key_id=access_key_id,
            access_key_secret=access_key_secret,
            userpool_id=userpool_id,
            token_ttl=token_ttl,
            data=data,
            clock=clock,
        )
        self.host = host
        self.port = port
        self._server: _Server | None = None
        self._base_url: str | None = None

    def __repr__(self) -> str:
        where = self._base_url or "not started"
        return f"SimulatedGenAuth({where}, userpool_id={self.userpool_id!r})"

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("simulator already started")
        sock = _bind(self.host, self.port)
        self.port = int(sock.getsockname()[1])
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self._base_url = f"http://{shown}:{self.port}"
        server = _Server(self.pool)  # a new one each start: its events belong to one loop
        server.serve_in_background(sock, name=f"genauth-simulator:{self.port}")
        self._server = server
        return self

    def stop(self) -> None:
        """Stop serving and cut every open keep-alive connection."""
        server, self._server = self._server, None
        if server is not None:
            server.stop()

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

    # -- the pool -------------------------------------------------------------------------

    @property
    def access_key_id(self) -> str:
        return self.pool.access_key_id

    @property
    def access_key_secret(self) -> str:
        return self.pool.access_key_secret

    @property
    def userpool_id(self) -> str:
        return self.pool.userpool_id

    @property
    def token_ttl(self) -> int:
        return self.pool.token_ttl

    @property
    def data(self) -> dict[str, Any]:
        """A deep copy of the configuration currently served."""
        return self.pool.data

    def set_data(self, data: Mapping[str, Any], *, by: Admin | None = DEFAULT_ADMIN) -> None:
        """Serve ``data`` (deep-copied) from now on, a change made in the console by ``by``
        and recorded in the admin audit log; ``by=None``: a change the log never records."""
        old = self.pool.data
        self.pool.set_data(data)
        if by is not None:
            self.pool.audit.record_change(by, old, self.pool.data)

    @property
    def audit(self) -> AuditLog:
        """The admin audit log: ``record(...)`` adds an entry, ``lag`` delays what is served."""
        return self.pool.audit

    @property
    def audit_log_requests(self) -> int:
        return self.pool.requests(Endpoint.AUDIT_LOG)

    @property
    def token_requests(self) -> int:
        return self.pool.requests(Endpoint.TOKEN)

    @property
    def provider_requests(self) -> int:
        return self.pool.requests(Endpoint.PROVIDER)

    @property
    def last_provider_headers(self) -> dict[str, str]:
        """Headers of the last get-email-provider request, names lower-cased."""
        return self.pool.last_headers(Endpoint.PROVIDER)

    def reset_counters(self) -> None:
        self.pool.reset_counters()

    def expire_tokens(self) -> None:
        """Every token issued so far is now expired."""
        self.pool.expire_tokens()

    # -- faults ---------------------------------------------------------------------------

    def inject_fault(
        self, endpoint: Endpoint, kind: str | None, **options: Unpack[FaultOptions]
    ) -> None:
        """Answer requests to ``endpoint`` with the fault ``kind`` (see :mod:`.faults`);
        ``kind=None`` clears it. Options: ``times`` (None: until cleared), ``delay`` (slept
        first, or the pace of a streaming fault), ``retry_after`` (of ``rate_limit``),
        ``size`` (the decoded body size of ``huge_body``, ``gzip_bomb`` and ``dense_json``)."""
        self.pool.set_fault(endpoint, make_fault(endpoint, kind, **options))

    def set_fault(self, kind: str | None, **options: Unpack[FaultOptions]) -> None:
        """:meth:`inject_fault` into get-email-provider (kinds in ``FAULT_KINDS``)."""
        self.inject_fault(Endpoint.PROVIDER, kind, **options)

    def set_token_fault(self, kind: str | None, **options: Unpack[FaultOptions]) -> None:
        """:meth:`inject_fault` into get-management-token (kinds in ``TOKEN_FAULT_KINDS``)."""
        self.inject_fault(Endpoint.TOKEN, kind, **options)
