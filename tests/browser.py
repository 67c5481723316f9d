"""Debian's headless Chromium driven by Playwright (the `browser` extra), for the console's
browser test. No browser is ever downloaded (`playwright install` is not used): Playwright
starts /usr/bin/chromium with exactly the flags below, none of its own, and an empty
profile folder; what a page logs as an error, throws, or refuses under its
Content-Security-Policy is collected for the test to assert on."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page

CHROMIUM = Path("/usr/bin/chromium")
#: the flags the issue names (no network here: background fetches and updates stay off)
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)  # fmt: skip
#: recorded in every page before its own content runs: each CSP violation, as text
WATCH_CSP = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__csp.push(e.violatedDirective + " " + (e.blockedURI || "inline"));
});
"""


def require_chromium() -> None:
    """Skip (saying why) when Debian's chromium or the Python playwright is missing
    (`make test` installs both: scripts/test-deps.sh)."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing (Debian package chromium; make test installs it)")
    pytest.importorskip("playwright.sync_api", reason="the `browser` extra (playwright)")


@dataclass
class Watched:
    """A page with what went wrong in it: console errors, uncaught exceptions."""

    page: Page
    errors: list[str] = field(default_factory=list)

    def violations(self) -> list[str]:
        found: list[str] = self.page.evaluate("window.__csp || []")
        return found

    def problems(self) -> list[str]:
        """Everything that should not happen on a console page, as text."""
        return [*self.errors, *(f"CSP: {v}" for v in self.violations())]


def watch(page: Page) -> Watched:
    watched = Watched(page)

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            watched.errors.append(f"console: {message.text} ({message.location})")

    page.on("console", on_console)
    page.on("pageerror", lambda error: watched.errors.append(f"pageerror: {error}"))
    page.add_init_script(WATCH_CSP)
    return watched


@contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's Chromium, headless, with an empty profile in a temporary folder (removed
    after); Playwright talks to it over a pipe."""
    from playwright.sync_api import sync_playwright

    profile = Path(tempfile.mkdtemp(prefix="servo-chromium-"))
    args: list[str] = [*FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe"]
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=args, ignore_default_args=True
            )
            try:
                yield browser
            finally:
                browser.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def new_page(browser: Browser, **options: Any) -> Watched:
    """A page in a fresh context (its own cookies), watched."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, **options)
    return watch(context.new_page())
