"""The running daemon hands freed heap back to the OS while it runs, not only at start."""

from __future__ import annotations

import threading

from monitor.app import HEAP_TRIM_EVERY, keep_the_heap_trimmed
from tests.helpers import wait_for


def test_the_heap_is_trimmed_periodically_until_stop() -> None:
    assert 10 <= HEAP_TRIM_EVERY <= 120  # often enough to matter, rare enough to cost nothing
    trims: list[int] = []
    stop = threading.Event()
    runner = threading.Thread(
        target=keep_the_heap_trimmed, args=(stop, 0.02, lambda: trims.append(1))
    )
    runner.start()
    try:
        wait_for(lambda: len(trims) >= 3, what="three trims", timeout=5)
    finally:
        stop.set()
        runner.join(timeout=2)
    assert not runner.is_alive(), "stop ends it at once"
    done = len(trims)
    stop.wait(0.1)
    assert len(trims) == done, "no trim after stop"
