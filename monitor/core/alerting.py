"""Pure alert rules: which sink wants which event, alert families, and what is still firing.

An alert *family* pairs a firing kind with the kind that resolves it; every other kind is a
one-off notice. Sinks filter by minimum severity and by kinds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Final

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

SEVERITY_RANK: Final = {"info": 0, "warning": 1, "critical": 2}

# firing kind -> resolving kind
FAMILIES: Final = {
    "provider_disabled": "provider_enabled",
    "baseline_drift": "baseline_restored",
    "poll_failing": "poll_recovered",
}
RESOLVES: Final = {resolving: firing for firing, resolving in FAMILIES.items()}
FAMILY_SEVERITY: Final = {
    "provider_disabled": "critical",
    "baseline_drift": "critical",
    "poll_failing": "warning",
}

# One stable alertname per family (the resolving kind shares its firing kind's name), so
# Alertmanager groups and resolves them.
ALERTNAMES: Final = {
    "provider_disabled": "GenAuthEmailProviderDisabled",
    "baseline_drift": "GenAuthEmailProviderBaselineDrift",
    "poll_failing": "GenAuthMonitorPollFailing",
    "type_changed": "GenAuthEmailProviderTypeChanged",
    "delivery_changed": "GenAuthEmailProviderDeliveryChanged",
    "secret_rotated": "GenAuthEmailProviderSecretRotated",
    "config_changed": "GenAuthEmailProviderConfigChanged",
    "first_seen": "GenAuthEmailProviderFirstSeen",
}


def firing_kind(kind: str) -> str:
    """The kind whose alert an event of ``kind`` starts or ends."""
    return RESOLVES.get(kind, kind)


@dataclass(frozen=True, slots=True)
class SinkRoute:
    """The part of a sink's settings that decides which events it receives."""

    name: str
    min_severity: str = "info"
    kinds: tuple[str, ...] = ()

    def accepts(self, kind: str, severity: str) -> bool:
        # A resolution goes wherever its alert went, even to sinks that list only the alert
        # kind or whose minimum severity is above "info".
        if self.kinds and kind not in self.kinds and firing_kind(kind) not in self.kinds:
            return False
        if kind in RESOLVES:
            severity = FAMILY_SEVERITY[RESOLVES[kind]]
        return SEVERITY_RANK[severity] >= SEVERITY_RANK[self.min_severity]


_FAMILY_SEVERITY: Final = {
    "provider_disabled": "critical",
    "baseline_drift": "critical",
    "poll_failing": "warning",
}


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
