"""The pure core: canonical form, redaction, hashing, diffing, the kinds table and the rules.

Nothing in this package performs I/O or imports an adapter; every function takes its inputs as
arguments (including keys and times) so it can be tested exhaustively.
"""

from __future__ import annotations

from monitor.core.canonical import canonical_json, snapshot_hash
from monitor.core.diff import Change, diff, flatten, get_path, same_document
from monitor.core.escape import dumps_json, escape_json, escape_text, field_value
from monitor.core.kinds import EVENT_KINDS, KINDS, EventKind, kind_of
from monitor.core.redact import FINGERPRINT_PREFIX, fingerprint, is_secret_key, redact
from monitor.core.rules import (
    EventDraft,
    baseline_events,
    baseline_mismatches,
    failure_events,
    path_matches,
    recovery_events,
    snapshot_events,
)

__all__ = [
    "EVENT_KINDS",
    "FINGERPRINT_PREFIX",
    "KINDS",
    "Change",
    "EventDraft",
    "EventKind",
    "baseline_events",
    "baseline_mismatches",
    "canonical_json",
    "diff",
    "dumps_json",
    "escape_json",
    "escape_text",
    "failure_events",
    "field_value",
    "fingerprint",
    "flatten",
    "get_path",
    "is_secret_key",
    "kind_of",
    "path_matches",
    "recovery_events",
    "redact",
    "same_document",
    "snapshot_events",
    "snapshot_hash",
]
