"""``Metrics.render`` (what /metrics serves) against prometheus-client's own renderer."""

from __future__ import annotations

import gzip
import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import monitor.metrics
from monitor.metrics import LineRefresher, Metrics
from tests.helpers import wait_for

AT = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _metrics(*targets: str) -> Metrics:
    metrics = Metrics(CollectorRegistry())
    for target in targets:
        metrics.declare_target(target)
    metrics.declare_sink("ops")
    return metrics


def _parsed(text: str) -> list[Any]:
    """Families in order with their samples in order; label order aside (prometheus-client
    sorts label names, the render writes ``target`` first: the same to a scraper)."""
    return [
        (
            f.name,
            f.type,
            f.documentation,
            [(s.name, sorted(s.labels.items()), s.value) for s in f.samples],
        )
        for f in text_string_to_metric_families(text)
    ]


def _same(metrics: Metrics) -> str:
    # What a gzip scraper gets (compressed a family at a time) is the same text.
    packed = metrics.render_gzip()
    text = metrics.render().decode()
    assert gzip.decompress(packed).decode() == text
    assert _parsed(text) == _parsed(generate_latest(metrics.registry).decode())
    return text


def test_render_is_generate_latest_as_targets_change_between_renders() -> None:
    metrics = _metrics("b-pool", "d-pool")
    _same(metrics)  # only polls_total{outcome="success"} 0 for each
    metrics.set_config(
        "b-pool", enabled=True, provider_type="custom", hash_="sha256:" + "ab" * 32, drift=False
    )
    metrics.observe_poll("b-pool", "success", 0.02)
    metrics.set_up("b-pool", True, AT)
    first = _same(metrics)
    assert 'genauth_monitor_up{target="b-pool"} 1.0' in first
    assert 'genauth_monitor_up{target="d-pool"}' not in first
    # A change of one target after a render: that target is redone, the other kept.
    metrics.observe_poll("d-pool", "timeout", 10.0)
    metrics.set_up("d-pool", False, None)
    metrics.count_event("b-pool", "config_changed")
    metrics.set_last_change("b-pool", AT)
    metrics.set_config(
        "b-pool", enabled=False, provider_type="ali", hash_="sha256:" + "cd" * 32, drift=True
    )
    second = _same(metrics)
    assert 'genauth_monitor_polls_total{target="d-pool",outcome="timeout"} 1.0' in second
    assert (
        'genauth_email_provider_changes_total{target="b-pool",kind="config_changed"} 1.0' in second
    )
    assert 'type="ali",hash="cdcdcdcdcdcd"' in second
    # A target added after renders takes its place in name order.
    metrics.observe_poll("a-pool", "success", 0.5)
    metrics.observe_poll("c-pool", "success", 0.5)
    third = _same(metrics)
    polls = [
        line.split("{")[1]
        for line in third.splitlines()
        if line.startswith("genauth_monitor_polls_total{")
    ]
    assert list(dict.fromkeys(p.split(",")[0] for p in polls)) == [
        f'target="{t}-pool"' for t in "abcd"
    ]
    assert _same(metrics) == third  # nothing changed: the same text
    # Each kind of change alone after a render: what a poll sets, and what a snapshot sets.
    metrics.set_config("a-pool", enabled=True, provider_type="qq", hash_="sha256:ef", drift=True)
    assert 'type="qq"' in _same(metrics)
    metrics.set_last_change("c-pool", AT)
    assert 'genauth_email_provider_last_change_timestamp_seconds{target="c-pool"}' in _same(metrics)
    metrics.count_event("c-pool", "secret_rotated")
    assert 'target="c-pool",kind="secret_rotated"' in _same(metrics)
    metrics.set_up("c-pool", False, None)
    assert 'genauth_monitor_up{target="c-pool"} 0.0' in _same(metrics)


def test_render_escapes_upstream_text_in_labels() -> None:
    metrics = _metrics("pool")
    metrics.set_config(
        "pool", enabled=True, provider_type='we"ird\\type\nx', hash_="sha256:00", drift=False
    )
    text = _same(metrics)
    assert 'type="we\\"ird\\\\type\\nx"' in text


def test_the_line_refresher_redoes_changed_lines_before_the_scrape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    metrics = _metrics("a-pool", "b-pool")
    _same(metrics)
    redone: list[str] = []  # the thread that redid each target's poll lines
    original = monitor.metrics._poll_lines

    def poll_lines(*args: Any) -> None:
        redone.append(threading.current_thread().name)
        original(*args)

    monkeypatch.setattr(monitor.metrics, "_poll_lines", poll_lines)
    metrics.observe_poll("a-pool", "success", 0.25)
    metrics.set_up("a-pool", True, AT)
    refresher = LineRefresher(metrics)
    refresher.EVERY = 0.05
    refresher.start()
    try:
        wait_for(lambda: "metrics-lines" in redone, timeout=5, what="a refresh")
        text = _same(metrics)  # the scrape: nothing left to redo, and nothing stale
    finally:
        refresher.stop()
    assert redone == ["metrics-lines"], redone
    assert 'genauth_monitor_last_poll_duration_seconds{target="a-pool"} 0.25' in text


class _OneScrapeAhead:
    """An Ahead (what the exposition is) with one scrape expected ``wait`` seconds from now."""

    def __init__(self, wait: float) -> None:
        self.due = time.monotonic() + wait
        self.rendered_at: list[float] = []

    def ahead_in(self) -> float | None:
        return None if self.rendered_at else max(self.due - time.monotonic(), 0.0)

    def render_ahead(self) -> bool:
        if self.rendered_at or time.monotonic() < self.due:
            return False
        self.rendered_at.append(time.monotonic())
        return True


def test_the_line_refresher_renders_ahead_when_a_scrape_is_due_not_at_its_tick() -> None:
    metrics = _metrics("a-pool")
    ahead = _OneScrapeAhead(0.3)
    refresher = LineRefresher(metrics, ahead=ahead)
    refresher.EVERY = 30.0  # its own refresh would come much later
    refresher.start()
    try:
        wait_for(lambda: ahead.rendered_at, timeout=5, what="a render ahead")
    finally:
        refresher.stop()
    late = ahead.rendered_at[0] - ahead.due
    assert 0 <= late < 0.2, f"rendered {late:.3f} s after it was due"
    assert len(ahead.rendered_at) == 1


class _BrokenAhead:
    def ahead_in(self) -> float | None:
        raise RuntimeError("a bug")

    def render_ahead(self) -> bool:
        return False


def test_a_failing_ahead_leaves_the_refresh_going_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = _metrics("a-pool")
    _same(metrics)
    metrics.observe_poll("a-pool", "success", 0.5)
    refresher = LineRefresher(metrics, ahead=_BrokenAhead())
    refresher.EVERY = 0.05
    with caplog.at_level("ERROR", logger="monitor.metrics"):
        refresher.start()
        try:
            line = 'genauth_monitor_last_poll_duration_seconds{target="a-pool"} 0.5'
            # The refresh redid the line: a render finds it without redoing anything.
            wait_for(lambda: metrics._text._versions[0] == 1, timeout=5, what="a refresh")
            time.sleep(0.6)  # a few looks for the next scrape, each failing
        finally:
            refresher.stop()
    assert line in _same(metrics)
    failures = [r for r in caplog.records if "next scrape" in r.getMessage()]
    assert len(failures) == 1, failures
