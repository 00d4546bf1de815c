"""Peak RSS of the whole daemon process under a hostile upstream.

    .venv/bin/python bench/hostile.py [--targets 100] [--rounds 3] [--seconds 6]

For each hostile answer of the simulator (a 200 MB body, a 200 MB gzip bomb, an endless chunked
stream, a slow drip, a 1 MiB dense JSON) a fresh ``genauth-monitor run`` polls ``--targets``
targets every second (timeout 2 s) against it for ``--seconds``; the figure is the process's
peak RSS (VmHWM), median of ``--rounds`` rounds, beside the peak of the same daemon against a
well-behaved upstream (the floor), and the most threads it had meanwhile (the poll workers grow
from 10 towards 64 while every one is held by a slow answer). Goal: under 150 MiB with 100
targets.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from monitor.simulator import SimulatedGenAuth

FAULTS: list[tuple[str, dict[str, Any]]] = [
    ("none", {}),
    ("huge_body", {"size": 200 * 1024 * 1024}),
    ("gzip_bomb", {"size": 200 * 1024 * 1024}),
    ("endless", {}),
    ("drip", {"delay": 0.3}),
    ("dense_json", {"size": 1024 * 1024 - 1024}),
]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(directory: Path, sim: SimulatedGenAuth, port: int, targets: int) -> Path:
    lines = [
        '[monitor]\ninterval = "1s"\njitter = "0%"\ntimeout = "2s"',
        f'[storage]\nurl = "sqlite:///{directory / "m.db"}"',
        f'[server]\nlisten = "127.0.0.1:{port}"',
    ]
    lines += [
        f'[[targets]]\nname = "t{i}"\nbase_url = "{sim.base_url}"\n'
        f'access_key_id = "{sim.access_key_id}"\naccess_key_secret_env = "BENCH_SECRET"'
        for i in range(targets)
    ]
    path = directory / "bench.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key}")


def _peak_mib(pid: int) -> float:
    return _status(pid, "VmHWM") / 1024


def _threads_at_most(pid: int, seconds: float) -> int:
    """The most threads the process had, sampled every 0.1 s for ``seconds``."""
    most, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        most = max(most, _status(pid, "Threads"))
        time.sleep(0.1)
    return most


def one_round(
    fault: str, options: dict[str, Any], targets: int, seconds: float
) -> tuple[float, int]:
    with (
        tempfile.TemporaryDirectory() as tmp,
        SimulatedGenAuth(access_key_id="bench", access_key_secret="bench-secret") as sim,
    ):
        port = _port()
        config = _config(Path(tmp), sim, port, targets)
        env = {**os.environ, "BENCH_SECRET": "bench-secret"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "monitor", "run", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
                except requests.RequestException:
                    text = ""
                if f'genauth_monitor_up{{target="t{targets - 1}"}} 1.0' in text:
                    break
                time.sleep(0.2)
            if fault != "none":
                sim.set_fault(fault, **options)
            threads = _threads_at_most(proc.pid, seconds)
            return _peak_mib(proc.pid), threads
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, {args.targets} targets, {args.rounds} rounds each")
    for fault, options in FAULTS:
        rounds = [one_round(fault, options, args.targets, args.seconds) for _ in range(args.rounds)]
        peaks = [peak for peak, _ in rounds]
        print(
            f"{fault:12} peak RSS median {statistics.median(peaks):6.1f} MiB"
            f"  (rounds: {', '.join(f'{p:.0f}' for p in peaks)})"
            f"  threads at most {max(threads for _, threads in rounds)}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
