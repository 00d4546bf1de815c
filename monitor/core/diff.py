"""Field-level differences between two documents, addressed by dotted paths."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["MISSING", "Change", "diff", "flatten", "get_path", "same_document", "same_value"]


class _Missing:
    """The value of a path that a document does not have."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


@dataclass(frozen=True, slots=True)
class Change:
    """One changed leaf: ``old``/``new`` are ``None`` where the path is absent on that side."""

    path: str
    old: Any
    new: Any

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "old": self.old, "new": self.new}


def flatten(document: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of ``document`` by dotted path; lists and empty objects are leaves."""
    if not isinstance(document, dict) or (not document and prefix):
        return {prefix: document}
    leaves: dict[str, Any] = {}
    for name, value in document.items():
        path = f"{prefix}.{name}" if prefix else str(name)
        leaves.update(flatten(value, path))
    return leaves


def get_path(document: Any, path: str) -> Any:
    """The value at a dotted path, or :data:`MISSING`."""
    node = document
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def diff(old: Any, new: Any) -> list[Change]:
    """Changed leaves between two documents, sorted by path (``old=None`` means no old document)."""
    before = flatten(old) if old is not None else {}
    after = flatten(new) if new is not None else {}
    changes = []
    for path in sorted(before.keys() | after.keys()):
        was, now = before.get(path, MISSING), after.get(path, MISSING)
        if was is MISSING or now is MISSING or not same_value(was, now):
            changes.append(
                Change(path, None if was is MISSING else was, None if now is MISSING else now)
            )
    return changes


def same_value(a: Any, b: Any) -> bool:
    """Equality of two leaves in which a bool never equals a number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


def same_document(a: Any, b: Any) -> bool:
    """Whether two parsed JSON documents are identical, types included (``1 != true``)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_document(v, b[k]) for k, v in a.items())
    if isinstance(a, list):
        return len(a) == len(b) and all(map(same_document, a, b))
    return bool(a == b)
