"""The simulator's own server: stop() cuts answers in progress at once and quietly, the raw
``close`` answer sends nothing, faults are set per endpoint through one mechanism."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator

import pytest

from monitor.simulator import (
    API_CODE_RATE_LIMITED,
    PROVIDER_PATH,
    TOKEN_PATH,
    Endpoint,
    SimulatedGenAuth,
)

SECRET = "server-test-secret"


@pytest.fixture
def sim() -> Iterator[SimulatedGenAuth]:
    with SimulatedGenAuth(access_key_id="srv-pool", access_key_secret=SECRET) as server:
        yield server


def _connect(sim: SimulatedGenAuth) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", sim.port), timeout=5)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def _request(method: str, path: str, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: sim\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode("ascii") + body


def _read_response(conn: socket.socket) -> bytes:
    """One whole answer with a Content-Length (head and body may come in separate segments)."""
    got = b""
    while b"\r\n\r\n" not in got:
        got += conn.recv(65536)
    head, _, body = got.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += conn.recv(65536)
    assert len(body) == length, "more than the Content-Length"
    return head + b"\r\n\r\n" + body


def _read_until_closed(conn: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything the server sends until it closes (a reset counts as closed)."""
    got = b""
    try:
        while len(got) < limit:
            chunk = conn.recv(65536)
            if not chunk:
                break
            got += chunk
    except ConnectionResetError:
        pass
    return got


def _wait_for(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("slow", {"delay": 30.0}),
        ("drip", {"delay": 30.0}),
        ("drip_headers", {"delay": 30.0}),
        ("endless", {}),
        ("huge_body", {}),
    ],
)
def test_stop_cuts_an_answer_in_progress_at_once_and_quietly(
    sim: SimulatedGenAuth,
    kind: str,
    options: dict[str, float],
    caplog: pytest.LogCaptureFixture,
) -> None:
    sim.set_fault(kind, **options)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="uvicorn"), _connect(sim) as conn:
        conn.sendall(_request("GET", PROVIDER_PATH))
        _wait_for(lambda: sim.provider_requests == 1)
        if kind in ("endless", "huge_body"):
            conn.recv(1)  # the stream has begun; the client stops reading now
        started = time.monotonic()
        sim.stop()
        assert time.monotonic() - started < 1.0
        conn.settimeout(2)
        _read_until_closed(conn)  # ends: the connection was cut, not left open
    assert not [r for r in caplog.records if r.name.startswith("uvicorn")]


def test_stop_cuts_idle_keep_alive_connections_and_refuses_new_ones(
    sim: SimulatedGenAuth,
) -> None:
    with _connect(sim) as conn:
        conn.sendall(_request("GET", "/nowhere"))
        assert _read_response(conn).startswith(b"HTTP/1.1 404 ")
        sim.stop()
        conn.settimeout(2)
        assert _read_until_closed(conn) == b""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", sim.port), timeout=2)


@pytest.mark.parametrize("endpoint", [Endpoint.PROVIDER, Endpoint.TOKEN])
def test_close_closes_the_connection_without_a_byte(
    sim: SimulatedGenAuth, endpoint: Endpoint, caplog: pytest.LogCaptureFixture
) -> None:
    sim.inject_fault(endpoint, "close")
    request = (
        _request("GET", PROVIDER_PATH)
        if endpoint is Endpoint.PROVIDER
        else _request("POST", TOKEN_PATH, b"{}")
    )
    with caplog.at_level(logging.WARNING, logger="uvicorn"), _connect(sim) as conn:
        conn.sendall(request)
        assert _read_until_closed(conn) == b""
    assert not [r for r in caplog.records if r.name.startswith("uvicorn")]


def test_a_fault_belongs_to_its_endpoint_and_counts_down(sim: SimulatedGenAuth) -> None:
    sim.inject_fault(Endpoint.TOKEN, "rate_limit", times=1, retry_after=3)
    credentials = json.dumps({"accessKeyId": "srv-pool", "accessKeySecret": SECRET}).encode()
    with _connect(sim) as conn:
        conn.sendall(_request("GET", PROVIDER_PATH))
        assert _read_response(conn).startswith(b"HTTP/1.1 401 ")  # the provider has no fault
        conn.sendall(_request("POST", TOKEN_PATH, credentials))
        limited = _read_response(conn)
        assert limited.startswith(b"HTTP/1.1 429 ")
        assert b"\r\nretry-after: 3\r\n" in limited.lower()
        assert f'"apiCode":{API_CODE_RATE_LIMITED}'.encode() in limited
        conn.sendall(_request("POST", TOKEN_PATH, credentials))
        assert b'"access_token"' in _read_response(conn)  # times=1: the next one is answered
    assert sim.token_requests == 2
    assert sim.provider_requests == 1


def test_set_fault_and_set_token_fault_refuse_kinds_of_the_other_endpoint(
    sim: SimulatedGenAuth,
) -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        sim.set_token_fault("wrong_types")
    with pytest.raises(ValueError, match="needs delay"):
        sim.inject_fault(Endpoint.PROVIDER, "drip")
    with pytest.raises(ValueError, match="times"):
        sim.set_fault("close", times=0)
