"""Escaping of untrusted text for the terminal, text logs and JSON output.

Upstream-derived strings (event messages, change paths built from upstream key names, values,
provider types, sink answers) can hold characters that forge a log line (newline, carriage
return, U+2028), drive a terminal (ESC, the C1 CSI U+009B) or reorder what a reader sees (bidi
overrides). Every text renderer passes such strings through :func:`escape_text`; JSON output is
made with :func:`dumps_json`, which keeps the data exact but writes those characters as
``\\u`` escapes.

Unsafe are the Unicode categories Cc (C0, DEL, C1), Cf (format: bidi embeddings, overrides and
isolates, zero-width characters, tag characters, ...), Cs (lone surrogates, which cannot even
be written as UTF-8), Zl and Zp (U+2028, U+2029). The class below lists them for Unicode 14
(Python 3.11); a test checks it against :mod:`unicodedata` of the running interpreter.

A backslash is left as it is in :func:`escape_text` (so a literal ``\\x1b`` in the input reads
like an escaped ESC); :func:`field_value` and the JSON outputs are unambiguous.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

__all__ = ["dumps_json", "escape_json", "escape_text", "field_value", "shown"]

# Everything of the C0 range, then the rest (kept apart: JSON text has C0 only as whitespace
# between tokens, json.dumps already escapes it inside strings).
_C0: Final = "\x00-\x1f"
_REST: Final = (
    "\x7f-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u180e\u200b-\u200f"
    "\u2028-\u202e\u2060-\u2064\u2066-\u206f\ud800-\udfff\ufeff\ufff9-\ufffb"
    "\U000110bd\U000110cd\U00013430-\U00013438\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    "\U000e0001\U000e0020-\U000e007f"
)
_UNSAFE: Final = re.compile(f"[{_C0}{_REST}]")
_UNSAFE_IN_JSON: Final = re.compile(f"[{_REST}]")
# A log field value that needs no quoting: no space of any kind, no '=', '"' or backslash,
# nothing unsafe. Anything else is written as a JSON string.
_PLAIN: Final = re.compile(f'[^\\s="\\\\{_C0}{_REST}]+')
_NAMED: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _json_unit(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def escape_text(text: str) -> str:
    """``text`` with every unsafe character written as a visible escape (``\\n``, ``\\x1b``,
    ``\\x9b``, ``\\u202e``): one line, nothing a terminal acts on."""
    return _UNSAFE.sub(_visible, text)


def escape_json(text: str) -> str:
    """JSON text as ``json.dumps`` wrote it (any ``ensure_ascii``, any ``indent``) with every
    unsafe character outside C0 written as a ``\\u`` escape: the same data, still valid JSON."""
    return _UNSAFE_IN_JSON.sub(_json_unit, text)


def dumps_json(value: Any, **options: Any) -> str:
    """``json.dumps(value, ensure_ascii=False, **options)`` safe to print: readable non-ASCII
    text, but no control, bidi or line-separator character left raw."""
    return escape_json(json.dumps(value, ensure_ascii=False, **options))


def field_value(text: str) -> str:
    """``text`` as one ``key=value`` token of a text log or status line: as it is when it is a
    plain word, else a JSON string (so it can hold no raw space, ``=`` or quote that would
    forge another field, and no unsafe character)."""
    if _PLAIN.fullmatch(text):
        return text
    return dumps_json(text)


def shown(value: object) -> str:
    """A value quoted in a message: its ``repr`` (which escapes every unprintable character),
    shortened to 40 characters. Only for values that are never secret."""
    try:
        text = repr(value)
    except ValueError:  # an integer with more digits than int -> str converts
        return "a huge number"
    return text if len(text) <= 40 else text[:37] + "..."
