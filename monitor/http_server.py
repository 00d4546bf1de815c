"""Runs the ASGI app with uvicorn in a background thread of the daemon."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from monitor.errors import ConfigError

__all__ = ["HttpServer", "bind"]


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


class HttpServer:
    """Binds at construction, so a taken port fails start-up with a clear error at once."""

    def __init__(self, app: FastAPI, *, host: str, port: int) -> None:
        self._socket = bind(host, port)
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=2
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="http", daemon=True
        )

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started and self._thread.is_alive():
            if time.monotonic() > deadline:
                raise RuntimeError("HTTP server did not start in time")
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.ident is not None:  # a daemon stopped before it started has no thread
            self._thread.join(timeout=5)
        self._socket.close()
