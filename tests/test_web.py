"""The web view /ui through the real server, on SQLite and PostgreSQL: every page, its login,
escaping of upstream text, and that no secret reaches a page."""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from fastapi import FastAPI
from sqlalchemy import update

from monitor.app import Runtime, build_runtime
from monitor.http_server import HttpServer
from monitor.simulator import DEFAULT_DATA, SimulatedGenAuth
from monitor.storage.chain import ChainReport
from monitor.storage.schema import events
from monitor.web import CONTENT_SECURITY_POLICY, COOKIE, Sessions
from monitor.web.verify import ChainCheck
from tests.conftest import FakeClock
from tests.helpers import change_and_poll, runtime_settings, serve_app

TOKEN = "Ui-Test-Token-77"
SECRET = "Ui-Access-Secret-78"
HOSTILE = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
HOSTILE_TYPE = "<img src=x onerror=alert(2)>\u202e"  # and a bidi override
ROTATED = "Rotated-Smtp-Passw0rd-79"
SECRETS = [
    TOKEN,
    SECRET,
    ROTATED,
    DEFAULT_DATA["smtpConfig"]["senderPass"],
    DEFAULT_DATA["sendGridConfig"]["apikey"],
    DEFAULT_DATA["aliExmailConfig"]["senderPass"],
    DEFAULT_DATA["tencentExmailConfig"]["senderPass"],
]


@dataclass
class Web:
    base: str
    app: FastAPI
    runtime: Runtime
    sim: SimulatedGenAuth
    clock: FakeClock

    def get(self, path: str, *, cookie: str | None = None, **kwargs: Any) -> requests.Response:
        cookies = {COOKIE: cookie} if cookie is not None else None
        kwargs.setdefault("allow_redirects", False)
        return requests.get(self.base + path, cookies=cookies, timeout=10, **kwargs)

    def post(self, path: str, *, cookie: str | None = None, **kwargs: Any) -> requests.Response:
        cookies = {COOKIE: cookie} if cookie is not None else None
        kwargs.setdefault("allow_redirects", False)
        return requests.post(self.base + path, cookies=cookies, timeout=10, **kwargs)

    def login(self, token: str = TOKEN, **form: str) -> requests.Response:
        return self.post("/ui/login", data={"token": token, **form})

    def cookie(self) -> str:
        answer = self.login()
        assert answer.status_code == 303, answer.text
        return str(answer.cookies[COOKIE])

    def poll_with(self, **fields: Any) -> Any:
        return change_and_poll(self.runtime, self.sim, self.clock, **fields)


def _serve(runtime: Runtime, clock: FakeClock, token: str | None) -> tuple[FastAPI, HttpServer]:
    served: tuple[FastAPI, HttpServer] = serve_app(runtime, clock, token)
    return served


@pytest.fixture
def web(db_url: str, tmp_path: Path, clock: FakeClock) -> Iterator[Web]:
    with SimulatedGenAuth(access_key_secret=SECRET) as sim:
        runtime = build_runtime(runtime_settings(db_url, sim, tmp_path), clock=clock)
        app, server = _serve(runtime, clock, TOKEN)
        try:
            yield Web(f"http://127.0.0.1:{server.port}", app, runtime, sim, clock)
        finally:
            server.stop()
            runtime.store.engine.dispose()


def _hrefs(html: str, css_class: str) -> list[str]:
    found = re.findall(rf'<a[^>]*class="{css_class}"[^>]*href="([^"]*)"', html)
    return [href.replace("&amp;", "&") for href in found]


def _kinds(html: str) -> list[str]:
    """The kinds of the events a page lists (the badges, not the filter's options)."""
    return re.findall(r'<span class="kind [^"]*">([a-z_]+)</span>', html)


def _assert_hardened(answer: requests.Response) -> None:
    assert answer.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert answer.headers["Referrer-Policy"] == "no-referrer"


def test_every_page_shows_the_history_escaped_and_no_secret(web: Web) -> None:
    first = web.poll_with()
    hostile = web.poll_with(smtpConfig__smtp_host=HOSTILE)
    rotated = web.poll_with(smtpConfig__senderPass=ROTATED)
    bidi = web.poll_with(smtpConfig__sender="mallory\u202e@example.com")
    typed = web.poll_with(type=HOSTILE_TYPE)
    cookie = web.cookie()
    web.app.state.ui.check.start()
    assert web.app.state.ui.check.wait(30)

    pages = {
        "/ui/": ["prod", "Latest events", "&lt;img src=x onerror=alert(2)&gt;\\u202e"],
        "/ui/targets/prod": ["prod", ESCAPED],
        "/ui/targets/prod?kind=delivery_changed&since=&until=": ["prod"],
        f"/ui/snapshots/{hostile.hash}": [hostile.hash, ESCAPED, "hmac-sha256:", "rfc8785"],
        f"/ui/snapshots/{rotated.hash}": [rotated.hash, "hmac-sha256:"],
        "/ui/targets/prod/diff": ["prod", first.hash[7:19]],
        f"/ui/targets/prod/diff?from={first.hash}&to={hostile.hash}": [
            "smtpConfig.smtp_host",
            ESCAPED,
            'class="changed"',
        ],
        f"/ui/targets/prod/diff?from={hostile.hash}&to={rotated.hash}": [
            "smtpConfig.senderPass",
            "hmac-sha256:",
        ],
        f"/ui/targets/prod/at?time={web.clock.now:%Y-%m-%dT%H:%M:%SZ}": [typed.hash, "&lt;img"],
        "/ui/verify": ["Intact", "rows checked", "chain_seq"],
        "/ui/login": ["API token"],
    }
    for path, expected in pages.items():
        answer = web.get(path, cookie=cookie)
        assert answer.status_code == 200, (path, answer.status_code, answer.text[:500])
        assert answer.headers["content-type"].startswith("text/html"), path
        _assert_hardened(answer)
        assert answer.headers["Cache-Control"] == "no-store", path
        page = answer.text
        for text in expected:
            assert text in page, (path, text)
        assert HOSTILE not in page and "<img src=x" not in page, path
        assert "\u202e" not in page, path  # shown as the escape \u202e
        for secret in SECRETS:
            assert secret not in page, (path, secret)
    timeline = web.get("/ui/targets/prod", cookie=cookie).text
    assert _kinds(timeline) == [
        "type_changed",
        "delivery_changed",
        "secret_rotated",
        "delivery_changed",
        "first_seen",
    ]
    assert "mallory\\u202e@example.com" in timeline
    assert bidi.hash[7:19] in timeline
    assert _kinds(web.get("/ui/", cookie=cookie).text)[:2] == ["type_changed", "delivery_changed"]
    filtered = web.get("/ui/targets/prod?kind=delivery_changed&kind=first_seen", cookie=cookie)
    assert _kinds(filtered.text) == ["delivery_changed", "delivery_changed", "first_seen"]

    download = web.get(f"/ui/diff.json?from={first.hash}&to={hostile.hash}", cookie=cookie)
    assert download.status_code == 200
    assert download.headers["content-disposition"].startswith("attachment;")
    assert download.json()["changes"] == [
        {"path": "smtpConfig.smtp_host", "old": "smtp.example.com", "new": HOSTILE}
    ]
    assert not [s for s in SECRETS if s in download.text]

    style = web.get("/ui/static/style.css")  # the login page needs it before any login
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
    assert web.get("/ui/static/ui.js").headers["content-type"].startswith("text/javascript")


def test_without_a_cookie_every_page_sends_to_the_login_form(web: Web) -> None:
    snapshot = web.poll_with()
    for path in [
        "/ui/",
        "/ui/targets/prod",
        f"/ui/snapshots/{snapshot.hash}",
        "/ui/targets/prod/diff",
        f"/ui/diff.json?from={snapshot.hash}&to={snapshot.hash}",
        "/ui/targets/prod/at?time=1h",
        "/ui/verify",
        "/ui/no-such-page",
    ]:
        answer = web.get(path)
        assert answer.status_code == 303, path
        assert answer.headers["location"].startswith("/ui/login?next=%2Fui%2F"), path
        assert snapshot.hash not in answer.text and "prod" not in answer.text.replace(
            "/ui/targets/prod", ""
        )
        _assert_hardened(answer)
    started = web.post("/ui/verify")
    assert started.status_code == 303 and started.headers["location"] == "/ui/login"
    assert web.app.state.ui.check.state().last is None, "no check without a login"


def test_login_sets_a_strict_http_only_cookie_and_goes_where_it_was_asked(web: Web) -> None:
    answer = web.login(next="/ui/targets/prod?kind=first_seen")
    assert answer.status_code == 303
    assert answer.headers["location"] == "/ui/targets/prod?kind=first_seen"
    header = answer.headers["set-cookie"]
    assert header.startswith(f"{COOKIE}=v1.")
    attributes = {part.strip().lower() for part in header.split(";")[1:]}
    assert {"httponly", "path=/ui", "samesite=strict", "max-age=28800"} <= attributes
    assert "secure" not in attributes, "plain http: a Secure cookie would never come back"
    assert TOKEN not in header
    behind_tls = web.post(
        "/ui/login", data={"token": TOKEN}, headers={"X-Forwarded-Proto": "https"}
    )
    assert "secure" in {p.strip().lower() for p in behind_tls.headers["set-cookie"].split(";")}

    for bad_next in ["//evil.example/ui/", "https://evil.example/", "/\\evil.example", "/api/v1"]:
        assert web.login(next=bad_next).headers["location"] == "/ui/", bad_next

    wrong = web.login(token="not-the-token")
    assert wrong.status_code == 401 and "not the API token" in wrong.text
    assert "set-cookie" not in wrong.headers and "not-the-token" not in wrong.text
    assert web.post("/ui/login", data="token=" + "x" * 5000).status_code in (400, 413)
    assert web.post("/ui/login", json={"token": TOKEN}).status_code == 400

    out = web.post("/ui/logout", cookie=web.cookie())
    assert out.status_code == 303 and out.headers["location"] == "/ui/login"
    assert re.search(rf'{COOKIE}="?"?; .*Max-Age=0', out.headers["set-cookie"], re.I)


def _signed(issued: int, token: str = TOKEN) -> str:
    key = hmac.new(token.encode(), b"genauth-monitor ui session", hashlib.sha256).digest()
    body = f"v1.{issued}"
    return f"{body}.{hmac.new(key, body.encode(), hashlib.sha256).hexdigest()}"


def test_forged_tampered_and_expired_cookies_are_refused(web: Web) -> None:
    web.poll_with()
    cookie = web.cookie()
    now = int(web.clock.now.timestamp())
    assert cookie == _signed(now), "the documented format: v1.<issued>.<HMAC>"
    assert web.get("/ui/", cookie=cookie).status_code == 200
    issued, mac = cookie.split(".")[1:]
    refused = {
        "signed with another token": _signed(now, "another-token"),
        "issue time moved on": f"v1.{int(issued) + 3600}.{mac}",
        "mac changed": f"v1.{issued}.{mac[:-1]}{'0' if mac[-1] != '0' else '1'}",
        "no mac": f"v1.{issued}",
        "other version": f"v2.{issued}.{mac}",
        "from the future": _signed(now + 3600),
        "garbage": "garbage",
        "the token itself": TOKEN,
        "very long": cookie + "0" * 500,
    }
    for what, value in refused.items():
        answer = web.get("/ui/", cookie=value)
        assert answer.status_code == 303, what
        assert answer.headers["location"].startswith("/ui/login"), what
    # A restarted daemon or another replica with the same token accepts it.
    other = Sessions(TOKEN, lifetime=8 * 3600, clock=web.clock)
    assert other.valid(cookie) and not Sessions("x", lifetime=60, clock=web.clock).valid(cookie)
    # Expiry is the server's: ui_session (8h by default) after the issue time.
    web.clock.advance(8 * 3600 - 1)
    assert web.get("/ui/", cookie=cookie).status_code == 200
    web.clock.advance(1)
    assert web.get("/ui/", cookie=cookie).status_code == 303


def test_the_bearer_header_works_and_a_wrong_one_is_401(web: Web) -> None:
    web.poll_with()
    answer = web.get("/ui/targets/prod", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200 and _kinds(answer.text) == ["first_seen"]
    for header in ["Bearer nope", "Basic " + TOKEN, "Bearer"]:
        wrong = web.get("/ui/", headers={"Authorization": header}, cookie=web.cookie())
        assert wrong.status_code == 401, header
        assert wrong.headers["WWW-Authenticate"] == "Bearer"
        assert TOKEN not in wrong.text and "prod" not in wrong.text
        _assert_hardened(wrong)


def test_without_a_configured_token_the_web_view_is_closed(web: Web) -> None:
    _, server = _serve(web.runtime, web.clock, None)
    try:
        base = f"http://127.0.0.1:{server.port}"
        for answer in [
            requests.get(base + "/ui/", timeout=5, allow_redirects=False),
            requests.get(base + "/ui/login", timeout=5),
            requests.post(base + "/ui/login", data={"token": ""}, timeout=5),
            requests.get(base + "/ui/", headers={"Authorization": "Bearer "}, timeout=5),
        ]:
            assert answer.status_code == 503
            assert "api_token_env" in answer.text
            assert "set-cookie" not in answer.headers
    finally:
        server.stop()


def test_problems_are_pages_naming_the_parameter(web: Web) -> None:
    web.poll_with()
    cookie = web.cookie()
    for path, status, text in [
        ("/ui/targets/prod?since=last+tuesday", 400, "bad parameter since"),
        ("/ui/targets/prod?kind=bogus", 400, "bad parameter kind"),
        ("/ui/targets/prod?cursor=garbage!", 400, "bad parameter cursor"),
        ("/ui/targets/nope", 404, "unknown target"),
        ("/ui/targets/nope/diff", 404, "unknown target"),
        ("/ui/targets/nope/at?time=1h", 404, "unknown target"),
        ("/ui/snapshots/sha256:" + "0" * 64, 404, "unknown snapshot"),
        ("/ui/targets/prod/diff?from=abcdef0&to=1", 404, "unknown snapshot"),
        ("/ui/targets/prod/at?time=2000-01-01T00:00:00Z", 404, "not observed yet"),
        ("/ui/targets/prod/at?time=soon", 400, "bad parameter time"),
        ("/ui/diff.json?from=1", 400, "bad parameter to"),
        ("/ui/static/../config.py", 404, ""),
        ("/ui/no-such-page", 404, "no page"),
    ]:
        answer = web.get(path, cookie=cookie)
        assert answer.status_code == status, (path, answer.text[:300])
        assert answer.headers["content-type"].startswith("text/html"), path
        assert text in answer.text, path
        _assert_hardened(answer)


def test_timeline_pages_and_the_diff_steps(web: Web) -> None:
    web.poll_with()
    for port in range(1, 4):
        web.poll_with(smtpConfig__smtp_port=port)
    cookie = web.cookie()
    listed = web.get("/ui/targets/prod/diff", cookie=cookie).text
    options = [int(v) for v in re.findall(r'<option value="(\d+)"', listed)]
    ids = sorted(set(options))  # the rows, oldest first
    assert len(ids) == 4

    def steps(a: int, b: int) -> tuple[list[str], list[str], str]:
        page = web.get(f"/ui/targets/prod/diff?from={a}&to={b}", cookie=cookie).text
        return _hrefs(page, "previous-change"), _hrefs(page, "next-change"), page

    previous, following, page = steps(ids[1], ids[2])
    assert previous == [f"/ui/targets/prod/diff?from={ids[0]}&to={ids[1]}"]
    assert following == [f"/ui/targets/prod/diff?from={ids[2]}&to={ids[3]}"]
    assert '<tr class="changed" data-path="smtpConfig.smtp_port">' in page
    assert f'<option value="{ids[1]}" selected>' in page, "the pickers show the choice"
    assert steps(ids[0], ids[1])[0] == [], "nothing before the first snapshot"
    assert steps(ids[2], ids[3])[1] == [], "nothing after the newest"
    previous, following, _ = steps(ids[3], ids[0])  # reversed pickers: the same range
    assert (previous, following) == ([], [])

    # Paging: 50 events a page, the next page by cursor, and back to the newest.
    for port in range(10, 60):
        web.poll_with(smtpConfig__smtp_port=port)
    first_page = web.get("/ui/targets/prod", cookie=cookie).text
    [older] = re.findall(r'<a rel="next" href="([^"]*)"', first_page)
    second_page = web.get(older.replace("&amp;", "&"), cookie=cookie).text
    assert first_page.count('<tr class="sev-') == 50
    assert second_page.count('<tr class="sev-') == 4  # 54 events in all
    assert _kinds(second_page)[-1] == "first_seen" and "first_seen" not in _kinds(first_page)
    assert "← newest" in second_page


def test_at_a_time_reads_a_zoneless_field_as_utc(web: Web) -> None:
    first = web.poll_with()
    moved = web.poll_with(smtpConfig__smtp_host="smtp.moved.example")
    cookie = web.cookie()
    at_first = web.clock.now - timedelta(seconds=30)
    local = at_first.strftime("%Y-%m-%dT%H:%M:%S")  # what <input type=datetime-local> sends
    page = web.get(f"/ui/targets/prod/at?time={local}", cookie=cookie).text
    assert first.hash in page and moved.hash not in page
    assert f'value="{local}"' in page, "the field keeps its value"
    page = web.get("/ui/targets/prod/at?time=0s", cookie=cookie).text
    assert moved.hash in page
    form = web.get("/ui/targets/prod/at", cookie=cookie)
    assert form.status_code == 200 and 'type="datetime-local"' in form.text


def test_verify_runs_on_demand_one_at_a_time_and_keeps_its_result(web: Web) -> None:
    web.poll_with()
    web.poll_with(smtpConfig__smtp_port=26)
    cookie = web.cookie()
    check = web.app.state.ui.check
    page = web.get("/ui/verify", cookie=cookie).text
    assert "Not checked since the daemon started" in page
    head = web.runtime.queries.chain_head()
    assert f">{head.seq}<" in page and head.hash in page

    assert web.post("/ui/verify", cookie=cookie).headers["location"] == "/ui/verify"
    assert check.wait(30)
    first = check.state().last
    assert first is not None and first.report is not None and first.report.intact
    assert first.report.rows == head.seq
    page = web.get("/ui/verify", cookie=cookie).text
    assert "Intact" in page and "one check a minute" in page and " disabled" in page

    with web.runtime.store.engine.begin() as connection:
        connection.execute(update(events).values(message="edited"))
    web.post("/ui/verify", cookie=cookie)  # within the minute: nothing runs
    assert check.wait(30) and check.state().last is first
    web.clock.advance(61)
    web.post("/ui/verify", cookie=cookie)
    assert check.wait(30)
    page = web.get("/ui/verify", cookie=cookie).text
    assert "BROKEN after" in page and "content does not match" in page


def test_a_chain_check_never_runs_twice_at_once(clock: FakeClock) -> None:
    release, calls = threading.Event(), []

    def slow_verify() -> ChainReport:
        calls.append(1)
        release.wait(10)
        return ChainReport(True, 3, "ab" * 32)

    check = ChainCheck(slow_verify, clock=clock, min_interval=60)
    assert check.start()
    assert not check.start(), "one runs"
    assert check.state().running_since == clock.now
    release.set()
    assert check.wait(10)
    clock.advance(30)
    assert not check.start(), "too soon after the last"
    clock.advance(31)
    assert check.start() and check.wait(10)
    assert len(calls) == 2


def test_the_ui_is_not_in_the_openapi_schema(web: Web) -> None:
    schema = requests.get(web.base + "/openapi.json", timeout=5).json()
    assert not [path for path in schema["paths"] if path.startswith("/ui")]
