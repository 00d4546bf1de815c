"""The table of event kinds (SPEC §4): the one place a kind's severity, status and alert live.

Every other constant about kinds (``EVENT_KINDS``, ``FAMILIES``, ``RESOLVES``,
``FAMILY_SEVERITY``, ``ALERTNAMES``) is derived from :data:`KINDS`, so the rules, the sinks,
the config and the CLI cannot disagree. To add a kind, add one row here (and the rule that raises
it in :mod:`monitor.core.rules`); docs/alerts.md shows the same table.

An alert *family* is a firing kind together with the kind that resolves it; the resolving kind
shares its family's Alertmanager ``alertname``. Kinds outside a family are one-off notices.

``first_seen`` is not in the SPEC table; it is ``info``/``firing`` by a project choice: it opens
nothing that a later event closes, so as a one-off notice it must not look resolved.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "ALERTNAMES",
    "EVENT_KINDS",
    "FAMILIES",
    "FAMILY_SEVERITY",
    "KINDS",
    "RESOLVES",
    "SEVERITIES",
    "EventKind",
    "Severity",
    "Status",
    "firing_kind",
    "kind_of",
]

Severity = Literal["info", "warning", "critical"]
Status = Literal["firing", "resolved"]

SEVERITIES: Final[tuple[Severity, ...]] = ("info", "warning", "critical")


@dataclass(frozen=True, slots=True)
class EventKind:
    """One row of the SPEC §4 table.

    ``resolves`` names the firing kind this kind ends (a resolving kind has status
    ``resolved``); ``alertname`` is the Alertmanager alert the kind starts or ends.
    """

    name: str
    severity: Severity
    status: Status
    alertname: str
    resolves: str | None = None


# The order is the order of EVENT_KINDS (config messages, metrics series) and the order in which
# one snapshot's change events are raised.
KINDS: Final[tuple[EventKind, ...]] = (
    EventKind("first_seen", "info", "firing", "GenAuthEmailProviderFirstSeen"),
    EventKind("provider_disabled", "critical", "firing", "GenAuthEmailProviderDisabled"),
    EventKind(
        "provider_enabled",
        "info",
        "resolved",
        "GenAuthEmailProviderDisabled",
        resolves="provider_disabled",
    ),
    EventKind("type_changed", "critical", "firing", "GenAuthEmailProviderTypeChanged"),
    EventKind("delivery_changed", "warning", "firing", "GenAuthEmailProviderDeliveryChanged"),
    EventKind("secret_rotated", "info", "firing", "GenAuthEmailProviderSecretRotated"),
    EventKind("config_changed", "info", "firing", "GenAuthEmailProviderConfigChanged"),
    EventKind("baseline_drift", "critical", "firing", "GenAuthEmailProviderBaselineDrift"),
    EventKind(
        "baseline_restored",
        "info",
        "resolved",
        "GenAuthEmailProviderBaselineDrift",
        resolves="baseline_drift",
    ),
    EventKind("poll_failing", "warning", "firing", "GenAuthMonitorPollFailing"),
    EventKind(
        "poll_recovered", "info", "resolved", "GenAuthMonitorPollFailing", resolves="poll_failing"
    ),
)


def _checked(kinds: Iterable[EventKind]) -> dict[str, EventKind]:
    """The table by name, refusing rows that contradict each other (caught at import)."""
    table: dict[str, EventKind] = {}
    for kind in kinds:
        if kind.name in table:
            raise ValueError(f"event kind {kind.name} is listed twice")
        table[kind.name] = kind
    for kind in table.values():
        if (kind.resolves is None) != (kind.status == "firing"):
            raise ValueError(f"event kind {kind.name}: only a resolving kind is 'resolved'")
        if kind.resolves is None:
            continue
        ended = table.get(kind.resolves)
        if ended is None or ended.resolves is not None:
            raise ValueError(f"event kind {kind.name} resolves no firing kind")
        if ended.alertname != kind.alertname:
            raise ValueError(f"event kind {kind.name}: alertname differs from its family's")
    return table


_BY_NAME: Final = _checked(KINDS)

EVENT_KINDS: Final[tuple[str, ...]] = tuple(_BY_NAME)
# resolving kind -> the firing kind it ends; firing kind -> its resolving kind
RESOLVES: Final[dict[str, str]] = {k.name: k.resolves for k in KINDS if k.resolves is not None}
FAMILIES: Final[dict[str, str]] = {firing: resolving for resolving, firing in RESOLVES.items()}
# The severity an alert family carries, also on its (info) resolution, so that Alertmanager
# sees the same labels and a sink's min_severity lets the resolution through with its alert.
FAMILY_SEVERITY: Final[dict[str, Severity]] = {name: _BY_NAME[name].severity for name in FAMILIES}
ALERTNAMES: Final[dict[str, str]] = {k.name: k.alertname for k in KINDS}


def kind_of(name: str) -> EventKind:
    """The table row of kind ``name`` (KeyError for an unknown kind)."""
    return _BY_NAME[name]


def firing_kind(kind: str) -> str:
    """The kind whose alert an event of ``kind`` starts or ends."""
    return RESOLVES.get(kind, kind)
