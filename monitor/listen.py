"""The daemon's listening socket, and what answers on it while the daemon is being built.

With 10,000 targets, building the pollers and importing the web stack take seconds; SPEC §8
says ``/healthz`` is "process alive" and ``/readyz`` "database reachable and scheduler
running". So :class:`StartingServer`, a standard-library server that needs neither FastAPI nor
uvicorn, answers on the socket from the moment the configuration and the database have been
checked: ``/healthz`` 200, ``/readyz`` 503 (the scheduler is not running yet), anything else
503 "starting". When the daemon is built it stops serving and the same socket, still listening,
is served by uvicorn (:class:`monitor.http_server.HttpServer`): a connection made during the
handover waits in the listen backlog, it is never refused.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
from typing import Final

from monitor.errors import ConfigError

__all__ = ["StartingServer", "bind"]

_BACKLOG: Final = 128
_POLL: Final = 0.05  # seconds between the starting server's looks at its stop flag


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port``. An address that is taken, not local or not
    resolvable is a ConfigError naming ``server.listen`` (exit code 2), never a traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    shown = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    # proto IPPROTO_TCP, not 0: asyncio turns Nagle off only on sockets that say they are TCP
    # (accepted ones inherit it), and with Nagle on every keep-alive answer after the first
    # waits about 40 ms for the client's delayed ACK of its headers.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except (OSError, ValueError, TypeError, OverflowError) as exc:  # a host name bad for IDNA, NUL
        sock.close()
        reason = (exc.strerror if isinstance(exc, OSError) else None) or "invalid address"
        raise ConfigError([f"server.listen: cannot listen on {shown}: {reason}"]) from None
    return sock


_READY: Final = json.dumps({"ready": False, "checks": {"scheduler": False}}).encode()
_STARTING: Final = json.dumps({"error": "starting: the targets are being set up"}).encode()


class _Starting(http.server.BaseHTTPRequestHandler):
    # HTTP/1.0: every connection closes after its answer, so none outlives the handover.
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._answer(200, b"ok\n", "text/plain; charset=utf-8")
        elif path == "/readyz":
            self._answer(503, _READY, "application/json")
        else:
            self._answer(503, _STARTING, "application/json", retry=True)

    def do_HEAD(self) -> None:
        self.do_GET()

    def _answer(self, status: int, body: bytes, kind: str, *, retry: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        if retry:
            self.send_header("Retry-After", "1")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # the daemon logs no access lines


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False


class StartingServer:
    """Serves ``/healthz`` on ``sock`` until :meth:`handover`; the socket stays open."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self.port: int = sock.getsockname()[1]
        sock.listen(_BACKLOG)
        self._server = _Server(sock.getsockname()[:2], _Starting, bind_and_activate=False)
        self._server.socket.close()  # the unbound one socketserver made: ours instead
        self._server.socket = sock
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(_POLL,), name="http-starting", daemon=True
        )

    @classmethod
    def open(cls, host: str, port: int) -> StartingServer:
        """Bind ``host:port`` (ConfigError naming ``server.listen`` when it cannot) and serve."""
        server = cls(bind(host, port))
        server.start()
        return server

    def start(self) -> None:
        self._thread.start()

    def handover(self) -> socket.socket:
        """Stop answering (within about 50 ms) and give the still-listening socket away."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        return self.socket

    def close(self) -> None:
        """Stop answering and close the socket (the daemon did not start)."""
        self.handover().close()
