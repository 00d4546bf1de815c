"""The drift rules of SPEC §4: which events a new snapshot or a poll outcome raises.

Each changed field is claimed by exactly one event, the most specific: ``enabled`` by
provider_disabled/enabled, ``type`` by type_changed, the delivery fields of the active
sub-config by delivery_changed, fingerprints by secret_rotated, and the rest by config_changed.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from monitor.core.diff import MISSING, Change, diff, get_path, same_value
from monitor.core.kinds import EVENT_KINDS, Severity, Status, kind_of
from monitor.core.redact import FINGERPRINT_PREFIX

__all__ = [
    "ACTIVE_SUBCONFIG",
    "EVENT_KINDS",
    "EventDraft",
    "Severity",
    "Status",
    "baseline_events",
    "baseline_mismatches",
    "failure_events",
    "path_matches",
    "recovery_events",
    "snapshot_events",
]

ACTIVE_SUBCONFIG: Final = {
    "custom": "smtpConfig",
    "sendgrid": "sendGridConfig",
    "ali": "aliExmailConfig",
    "qq": "tencentExmailConfig",
}
_DELIVERY_FIELDS: Final = ("smtp_host", "smtp_port", "secure", "sender")


@dataclass(frozen=True, slots=True)
class EventDraft:
    """An event before storage gives it an id, a time and its hashes."""

    kind: str
    severity: Severity
    status: Status
    message: str
    changes: tuple[Change, ...] = field(default=())
    notify: bool = True  # False: recorded in history, sent to no sink (an ignored path)


def _draft(kind: str, message: str, changes: tuple[Change, ...] = ()) -> EventDraft:
    """An event of ``kind`` with the severity and status of its row in the kinds table."""
    row = kind_of(kind)
    return EventDraft(kind, row.severity, row.status, message, changes)


def path_matches(path: str, patterns: Iterable[str]) -> bool:
    """Whether a dotted path matches any pattern; ``*`` stands for one whole segment or part."""
    parts = path.split(".")
    for pattern in patterns:
        wanted = pattern.split(".")
        if len(wanted) == len(parts) and all(
            fnmatch.fnmatchcase(part, want) for part, want in zip(parts, wanted, strict=True)
        ):
            return True
    return False


def baseline_mismatches(document: Any, expect: Mapping[str, Any]) -> list[Change]:
    """Paths where ``document`` differs from the baseline: ``old`` expected, ``new`` actual."""
    mismatches = []
    for path in sorted(expect):
        wanted, actual = expect[path], get_path(document, path)
        if actual is MISSING or not same_value(wanted, actual):
            mismatches.append(Change(path, wanted, None if actual is MISSING else actual))
    return mismatches


def snapshot_events(
    *,
    target: str,
    previous: Any,
    current: Any,
    expect: Mapping[str, Any],
    was_drifting: bool,
) -> list[EventDraft]:
    """Events raised by a new snapshot ``current`` following ``previous`` (``None`` at first)."""
    if previous is None:
        events = [_first_seen(target, current)]
        if current.get("enabled") is False:
            change = Change("enabled", None, False)
            events.append(_change_event(target, "provider_disabled", (change,)))
    else:
        events = _change_events(target, previous, current)
    return events + baseline_events(
        target=target, current=current, expect=expect, was_drifting=was_drifting
    )


def baseline_events(
    *, target: str, current: Any, expect: Mapping[str, Any], was_drifting: bool
) -> list[EventDraft]:
    """``baseline_drift`` when ``current`` starts to differ from ``expect``,
    ``baseline_restored`` when it stops; called for every snapshot and also when only the
    baseline itself changed (a new ``expect`` after a restart)."""
    drift = baseline_mismatches(current, expect)
    if drift and not was_drifting:
        paths = ", ".join(change.path for change in drift)
        message = f"{target}: configuration differs from the expected baseline at {paths}"
        return [_draft("baseline_drift", message, tuple(drift))]
    if was_drifting and not drift:
        message = f"{target}: configuration matches the expected baseline again"
        return [_draft("baseline_restored", message)]
    return []


def failure_events(*, target: str, failures: int, threshold: int, reason: str) -> list[EventDraft]:
    """``poll_failing`` exactly when the run of consecutive failures reaches the threshold."""
    if failures != threshold:
        return []
    message = f"{target}: {failures} consecutive polls failed (last: {reason})"
    return [_draft("poll_failing", message)]


def recovery_events(*, target: str, failures_before: int, threshold: int) -> list[EventDraft]:
    """``poll_recovered`` on the first success after a run that raised ``poll_failing``."""
    if failures_before < threshold:
        return []
    message = f"{target}: polling succeeds again after {failures_before} failures"
    return [_draft("poll_recovered", message)]


def _first_seen(target: str, current: Any) -> EventDraft:
    message = f"{target}: first snapshot of the email provider configuration"
    return _draft("first_seen", message, tuple(diff(None, current)))


def _change_events(target: str, previous: Any, current: Any) -> list[EventDraft]:
    changes = diff(previous, current)
    delivery_paths = _delivery_paths(previous) | _delivery_paths(current)
    claimed: dict[str, list[Change]] = {}
    for change in changes:
        claimed.setdefault(_kind_of(change, delivery_paths), []).append(change)
    return [
        _change_event(target, kind, tuple(claimed[kind]))
        for kind in _CHANGE_TEXT
        if kind in claimed
    ]


def _kind_of(change: Change, delivery_paths: set[str]) -> str:
    if change.path == "enabled":
        return "provider_enabled" if change.new is True else "provider_disabled"
    if change.path == "type":
        return "type_changed"
    if change.path in delivery_paths:
        return "delivery_changed"
    if _is_fingerprint(change.old) or _is_fingerprint(change.new):
        return "secret_rotated"
    return "config_changed"


def _delivery_paths(document: Any) -> set[str]:
    kind = document.get("type") if isinstance(document, dict) else None
    sub = ACTIVE_SUBCONFIG.get(kind) if isinstance(kind, str) else None
    return {f"{sub}.{name}" for name in _DELIVERY_FIELDS} if sub else set()


def _is_fingerprint(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(FINGERPRINT_PREFIX)


# The kinds a changed field can be claimed by, in the order their events are raised, with the
# words of their message (severity and status come from the kinds table).
_CHANGE_TEXT: Final = {
    "provider_disabled": "email provider disabled",
    "provider_enabled": "email provider enabled again",
    "type_changed": "email provider type changed",
    "delivery_changed": "delivery settings changed",
    "secret_rotated": "a secret was rotated",
    "config_changed": "configuration changed",
}


def _change_event(target: str, kind: str, changes: tuple[Change, ...]) -> EventDraft:
    details = "; ".join(f"{c.path}: {_show(c.old)} -> {_show(c.new)}" for c in changes)
    message = f"{target}: {_CHANGE_TEXT[kind]}" + (f" ({details})" if details else "")
    return _draft(kind, message, changes)


def _show(value: Any) -> str:
    return "(absent)" if value is None else repr(value) if isinstance(value, str) else str(value)
