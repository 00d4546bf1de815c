"""The one place that builds real objects from settings: engine, client, pollers, server."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, TextIO

import requests
from prometheus_client import CollectorRegistry, disable_created_metrics
from sqlalchemy import Engine

from monitor import __version__
from monitor.alerts import AlertmanagerSink, DeliveryWorker, Sink, SlackSink, WebhookSink
from monitor.alerts.worker import SinkPolicy
from monitor.api import create_app
from monitor.attribution import AttributionWorker, TargetLog
from monitor.audit_log import AuditLogReader
from monitor.cluster import LEASE, Cluster, default_replica_name, key_check
from monitor.config import MonitorSettings, Settings, SinkSettings, TargetSettings
from monitor.core.alerting import SinkRoute
from monitor.exposition import Exposition
from monitor.genauth import GenAuthClient, Route
from monitor.http_server import HttpServer
from monitor.httpio import abort, bounded_session
from monitor.keyfile import fingerprint_key
from monitor.listen import StartingServer
from monitor.metrics import LineRefresher, Metrics
from monitor.ratelimit import RateLimit
from monitor.recorder import Recorder
from monitor.scheduler import PollScheduler, ScheduledTarget
from monitor.service import TargetPoller
from monitor.startup import lock_sqlite
from monitor.storage import Queries, Store, create_store_engine, upgrade
from monitor.storage.attribution import Attributions
from monitor.storage.claims import ClaimStore, Member, MirroredState
from monitor.storage.migrate_apart import upgrade_apart
from monitor.storage.outbox import Outbox
from monitor.timeutil import Clock, utc_now

__all__ = ["Daemon", "Runtime", "build_runtime", "fingerprint_key"]

log = logging.getLogger("monitor")

_M_MMAP_THRESHOLD: Final = -3  # mallopt parameter, from glibc's malloc.h
POLL_WORKERS: Final = 10  # poll threads kept while idle
# Polls in flight at once at most: more threads start only while every one polls (slow
# upstreams); bodies in flight are bounded apart (httpio's budget), not by this.
POLL_WORKERS_MAX: Final = 64
READY_WAIT: Final = 0.8  # seconds /readyz waits for the database
STOP_WRITE_WAIT: Final = 2.0  # seconds a stopping daemon waits to write what it saw
HEAP_TRIM_EVERY: Final = 30.0  # seconds between the running daemon's malloc_trim calls


@dataclass
class Runtime:
    """Objects shared by the daemon and one-shot commands such as ``check``.

    It keeps what the running daemon reads, not the validated configuration: with 10,000
    targets the settings models are about 14 MiB, and each poller and client holds what it
    needs of its target."""

    monitor: MonitorSettings
    targets: tuple[str, ...]  # the configured target names, in the configuration's order
    store: Store
    queries: Queries
    registry: CollectorRegistry
    metrics: Metrics
    delivery: DeliveryWorker
    sessions: tuple[requests.Session, ...]  # upstream and sinks: aborted when stopping
    pollers: dict[str, TargetPoller] = field(default_factory=dict)
    attribution: AttributionWorker | None = None  # SPEC §11: the pending lookups' worker


def _sink(sink: SinkSettings, session: requests.Session, url: str) -> Sink:
    if sink.type == "webhook":
        secret = sink.secret.get_secret_value() if sink.secret is not None else None
        return WebhookSink(
            name=sink.name, url=url, session=session, timeout=sink.timeout, secret=secret
        )
    if sink.type == "alertmanager":
        return AlertmanagerSink(name=sink.name, url=url, session=session, timeout=sink.timeout)
    return SlackSink(name=sink.name, url=url, session=session, timeout=sink.timeout)


def _delivery(
    settings: Settings, engine: Engine, metrics: Metrics, clock: Clock, session: requests.Session
) -> DeliveryWorker:
    # One lane per URL of a sink (an alertmanager sink may list several).
    policies = [
        SinkPolicy(
            _sink(sink, session, url),
            sink.max_backoff,
            sink.repeat_interval,
            lane=lane,
            timeout=sink.timeout,
        )
        for sink in settings.sinks
        for lane, url in enumerate(sink.lane_urls)
    ]
    return DeliveryWorker(
        outbox=Outbox(engine),
        policies=policies,
        metrics=metrics,
        clock=clock,
        targets=[target.name for target in settings.targets],
    )


def build_runtime(
    settings: Settings,
    *,
    clock: Clock = utc_now,
    session: requests.Session | None = None,
    migrate: bool = True,
    recorder: Recorder | None = None,
    replica: str | None = None,
) -> Runtime:
    """Open the database (migrating it), and build a poller per target restored from it.

    With a ``recorder`` (the daemon) polls only queue their outcomes and the recorder writes
    them; without one (``check``) each poll writes what it saw before it returns. With a
    ``replica`` name (a daemon on PostgreSQL) writes are fenced by that replica's claims."""
    engine = create_store_engine(settings.storage.url)
    if migrate:
        upgrade(engine)
    # The *_created series double a scrape with 1,000 targets and say nothing an operator uses.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    sink_session = bounded_session()
    delivery = _delivery(settings, engine, metrics, clock, sink_session)
    routes = [SinkRoute(s.name, s.min_severity, s.kinds, len(s.lane_urls)) for s in settings.sinks]
    attributions = Attributions(
        engine,
        enabled=[target.name for target in settings.targets if target.attribution],
        routes=routes,
        # Alertmanager gets the actors in the annotations of its next re-post instead.
        follow_up_sinks=[s.name for s in settings.sinks if s.type in ("webhook", "slack")],
        wait=settings.monitor.attribution_wait,
        clock=clock,
        on_outbox=delivery.wake,
    )
    runtime = Runtime(
        monitor=settings.monitor,
        targets=tuple(target.name for target in settings.targets),
        store=Store(
            engine,
            routes=routes,
            on_outbox=delivery.wake,
            replica=replica,
            attribution=attributions,
        ),
        queries=Queries(engine),
        registry=registry,
        metrics=metrics,
        delivery=delivery,
        sessions=(),
    )
    key = fingerprint_key(settings)
    shared_session = session or bounded_session(pool_size=POLL_WORKERS_MAX)
    runtime.sessions = (shared_session, sink_session)
    limits: dict[str, RateLimit] = {}  # one per base_url: the cap is per host, not per target
    rate = settings.monitor.max_requests_per_second
    audit_logs: dict[str, TargetLog] = {}
    upstreams: dict[tuple[str, str | None], Route] = {}  # the environment read once per host
    mark = recorder.mark if recorder is not None else None  # one bound method for all
    states = runtime.store.ensure_targets([t.name for t in settings.targets], now=clock())
    for target in settings.targets:
        timeout = target.effective_timeout(settings.monitor)
        ca_bundle = str(target.ca_bundle) if target.ca_bundle else None
        route = upstreams.get((target.base_url, ca_bundle))
        if route is None:
            route = upstreams[target.base_url, ca_bundle] = Route.of(
                target.base_url, ca_bundle=ca_bundle
            )
        client = _client(
            settings,
            target,
            shared_session,
            limits.setdefault(target.base_url, RateLimit(rate)) if rate else None,
            route,
        )
        if target.attribution:  # the poller's client: one token cache for both
            audit_logs[target.name] = TargetLog(
                AuditLogReader(client), tuple(target.attribution_resource_types)
            )
        poller = TargetPoller(
            name=target.name,
            fetcher=client,
            store=runtime.store,
            metrics=runtime.metrics,
            fingerprint_key=key,
            expect=target.expect,
            ignore=target.ignore,
            failure_threshold=settings.monitor.failure_threshold,
            clock=clock,
            # The client's own deadline is twice the timeout; the watchdog's second more only
            # catches what the client cannot bound (a DNS lookup, say).
            deadline=2 * timeout + 1.0,
            write_inline=recorder is None,
        )
        if recorder is not None:
            poller.on_pending = mark
        poller.restore(states[target.name])
        runtime.pollers[target.name] = poller
    runtime.attribution = AttributionWorker(
        attributions=attributions,
        logs=audit_logs,
        metrics=metrics,
        clock=clock,
        margin=settings.monitor.attribution_margin,
    )
    return runtime


def _client(
    settings: Settings,
    target: TargetSettings,
    session: requests.Session,
    rate_limit: RateLimit | None,
    route: Route,
) -> GenAuthClient:
    return GenAuthClient(
        base_url=target.base_url,
        access_key_id=target.access_key_id,
        access_key_secret=target.access_key_secret.get_secret_value(),
        userpool_id=target.userpool_id,
        timeout=target.effective_timeout(settings.monitor),
        max_response_bytes=target.effective_max_response_bytes(settings.monitor),
        rate_limit=rate_limit,
        session=session,
        route=route,
    )


def _return_big_buffers_to_the_os() -> None:
    """Have glibc map every allocation over 256 KiB on its own, so that a body buffer is
    given back to the OS when freed. Left to itself, glibc raises that threshold after the
    first big free, and each poll thread's arena then keeps its bodies' high-water mark: a
    hostile upstream would inflate the daemon's RSS by the cap times the workers."""
    _glibc("mallopt", _M_MMAP_THRESHOLD, 256 * 1024)


def settle_the_heap() -> None:
    """Once the daemon is built and the settings dropped (``run``): collect the garbage of
    start-up (the settings and the TOML they came from), give what glibc can of the freed heap
    back to the OS, so the pollers' memory is not on top of it, and freeze what is left.

    What is left lives as long as the process (a poller, a client, a job and a metrics record
    per target); frozen, a full collection no longer walks all of it while holding the GIL,
    a pause of every scrape and poll (140-210 ms with 2,000 targets here). Objects made
    later are collected as usual."""
    gc.collect()
    _trim_the_heap()
    gc.freeze()


def keep_the_heap_trimmed(
    stop: threading.Event,
    every: float = HEAP_TRIM_EVERY,
    trim: Callable[[], None] | None = None,
) -> None:
    """Until ``stop``: give freed heap back to the OS every ``every`` seconds. glibc returns
    only the free top of each heap by itself; the pages freed inside them (a first round's
    snapshots written, a scrape's buffers) stay resident. At 10,000 targets this holds the
    daemon at about 146 MiB instead of 149-153 (one ``malloc_trim`` took 0.05 ms there)."""
    while not stop.wait(every):
        (trim or _trim_the_heap)()


def _trim_the_heap() -> None:
    """glibc's ``malloc_trim(0)``: freed heap pages go back to the OS."""
    _glibc("malloc_trim", 0)


@functools.cache
def _libc() -> ctypes.CDLL:
    # Looked up once: find_library runs ldconfig, and the heap is trimmed every 30 s.
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _glibc(function: str, *args: int) -> None:
    """Call a glibc malloc tuning function; on another C library there is nothing to tune."""
    with contextlib.suppress(OSError, AttributeError):
        getattr(_libc(), function)(*args)


class Daemon:
    """``run``: scheduler, recorder, delivery lanes and HTTP server over one runtime."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock = utc_now,
        starting: StartingServer | None = None,
        migrate_apart: bool = False,
    ) -> None:
        """``starting``: the server answering /healthz on the listen socket while this is
        built (``run``); :meth:`start` takes the socket over from it. ``migrate_apart``
        (``run``): migrate in a child process, so Alembic never enters this one. Keeps nothing of
        ``settings`` but what the running daemon reads."""
        _return_big_buffers_to_the_os()
        self._starting = starting
        # SQLite has one daemon: a second one stops here, before it migrates anything.
        self._sqlite_lock: TextIO | None = lock_sqlite(settings)
        if migrate_apart:
            # Under the lock: of two daemons started at once on one SQLite file, the one
            # refused never migrates. Alembic stays in the child (storage/migrate_apart.py).
            upgrade_apart(settings.storage.url)
        self._clock = clock
        self.recorder = Recorder()
        self.replica_name = settings.cluster.replica_name or default_replica_name()
        replicated = not settings.storage.is_sqlite
        self.runtime = build_runtime(
            settings,
            clock=clock,
            recorder=self.recorder,
            replica=self.replica_name if replicated else None,
        )
        metrics = self.runtime.metrics
        exposition = Exposition(metrics.render, render_gzip=metrics.render_gzip)
        self._metric_lines = LineRefresher(metrics, ahead=exposition)
        monitor = settings.monitor
        intervals = {target.name: target.effective_interval(monitor) for target in settings.targets}
        self.scheduler = PollScheduler(
            [
                ScheduledTarget(poller, intervals[name], monitor.jitter)
                for name, poller in self.runtime.pollers.items()
            ],
            backoff_max=monitor.backoff_max,
            min_workers=POLL_WORKERS,
            max_workers=POLL_WORKERS_MAX,
            claimed=replicated,
        )
        self.cluster: Cluster | None = None
        self._mirrored: dict[str, MirroredState] = {}
        if replicated:
            self.cluster = Cluster(
                claims=ClaimStore(
                    self.runtime.store.engine,
                    me=self.replica_name,
                    instance=str(uuid.uuid4()),
                    lease=LEASE,
                ),
                targets=intervals,
                holder=self.scheduler,
                key_check=key_check(fingerprint_key(settings)),
                on_mirror=self._mirror,
                on_beat=self._beat,
                on_claimed=self._claimed,
                clock=clock,
            )
            self.cluster.join()  # a live replica of the same name: ConfigError, exit 2
            for name, poller in self.runtime.pollers.items():
                poller.claim = functools.partial(self.cluster.epoch, name)
        else:
            self.runtime.metrics.set_cluster(
                replica=self.replica_name, replicas=1, owned=len(intervals), skew=0.0
            )
        self._probe = _DatabaseProbe(self.runtime.store)
        token = settings.server.api_token
        app = create_app(
            registry=self.runtime.registry,
            queries=self.runtime.queries,
            ready=self.ready,
            api_token=token.get_secret_value() if token is not None else None,
            clock=clock,
            metrics_token=settings.server.metrics_require_token,
            targets=[target.name for target in settings.targets],
            exposition=exposition,
            ui_session=settings.server.ui_session,
            cluster=self._members,
        )
        host, port = settings.server.host, settings.server.port
        sock = starting.socket if starting is not None else None
        self.http = HttpServer(app, host=host, port=port, sock=sock)
        self._listen_host = host
        self._storage_shown = settings.storage.display_url

    # -- replicas ----------------------------------------------------------------------------

    def _members(self) -> tuple[str, list[Member]]:
        if self.cluster is not None:
            return self.replica_name, self.cluster.members()
        alone = Member(self.replica_name, self._clock(), sorted(self.runtime.pollers))
        return self.replica_name, [alone]

    def _beat(self, replicas: int, owned: int, skew: float) -> None:
        self.runtime.metrics.set_cluster(
            replica=self.replica_name, replicas=replicas, owned=owned, skew=skew
        )

    def _claimed(self, names: list[str]) -> None:
        """Targets this replica now polls start from what their previous owner recorded."""
        states = self.runtime.store.ensure_targets(names, now=self._clock())
        for name in names:
            self._mirrored.pop(name, None)  # our polls set its gauges; mirror anew once dropped
            self.runtime.pollers[name].restore(states[name])

    def _mirror(self, states: list[MirroredState]) -> None:
        """The state gauges of the targets another replica polls, as the database has them."""
        metrics = self.runtime.metrics
        for state in states:
            # Unchanged states are skipped: setting a gauge makes /metrics render the target's
            # lines again, and most mirrored targets change rarely.
            if self._mirrored.get(state.name) == state:
                continue
            self._mirrored[state.name] = state
            if state.hash is not None and state.enabled is not None:
                metrics.set_config(
                    state.name,
                    enabled=state.enabled,
                    provider_type=state.provider_type,
                    hash_=state.hash,
                    drift=state.drift,
                )
                metrics.set_last_change(state.name, state.last_change_at)
            if state.up is not None:
                metrics.set_up(state.name, state.up, state.last_success_at)

    def ready(self) -> tuple[bool, dict[str, bool]]:
        """Within a second, whatever the database does: a frozen one is "not ready"."""
        database = self._probe.check(READY_WAIT) and self.recorder.healthy
        checks = {"database": database, "scheduler": self.scheduler.running}
        return all(checks.values()), checks

    def start(self) -> None:
        if self._starting is not None:
            self._starting.handover()  # from here uvicorn answers on the same socket
        self.http.start()
        self._metric_lines.start()
        self.recorder.start(self.runtime.store)
        self.runtime.delivery.start()
        if self.runtime.attribution is not None:
            self.runtime.attribution.start()
        self.scheduler.start()
        if self.cluster is not None:
            self.cluster.start()
        log.info(
            "genauth-monitor started",
            extra={
                "version": __version__,
                "replica": self.replica_name,
                "targets": len(self.runtime.targets),
                "listen": f"{self._listen_host}:{self.http.port}",
                "storage": self._storage_shown,
            },
        )

    def stop(self) -> None:
        """Stop within a few seconds even mid-read: requests in flight are aborted, what the
        polls saw is written if the database answers in time."""
        self.scheduler.shutdown()
        for session in self.runtime.sessions:
            abort(session)
        self.recorder.stop(timeout=STOP_WRITE_WAIT)
        if self.cluster is not None:
            # After the recorder: the next owner reads when we last polled from poll_state.
            self.cluster.stop()
        if self.runtime.attribution is not None:
            self.runtime.attribution.stop(timeout=1.0)
        self.runtime.delivery.stop(timeout=1.0)
        self._metric_lines.stop()
        self.http.stop()
        self.runtime.store.engine.dispose()
        if self._sqlite_lock is not None:
            self._sqlite_lock.close()
        log.info("genauth-monitor stopped")

    def run_until(self, stop: threading.Event) -> None:
        self.start()
        try:
            keep_the_heap_trimmed(stop)
        finally:
            self.stop()


class _DatabaseProbe:
    """``SELECT 1`` on a thread of its own, so a frozen database makes /readyz say 503 in
    time instead of hanging it; a probe still stuck from before answers "not ready" at once."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._running: threading.Thread | None = None
        self._result = False
        self._done = threading.Event()

    def check(self, wait: float) -> bool:
        with self._lock:
            if self._running is None or not self._running.is_alive():
                self._done = threading.Event()
                self._running = threading.Thread(
                    target=self._ping, args=(self._done,), name="db-probe", daemon=True
                )
                self._running.start()
            done = self._done
        return done.wait(wait) and self._result

    def _ping(self, done: threading.Event) -> None:
        self._result = self._store.ping()
        done.set()
