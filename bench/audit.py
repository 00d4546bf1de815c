"""Audit-scale queries: history pages, point-in-time lookups and chain verification.

Generates (once per database) 1,000,000 events and 100,000 snapshots across 100 targets, all
chained like the daemon chains them, then measures through the same query layer the CLI and
API use:

* a 100-row history page for one target filtered by a time window (p50/p99),
* ``at`` lookups for random targets and times (p50/p99),
* ``verify`` throughput (rows per second).

    .venv/bin/python bench/audit.py                      # SQLite in a temp dir
    .venv/bin/python bench/audit.py --postgres-url postgresql+psycopg://postgres@127.0.0.1/test

Smaller runs for a quick look: ``--events 100000 --snapshots 10000``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, insert, text, update
from sqlalchemy.engine import make_url

from monitor.core import canonical_json, snapshot_hash
from monitor.storage import Queries, create_store_engine, upgrade
from monitor.storage.chain import GENESIS, event_content, link, snapshot_content, verify_chain
from monitor.storage.schema import chain_head, events, poll_state, snapshots, targets

T0 = datetime(2025, 1, 1, tzinfo=UTC)
SPAN = timedelta(days=365)
KINDS = ["config_changed", "delivery_changed", "secret_rotated", "type_changed"]


def generate(engine: Engine, *, n_targets: int, n_snapshots: int, n_events: int) -> None:
    rng = random.Random(7)
    step_s = SPAN.total_seconds() / n_snapshots
    ev_step = SPAN.total_seconds() / n_events
    with engine.begin() as c:
        c.execute(
            insert(targets),
            [{"id": i + 1, "name": f"pool-{i:03d}", "created_at": T0} for i in range(n_targets)],
        )
        c.execute(
            insert(poll_state),
            [{"target_id": i + 1, "consecutive_failures": 0} for i in range(n_targets)],
        )
    previous, seq = GENESIS, 0
    snap_rows: list[dict[str, Any]] = []
    event_rows: list[dict[str, Any]] = []
    s_i = e_i = 0
    batch = 20_000

    def flush() -> None:
        with engine.begin() as c:
            if snap_rows:
                c.execute(insert(snapshots), snap_rows)
            if event_rows:
                c.execute(insert(events), event_rows)
        snap_rows.clear()
        event_rows.clear()

    # Interleave snapshots and events in time order, as the daemon writes them.
    while s_i < n_snapshots or e_i < n_events:
        s_at = T0 + timedelta(seconds=s_i * step_s)
        e_at = T0 + timedelta(seconds=e_i * ev_step + 0.5)
        seq += 1
        if s_i < n_snapshots and (e_i >= n_events or s_at <= e_at):
            s_i += 1
            doc = {
                "enabled": True,
                "type": "custom",
                "smtpConfig": {
                    "smtp_host": f"smtp{s_i}.example.com",
                    "smtp_port": 465,
                    "senderPass": f"hmac-sha256:{s_i:016x}",
                },
            }
            row = {
                "id": s_i,
                "target_id": rng.randint(1, n_targets),
                "hash": snapshot_hash(doc),
                "document": json.dumps(doc),
                "enabled": True,
                "provider_type": "custom",
                "drift": False,
                "first_seen_at": s_at,
                "last_seen_at": s_at,
                "seen_count": 1,
            }
            previous = link(previous, seq, snapshot_content(row))
            snap_rows.append({**row, "chain_seq": seq, "chain_hash": previous})
        else:
            e_i += 1
            row = {
                "id": e_i,
                "public_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "target_id": rng.randint(1, n_targets),
                "kind": rng.choice(KINDS),
                "severity": "info",
                "status": "firing",
                "at": e_at,
                "snapshot_hash": "sha256:" + "a" * 64,
                "previous_hash": "sha256:" + "b" * 64,
                "changes": json.dumps([{"path": "smtpConfig.smtp_port", "old": 465, "new": 587}]),
                "message": "changed",
            }
            previous = link(previous, seq, event_content(row, string_id=True))
            event_rows.append({**row, "chain_seq": seq, "chain_hash": previous})
        if len(snap_rows) + len(event_rows) >= batch:
            flush()
            print(f"  generated {seq:,} rows", flush=True)
    flush()
    with engine.begin() as c:
        c.execute(update(chain_head).where(chain_head.c.id == 1).values(seq=seq, hash=previous))
        if engine.dialect.name == "postgresql":
            c.execute(text("ANALYZE"))
            for table in ("targets", "snapshots", "events"):
                c.execute(
                    text(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                        f"(SELECT max(id) FROM {table}))"
                    )
                )
        else:
            c.execute(text("ANALYZE"))


def timed(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def measure(engine: Engine, n_targets: int, runs: int) -> None:
    queries = Queries(engine)
    rng = random.Random(11)

    def history_page() -> object:
        name = f"pool-{rng.randrange(n_targets):03d}"
        start = T0 + timedelta(days=rng.randrange(300))
        rows = queries.events(target=name, since=start, until=start + timedelta(days=60), limit=100)
        assert rows
        return rows

    def at_lookup() -> object:
        name = f"pool-{rng.randrange(n_targets):03d}"
        when = T0 + timedelta(days=30 + rng.random() * 330)
        return queries.at(name, when)

    for label, fn in (
        ("history page (100 rows, one target, time window)", history_page),
        ("at lookup", at_lookup),
    ):
        timed(fn, 20)  # warm the cache
        p50, p99 = timed(fn, runs)
        print(f"{label}: p50 {p50:.2f} ms, p99 {p99:.2f} ms over {runs} runs")
    started = time.perf_counter()
    report = verify_chain(engine)
    elapsed = time.perf_counter() - started
    assert report.intact, report.describe()
    print(f"verify: {report.rows:,} rows in {elapsed:.1f} s = {report.rows / elapsed:,.0f} rows/s")


def time_cli(url: str, directory: Path, runs: int = 5) -> None:
    """Wall time of the ``history`` command as a user runs it: a new process that imports
    what the command needs, opens the database read-only and prints a page (median of runs)."""
    config = directory / "audit.toml"
    config.write_text(
        f"[storage]\nurl = {json.dumps(url)}\n"
        '[[targets]]\nname = "pool-000"\naccess_key_id = "x"\naccess_key_secret = "unused"\n'
    )
    for label, extra in (("history", []), ("history --target pool-000", ["--target", "pool-000"])):
        command = [sys.executable, "-m", "monitor", "history", "-c", str(config), *extra]
        samples = []
        for _ in range(runs + 1):  # the first one warms the page cache
            started = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            samples.append(time.perf_counter() - started)
        samples = samples[1:]
        print(
            f"`genauth-monitor {label}` (a new process, 50 rows): median "
            f"{statistics.median(samples):.2f} s, max {max(samples):.2f} s over {runs} runs"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--snapshots", type=int, default=100_000)
    parser.add_argument("--targets", type=int, default=100)
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument(
        "--postgres-url", help="also run on PostgreSQL (a scratch database is created and dropped)"
    )
    args = parser.parse_args()
    sizes = {"n_targets": args.targets, "n_snapshots": args.snapshots, "n_events": args.events}
    canonical_json({})  # import cost outside the figures
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'audit.db'}"
        print(
            f"== SQLite ({args.events:,} events, {args.snapshots:,} snapshots, "
            f"{args.targets} targets)"
        )
        engine = create_store_engine(url)
        upgrade(engine)
        generate(engine, **sizes)
        measure(engine, args.targets, args.runs)
        engine.dispose()
        time_cli(url, Path(tmp))
    if args.postgres_url:
        admin_url = make_url(args.postgres_url)
        name = f"gm_bench_{uuid.uuid4().hex[:8]}"
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            print("== PostgreSQL")
            engine = create_store_engine(admin_url.set(database=name).render_as_string(False))
            upgrade(engine)
            generate(engine, **sizes)
            measure(engine, args.targets, args.runs)
            engine.dispose()
        finally:
            with admin.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
