"""Removal of secrets: every secret value becomes a keyed fingerprint.

A fingerprint is ``hmac-sha256:<16 hex>`` of the value under the monitor's fingerprint key, so a
rotated secret shows up as a changed fingerprint while the secret itself is never kept. Keying the
HMAC stops anyone holding the database from testing guesses of a password offline.
"""

from __future__ import annotations

import hashlib
import hmac
from functools import lru_cache
from typing import Any, Final

from monitor.core.canonical import canonical_json

__all__ = ["FINGERPRINT_PREFIX", "SECRET_MARKERS", "fingerprint", "is_secret_key", "redact"]

FINGERPRINT_PREFIX: Final = "hmac-sha256:"
# Lower-case substrings that make a key secret wherever it appears in the document; the upstream
# names senderPass and apikey, the rest guards fields a future schema may add.
SECRET_MARKERS: Final = ("pass", "secret", "apikey", "api_key", "token", "private")


@lru_cache(maxsize=4096)
def is_secret_key(key: str) -> bool:
    """Whether a field of this name holds a secret (case-insensitive substring match)."""
    lowered = key.lower()
    return any(marker in lowered for marker in SECRET_MARKERS)


def fingerprint(key: bytes, value: Any) -> str:
    """The keyed fingerprint of one secret value (strings by their UTF-8, others by JCS)."""
    raw = value.encode("utf-8") if isinstance(value, str) else canonical_json(value)
    return FINGERPRINT_PREFIX + hmac.new(key, raw, hashlib.sha256).hexdigest()[:16]


def redact(document: Any, key: bytes) -> Any:
    """A copy of ``document`` with every secret field replaced by its fingerprint.

    A secret field holding an object or list is fingerprinted whole, so no part of it survives.
    ``None`` stays ``None``: an absent secret is not a secret.
    """
    if isinstance(document, dict):
        return {
            name: (
                fingerprint(key, value)
                if value is not None and is_secret_key(name)
                else redact(value, key)
            )
            for name, value in document.items()
        }
    if isinstance(document, list):
        return [redact(item, key) for item in document]
    return document
