"""The pure core: canonical hash, redaction, diff and drift rules."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.core import (
    Change,
    baseline_mismatches,
    diff,
    failure_events,
    fingerprint,
    is_secret_key,
    path_matches,
    recovery_events,
    redact,
    snapshot_events,
    snapshot_hash,
)

KEY = b"k" * 32

BASE: dict[str, Any] = {
    "enabled": True,
    "type": "custom",
    "smtpConfig": {
        "smtp_host": "smtp.example.com",
        "smtp_port": 465,
        "sender": "noreply@example.com",
        "senderPass": "hunter2-smtp",
        "secure": True,
    },
    "sendGridConfig": {"sender": "sg", "apikey": "SG.secret-key"},
}

json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.floats() | st.text(max_size=12)
)
json_docs = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)


def _reordered(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _reordered(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reordered(v) for v in value]
    return value


@given(st.dictionaries(st.text(max_size=8), json_docs, max_size=6))
def test_hash_independent_of_key_order(doc: dict[str, Any]) -> None:
    assert snapshot_hash(doc) == snapshot_hash(_reordered(doc))
    assert snapshot_hash(doc).startswith("sha256:") and len(snapshot_hash(doc)) == 71


def test_hash_is_the_same_in_another_process() -> None:
    doc = redact(BASE, KEY)
    code = (
        "import json,sys; from monitor.core import snapshot_hash; "
        "print(snapshot_hash(json.loads(sys.stdin.read())))"
    )
    shuffled = json.dumps(_reordered(doc), indent=3)
    out = subprocess.run(
        [sys.executable, "-c", code], input=shuffled, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == snapshot_hash(doc)


def test_hash_changes_when_content_changes() -> None:
    other = json.loads(json.dumps(BASE))
    other["smtpConfig"]["smtp_port"] = 587
    assert snapshot_hash(redact(BASE, KEY)) != snapshot_hash(redact(other, KEY))


secret_names = st.sampled_from(
    ["senderPass", "apikey", "API_KEY", "clientSecret", "accessToken", "privateKey", "PASSWORD"]
)
secret_values = st.builds(lambda s: "S3cr3t" + s, st.text(max_size=20))


@st.composite
def docs_with_secret(draw: st.DrawFn) -> tuple[Any, Any]:
    secret = draw(secret_values | st.lists(secret_values, min_size=1, max_size=3))
    doc: Any = {draw(secret_names): secret}
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.text(min_size=1, max_size=6).filter(lambda n: not is_secret_key(n)))
        doc = draw(st.sampled_from([{name: doc}, [doc], {name: doc, "x": 1}]))
    return doc, secret


@settings(max_examples=300)
@given(docs_with_secret())
def test_no_secret_survives_redaction(case: tuple[Any, Any]) -> None:
    doc, secret = case
    text = json.dumps(redact(doc, KEY), ensure_ascii=False)
    for value in secret if isinstance(secret, list) else [secret]:
        assert json.dumps(value, ensure_ascii=False)[1:-1] not in text


def test_redaction_fingerprints_and_keeps_the_rest() -> None:
    red = redact(BASE, KEY)
    assert red["smtpConfig"]["senderPass"].startswith("hmac-sha256:")
    assert len(red["smtpConfig"]["senderPass"]) == len("hmac-sha256:") + 16
    assert red["smtpConfig"]["smtp_host"] == "smtp.example.com"
    assert red["sendGridConfig"]["apikey"] == fingerprint(KEY, "SG.secret-key")
    assert fingerprint(b"other-key", "SG.secret-key") != fingerprint(KEY, "SG.secret-key")
    assert BASE["smtpConfig"]["senderPass"] == "hunter2-smtp", "input must not be mutated"


def test_diff_lists_changed_leaves() -> None:
    new = json.loads(json.dumps(BASE))
    new["smtpConfig"]["smtp_host"] = "smtp.evil.example"
    new["extra"] = {"a": 1}
    del new["sendGridConfig"]
    assert diff(BASE, new) == [
        Change("extra.a", None, 1),
        Change("sendGridConfig.apikey", "SG.secret-key", None),
        Change("sendGridConfig.sender", "sg", None),
        Change("smtpConfig.smtp_host", "smtp.example.com", "smtp.evil.example"),
    ]
    assert diff(BASE, BASE) == []
    assert diff({"a": 1}, {"a": True}) == [Change("a", 1, True)]


def _kinds(events: list[Any]) -> list[str]:
    return [e.kind for e in events]


def _changed(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = redact(BASE, KEY)
    for path, value in changes.items():
        node = doc
        parts = path.split("__")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    return doc


def test_first_snapshot_events() -> None:
    base = redact(BASE, KEY)
    assert _kinds(
        snapshot_events(target="p", previous=None, current=base, expect={}, was_drifting=False)
    ) == ["first_seen"]
    disabled = _changed(enabled=False)
    events = snapshot_events(
        target="p", previous=None, current=disabled, expect={"type": "ali"}, was_drifting=False
    )
    assert _kinds(events) == ["first_seen", "provider_disabled", "baseline_drift"]
    assert events[1].severity == "critical" and events[1].status == "firing"


def test_each_change_raises_its_kind() -> None:
    base = redact(BASE, KEY)

    def kinds(current: dict[str, Any]) -> list[str]:
        return _kinds(
            snapshot_events(
                target="p", previous=base, current=current, expect={}, was_drifting=False
            )
        )

    assert kinds(base) == []
    assert kinds(_changed(enabled=False)) == ["provider_disabled"]
    assert kinds(_changed(type="sendgrid")) == ["type_changed"]
    assert kinds(_changed(smtpConfig__smtp_host="x")) == ["delivery_changed"]
    assert kinds(_changed(smtpConfig__secure=False)) == ["delivery_changed"]
    assert kinds(_changed(smtpConfig__senderPass=fingerprint(KEY, "new"))) == ["secret_rotated"]
    assert kinds(_changed(sendGridConfig__sender="other")) == ["config_changed"]
    both = _changed(enabled=False, smtpConfig__smtp_port=25)
    events = snapshot_events(target="p", previous=base, current=both, expect={}, was_drifting=False)
    assert _kinds(events) == ["provider_disabled", "delivery_changed"]
    assert events[1].changes == (Change("smtpConfig.smtp_port", 465, 25),)
    back = snapshot_events(
        target="p", previous=_changed(enabled=False), current=base, expect={}, was_drifting=False
    )
    assert [(e.kind, e.status) for e in back] == [("provider_enabled", "resolved")]


def test_baseline_drift_fires_once_and_restores() -> None:
    base = redact(BASE, KEY)
    expect = {"enabled": True, "smtpConfig.smtp_host": "smtp.example.com"}
    assert baseline_mismatches(base, expect) == []
    moved = _changed(smtpConfig__smtp_host="smtp.evil.example")
    assert baseline_mismatches(moved, expect) == [
        Change("smtpConfig.smtp_host", "smtp.example.com", "smtp.evil.example")
    ]
    first = snapshot_events(
        target="p", previous=base, current=moved, expect=expect, was_drifting=False
    )
    assert _kinds(first) == ["delivery_changed", "baseline_drift"]
    again = snapshot_events(
        target="p",
        previous=moved,
        current=_changed(smtpConfig__smtp_host="z"),
        expect=expect,
        was_drifting=True,
    )
    assert _kinds(again) == ["delivery_changed"]
    restored = snapshot_events(
        target="p", previous=moved, current=base, expect=expect, was_drifting=True
    )
    assert _kinds(restored) == ["delivery_changed", "baseline_restored"]
    assert baseline_mismatches(base, {"enabled": 1}) != [], "a number is not a bool"
    assert baseline_mismatches(base, {"nope.deep": "x"}) == [Change("nope.deep", "x", None)]


def test_failure_and_recovery_events() -> None:
    assert failure_events(target="p", failures=2, threshold=3, reason="timeout") == []
    assert _kinds(failure_events(target="p", failures=3, threshold=3, reason="timeout")) == [
        "poll_failing"
    ]
    assert failure_events(target="p", failures=4, threshold=3, reason="timeout") == []
    assert recovery_events(target="p", failures_before=2, threshold=3) == []
    assert _kinds(recovery_events(target="p", failures_before=5, threshold=3)) == ["poll_recovered"]


def test_path_matches_wildcards() -> None:
    assert path_matches("smtpConfig.sender", ["smtpConfig.sender"])
    assert path_matches("smtpConfig.sender", ["*.sender"])
    assert path_matches("smtpConfig.sender", ["smtpConfig.*"])
    assert not path_matches("smtpConfig.sender", ["smtpConfig"])
    assert not path_matches("smtpConfig.smtp_host", ["*.sender"])


@given(json_docs)
def test_same_document_is_equality_with_types(doc: Any) -> None:
    import copy

    from monitor.core import same_document

    try:
        json.dumps(doc, allow_nan=False)
    except ValueError:
        return  # NaN is equal to nothing; the GenAuth client refuses it anyway
    assert same_document(doc, copy.deepcopy(doc))
    assert not same_document({"a": 1}, {"a": True})
    assert not same_document([0], [False])
    assert not same_document({"a": 1}, {"a": 1, "b": None})
