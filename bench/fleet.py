"""The whole daemon with a fleet of targets, next to the HTTP floor, in one run.

Run from the repository root::

    .venv/bin/python bench/fleet.py                       # 100@1s, 1000@5s, 10000@60s; SQLite
    .venv/bin/python bench/fleet.py --configs 1000@5s --rounds 3
    .venv/bin/python bench/fleet.py --storage-url postgresql+psycopg://postgres@127.0.0.1/test
    .venv/bin/python bench/fleet.py --quick               # a smoke run: 10@1s, one short round
    .venv/bin/python bench/fleet.py --check               # exit 1 when a goal is missed

For each configuration ``N@I`` (N targets polled every I):

1. The simulated GenAuth API runs in a process of its own (this file with ``--simulator``,
   around :class:`monitor.simulator.SimulatedGenAuth`); it counts the requests it answers and
   samples the counts every 20 ms, so polls are counted where they arrive, at no cost to the
   daemon. Every target fetches its token once, at its first poll: the token requests over time
   are the first polls over time.
2. ``--replicas`` K (default 1) real daemons (``python -m monitor run``) start on one database
   (a temp SQLite file, or a scratch database of ``--storage-url`` created and dropped here),
   each with its own config file and port, all N targets in each config. ``--shards`` is their
   baseline without coordination: each daemon on a database of its own with 1/K of the targets
   (the same processes and polls, no claims shared).
3. **Start-up**: from ``Popen`` to ``/healthz`` 200 (every replica), and to the last target's
   first poll; the spread of the first polls (first to last) and their peak rate in any 1 s;
   then to the daemons polling on schedule (two 2 s windows in a row at most 1.2x the planned
   rate: the polls that fell behind in the first round have run) and to every target's first
   snapshot recorded in the database (the recorder's backlog of first snapshots and their
   events written), where the rounds begin.
4. **Rounds**, ``--rounds`` times, alternating which goes first: the daemons run for a window
   of whole intervals (``--window``, default 10 s, rounded up: 10 s at 1 s and 5 s, 60 s at
   60 s, so each target is due about once per interval in it): their CPU from
   ``/proc/PID/stat``, all threads, divided by the polls that arrived at the simulator
   meanwhile, and the polls done against ``N * window / I``; then the daemons are
   SIGSTOPped and this process runs the floor, a bare ``requests.Session`` ``GET`` + ``json()``
   + ``sha256`` of the body loop with the same headers against the same simulator (its CPU from
   ``time.process_time``), first back to back (the floor of the goal), then paced at the
   daemon's rate, N / I requests a second evenly spaced with a sleep between them (the naive
   poller doing the daemon's job: on this VM a thread that sleeps between requests pays
   about 100-130 us more per request than one that never sleeps); SIGCONT, and a settling
   pause before the daemons are measured again (coalesced polls missed during the pause run
   at once). Medians of the rounds are printed.
5. **RSS**: VmRSS at the end of each daemon window (steady: median) and VmHWM at the end
   (peak, after the scrapes too), the largest replica's.
6. **/metrics**: ``--scrapes`` GETs (default 50) with ``Accept-Encoding: gzip`` as Prometheus
   sends, spaced just over the daemon's 1 s render cache so each one is rendered anew; p50 and
   p99 (nearest rank: of 50, the largest) of the wall time, and the p99 from each daemon's
   third scrape on (by then it knows the scraper's period and renders ahead of it; the
   first two it renders as they come).
7. **Per target**: the simulator serves one pool for every target and cannot tell them apart,
   so each daemon window also reads every target's ``seen_count`` from the database before and
   after: the fewest and the most sightings of any target per interval (1.00 each when every
   target is polled exactly once per interval, by whichever replica).
8. **Failover** (K > 1): SIGKILL the first replica, then the seconds until every target has a
   new sighting in the database (its targets wait for their claims' leases to run out).

One line per configuration; ``--check`` exits 1 when a goal of issue 10 is missed:
CPU per poll <= 1.0x the floor; /metrics p99 <= 20 ms up to 1,000 targets and <= 100 ms up
to 10,000; peak RSS < 150 MiB, /healthz < 2 s up to 10,000 targets; first polls spread within
min(interval, 30 s) (and no 1 s with more than twice the even rate); polls done >= 99%;
and with K > 1 the goals of issue 11: upstream requests per target per interval 1.00 +- 0.02,
polls done >= 99.9%, failover < max(2 intervals, 30 s).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import math
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import requests

from monitor.genauth import PROVIDER_PATH, TOKEN_PATH

ROOT = Path(__file__).resolve().parent.parent
KEY_ID = "bench-fleet"
KEY_SECRET = "bench-fleet-secret"  # of the local simulator only
SAMPLE_EVERY = 0.02  # seconds between the simulator's samples of its counters
CLK_TCK = os.sysconf("SC_CLK_TCK")
DEFAULT_CONFIGS = "100@1s,1000@5s,10000@60s"
PR_SET_PDEATHSIG = 1  # prctl option, from linux/prctl.h
HEALTHZ_WAIT = 300.0  # seconds a daemon may take to answer /healthz before the run gives up

# The goals of issue 10.
GOAL_CPU_RATIO = 1.0
GOAL_DONE = 0.99
GOAL_RSS_MIB = 150.0
GOAL_HEALTHZ_S = 2.0
FIRST_SPREAD_MAX = 30.0
# The goals of issue 11 (replicas).
GOAL_REPLICA_DONE = 0.999


def goal_metrics_p99_ms(targets: int) -> float | None:
    if targets <= 1000:
        return 20.0
    if targets <= 10_000:
        return 100.0
    return None


# --------------------------------------------------------------------------- the simulator


def simulator_main() -> int:
    """``--simulator``: serve the API, answer ``counts`` and ``series`` lines on stdin."""
    from monitor.simulator import SimulatedGenAuth

    samples: list[tuple[float, int, int]] = []
    stop = threading.Event()
    with SimulatedGenAuth(access_key_id=KEY_ID, access_key_secret=KEY_SECRET) as sim:

        def sample() -> None:
            last = (-1, -1)
            while not stop.wait(SAMPLE_EVERY):
                now = (sim.token_requests, sim.provider_requests)
                if now != last:  # only changes: a long run keeps a short list
                    samples.append((time.time(), *now))
                    last = now

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        print(sim.base_url, flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "counts":
                answer: Any = {
                    "t": time.time(),
                    "token": sim.token_requests,
                    "provider": sim.provider_requests,
                }
            elif command == "series":
                answer = list(samples)
            else:
                answer = {"error": f"unknown command {command!r}"}
            print(json.dumps(answer), flush=True)
        stop.set()
    return 0


class Simulator:
    """The simulator process, driven over its stdin and stdout."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--simulator"],
            cwd=ROOT,
            preexec_fn=die_with_parent,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self._out: IO[str] = self.proc.stdout
        self._in: IO[str] = self.proc.stdin
        self.base_url = self._out.readline().strip()
        if not self.base_url.startswith("http"):
            raise RuntimeError(f"simulator did not start (exit code {self.proc.poll()})")

    def _ask(self, command: str) -> Any:
        self._in.write(command + "\n")
        self._in.flush()
        return json.loads(self._out.readline())

    def counts(self) -> tuple[float, int, int]:
        """(wall time, token requests, provider requests) so far."""
        answer = self._ask("counts")
        return float(answer["t"]), int(answer["token"]), int(answer["provider"])

    def series(self) -> list[tuple[float, int, int]]:
        return [(float(t), int(a), int(b)) for t, a, b in self._ask("series")]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._in.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --------------------------------------------------------------------------- /proc


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def proc_status_mib(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} for pid {pid}")


# --------------------------------------------------------------------------- the daemons


def die_with_parent() -> None:
    """In a child before exec: SIGKILL when this process ends, however it ends, so a run that
    is interrupted (or killed) leaves no daemon polling and no simulator behind to load the
    machine of the next run (Linux ``prctl(PR_SET_PDEATHSIG)``; elsewhere nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def parse_duration(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r}")
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[match.group(2)]
    return float(match.group(1)) * scale


@dataclass(frozen=True)
class Config:
    targets: int
    interval: float

    @property
    def label(self) -> str:
        return f"{self.targets}@{self.interval:g}s"

    @property
    def spread_window(self) -> float:
        return min(self.interval, FIRST_SPREAD_MAX)


def parse_configs(text: str) -> list[Config]:
    configs = []
    for part in text.split(","):
        targets, _, interval = part.strip().partition("@")
        if not targets.isdigit() or not interval:
            raise argparse.ArgumentTypeError(f"not N@INTERVAL: {part!r}")
        configs.append(Config(int(targets), parse_duration(interval)))
    return configs


def write_config(
    directory: Path, index: int, names: range, cfg: Config, url: str, port: int, base: str
) -> Path:
    lines = [
        "[monitor]",
        f'interval = "{cfg.interval:g}s"',
        'fingerprint_key_env = "BENCH_FINGERPRINT_KEY"',
        "[storage]",
        f"url = {json.dumps(url)}",
        "[server]",
        f'listen = "127.0.0.1:{port}"',
    ]
    for i in names:
        lines += [
            "[[targets]]",
            f'name = "pool-{i:05d}"',
            f'base_url = "{base}"',
            f'access_key_id = "{KEY_ID}"',
            'access_key_secret_env = "BENCH_SECRET"',
        ]
    path = directory / f"replica-{index}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    started: float  # time.time() just before Popen

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def scratch_database(url: str | None, directory: Path) -> Iterator[str]:
    """A temp SQLite file, or a database of its own on the PostgreSQL server of ``url``."""
    if url is None:
        directory.mkdir(parents=True, exist_ok=True)
        yield f"sqlite:///{directory / 'fleet.db'}"
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin_url = make_url(url)
    name = f"gm_fleet_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class Sightings:
    """Each target's sightings so far, as the daemons recorded them (``seen_count`` of its
    current snapshot): how many times each target was polled, where the simulator, serving one
    pool for all targets, cannot tell them apart. Sightings are written in ticks of 0.5 s."""

    QUERY = (
        "SELECT p.target_id, s.seen_count FROM poll_state p "
        "JOIN snapshots s ON s.id = p.current_snapshot_id"
    )

    def __init__(self, urls: Sequence[str]) -> None:
        from sqlalchemy import create_engine

        self.engines = [create_engine(url) for url in dict.fromkeys(urls)]

    def read(self) -> dict[tuple[int, int], int]:
        """(database, target id) -> sightings."""
        from sqlalchemy import text

        seen = {}
        for index, engine in enumerate(self.engines):
            with engine.connect() as connection:
                for target, count in connection.execute(text(self.QUERY)):
                    seen[index, int(target)] = int(count)
        return seen

    def close(self) -> None:
        for engine in self.engines:
            engine.dispose()


# --------------------------------------------------------------------------- measurements


@dataclass
class Result:
    cfg: Config
    replicas: int
    shards: bool = False  # the replicas each on a database of their own, the targets split
    healthz_s: float = math.nan
    first_polls_s: float = math.nan  # process start to the last target's first poll
    spread_s: float = math.nan  # first to last first poll
    peak_rate: float = math.nan  # most first polls in any 1 s
    steady_s: float = math.nan  # process start to polling at the planned rate (backlog gone)
    recorded_s: float = math.nan  # process start to every target's first snapshot in the DB
    daemon_us: list[float] = field(default_factory=list)
    floor_us: list[float] = field(default_factory=list)
    paced_us: list[float] = field(default_factory=list)  # the floor at the daemon's rate
    done: list[float] = field(default_factory=list)
    rss_steady: list[float] = field(default_factory=list)
    rss_peak: float = math.nan
    scrapes_ms: list[float] = field(default_factory=list)
    healthz_ms: list[float] = field(default_factory=list)  # the same server's floor, same run
    metrics_bytes: int = 0
    metrics_gzip_bytes: int = 0
    per_target_low: list[float] = field(default_factory=list)  # fewest sightings / planned
    per_target_high: list[float] = field(default_factory=list)  # most sightings / planned
    failover_s: float = math.nan  # SIGKILL of one replica to every target sighted again
    failed: str = ""

    @property
    def ratio(self) -> float:
        if not self.daemon_us or not self.floor_us:
            return math.nan
        return statistics.median(self.daemon_us) / statistics.median(self.floor_us)

    @property
    def paced_ratio(self) -> float:
        if not self.daemon_us or not self.paced_us:
            return math.nan
        return statistics.median(self.daemon_us) / statistics.median(self.paced_us)

    def p(self, q: float, of: str = "scrapes_ms") -> float:
        values: list[float] = getattr(self, of)
        return percentile(values, q) if values else math.nan

    def warm_p99(self) -> float:
        """p99 of the scrapes after each daemon's first two: a daemon renders ahead of a
        scraper's scrapes once it has seen two (its period); the first two it renders as they
        come."""
        warm = self.scrapes_ms[2 * self.replicas :]  # the scrapes go round the replicas
        return percentile(warm, 0.99) if warm else math.nan

    def goals(self) -> list[tuple[str, bool, str]]:
        """(goal, met, figure) for each goal of issue 10 that applies to this configuration."""
        cfg = self.cfg
        out = [
            (
                f"CPU/poll <= {GOAL_CPU_RATIO}x floor",
                self.ratio <= GOAL_CPU_RATIO,
                f"{self.ratio:.2f}x",
            ),
            (
                f"polls done >= {GOAL_DONE:.0%}",
                bool(self.done) and statistics.median(self.done) >= GOAL_DONE,
                f"{statistics.median(self.done):.2%}" if self.done else "none",
            ),
            (
                f"first polls within {cfg.spread_window:g} s",
                self.spread_s <= cfg.spread_window,
                f"{self.spread_s:.2f} s",
            ),
            (
                f"<= {2 * cfg.targets / cfg.spread_window:.0f} first polls in any 1 s (2x even)",
                self.peak_rate <= 2 * cfg.targets / cfg.spread_window,
                f"{self.peak_rate:.0f}",
            ),
        ]
        p99_goal = goal_metrics_p99_ms(cfg.targets)
        if p99_goal is not None:
            out.append(
                (
                    f"/metrics p99 <= {p99_goal:g} ms",
                    self.p(0.99) <= p99_goal,
                    f"{self.p(0.99):.1f} ms",
                )
            )
        if cfg.targets <= 10_000:
            out.append(
                (
                    f"peak RSS < {GOAL_RSS_MIB:g} MiB",
                    self.rss_peak < GOAL_RSS_MIB,
                    f"{self.rss_peak:.1f} MiB",
                )
            )
            out.append(
                (
                    f"/healthz < {GOAL_HEALTHZ_S:g} s",
                    self.healthz_s < GOAL_HEALTHZ_S,
                    f"{self.healthz_s:.2f} s",
                )
            )
        if self.replicas > 1 and not self.shards:
            out += self.replica_goals()
        return out

    def replica_goals(self) -> list[tuple[str, bool, str]]:
        """The goals of issue 11's scale section (SPEC §10) for K > 1 replicas."""
        done = statistics.median(self.done) if self.done else math.nan
        bound = failover_bound(self.cfg)
        return [
            (
                "upstream requests per target per interval 1.00 +- 0.02",
                abs(done - 1.0) <= 0.02,
                f"{done:.3f} (per target {med(self.per_target_low):.2f}-"
                f"{med(self.per_target_high):.2f} sightings per interval)",
            ),
            (f"polls done >= {GOAL_REPLICA_DONE:.1%}", done >= GOAL_REPLICA_DONE, f"{done:.2%}"),
            (
                f"failover after SIGKILL < {bound:g} s (max(2 intervals, 30 s))",
                self.failover_s < bound,
                f"{self.failover_s:.1f} s",
            ),
        ]


def whole_intervals(window: float, interval: float) -> float:
    """``window`` rounded up to whole intervals: the first polls are spread over min(I, 30 s),
    so a window shorter than the interval sees every target 0 or 1 times, depending on where it
    falls in each target's period."""
    return math.ceil(window / interval - 1e-9) * interval


def failover_bound(cfg: Config) -> float:
    return max(2 * cfg.interval, 30.0)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least ``q`` of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class Floor:
    """The bare loop: what any Python poller built on ``requests`` spends at least."""

    def __init__(self, base_url: str) -> None:
        self.session = requests.Session()
        token = self.session.post(
            base_url + TOKEN_PATH,
            json={"accessKeyId": KEY_ID, "accessKeySecret": KEY_SECRET},
            timeout=10,
        ).json()["data"]["access_token"]
        self.url = base_url + PROVIDER_PATH
        self.headers = {
            "Authorization": f"Bearer {token}",
            "x-authing-userpool-id": KEY_ID,
            "x-genauth-userpool-id": KEY_ID,
        }
        self.run(20)  # connection and caches warm

    def request(self) -> None:
        """One request of the naive loop: GET, ``json()``, sha256 of the body."""
        response = self.session.get(self.url, headers=self.headers, timeout=10)
        if response.json()["statusCode"] != 200:
            raise RuntimeError("floor: the simulator refused the request")
        hashlib.sha256(response.content).hexdigest()

    def run(self, n: int) -> float:
        """CPU microseconds per request over ``n`` requests."""
        request = self.request
        started = time.process_time()
        for _ in range(n):
            request()
        return (time.process_time() - started) / n * 1e6

    def paced_for(self, seconds: float, rate: float) -> float:
        """As ``run``, one request every ``1 / rate`` seconds for about ``seconds``: the naive
        poller doing the daemon's job (N targets every I), which sleeps between requests."""
        request, n = self.request, max(int(seconds * rate), 1)
        started, due = time.process_time(), time.monotonic()
        for _ in range(n):
            due += 1 / rate
            request()
            time.sleep(max(due - time.monotonic(), 0.0))
        return (time.process_time() - started) / n * 1e6

    def run_for(self, seconds: float) -> float:
        """As ``run``, for about ``seconds`` of wall time (in batches of 100)."""
        spent, n = 0.0, 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            spent += self.run(100) * 100
            n += 100
        return spent / n


@dataclass
class Plan:
    rounds: int
    window: float  # seconds of a daemon round
    floor: float  # seconds of a floor round
    settle: float  # seconds after SIGCONT before the next daemon round
    scrapes: int


def run_config(
    cfg: Config,
    plan: Plan,
    *,
    replicas: int,
    shards: bool,
    storage_url: str | None,
    verbose: bool,
) -> Result:
    result = Result(cfg, replicas, shards)
    sim = Simulator()
    try:
        with (
            tempfile.TemporaryDirectory(prefix="genauth-fleet-") as tmp,
            contextlib.ExitStack() as stack,
        ):
            urls = [
                stack.enter_context(scratch_database(storage_url, Path(tmp) / f"db-{index}"))
                for index in range(replicas if shards else 1)
            ]
            daemons = start_daemons(cfg, replicas, urls, sim.base_url, Path(tmp))
            try:
                measure(result, plan, sim, daemons, urls, verbose)
            except Exception as exc:  # one line for this configuration, the reason beside it
                result.failed = f"{type(exc).__name__}: {exc}"
                for daemon in daemons:
                    result.failed += f"\n--- replica log (pid {daemon.pid}):\n{daemon.tail()}"
            finally:
                stop_daemons(daemons)
    finally:
        sim.close()
    return result


def start_daemons(
    cfg: Config, replicas: int, urls: list[str], base_url: str, tmp: Path
) -> list[Daemon]:
    """``replicas`` daemons on ``urls[0]`` with every target each, or (one URL per daemon, the
    ``--shards`` baseline) each with its own database and its own share of the targets."""
    env = {
        **os.environ,
        "BENCH_SECRET": KEY_SECRET,
        "BENCH_FINGERPRINT_KEY": secrets.token_hex(32),  # one key for all replicas
    }
    configs = []
    for index in range(replicas):
        port = free_port()
        if len(urls) > 1:
            share = -(-cfg.targets // replicas)
            names = range(index * share, min(cfg.targets, (index + 1) * share))
            url = urls[index]
        else:
            names, url = range(cfg.targets), urls[0]
        configs.append((port, write_config(tmp, index, names, cfg, url, port, base_url)))
    daemons = []
    for index, (port, path) in enumerate(configs):
        log = tmp / f"replica-{index}.log"
        command = [sys.executable, "-m", "monitor", "--log-format", "json", "run", "-c", str(path)]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        daemons.append(Daemon(proc, port, log, time.time()))
    return daemons


def measure(
    result: Result,
    plan: Plan,
    sim: Simulator,
    daemons: list[Daemon],
    urls: list[str],
    verbose: bool,
) -> None:
    measure_startup(result, sim, daemons, daemons[0].started)
    sightings = Sightings(urls)
    try:
        result.recorded_s = wait_until_recorded(result.cfg, sightings) - daemons[0].started
        measure_all(result, plan, sim, daemons, sightings, verbose)
    finally:
        sightings.close()


def measure_all(
    result: Result,
    plan: Plan,
    sim: Simulator,
    daemons: list[Daemon],
    sightings: Sightings,
    verbose: bool,
) -> None:
    if verbose:
        print(
            f"  {result.cfg.label}: /healthz {result.healthz_s:.2f} s, last first poll "
            f"{result.first_polls_s:.2f} s after start (spread {result.spread_s:.2f} s), "
            f"on schedule {result.steady_s:.0f} s, every first snapshot recorded "
            f"{result.recorded_s:.0f} s",
            flush=True,
        )
    measure_rounds(result, plan, sim, daemons, sightings, verbose)
    measure_scrapes(result, plan.scrapes, daemons)
    result.rss_peak = max(proc_status_mib(d.pid, "VmHWM") for d in daemons)
    if len(daemons) > 1 and not result.shards:
        result.failover_s = measure_failover(result.cfg, daemons, sightings)
        if verbose:
            print(f"  {result.cfg.label}: failover {result.failover_s:.1f} s", flush=True)


def measure_failover(cfg: Config, daemons: list[Daemon], sightings: Sightings) -> float:
    """SIGKILL the first replica; the seconds until every target has been sighted again (the
    survivors' own targets at once, the dead one's after its claims' leases run out)."""
    before = sightings.read()
    daemons[0].proc.kill()
    daemons[0].proc.wait()
    killed = time.monotonic()
    deadline = killed + 3 * failover_bound(cfg)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = sightings.read()
        if all(now.get(target, 0) > count for target, count in before.items()):
            return time.monotonic() - killed
    return math.inf


def stop_daemons(daemons: list[Daemon]) -> None:
    for daemon in daemons:
        if daemon.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                daemon.proc.send_signal(signal.SIGCONT)
                daemon.proc.terminate()
    for daemon in daemons:
        try:
            daemon.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.proc.kill()
            daemon.proc.wait()


def measure_startup(result: Result, sim: Simulator, daemons: list[Daemon], started: float) -> None:
    cfg = result.cfg
    session = requests.Session()
    deadline = time.monotonic() + HEALTHZ_WAIT
    pending = list(daemons)
    while pending:
        if time.monotonic() > deadline:
            raise RuntimeError(f"/healthz did not answer within {HEALTHZ_WAIT:g} s")
        for daemon in list(pending):
            if daemon.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {daemon.proc.returncode}")
            with contextlib.suppress(requests.RequestException):
                if session.get(daemon.url("/healthz"), timeout=1).status_code == 200:
                    pending.remove(daemon)
        if pending:
            time.sleep(0.01)
    result.healthz_s = time.time() - started
    session.close()
    # Every target fetches its token at its first poll: N token requests are N first polls.
    deadline = time.monotonic() + 3 * cfg.spread_window + 60
    while sim.counts()[1] < cfg.targets:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {sim.counts()[1]} of {cfg.targets} targets polled")
        for daemon in daemons:
            if daemon.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {daemon.proc.returncode}")
        time.sleep(0.1)
    series = sim.series()
    for _ in range(50):  # the sampler sees the last token request up to 20 ms after counts()
        if series and series[-1][1] >= cfg.targets:
            break
        time.sleep(SAMPLE_EVERY)
        series = sim.series()
    first = next(t for t, tokens, _ in series if tokens >= 1)
    last = next(t for t, tokens, _ in series if tokens >= cfg.targets)
    result.first_polls_s = last - started
    result.spread_s = last - first
    result.peak_rate = peak_per_second([(t, tokens) for t, tokens, _ in series])
    result.steady_s = wait_until_steady(cfg, sim) - started


def wait_until_steady(cfg: Config, sim: Simulator) -> float:
    """When two 2 s windows in a row see at most 1.2x the planned rate: polls that fell
    behind during the first round have run, so the rounds measure the daemon on schedule."""
    planned = cfg.targets / cfg.interval
    deadline = time.monotonic() + max(60.0, 3 * cfg.interval)
    calm = 0
    t0, _, polls0 = sim.counts()
    while calm < 2:
        if time.monotonic() > deadline:
            raise RuntimeError("the daemons never came down to the planned poll rate")
        time.sleep(2.0)
        t1, _, polls1 = sim.counts()
        calm = calm + 1 if (polls1 - polls0) / (t1 - t0) <= 1.2 * planned else 0
        t0, polls0 = t1, polls1
    return t0


def wait_until_recorded(cfg: Config, sightings: Sightings) -> float:
    """When every target's first snapshot is in the database (time.time()): with thousands of
    targets the recorder writes the first snapshots and their events well after the first
    polls, and a round measured before that would count that backlog as the steady cost."""
    deadline = time.monotonic() + 600
    while len(sightings.read()) < cfg.targets:
        if time.monotonic() > deadline:
            raise RuntimeError("the first snapshots were not all recorded within 600 s")
        time.sleep(1.0)
    return time.time()


def peak_per_second(series: list[tuple[float, int]]) -> float:
    """The most increments of the count in any 1 s window (of the 20 ms samples)."""
    best, j = 0, 0
    for i in range(len(series)):
        while series[i][0] - series[j][0] > 1.0:
            j += 1
        base = series[j - 1][1] if j > 0 else 0
        best = max(best, series[i][1] - base)
    return float(best)


def daemons_cpu(daemons: list[Daemon]) -> float:
    return sum(proc_cpu_seconds(d.pid) for d in daemons)


def signal_daemons(daemons: list[Daemon], sig: signal.Signals) -> None:
    for daemon in daemons:
        os.kill(daemon.pid, sig)
    if sig == signal.SIGSTOP:  # stopped for sure before the floor runs
        deadline = time.monotonic() + 5
        while any(proc_state(d.pid) != "T" for d in daemons):
            if time.monotonic() > deadline:
                raise RuntimeError("a daemon did not stop on SIGSTOP")
            time.sleep(0.005)


def measure_rounds(
    result: Result,
    plan: Plan,
    sim: Simulator,
    daemons: list[Daemon],
    sightings: Sightings,
    verbose: bool,
) -> None:
    cfg = result.cfg
    floor = Floor(sim.base_url)
    time.sleep(plan.settle)  # the first round's catch-up (token fetches) behind them

    def daemon_round() -> None:
        seen0 = sightings.read()
        cpu0 = daemons_cpu(daemons)
        t0, _, polls0 = sim.counts()
        time.sleep(plan.window)
        t1, _, polls1 = sim.counts()
        cpu1 = daemons_cpu(daemons)
        seen1 = sightings.read()
        planned = (t1 - t0) / cfg.interval
        per_target = [(seen1.get(t, 0) - n) / planned for t, n in seen0.items()]
        result.per_target_low.append(min(per_target, default=math.nan))
        result.per_target_high.append(max(per_target, default=math.nan))
        polls = polls1 - polls0
        result.daemon_us.append((cpu1 - cpu0) / max(polls, 1) * 1e6)
        result.done.append(polls / (cfg.targets * (t1 - t0) / cfg.interval))
        result.rss_steady.append(max(proc_status_mib(d.pid, "VmRSS") for d in daemons))

    def floor_round() -> None:
        signal_daemons(daemons, signal.SIGSTOP)
        try:
            result.floor_us.append(floor.run_for(plan.floor))
            result.paced_us.append(floor.paced_for(plan.floor, cfg.targets / cfg.interval))
        finally:
            signal_daemons(daemons, signal.SIGCONT)
        time.sleep(plan.settle)

    for round_ in range(plan.rounds):
        steps = (daemon_round, floor_round) if round_ % 2 == 0 else (floor_round, daemon_round)
        for step in steps:
            step()
        if verbose:
            print(
                f"  {cfg.label} round {round_ + 1}: daemon {result.daemon_us[-1]:.0f} us/poll, "
                f"floor {result.floor_us[-1]:.0f} us/request "
                f"(paced {result.paced_us[-1]:.0f}), done {result.done[-1]:.2%}, "
                f"RSS {result.rss_steady[-1]:.1f} MiB",
                flush=True,
            )
    floor.session.close()


def measure_scrapes(result: Result, scrapes: int, daemons: list[Daemon]) -> None:
    session = requests.Session()  # Accept-Encoding: gzip, deflate, as a Prometheus scrape
    for i in range(scrapes):
        daemon = daemons[i % len(daemons)]
        # Past the daemon's 1 s render cache, so every scrape renders.
        time.sleep(1.05 / len(daemons))
        started = time.perf_counter()
        response = session.get(daemon.url("/metrics"), timeout=30)
        result.scrapes_ms.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
        result.metrics_bytes = len(response.content)
        result.metrics_gzip_bytes = int(response.headers.get("Content-Length", 0))
        started = time.perf_counter()
        session.get(daemon.url("/healthz"), timeout=30).raise_for_status()
        result.healthz_ms.append((time.perf_counter() - started) * 1000)
    session.close()


# --------------------------------------------------------------------------- output


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def line(r: Result) -> str:
    return (
        f"{r.cfg.label:>11} x{r.replicas}{' shards' if r.shards else ''}  daemon "
        f"{med(r.daemon_us):5.0f} us/poll  floor "
        f"{med(r.floor_us):4.0f} us  ratio {r.ratio:4.2f}x  (paced floor "
        f"{med(r.paced_us):4.0f} us, ratio {r.paced_ratio:4.2f}x)  done {med(r.done):7.2%}  "
        f"RSS {med(r.rss_steady):5.1f}/{r.rss_peak:5.1f} MiB  /metrics p50 {r.p(0.5):6.1f} "
        f"p99 {r.p(0.99):6.1f} ms (from the third: p99 {r.warm_p99():.1f} ms; "
        f"{r.metrics_bytes / 1e6:.2f} MB, "
        f"gzip {r.metrics_gzip_bytes / 1e6:.2f}; GET /healthz p50 {r.p(0.5, 'healthz_ms'):.1f} "
        f"p99 {r.p(0.99, 'healthz_ms'):.1f} ms)  "
        f"/healthz {r.healthz_s:5.2f} s  first polls {r.first_polls_s:5.2f} s "
        f"(spread {r.spread_s:.2f} s, peak {r.peak_rate:.0f}/s), on schedule {r.steady_s:.0f} s, "
        f"recorded {r.recorded_s:.0f} s  "
        f"sightings per target per interval {med(r.per_target_low):.2f}-"
        f"{med(r.per_target_high):.2f}"
        + (f"  failover {r.failover_s:.1f} s" if r.replicas > 1 and not r.shards else "")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs", type=parse_configs, help=f"N@INTERVAL,... (default {DEFAULT_CONFIGS})"
    )
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 5; quick 1)")
    parser.add_argument(
        "--window",
        type=float,
        help="seconds of a daemon round at least (default 10), rounded up to whole intervals",
    )
    parser.add_argument("--floor", type=float, default=3.0, help="seconds of a floor round")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after SIGCONT")
    parser.add_argument("--scrapes", type=int, help="GET /metrics count (default 50; quick 10)")
    parser.add_argument("--storage-url", help="a PostgreSQL server (a scratch database on it)")
    parser.add_argument("--replicas", type=int, default=1, help="daemons on one database")
    parser.add_argument(
        "--shards",
        action="store_true",
        help="the baseline of --replicas: each daemon on a database of its own, with 1/K of "
        "the targets (no coordination)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 10@1s, short rounds")
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-round lines")
    parser.add_argument("--simulator", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.simulator:
        return simulator_main()

    configs: list[Config] = args.configs or parse_configs(
        "10@1s" if args.quick else DEFAULT_CONFIGS
    )
    rounds = args.rounds or (1 if args.quick else 5)
    scrapes = args.scrapes or (10 if args.quick else 50)
    window = args.window or (2.0 if args.quick else 10.0)
    floor = 1.0 if args.quick else args.floor
    settle = 1.0 if args.quick else args.settle
    storage = "PostgreSQL" if args.storage_url else "SQLite"
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, requests {requests.__version__}, "
        f"{storage}, {args.replicas} replica(s); {rounds} rounds (median), daemon window "
        f"{window:g} s up to whole intervals, floor {floor:g} s, settle {settle:g} s, "
        f"{scrapes} scrapes",
        flush=True,
    )
    results = []
    for cfg in configs:
        plan = Plan(rounds, whole_intervals(window, cfg.interval), floor, settle, scrapes)
        results.append(
            run_config(
                cfg,
                plan,
                replicas=args.replicas,
                shards=args.shards,
                storage_url=args.storage_url,
                verbose=not args.quiet,
            )
        )
    print()
    missed = []
    for r in results:
        if r.failed:
            print(f"{r.cfg.label:>11} FAILED: {r.failed}")
            missed.append(f"{r.cfg.label}: failed")
            continue
        print(line(r))
    print()
    for r in results:
        if r.failed:
            continue
        for goal, met, figure in r.goals():
            print(f"{r.cfg.label:>11}  {'met   ' if met else 'MISSED'}  {goal}: {figure}")
            if not met:
                missed.append(f"{r.cfg.label}: {goal} ({figure})")
    if missed:
        print(f"\n{len(missed)} goal(s) missed")
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
