"""``urls = [...]`` of an alertmanager sink (SPEC §10): exactly one of url and urls, each
problem named by its key, exit 2 from the CLI; the URLs never printed beyond scheme and host."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from monitor.config import parse_settings
from tests.helpers import run_main
from tests.test_config import minimal, problems_of

AM = "http://am1:9093"


def _sinks(*sinks: dict[str, Any]) -> dict[str, Any]:
    return {**minimal(), "sinks": list(sinks)}


@pytest.mark.parametrize(
    ("sink", "environ", "problem"),
    [
        (
            {"type": "alertmanager", "url": AM, "urls": [AM]},
            {},
            "sinks[0].urls: give either urls or url, not both",
        ),
        (
            {"type": "alertmanager", "url_env": "AM_URL", "urls": [AM]},
            {"AM_URL": AM},
            "sinks[0].urls: give either urls or url_env, not both",
        ),
        (
            {"type": "webhook", "urls": [AM]},
            {},
            "sinks[0].urls: only alertmanager sinks take several URLs (use url)",
        ),
        ({"type": "alertmanager", "urls": []}, {}, "sinks[0].urls: must list 1 to 16 URLs"),
        (
            {"type": "alertmanager", "urls": [f"http://am{i}:9093" for i in range(17)]},
            {},
            "sinks[0].urls: must list 1 to 16 URLs",
        ),
        (
            {"type": "alertmanager", "urls": [AM, AM]},
            {},
            "sinks[0].urls: lists one URL twice (each gets every alert once)",
        ),
        (
            {"type": "alertmanager", "urls": [AM, "ftp://am2/"]},
            {},
            "sinks[0].urls[1]: must be an http:// or https:// URL with a host",
        ),
        ({"type": "alertmanager", "urls": AM}, {}, "sinks[0].urls: must be an array"),
        (
            {"type": "alertmanager"},
            {},
            "sinks[0].url: required key is missing (set url_env, url_file, url or urls)",
        ),
    ],
)
def test_urls_problems_name_the_key(
    sink: dict[str, Any], environ: dict[str, str], problem: str
) -> None:
    assert problems_of(_sinks(sink), environ) == [problem]


def test_url_or_urls_give_the_lanes_in_order() -> None:
    settings = parse_settings(
        _sinks(
            {"type": "alertmanager", "name": "one", "url": AM},
            {"type": "alertmanager", "name": "two", "urls": ["http://u:pw@am2:9093/x", AM]},
        ),
        base_dir=Path("/etc/gm"),
        environ={},
    )
    one, two = settings.sinks
    assert one.lane_urls == (AM,) and one.urls is None
    assert two.lane_urls == ("http://u:pw@am2:9093/x", AM)
    assert two.url == "http://u:pw@am2:9093/x", "url is the first of urls"
    assert two.display_url == "http://am2:9093/..., http://am1:9093/..."
    assert "pw" not in repr(two)


def test_config_check_exits_2_naming_urls_and_prints_no_credential(tmp_path: Path) -> None:
    path = tmp_path / "genauth-monitor.toml"
    target = '[[targets]]\nname = "prod"\naccess_key_id = "id"\naccess_key_secret = "s"\n'
    sink = '[[sinks]]\ntype = "alertmanager"\n'
    path.write_text(target + sink + f'url = "{AM}"\nurls = ["{AM}"]\n')
    bad = run_main("config", "check", "-c", str(path))
    assert bad.returncode == 2
    assert "sinks[0].urls: give either urls or url, not both" in bad.stderr

    path.write_text(
        target + sink + 'urls = ["http://u:Am-Password-1@am1:9093", "http://am2:9093"]\n'
    )
    good = run_main("config", "check", "-c", str(path))
    assert good.returncode == 0, good.stderr
    assert "http://am1:9093/..., http://am2:9093/..." in good.stdout
    assert "Am-Password-1" not in good.stdout + good.stderr
