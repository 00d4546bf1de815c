"""The commands of the ``genauth-monitor`` command line: each parses nothing (``monitor.cli``
did), asks the command layer or the runtime, and renders the answer for a terminal.

Imported only once a command runs, so ``--version`` and ``--help`` start at once."""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from datetime import datetime
from types import FrameType
from typing import Any

from sqlalchemy import Engine

from monitor.cli import EXIT_DRIFT, EXIT_OK, EXIT_POLL_FAILED
from monitor.commands import AuditCommands
from monitor.config import Settings, default_config_path, load_settings
from monitor.config_summary import summary
from monitor.core import dumps_json, escape_text, field_value
from monitor.core.attribution import describe
from monitor.errors import StorageError, UsageError
from monitor.storage import Queries, create_store_engine
from monitor.storage.engine import open_read_only, require_current_schema
from monitor.storage.outbox import Outbox
from monitor.storage.queries import EventView, SnapshotView
from monitor.timeutil import format_time, utc_now
from monitor.views import DiffOut, EventOut, SnapshotDocumentOut, SnapshotOut, to_json

__all__: list[str] = []

MAX_ROWS = 100_000  # --limit of history and snapshots
# A command that reads the database found it missing, unreadable or not at the current schema.
EXIT_NO_DATABASE = 3
EXIT_CANNOT_VERIFY = 3

log = logging.getLogger("monitor.cli")


# -- helpers ---------------------------------------------------------------------------------


def _settings(args: argparse.Namespace, *, read_only: bool = False) -> Settings:
    """The configuration; ``read_only`` commands need the database only, so credentials are
    not read (an auditor can run them without the upstream's secrets)."""
    path = args.config or default_config_path(None)
    settings = load_settings(path, resolve_secrets=not read_only)
    if args.log_level is None:
        logging.getLogger().setLevel(settings.monitor.log_level.upper())
    return settings


def _read_only_engine(settings: Settings) -> Engine:
    """The database opened read-only and checked to be at the current schema. Never creates,
    migrates or writes it: the audit commands read evidence (SPEC §7)."""
    shown = settings.storage.display_url
    engine = open_read_only(settings.storage.url, shown=shown)
    try:
        require_current_schema(engine, shown=shown)
    except BaseException:
        engine.dispose()
        raise
    return engine


def _commands(settings: Settings) -> AuditCommands:
    """The audit commands over the database opened read-only."""
    return AuditCommands(
        Queries(_read_only_engine(settings)),
        clock=utc_now,
        configured=[target.name for target in settings.targets],
    )


def _reads_database(handler: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """A command that needs the database: one line and exit 3 when it cannot be used."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except StorageError as exc:
            print(f"genauth-monitor: {exc}", file=sys.stderr)
            return EXIT_NO_DATABASE

    return run


def _print_json(value: Any) -> None:
    # Exact data, but control, bidi and separator characters as \u escapes (monitor.core.escape).
    print(dumps_json(value, indent=2))


def _table(rows: list[list[str]], header: list[str]) -> str:
    """Aligned columns; every cell is escaped, so upstream text cannot drive the terminal."""
    rows = [[escape_text(str(cell)) for cell in row] for row in rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [header, *rows]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _short(digest: str | None) -> str:
    return digest.removeprefix("sha256:")[:12] if digest else "-"


# -- commands --------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    from monitor.keyfile import fingerprint_key
    from monitor.listen import StartingServer
    from monitor.startup import check_listen, check_sqlite_free, open_storage

    # Everything that can be found wrong before the daemon does anything is exit code 2 with a
    # line naming the key: the listen address, the database, the fingerprint key file.
    settings = _settings(args)
    check_sqlite_free(settings)
    check_listen(settings)
    open_storage(settings, migrate=False).dispose()
    fingerprint_key(settings)
    # /healthz (process alive) answers from here; /readyz says 503 until the scheduler runs.
    starting = StartingServer.open(settings.server.host, settings.server.port)
    try:
        from monitor.app import Daemon, settle_the_heap  # the web stack and the storage

        daemon = Daemon(settings, starting=starting, migrate_apart=True)
    except BaseException:
        starting.close()
        raise
    del settings  # the daemon keeps what it needs; the validated configuration can go
    settle_the_heap()
    _run_until_signal(daemon.run_until)
    return EXIT_OK


def _run_until_signal(run: Callable[[threading.Event], None]) -> None:
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    run(stop)


def _cmd_check(args: argparse.Namespace) -> int:
    from monitor.app import build_runtime

    settings = _settings(args)
    if args.target is not None and args.target not in {t.name for t in settings.targets}:
        raise UsageError(f"--target: unknown target {args.target!r}")
    try:
        runtime = build_runtime(settings)
    except StorageError as exc:
        # Not a verdict on the provider: "could not check" is the poll-failed code, never 1.
        print(f"genauth-monitor: cannot record the check: {exc}", file=sys.stderr)
        return EXIT_POLL_FAILED
    started = utc_now()
    results = [
        poller.poll() for name, poller in runtime.pollers.items() if args.target in (None, name)
    ]
    _await_attribution(runtime, results, since=started)
    report = []
    for result in results:
        entry: dict[str, Any] = {"target": result.target, "ok": result.ok}
        if result.ok:
            entry.update(
                enabled=result.document.get("enabled") is True,
                type=result.document.get("type"),
                hash=result.hash,
                drift=result.drift,
            )
        else:
            assert result.error is not None
            error = result.error
            entry["error"] = {
                "reason": error.reason,
                "message": error.message,
                "http_status": error.http_status,
                "api_code": error.api_code,
                "request_id": error.request_id,
            }
        entry["recorded"] = result.stored
        entry["events"] = _check_events(runtime.queries, result, since=started)
        report.append(entry)
    code = _check_exit_code(report)
    left = runtime.delivery.drain(timeout=args.delivery_timeout) if settings.sinks else 0
    if left:
        print(
            f"genauth-monitor: {left} alert deliveries still pending; "
            "they stay queued for the daemon (see 'alerts pending')",
            file=sys.stderr,
        )
    if args.json:
        _print_json({"targets": report, "alerts_pending": left, "exit_code": code})
    else:
        for entry in report:
            print(_check_line(entry))
            for event in entry["events"]:
                print(f"    {event['severity']}: {escape_text(event['message'])}")
                who = describe(event["kind"], event.get("attribution"), event.get("actors", []))
                if who is not None:
                    print(f"      who: {escape_text(who)}")
    return code


def _await_attribution(runtime: Any, results: list[Any], *, since: datetime) -> None:
    """Let the attribution of the changes this check recorded settle, for at most
    ``attribution_wait`` (SPEC §11), so its report and its alerts carry the actors."""
    worker = runtime.attribution
    if worker is None:
        return
    ids = [
        row.row_id
        for result in results
        if result.events and result.stored
        for row in runtime.queries.events(
            target=result.target, since=since, limit=len(result.events)
        )
    ]
    if ids:
        worker.settle(ids, timeout=runtime.monitor.attribution_wait + 1.0)


def _check_events(queries: Queries, result: Any, *, since: datetime) -> list[dict[str, Any]]:
    """The events this check recorded, as the event JSON of SPEC §4 (oldest first); only
    kind, severity and message when the database did not take them."""
    if not result.events:
        return []
    if result.stored:
        rows = queries.events(target=result.target, since=since, limit=len(result.events))
        return [to_json(EventOut.of(row)) for row in reversed(rows)]
    return [{"kind": e.kind, "severity": e.severity, "message": e.message} for e in result.events]


def _check_exit_code(report: list[dict[str, Any]]) -> int:
    # A known bad state outranks an unknown one: disabled or drifting is what operators page on.
    if any(e["ok"] and (not e["enabled"] or e["drift"]) for e in report):
        return EXIT_DRIFT
    if any(not e["ok"] for e in report):
        return EXIT_POLL_FAILED
    return EXIT_OK


def _check_line(entry: dict[str, Any]) -> str:
    if not entry["ok"]:
        error = entry["error"]
        status = f" HTTP {error['http_status']}" if error["http_status"] else ""
        return escape_text(
            f"{entry['target']}: POLL FAILED ({error['reason']}{status}): {error['message']}"
        )
    # The type is upstream text: quoted when it holds a space or '=', so it forges no field.
    return (
        f"{escape_text(entry['target'])}: {'enabled' if entry['enabled'] else 'DISABLED'}"
        f" type={field_value(str(entry['type'] or '-'))} hash={entry['hash']}"
        f" drift={'YES' if entry['drift'] else 'no'}"
    )


@_reads_database
def _cmd_history(args: argparse.Namespace) -> int:
    page = _commands(_settings(args, read_only=True)).events(
        target=args.target,
        kind=args.kind,
        since=args.since,
        until=args.until,
        limit=args.limit,
        max_limit=MAX_ROWS,
        actor=args.actor,
    )
    _print_events(page.rows, "json" if args.json else args.format)
    return EXIT_OK


def _print_events(rows: list[EventView], fmt: str) -> None:
    dicts = [to_json(EventOut.of(row)) for row in rows]
    if fmt == "json":
        _print_json(dicts)
    elif fmt == "jsonl":
        for item in dicts:
            print(dumps_json(item))
    elif fmt == "csv":
        out = io.StringIO()
        fields = [
            "id",
            "at",
            "target",
            "kind",
            "severity",
            "status",
            "snapshot",
            "previous",
            "message",
            "changes",
            "attribution",
            "actors",
        ]
        writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for item in dicts:
            # Text cells escaped like the table (the exact text is in json/jsonl).
            row = {k: escape_text(v) if isinstance(v, str) else v for k, v in item.items()}
            writer.writerow(
                {
                    **row,
                    "changes": dumps_json(item["changes"]),
                    "actors": dumps_json(item["actors"]),
                }
            )
        sys.stdout.write(out.getvalue())
    elif not rows:
        print("no events")
    else:
        table = [
            [
                d["id"],
                d["at"],
                d["target"],
                d["kind"],
                d["severity"],
                d["status"],
                d["message"],
                _by(d),
            ]
            for d in dicts
        ]
        print(_table(table, ["ID", "AT", "TARGET", "KIND", "SEVERITY", "STATUS", "MESSAGE", "BY"]))


def _by(event: dict[str, Any]) -> str:
    """Who made it, for the table: the describe() line, or "-" when not attributed."""
    return describe(event["kind"], event["attribution"], event["actors"]) or "-"


@_reads_database
def _cmd_snapshots(args: argparse.Namespace) -> int:
    page = _commands(_settings(args, read_only=True)).snapshots(
        target=args.target, limit=args.limit, max_limit=MAX_ROWS
    )
    rows = page.rows
    if args.json:
        _print_json([to_json(SnapshotOut.of(row)) for row in rows])
    elif not rows:
        print("no snapshots")
    else:
        print(
            _table(
                [_snapshot_row(row) for row in rows],
                [
                    "ID",
                    "TARGET",
                    "HASH",
                    "ENABLED",
                    "TYPE",
                    "DRIFT",
                    "FIRST SEEN",
                    "LAST SEEN",
                    "COUNT",
                ],
            )
        )
    return EXIT_OK


def _snapshot_row(row: SnapshotView) -> list[str]:
    data = to_json(SnapshotOut.of(row))
    return [
        str(row.id),
        row.target,
        row.hash,
        "yes" if row.enabled else "NO",
        row.provider_type or "-",
        "YES" if row.drift else "no",
        data["first_seen_at"],
        data["last_seen_at"],
        str(row.seen_count),
    ]


@_reads_database
def _cmd_show(args: argparse.Namespace) -> int:
    found = _commands(_settings(args, read_only=True)).snapshot(args.ref)
    _print_json(to_json(SnapshotDocumentOut.of(found)))
    return EXIT_OK


@_reads_database
def _cmd_diff(args: argparse.Namespace) -> int:
    found = _commands(_settings(args, read_only=True)).diff(args.a, args.b)
    data = to_json(DiffOut.of(found.old, found.new, found.changes))
    if args.json:
        _print_json(data)
        return EXIT_OK
    for sign, view in (("---", found.old), ("+++", found.new)):
        seen = to_json(SnapshotOut.of(view))["first_seen_at"]
        print(escape_text(f"{sign} {view.hash} ({view.target}, first seen {seen})"))
    changes = data["changes"]
    if not changes:
        print("no differences")
    for change in changes:
        # The path is built from upstream key names; the values are ASCII-only JSON.
        path = escape_text(change["path"])
        print(f"  {path}: {json.dumps(change['old'])} -> {json.dumps(change['new'])}")
    return EXIT_OK


@_reads_database
def _cmd_at(args: argparse.Namespace) -> int:
    found = _commands(_settings(args, read_only=True)).at(args.target, args.time)
    data = to_json(SnapshotDocumentOut.of(found))
    if args.json:
        _print_json(data)
    else:
        print(escape_text(f"{found.target} at {args.time}: snapshot {found.hash}"))
        print(f"in force from {data['first_seen_at']}, last seen {data['last_seen_at']}")
        _print_json(found.document)
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from monitor.storage.chain import verify_chain

    settings = _settings(args, read_only=True)
    try:
        report = verify_chain(_read_only_engine(settings))
    except StorageError as exc:
        # Not a verdict: "could not check" must never read as "tampered" (1) or "intact" (0).
        print(f"genauth-monitor: cannot verify: {exc}", file=sys.stderr)
        return EXIT_CANNOT_VERIFY
    print(report.describe())
    return EXIT_OK if report.intact else EXIT_DRIFT


def _outbox(args: argparse.Namespace, *, write: bool = False) -> Outbox:
    settings = _settings(args, read_only=True)
    if args.sink is not None and args.sink not in {s.name for s in settings.sinks}:
        raise UsageError(f"--sink: unknown sink {args.sink!r}")
    engine = _read_only_engine(settings)
    if not write:
        return Outbox(engine)
    # A writer, but like the readers it never creates or migrates: it writes only to a database
    # just found to exist at the current schema.
    engine.dispose()
    return Outbox(create_store_engine(settings.storage.url))


@_reads_database
def _cmd_alerts_pending(args: argparse.Namespace) -> int:
    rows = _outbox(args).pending(sink=args.sink, rejected=args.rejected)
    if args.json:
        _print_json(
            [
                {
                    "id": r.id,
                    "status": r.status,
                    "sink": r.sink,
                    "lane": r.lane,  # which of the sink's URLs (0 for a sink with one)
                    "attempts": r.attempts,
                    "next_attempt_at": format_time(r.next_attempt_at),
                    "last_error": r.last_error,
                    "event": to_json(EventOut.of(r.event)),
                }
                for r in rows
            ]
        )
    elif not rows:
        print("no pending alert deliveries")
    else:
        print(
            _table(
                [
                    [
                        str(r.id),
                        r.status,
                        r.sink + (f"#{r.lane}" if r.lane else ""),  # as in the thread names
                        r.event.target,
                        r.event.kind,
                        str(r.attempts),
                        format_time(r.next_attempt_at) or "-",
                        r.last_error or "-",
                    ]
                    for r in rows
                ],
                [
                    "ID",
                    "STATUS",
                    "SINK",
                    "TARGET",
                    "KIND",
                    "ATTEMPTS",
                    "NEXT ATTEMPT",
                    "LAST ERROR",
                ],
            )
        )
    return EXIT_OK


@_reads_database
def _cmd_alerts_retry(args: argparse.Namespace) -> int:
    count = _outbox(args, write=True).retry_now(utc_now(), sink=args.sink)
    print(f"{count} pending deliveries are due now; a running daemon sends them within seconds")
    return EXIT_OK


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from monitor.startup import open_storage

    settings = _settings(args, read_only=True)
    open_storage(settings, migrate=True).dispose()
    print(f"database at {settings.storage.display_url} is at the newest schema")
    return EXIT_OK


def _cmd_config_check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    for line in summary(settings):
        print(line)
    print("configuration OK")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from monitor.demo import run_demo

    _run_until_signal(
        lambda stop: run_demo(stop, listen=args.listen, period=args.period, duration=args.duration)
    )
    return EXIT_OK
