"""Configuration: the example loads, every problem is one line with its key path, secrets never
show, durations/percents/paths are read as documented."""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from monitor.config import (
    Settings,
    SinkSettings,
    TargetSettings,
    default_config_path,
    format_duration,
    format_size,
    load_settings,
    parse_duration,
    parse_percent,
    parse_settings,
    parse_size,
)
from monitor.config_summary import summary
from monitor.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"

EXAMPLE_ENV = {
    "GENAUTH_MONITOR_FINGERPRINT_KEY": "fingerprint-key-value-0123456789",
    "GENAUTH_MONITOR_API_TOKEN": "api-token-value-0123456789",
    "GENAUTH_PROD_SECRET": "prod-secret-value-0123456789",
    "GENAUTH_STAGING_SECRET": "staging-secret-value-0123456789",
    "GENAUTH_MONITOR_WEBHOOK_SECRET": "webhook-secret-value-0123456789",
    "GENAUTH_MONITOR_SLACK_URL": "https://hooks.slack.com/services/T000/B000/slackSecretPart",
}

SECRET = "Sup3r-S3cret-Value-4711"


def minimal(**target: Any) -> dict[str, Any]:
    """The smallest valid document, with ``target`` keys merged into its one target."""
    return {
        "targets": [
            {"name": "prod", "access_key_id": "key-id", "access_key_secret": SECRET, **target}
        ]
    }


def problems_of(raw: dict[str, Any], environ: dict[str, str] | None = None, **kw: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw, base_dir=kw.get("base_dir", Path("/etc/gm")), environ=environ or {})
    return caught.value.problems


def assert_never_shown(exc: ConfigError, *secrets: str) -> None:
    shown = "\n".join([*exc.problems, str(exc), repr(exc)])
    for secret in secrets:
        assert secret not in shown


# ----------------------------------------------------------------------------- the example


def test_example_config_loads_with_its_environment() -> None:
    settings = load_settings(EXAMPLE, EXAMPLE_ENV)

    assert settings.source == EXAMPLE
    assert [t.name for t in settings.targets] == ["prod", "staging-cn"]
    prod = settings.target("prod")
    assert prod.access_key_secret.get_secret_value() == EXAMPLE_ENV["GENAUTH_PROD_SECRET"]
    assert prod.effective_interval(settings.monitor) == 30.0
    assert prod.effective_timeout(settings.monitor) == 10.0
    assert prod.expect["smtpConfig.smtp_host"] == "smtp.example.com"
    assert prod.expect["enabled"] is True
    assert settings.target("staging-cn").effective_interval(settings.monitor) == 300.0
    assert settings.monitor.jitter == pytest.approx(0.1)
    assert settings.monitor.backoff_max == 900.0
    assert settings.monitor.fingerprint_key is not None
    assert settings.monitor.fingerprint_key.get_secret_value() == (
        EXAMPLE_ENV["GENAUTH_MONITOR_FINGERPRINT_KEY"].encode()
    )
    assert settings.server.api_token is not None
    assert settings.storage.sqlite_path == ROOT / "genauth-monitor.db"
    assert [(s.name, s.type) for s in settings.sinks] == [
        ("ops-webhook", "webhook"),
        ("alertmanager", "alertmanager"),
        ("slack", "slack"),
    ]
    assert settings.sinks[2].url == EXAMPLE_ENV["GENAUTH_MONITOR_SLACK_URL"]
    assert settings.sinks[0].secret is not None


def test_example_documents_every_key() -> None:
    """Every settings field the file may hold is named in the example (as a key or a comment)."""
    text = EXAMPLE.read_text()
    derived = {"fingerprint_key", "api_token", "source"}  # resolved, never written
    models: list[type[Any]] = [TargetSettings, SinkSettings]
    for section in ("monitor", "storage", "server"):
        models.append(type(getattr(Settings(targets=(_target(),)), section)))
    for model in models:
        for name in model.model_fields:
            if name not in derived:
                written = f"{name} =" in text or f"[targets.{name}]" in text
                assert written, f"{model.__name__}.{name} is not in the example"


def test_example_without_environment_names_each_missing_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(EXAMPLE, {})
    assert caught.value.problems == [
        "monitor.fingerprint_key_env: environment variable "
        "GENAUTH_MONITOR_FINGERPRINT_KEY is not set",
        "server.api_token_env: environment variable GENAUTH_MONITOR_API_TOKEN is not set",
        "targets[0].access_key_secret_env: environment variable GENAUTH_PROD_SECRET is not set",
        "targets[1].access_key_secret_env: environment variable GENAUTH_STAGING_SECRET is not set",
        "sinks[0].secret_env: environment variable GENAUTH_MONITOR_WEBHOOK_SECRET is not set",
        "sinks[2].url_env: environment variable GENAUTH_MONITOR_SLACK_URL is not set",
    ]


def test_summary_says_what_was_found_and_no_secret() -> None:
    settings = load_settings(EXAMPLE, EXAMPLE_ENV)
    text = "\n".join(summary(settings))
    assert "target prod: https://api.genauth.ai, every 30s" in text
    assert "target staging-cn: https://api.authing.cn, every 5m" in text
    assert "listening on 127.0.0.1:9464" in text
    assert "sink slack: slack" in text
    assert "sink ops-webhook: webhook" in text
    assert "fingerprint key: from environment variable GENAUTH_MONITOR_FINGERPRINT_KEY" in text
    assert "API token from environment variable GENAUTH_MONITOR_API_TOKEN" in text
    assert "sqlite:///" in text
    for value in EXAMPLE_ENV.values():
        assert value not in text
    assert "slackSecretPart" not in text
    assert "slackSecretPart" not in repr(settings)
    assert SECRET not in repr(parse_settings(minimal(), base_dir=Path("/x"), environ={}))


def test_summary_of_the_defaults_line_by_line() -> None:
    settings = parse_settings(minimal(), base_dir=Path("/srv/gm"), environ={})
    assert summary(settings) == [
        "monitor: interval 1m, jitter 10%, timeout 10s, failure threshold 3, backoff max 15m, "
        "max response 1MiB, log level info",
        "fingerprint key: not configured (a random key file is created on first start)",
        "storage: SQLite sqlite:////srv/gm/genauth-monitor.db",
        "server: listening on 127.0.0.1:9464, no API token (/api/v1 and /ui refuse every "
        "request), /metrics open, /ui logins last 8h",
        "target prod: https://api.genauth.ai, every 1m, timeout 10s, max response 1MiB, "
        "secret in the config file",
        "sinks: none (events are recorded but not sent)",
    ]


def _target() -> TargetSettings:
    return TargetSettings(name="t", access_key_id="id", access_key_secret="s")


# ----------------------------------------------------------------------------- one line per problem


@pytest.mark.parametrize(
    ("change", "environ", "line"),
    [
        (
            {"monitor": {"interval": "5 parsecs"}},
            {},
            "monitor.interval: invalid duration '5 parsecs' (use e.g. 30s, 5m, 1h)",
        ),
        ({"monitor": {"interval": "0s"}}, {}, "monitor.interval: must be between 1s and 7d"),
        (
            {"monitor": {"jitter": "150%"}},
            {},
            "monitor.jitter: must be between 0% and 100% (0 and 1)",
        ),
        ({"monitor": {"failure_threshold": 0}}, {}, "monitor.failure_threshold: "),
        ({"monitor": {"failure_threshold": "3"}}, {}, "monitor.failure_threshold: must be an"),
        ({"monitor": {"log_level": "loud"}}, {}, "monitor.log_level: must be 'debug'"),
        ({"monitor": {"colour": "blue"}}, {}, "monitor.colour: unknown key"),
        ({"extra_section": {}}, {}, "extra_section: unknown key"),
        (
            {"monitor": {"fingerprint_key_env": "FPK"}},
            {"FPK": ""},
            "monitor.fingerprint_key_env: environment variable FPK is empty",
        ),
        (
            {"monitor": {"fingerprint_key_file": "missing.key"}},
            {},
            "monitor.fingerprint_key_file: cannot read file /etc/gm/missing.key: ",
        ),
        (
            {"monitor": {"fingerprint_key": "inline"}},
            {},
            "monitor.fingerprint_key: unknown key "
            "(use fingerprint_key_env or fingerprint_key_file)",
        ),
        (
            {"storage": {"url": "mysql://db/x"}},
            {},
            "storage.url: unsupported database 'mysql' (use sqlite or postgresql+psycopg)",
        ),
        ({"storage": {"url": "not a url"}}, {}, "storage.url: not a database URL"),
        ({"server": {"listen": "9464"}}, {}, "server.listen: must be host:port"),
        ({"server": {"ui_session": "30s"}}, {}, "server.ui_session: must be between 1m and 7d"),
        ({"server": {"ui_session": "8d"}}, {}, "server.ui_session: must be between 1m and 7d"),
        ({"server": {"ui_session": "soon"}}, {}, "server.ui_session: invalid duration 'soon'"),
        ({"server": {"listen": "[::zz]:9464"}}, {}, "server.listen: invalid IPv6 address"),
        ({"server": {"listen": "localhost:99999"}}, {}, "server.listen: must be host:port"),
        (
            {"server": {"metrics_require_token": True}},
            {},
            "server.metrics_require_token: needs a token: set api_token_env or api_token_file",
        ),
        ({"server": {"api_token_env": "bad name"}}, {}, "server.api_token_env: must be an env"),
        (
            {"sinks": [{"type": "pager", "url": "https://x"}]},
            {},
            "sinks[0].type: must be 'webhook'",
        ),
        (
            {"sinks": [{"type": "webhook"}]},
            {},
            "sinks[0].url: required key is missing (set url_env, url_file or url)",
        ),
        (
            {"sinks": [{"type": "webhook", "url": "ftp://x/y"}]},
            {},
            "sinks[0].url: must be an http:// or https:// URL with a host",
        ),
        (
            {"sinks": [{"type": "webhook", "url": "https://x", "min_severity": "fatal"}]},
            {},
            "sinks[0].min_severity: must be 'info', 'warning' or 'critical'",
        ),
        (
            {"sinks": [{"type": "webhook", "url": "https://x", "kinds": ["first_seen", "nope"]}]},
            {},
            "sinks[0].kinds[1]: unknown event kind 'nope'",
        ),
        (
            {"sinks": [{"type": "slack", "url": "https://x", "secret_env": "S"}]},
            {"S": "x"},
            "sinks[0].secret_env: only webhook sinks sign their requests",
        ),
        (
            {"sinks": [{"type": "webhook", "url": "https://x", "timeout": "soon"}]},
            {},
            "sinks[0].timeout: invalid duration 'soon' (use e.g. 30s, 5m, 1h)",
        ),
        ({"sinks": {"type": "webhook"}}, {}, "sinks: must be an array"),
        ({"monitor": []}, {}, "monitor: must be a table"),
    ],
)
def test_each_problem_is_one_line_with_its_key_path(
    change: dict[str, Any], environ: dict[str, str], line: str
) -> None:
    problems = problems_of({**minimal(), **change}, environ)
    assert len(problems) == 1, problems
    assert problems[0].startswith(line), problems


@pytest.mark.parametrize(
    ("target", "line"),
    [
        ({"name": "bad name"}, "targets[0].name: must be non-empty and use only letters"),
        ({"name": ""}, "targets[0].name: must be non-empty"),
        ({"access_key_id": None}, "targets[0].access_key_id: required key is missing"),
        ({"access_key_id": "  "}, "targets[0].access_key_id: must not be empty"),
        ({"access_key_secret": ""}, "targets[0].access_key_secret: must not be empty"),
        ({"base_url": "api.genauth.ai"}, "targets[0].base_url: must be an http:// or https:// URL"),
        ({"interval": -5}, "targets[0].interval: invalid duration -5 (must not be negative)"),
        ({"interval": True}, "targets[0].interval: invalid duration (use a string such as 30s"),
        ({"timeout": "1x"}, "targets[0].timeout: invalid duration '1x'"),
        ({"ca_bundle": "ca.pem"}, "targets[0].ca_bundle: file /etc/gm/ca.pem does not exist"),
        ({"ignore": ["a..b"]}, "targets[0].ignore[0]: must be a dotted path"),
        ({"ignore": "smtpConfig"}, "targets[0].ignore: must be an array"),
        (
            {"expect": {"smtpConfig.smtp_port": [465]}},
            'targets[0].expect."smtpConfig.smtp_port": expected value must be a string, number',
        ),
        ({"expect": {"x": {}}}, "targets[0].expect.x: expected value must be a string, number"),
        ({"userpool_id": 7}, "targets[0].userpool_id: must be a string"),
        ({"unknown": 1}, "targets[0].unknown: unknown key"),
    ],
)
def test_target_problems_name_their_key(target: dict[str, Any], line: str) -> None:
    raw = minimal(**target)
    raw["targets"][0] = {k: v for k, v in raw["targets"][0].items() if v is not None}
    problems = problems_of(raw)
    assert len(problems) == 1, problems
    assert problems[0].startswith(line), problems


@pytest.mark.parametrize("kind", [[], {}, ["webhook"]])
def test_a_sink_type_that_is_not_a_string_is_reported_not_raised(kind: Any) -> None:
    raw = {**minimal(), "sinks": [{"type": kind, "url": "https://x"}, {"type": "webhook"}]}
    assert problems_of(raw) == [
        "sinks[0].type: must be 'webhook', 'alertmanager' or 'slack'",
        "sinks[0].name: required key is missing",  # as for a sink without a type
        "sinks[1].url: required key is missing (set url_env, url_file or url)",
    ]


def test_targets_are_required() -> None:
    assert problems_of({}) == ["targets: at least one [[targets]] table is required"]
    assert problems_of({"targets": []}) == ["targets: at least one [[targets]] table is required"]


def test_secret_needs_exactly_one_source() -> None:
    raw = minimal()
    del raw["targets"][0]["access_key_secret"]
    assert problems_of(raw) == [
        "targets[0].access_key_secret: required key is missing (set access_key_secret_env, "
        "access_key_secret_file or access_key_secret)"
    ]
    raw = minimal(access_key_secret_env="PROD", access_key_secret_file="prod.secret")
    assert problems_of(raw, {"PROD": "x"}) == [
        "targets[0].access_key_secret: give only one of access_key_secret_env, "
        "access_key_secret_file or access_key_secret, not access_key_secret_env, "
        "access_key_secret_file and access_key_secret"
    ]


def test_duplicate_names_are_reported_at_the_second() -> None:
    raw = minimal()
    raw["targets"] += [dict(raw["targets"][0]), {**raw["targets"][0], "name": "other"}]
    raw["sinks"] = [
        {"type": "webhook", "name": "hook", "url": "https://a"},
        {"type": "slack", "name": "hook", "url": "https://b"},
    ]
    assert problems_of(raw) == [
        "targets[1].name: duplicate target name 'prod'",
        "sinks[1].name: duplicate sink name 'hook'",
    ]


def test_all_problems_are_reported_at_once_in_file_order() -> None:
    raw = {
        "sinks": [{"type": "webhook", "url": "https://x", "kinds": ["bogus"]}],
        "monitor": {"interval": "5 parsecs", "timeout": "never", "colour": 1},
        "server": {"listen": "nowhere"},
        "targets": [
            {"name": "prod", "access_key_id": "id", "access_key_secret_env": "MISSING"},
            {"name": "prod", "access_key_id": "id", "access_key_secret": "x", "interval": "x"},
        ],
    }
    problems = problems_of(raw)
    assert problems == [
        "monitor.interval: invalid duration '5 parsecs' (use e.g. 30s, 5m, 1h)",
        "monitor.timeout: invalid duration 'never' (use e.g. 30s, 5m, 1h)",
        "monitor.colour: unknown key",
        "server.listen: must be host:port, e.g. 127.0.0.1:9464, 0.0.0.0:9464 or [::1]:9464",
        "targets[0].access_key_secret_env: environment variable MISSING is not set",
        "targets[1].name: duplicate target name 'prod'",
        "targets[1].interval: invalid duration 'x' (use e.g. 30s, 5m, 1h)",
        "sinks[0].kinds[0]: unknown event kind 'bogus' (known: first_seen, provider_disabled, "
        "provider_enabled, type_changed, delivery_changed, secret_rotated, config_changed, "
        "baseline_drift, baseline_restored, poll_failing, poll_recovered)",
    ]


# ----------------------------------------------------------------------------- secrets never show


def test_inline_secret_given_twice_is_not_shown(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("file-" + SECRET + "\n")
    raw = minimal(access_key_secret_env="PROD", access_key_secret_file="secret.txt")
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw, base_dir=tmp_path, environ={"PROD": "env-" + SECRET})
    assert caught.value.problems[0].startswith("targets[0].access_key_secret: give only one of")
    assert_never_shown(caught.value, SECRET)


def test_secret_values_in_bad_urls_are_not_shown(tmp_path: Path) -> None:
    (tmp_path / "hook.url").write_text(f"hxxps://hooks.example.com/{SECRET}-file\n")
    raw = minimal(base_url=f"ftp://user:{SECRET}-base@api.example.com/")
    raw["storage"] = {"url": f"mysql://user:{SECRET}-db@db.example.com/monitor"}
    raw["sinks"] = [
        {"type": "slack", "url": f"hooks.slack.com/services/{SECRET}-inline"},
        {"type": "webhook", "url_env": "HOOK"},
        {"type": "webhook", "url_file": "hook.url", "secret": SECRET, "secret_env": "HOOK"},
        {"type": "alertmanager", "url": f"https://am:{SECRET}-am@x:notaport/"},
    ]
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw, base_dir=tmp_path, environ={"HOOK": f"{SECRET}-env"})
    problems = caught.value.problems
    assert "sinks[1].url_env: environment variable HOOK: must be an http:// or https:// URL" in (
        "\n".join(problems)
    )
    assert any(p.startswith(f"sinks[2].url_file: file {tmp_path / 'hook.url'}: ") for p in problems)
    assert any(p.startswith("sinks[2].secret: give only one of") for p in problems)
    assert any(p.startswith("storage.url: unsupported database 'mysql'") for p in problems)
    assert any(p.startswith("targets[0].base_url: must be") for p in problems)
    assert any(p.startswith("sinks[0].url: must be") for p in problems)
    assert any(p.startswith("sinks[3].url: must be") for p in problems)
    assert len(problems) == 7, problems
    assert_never_shown(caught.value, SECRET)


def test_unparsable_database_url_with_password_is_not_shown() -> None:
    problems = problems_of({**minimal(), "storage": {"url": f"postgresql://u:{SECRET}@h:port/db"}})
    assert problems == [
        "storage.url: not a database URL (use sqlite:///FILE or postgresql+psycopg://USER@HOST/DB)"
    ]


def test_inline_token_and_key_are_refused_without_showing_them() -> None:
    raw = {
        **minimal(),
        "monitor": {"fingerprint_key": SECRET},
        "server": {"api_token": SECRET, "listen": SECRET},
    }
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw, base_dir=Path("/x"), environ={})
    assert [p.split(":")[0] for p in caught.value.problems] == [
        "monitor.fingerprint_key",
        "server.api_token",
        "server.listen",
    ]
    assert_never_shown(caught.value, SECRET)


def test_secret_of_wrong_type_and_around_other_errors_is_not_shown() -> None:
    raw = minimal(access_key_secret=[SECRET], access_key_id=SECRET + "-but-wrong", name="a b")
    raw["targets"][0]["access_key_id"] = 12
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw, base_dir=Path("/x"), environ={})
    assert caught.value.problems == [
        "targets[0].name: must be non-empty and use only letters, digits, '_', '.' and '-'",
        "targets[0].access_key_id: must be a string",
        "targets[0].access_key_secret: must be a string",
    ]
    assert_never_shown(caught.value, SECRET)


def test_empty_and_unreadable_secret_files(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "binary").write_bytes(b"\xff\xfe" + SECRET.encode())
    raw = minimal()
    raw["targets"].append({**raw["targets"][0], "name": "b"})
    raw["targets"][0] = {**raw["targets"][0], "access_key_secret_file": "empty"}
    raw["targets"][1] = {**raw["targets"][1], "access_key_secret_file": "binary"}
    for target in raw["targets"]:
        del target["access_key_secret"]
    with pytest.raises(ConfigError) as caught:
        parse_settings(raw, base_dir=tmp_path, environ={})
    assert caught.value.problems == [
        f"targets[0].access_key_secret_file: file {tmp_path / 'empty'} is empty",
        f"targets[1].access_key_secret_file: file {tmp_path / 'binary'} is not UTF-8 text",
    ]
    assert_never_shown(caught.value, SECRET)


def test_config_error_does_not_chain_the_pydantic_error() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(minimal(access_key_secret=[SECRET]), base_dir=Path("/x"), environ={})
    assert caught.value.__cause__ is None
    assert not isinstance(caught.value.__context__, ValidationError)


# ----------------------------------------------------------------------------- durations, percents


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("250ms", 0.25),
        ("2d", 172800.0),
        ("1w", 604800.0),
        ("1w2d", 777600.0),
        ("1.5s", 1.5),
        (" 10s ", 10.0),
        (90, 90.0),
        (0.5, 0.5),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "5 parsecs",
        "10",
        "s",
        "1H",
        "-5s",
        "5m-",
        "1y",
        True,
        -1,
        None,
        math.inf,
        -math.inf,
        math.nan,
        10**400,  # beyond any float
        "9" * 400 + "d",  # so is this, as a float it is inf
    ],
)
def test_parse_duration_rejects(text: Any) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize("seconds", [0.25, 1, 59, 60, 90, 3600, 5400, 86400, 90061.5])
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


def test_format_duration_reads_naturally() -> None:
    assert [format_duration(s) for s in (0, 0.25, 30, 90, 3600, 5400)] == [
        "0s",
        "250ms",
        "30s",
        "1m30s",
        "1h",
        "1h30m",
    ]


@pytest.mark.parametrize(
    ("value", "fraction"),
    [("10%", 0.1), ("0%", 0.0), ("100%", 1.0), ("12.5 %", 0.125), (0.1, 0.1), (0, 0.0), (1, 1.0)],
)
def test_parse_percent(value: str | float, fraction: float) -> None:
    assert parse_percent(value) == pytest.approx(fraction)


@pytest.mark.parametrize("value", ["10", "ten%", "-5%", "101%", 1.5, -0.1, True])
def test_parse_percent_rejects(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_percent(value)


def test_a_percentage_beyond_any_float_is_out_of_range() -> None:
    with pytest.raises(ValueError, match="must be between 0% and 100%"):
        parse_percent(10**400)
    raw = {**minimal(), "monitor": {"jitter": 10**400}}
    assert problems_of(raw) == ["monitor.jitter: must be between 0% and 100% (0 and 1)"]


def test_durations_and_percents_in_the_file() -> None:
    raw = {
        **minimal(interval=45, timeout="2500ms"),
        "monitor": {"interval": "1h30m", "jitter": 0.25, "backoff_max": "2d", "timeout": 3},
        "sinks": [{"type": "webhook", "url": "https://x", "repeat_interval": "4h"}],
    }
    settings = parse_settings(raw, base_dir=Path("/x"), environ={})
    assert settings.monitor.interval == 5400.0
    assert settings.monitor.jitter == 0.25
    assert settings.monitor.backoff_max == 172800.0
    assert settings.targets[0].effective_interval(settings.monitor) == 45.0
    assert settings.targets[0].effective_timeout(settings.monitor) == 2.5
    assert settings.sinks[0].repeat_interval == 14400.0
    assert settings.sinks[0].max_backoff == 600.0
    assert settings.sinks[0].timeout == 10.0


# ----------------------------------------------------------------------------- bounds, sizes

MINIMAL_TOML = """
[monitor]
{monitor}

[storage]
url = "sqlite:///never-opened.db"

[[targets]]
name = "prod"
access_key_id = "key-id"
access_key_secret = "x"
{target}

[[sinks]]
type = "webhook"
url = "https://hooks.example.com/x"
{sink}
"""


@pytest.fixture
def config_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> Iterator[Callable[..., tuple[int, str, str]]]:
    """``config check`` in-process on a file with the given lines in [monitor], the target and
    the sink; returns (exit code, stdout, stderr). The CLI sets up logging: put it back."""
    from monitor.cli import main

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    def check(monitor: str = "", target: str = "", sink: str = "") -> tuple[int, str, str]:
        path = tmp_path / "genauth-monitor.toml"
        path.write_text(MINIMAL_TOML.format(monitor=monitor, target=target, sink=sink))
        code = main(["config", "check", "-c", str(path)])
        out, err = capsys.readouterr()
        return code, out, err

    yield check
    root.handlers[:] = handlers
    root.setLevel(level)


BAD_VALUES = [
    # (section, line, key path): each one is exit 2 and one line naming the key
    ("monitor", 'interval = "9999999999d"', "monitor.interval"),
    ("monitor", 'interval = "1ms"', "monitor.interval"),
    ("monitor", 'interval = "999ms"', "monitor.interval"),
    ("monitor", 'interval = "8d"', "monitor.interval"),
    ("monitor", 'interval = "1w1s"', "monitor.interval"),
    ("monitor", "interval = 1e300", "monitor.interval"),
    ("monitor", "interval = 1e309", "monitor.interval"),  # TOML reads it as inf
    ("monitor", "interval = inf", "monitor.interval"),
    ("monitor", "interval = -inf", "monitor.interval"),
    ("monitor", "interval = nan", "monitor.interval"),
    ("monitor", "interval = 99999999999999999999999", "monitor.interval"),
    ("monitor", f"interval = {10**400}", "monitor.interval"),  # beyond any float
    ("monitor", "interval = true", "monitor.interval"),
    ("monitor", "interval = 0", "monitor.interval"),
    ("monitor", "timeout = 1e300", "monitor.timeout"),
    ("monitor", 'timeout = "9999999999d"', "monitor.timeout"),
    ("monitor", 'timeout = "5m1s"', "monitor.timeout"),
    ("monitor", "timeout = 0", "monitor.timeout"),
    ("monitor", "timeout = nan", "monitor.timeout"),
    ("monitor", "timeout = false", "monitor.timeout"),
    ("monitor", 'backoff_max = "8d"', "monitor.backoff_max"),
    ("monitor", "backoff_max = 1e300", "monitor.backoff_max"),
    ("target", 'interval = "1ms"', "targets[0].interval"),
    ("target", 'interval = "9999999999d"', "targets[0].interval"),
    ("target", "timeout = 1e300", "targets[0].timeout"),
    ("target", 'timeout = "1h"', "targets[0].timeout"),
    ("target", "timeout = inf", "targets[0].timeout"),
    ("sink", 'timeout = "6m"', "sinks[0].timeout"),
    ("sink", 'repeat_interval = "30d"', "sinks[0].repeat_interval"),
    ("sink", "repeat_interval = 1e300", "sinks[0].repeat_interval"),
    ("sink", 'max_backoff = "9999999999d"', "sinks[0].max_backoff"),
    ("sink", "max_backoff = 0", "sinks[0].max_backoff"),
    ("monitor", 'max_response_bytes = "1023B"', "monitor.max_response_bytes"),
    ("monitor", "max_response_bytes = 1023", "monitor.max_response_bytes"),
    ("monitor", 'max_response_bytes = "65MiB"', "monitor.max_response_bytes"),
    ("monitor", 'max_response_bytes = "1GiB"', "monitor.max_response_bytes"),
    ("monitor", f"max_response_bytes = {10**400}", "monitor.max_response_bytes"),
    ("monitor", f'max_response_bytes = "{"9" * 400}MiB"', "monitor.max_response_bytes"),
    ("monitor", 'max_response_bytes = "1 parsec"', "monitor.max_response_bytes"),
    ("monitor", 'max_response_bytes = "MiB"', "monitor.max_response_bytes"),
    ("monitor", "max_response_bytes = -1", "monitor.max_response_bytes"),
    ("monitor", "max_response_bytes = 1048576.0", "monitor.max_response_bytes"),
    ("monitor", "max_response_bytes = inf", "monitor.max_response_bytes"),
    ("monitor", "max_response_bytes = true", "monitor.max_response_bytes"),
    ("target", 'max_response_bytes = "100GiB"', "targets[0].max_response_bytes"),
    ("target", 'max_response_bytes = "1KB"', "targets[0].max_response_bytes"),  # 1000 < 1KiB
]


@pytest.mark.parametrize(("section", "line", "key"), BAD_VALUES)
def test_out_of_range_values_are_one_line_naming_the_key(
    config_check: Callable[..., tuple[int, str, str]], section: str, line: str, key: str
) -> None:
    code, out, err = config_check(**{section: line})
    assert code == 2, out + err
    assert err.count("\n") == 1 and err.startswith(f"{key}: "), err
    assert "Traceback" not in out + err
    assert "configuration OK" not in out


def test_an_integer_too_long_for_python_is_one_line(
    config_check: Callable[..., tuple[int, str, str]],
) -> None:
    code, out, err = config_check(monitor="interval = 1" + "0" * 5000)
    assert code == 2
    assert err.count("\n") == 1 and "invalid TOML: a number is too long" in err, err
    assert "Traceback" not in out + err


@pytest.mark.parametrize(
    ("monitor", "target", "sink", "wanted"),
    [
        ('interval = "1s"', "", "", ("monitor", "interval", 1.0)),
        ('interval = "7d"', "", "", ("monitor", "interval", 604800.0)),
        ('interval = "1w"', "", "", ("monitor", "interval", 604800.0)),
        ('interval = "1h30m"', "", "", ("monitor", "interval", 5400.0)),
        ('timeout = "5m"', "", "", ("monitor", "timeout", 300.0)),
        ('timeout = "250ms"', "", "", ("monitor", "timeout", 0.25)),
        ('backoff_max = "7d"', "", "", ("monitor", "backoff_max", 604800.0)),
        ("", 'interval = "1w"', "", ("target", "interval", 604800.0)),
        ("", 'timeout = "4m59s"', "", ("target", "timeout", 299.0)),
        ("", "", 'timeout = "5m"', ("sink", "timeout", 300.0)),
        ("", "", 'repeat_interval = "1w"', ("sink", "repeat_interval", 604800.0)),
        ("", "", 'max_backoff = "100ms"', ("sink", "max_backoff", 0.1)),
        ('max_response_bytes = "1MiB"', "", "", ("monitor", "max_response_bytes", 1048576)),
        ('max_response_bytes = "512KiB"', "", "", ("monitor", "max_response_bytes", 524288)),
        ('max_response_bytes = "64KiB"', "", "", ("monitor", "max_response_bytes", 65536)),
        ('max_response_bytes = "2MB"', "", "", ("monitor", "max_response_bytes", 2000000)),
        ('max_response_bytes = "1KiB"', "", "", ("monitor", "max_response_bytes", 1024)),
        ('max_response_bytes = "64MiB"', "", "", ("monitor", "max_response_bytes", 64 << 20)),
        ("max_response_bytes = 4096", "", "", ("monitor", "max_response_bytes", 4096)),
        ("", 'max_response_bytes = "2MiB"', "", ("target", "max_response_bytes", 2 << 20)),
    ],
)
def test_values_at_and_inside_the_bounds_are_accepted(
    tmp_path: Path, monitor: str, target: str, sink: str, wanted: tuple[str, str, float]
) -> None:
    path = tmp_path / "genauth-monitor.toml"
    path.write_text(MINIMAL_TOML.format(monitor=monitor, target=target, sink=sink))
    settings = load_settings(path, {})
    section, key, value = wanted
    models = {"monitor": settings.monitor, "target": settings.targets[0], "sink": settings.sinks[0]}
    model = models[section]
    assert getattr(model, key) == pytest.approx(value)


def test_max_response_bytes_per_target_overrides_the_monitor_value() -> None:
    raw = {
        **minimal(max_response_bytes="2MiB"),
        "monitor": {"max_response_bytes": "512KiB"},
    }
    raw["targets"].append({"name": "other", "access_key_id": "id", "access_key_secret": "s"})
    settings = parse_settings(raw, base_dir=Path("/x"), environ={})
    own, inherited = settings.targets
    assert own.effective_max_response_bytes(settings.monitor) == 2 * 1024 * 1024
    assert inherited.effective_max_response_bytes(settings.monitor) == 512 * 1024
    lines = summary(settings)
    assert any(line.startswith("monitor: ") and "max response 512KiB" in line for line in lines)
    assert any(line.startswith("target prod: ") and "max response 2MiB" in line for line in lines)
    assert any(
        line.startswith("target other: ") and "max response 512KiB" in line for line in lines
    )


def test_config_check_prints_the_size_cap(
    config_check: Callable[..., tuple[int, str, str]],
) -> None:
    code, out, err = config_check(monitor='max_response_bytes = "2MB"')
    assert code == 0, err
    assert "max response 2MB" in out


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1MiB", 1 << 20),
        ("1mib", 1 << 20),
        ("512KiB", 512 << 10),
        ("2MB", 2_000_000),
        ("64kB", 64_000),
        ("1GiB", 1 << 30),
        ("1.5KiB", 1536),
        ("100B", 100),
        ("100", 100),
        (" 3 MiB ", 3 << 20),
        (4096, 4096),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MiB", "1 parsec", "1Mb/s", "-1KiB", 1.5, True, None, -1])
def test_parse_size_rejects(text: Any) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (1 << 20, "1MiB"),
        (512 << 10, "512KiB"),
        (2_000_000, "2MB"),
        (64_000, "64kB"),
        (1500, "1500B"),
    ],
)
def test_format_size_is_exact_and_round_trips(size: int, text: str) -> None:
    assert format_size(size) == text
    assert parse_size(format_size(size)) == size


def test_defaults() -> None:
    settings = parse_settings(minimal(), base_dir=Path("/srv/gm"), environ={})
    monitor = settings.monitor
    assert (monitor.interval, monitor.jitter, monitor.timeout) == (60.0, 0.1, 10.0)
    assert (monitor.failure_threshold, monitor.backoff_max, monitor.log_level) == (3, 900.0, "info")
    assert monitor.fingerprint_key is None
    assert monitor.max_response_bytes == 1024 * 1024
    assert settings.targets[0].max_response_bytes is None
    assert settings.targets[0].effective_max_response_bytes(monitor) == 1024 * 1024
    assert settings.server.ui_session == 8 * 3600.0
    assert settings.storage.url == "sqlite:////srv/gm/genauth-monitor.db"
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 9464)
    assert settings.server.api_token is None and not settings.server.metrics_require_token
    target = settings.targets[0]
    assert target.base_url == "https://api.genauth.ai"
    assert (target.interval, target.timeout, target.ca_bundle) == (None, None, None)
    assert (target.expect, target.ignore, target.userpool_id) == ({}, (), None)
    assert settings.sinks == ()
    assert settings.source is None


# ----------------------------------------------------------------------------- paths and files


def test_relative_paths_are_relative_to_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir = tmp_path / "etc"
    (config_dir / "secrets").mkdir(parents=True)
    (config_dir / "secrets" / "prod").write_text(SECRET + "\r\n")
    (config_dir / "secrets" / "fp.key").write_bytes(b"\x00\x01key\n")
    (config_dir / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    (config_dir / "token").write_text("tok\n")
    (config_dir / "monitor.toml").write_text(
        """
[monitor]
fingerprint_key_file = "secrets/fp.key"
[storage]
url = "sqlite:///data/monitor.db"
[server]
api_token_file = "token"
[[targets]]
name = "prod"
access_key_id = "id"
access_key_secret_file = "secrets/prod"
ca_bundle = "ca.pem"
"""
    )
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    settings = load_settings(Path("etc/monitor.toml"), {})
    target = settings.target("prod")
    assert target.access_key_secret.get_secret_value() == SECRET
    assert target.access_key_secret_file == config_dir / "secrets" / "prod"
    assert target.ca_bundle == config_dir / "ca.pem"
    assert settings.monitor.fingerprint_key is not None
    assert settings.monitor.fingerprint_key.get_secret_value() == b"\x00\x01key"
    assert settings.server.api_token is not None
    assert settings.server.api_token.get_secret_value() == "tok"
    assert settings.storage.sqlite_path == config_dir / "data" / "monitor.db"
    assert settings.storage.url == f"sqlite:///{config_dir / 'data' / 'monitor.db'}"
    assert settings.source == config_dir / "monitor.toml"


def test_absolute_and_memory_sqlite_urls_stay() -> None:
    for url, path in [
        ("sqlite:////var/lib/gm/m.db", Path("/var/lib/gm/m.db")),
        ("sqlite://", None),
        ("sqlite:///:memory:", None),
    ]:
        settings = parse_settings({**minimal(), "storage": {"url": url}}, base_dir=Path("/x"))
        assert settings.storage.is_sqlite
        assert settings.storage.sqlite_path == path


def test_postgresql_url_gets_the_psycopg_driver_and_its_password_is_masked() -> None:
    raw = {**minimal(), "storage": {"url": f"postgresql://monitor:{SECRET}@db:5432/gm"}}
    storage = parse_settings(raw, base_dir=Path("/x"), environ={}).storage
    assert storage.url == f"postgresql+psycopg://monitor:{SECRET}@db:5432/gm"
    assert storage.display_url == "postgresql+psycopg://monitor:***@db:5432/gm"
    assert not storage.is_sqlite and storage.sqlite_path is None
    assert SECRET not in repr(storage)


def test_database_url_from_the_environment() -> None:
    raw = {**minimal(), "storage": {"url_env": "DB"}}
    settings = parse_settings(raw, base_dir=Path("/x"), environ={"DB": "postgresql://h/gm"})
    assert settings.storage.url == "postgresql+psycopg://h/gm"
    problems = problems_of(raw, {"DB": f"oracle://u:{SECRET}@h/gm"})
    assert problems == [
        "storage.url_env: environment variable DB: unsupported database 'oracle' "
        "(use sqlite or postgresql+psycopg)"
    ]


def test_load_reports_missing_file_and_bad_toml(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        load_settings(missing, {})
    assert caught.value.problems == [f"{missing}: cannot read config: No such file or directory"]

    bad = tmp_path / "bad.toml"
    bad.write_text(f'[monitor]\ninterval = "60s"\naccess_key_secret = {SECRET}\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(bad, {})
    [line] = caught.value.problems
    assert line.startswith(f"{bad}: invalid TOML: ") and "line 3" in line
    assert SECRET not in line


# ----------------------------------------------------------------------------- the rest


def test_environ_is_read_at_call_time_only(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = minimal(access_key_secret_env="GM_TEST_SECRET")
    del raw["targets"][0]["access_key_secret"]
    monkeypatch.setenv("GM_TEST_SECRET", "from-os-environ")
    settings = parse_settings(raw, base_dir=Path("/x"))
    assert settings.targets[0].access_key_secret.get_secret_value() == "from-os-environ"
    # an explicit environ is the only one consulted
    assert problems_of(raw, {"OTHER": "1"}) == [
        "targets[0].access_key_secret_env: environment variable GM_TEST_SECRET is not set"
    ]


def test_expect_accepts_quoted_and_nested_dotted_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        """
[[targets]]
name = "prod"
access_key_id = "id"
access_key_secret = "s"
ignore = ["sendGridConfig.*", "smtpConfig.sender"]
[targets.expect]
enabled = true
"smtpConfig.smtp_host" = "smtp.example.com"
smtpConfig.smtp_port = 465
ratio = 0.5
"""
    )
    target = load_settings(path, {}).targets[0]
    assert target.expect == {
        "enabled": True,
        "smtpConfig.smtp_host": "smtp.example.com",
        "smtpConfig.smtp_port": 465,
        "ratio": 0.5,
    }
    assert target.ignore == ("sendGridConfig.*", "smtpConfig.sender")


def test_sink_names_default_to_type_or_type_and_index() -> None:
    raw = {
        **minimal(),
        "sinks": [
            {"type": "webhook", "url": "https://a"},
            {"type": "slack", "url": "https://b"},
            {"type": "webhook", "url": "https://c", "secret": "s"},
            {"type": "alertmanager", "url": "https://d", "name": "am"},
        ],
    }
    sinks = parse_settings(raw, base_dir=Path("/x"), environ={}).sinks
    assert [s.name for s in sinks] == ["webhook-0", "slack", "webhook-2", "am"]
    assert sinks[2].secret is not None and sinks[2].secret.get_secret_value() == "s"
    assert sinks[0].secret is None and sinks[0].kinds == () and sinks[0].min_severity == "info"


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("127.0.0.1:9464", "127.0.0.1", 9464),
        ("0.0.0.0:80", "0.0.0.0", 80),
        ("[::1]:9464", "::1", 9464),
        ("[::]:0", "::", 0),
        ("monitor.internal:8080", "monitor.internal", 8080),
    ],
)
def test_listen(listen: str, host: str, port: int) -> None:
    raw = {**minimal(), "server": {"listen": listen}}
    server = parse_settings(raw, base_dir=Path("/x"), environ={}).server
    assert (server.host, server.port) == (host, port)


def test_base_url_loses_its_trailing_slash_and_log_level_its_case() -> None:
    raw = {**minimal(base_url="https://auth.example.com/"), "monitor": {"log_level": "DEBUG"}}
    settings = parse_settings(raw, base_dir=Path("/x"), environ={})
    assert settings.targets[0].base_url == "https://auth.example.com"
    assert settings.monitor.log_level == "debug"


def test_settings_are_frozen_and_target_lookup() -> None:
    settings = parse_settings(minimal(), base_dir=Path("/x"), environ={})
    with pytest.raises(ValidationError):
        settings.targets[0].name = "other"  # type: ignore[misc]
    assert settings.target("prod") is settings.targets[0]
    with pytest.raises(KeyError):
        settings.target("missing")


def test_source_cannot_be_set_from_the_file() -> None:
    assert problems_of({**minimal(), "source": "/etc/passwd"}) == ["source: unknown key"]


def test_default_config_path() -> None:
    assert default_config_path({}) == Path("genauth-monitor.toml")
    assert default_config_path({"GENAUTH_MONITOR_CONFIG": ""}) == Path("genauth-monitor.toml")
    assert default_config_path({"GENAUTH_MONITOR_CONFIG": "/etc/gm.toml"}) == Path("/etc/gm.toml")


def test_parse_settings_does_not_mutate_its_input() -> None:
    raw = {**minimal(), "sinks": [{"type": "webhook", "url": "https://a"}]}
    before = copy.deepcopy(raw)
    parse_settings(raw, base_dir=Path("/x"), environ={})
    assert raw == before


def test_settings_built_in_code_use_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GM_CODE_SECRET", "code-secret")
    target = TargetSettings.model_validate(
        {"name": "t", "access_key_id": "id", "access_key_secret_env": "GM_CODE_SECRET"}
    )
    assert target.access_key_secret.get_secret_value() == "code-secret"
    settings = Settings(targets=(target,))
    assert settings.storage.sqlite_path == Path(os.getcwd()) / "genauth-monitor.db"
