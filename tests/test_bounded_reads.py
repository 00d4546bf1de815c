"""Every upstream read is bounded in time (a deadline for the whole request) and in size (after
decompression): hostile answers from the real simulator over real sockets."""

from __future__ import annotations

import time

import pytest

from monitor.errors import UpstreamError
from monitor.genauth import GenAuthClient
from monitor.simulator import SimulatedGenAuth

LIMIT = 64 * 1024
# The hostile answers this file drives (test_simulator_client checks every kind is driven).
BOUNDED_FAULTS = {"huge_body", "gzip_bomb", "endless", "drip", "drip_headers", "dense_json"}


def _client(sim: SimulatedGenAuth, timeout: float = 1.0) -> GenAuthClient:
    return GenAuthClient(
        base_url=sim.base_url,
        access_key_id=sim.access_key_id,
        access_key_secret=sim.access_key_secret,
        timeout=timeout,
        max_response_bytes=LIMIT,
    )


def _failure(client: GenAuthClient) -> tuple[UpstreamError, float]:
    started = time.monotonic()
    with pytest.raises(UpstreamError) as caught:
        client.fetch_email_provider()
    return caught.value, time.monotonic() - started


@pytest.mark.parametrize(
    ("kind", "size"),
    [
        ("huge_body", 200 * 1024 * 1024),  # 200 MB with a Content-Length
        ("gzip_bomb", 100 * 1024 * 1024),  # ~100 kB on the wire, 100 MB inflated
        ("endless", 0),  # chunked, never ends
        ("huge_body", LIMIT + 1),  # one byte over
    ],
)
@pytest.mark.parametrize("endpoint", ["provider", "token"])
def test_a_body_over_the_cap_fails_as_invalid_response_and_keeps_nothing(
    simulator: SimulatedGenAuth, kind: str, size: int, endpoint: str
) -> None:
    setter = simulator.set_fault if endpoint == "provider" else simulator.set_token_fault
    setter(kind, size=size)
    with _client(simulator) as client:
        error, took = _failure(client)
    assert error.reason == "invalid_response"
    assert "too large" in error.message
    assert "padding" not in error.message
    assert took < 1.0  # read stops at the cap, not at the end of the body


def test_a_body_at_the_cap_is_read(simulator: SimulatedGenAuth) -> None:
    simulator.set_fault("huge_body", size=LIMIT)
    with _client(simulator) as client:
        data = client.fetch_email_provider()
    assert data["enabled"] is True
    assert len(data["padding"]) > LIMIT - 100


def test_a_gzip_answer_within_the_cap_is_decoded(simulator: SimulatedGenAuth) -> None:
    simulator.set_fault("gzip_bomb", size=LIMIT // 2)
    with _client(simulator) as client:
        assert client.fetch_email_provider()["enabled"] is True


@pytest.mark.parametrize("kind", ["drip", "drip_headers"])
@pytest.mark.parametrize("endpoint", ["provider", "token"])
def test_a_dripping_answer_times_out_at_the_deadline(
    simulator: SimulatedGenAuth, kind: str, endpoint: str
) -> None:
    # Each byte arrives well within the timeout, so only a deadline for the whole request
    # can stop it.
    setter = simulator.set_fault if endpoint == "provider" else simulator.set_token_fault
    setter(kind, delay=0.2)
    with _client(simulator, timeout=1.0) as client:
        error, took = _failure(client)
    assert error.reason == "timeout"
    assert 0.9 < took < 1.6


def test_the_whole_poll_has_a_deadline_of_twice_the_timeout(simulator: SimulatedGenAuth) -> None:
    # A slow token (0.8 s) and a slow answer (0.8 s each) twice because of a 401 and retry:
    # each request is within its timeout, the call as a whole is not.
    simulator.set_token_fault("slow", delay=0.8)
    simulator.set_fault("unauthorized", times=1, delay=0.8)
    with _client(simulator, timeout=1.0) as client:
        error, took = _failure(client)
    assert error.reason == "timeout"
    assert took < 2.3


def test_an_answer_of_too_many_values_is_refused_before_parsing(
    simulator: SimulatedGenAuth,
) -> None:
    # 20,000 empty objects in 60 kB: small in bytes, huge in Python objects.
    simulator.set_fault("dense_json", size=60_000)
    with _client(simulator) as client:
        error, _ = _failure(client)
    assert error.reason == "invalid_response"
    assert "JSON values" in error.message
