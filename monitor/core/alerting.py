"""Pure alert rules: which sink wants which event, alert families, and what is still firing.

An alert *family* pairs a firing kind with the kind that resolves it; every other kind is a
one-off notice (the families, alertnames and severities come from the kinds table,
:mod:`monitor.core.kinds`, and are re-exported here for the sinks). Sinks filter by minimum
severity and by kinds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Final

from monitor.core.kinds import (
    ALERTNAMES,
    FAMILIES,
    FAMILY_SEVERITY,
    RESOLVES,
    SEVERITIES,
    firing_kind,
)
from monitor.core.rules import EventDraft, path_matches

__all__ = [
    "ALERTNAMES",
    "FAMILIES",
    "FAMILY_SEVERITY",
    "RESOLVES",
    "SEVERITY_RANK",
    "SinkRoute",
    "apply_ignore",
    "firing_kind",
]

SEVERITY_RANK: Final[dict[str, int]] = {severity: rank for rank, severity in enumerate(SEVERITIES)}


@dataclass(frozen=True, slots=True)
class SinkRoute:
    """The part of a sink's settings that decides which events it receives."""

    name: str
    min_severity: str = "info"
    kinds: tuple[str, ...] = ()
    lanes: int = 1  # the sink's URLs: each gets its own outbox row of every event

    def accepts(self, kind: str, severity: str) -> bool:
        # A resolution goes wherever its alert went, even to sinks that list only the alert
        # kind or whose minimum severity is above "info".
        if self.kinds and kind not in self.kinds and firing_kind(kind) not in self.kinds:
            return False
        if kind in RESOLVES:
            severity = FAMILY_SEVERITY[RESOLVES[kind]]
        return SEVERITY_RANK[severity] >= SEVERITY_RANK[self.min_severity]


def apply_ignore(events: Iterable[EventDraft], patterns: Iterable[str]) -> list[EventDraft]:
    """Events whose every change is under an ignored path are kept for history, not alerted."""
    patterns = tuple(patterns)
    if not patterns:
        return list(events)
    return [
        replace(event, notify=False)
        if event.changes and all(path_matches(c.path, patterns) for c in event.changes)
        else event
        for event in events
    ]
