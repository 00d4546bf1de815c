"""The ``genauth-monitor`` command line: the parser and the exit codes; the commands live in
:mod:`monitor.cli_commands`, imported only when one runs (``--version`` starts at once)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from monitor import __version__
from monitor.errors import BadParameter, ConfigError, MonitorError, NotFound, UsageError

__all__ = ["main"]

EXIT_OK, EXIT_DRIFT, EXIT_USAGE, EXIT_POLL_FAILED, EXIT_UNKNOWN = 0, 1, 2, 3, 4
CHECK_DELIVERY_WAIT = 10.0  # seconds `check` waits for its alerts to be delivered

# The command layer names a parameter as the API does; on the command line it is this.
_POSITIONAL = {"time": "TIME", "hash": "HASH_OR_ID", "from": "A", "to": "B"}


def _option(name: str) -> str:
    return _POSITIONAL.get(name, f"--{name}")


def _lazy(name: str) -> Callable[[argparse.Namespace], int]:
    """The command ``name`` of monitor.cli_commands, imported when it runs."""

    def run(args: argparse.Namespace) -> int:
        handler: Callable[[argparse.Namespace], int] = getattr(
            importlib.import_module("monitor.cli_commands"), name
        )
        return handler(args)

    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    from monitor.logs import setup_logging

    setup_logging(level=args.log_level or "info", fmt=args.log_format)
    try:
        code: int = args.handler(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"genauth-monitor: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BadParameter as exc:
        print(f"genauth-monitor: {_option(exc.name)}: {exc.problem}", file=sys.stderr)
        return EXIT_USAGE
    except NotFound as exc:
        # An unknown --target is a usage mistake; an unknown snapshot or moment an answer.
        if exc.what == "target":
            print(f"genauth-monitor: --target: {exc.message}", file=sys.stderr)
            return EXIT_USAGE
        print(f"genauth-monitor: {exc.message}", file=sys.stderr)
        return EXIT_UNKNOWN
    except MonitorError as exc:
        print(f"genauth-monitor: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (``| head``) went away: not an error of ours. Point stdout at devnull so
        # the interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    return code


# -- parser ---------------------------------------------------------------------------------


def _global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """-c and the log options, accepted before and after the command. After it they default
    to SUPPRESS, so an absent one does not overwrite what was given before the command."""

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=default(None),
        help="config file (default: $GENAUTH_MONITOR_CONFIG, then ./genauth-monitor.toml)",
    )
    parser.add_argument("--log-format", choices=("text", "json"), default=default("text"))
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default=default(None)
    )


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, defaults=False)
    parser = argparse.ArgumentParser(
        prog="genauth-monitor",
        description="Watch GenAuth email provider settings for drift; keep an audit history.",
    )
    _global_options(parser, defaults=True)
    parser.add_argument("--version", action="version", version=f"genauth-monitor {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int], text: str) -> Any:
        sub = commands.add_parser(name, parents=[common], help=text, description=text)
        sub.set_defaults(handler=handler)
        return sub

    command("run", _lazy("_cmd_run"), "run the daemon: migrate, schedule polls, serve HTTP")
    check = command("check", _lazy("_cmd_check"), "poll each target once now and print its state")
    check.add_argument("--target", help="only this target")
    check.add_argument("--json", action="store_true", help="print JSON")
    check.add_argument(
        "--delivery-timeout",
        type=float,
        default=CHECK_DELIVERY_WAIT,
        metavar="SECONDS",
        help="how long to wait for alert deliveries before leaving them queued (default 10)",
    )

    history = command("history", _lazy("_cmd_history"), "recorded events, newest first")
    history.add_argument("--target")
    history.add_argument("--since", help="RFC 3339 time or age such as 24h, 7d")
    history.add_argument("--until", help="RFC 3339 time or age such as 1h")
    history.add_argument("--kind", action="append", help="event kind (repeatable, or a,b)")
    history.add_argument("--limit", type=int, default=50)
    history.add_argument(
        "--actor", metavar="ID_OR_NAME", help="only changes made by this admin (id or name)"
    )
    history.add_argument("--json", action="store_true", help="same as --format json")
    history.add_argument("--format", choices=("table", "json", "jsonl", "csv"), default="table")

    snaps = command("snapshots", _lazy("_cmd_snapshots"), "stored snapshots with first/last seen")
    snaps.add_argument("--target")
    snaps.add_argument("--limit", type=int, default=100)
    snaps.add_argument("--json", action="store_true")

    show = command("show", _lazy("_cmd_show"), "one snapshot's redacted document")
    show.add_argument("ref", metavar="HASH_OR_ID")

    diff_cmd = command("diff", _lazy("_cmd_diff"), "field-level diff of two snapshots")
    diff_cmd.add_argument("a", metavar="A", help="hash, hash prefix or id")
    diff_cmd.add_argument("b", metavar="B", help="hash, hash prefix or id")
    diff_cmd.add_argument("--json", action="store_true")

    at = command("at", _lazy("_cmd_at"), "the configuration in force at a time")
    at.add_argument("--target", required=True)
    at.add_argument("time", metavar="TIME", help="RFC 3339 time or age such as 24h")
    at.add_argument("--json", action="store_true")

    command("verify", _lazy("_cmd_verify"), "check the audit hash chain")

    alerts = command("alerts", _no_subcommand, "alert outbox tools").add_subparsers(
        metavar="ACTION"
    )
    pending = alerts.add_parser("pending", parents=[common], help="deliveries not yet accepted")
    pending.add_argument("--sink")
    pending.add_argument("--json", action="store_true")
    pending.add_argument(
        "--rejected", action="store_true", help="also rows a sink refused (set aside)"
    )
    pending.set_defaults(handler=_lazy("_cmd_alerts_pending"))
    retry = alerts.add_parser("retry", parents=[common], help="make pending deliveries due now")
    retry.add_argument("--sink")
    retry.set_defaults(handler=_lazy("_cmd_alerts_retry"))

    db = command("db", _no_subcommand, "database maintenance").add_subparsers(metavar="ACTION")
    upgrade_cmd = db.add_parser("upgrade", parents=[common], help="migrate to the newest schema")
    upgrade_cmd.set_defaults(handler=_lazy("_cmd_db_upgrade"))

    conf = command("config", _no_subcommand, "configuration tools").add_subparsers(metavar="ACTION")
    conf_check = conf.add_parser("check", parents=[common], help="validate the configuration")
    conf_check.set_defaults(handler=_lazy("_cmd_config_check"))

    demo = command("demo", _lazy("_cmd_demo"), "run against a built-in simulated GenAuth API")
    demo.add_argument("--listen", default="127.0.0.1:9464", help="HTTP listen address")
    demo.add_argument("--period", type=float, default=5.0, help="seconds between upstream changes")
    demo.add_argument("--duration", type=float, help="stop after this many seconds")
    return parser


def _no_subcommand(args: argparse.Namespace) -> int:
    raise UsageError("this command needs an action; see --help")
