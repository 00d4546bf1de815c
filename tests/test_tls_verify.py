"""TLS verification of monitor.httpio's session: exactly as strict as requests', with the CA
location looked at once per adapter instead of on every request."""

from __future__ import annotations

import http.server
import os
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from monitor.httpio import HttpFailure, bounded_request, bounded_session
from tests.helpers import QuietJsonHandler

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def _certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (openssl, no extra package)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


class _Ok(QuietJsonHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_json(200, b'{"ok":true}')


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """(https URL of a server, the bundle that trusts it, a bundle that does not)."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = _certificate(directory, "server")
    other, _ = _certificate(directory, "other")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/x", cert, other
    finally:
        server.shutdown()
        server.server_close()


def _get(session: requests.Session, url: str, verify: bool | str) -> int:
    request = requests.Request("GET", url).prepare()
    answer = bounded_request(
        session,
        request,
        timeout=5.0,
        deadline=time.monotonic() + 5.0,
        max_bytes=1024,
        verify=verify,
    )
    return answer.status


def _counting_isdir(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every os.path.isdir asked about (the real answer is given)."""
    asked: list[str] = []
    real: Callable[[Any], bool] = os.path.isdir

    def isdir(path: Any) -> bool:
        asked.append(os.fspath(path))
        return real(path)

    monkeypatch.setattr(os.path, "isdir", isdir)
    return asked


def test_the_ca_bundle_is_looked_at_once_per_adapter_not_per_request(
    tls: tuple[str, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, bundle, _ = tls
    asked = _counting_isdir(monkeypatch)
    session = bounded_session()
    for _ in range(20):
        assert _get(session, url, str(bundle)) == 200
    assert asked.count(str(bundle)) == 1
    session.close()


def test_a_bundle_that_does_not_trust_the_server_is_refused_every_time(
    tls: tuple[str, Path, Path],
) -> None:
    url, bundle, other = tls
    session = bounded_session()
    assert _get(session, url, str(bundle)) == 200  # a trusted connection kept in its pool
    for _ in range(3):
        with pytest.raises(HttpFailure) as failure:
            _get(session, url, str(other))
        assert failure.value.kind == "tls"
    with pytest.raises(HttpFailure) as failure:
        _get(session, url, True)  # the default bundle does not hold a self-signed cert
    assert failure.value.kind == "tls"
    session.close()


def test_a_ca_directory_is_used_as_one(tls: tuple[str, Path, Path], tmp_path: Path) -> None:
    url, bundle, _ = tls
    directory = tmp_path / "cas"
    directory.mkdir()
    shutil.copy(bundle, directory / "server.pem")
    subprocess.run(["openssl", "rehash", str(directory)], check=True, capture_output=True)
    session = bounded_session()
    assert _get(session, url, str(directory)) == 200
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HttpFailure):
        _get(session, url, str(empty))
    session.close()


def test_a_missing_bundle_is_refused_until_it_exists(
    tls: tuple[str, Path, Path], tmp_path: Path
) -> None:
    url, bundle, _ = tls
    later = tmp_path / "later.pem"
    session = bounded_session()
    for _ in range(2):  # as requests says it: an OSError naming the path
        with pytest.raises(OSError, match="invalid path"):
            _get(session, url, str(later))
    shutil.copy(bundle, later)
    assert _get(session, url, str(later)) == 200
    session.close()
