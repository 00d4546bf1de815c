"""Time to render ``/metrics`` for 1,000 targets.

Run from the repository root::

    .venv/bin/python bench/scrape.py                 # 1000 targets, 200 renders
    .venv/bin/python bench/scrape.py --targets 5000 --runs 100 --no-http

A ``Metrics`` on a fresh ``CollectorRegistry`` is filled for every target the way the poll path
fills it (``set_config``, ``set_up``, ``set_last_change``, ``observe_poll`` several times,
``count_event``; a share of targets also failing, drifting, disabled), plus the alert delivery
counters. Then ``Metrics.render()`` (what the daemon serves; ``--generate-latest`` for the
library's renderer) is timed (p50/p99 over ``--runs``, a quarter of the targets polled between
two renders), and, unless ``--no-http``, a real ``GET /metrics`` through the daemon's FastAPI app
served by its uvicorn ``HttpServer`` on loopback.
"""

from __future__ import annotations

import argparse
import random
import secrets
import statistics
import time
from collections.abc import Callable
from datetime import timedelta

import requests
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import create_engine

from monitor.api import create_app
from monitor.exposition import Exposition
from monitor.http_server import HttpServer
from monitor.metrics import Metrics
from monitor.storage import Queries
from monitor.timeutil import utc_now

TYPES = ("custom", "custom", "custom", "sendgrid", "ali", "qq")
FAILURES = ("timeout", "network", "http_status", "api_error")


def populate(metrics: Metrics, targets: int, polls: int, seed: int = 1) -> None:
    """Every target as after ``polls`` polls; about 10% failing now and then, 5% drifting."""
    rng = random.Random(seed)
    now = utc_now()
    for i in range(targets):
        name = f"pool-{i:04d}"
        enabled = rng.random() > 0.05
        drift = rng.random() < 0.05
        metrics.set_config(
            name,
            enabled=enabled,
            provider_type=rng.choice(TYPES),
            hash_="sha256:" + secrets.token_hex(32),
            drift=drift,
        )
        changed = now - timedelta(days=rng.uniform(0, 90))
        metrics.set_last_change(name, changed)
        metrics.count_event(name, "first_seen")
        if not enabled:
            metrics.count_event(name, "provider_disabled")
        if drift:
            metrics.count_event(name, "baseline_drift")
        if rng.random() < 0.2:
            metrics.count_event(name, "config_changed")
        failing = rng.random() < 0.1
        for _ in range(polls):
            if failing and rng.random() < 0.3:
                metrics.observe_poll(name, rng.choice(FAILURES), rng.uniform(0.05, 10.0))
            else:
                metrics.observe_poll(name, "success", rng.lognormvariate(-3.5, 0.6))
        if failing:
            metrics.count_event(name, "poll_failing")
            metrics.count_event(name, "poll_recovered")
        up = not failing or rng.random() < 0.5
        metrics.set_up(name, up, now - timedelta(seconds=rng.uniform(0, 60)))
    for sink in ("ops-webhook", "alertmanager", "slack"):
        metrics.deliveries.labels(sink=sink, outcome="sent").inc(rng.randint(1, 500))
        metrics.deliveries.labels(sink=sink, outcome="failed").inc(rng.randint(0, 5))
    metrics.set_outbox_pending("webhook", 0)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(label: str, seconds: list[float]) -> str:
    ms = [s * 1000 for s in seconds]
    return (
        f"{label:<34} p50 {percentile(ms, 0.5):7.1f} ms   p99 {percentile(ms, 0.99):7.1f} ms   "
        f"mean {statistics.fmean(ms):7.1f} ms   min {min(ms):7.1f} ms"
    )


def time_render(
    metrics: Metrics, runs: int, *, dirty: float, full: bool
) -> tuple[list[float], list[float], bytes]:
    """Renders as the daemon serves them (``Metrics.render``), with ``dirty`` of the targets
    polled between two renders (a 15 s scrape of 10,000 targets at 60 s: a quarter); ``full``
    times prometheus-client's own ``generate_latest`` of the whole registry instead."""

    def whole() -> bytes:
        return generate_latest(metrics.registry)

    render: Callable[[], bytes] = whole if full else metrics.render
    body = render()  # warm-up
    walls, cpus = [], []
    names = [name for name, _ in metrics.snapshot()]
    rng = random.Random(7)
    for _ in range(runs):
        for name in rng.sample(names, int(len(names) * dirty)):
            metrics.observe_poll(name, "success", rng.uniform(0.01, 0.2))
        cpu, wall = time.process_time(), time.perf_counter()
        body = render()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return walls, cpus, body


def time_http(metrics: Metrics, runs: int) -> tuple[list[float], int]:
    app = create_app(
        registry=metrics.registry,
        exposition=Exposition(metrics.render, render_gzip=metrics.render_gzip),
        queries=Queries(create_engine("sqlite://")),  # /metrics does not query the database
        ready=lambda: (True, {}),
        api_token=None,
        clock=utc_now,
    )
    server = HttpServer(app, host="127.0.0.1", port=0)
    server.start()
    try:
        session = requests.Session()
        url = f"http://127.0.0.1:{server.port}/metrics"
        for _ in range(5):  # warm-up
            session.get(url, timeout=30).raise_for_status()
        walls = []
        size = 0
        for _ in range(runs):
            wall = time.perf_counter()
            response = session.get(url, timeout=30)
            size = len(response.content)
            walls.append(time.perf_counter() - wall)
            response.raise_for_status()
        session.close()
        return walls, size
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=200, help="timed renders (and GETs)")
    parser.add_argument("--polls", type=int, default=20, help="polls observed per target")
    parser.add_argument("--no-http", action="store_true", help="skip the GET /metrics timing")
    parser.add_argument("--dirty", type=float, default=0.25, help="share polled between renders")
    parser.add_argument(
        "--generate-latest", action="store_true", help="time prometheus-client's renderer instead"
    )
    args = parser.parse_args(argv)

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    started = time.perf_counter()
    populate(metrics, args.targets, args.polls)
    filled = time.perf_counter() - started

    walls, cpus, body = time_render(metrics, args.runs, dirty=args.dirty, full=args.generate_latest)
    lines = body.decode().splitlines()
    series = sum(1 for line in lines if line and not line.startswith("#"))
    families = sum(1 for line in lines if line.startswith("# TYPE "))
    print(
        f"== /metrics with {args.targets} targets ({args.polls} polls observed each; "
        f"filled in {filled:.2f} s) =="
    )
    print(
        f"exposition: {len(body):,} bytes, {series:,} series (sample lines), "
        f"{families} metric families, {series / args.targets:.1f} series per target"
    )
    what = "generate_latest" if args.generate_latest else "Metrics.render"
    print(summary(f"{what} (wall, {args.runs} runs)", walls))
    print(summary(f"{what} (CPU)", cpus))
    if not args.no_http:
        http_walls, size = time_http(metrics, args.runs)
        print(summary(f"GET /metrics over HTTP ({size:,} B)", http_walls))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
