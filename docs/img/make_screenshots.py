"""Screenshots of the web view for docs/audit.md: the timeline of a target and a diff.

    .venv/bin/python docs/img/make_screenshots.py

Plays the demo scenario (SMTP host moved, password rotated, provider disabled, re-enabled,
switched to SendGrid) against the built-in simulator, a minute apart, into a temporary SQLite
database, serves the daemon's app on loopback and photographs it with Debian's chromium
(``apt-get install chromium``) through Playwright. Not a test: run it when the pages change and
commit the PNGs.
"""

from __future__ import annotations

import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from playwright.sync_api import sync_playwright

from monitor.api import create_app
from monitor.app import build_runtime
from monitor.config import parse_settings
from monitor.http_server import HttpServer
from monitor.simulator import DEMO_SCENARIO, SimulatedGenAuth

HERE = Path(__file__).resolve().parent
TOKEN = "screenshot-token"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


class _Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def main() -> int:
    clock = _Clock()
    with tempfile.TemporaryDirectory() as directory, SimulatedGenAuth() as sim:
        base_dir = Path(directory)
        settings = parse_settings(
            {
                "monitor": {"fingerprint_key_env": "FP"},
                "storage": {"url": f"sqlite:///{base_dir / 'monitor.db'}"},
                "targets": [
                    {
                        "name": "prod",
                        "base_url": sim.base_url,
                        "access_key_id": sim.access_key_id,
                        "access_key_secret_env": "SECRET",
                        "expect": {"enabled": True, "type": "custom"},
                    }
                ],
            },
            base_dir=base_dir,
            environ={"FP": "screenshots", "SECRET": sim.access_key_secret},
        )
        runtime = build_runtime(settings, clock=clock)
        for step in DEMO_SCENARIO:
            sim.set_data(step)
            runtime.pollers["prod"].poll()
            clock.now += timedelta(minutes=7)
        app = create_app(
            registry=runtime.registry,
            queries=runtime.queries,
            ready=lambda: (True, {}),
            api_token=TOKEN,
            clock=clock,
            targets=["prod"],
        )
        server = HttpServer(app, host="127.0.0.1", port=0)
        server.start()
        try:
            _photograph(f"http://127.0.0.1:{server.port}")
        finally:
            server.stop()
            runtime.store.engine.dispose()
    return 0


def _photograph(base: str) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(base + "/ui/")
        page.fill("#token", TOKEN)
        page.click("form.login button")
        page.click("a.target >> text=prod")
        page.wait_for_selector("table.events")
        page.screenshot(path=str(HERE / "timeline.png"), full_page=True)
        options = page.locator("select[name=from] option")
        page.select_option("select[name=from]", options.nth(5).get_attribute("value"))
        page.select_option("select[name=to]", options.nth(4).get_attribute("value"))
        page.click("form.pickers button")
        page.wait_for_selector("table.fields")
        page.screenshot(path=str(HERE / "diff.png"), full_page=True)
        browser.close()
    print(f"wrote {HERE / 'timeline.png'} and {HERE / 'diff.png'}")


if __name__ == "__main__":
    sys.exit(main())
