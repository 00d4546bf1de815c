"""The upstream client against the simulated GenAuth API, over real loopback HTTP (no mocks)."""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from monitor.errors import UpstreamError
from monitor.genauth import GenAuthClient, Route, _retry_after
from monitor.simulator import (
    API_CODE_INTERNAL_ERROR,
    API_CODE_INVALID_CREDENTIALS,
    API_CODE_RATE_LIMITED,
    API_CODE_TOKEN_EXPIRED,
    DEFAULT_DATA,
    DEMO_SCENARIO,
    FAULT_KINDS,
    SimulatedGenAuth,
    run_scenario,
)
from tests.helpers import QuietJsonHandler

KEY_ID = "pool-6f1c0a"
SECRET = "Sup3r-S3cret-AccessKey-Value-42"


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


ClientFactory = Callable[..., GenAuthClient]


@pytest.fixture
def sim() -> Iterator[SimulatedGenAuth]:
    with SimulatedGenAuth(access_key_id=KEY_ID, access_key_secret=SECRET) as server:
        yield server


@pytest.fixture
def make_client(sim: SimulatedGenAuth) -> Iterator[ClientFactory]:
    made: list[GenAuthClient] = []

    def factory(**overrides: Any) -> GenAuthClient:
        kwargs: dict[str, Any] = {
            "base_url": sim.base_url,
            "access_key_id": KEY_ID,
            "access_key_secret": SECRET,
            "timeout": 2.0,
        }
        kwargs.update(overrides)
        client = GenAuthClient(**kwargs)
        made.append(client)
        return client

    yield factory
    for client in made:
        client.close()


def fail(client: GenAuthClient) -> UpstreamError:
    """The UpstreamError of one fetch, checked for leaks of the secret and chained causes."""
    with pytest.raises(UpstreamError) as info:
        client.fetch_email_provider()
    err = info.value
    for text in (str(err), repr(err), err.message):
        assert SECRET not in text
        assert "Bearer" not in text
        assert "<html" not in text.lower()
    assert err.__cause__ is None
    assert err.__context__ is None
    return err


# -- success and the token cache ------------------------------------------------------------


def test_success_returns_the_data_object(sim: SimulatedGenAuth, make_client: ClientFactory) -> None:
    data = make_client().fetch_email_provider()
    assert data == DEFAULT_DATA
    assert data == sim.data
    assert sim.token_requests == 1
    assert sim.provider_requests == 1


def test_token_is_cached_across_fetches(sim: SimulatedGenAuth, make_client: ClientFactory) -> None:
    client = make_client()
    for _ in range(5):
        client.fetch_email_provider()
    assert sim.token_requests == 1
    assert sim.provider_requests == 5


def test_token_refreshed_before_expiry_on_the_shared_clock(make_client: ClientFactory) -> None:
    clock = FakeClock()
    with SimulatedGenAuth(
        access_key_id=KEY_ID, access_key_secret=SECRET, token_ttl=100, clock=clock
    ) as sim:
        client = make_client(base_url=sim.base_url, clock=clock)
        client.fetch_email_provider()
        clock.advance(85)  # inside the lifetime minus skew (min(60, 10 s) = 10 s)
        client.fetch_email_provider()
        assert sim.token_requests == 1
        clock.advance(6)  # 91 s: within the skew, refreshed before the server would refuse it
        client.fetch_email_provider()
        assert sim.token_requests == 2
        assert sim.provider_requests == 3  # no 401 round trip was needed
        clock.advance(200)  # long past expiry
        client.fetch_email_provider()
        assert sim.token_requests == 3
        assert sim.provider_requests == 4


def test_server_side_expiry_reauthenticates_once(make_client: ClientFactory) -> None:
    server_clock, client_clock = FakeClock(), FakeClock()
    with SimulatedGenAuth(
        access_key_id=KEY_ID, access_key_secret=SECRET, token_ttl=100, clock=server_clock
    ) as sim:
        client = make_client(base_url=sim.base_url, clock=client_clock)
        client.fetch_email_provider()
        server_clock.advance(101)  # the client does not know: it gets a 401 "token expired"
        assert client.fetch_email_provider() == DEFAULT_DATA
        assert sim.token_requests == 2
        assert sim.provider_requests == 3


def test_expire_tokens_costs_one_reauth(sim: SimulatedGenAuth, make_client: ClientFactory) -> None:
    client = make_client()
    client.fetch_email_provider()
    sim.expire_tokens()
    assert client.fetch_email_provider() == DEFAULT_DATA
    assert sim.token_requests == 2
    assert sim.provider_requests == 3
    client.fetch_email_provider()
    assert sim.token_requests == 2


def test_concurrent_fetches_share_one_token(
    sim: SimulatedGenAuth, make_client: ClientFactory
) -> None:
    client = make_client()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(10):
                client.fetch_email_provider()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not errors
    assert sim.token_requests == 1
    assert sim.provider_requests == 60


# -- credentials and headers ----------------------------------------------------------------


def test_wrong_credentials_are_auth(sim: SimulatedGenAuth, make_client: ClientFactory) -> None:
    client = make_client(access_key_secret="not-the-secret")
    err = fail(client)
    assert err.reason == "auth"
    assert err.api_code == API_CODE_INVALID_CREDENTIALS
    assert err.request_id
    assert "not-the-secret" not in str(err) and "not-the-secret" not in repr(err)
    assert "get-management-token" in err.message
    assert sim.provider_requests == 0
    assert SECRET not in repr(client) and "not-the-secret" not in repr(client)


def test_both_pool_headers_sent_from_jwt_scope(make_client: ClientFactory) -> None:
    with SimulatedGenAuth(
        access_key_id="ak-access-key", access_key_secret=SECRET, userpool_id="pool-from-jwt"
    ) as sim:
        client = make_client(base_url=sim.base_url, access_key_id="ak-access-key")
        client.fetch_email_provider()
        headers = sim.last_provider_headers
    assert headers["x-authing-userpool-id"] == "pool-from-jwt"
    assert headers["x-genauth-userpool-id"] == "pool-from-jwt"
    assert headers["authorization"].startswith("Bearer ey")
    assert headers["accept"] == "application/json"
    assert headers["user-agent"].startswith("genauth-monitor/")


def test_explicit_userpool_id_wins(make_client: ClientFactory) -> None:
    with SimulatedGenAuth(access_key_id="ak-2", access_key_secret=SECRET, userpool_id="p") as sim:
        good = make_client(base_url=sim.base_url, access_key_id="ak-2", userpool_id="p")
        good.fetch_email_provider()
        assert sim.last_provider_headers["x-genauth-userpool-id"] == "p"
        wrong = make_client(base_url=sim.base_url, access_key_id="ak-2", userpool_id="other")
        err = fail(wrong)
        assert sim.last_provider_headers["x-authing-userpool-id"] == "other"
    assert err.reason == "http_status"
    assert err.http_status == 403


# -- faults ---------------------------------------------------------------------------------

FAULT_EXPECTATIONS: dict[str, dict[str, Any]] = {
    "http_500_html": {"reason": "http_status", "http_status": 500, "api_code": None, "rid": False},
    "http_502_html": {"reason": "http_status", "http_status": 502, "api_code": None, "rid": False},
    "status_500_body": {
        "reason": "api_error",
        "http_status": 200,
        "api_code": API_CODE_INTERNAL_ERROR,
        "rid": True,
    },
    "non_json": {"reason": "invalid_response", "http_status": 200, "api_code": None, "rid": False},
    "missing_data": {"reason": "invalid_response", "http_status": 200, "api_code": None},
    "wrong_types": {"reason": "invalid_response", "http_status": 200, "api_code": None},
    "data_not_object": {"reason": "invalid_response", "http_status": 200, "api_code": None},
    "subconfig_not_object": {"reason": "invalid_response", "http_status": 200, "api_code": None},
    "rate_limit": {
        "reason": "http_status",
        "http_status": 429,
        "api_code": API_CODE_RATE_LIMITED,
        "rid": True,
        "retry_after": 7.0,
    },
    "unauthorized": {"reason": "auth", "http_status": 401, "rid": True, "tokens": 1},
    "expired_token_body": {
        "reason": "auth",
        "http_status": 200,
        "api_code": API_CODE_TOKEN_EXPIRED,
        "rid": True,
        "tokens": 1,
    },
    "close": {"reason": "network", "http_status": None, "api_code": None, "rid": False},
}


def test_every_fault_kind_is_covered() -> None:
    from tests.test_bounded_reads import BOUNDED_FAULTS

    assert set(FAULT_EXPECTATIONS) | {"slow"} | BOUNDED_FAULTS == set(FAULT_KINDS)


@pytest.mark.parametrize("kind", sorted(FAULT_EXPECTATIONS))
def test_fault_is_classified(kind: str, sim: SimulatedGenAuth, make_client: ClientFactory) -> None:
    expected = FAULT_EXPECTATIONS[kind]
    client = make_client()
    client.fetch_email_provider()  # a warm token and a pooled keep-alive connection
    sim.reset_counters()
    sim.set_fault(kind, retry_after=7)
    err = fail(client)
    assert err.reason == expected["reason"]
    assert err.http_status == expected["http_status"]
    if "api_code" in expected:
        assert err.api_code == expected["api_code"]
    if expected.get("rid"):
        assert err.request_id and len(err.request_id) == 36
    elif "rid" in expected:
        assert err.request_id is None
    assert err.retry_after == expected.get("retry_after")
    assert sim.token_requests == expected.get("tokens", 0)  # one re-auth, never two
    assert sim.provider_requests == 1 + expected.get("tokens", 0)  # one retry, never two
    sim.set_fault(None)
    assert client.fetch_email_provider() == DEFAULT_DATA  # recovers on the same client


def test_html_error_is_described_not_quoted(
    sim: SimulatedGenAuth, make_client: ClientFactory
) -> None:
    sim.set_fault("http_502_html")
    err = fail(make_client())
    assert err.message.startswith("HTTP 502 from get-email-provider (text/html, ")
    assert "nginx" not in err.message


@pytest.mark.parametrize("kind", ["unauthorized", "expired_token_body"])
def test_one_token_rejection_is_cured_by_one_reauth(
    kind: str, sim: SimulatedGenAuth, make_client: ClientFactory
) -> None:
    client = make_client()
    client.fetch_email_provider()
    sim.set_fault(kind, times=1)
    assert client.fetch_email_provider() == DEFAULT_DATA
    assert sim.token_requests == 2
    assert sim.provider_requests == 3


def test_fault_times_counts_down(sim: SimulatedGenAuth, make_client: ClientFactory) -> None:
    client = make_client()
    sim.set_fault("http_500_html", times=2)
    assert fail(client).http_status == 500
    assert fail(client).http_status == 500
    assert client.fetch_email_provider() == DEFAULT_DATA


def test_slow_beyond_timeout_is_timeout(sim: SimulatedGenAuth, make_client: ClientFactory) -> None:
    client = make_client(timeout=0.3)
    client.fetch_email_provider()
    sim.set_fault("slow", delay=1.0, times=1)
    started = time.monotonic()
    err = fail(client)
    assert time.monotonic() - started < 0.9
    assert err.reason == "timeout"
    assert err.http_status is None
    assert client.fetch_email_provider() == DEFAULT_DATA


def test_slow_within_timeout_succeeds(sim: SimulatedGenAuth, make_client: ClientFactory) -> None:
    sim.set_fault("slow", delay=0.1)
    assert make_client(timeout=2.0).fetch_email_provider() == DEFAULT_DATA


def test_stopped_server_is_network(sim: SimulatedGenAuth, make_client: ClientFactory) -> None:
    client = make_client()
    client.fetch_email_provider()  # holds a keep-alive connection that stop() must cut
    sim.stop()
    err = fail(client)
    assert err.reason == "network"
    fresh = make_client()
    err = fail(fresh)
    assert err.reason == "network"
    assert "refused" in err.message.lower()


@pytest.mark.parametrize(
    ("kind", "reason", "status"),
    [
        ("http_500_html", "http_status", 500),
        ("status_500_body", "api_error", 200),
        ("non_json", "invalid_response", 200),
        ("missing_data", "invalid_response", 200),
        ("rate_limit", "http_status", 429),
        ("close", "network", None),
    ],
)
def test_token_endpoint_faults(
    kind: str,
    reason: str,
    status: int | None,
    sim: SimulatedGenAuth,
    make_client: ClientFactory,
) -> None:
    sim.set_token_fault(kind, times=1)
    client = make_client()
    err = fail(client)
    assert err.reason == reason
    assert err.http_status == status
    assert "get-management-token" in err.message
    assert sim.provider_requests == 0
    assert client.fetch_email_provider() == DEFAULT_DATA


def test_token_endpoint_slow_is_timeout(sim: SimulatedGenAuth, make_client: ClientFactory) -> None:
    sim.set_token_fault("slow", delay=1.0, times=1)
    err = fail(make_client(timeout=0.3))
    assert err.reason == "timeout"
    assert "get-management-token" in err.message


def test_unknown_fault_kind_is_refused(sim: SimulatedGenAuth) -> None:
    with pytest.raises(ValueError):
        sim.set_fault("teapot")
    with pytest.raises(ValueError):
        sim.set_token_fault("unauthorized")


# -- the data as sent -----------------------------------------------------------------------


def test_unknown_fields_are_preserved(sim: SimulatedGenAuth, make_client: ClientFactory) -> None:
    data = copy.deepcopy(DEFAULT_DATA)
    data["type"] = "mailgun"
    data["mailgunConfig"] = {"domain": "mg.example.com", "apiKey": "key-1", "region": ["eu"]}
    data["smtpConfig"]["tlsMinVersion"] = "1.2"
    data["futureFlag"] = None
    sim.set_data(data)
    assert make_client().fetch_email_provider() == data


def test_optional_parts_may_be_absent(sim: SimulatedGenAuth, make_client: ClientFactory) -> None:
    sim.set_data({"enabled": False, "smtpConfig": None})
    assert make_client().fetch_email_provider() == {"enabled": False, "smtpConfig": None}


def test_missing_enabled_is_invalid(sim: SimulatedGenAuth, make_client: ClientFactory) -> None:
    sim.set_data({"type": "custom"})
    err = fail(make_client())
    assert err.reason == "invalid_response"
    assert "enabled" in err.message


def test_retry_after_http_date() -> None:
    later = datetime.now(UTC) + timedelta(seconds=120)
    seconds = _retry_after(format_datetime(later, usegmt=True))
    assert seconds is not None and 100 < seconds <= 121
    assert _retry_after("5") == 5.0
    assert _retry_after("soon") is None
    assert _retry_after(None) is None


# -- demo support ---------------------------------------------------------------------------


def test_demo_scenario_steps_are_valid_and_distinct(
    sim: SimulatedGenAuth, make_client: ClientFactory
) -> None:
    client = make_client()
    seen = []
    for step in DEMO_SCENARIO:
        sim.set_data(step)
        seen.append(client.fetch_email_provider())
    assert seen == DEMO_SCENARIO
    for before, after in zip(seen, seen[1:] + seen[:1], strict=True):
        assert before != after
    assert {d["type"] for d in seen} == {"custom", "sendgrid"}
    assert {d["enabled"] for d in seen} == {True, False}
    assert len({d["smtpConfig"]["senderPass"] for d in seen}) == 2
    assert len({d["smtpConfig"]["smtp_host"] for d in seen}) == 2


def test_run_scenario_cycles_until_stopped(sim: SimulatedGenAuth) -> None:
    stop = threading.Event()
    runner = threading.Thread(
        target=run_scenario, args=(sim,), kwargs={"period": 0.01, "stop": stop}, daemon=True
    )
    runner.start()
    distinct = []
    for step in DEMO_SCENARIO:
        if step not in distinct:
            distinct.append(step)
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 5
    while len(seen) < len(distinct) and time.monotonic() < deadline:
        current = sim.data
        if current not in seen:
            seen.append(current)
        time.sleep(0.002)
    stop.set()
    runner.join(timeout=2)
    assert not runner.is_alive()
    assert sorted(map(repr, seen)) == sorted(map(repr, distinct))


def test_plain_session_sees_the_api_shape(sim: SimulatedGenAuth) -> None:
    """The wire format itself, independent of the client."""
    with requests.Session() as session:
        token_url = f"{sim.base_url}/api/v3/get-management-token"
        bad = session.post(token_url, json={"accessKeyId": KEY_ID, "accessKeySecret": "x"})
        assert bad.status_code == 200
        assert bad.json()["statusCode"] == 401
        good = session.post(token_url, json={"accessKeyId": KEY_ID, "accessKeySecret": SECRET})
        token = good.json()["data"]["access_token"]
        assert good.json()["data"]["expires_in"] == 7200
        url = f"{sim.base_url}/api/v3/get-email-provider"
        unauth = session.get(url)
        assert unauth.status_code == 401
        assert unauth.json()["message"] == "invalid token"
        ok = session.get(
            url, headers={"Authorization": f"Bearer {token}", "x-genauth-userpool-id": KEY_ID}
        )
        body = ok.json()
        assert body == {"statusCode": 200, "message": "Success", "data": DEFAULT_DATA}
        sim.expire_tokens()
        expired = session.get(
            url, headers={"Authorization": f"Bearer {token}", "x-authing-userpool-id": KEY_ID}
        )
        assert expired.status_code == 401
        assert expired.json()["message"] == "token expired"


def test_nan_is_not_json(sim: SimulatedGenAuth, make_client: ClientFactory) -> None:
    data = sim.data
    data["smtpConfig"]["smtp_port"] = float("nan")
    sim.set_data(data)
    with pytest.raises(UpstreamError) as caught:
        make_client().fetch_email_provider()
    assert caught.value.reason == "invalid_response"


def test_overflowing_number_is_not_json(sim: SimulatedGenAuth, make_client: ClientFactory) -> None:
    sim.set_data({"enabled": True, "n": 1e308})
    assert make_client().fetch_email_provider()["n"] == 1e308
    data = sim.data
    data["n"] = float("inf")  # the simulator writes it as Infinity; 1e400 behaves the same
    sim.set_data(data)
    with pytest.raises(UpstreamError) as caught:
        make_client().fetch_email_provider()
    assert caught.value.reason == "invalid_response"


class _Answering(QuietJsonHandler):
    def answer(self, status: int, envelope: dict[str, Any]) -> None:
        self.send_json(status, json.dumps(envelope).encode())


class _LoopbackUpstream:
    """A careless upstream on a loopback port, served by ``handler``."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(  # shutdown() waits up to one poll interval
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def error(self) -> UpstreamError:
        """The UpstreamError of one fetch from it (checked for leaks by ``fail``)."""
        client = GenAuthClient(
            base_url=self.base_url, access_key_id=KEY_ID, access_key_secret=SECRET, timeout=2.0
        )
        try:
            return fail(client)
        finally:
            client.close()
            self._server.shutdown()
            self._server.server_close()


def echoing_upstream(status: int, envelope_code: int) -> _LoopbackUpstream:
    """A token endpoint that quotes the submitted access key secret back in its error message
    and requestId, as a careless upstream or proxy might."""

    class Handler(_Answering):
        def do_POST(self) -> None:
            sent = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            echoed = sent.get("accessKeySecret")
            envelope = {
                "statusCode": envelope_code,
                "message": f"accessKeySecret {echoed} is not valid here",
                "apiCode": 2000,
                "requestId": f"req-{echoed}",
            }
            self.answer(status, envelope)

    return _LoopbackUpstream(Handler)


@pytest.mark.parametrize(
    ("status", "envelope_code", "reason"),
    [(200, 401, "auth"), (500, 500, "http_status"), (200, 500, "api_error")],
)
def test_an_upstream_quoting_the_secret_back_never_gets_it_into_the_error(
    status: int, envelope_code: int, reason: str
) -> None:
    err = echoing_upstream(status, envelope_code).error()
    assert err.reason == reason
    assert "accessKeySecret *** is not valid here" in err.message, "the rest is kept"
    assert err.request_id == "req-***"


QUOTED_TOKEN = "Quoted-Bearer-Token-4242"


class _TokenQuoting(_Answering):
    """Issues a token, then answers get-email-provider with an error that quotes the bearer
    token it got, as a careless gateway might."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        data = {"access_token": QUOTED_TOKEN, "expires_in": 3600}
        self.answer(200, {"statusCode": 200, "data": data})

    def do_GET(self) -> None:
        quoted = self.headers.get("Authorization", "").removeprefix("Bearer ")
        self.answer(
            500, {"statusCode": 500, "message": f"rejected token {quoted}", "requestId": quoted}
        )


def test_an_upstream_quoting_the_token_back_never_gets_it_into_the_error() -> None:
    err = _LoopbackUpstream(_TokenQuoting).error()
    assert err.reason == "http_status"
    assert QUOTED_TOKEN not in f"{err.message} {err.request_id}"
    assert "rejected token ***" in err.message, "the rest is kept"


@pytest.mark.parametrize("pool", ["pool\r\nX-Evil: 1", "pool\r\n folded", " pool"])
def test_a_pool_id_that_would_break_the_headers_is_never_sent(
    make_client: ClientFactory, sim: SimulatedGenAuth, pool: str
) -> None:
    # The token's request is built by hand (lean, kept per target): requests' header check
    # still applies to it, stricter than http.client's (which lets a folded line through).
    client = make_client(userpool_id=pool)
    with pytest.raises(requests.exceptions.InvalidHeader):
        client.fetch_email_provider()
    assert sim.provider_requests == 0


def test_clients_of_one_base_url_share_one_route(
    make_client: ClientFactory, sim: SimulatedGenAuth, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    route = Route.of(sim.base_url)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # read once, before: not used
    assert Route.of(sim.base_url).proxies == {"http": "http://127.0.0.1:9"}  # read anew: used
    first, second = make_client(route=route), make_client(route=route)
    assert first.fetch_email_provider()["enabled"] is True
    assert second.fetch_email_provider()["enabled"] is True
    with pytest.raises(ValueError, match="another base_url"):
        make_client(route=Route.of("http://127.0.0.1:1"))
