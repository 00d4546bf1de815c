"""Times and the one duration grammar: the config's durations and the CLI's and API's ages are
read by the same function."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

import monitor.config
from monitor.timeutil import parse_duration, parse_time

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def test_config_reads_durations_with_the_one_grammar() -> None:
    assert monitor.config.parse_duration is parse_duration


@pytest.mark.parametrize(
    ("text", "age"),
    [
        ("24h", timedelta(hours=24)),
        ("7d", timedelta(days=7)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1h 30m", timedelta(hours=1, minutes=30)),
        ("1w", timedelta(weeks=1)),
        ("1w2d", timedelta(days=9)),
        ("90s", timedelta(seconds=90)),
        ("250ms", timedelta(milliseconds=250)),
        ("1.5h", timedelta(minutes=90)),
        (" 5m ", timedelta(minutes=5)),
        ("0s", timedelta(0)),
    ],
)
def test_a_relative_time_is_an_age_in_the_duration_grammar(text: str, age: timedelta) -> None:
    assert parse_time(text, now=NOW) == NOW - age
    assert parse_duration(text) == pytest.approx(age.total_seconds())


def test_an_rfc3339_time_is_taken_as_it_is() -> None:
    assert parse_time("2026-01-31T12:00:00Z", now=NOW) == datetime(2026, 1, 31, 12, tzinfo=UTC)
    assert parse_time("2026-01-31T14:00:00+02:00", now=NOW) == datetime(2026, 1, 31, 12, tzinfo=UTC)


@pytest.mark.parametrize("text", ["yesterday", "90", "1H", "-5m", "5m-", "1y", "", "2026-13-01"])
def test_anything_else_is_an_invalid_time(text: str) -> None:
    with pytest.raises(ValueError, match="invalid time"):
        parse_time(text, now=NOW)


@pytest.mark.parametrize("text", ["99999999999999d", "9" * 400 + "d", "1h" + "9" * 400 + "w"])
def test_an_age_beyond_the_calendar_is_too_far_back(text: str) -> None:
    with pytest.raises(ValueError, match="too far back"):
        parse_time(text, now=NOW)
