"""The read-only HTTP API over a real HTTP connection, on SQLite and PostgreSQL."""

from __future__ import annotations

import gzip
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from monitor.api import create_app
from monitor.app import Runtime, build_runtime
from monitor.exposition import LEAD, Exposition
from monitor.http_server import HttpServer
from monitor.simulator import SimulatedGenAuth
from tests.conftest import FakeClock
from tests.helpers import change_and_poll, runtime_settings, serve_app

TOKEN = "Api-Test-Token-42"
SECRET = "Api-Access-Secret-43"


@dataclass
class Api:
    base: str
    runtime: Runtime
    sim: SimulatedGenAuth
    clock: FakeClock

    def get(self, path: str, token: str | None = TOKEN, **params: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.get(self.base + path, params=params, headers=headers, timeout=5)

    def poll_with(self, **fields: Any) -> Any:
        return change_and_poll(self.runtime, self.sim, self.clock, **fields)


def _serve(runtime: Runtime, clock: FakeClock, token: str | None) -> HttpServer:
    server: HttpServer = serve_app(runtime, clock, token)[1]
    return server


@pytest.fixture
def api(db_url: str, tmp_path: Path, clock: FakeClock) -> Iterator[Api]:
    with SimulatedGenAuth(access_key_secret=SECRET) as sim:
        settings = runtime_settings(db_url, sim, tmp_path)
        runtime = build_runtime(settings, clock=clock)
        server = _serve(runtime, clock, TOKEN)
        try:
            yield Api(f"http://127.0.0.1:{server.port}", runtime, sim, clock)
        finally:
            server.stop()
            runtime.store.engine.dispose()


def test_token_is_required_and_compared(api: Api) -> None:
    assert api.get("/api/v1/targets", token=None).status_code == 401
    wrong = api.get("/api/v1/targets", token="nope")
    assert wrong.status_code == 401 and "Api-Test" not in wrong.text
    assert api.get("/api/v1/targets").status_code == 200
    assert api.get("/metrics", token=None).status_code == 200
    assert api.get("/healthz", token=None).status_code == 200
    assert api.get("/readyz", token=None).status_code == 200


def test_without_configured_token_the_api_is_closed(api: Api) -> None:
    server = _serve(api.runtime, api.clock, None)
    try:
        answer = requests.get(f"http://127.0.0.1:{server.port}/api/v1/targets", timeout=5)
        assert answer.status_code == 503
        assert "api_token_env" in answer.json()["error"]
    finally:
        server.stop()


def test_targets_snapshots_show_at_and_diff(api: Api) -> None:
    first = api.poll_with()
    t_first = api.clock.now
    moved = api.poll_with(smtpConfig__smtp_host="smtp.other.example")
    t_moved = api.clock.now

    [target] = api.get("/api/v1/targets").json()["targets"]
    assert target["name"] == "prod" and target["hash"] == moved.hash
    assert target["enabled"] is True and target["up"] is True

    snaps = api.get("/api/v1/targets/prod/snapshots").json()["snapshots"]
    assert [s["hash"] for s in snaps] == [moved.hash, first.hash]

    shown = api.get(f"/api/v1/snapshots/{first.hash}").json()
    assert shown["document"]["smtpConfig"]["senderPass"].startswith("hmac-sha256:")
    assert api.get("/api/v1/snapshots/sha256:" + "0" * 64).status_code == 404
    assert api.get("/api/v1/snapshots/\u00b2").status_code == 404, "a digit, but not 0-9"

    before = api.get("/api/v1/targets/prod/at", time="2000-01-01T00:00:00Z")
    assert before.status_code == 404
    at_first = api.get("/api/v1/targets/prod/at", time=t_first.isoformat()).json()
    assert at_first["hash"] == first.hash
    between = (t_first + (t_moved - t_first) / 2).isoformat()
    assert api.get("/api/v1/targets/prod/at", time=between).json()["hash"] == first.hash
    assert api.get("/api/v1/targets/prod/at", time=t_moved.isoformat()).json()["hash"] == (
        moved.hash
    )
    assert api.get("/api/v1/targets/nope/at", time="1h").status_code == 404

    diffed = api.get("/api/v1/diff", **{"from": first.hash, "to": moved.hash}).json()
    assert [c["path"] for c in diffed["changes"]] == ["smtpConfig.smtp_host"]


def test_bad_parameters_are_named(api: Api) -> None:
    api.poll_with()
    for path, params, name in [
        ("/api/v1/events", {"limit": "0"}, "limit"),
        ("/api/v1/events", {"limit": "501"}, "limit"),
        ("/api/v1/events", {"since": "last tuesday"}, "since"),
        ("/api/v1/events", {"since": "99999999999999d"}, "since"),
        ("/api/v1/events", {"severity": "loud"}, "severity"),
        ("/api/v1/events", {"cursor": "garbage!"}, "cursor"),
        ("/api/v1/targets/prod/at", {}, "time"),
        ("/api/v1/targets/prod/snapshots", {"until": "2026-13-01"}, "until"),
        ("/api/v1/events", {"kind": "first_seen,bogus\x00"}, "kind"),
    ]:
        answer = api.get(path, **params)
        assert answer.status_code == 400, (path, params, answer.text)
        assert name in answer.json()["error"], answer.text
    assert api.get("/api/v1/events", target="nope").status_code == 404
    assert api.get("/api/v1/events", target="pr\x00od").status_code == 404
    assert api.get("/api/v1/targets/nope/snapshots").status_code == 404


def test_ages_are_durations(api: Api) -> None:
    """``since`` and ``until`` read ages in the config's duration grammar, as the CLI does."""
    api.poll_with()
    api.clock.advance(3600)  # the event is an hour old

    def kinds(**params: str) -> list[str]:
        answer = api.get("/api/v1/events", **params)
        assert answer.status_code == 200, answer.text
        return [event["kind"] for event in answer.json()["events"]]

    assert kinds(since="1h30m") == ["first_seen"]
    assert kinds(since="1w", until="30m") == ["first_seen"]
    assert kinds(since="59m") == []
    assert kinds(until="1h30m") == []
    snapshots = api.get("/api/v1/targets/prod/snapshots", since="1h30m").json()["snapshots"]
    assert len(snapshots) == 1
    api.clock.advance(6 * 86400 + 11 * 3600)  # six and a half days old
    assert kinds(since="1w") == ["first_seen"]
    assert kinds(since="6d") == []


def test_event_pagination_is_stable_while_events_arrive(api: Api) -> None:
    api.poll_with()
    for port in range(1, 8):
        api.poll_with(smtpConfig__smtp_port=port)
    seen: list[str] = []
    times: list[str] = []
    page = api.get("/api/v1/events", limit=3).json()
    seen += [e["id"] for e in page["events"]]
    times += [e["at"] for e in page["events"]]
    api.poll_with(smtpConfig__smtp_port=999)  # a new event between pages
    while page["next_cursor"]:
        page = api.get("/api/v1/events", limit=3, cursor=page["next_cursor"]).json()
        seen += [e["id"] for e in page["events"]]
        times += [e["at"] for e in page["events"]]
    assert len(seen) == 8 and len(set(seen)) == 8, "no row twice, none skipped"
    assert all(isinstance(i, str) and str(uuid.UUID(i)) == i for i in seen), seen
    # Newest first: every poll is a minute after the one before, so the times are distinct.
    assert times == sorted(times, reverse=True) and len(set(times)) == 8
    newest = api.get("/api/v1/events", limit=1).json()["events"][0]
    assert newest["id"] not in seen and newest["changes"][0]["new"] == 999

    kinds = api.get("/api/v1/events", kind="first_seen").json()["events"]
    assert [e["kind"] for e in kinds] == ["first_seen"]
    assert api.get("/api/v1/events", severity="critical").json()["events"] == []
    future = api.get("/api/v1/events", since="2999-01-01T00:00:00Z").json()["events"]
    assert future == []


def test_openapi_schema_lists_the_endpoints(api: Api) -> None:
    schema = api.get("/openapi.json", token=None).json()
    for path in [
        "/api/v1/targets",
        "/api/v1/targets/{name}/snapshots",
        "/api/v1/snapshots/{hash}",
        "/api/v1/targets/{name}/at",
        "/api/v1/events",
        "/api/v1/diff",
        "/healthz",
        "/readyz",
        "/metrics",
    ]:
        assert path in schema["paths"], path


def test_openapi_schema_is_valid_declares_the_bearer_the_400_and_the_enums(api: Api) -> None:
    from openapi_spec_validator import validate

    from monitor.core.kinds import EVENT_KINDS, SEVERITIES

    schema = api.get("/openapi.json", token=None).json()
    validate(schema)
    assert schema["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["bearer"]["description"],
    }
    operations = [
        (path, operation)
        for path, methods in schema["paths"].items()
        for operation in methods.values()
    ]
    assert not [path for path, _ in operations if path.startswith("/ui")], "the UI is not API"
    for path, operation in operations:
        responses = operation["responses"]
        assert "422" not in responses, path
        if path.startswith("/api/v1/"):
            assert operation["security"] == [{"bearer": []}], path
            assert {"401", "503"} <= responses.keys(), path
            if operation.get("parameters"):
                error = responses["400"]["content"]["application/json"]["schema"]
                assert error == {"$ref": "#/components/schemas/ErrorOut"}, path
        else:
            assert "security" not in operation, path
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    event = schema["components"]["schemas"]["EventOut"]["properties"]
    assert event["kind"]["enum"] == list(EVENT_KINDS)
    assert event["severity"]["enum"] == list(SEVERITIES)
    assert event["status"]["enum"] == ["firing", "resolved"]
    parameters = {
        p["name"]: p["schema"] for p in schema["paths"]["/api/v1/events"]["get"]["parameters"]
    }
    [kinds, _] = parameters["kind"]["anyOf"]
    assert kinds["items"]["enum"] == list(EVENT_KINDS)
    [severity, _] = parameters["severity"]["anyOf"]
    assert severity["enum"] == list(SEVERITIES)
    # The 400 the schema promises is the one sent, also for what FastAPI itself refuses.
    answer = api.get("/api/v1/events", limit="many")
    assert answer.status_code == 400 and set(answer.json()) == {"error"}, answer.text
    assert "limit" in answer.json()["error"]


def test_kinds_are_repeated_or_comma_separated(api: Api) -> None:
    api.poll_with()
    api.poll_with(smtpConfig__smtp_port=26)
    both = ["first_seen", "delivery_changed"]
    repeated = requests.get(
        api.base + "/api/v1/events",
        params=[("kind", k) for k in both],
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=5,
    ).json()["events"]
    commas = api.get("/api/v1/events", kind=",".join(both)).json()["events"]
    assert sorted(e["kind"] for e in repeated) == sorted(both)
    assert [e["id"] for e in commas] == [e["id"] for e in repeated]


def test_an_ambiguous_hash_prefix_is_refused(api: Api) -> None:
    from sqlalchemy import insert

    from monitor.storage.schema import snapshots

    api.poll_with()  # creates target 1, prod
    with api.runtime.store.engine.begin() as connection:
        for tail in ("1", "2"):
            connection.execute(
                insert(snapshots).values(
                    target_id=1,
                    hash="sha256:abcdef" + tail * 58,
                    document="{}",
                    enabled=True,
                    provider_type=None,
                    drift=False,
                    first_seen_at=api.clock.now,
                    last_seen_at=api.clock.now,
                    seen_count=1,
                )
            )
    answer = api.get("/api/v1/snapshots/abcdef")
    assert answer.status_code == 400 and "several" in answer.json()["error"]
    assert api.get("/api/v1/snapshots/abcdef1").status_code == 200


def test_metrics_require_the_token_when_configured(tmp_path: Path) -> None:
    """``metrics_require_token = true`` closes /metrics in the real daemon; health stays open."""
    from monitor.app import Daemon
    from monitor.config import parse_settings
    from tests.helpers import free_port

    with SimulatedGenAuth(access_key_secret=SECRET) as sim:
        settings = parse_settings(
            {
                "monitor": {"fingerprint_key_env": "FP"},
                "storage": {"url": f"sqlite:///{tmp_path / 'm.db'}"},
                "server": {
                    "listen": f"127.0.0.1:{free_port()}",
                    "api_token_env": "TOKEN",
                    "metrics_require_token": True,
                },
                "targets": [
                    {
                        "name": "prod",
                        "base_url": sim.base_url,
                        "access_key_id": sim.access_key_id,
                        "access_key_secret_env": "SECRET",
                    }
                ],
            },
            base_dir=tmp_path,
            environ={"FP": "k", "SECRET": SECRET, "TOKEN": TOKEN},
        )
        daemon = Daemon(settings)
        daemon.start()
        try:
            base = f"http://127.0.0.1:{daemon.http.port}"

            def get(path: str, token: str | None) -> requests.Response:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                return requests.get(base + path, headers=headers, timeout=5)

            assert get("/metrics", None).status_code == 401
            assert get("/metrics", "nope").status_code == 401
            answer = get("/metrics", TOKEN)
            assert answer.status_code == 200 and "genauth_monitor_up" in answer.text
            assert get("/healthz", None).status_code == 200
        finally:
            daemon.stop()


def test_keep_alive_requests_are_not_held_back_by_nagle() -> None:
    """Every answer after the first on a kept-alive connection used to wait ~40 ms (Nagle
    against the client's delayed ACK); they must come at once."""
    import socket
    import statistics
    import time

    from prometheus_client import CollectorRegistry
    from sqlalchemy import create_engine

    from monitor.http_server import HttpServer
    from monitor.storage import Queries
    from monitor.timeutil import utc_now

    app = create_app(
        registry=CollectorRegistry(),
        queries=Queries(create_engine("sqlite://")),
        ready=lambda: (True, {}),
        api_token=None,
        clock=utc_now,
    )
    server = HttpServer(app, host="127.0.0.1", port=0)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
            took = []
            for _ in range(15):
                started = time.perf_counter()
                conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
                answer = b""
                while not answer.endswith(b"ok\n"):
                    answer += conn.recv(4096)
                took.append(time.perf_counter() - started)
        assert statistics.median(took[1:]) < 0.02, took
    finally:
        server.stop()


def _numbered_renders(start: float) -> tuple[Exposition, list[bytes], list[float]]:
    """An exposition whose renders say their number, on a clock the test moves."""
    renders: list[bytes] = []
    now = [start]

    def render() -> bytes:
        renders.append(f"render {len(renders)}\n".encode())
        return renders[-1]

    return Exposition(render, clock=lambda: now[0]), renders, now


def test_metrics_render_once_a_second_whatever_the_scrapers_and_keep_what_was_asked() -> None:
    cache, renders, now = _numbered_renders(100.0)
    assert cache.get(gzipped=True) == gzip.compress(renders[0], compresslevel=1)
    now[0] += 0.5
    assert gzip.decompress(cache.get(gzipped=True)) == b"render 0\n", "one render a second"
    assert len(renders) == 1
    assert cache.get(gzipped=False) == b"render 1\n", "the plain text was not kept beside gzip"
    assert cache.get(gzipped=False) == b"render 1\n" and len(renders) == 2
    now[0] += 0.6  # past a second since the first render
    assert cache.get(gzipped=False) == b"render 2\n"
    assert gzip.decompress(cache.get(gzipped=True)) == b"render 2\n", "compressed from it"
    assert len(renders) == 3


def test_metrics_are_rendered_ahead_of_each_expected_scrape_once() -> None:
    cache, renders, now = _numbered_renders(1000.0)
    assert cache.ahead_in() is None, "no scraper seen yet"
    cache.get(gzipped=True, scraper="10.0.0.1")
    now[0] += 15
    cache.get(gzipped=True, scraper="10.0.0.1")  # its period: 15 s
    assert len(renders) == 2
    assert cache.ahead_in() == pytest.approx(15 - LEAD)
    now[0] += 10
    assert not cache.render_ahead(), "not due yet"
    now[0] += 15 - LEAD - 10
    assert cache.render_ahead() and len(renders) == 3, "rendered a moment before the scrape"
    assert cache.ahead_in() is None and not cache.render_ahead(), "once per expected scrape"
    now[0] += LEAD + 0.1  # the scrape, a little late: what was made ahead is served
    assert gzip.decompress(cache.get(gzipped=True, scraper="10.0.0.1")) == b"render 2\n"
    assert len(renders) == 3
    # A scraper that goes away costs one render ahead, not one a second.
    now[0] += 15
    assert cache.render_ahead() and len(renders) == 4
    for _ in range(30):
        now[0] += 1
        assert not cache.render_ahead()
    assert len(renders) == 4


def test_each_scraper_is_expected_on_its_own_period() -> None:
    cache, renders, now = _numbered_renders(0.0)
    # Two Prometheus servers every 30 s, 10 s apart in phase, and a plain-text scraper every
    # 60 s.
    for t, who, gzipped in [
        (-40, "c", False),
        (0, "a", True),
        (10, "b", True),
        (20, "c", False),
        (30, "a", True),
        (40, "b", True),
    ]:
        now[0] = t
        cache.get(gzipped=gzipped, scraper=who)
    assert len(renders) == 6
    now[0] = 50.0  # a is expected at 60, b at 70 (their 30 s), c at 80 (its 60 s)
    assert cache.ahead_in() == pytest.approx(10 - LEAD)
    due = []
    for tick in range(4000):  # a tick every 25 ms, up to 150 s
        now[0] = 50.0 + tick * 0.025
        if cache.render_ahead():
            due.append(round(now[0], 2))
    assert due == [60 - LEAD, 70 - LEAD, 80 - LEAD], due
    assert len(renders) == 9, "one render ahead for each"


def test_a_render_ahead_is_made_anew_when_the_kept_one_would_be_stale_at_the_scrape() -> None:
    cache, renders, now = _numbered_renders(0.0)
    cache.get(gzipped=False, scraper="a")
    now[0] = 1.05
    cache.get(gzipped=False, scraper="a")  # a render of 1.05; the next scrape due at 2.1
    assert len(renders) == 2
    now[0] = 2.1 - LEAD
    # The kept render is 0.8 s old now but would be 1.05 s old at the scrape: made anew.
    assert cache.render_ahead() and len(renders) == 3
    now[0] = 2.1
    assert cache.get(gzipped=False, scraper="a") == b"render 2\n" and len(renders) == 3
