"""Logging set-up: one line per event worth knowing, as text or JSON lines.

Messages and ``extra=`` values may carry upstream text (a message of the API, a path built
from an upstream key name), so both formatters escape it (:mod:`monitor.core.escape`): a text
line is always exactly one line of ``time level message key=value ...`` whose fields cannot
be forged, and no control, bidi or line-separator character reaches either format raw.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from typing import Any, Final, TextIO

from monitor.core.escape import dumps_json, escape_json, escape_text, field_value
from monitor.timeutil import format_time, utc_now

__all__ = ["JsonFormatter", "TextFormatter", "setup_logging"]

# Attributes every LogRecord has; anything else was passed in ``extra=`` and is printed.
_STANDARD: Final = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and v is not None}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": format_time(utc_now()),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(_extras(record))
        if record.exc_info and record.exc_info[0] is not None:
            line["error"] = record.exc_info[0].__name__
            line["where"] = _where(record)
        # C0 inside strings is escaped by json.dumps; C1, bidi and separators are made \u too.
        return escape_json(json.dumps(line, default=str, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # Keys come from code, but are quoted like values all the same if they need it.
        fields = [f"{field_value(k)}={field_value(_text(v))}" for k, v in _extras(record).items()]
        if record.exc_info and record.exc_info[0] is not None:
            # The class and where it was raised, never the message or source lines: a
            # traceback's text could quote a secret held in a local value.
            fields.append(f"error={field_value(record.exc_info[0].__name__)}")
            fields.append(f"where={field_value(_where(record))}")
        head = f"{format_time(utc_now())} {record.levelname.lower():7} {_message(record)}"
        return " ".join([head, *fields]).rstrip()


_FRAMES: Final = 8


def _where(record: logging.LogRecord) -> str:
    """The traceback as frames only, innermost first: ``file.py:LINE function < ...``."""
    tb = record.exc_info[2] if record.exc_info else None
    frames = traceback.extract_tb(tb)[-_FRAMES:]
    return " < ".join(
        f"{os.path.basename(frame.filename)}:{frame.lineno} {frame.name}"
        for frame in reversed(frames)
    )


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _message(record: logging.LogRecord) -> str:
    """The message on one line; quoted when it holds what could read as a field or a quote."""
    message = record.getMessage()
    if escape_text(message) != message or any(char in message for char in '="\\'):
        return dumps_json(message)
    return message


def setup_logging(*, level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in (
        "alembic",
        "uvicorn",
        "uvicorn.access",
        "uvicorn.error",
        "urllib3",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
