"""Canonical JSON (RFC 8785, JCS) and the snapshot hash built on it.

JCS makes the bytes independent of key order, whitespace and number spelling, so anyone can
recompute a stored hash from an exported snapshot with any JCS implementation.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import rfc8785

from monitor.errors import MonitorError

__all__ = ["HASH_PREFIX", "UnusableDocument", "canonical_json", "snapshot_hash"]

HASH_PREFIX = "sha256:"


class UnusableDocument(MonitorError, ValueError):
    """A document that parsed as JSON but has no canonical form (a lone surrogate, nesting
    too deep to walk): an unusable upstream answer, not a bug of ours."""


def canonical_json(document: Any) -> bytes:
    """The RFC 8785 serialisation of ``document``.

    JCS knows only what I-JSON can carry. An integer beyond 2**53 is hashed as the double a
    JavaScript consumer would read (the stored document keeps the integer); a non-finite
    float, which the GenAuth client already refuses, is hashed as its Python name.
    """
    try:
        try:
            return bytes(rfc8785.dumps(document))
        except (rfc8785.IntegerDomainError, rfc8785.FloatDomainError):
            return bytes(rfc8785.dumps(_to_i_json(document)))
    except (rfc8785.CanonicalizationError, RecursionError, UnicodeError) as exc:
        raise UnusableDocument(f"no canonical form ({type(exc).__name__})") from None


def _to_i_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _to_i_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_i_json(item) for item in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and abs(value) > 2**53 - 1:
        return float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def snapshot_hash(document: Any) -> str:
    """``sha256:<64 hex>`` of the canonical form of an (already redacted) document."""
    return HASH_PREFIX + hashlib.sha256(canonical_json(document)).hexdigest()
