"""Logging set-up: one line per event worth knowing, as text or JSON lines."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Final, TextIO

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
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        head = f"{format_time(utc_now())} {record.levelname.lower():7} {record.getMessage()}"
        if record.exc_info and record.exc_info[0] is not None:
            # Only the class: a traceback's text could quote a secret held in a local value.
            fields += f" error={record.exc_info[0].__name__}"
        return f"{head} {fields}".rstrip()


def setup_logging(*, level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in (
        "alembic",
        "apscheduler",
        "uvicorn",
        "uvicorn.access",
        "uvicorn.error",
        "urllib3",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
