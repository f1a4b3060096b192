"""A real headless Chromium for the dashboard tests: the machine's own, driven by Playwright.

Playwright never downloads a browser here: it drives the system's Chromium
(Debian's ``chromium`` package, or ``CHROMIUM_PATH``) through ``executable_path``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests.helpers import ROOT

__all__ = ["ARTIFACTS", "LAUNCH_ARGS", "Dashboard", "chromium_path"]

#: Screenshots land here (CI keeps the folder; git ignores it).
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS") or ROOT / "test-artifacts") / "dashboard"

#: No sandbox (CI runs as root); no calls to Google's services, which this
#: network refuses, and which a dashboard test has no use for.
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def chromium_path() -> str | None:
    configured = os.environ.get("CHROMIUM_PATH")
    if configured:
        return configured
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Dashboard:
    """One browser context (its own cookies) on a stack's dashboard."""

    def __init__(
        self,
        browser: Browser,
        base_url: str,
        *,
        width: int = 1280,
        height: int = 860,
        dark: bool = False,
        shots: Path | None = None,
    ) -> None:
        self.base_url = base_url
        self.shots = shots
        self.context: BrowserContext = browser.new_context(
            base_url=base_url,
            viewport={"width": width, "height": height},
            color_scheme="dark" if dark else "light",
        )
        self.context.set_default_timeout(20_000)
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on(
            "console",
            lambda msg: self.errors.append(msg.text) if msg.type == "error" else None,
        )

    def open(self, path: str) -> Page:
        self.page.goto("/dashboard" + path)
        return self.page

    def sign_in(self, key: str) -> Page:
        page = self.open("/login")
        page.fill("input[name=api_key]", key)
        page.click("form[action$='/login'] button[type=submit]")
        page.wait_for_url("**/dashboard/runs")
        return page

    def wait_live(self) -> None:
        expect(self.page.locator("#live-state")).to_have_attribute("data-state", "live")

    def submit(self, button: str, *, confirm: bool = False) -> None:
        """Click a form's button (accepting its confirmation) and wait for the next page."""
        if confirm:
            self.page.once("dialog", lambda dialog: dialog.accept())
        with self.page.expect_navigation():
            self.page.click(button)

    def cookies(self) -> dict[str, Any]:
        return {c["name"]: c for c in self.context.cookies()}

    def http(self) -> httpx.Client:
        """An HTTP client holding this browser's session cookie."""
        client = httpx.Client(base_url=self.base_url, timeout=20.0)
        for name, cookie in self.cookies().items():
            client.cookies.set(name, cookie["value"], path=cookie["path"])
        return client

    def screenshot(self, name: str, *, full_page: bool = True) -> Path | None:
        if self.shots is None:
            return None
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def close(self) -> None:
        self.context.close()
