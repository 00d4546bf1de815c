"""A poll is never silent: past its deadline it is a failed poll at once, a bug inside it is a
failed poll (``internal``), and a wall clock that jumps never parks an alert behind a day."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from monitor.app import build_runtime
from monitor.simulator import SimulatedGenAuth
from monitor.storage.outbox import Outbox
from tests.conftest import FakeClock
from tests.helpers import runtime_settings
from tests.receiver import Receiver

SECRET = "Deadline-Access-Secret-161"


def _sample(runtime: Any, name: str, **labels: str) -> float | None:
    value = runtime.metrics.registry.get_sample_value(name, {"target": "prod", **labels})
    return None if value is None else float(value)


def test_a_poll_past_its_deadline_is_failed_at_once_and_its_late_answer_dropped(
    tmp_path: Path,
) -> None:
    with SimulatedGenAuth(access_key_secret=SECRET) as sim:
        settings = runtime_settings(f"sqlite:///{tmp_path / 'm.db'}", sim, tmp_path)
        runtime = build_runtime(settings)
        poller = runtime.pollers["prod"]
        assert poller.poll().ok
        sim.set_fault("slow", delay=1.5)  # within the client's timeout, past our deadline
        done: list[Any] = []
        worker = threading.Thread(target=lambda: done.append(poller.poll()))
        worker.start()
        time.sleep(0.3)
        assert not poller.expire_if_overdue(time.monotonic()), "not yet past the deadline"
        assert poller.expire_if_overdue(time.monotonic() + poller.deadline)
        # At once, while the request is still running: up = 0 and a timeout counted.
        assert _sample(runtime, "genauth_monitor_up") == 0
        assert _sample(runtime, "genauth_monitor_polls_total", outcome="timeout") == 1
        worker.join(timeout=10)
        [late] = done
        assert not late.ok and late.error is not None and late.error.reason == "timeout"
        assert _sample(runtime, "genauth_monitor_up") == 0, "the late success is discarded"
        [state] = runtime.queries.targets()
        assert state.up is False and state.consecutive_failures == 1
        runtime.store.engine.dispose()


class _Broken:
    """A fetcher with a bug of ours in it (the real client behind it answers fine)."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def fetch_email_provider(self) -> dict[str, Any]:
        self.real.fetch_email_provider()
        answer: dict[Any, Any] = {"enabled": True, 1: "a key no JSON has"}
        return answer


def test_a_bug_inside_a_poll_is_a_failed_poll_never_silence(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with SimulatedGenAuth(access_key_secret=SECRET) as sim:
        settings = runtime_settings(
            f"sqlite:///{tmp_path / 'm.db'}", sim, tmp_path, monitor={"failure_threshold": 1}
        )
        runtime = build_runtime(settings)
        poller = runtime.pollers["prod"]
        assert poller.poll().ok
        poller._fetcher = _Broken(poller._fetcher)
        with caplog.at_level(logging.ERROR):
            result = poller.poll()
        assert not result.ok and result.error is not None
        assert result.error.reason == "internal"
        assert _sample(runtime, "genauth_monitor_up") == 0
        assert _sample(runtime, "genauth_monitor_polls_total", outcome="internal") == 1
        assert [e.kind for e in result.events] == ["poll_failing"]
        assert any(r.exc_info for r in caplog.records), "the traceback reaches the log"
        runtime.store.engine.dispose()


@pytest.mark.parametrize("jump", [86400.0, -86400.0])
def test_a_clock_jump_never_parks_a_delivery_beyond_its_backoff(
    tmp_path: Path, jump: float
) -> None:
    receiver = Receiver()
    receiver.status = 503
    clock = FakeClock()
    try:
        with SimulatedGenAuth(access_key_secret=SECRET) as sim:
            settings = runtime_settings(
                f"sqlite:///{tmp_path / 'm.db'}",
                sim,
                tmp_path,
                sinks=[{"type": "webhook", "url": receiver.url, "max_backoff": "30s"}],
            )
            runtime = build_runtime(settings, clock=clock)
            runtime.pollers["prod"].poll()
            worker = runtime.delivery
            worker.run_once()  # refused: retry in about a second
            outbox = Outbox(runtime.store.engine)
            start = clock.now
            clock.advance(jump)  # the wall clock jumps while the sink is down
            worker.run_once()
            # Backwards, the stored retry is a day ahead of the clock: tried now all the same.
            assert [row.attempts for row in outbox.pending()] == [2]
            clock.now = start  # the clock comes back (after a forward jump, a day early)
            clock.advance(35)  # more than the backoff cap later, never a day
            receiver.status = 200
            worker.run_once()
            assert [b["kind"] for b in receiver.bodies()] == ["first_seen"]
            assert Outbox(runtime.store.engine).pending() == []
            runtime.store.engine.dispose()
    finally:
        receiver.stop()
