"""The ops console in a real browser: Debian's headless Chromium (driven by Playwright)
against a real `servo up` on 127.0.0.1 whose registry holds a pending promotion with real
evidence, a finished rollout and a failed run (tests/console_seed.py). Every page renders
with no console error, no uncaught exception and no Content-Security-Policy violation; the
evidence charts are there; a viewer cannot approve (even with the disabled form switched
back on: the server refuses); an approver's approval changes the route table and the audit
trail. A screenshot of each page is kept under the test's tmp folder; with
SERVO_CONSOLE_SCREENSHOT=1 the promotion page as an approver sees it also goes to
docs/console-promotion.png (the README's picture).

One test, in two parts: one `servo up` and one browser (a second test would start its
own on another xdist worker)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from registry.store import RegistryStore
from tests.browser import Watched, chromium, new_page, require_chromium
from tests.console_seed import MODEL, Seeded, seed
from tests.upservers import Up, start_up, wait_for

ROOT = Path(__file__).resolve().parent.parent
README_PICTURE = ROOT / "docs" / "console-promotion.png"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@dataclass
class Console:
    up: Up
    seeded: Seeded
    shots: Path

    def url(self, path: str) -> str:
        return f"{self.up.admin}{path}"

    def pages(self) -> dict[str, str]:
        """Every console page of the seeded registry: name -> path."""
        s = self.seeded
        return {
            "models": "/console/models",
            "runs": "/console/runs",
            "run": f"/console/runs/{s.failed_run}",
            "promotions": "/console/promotions",
            "promotion": f"/console/promotions/{s.promotion}",
            "rollouts": "/console/rollouts",
            "rollout": f"/console/rollouts/{s.rollout}",
            "monitors": "/console/monitors",
            "monitor": f"/console/monitors/{MODEL}",
        }


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    require_chromium()
    root = tmp_path
    seeded = seed(root / "s")
    up = start_up(root / "s", root / "up.log")
    try:
        yield Console(up, seeded, root / "screenshots")
    finally:
        up.stop()
        seeded.store.close()


@pytest.fixture
def browser(console: Console) -> Iterator[Any]:
    with chromium() as found:
        yield found


def log_in(console: Console, browser: Any, role: str) -> Watched:
    watched = new_page(browser)
    page = watched.page
    page.goto(console.url("/console/login"))
    page.fill("#token", console.seeded.tokens[role])
    with page.expect_navigation():
        page.click("form.login button[type=submit]")
    assert page.url == console.url("/console/models"), page.content()
    return watched


def visit(console: Console, watched: Watched, name: str, path: str) -> None:
    """Open a page: 200, nothing wrong in the browser, a screenshot kept."""
    response = watched.page.goto(console.url(path))
    assert response is not None and response.status == 200, (path, response)
    watched.page.wait_for_load_state("load")
    assert watched.problems() == [], (path, watched.problems())
    # the stylesheet came (same origin, allowed by the CSP) and applied
    assert watched.page.evaluate("document.styleSheets.length") >= 1
    # every chart is drawn at a readable size (an SVG sized only by its viewBox collapses
    # to nothing in a shrink-to-fit box)
    sizes = "nodes => nodes.map(n => [n.getBoundingClientRect().width, n.clientHeight])"
    for width, height in watched.page.locator("svg").evaluate_all(sizes):
        assert width >= 200 and height >= 80, (path, width, height)
    console.shots.mkdir(exist_ok=True)
    watched.page.screenshot(path=str(console.shots / f"{name}.png"), full_page=True)


def routes(store: RegistryStore) -> list[tuple[int, str, float]]:
    """The model's route table: (version, role, percent) rows."""
    rows = store.deployments().get(MODEL, [])
    return [(int(r["version"]), str(r["role"]), float(r["percent"])) for r in rows]


def test_the_console_in_a_real_browser(console: Console, browser: Any) -> None:
    every_page_renders_without_errors_and_shows_the_evidence(console, browser)
    a_viewer_cannot_approve_and_an_approver_can(console, browser)


def every_page_renders_without_errors_and_shows_the_evidence(
    console: Console, browser: Any
) -> None:
    watched = log_in(console, browser, "viewer")
    for name, path in console.pages().items():
        visit(console, watched, name, path)
        assert (console.shots / f"{name}.png").stat().st_size > 0
    page = watched.page
    page.goto(console.url(console.pages()["promotion"]))
    # the evidence as pictures, drawn server-side (no script on the page at all)
    assert page.locator("svg").count() >= 2
    assert page.locator("script").count() == 0
    # the features that drifted most, each with its reference vs live histogram (the bins
    # the loop's monitor report kept)
    assert page.locator("svg", has_text="reference vs live").count() >= 1
    text = page.inner_text("main")
    assert "champion" in text and "candidate" in text
    # the models page: the route table as seeded (champion and the shadow candidate)
    page.goto(console.url("/console/models"))
    assert "shadow" in page.inner_text("main")
    # the failed run: its DAG and the failing step's log (the traceback, kept with the run)
    page.goto(console.url(console.pages()["run"]))
    assert page.locator("svg").count() >= 1
    assert "label column missing in the new batch" in page.inner_text("main")
    assert "Traceback" in page.inner_text("main")
    # the rollout: the judge's e-value paths and its decision
    page.goto(console.url(console.pages()["rollout"]))
    assert page.locator("svg").count() >= 2  # one per metric
    assert "rolled_back" in page.inner_text("main")
    # the monitors: drift and accuracy over time, the retrain marked
    page.goto(console.url(console.pages()["monitor"]))
    assert page.locator("svg").count() >= 2
    assert "retrain" in page.inner_text("main")
    assert watched.problems() == []


def a_viewer_cannot_approve_and_an_approver_can(console: Console, browser: Any) -> None:
    store, seeded = console.seeded.store, console.seeded
    path = console.pages()["promotion"]
    before = routes(store)
    viewer = log_in(console, browser, "viewer")
    page = viewer.page
    page.goto(console.url(path))
    approve = page.locator("form.decide button.approve")
    assert approve.is_disabled()  # a viewer sees the form, switched off
    # switched back on in the page, the server still refuses the viewer's POST
    page.evaluate("document.querySelectorAll('[disabled]').forEach(e => e.disabled = false)")
    page.fill("#reason-approve", "a viewer tries")
    with page.expect_navigation() as navigation:
        approve.click()
    assert navigation.value is not None and navigation.value.status == 403
    assert store.promotion(seeded.promotion)["status"] == "pending"
    assert routes(store) == before
    refused = [e for e in store.audit(action="attempt") if e["actor"] == "console-viewer"]
    assert refused and refused[-1]["detail"]["status"] == 403, refused

    approver = log_in(console, browser, "approver")
    page = approver.page
    page.goto(console.url(path))
    assert not page.locator("form.decide button.approve").is_disabled()
    page.screenshot(path=str(console.shots / "promotion-approver.png"), full_page=True)
    if os.environ.get("SERVO_CONSOLE_SCREENSHOT"):  # the README's picture: what an approver sees
        README_PICTURE.parent.mkdir(exist_ok=True)
        shutil.copyfile(console.shots / "promotion-approver.png", README_PICTURE)
    page.fill("#reason-approve", "better on the same live requests <script>alert(1)</script>")
    with page.expect_navigation() as navigation:
        page.click("form.decide button.approve")
    assert navigation.value is not None and navigation.value.status == 200
    assert page.url == console.url(path)
    assert approver.problems() == [], approver.problems()
    decided = store.promotion(seeded.promotion)
    assert decided["status"] in ("approved", "promoted"), decided
    assert decided["decision"]["actor"] == "console-approver"
    actions = [(e["actor"], e["action"]) for e in decided["audit"]]
    assert ("console-approver", "promotion_approved") in actions, actions
    # the reason shows as text on the page, never as a tag
    assert "<script>alert(1)</script>" in page.inner_text("main")
    assert page.locator("main script").count() == 0
    # the rollout that the approval started changes the route table: the candidate takes
    # canary traffic (or is the champion already)
    changed = wait_for(lambda: routes(store) != before and routes(store))
    assert any(v == seeded.candidate and role in ("canary", "champion") for v, role, _ in changed)
    page.goto(console.url("/console/models"))
    table = page.inner_text("main")
    assert "canary" in table or f"{seeded.candidate}\tchampion" in table
    page.screenshot(path=str(console.shots / "models-after-approval.png"), full_page=True)
