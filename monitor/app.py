"""The one place that builds real objects from settings: engine, client, pollers, server."""

from __future__ import annotations

import logging
import os
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

import requests
from prometheus_client import CollectorRegistry, disable_created_metrics
from sqlalchemy import Engine

from monitor import __version__
from monitor.alerts import AlertmanagerSink, DeliveryWorker, Sink, SlackSink, WebhookSink
from monitor.alerts.worker import SinkPolicy
from monitor.api import create_app
from monitor.config import Settings, SinkSettings, TargetSettings
from monitor.core.alerting import SinkRoute
from monitor.errors import MonitorError
from monitor.genauth import GenAuthClient
from monitor.http_server import HttpServer
from monitor.metrics import Metrics
from monitor.scheduler import PollScheduler, ScheduledTarget
from monitor.service import TargetPoller
from monitor.storage import Queries, Store, create_store_engine, upgrade
from monitor.storage.outbox import Outbox
from monitor.timeutil import Clock, utc_now

__all__ = ["Daemon", "Runtime", "build_runtime", "fingerprint_key"]

log = logging.getLogger("monitor")

KEY_FILE_SUFFIX = ".fingerprint-key"


def fingerprint_key(settings: Settings) -> bytes:
    """The HMAC key for secret fingerprints: configured, or a generated file reused later."""
    configured = settings.monitor.fingerprint_key
    if configured is not None:
        return configured.get_secret_value()
    path = _key_file_path(settings)
    if not path.exists():
        _create_key_file(path)
    key = path.read_text().strip().encode()
    if not key:
        raise MonitorError(f"fingerprint key file {path} is empty")
    return key


def _create_key_file(path: Path) -> None:
    """Write a random key to a private temp file, then link it into place: a process racing
    us either wins (and we read its key) or finds the file complete, never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32) + "\n")
    try:
        os.link(temp, path)
        log.warning("created a new fingerprint key file", extra={"path": str(path)})
    except FileExistsError:
        pass
    finally:
        temp.unlink()


def _key_file_path(settings: Settings) -> Path:
    sqlite_path = settings.storage.sqlite_path
    if sqlite_path is not None:
        return sqlite_path.with_name(sqlite_path.name + KEY_FILE_SUFFIX)
    base = settings.source.parent if settings.source is not None else Path.cwd()
    return base / ("genauth-monitor" + KEY_FILE_SUFFIX)


@dataclass
class Runtime:
    """Objects shared by the daemon and one-shot commands such as ``check``."""

    settings: Settings
    store: Store
    queries: Queries
    registry: CollectorRegistry
    metrics: Metrics
    delivery: DeliveryWorker
    pollers: dict[str, TargetPoller] = field(default_factory=dict)


def _sink(sink: SinkSettings, session: requests.Session) -> Sink:
    url = sink.url
    if sink.type == "webhook":
        secret = sink.secret.get_secret_value() if sink.secret is not None else None
        return WebhookSink(
            name=sink.name, url=url, session=session, timeout=sink.timeout, secret=secret
        )
    if sink.type == "alertmanager":
        return AlertmanagerSink(name=sink.name, url=url, session=session, timeout=sink.timeout)
    return SlackSink(name=sink.name, url=url, session=session, timeout=sink.timeout)


def _delivery(settings: Settings, engine: Engine, metrics: Metrics, clock: Clock) -> DeliveryWorker:
    session = requests.Session()
    policies = [
        SinkPolicy(_sink(sink, session), sink.max_backoff, sink.repeat_interval)
        for sink in settings.sinks
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
) -> Runtime:
    """Open the database (migrating it), and build a poller per target restored from it."""
    engine = create_store_engine(settings.storage.url)
    if migrate:
        upgrade(engine)
    # The *_created series double a scrape with 1,000 targets and say nothing an operator uses.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    delivery = _delivery(settings, engine, metrics, clock)
    routes = [SinkRoute(s.name, s.min_severity, s.kinds) for s in settings.sinks]
    runtime = Runtime(
        settings=settings,
        store=Store(engine, routes=routes, on_outbox=delivery.wake),
        queries=Queries(engine),
        registry=registry,
        metrics=metrics,
        delivery=delivery,
    )
    key = fingerprint_key(settings)
    shared_session = session or _session()
    for target in settings.targets:
        poller = TargetPoller(
            name=target.name,
            fetcher=_client(settings, target, shared_session),
            store=runtime.store,
            metrics=runtime.metrics,
            fingerprint_key=key,
            expect=target.expect,
            ignore=target.ignore,
            failure_threshold=settings.monitor.failure_threshold,
            clock=clock,
        )
        poller.restore(runtime.store.ensure_target(target.name, now=clock()))
        runtime.pollers[target.name] = poller
    return runtime


def _session() -> requests.Session:
    """One pooled session for all targets; the clients take proxies from the environment
    once (see GenAuthClient), so requests need not re-read it on every call."""
    session = requests.Session()
    session.trust_env = False
    return session


def _client(settings: Settings, target: TargetSettings, session: requests.Session) -> GenAuthClient:
    return GenAuthClient(
        base_url=target.base_url,
        access_key_id=target.access_key_id,
        access_key_secret=target.access_key_secret.get_secret_value(),
        userpool_id=target.userpool_id,
        timeout=target.effective_timeout(settings.monitor),
        session=session,
        ca_bundle=str(target.ca_bundle) if target.ca_bundle else None,
    )


class Daemon:
    """``run``: scheduler plus HTTP server over one runtime."""

    def __init__(self, settings: Settings, *, clock: Clock = utc_now) -> None:
        self.runtime = build_runtime(settings, clock=clock)
        monitor = settings.monitor
        self.scheduler = PollScheduler(
            [
                ScheduledTarget(poller, target.effective_interval(monitor), monitor.jitter)
                for target, poller in zip(
                    settings.targets, self.runtime.pollers.values(), strict=True
                )
            ],
            backoff_max=monitor.backoff_max,
        )
        token = settings.server.api_token
        app = create_app(
            registry=self.runtime.registry,
            queries=self.runtime.queries,
            ready=self.ready,
            api_token=token.get_secret_value() if token is not None else None,
            clock=clock,
            metrics_token=settings.server.metrics_require_token,
        )
        self.http = HttpServer(app, host=settings.server.host, port=settings.server.port)

    def ready(self) -> tuple[bool, dict[str, bool]]:
        checks = {"database": self.runtime.store.ping(), "scheduler": self.scheduler.running}
        return all(checks.values()), checks

    def start(self) -> None:
        self.http.start()
        self.runtime.delivery.start()
        self.scheduler.start()
        settings = self.runtime.settings
        log.info(
            "genauth-monitor started",
            extra={
                "version": __version__,
                "targets": len(settings.targets),
                "listen": f"{settings.server.host}:{self.http.port}",
                "storage": settings.storage.display_url,
            },
        )

    def stop(self) -> None:
        self.scheduler.shutdown()
        self.runtime.delivery.stop()
        self.http.stop()
        self.runtime.store.engine.dispose()
        log.info("genauth-monitor stopped")

    def run_until(self, stop: threading.Event) -> None:
        self.start()
        try:
            stop.wait()
        finally:
            self.stop()
