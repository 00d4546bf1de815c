"""Untrusted upstream text in text logs, on the terminal and in Slack (issue 8, point 8).

Key names and values of the upstream answer, its error messages and everything built from
them (change paths, event messages, the provider type) are escaped wherever they are shown:
no raw control, bidi or line-separator character reaches a log line or the terminal, no value
forges a log line or a ``key=value`` field, JSON output stays valid and exact, and nothing
mentions or links in Slack.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import sys
import threading
import unicodedata
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from monitor.alerts.slack import slack_message
from monitor.app import build_runtime
from monitor.cli import main
from monitor.core.escape import dumps_json, escape_json, escape_text, field_value
from monitor.logs import JsonFormatter, TextFormatter, setup_logging
from monitor.simulator import SimulatedGenAuth
from monitor.storage.queries import EventView
from monitor.timeutil import format_time, utc_now
from tests.helpers import QuietJsonHandler, runtime_settings, write_config
from tests.receiver import Receiver

SECRET = "Escaping-Access-Secret-123"
UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})

FAKE_LINE = "\n2026-01-01T00:00:00Z info     audit chain head chain_seq=1 chain_hash=forged"
HOSTILE_KEY = "note" + FAKE_LINE + "\r\x1b[2J\x9b2J\u202e"
HOSTILE_VALUE = (
    "v" + FAKE_LINE + "\x1b[31m\x9b31m\u202egnp.exe\u2028\u2066\x7f\x00"
    " `<!channel>` <https://evil.example|Reset your password> & <@U123> ```"
)
HOSTILE_TYPE = "custom drift=no\x1b[2J"
HOSTILE_MESSAGE = "upstream down" + FAKE_LINE + "\x9b2J\u202e\u2028 <!channel>"


def unsafe(text: str) -> list[str]:
    return [char for char in text if unicodedata.category(char) in UNSAFE_CATEGORIES]


def assert_clean(text: str, what: str) -> list[str]:
    """The lines of ``text`` (split on "\\n" only); none holds an unsafe character."""
    lines = text.split("\n")
    for line in lines:
        assert not unsafe(line), f"{what}: raw {unsafe(line)!r} in {line!r}"
    return [line for line in lines if line]


# A text log line: time, level, message (plain without '=', '"' or backslash, else a JSON
# string), then ` key=value` fields, each key and value plain or a JSON string.
_TOKEN = r'(?:"(?:[^"\\]|\\.)*"|[^\s="\\]+)'
_FIELD = re.compile(rf" ({_TOKEN})=({_TOKEN})")
_LINE = re.compile(
    rf"(?P<time>\d{{4}}-\d\d-\d\dT[\d:.]+Z) (?P<level>[a-z]+) +"
    rf'(?P<message>"(?:[^"\\]|\\.)*"|[^="\\]*?)(?P<fields>(?: {_TOKEN}={_TOKEN})*)'
)


def _token(text: str) -> str:
    decoded: str = json.loads(text) if text.startswith('"') else text
    return decoded


def parse_line(line: str) -> tuple[str, str, dict[str, str]]:
    """(level, message, fields) of one text log line; fails if it is not exactly that."""
    match = _LINE.fullmatch(line)
    assert match, f"not a well-formed log line: {line!r}"
    fields: dict[str, str] = {}
    for key, value in _FIELD.findall(match["fields"]):
        assert _token(key) not in fields, f"field {key} twice in {line!r}"
        fields[_token(key)] = _token(value)
    return match["level"], _token(match["message"]), fields


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made = Receiver()
    yield made
    made.stop()


# -- the escaping functions ------------------------------------------------------------------


def test_every_control_format_and_separator_character_is_escaped() -> None:
    every = "".join(
        chr(code)
        for code in range(sys.maxunicode + 1)
        if unicodedata.category(chr(code)) in UNSAFE_CATEGORIES
    )
    assert "\n" in every and "\x9b" in every and "\u202e" in every and "\U000e0041" in every
    shown = escape_text(every)
    assert shown.isascii() and shown.isprintable(), "every one as a visible escape"
    assert escape_text("a\nb\r\t\x1b[2J\x9b\u202e\U000e0041") == (
        "a\\nb\\r\\t\\x1b[2J\\x9b\\u202e\\U000e0041"
    )
    assert escape_text("plain text, 中文, é, ✓") == "plain text, 中文, é, ✓"
    # Adjacent lone surrogates would pair up in any JSON decoder; one alone is kept.
    exact = "".join(c for c in every if unicodedata.category(c) != "Cs") + "\ud800"
    for indent in (None, 2):
        text = dumps_json({exact: exact, "ok": "中文", "all": every}, indent=indent)
        assert json.loads(text)[exact] == exact, "the same data"
        assert not unsafe(text.replace("\n", "")), "none raw in JSON either"
        assert "中文" in text, "readable non-ASCII stays"
    assert escape_json(json.dumps("\x9b", ensure_ascii=False)) == '"\\u009b"'


def test_a_field_value_cannot_pose_as_another_field() -> None:
    assert field_value("prod") == "prod"
    for value in ("a b", "a=b", 'a"b', "a\\nb", "", "a\u3000b", "a\nb", "x\x9by"):
        quoted = field_value(value)
        assert quoted.startswith('"') and json.loads(quoted) == value
        assert not unsafe(quoted)


# -- text and JSON logs ----------------------------------------------------------------------


def _record(message: str, extra: dict[str, Any], exc: bool = False) -> logging.LogRecord:
    logger = logging.getLogger("monitor.test")
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logger.makeRecord(
        logger.name, logging.WARNING, __file__, 1, message, (), exc_info, extra=extra
    )


HOSTILE_EXTRA: dict[str, Any] = {
    "target": "prod",
    "detail": HOSTILE_MESSAGE,
    "path": "smtpConfig." + HOSTILE_KEY,
    "value": HOSTILE_VALUE,
    "changes": [{"path": HOSTILE_KEY, "new": HOSTILE_VALUE}],
    "count": 3,
    "chain_hash=forged detail": "key name with a space and '='",
    HOSTILE_KEY: "a key from upstream",
}


def test_text_log_line_is_one_line_with_exactly_the_fields_given() -> None:
    message = "upstream said" + FAKE_LINE
    line = TextFormatter().format(_record(message, HOSTILE_EXTRA))
    assert "\n" not in line and "\r" not in line and not unsafe(line)
    level, got_message, fields = parse_line(line)
    assert level == "warning" and got_message == message
    assert fields == {k: v if isinstance(v, str) else str(v) for k, v in HOSTILE_EXTRA.items()}
    assert not re.match(r"\S+ \w+ +audit chain head", line), "a reader anchored on the message"
    for message in ("boom chain_hash=forged", 'say "hi"', "a\\nb"):
        assert parse_line(TextFormatter().format(_record(message, {}))) == ("warning", message, {})
    plain = TextFormatter().format(
        _record("audit chain head", {"chain_seq": 7, "chain_hash": "ab"})
    )
    assert plain.endswith(" warning audit chain head chain_seq=7 chain_hash=ab"), (
        "plain stays plain"
    )


def test_json_log_line_is_valid_exact_and_has_no_raw_c1_or_bidi() -> None:
    line = JsonFormatter().format(_record("upstream said" + FAKE_LINE, HOSTILE_EXTRA))
    assert "\n" not in line and not unsafe(line)
    parsed = json.loads(line)
    assert parsed["message"] == "upstream said" + FAKE_LINE
    for key, value in HOSTILE_EXTRA.items():
        assert parsed[key] == value


def test_logs_name_the_exception_class_but_never_print_the_traceback() -> None:
    secret = "Traceback-Held-Secret-789"
    for fmt in ("text", "json"):
        out = io.StringIO()
        setup_logging(fmt=fmt, stream=out)
        try:
            raise RuntimeError(f"could not log in with {secret}")
        except RuntimeError:
            logging.getLogger("monitor.test").exception("poll crashed", extra={"target": "prod"})
        text = out.getvalue()
        assert text.count("\n") == 1, f"{fmt}: one line"
        assert secret not in text and "Traceback" not in text and __file__ not in text, fmt
        here = "test_escaping.py:"
        if fmt == "text":
            fields = parse_line(text.rstrip("\n"))[2]
            where = fields.pop("where")
            assert fields == {"target": "prod", "error": "RuntimeError"}
        else:
            line = json.loads(text)
            assert line["error"] == "RuntimeError"
            where = line["where"]
        # The traceback as frames (file, line, function) and nothing of its text.
        assert where.startswith(here) and "test_logs_name_the_exception_class" in where, where


# -- Slack -----------------------------------------------------------------------------------


def _hostile_event() -> EventView:
    from datetime import UTC, datetime

    return EventView(
        row_id=1,
        id="7f0c1d2e-0000-4000-8000-000000000001",
        target="prod",
        kind="config_changed`<!here>",
        severity="info",
        status="firing",
        at=datetime(2026, 1, 1, tzinfo=UTC),
        snapshot="sha256:" + "a" * 64,
        previous=None,
        changes=[
            {"path": "smtpConfig." + HOSTILE_KEY + "`*bold*`", "old": None, "new": HOSTILE_VALUE},
            {"path": "a", "old": "`<!channel>`", "new": {"k`<https://x.example>": 1}},
        ],
        message=f"prod: configuration changed ({HOSTILE_KEY}: {HOSTILE_VALUE!r}) {HOSTILE_MESSAGE}",
    )


def assert_slack_safe(text: str, event: EventView) -> None:
    lines = assert_clean(text, "slack text")
    shown = min(len(event.changes), 10) + (len(event.changes) > 10)
    assert len(lines) == 2 + shown + 1, "title, message, one line per change, footer"
    assert "<" not in text and ">" not in text, "no mention, no link, no control sequence"
    assert not re.search(r"&(?!amp;|lt;|gt;)", text), "a raw & is escaped too"
    for line in lines:
        assert line.count("`") % 2 == 0, f"a code span left open: {line!r}"
        outside = "".join(line.split("`")[0::2])
        for marker in ("channel", "!here", "evil", "forged", "bold", "2J", "Reset"):
            assert marker not in outside, f"upstream text {marker!r} outside a code span: {line!r}"


def test_slack_message_escapes_every_upstream_string() -> None:
    event = _hostile_event()
    text = slack_message(event)["text"]
    assert_slack_safe(text, event)
    assert "\u02cb&lt;!channel&gt;\u02cb" in text, "shown escaped; a backtick becomes a look-alike"


def test_slack_sink_posts_no_mention_no_link_through_the_real_poll_path(
    tmp_path: Path, receiver: Receiver
) -> None:
    with SimulatedGenAuth(access_key_secret=SECRET) as sim:
        sinks = [{"type": "slack", "name": "slack", "url": receiver.url}]
        # attribution off: no worker runs here to release the info alerts it holds.
        settings = runtime_settings(
            f"sqlite:///{tmp_path / 'm.db'}", sim, tmp_path, sinks=sinks, attribution=False
        )
        runtime = build_runtime(settings)
        poller = runtime.pollers["prod"]
        poller.poll()
        data = sim.data
        data["smtpConfig"][HOSTILE_KEY] = HOSTILE_VALUE
        data["type"] = HOSTILE_TYPE
        sim.set_data(data)
        poller.poll()
        assert runtime.delivery.drain(timeout=5) == 0
        events = {event.kind: event for event in runtime.queries.events(target="prod")}
        runtime.store.engine.dispose()
    assert events.keys() == {"first_seen", "type_changed", "config_changed"}
    texts = {
        kind: t
        for t in (b["text"] for b in receiver.bodies())
        for kind in events
        if f"`{kind}`" in t
    }
    assert texts.keys() == events.keys(), "one message per event"
    for raw in (r["body"] for r in receiver.requests):
        assert b"<!channel>" not in raw and b"<http" not in raw and b"<@" not in raw
    assert "\\x1b[31m" in texts["config_changed"], "the hostile value is shown, escaped"
    assert "\\x1b[2J" in texts["type_changed"]
    assert "&lt;!channel&gt;" in texts["config_changed"]
    for kind, text in texts.items():
        assert_slack_safe(text, events[kind])


# -- the real poll path, the logs and every text command ---------------------------------------


class _HostileUpstream:
    """Answers every request with a failure envelope whose message and requestId are hostile."""

    def __init__(self) -> None:
        body = json.dumps(
            {
                "statusCode": 500,
                "message": HOSTILE_MESSAGE,
                "apiCode": 5000,
                "requestId": "req-1 chain_hash=forged\u202e",
            },
            ensure_ascii=False,
        ).encode()

        class Handler(QuietJsonHandler):
            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_json(200, body)

            do_GET = do_POST = _answer

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.access_key_id = "pool-1"
        threading.Thread(  # shutdown() waits up to one poll interval
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_hostile_upstream_text_forges_nothing_in_logs_or_on_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GM_TEST_SECRET", SECRET)
    monkeypatch.setenv("GM_TEST_API_TOKEN", "Escaping-Api-Token-1")
    db = f"sqlite:///{tmp_path / 'monitor.db'}"
    logs = io.StringIO()
    setup_logging(level="debug", stream=logs)
    with SimulatedGenAuth(access_key_secret=SECRET) as sim:
        runtime = build_runtime(runtime_settings(db, sim, tmp_path))
        poller = runtime.pollers["prod"]
        data = sim.data
        data["smtpConfig"][HOSTILE_KEY] = HOSTILE_VALUE
        sim.set_data(data)
        poller.poll()  # first_seen, with the hostile key among its changes
        data["smtpConfig"][HOSTILE_KEY] = HOSTILE_VALUE + " (changed)"
        data[HOSTILE_KEY] = {"nested": HOSTILE_VALUE}
        data["type"] = HOSTILE_TYPE
        sim.set_data(data)
        poller.poll()  # type_changed and config_changed, messages quoting paths and values
        runtime.store.engine.dispose()
        config = write_config(tmp_path, sim, storage_url=db)

        # `check` on the same upstream: its status line quotes the hostile type, its event
        # lines quote the hostile path.
        data["smtpConfig"][HOSTILE_KEY] = HOSTILE_VALUE + " (changed by check)"
        sim.set_data(data)
        code, out, err = _cli(capsys, "check", "-c", str(config))
        lines = assert_clean(out, "check")
        assert any(line.startswith("    info: ") and "\\u202e" in line for line in lines)
        status = lines[0].removeprefix("prod: enabled")
        assert re.fullmatch(rf"(?: {_TOKEN}={_TOKEN})+", status), lines[0]
        fields = {_token(k): _token(v) for k, v in _FIELD.findall(status)}
        assert fields.keys() == {"type", "hash", "drift"}, "no forged field"
        assert fields["type"] == HOSTILE_TYPE and fields["drift"] == "no"
        assert_clean(err, "check stderr")

    # A failing upstream with a hostile message: the logs and the `check` line.
    hostile = _HostileUpstream()
    try:
        bad_dir = tmp_path / "bad"
        bad_dir.mkdir()
        bad_config = write_config(bad_dir, hostile)  # type: ignore[arg-type]
        code, out, err = _cli(capsys, "check", "-c", str(bad_config))
    finally:
        hostile.stop()
    assert code == 3
    lines = assert_clean(out, "failed check")
    assert len(lines) == 1 and "POLL FAILED" in lines[0] and "\\u202e" in lines[0]
    failed = [parse_line(line) for line in assert_clean(err, "check logs")]
    details = [fields for _, message, fields in failed if message == "poll failed"]
    assert details and "chain_hash=forged" in details[0]["detail"], "the whole message, quoted"
    assert details[0]["request_id"].startswith("req-1 chain_hash=forged")

    # Every line the poll path logged is one well-formed line with no forged field.
    logged = [parse_line(line) for line in assert_clean(logs.getvalue(), "logs")]
    assert any(message == "audit chain head" for _, message, _ in logged)
    for _, message, fields in logged + failed:
        assert not message.startswith("2026-01-01"), "no forged line"
        if message == "audit chain head":
            assert fields["chain_hash"] != "forged"
        else:
            assert "chain_hash" not in fields and "chain_seq" not in fields

    # The audit commands print the hostile text escaped, never raw.
    events = runtime.queries.events(target="prod")
    assert {"first_seen", "type_changed", "config_changed"} <= {e.kind for e in events}
    code, out, _ = _cli(capsys, "history", "-c", str(config))
    lines = assert_clean(out, "history")
    assert code == 0 and len(lines) == 1 + len(events), "one line per event"
    assert "\\x1b[2J" in out and "\\u202e" in out and "\\n2026-01-01" in out

    for fmt in ("json", "jsonl"):
        code, out, _ = _cli(capsys, "history", "-c", str(config), "--format", fmt)
        assert not unsafe(out.replace("\n", "")), fmt
        parsed = json.loads(out) if fmt == "json" else [json.loads(x) for x in out.splitlines()]
        assert [e["message"] for e in parsed] == [e.message for e in events], "the exact data"
        assert [e["changes"] for e in parsed] == [e.changes for e in events]

    code, out, _ = _cli(capsys, "history", "-c", str(config), "--format", "csv")
    assert_clean(out, "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == len(events), "no row forged"
    assert [json.loads(r["changes"]) for r in rows] == [e.changes for e in events]

    snapshots = runtime.queries.snapshots(target="prod")
    code, out, _ = _cli(capsys, "snapshots", "-c", str(config))
    assert len(assert_clean(out, "snapshots")) == 1 + len(snapshots)
    assert "\\x1b[2J" in out, "the hostile provider type, escaped"

    first, second = snapshots[-1].hash, snapshots[-2].hash
    code, out, _ = _cli(capsys, "show", "-c", str(config), second)
    assert code == 0 and not unsafe(out.replace("\n", ""))
    assert json.loads(out)["document"]["smtpConfig"][HOSTILE_KEY] == HOSTILE_VALUE + " (changed)"

    code, out, _ = _cli(capsys, "diff", "-c", str(config), first, second)
    lines = assert_clean(out, "diff")
    changes = [line for line in lines if line.startswith("  ")]
    assert code == 0 and len(lines) == 2 + len(changes) and len(changes) >= 3
    assert any(line.startswith("  smtpConfig.note\\n2026-01-01") for line in changes)
    code, out, _ = _cli(capsys, "diff", "-c", str(config), first, second, "--json")
    assert not unsafe(out.replace("\n", ""))
    assert any(c["path"] == "smtpConfig." + HOSTILE_KEY for c in json.loads(out)["changes"])

    now = format_time(utc_now())
    assert now is not None
    code, out, _ = _cli(capsys, "at", "-c", str(config), "--target", "prod", now)
    assert code == 0 and "\\u001b[2J" in out
    assert_clean(out, "at")
    code, out, _ = _cli(capsys, "at", "-c", str(config), "--target", "prod", now, "--json")
    assert not unsafe(out.replace("\n", ""))
    assert json.loads(out)["document"][HOSTILE_KEY] == {"nested": HOSTILE_VALUE}
