"""Prometheus metrics of SPEC §5, owned by one object on a registry it is given.

The per-target state is a small record per target, exported by a custom collector (the
prometheus-client ``Collector`` interface) instead of thousands of labelled children: a poll
only sets a few attributes, and a scrape walks the records once. A target has about ten series:
seven gauges, ``polls_total{outcome="success"}`` (from 0) and a series of ``polls_total`` or
``changes_total`` for each outcome and kind that has happened (they appear when they first
happen; the shipped rules account for that). The poll-duration histogram is one for all
targets, beside a per-target gauge of the last duration.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString as _go_float

from monitor import __version__

__all__ = ["LineRefresher", "Metrics"]

log = logging.getLogger("monitor.metrics")

_POLL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_TARGET_GAUGES = (
    # (name, help, attribute of _Target)
    (
        "genauth_email_provider_enabled",
        "1 if the target's third-party email provider is enabled, 0 if not.",
        "enabled",
    ),
    (
        "genauth_email_provider_drift",
        "1 if the target's configuration differs from its expected baseline.",
        "drift",
    ),
    (
        "genauth_email_provider_last_change_timestamp_seconds",
        "Unix time when the target's configuration last changed (new snapshot).",
        "last_change",
    ),
    ("genauth_monitor_up", "1 if the last poll of the target succeeded.", "up"),
    (
        "genauth_monitor_last_success_timestamp_seconds",
        "Unix time of the target's last successful poll.",
        "last_success",
    ),
    (
        "genauth_monitor_last_poll_duration_seconds",
        "Duration of the target's last poll (token, fetch, redaction, queueing).",
        "last_duration",
    ),
)


class _Target:
    """What the gauges and counters of one target show; None: not known yet (no series)."""

    __slots__ = (
        "changes",
        "drift",
        "enabled",
        "hash12",
        "last_change",
        "last_duration",
        "last_success",
        "polls",
        "provider_type",
        "settings",
        "up",
        "version",
    )

    def __init__(self) -> None:
        self.enabled: float | None = None
        self.drift: float | None = None
        self.provider_type: str | None = None
        self.hash12: str | None = None
        self.last_change: float | None = None
        self.up: float | None = None
        self.last_success: float | None = None
        self.last_duration: float | None = None
        self.polls: dict[str, int] = {"success": 0}
        self.changes: dict[str, int] = {}
        # Bumped by every change, so a render redoes only what changed: ``version`` by a poll
        # (up, last success, last duration, polls), ``settings`` by the configuration seen
        # (enabled, drift, last change, info) and its events (changes).
        self.version = 0
        self.settings = 0


class Metrics:
    """All metrics of the monitor. Tests build one on a fresh ``CollectorRegistry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._lock = threading.Lock()
        self._targets: dict[str, _Target] = {}
        self._order: tuple[tuple[str, _Target], ...] | None = None  # sorted; None: to redo
        self._text = _TargetText()
        # Everything but the per-target families; `registry` shows both.
        self._rest = CollectorRegistry(auto_describe=True)
        registry.register(_TargetCollector(self))
        registry.register(_Forward(self._rest))
        self.poll_duration = Histogram(
            "genauth_monitor_poll_duration_seconds",
            "Duration of one poll (token, fetch, redaction, queueing), all targets.",
            buckets=_POLL_BUCKETS,
            registry=self._rest,
        )
        self.deliveries = Counter(
            "genauth_monitor_alert_deliveries",
            "Alert deliveries to sinks by outcome.",
            ["sink", "outcome"],
            registry=self._rest,
        )
        # SPEC §11: the outcome of each settled attribution lookup (none/unavailable on a
        # changed config is itself worth a look).
        self.attributions = Counter(
            "genauth_monitor_attributions",
            "Change attributions settled, by result (single, ambiguous, none, unavailable).",
            ["target", "result"],
            registry=self._rest,
        )
        self.outbox_pending = _OutboxPending()
        self._rest.register(self.outbox_pending)
        self.replicas = Gauge(
            "genauth_monitor_replicas",
            "Live replicas sharing the database (1 on SQLite).",
            registry=self._rest,
        )
        self.targets_owned = Gauge(
            "genauth_monitor_targets_owned",
            "Targets this replica polls (each replica exports only its own).",
            ["replica"],
            registry=self._rest,
        )
        self.clock_skew = Gauge(
            "genauth_monitor_clock_skew_seconds",
            "This replica's clock minus the database's, measured at each heartbeat.",
            registry=self._rest,
        )
        self.build_info = Gauge(
            "genauth_monitor_build_info",
            "Build information of genauth-monitor.",
            ["version"],
            registry=self._rest,
        )
        self.build_info.labels(version=__version__).set(1)

    def _target(self, name: str) -> _Target:
        state = self._targets.get(name)
        if state is None:
            with self._lock:
                state = self._targets.get(name)
                if state is None:
                    state = self._targets[name] = _Target()
                    self._order = None
        return state

    def declare_target(self, target: str) -> None:
        """The target exists (``polls_total{outcome="success"}`` at 0) before its first poll."""
        self._target(target)

    def declare_sink(self, sink: str) -> None:
        for outcome in ("sent", "failed"):
            self.deliveries.labels(sink=sink, outcome=outcome)
        self.outbox_pending.set(sink, 0)

    def set_config(
        self, target: str, *, enabled: bool, provider_type: str | None, hash_: str, drift: bool
    ) -> None:
        """Gauges describing the target's current snapshot."""
        state = self._target(target)
        state.enabled = 1.0 if enabled else 0.0
        state.drift = 1.0 if drift else 0.0
        state.provider_type = provider_type or ""
        state.hash12 = hash_.removeprefix("sha256:")[:12]
        state.settings += 1

    def set_last_change(self, target: str, at: datetime | None) -> None:
        if at is not None:
            state = self._target(target)
            state.last_change = at.timestamp()
            state.settings += 1

    def set_cluster(self, *, replica: str, replicas: int, owned: int, skew: float) -> None:
        """The split as this replica sees it at a heartbeat."""
        self.replicas.set(replicas)
        self.targets_owned.labels(replica=replica).set(owned)
        self.clock_skew.set(skew)

    def set_outbox_pending(self, sink: str, count: int) -> None:
        self.outbox_pending.set(sink, count)

    def set_up(self, target: str, up: bool, last_success: datetime | None) -> None:
        state = self._target(target)
        state.up = 1.0 if up else 0.0
        if last_success is not None:
            state.last_success = last_success.timestamp()
        state.version += 1

    def observe_poll(self, target: str, outcome: str, seconds: float) -> None:
        state = self._target(target)
        with self._lock:
            state.polls[outcome] = state.polls.get(outcome, 0) + 1
        state.last_duration = seconds
        state.version += 1
        self.poll_duration.observe(seconds)

    def count_event(self, target: str, kind: str) -> None:
        state = self._target(target)
        with self._lock:
            state.changes[kind] = state.changes.get(kind, 0) + 1
        state.settings += 1

    def snapshot(self) -> Sequence[tuple[str, _Target]]:
        """Every target and its record, by name: the same object until a target is added."""
        with self._lock:
            if self._order is None:
                self._order = tuple(sorted(self._targets.items()))
            return self._order

    def render(self) -> bytes:
        """The whole exposition (what ``generate_latest(registry)`` gives), fast: each target's
        lines are kept and redone only when that target changed, which is what makes a scrape
        of 10,000 targets cheap."""
        return self._text.render(self.snapshot(), generate_latest(self._rest))

    def render_gzip(self) -> bytes:
        """:meth:`render` compressed (gzip, level 1) in pieces: the plain text is never in
        memory whole (7 MB at 10,000 targets, a third of the daemon's peak above its steady
        size when it was), only a piece of it and the compressed text."""
        packer = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # a gzip member
        packed: list[bytes] = []
        pending: list[bytes] = []

        def take(chunk: bytes) -> None:
            # zlib gives up the GIL and takes it again for each block of its output, and in a
            # busy daemon each take waits behind the poll threads: the text goes to it in a
            # few large pieces (one call per family made a scrape's p99 at 10,000 targets
            # 130-185 ms instead of 91-97).
            pending.append(chunk)
            if sum(map(len, pending)) >= _PACK_PIECE:
                packed.append(packer.compress(b"".join(pending)))
                pending.clear()

        self._text.write(self.snapshot(), generate_latest(self._rest), take)
        packed.append(packer.compress(b"".join(pending)))
        packed.append(packer.flush())
        return b"".join(packed)

    def refresh(self) -> None:
        """Redo the lines of the targets that changed since the last refresh or render."""
        self._text.refresh(self.snapshot())


_PACK_PIECE = 2 * 1024 * 1024  # bytes of exposition given to the compressor at once


class Ahead(Protocol):
    """What renders the exposition ahead of the scrapes it expects
    (:class:`monitor.exposition.Exposition`)."""

    def ahead_in(self) -> float | None: ...

    def render_ahead(self) -> bool: ...


class LineRefresher:
    """Keeps the per-target lines of ``/metrics`` up to date once a second, in a thread of its
    own, so that a scrape only joins and compresses them. Lines left to the scrape cost it
    about 2 µs each: at 10,000 targets a scrape every 60 s would redo 40,000 of them (about
    100 ms), and the first scrape after start-up all 90,000; refreshed here, a scrape redoes
    at most a second's worth. A refresh of 10,000 targets takes a few milliseconds."""

    EVERY = 1.0
    LOOK_AHEAD = 0.25  # seconds between looks at when the next scrape is expected

    def __init__(self, metrics: Metrics, ahead: Ahead | None = None) -> None:
        self._metrics = metrics
        self._ahead = ahead
        self._ahead_failed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="metrics-lines", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    def _loop(self) -> None:
        ahead = self._ahead
        refresh_at = time.monotonic() + self.EVERY
        while not self._stop.wait(max(self._wait(refresh_at), 0.0)):
            try:
                if ahead is not None and ahead.render_ahead():
                    refresh_at = time.monotonic() + self.EVERY  # the render redid the lines
                elif time.monotonic() >= refresh_at:
                    self._metrics.refresh()
                    refresh_at = time.monotonic() + self.EVERY
            except Exception:  # a bug of ours: a scrape still renders, and says so itself
                log.exception("refreshing the /metrics lines failed")
                refresh_at = time.monotonic() + self.EVERY

    def _wait(self, refresh_at: float) -> float:
        """Seconds until the next refresh, or sooner the next render ahead. The next scrape is
        looked for four times a second (a scrape made meanwhile expects the next one), so
        even a scraper every second or two gets its render ahead in time."""
        wait = refresh_at - time.monotonic()
        if self._ahead is None:
            return wait
        try:
            soon = self._ahead.ahead_in()
        except Exception:  # a bug of ours: no render ahead, scrapes render as they come
            if not self._ahead_failed:  # once, not four times a second
                log.exception("looking for the next scrape failed")
            self._ahead_failed = True
            soon = None
        return min(wait, self.LOOK_AHEAD, self.LOOK_AHEAD if soon is None else soon)


class _TargetCollector:
    """The per-target families, built from the records at collect time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        targets = self._metrics.snapshot()
        for name, help_text, attribute in _TARGET_GAUGES:
            family = GaugeMetricFamily(name, help_text, labels=["target"])
            for target, state in targets:
                value = getattr(state, attribute)
                if value is not None:
                    family.samples.append(Sample(name, {"target": target}, value))
            yield family
        info = GaugeMetricFamily(
            "genauth_email_provider_info",
            "Current email provider type and snapshot hash (first 12 hex) of the target.",
            labels=["target", "type", "hash"],
        )
        for target, state in targets:
            if state.hash12 is not None:
                labels = {"target": target, "type": state.provider_type or "", "hash": state.hash12}
                info.samples.append(Sample(info.name, labels, 1.0))
        yield info
        yield _counter(
            "genauth_monitor_polls",
            "Polls of the GenAuth API by outcome (success or the failure reason class).",
            "outcome",
            ((target, state.polls) for target, state in targets),
        )
        yield _counter(
            "genauth_email_provider_changes",
            "Drift events recorded, by kind (a series appears when its kind first happens).",
            "kind",
            ((target, state.changes) for target, state in targets),
        )


def _counter(
    name: str, help_text: str, label: str, rows: Iterable[tuple[str, dict[str, int]]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help_text, labels=["target", label])
    sample = f"{name}_total"
    for target, counts in rows:
        for key, value in list(counts.items()):
            family.samples.append(Sample(sample, {"target": target, label: key}, float(value)))
    return family


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


class _Forward:
    """Shows the collectors of another registry in this one."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self._registry.collect()


_INF = float("inf")


def _number(value: float) -> str:
    """A sample value as Prometheus reads it: Python's shortest repr for a finite number (a
    fifth of prometheus-client's ``floatToGoString``, which spells large ones as 1.7e+09);
    the library's spelling (+Inf, -Inf, NaN) for the others."""
    if -_INF < value < _INF:
        return repr(float(value))
    text: str = _go_float(value)  # type: ignore[no-untyped-call]  # the library spelling
    return text


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


_FAMILIES: tuple[tuple[str, str, str], ...] = (
    *((name, help_text, "gauge") for name, help_text, _ in _TARGET_GAUGES),
    (
        "genauth_email_provider_info",
        "Current email provider type and snapshot hash (first 12 hex) of the target.",
        "gauge",
    ),
    (
        "genauth_monitor_polls",
        "Polls of the GenAuth API by outcome (success or the failure reason class).",
        "counter",
    ),
    (
        "genauth_email_provider_changes",
        "Drift events recorded, by kind (a series appears when its kind first happens).",
        "counter",
    ),
)


# "# HELP" and "# TYPE" of each family, as generate_latest writes them (a counter's with _total).
_HEADERS: tuple[bytes, ...] = tuple(
    f"# HELP {name}{suffix} {help_text}\n# TYPE {name}{suffix} {kind}\n".encode()
    for name, help_text, kind in _FAMILIES
    for suffix in ("_total" if kind == "counter" else "",)
)
_SAMPLE_NAMES: tuple[str, ...] = tuple(
    name + ("_total" if kind == "counter" else "") for name, _, kind in _FAMILIES
)
# A kept line has neither its sample name nor its newline, ``target="a"} 1.0``: the join puts
# them back between the lines (a third of the cache, 3 MB at 10,000 targets, was those names).
_STARTS: tuple[bytes, ...] = tuple(f"{name}{{".encode() for name in _SAMPLE_NAMES)
_BETWEEN: tuple[str, ...] = tuple(f"\n{name}{{" for name in _SAMPLE_NAMES)
_BETWEEN_BYTES: tuple[bytes, ...] = tuple(between.encode() for between in _BETWEEN)


def _family_text(family: int, column: list[bytes]) -> list[bytes]:
    """The text of one per-target family from its column (b"": a target without a series)."""
    present = list(filter(None, column))
    if not present:
        return [_HEADERS[family]]
    return [_HEADERS[family], _STARTS[family], _BETWEEN_BYTES[family].join(present), b"\n"]


class _TargetText:
    """The text of the per-target families: each target's lines of each family kept encoded,
    in one column per family in target order. A render redoes the lines of the targets whose
    version changed since the previous one (a poll changes up, last success, last duration
    and polls; the configuration seen and its events the five others) and joins every
    column into the exposition at once. Nothing else is kept per target but its label: at
    10,000 targets a render is a scan of the versions, the changed targets' lines and one
    join, and the cache costs about 540 bytes per target (a line is kept without its
    sample name: see _family_text)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._targets: Sequence[tuple[str, _Target]] = ()
        self._labels: list[str] = []
        self._versions: list[int] = []
        self._settings: list[int] = []
        self._columns: list[list[bytes]] = [[] for _ in _FAMILIES]

    def render(self, targets: Sequence[tuple[str, _Target]], rest: bytes) -> bytes:
        """The per-target families, then ``rest`` (the other families' text)."""
        with self._lock:
            self._refresh(targets)
            parts: list[bytes] = []
            for family, column in enumerate(self._columns):
                parts += _family_text(family, column)
            parts.append(rest)
            return b"".join(parts)

    def write(
        self,
        targets: Sequence[tuple[str, _Target]],
        rest: bytes,
        out: Callable[[bytes], object],
    ) -> None:
        """What :meth:`render` returns, given to ``out`` a family at a time."""
        with self._lock:
            self._refresh(targets)
            for family, column in enumerate(self._columns):
                for piece in _family_text(family, column):
                    out(piece)
            out(rest)

    def refresh(self, targets: Sequence[tuple[str, _Target]]) -> None:
        """Redo the lines of the targets that changed, without rendering."""
        with self._lock:
            self._refresh(targets)

    def _refresh(self, targets: Sequence[tuple[str, _Target]]) -> None:
        if targets is not self._targets:  # a target was added: all redone
            self._targets = targets
            self._labels = [f'target="{_label(name)}"' for name, _ in targets]
            self._versions = [-1] * len(targets)
            self._settings = [-1] * len(targets)
            self._columns = [[b""] * len(targets) for _ in _FAMILIES]
        versions, settings, labels, columns = (
            self._versions,
            self._settings,
            self._labels,
            self._columns,
        )
        # A version is read before the state, so a change made meanwhile is redone next time.
        for index, (_, state) in enumerate(targets):
            polled, seen = state.version, state.settings
            if polled != versions[index]:
                versions[index] = polled
                _poll_lines(columns, index, labels[index], state)
            if seen != settings[index]:
                settings[index] = seen
                _settings_lines(columns, index, labels[index], state)


# Where each family's text goes in _FAMILIES.
_ENABLED, _DRIFT, _LAST_CHANGE, _UP, _LAST_SUCCESS, _LAST_DURATION, _INFO, _POLLS, _CHANGES = range(
    len(_FAMILIES)
)


def _gauge(label: str, value: float | None) -> bytes:
    if value is None:
        return b""
    return f"{label}}} {_number(value)}".encode()


def _counts(family: int, label: str, key: str, counts: dict[str, int]) -> bytes:
    return (
        _BETWEEN[family]
        .join(f'{label},{key}="{_label(k)}"}} {_number(v)}' for k, v in list(counts.items()))
        .encode()
    )


def _poll_lines(columns: list[list[bytes]], index: int, label: str, state: _Target) -> None:
    """What a poll changes (b"" where the target has no series)."""
    columns[_UP][index] = _gauge(label, state.up)
    columns[_LAST_SUCCESS][index] = _gauge(label, state.last_success)
    columns[_LAST_DURATION][index] = _gauge(label, state.last_duration)
    columns[_POLLS][index] = _counts(_POLLS, label, "outcome", state.polls)


def _settings_lines(columns: list[list[bytes]], index: int, label: str, state: _Target) -> None:
    """What the configuration seen and its events change."""
    columns[_ENABLED][index] = _gauge(label, state.enabled)
    columns[_DRIFT][index] = _gauge(label, state.drift)
    columns[_LAST_CHANGE][index] = _gauge(label, state.last_change)
    hash12 = state.hash12
    columns[_INFO][index] = (
        b""
        if hash12 is None
        else (
            f'{label},type="{_label(state.provider_type or "")}",hash="{_label(hash12)}"}} 1.0'
        ).encode()
    )
    columns[_CHANGES][index] = _counts(_CHANGES, label, "kind", state.changes)
