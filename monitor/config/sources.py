"""Secret sources: a value given by ``<key>_env``, ``<key>_file`` or (where allowed) ``<key>``.

Each model lists its :class:`Source` fields. Before pydantic validates a table, every source
reads the raw dict: the value found in the environment or a file is put under ``<key>``, and
what cannot be had (a variable not set, an unreadable file, two alternatives given) is recorded
in :class:`Found` under the key the user wrote. ``Found.error`` then merges those problems with
pydantic's, reporting a field's errors under the key its value came from.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from monitor.config.context import Context
from monitor.config.messages import Loc, Problem, message, validation_error

__all__ = ["ENV_NAME", "Found", "Source"]

ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class Found:
    """What reading the raw document found before pydantic validates it."""

    problems: list[Problem] = field(default_factory=list)
    # fields whose own errors a problem of their source already explains
    superseded: set[str] = field(default_factory=set)
    # resolved field -> (key the value came from, where it came from)
    origins: dict[str, tuple[str, str]] = field(default_factory=dict)

    def problem(self, loc: str | Loc, text: str, *, supersedes: str | None = None) -> None:
        self.problems.append(((loc,) if isinstance(loc, str) else loc, text))
        if supersedes is not None:
            self.superseded.add(supersedes)

    def error(self, title: str, errors: list[ErrorDetails]) -> ValidationError:
        lines = list(self.problems)
        for error in errors:
            loc = tuple(error["loc"])
            head = loc[0] if loc else None
            if head in self.superseded and len(loc) == 1:
                continue
            if isinstance(head, str) and head in self.origins:
                key, origin = self.origins[head]
                lines.append(((key, *loc[1:]), f"{origin}: {message(error)}"))
            else:
                lines.append((loc, message(error)))
        return validation_error(title, lines)


@dataclass(frozen=True, slots=True)
class Source:
    """A value given by exactly one of ``<key>_env``, ``<key>_file`` or (if inline) ``<key>``."""

    key: str
    required: bool = False
    inline: bool = True  # may the config file hold the value itself?
    binary: bool = False
    placeholder: str = "(not read)"  # stands in for the value when secrets are not resolved
    always: bool = False  # resolved even for read-only commands (the database URL)

    @property
    def keys(self) -> tuple[str, ...]:
        alternatives = (f"{self.key}_env", f"{self.key}_file")
        return (*alternatives, self.key) if self.inline else alternatives

    def read(self, data: dict[str, Any], ctx: Context, found: Found) -> None:
        """Put the value into ``data[key]``, or record why it cannot be had."""
        key, choices = self.key, _one_of(self.keys)
        given = [name for name in self.keys if data.get(name) is not None]
        if ctx.from_file and not self.inline and key in data:
            found.problem(key, f"unknown key (use {choices})", supersedes=key)
        elif len(given) > 1:
            found.problem(key, f"give only one of {choices}, not {_all(given)}", supersedes=key)
        elif not given and self.required:
            found.problem(key, f"required key is missing (set {choices})", supersedes=key)
        elif given and not ctx.resolve_secrets and not self.always:
            self._stand_in(data)
        elif given and given[0] != key:
            self._fetch(given[0], data, ctx, found)
        # otherwise absent and optional, or given inline: the field itself validates it

    def _stand_in(self, data: dict[str, Any]) -> None:
        """The placeholder instead of the value, which is not read."""
        data[self.key] = self.placeholder.encode() if self.binary else self.placeholder
        for name in self.keys:
            if name != self.key:
                data.pop(name, None)

    def _fetch(self, key: str, data: dict[str, Any], ctx: Context, found: Found) -> None:
        where = data[key]
        if key.endswith("_env"):
            if not isinstance(where, str) or not ENV_NAME.fullmatch(where):
                found.superseded.add(self.key)  # the *_env field reports the bad name
                return
            origin = f"environment variable {where}"
            problem, content = self._from_environment(where, ctx)
        else:
            if not isinstance(where, str | os.PathLike):
                found.superseded.add(self.key)  # the *_file field reports the bad type
                return
            path = ctx.path(where)
            origin = f"file {path}"
            problem, content = _read_secret_file(path, binary=self.binary)
        if problem is not None:
            found.problem(key, problem, supersedes=self.key)
        else:
            data[self.key] = content
            found.origins[self.key] = (key, origin)

    def _from_environment(self, name: str, ctx: Context) -> tuple[str | None, str | bytes | None]:
        """``(problem, None)`` or ``(None, value)`` of the environment variable ``name``."""
        value = ctx.environ.get(name)
        if value is None:
            return f"environment variable {name} is not set", None
        if not value:
            return f"environment variable {name} is empty", None
        return None, value.encode() if self.binary else value


def _read_secret_file(path: Path, *, binary: bool) -> tuple[str | None, str | bytes | None]:
    """``(problem, None)`` or ``(None, content)`` with trailing newlines stripped."""
    try:
        content = path.read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        return f"cannot read file {path}: {exc.strerror or type(exc).__name__}", None
    if not content:
        return f"file {path} is empty", None
    if binary:
        return None, content
    try:
        return None, content.decode("utf-8")
    except UnicodeDecodeError:
        return f"file {path} is not UTF-8 text", None


def _one_of(keys: tuple[str, ...]) -> str:
    return ", ".join(keys[:-1]) + " or " + keys[-1]


def _all(keys: list[str]) -> str:
    return ", ".join(keys[:-1]) + " and " + keys[-1]
