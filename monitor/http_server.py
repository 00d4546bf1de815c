"""Runs the ASGI app with uvicorn in a background thread of the daemon."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from monitor.listen import bind

__all__ = ["HttpServer", "bind"]


class HttpServer:
    """Binds at construction, so a taken port fails start-up with a clear error at once; or
    serves ``sock``, bound and listening already (:class:`monitor.listen.StartingServer`)."""

    def __init__(
        self, app: FastAPI, *, host: str, port: int, sock: socket.socket | None = None
    ) -> None:
        self._socket = bind(host, port) if sock is None else sock
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
