"""While the daemon is built, /healthz already answers (SPEC §8: process alive) and /readyz
says not ready; then the daemon takes the same socket over."""

from __future__ import annotations

import gc
import socket
import threading
import weakref
from pathlib import Path

import pytest
import requests

from monitor.app import Daemon, settle_the_heap
from monitor.errors import ConfigError
from monitor.listen import StartingServer
from monitor.simulator import SimulatedGenAuth
from tests.helpers import free_port, runtime_settings, start_daemon, wait_for


def _url(server: StartingServer, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


def test_the_starting_server_is_alive_and_not_ready() -> None:
    server = StartingServer.open("127.0.0.1", 0)
    try:
        health = requests.get(_url(server, "/healthz"), timeout=5)
        assert (health.status_code, health.text) == (200, "ok\n")
        ready = requests.get(_url(server, "/readyz"), timeout=5)
        assert ready.status_code == 503
        assert ready.json() == {"ready": False, "checks": {"scheduler": False}}
        for path in ("/metrics", "/api/v1/targets", "/ui/"):
            answer = requests.get(_url(server, path), timeout=5)
            assert answer.status_code == 503
            assert answer.headers["Retry-After"] == "1"
    finally:
        server.close()


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_the_starting_server_listens_on_ipv6_too() -> None:
    try:
        server = StartingServer.open("::1", 0)
    except ConfigError:
        pytest.skip("::1 is not configured here")
    try:
        answer = requests.get(f"http://[::1]:{server.port}/healthz", timeout=5)
        assert answer.status_code == 200
    finally:
        server.close()


def test_the_daemon_takes_the_socket_over_and_no_connection_is_refused(
    simulator: SimulatedGenAuth, tmp_path: Path
) -> None:
    server = StartingServer.open("127.0.0.1", 0)
    settings = runtime_settings(f"sqlite:///{tmp_path / 'm.db'}", simulator, tmp_path)
    answers: list[int] = []
    stop = threading.Event()

    def ask() -> None:  # all along the build and the handover
        while not stop.is_set():
            answers.append(requests.get(_url(server, "/healthz"), timeout=5).status_code)

    asking = threading.Thread(target=ask)
    asking.start()
    daemon = Daemon(settings, starting=server)
    assert daemon.http.port == server.port
    daemon.start()
    try:
        wait_for(
            lambda: requests.get(_url(server, "/readyz"), timeout=5).status_code == 200,
            what="/readyz 200 from the daemon",
        )
        metrics = requests.get(_url(server, "/metrics"), timeout=5)
        assert metrics.status_code == 200 and "genauth_monitor_up" in metrics.text
    finally:
        stop.set()
        asking.join()
        daemon.stop()
    assert answers and set(answers) == {200}  # no refusal, no error during the handover
    with pytest.raises(OSError):  # the daemon closed the socket it took over
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


@pytest.mark.slow
def test_run_answers_healthz_while_its_targets_are_built(tmp_path: Path) -> None:
    targets = 2000  # a build long enough to be seen (a few tenths of a second at least)
    port = free_port()
    lines = [
        "[monitor]",
        'interval = "60s"',
        'fingerprint_key_env = "GM_TEST_FP"',
        "[storage]",
        f'url = "sqlite:///{tmp_path / "m.db"}"',
        "[server]",
        f'listen = "127.0.0.1:{port}"',
    ]
    for index in range(targets):
        lines += [
            "[[targets]]",
            f'name = "pool-{index:05d}"',
            'base_url = "http://127.0.0.1:9"',  # never polled in time: nothing listens there
            'access_key_id = "k"',
            'access_key_secret_env = "GM_TEST_SECRET"',
        ]
    config = tmp_path / "fleet.toml"
    config.write_text("\n".join(lines) + "\n")
    env = {"GM_TEST_FP": "k" * 32, "GM_TEST_SECRET": "s"}
    process = start_daemon(config, tmp_path / "daemon.log", env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: requests.get(base + "/healthz", timeout=1).status_code == 200,
            timeout=60,
            what="/healthz",
        )
        # Right after: the daemon is still building, /readyz is the starting server's.
        ready = requests.get(base + "/readyz", timeout=5)
        assert ready.status_code == 503
        assert ready.json() == {"ready": False, "checks": {"scheduler": False}}
        wait_for(
            lambda: requests.get(base + "/readyz", timeout=5).status_code == 200,
            timeout=60,
            what="/readyz 200",
        )
        assert requests.get(base + "/healthz", timeout=5).text == "ok\n"
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0


class _Node:
    link: _Node | None = None


def test_settling_the_heap_collects_start_up_garbage_and_freezes_the_rest() -> None:
    garbage = _Node()
    garbage.link = garbage  # a cycle: only the collector frees it
    gone = weakref.ref(garbage)
    del garbage
    kept = _Node()
    frozen = gc.get_freeze_count()
    try:
        settle_the_heap()
        assert gone() is None, "start-up garbage is collected before the freeze"
        assert gc.get_freeze_count() > frozen, "what is left is out of the collector's sight"
        assert kept.link is None
    finally:
        gc.unfreeze()  # the rest of the suite collects as usual
