"""A real HTTP receiver on loopback for alert sinks, able to fail on demand."""

from __future__ import annotations

import errno
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    """Records every POST; ``status`` sets the answer (e.g. 503); ``stop``/``start`` make the
    port refuse connections and come back on the same port."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status = 200
        # Seconds between the bytes of the answer: a sink that crawls (answers one byte at a
        # time), for the lane tests. 0 answers at once.
        self.drip = 0.0
        self.received_at: list[float] = []  # wall-clock time of each recorded request
        # While closed (``hold``), each request waits for ``release`` and is then refused with
        # a 503, unrecorded: a sink that has the request but has not accepted it. ``held``
        # counts the requests that waited.
        self._gate = threading.Event()
        self._gate.set()
        self.held = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.port = 0
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook/SECRET-PATH-TOKEN"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if not receiver._gate.is_set():
                    with receiver._lock:
                        receiver.held += 1
                    receiver._gate.wait()
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with receiver._lock:
                    status, drip = receiver.status, receiver.drip
                    if status < 300 and not drip:
                        receiver.requests.append(
                            {"path": self.path, "headers": dict(self.headers), "body": body}
                        )
                        receiver.received_at.append(time.time())
                if drip:
                    self.close_connection = True
                    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
                        time.sleep(drip)
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                    return
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = _bind(self.port, Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        # A short poll interval: shutdown() waits for it (the default 0.5 s, at each stop).
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    @property
    def base_url(self) -> str:
        """The receiver as an Alertmanager's base URL (it takes a POST to any path)."""
        return f"http://127.0.0.1:{self.port}"

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def bodies(self) -> list[Any]:
        with self._lock:
            return [json.loads(r["body"]) for r in self.requests]


def _bind(port: int, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """Listen on ``port`` again after a stop: while stopped, a client socket of another test may
    briefly hold it as its ephemeral local port, so a few seconds of retries."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return ThreadingHTTPServer(("127.0.0.1", port), handler)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
