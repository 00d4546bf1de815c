"""The web view in a real browser: Debian's chromium driven by Playwright (no browser download).

Skipped where chromium is not installed, failed instead when GENAUTH_MONITOR_REQUIRE_EXTERNALS=1
(CI: .ci/run installs it).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, Dialog, Page, Request, expect, sync_playwright

from monitor.app import build_runtime
from monitor.simulator import SimulatedGenAuth
from tests.conftest import FakeClock
from tests.externals import binary
from tests.helpers import runtime_settings, serve_app

TOKEN = "Browser-Test-Token-91"
HOSTILE = "<script>alert(1)</script>"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

pytestmark = pytest.mark.slow  # a real browser process


@dataclass
class Served:
    base: str
    hashes: list[str]  # oldest first: first sighting, hostile host, port changed


@pytest.fixture
def served(tmp_path: Path, clock: FakeClock) -> Iterator[Served]:
    with SimulatedGenAuth(access_key_secret="Browser-Access-Secret-92") as sim:
        settings = runtime_settings(f"sqlite:///{tmp_path / 'monitor.db'}", sim, tmp_path)
        runtime = build_runtime(settings, clock=clock)
        hashes: list[str] = []
        for change in [{}, {"smtp_host": HOSTILE}, {"smtp_port": 2525}]:
            data = sim.data
            data["smtpConfig"].update(change)
            sim.set_data(data)
            clock.advance(60)
            polled = runtime.pollers["prod"].poll()
            assert polled.hash is not None, polled.error
            hashes.append(polled.hash)
        _, server = serve_app(runtime, clock, TOKEN)
        try:
            yield Served(f"http://127.0.0.1:{server.port}", hashes)
        finally:
            server.stop()
            runtime.store.engine.dispose()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = binary("chromium")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


class Watched:
    """A page whose requests and dialogs are recorded."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        self.console: list[str] = []
        page.set_default_timeout(10_000)
        page.on("request", self._request)
        page.on("dialog", self._dialog)
        page.on("console", lambda message: self.console.append(message.text))

    def _request(self, request: Request) -> None:
        self.requests.append(request.url)

    def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def off_loopback(self) -> list[str]:
        return [url for url in self.requests if urlsplit(url).hostname != "127.0.0.1"]


def _log_in(page: Page, base: str) -> None:
    page.goto(base + "/ui/")
    expect(page).to_have_url(base + "/ui/login?next=%2Fui%2F")
    page.fill("#token", TOKEN)
    page.click("form.login button")
    expect(page).to_have_url(base + "/ui/")


def _highlight(page: Page, path: str) -> Any:
    row = page.locator(f'table.fields tr[data-path="{path}"]')
    return row.first.evaluate("row => getComputedStyle(row.cells[0]).backgroundColor")


def test_log_in_compare_step_back_and_see_hostile_text_as_text(
    browser: Browser, served: Served
) -> None:
    base, hashes = served.base, served.hashes
    context = browser.new_context()
    watched = Watched(context.new_page())
    page = watched.page
    _log_in(page, base)
    cookies = {c["name"]: c for c in context.cookies()}
    cookie = cookies["genauth_monitor_ui"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
    assert page.evaluate("document.cookie") == "", "HttpOnly: no script can read it"

    page.click("a.target >> text=prod")
    expect(page.locator("h1")).to_contain_text("Timeline of prod")
    expect(page.locator("table.events span.kind").first).to_have_text("delivery_changed")

    # The pickers list the snapshots newest first: the port change (2) and the hostile host (1).
    pickers = page.locator("form.pickers")
    pickers.locator("select[name=from]").select_option(label=_label(page, hashes[1]))
    pickers.locator("select[name=to]").select_option(label=_label(page, hashes[2]))
    pickers.locator("button").click()
    expect(page.locator("h1")).to_contain_text("Compare snapshots of prod")
    assert "from=" in page.url and "to=" in page.url, "a GET form: the URL is a bookmark"
    changed = page.locator("table.fields tr.changed")
    expect(changed).to_have_count(1)
    expect(changed).to_have_attribute("data-path", "smtpConfig.smtp_port")
    expect(changed.locator("td").nth(2)).to_have_text("2525")
    plain = _highlight(page, "smtpConfig.sender")
    assert _highlight(page, "smtpConfig.smtp_port") != plain, "the changed field stands out"

    page.click("a.previous-change")
    expect(changed).to_have_count(1)
    expect(changed).to_have_attribute("data-path", "smtpConfig.smtp_host")
    expect(changed.locator("td").nth(2)).to_have_text(f'"{HOSTILE}"')
    assert page.locator("main script").count() == 0, "the upstream string made no element"
    assert page.locator("script").count() == 1  # only /ui/static/ui.js

    page.click(f"a.hash[title='{hashes[1]}']")
    expect(page.locator("pre.document")).to_contain_text(HOSTILE)
    expect(page.locator("button[data-copy]")).to_be_visible()  # ui.js ran under the CSP

    assert watched.dialogs == [], "no alert ran"
    assert watched.off_loopback() == [], "no request left the loopback host"
    assert not [m for m in watched.console if "Content Security Policy" in m], watched.console
    context.close()


def test_the_pages_work_without_javascript(browser: Browser, served: Served) -> None:
    context = browser.new_context(java_script_enabled=False)
    watched = Watched(context.new_page())
    page = watched.page
    _log_in(page, served.base)
    page.goto(f"{served.base}/ui/targets/prod/diff?from={served.hashes[0]}&to={served.hashes[1]}")
    expect(page.locator("table.fields tr.changed")).to_have_attribute(
        "data-path", "smtpConfig.smtp_host"
    )
    page.click("a.next-change")
    expect(page.locator("table.fields tr.changed")).to_have_attribute(
        "data-path", "smtpConfig.smtp_port"
    )
    page.goto(f"{served.base}/ui/snapshots/{served.hashes[1]}")
    expect(page.locator("pre#recompute")).to_contain_text(served.hashes[1])
    expect(page.locator("button[data-copy]")).to_be_hidden()  # the command is there to select
    page.goto(served.base + "/ui/verify")
    page.click("form[action='/ui/verify'] button")
    expect(page.locator(".verdict.intact")).to_be_visible()
    page.click("header form button")  # log out
    expect(page).to_have_url(served.base + "/ui/login")
    page.goto(served.base + "/ui/")
    expect(page).to_have_url(served.base + "/ui/login?next=%2Fui%2F")
    assert watched.dialogs == [] and watched.off_loopback() == []
    context.close()


def _label(page: Page, hash_: str) -> str:
    option = page.locator("form.pickers select[name=from] option", has_text=hash_[7:19])
    return str(option.first.text_content())
