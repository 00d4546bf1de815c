"""Pydantic's errors as config-file lines: ``key.path: message``.

A line is built from the key path and a message of our own or pydantic's ``msg``, never from
the offending value (it may be secret).
"""

from __future__ import annotations

import json
import re
from typing import Final

from pydantic import ValidationError
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

__all__ = ["Loc", "Problem", "key_path", "message", "validation_error"]

Loc = tuple[str | int, ...]
Problem = tuple[Loc, str]  # a key path and what is wrong there

_PLAIN_MESSAGES: Final = {
    "missing": "required key is missing",
    "extra_forbidden": "unknown key",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "dict_type": "must be a table",
    "tuple_type": "must be an array",
    "list_type": "must be an array",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "int_type": "must be an integer",
    "float_type": "must be a number",
}

_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


def message(error: ErrorDetails) -> str:
    """The message of a pydantic error, worded for a config file; never quotes the input."""
    kind, text = error["type"], error["msg"]
    if kind == "config":
        return text
    if kind in _PLAIN_MESSAGES:
        return _PLAIN_MESSAGES[kind]
    text = text.removeprefix("Value error, ")
    if text.startswith("Input should be "):
        text = "must be " + text.removeprefix("Input should be ")
    return text


def validation_error(title: str, problems: list[Problem]) -> ValidationError:
    """Problems of our own as a pydantic error, so they join pydantic's at their key paths."""
    details = [
        InitErrorDetails(
            type=PydanticCustomError("config", "{message}", {"message": text}),
            loc=loc,
            input=None,
        )
        for loc, text in problems
    ]
    return ValidationError.from_exception_data(title, details)


def key_path(loc: Loc) -> str:
    """``('targets', 0, 'expect', 'a.b')`` -> ``targets[0].expect."a.b"`` (TOML's spelling)."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
            continue
        key = part if _BARE_KEY.fullmatch(part) else json.dumps(part)
        text += f".{key}" if text else key
    return text or "config"
