"""Prometheus instruments of SPEC §5, owned by one object on a registry it is given."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.samples import Sample

from monitor import __version__
from monitor.core.rules import EVENT_KINDS

__all__ = ["Metrics"]

# Few buckets: the histogram is per target and dominates a large scrape.
_POLL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Metrics:
    """All metrics of the monitor. Tests build one on a fresh ``CollectorRegistry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.enabled = Gauge(
            "genauth_email_provider_enabled",
            "1 if the target's third-party email provider is enabled, 0 if not.",
            ["target"],
            registry=registry,
        )
        self.info = Gauge(
            "genauth_email_provider_info",
            "Current email provider type and snapshot hash (first 12 hex) of the target.",
            ["target", "type", "hash"],
            registry=registry,
        )
        self.drift = Gauge(
            "genauth_email_provider_drift",
            "1 if the target's configuration differs from its expected baseline.",
            ["target"],
            registry=registry,
        )
        self.changes = Counter(
            "genauth_email_provider_changes",
            "Drift events recorded, by kind.",
            ["target", "kind"],
            registry=registry,
        )
        self.last_change = Gauge(
            "genauth_email_provider_last_change_timestamp_seconds",
            "Unix time when the target's configuration last changed (new snapshot).",
            ["target"],
            registry=registry,
        )
        self.up = Gauge(
            "genauth_monitor_up",
            "1 if the last poll of the target succeeded.",
            ["target"],
            registry=registry,
        )
        self.polls = Counter(
            "genauth_monitor_polls",
            "Polls of the GenAuth API by outcome (success or the failure reason class).",
            ["target", "outcome"],
            registry=registry,
        )
        self.poll_duration = Histogram(
            "genauth_monitor_poll_duration_seconds",
            "Duration of one poll (token, fetch, redaction, storage).",
            ["target"],
            buckets=_POLL_BUCKETS,
            registry=registry,
        )
        self.last_success = Gauge(
            "genauth_monitor_last_success_timestamp_seconds",
            "Unix time of the target's last successful poll.",
            ["target"],
            registry=registry,
        )
        self.deliveries = Counter(
            "genauth_monitor_alert_deliveries",
            "Alert deliveries to sinks by outcome.",
            ["sink", "outcome"],
            registry=registry,
        )
        self.outbox_pending = _OutboxPending()
        registry.register(self.outbox_pending)
        self.build_info = Gauge(
            "genauth_monitor_build_info",
            "Build information of genauth-monitor.",
            ["version"],
            registry=registry,
        )
        self.build_info.labels(version=__version__).set(1)
        self._info_labels: dict[str, tuple[str, str]] = {}

    def declare_target(self, target: str) -> None:
        """Create the target's counters at 0, so ``increase()`` sees the first change after a
        restart (a series that appears at 1 has no increase for Prometheus)."""
        for kind in EVENT_KINDS:
            self.changes.labels(target=target, kind=kind)
        self.polls.labels(target=target, outcome="success")

    def declare_sink(self, sink: str) -> None:
        for outcome in ("sent", "failed"):
            self.deliveries.labels(sink=sink, outcome=outcome)
        self.outbox_pending.set(sink, 0)

    def set_config(
        self, target: str, *, enabled: bool, provider_type: str | None, hash_: str, drift: bool
    ) -> None:
        """Gauges describing the target's current snapshot."""
        self.enabled.labels(target=target).set(1 if enabled else 0)
        self.drift.labels(target=target).set(1 if drift else 0)
        labels = (provider_type or "", hash_.removeprefix("sha256:")[:12])
        previous = self._info_labels.get(target)
        if previous != labels:
            if previous is not None:
                # One series per target: the old type/hash must disappear, not linger at 1.
                self.info.remove(target, *previous)
            self._info_labels[target] = labels
        self.info.labels(target, *labels).set(1)

    def set_last_change(self, target: str, at: datetime | None) -> None:
        if at is not None:
            self.last_change.labels(target=target).set(at.timestamp())

    def set_outbox_pending(self, sink: str, count: int) -> None:
        self.outbox_pending.set(sink, count)

    def set_up(self, target: str, up: bool, last_success: datetime | None) -> None:
        self.up.labels(target=target).set(1 if up else 0)
        if last_success is not None:
            self.last_success.labels(target=target).set(last_success.timestamp())

    def observe_poll(self, target: str, outcome: str, seconds: float) -> None:
        self.polls.labels(target=target, outcome=outcome).inc()
        self.poll_duration.labels(target=target).observe(seconds)

    def count_event(self, target: str, kind: str) -> None:
        self.changes.labels(target=target, kind=kind).inc()


class _OutboxPending:
    """``genauth_monitor_outbox_pending``: one series per sink and the total without a label
    (one metric name cannot be both with a plain Gauge)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def set(self, sink: str, count: int) -> None:
        with self._lock:
            self._counts[sink] = count

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            counts = dict(self._counts)
        family = GaugeMetricFamily(
            "genauth_monitor_outbox_pending",
            "Alert deliveries not yet accepted by their sink, per sink and in total.",
            labels=["sink"],
        )
        for sink, count in sorted(counts.items()):
            family.add_metric([sink], count)
        family.samples.append(Sample(family.name, {}, sum(counts.values())))
        yield family
