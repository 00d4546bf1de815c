"""What validation may consult besides the document: passed in, never global."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationInfo

__all__ = ["Context", "context_of"]


@dataclass(frozen=True, slots=True)
class Context:
    """The environment, the config file's directory and what the caller asked for."""

    environ: Mapping[str, str]
    base_dir: Path
    from_file: bool  # validating a config file, not settings built in code
    source: Path | None = None
    # False for read-only commands (history, show, verify, ...): an auditor needs the
    # database, not the upstream or sink credentials, so those are not read at all.
    resolve_secrets: bool = True

    def path(self, value: str | os.PathLike[str]) -> Path:
        return self.base_dir / value


def context_of(info: ValidationInfo) -> Context:
    """The context ``parse_settings`` passed, or the process's for settings built in code."""
    if isinstance(info.context, Context):
        return info.context
    return Context(os.environ, Path.cwd(), from_file=False)
