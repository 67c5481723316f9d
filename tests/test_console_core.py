"""The console's core on a real admin server on 127.0.0.1 over a real SQLite registry:
the login flow and its cookie, sessions ended by logout, expiry or a revoked token, the
security headers on every answer, CSRF refusals (audited), 404s, and the models page
(versions, aliases, route table, loop state, the champion's live accuracy)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from monitors.monitor import AccuracyReport, MonitorReport
from servo.auth import Authenticator
from servo.console.auth import Sessions
from servo.loop import check_accuracy
from tests.admin import Admin, running_admin, snapshot
from tests.console_login import Clients, csrf, field, secured

SCRIPT = "<script>alert(1)</script>"


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[Admin]:
    with running_admin(tmp_path) as running:
        yield running


@pytest.fixture
def web(admin: Admin) -> Iterator[Clients]:
    clients = Clients(admin.url)
    yield clients
    clients.close()


def attempts(admin: Admin) -> list[dict[str, object]]:
    return [e for e in admin.store.audit(limit=100) if e["action"] == "attempt"]


def test_login_sets_a_strict_cookie_and_logout_ends_the_session(admin: Admin, web: Clients) -> None:
    anonymous = web.anonymous()
    away = anonymous.get("/console/models")
    assert away.status_code == 303 and away.headers["location"] == "/console/login"
    assert anonymous.get("/console").headers["location"] == "/console/models"
    form = anonymous.get("/console/login")
    nonce = field(form.text, "nonce")
    bad = anonymous.post("/console/login", data={"token": "servo_" + "x" * 43, "nonce": nonce})
    assert bad.status_code == 401 and "unknown, revoked or malformed token" in bad.text
    assert [e["detail"]["action"] for e in attempts(admin)] == ["console login"]
    stale = anonymous.post("/console/login", data={"token": admin.tokens["viewer"]})
    assert stale.status_code == 403 and "servo_console=" not in stale.headers.get("set-cookie", "")

    client = web.anonymous()
    nonce = field(client.get("/console/login").text, "nonce")
    answer = client.post("/console/login", data={"token": admin.tokens["viewer"], "nonce": nonce})
    assert answer.status_code == 303
    (cookie,) = [c for c in answer.headers.get_list("set-cookie") if c.startswith("servo_console=")]
    session_id = cookie.split(";")[0].split("=", 1)[1]
    assert len(session_id) >= 43  # 32 random bytes, URL-safe base64
    flags = {f.strip() for f in cookie.split(";")[1:]}
    assert {"HttpOnly", "SameSite=Strict", "Path=/console"} <= flags and "Secure" not in flags
    page = client.get("/console/models")
    assert page.status_code == 200 and "viewer-1 (viewer)" in page.text

    assert client.post("/console/logout").status_code == 403  # no CSRF token: refused
    out = client.post("/console/logout", data={"csrf": field(page.text, "csrf")})
    assert out.status_code == 303 and out.headers["location"] == "/console/login"
    assert "Max-Age=0" in out.headers["set-cookie"]
    with httpx.Client(cookies={"servo_console": session_id}) as replay:
        replayed = replay.get(f"{admin.url}/console/models")
    assert replayed.status_code == 303  # the session is gone server-side


def test_the_cookie_is_secure_when_served_over_https(tmp_path: Path) -> None:
    with running_admin(tmp_path, console_secure=True) as admin, httpx.Client() as client:
        nonce = field(client.get(f"{admin.url}/console/login").text, "nonce")
        form = {"token": admin.tokens["viewer"], "nonce": nonce}
        answer = client.post(f"{admin.url}/console/login", data=form)
        assert all("; Secure" in c for c in answer.headers.get_list("set-cookie"))


def test_a_revoked_token_ends_its_session_at_once(admin: Admin, web: Clients) -> None:
    client = web.login(admin.tokens["operator"])
    assert client.get("/console/promotions").status_code == 200
    admin.store.revoke_token("operator-1", "setup")
    assert client.get("/console/promotions").headers["location"] == "/console/login"


def test_sessions_expire_after_their_lifetime(admin: Admin, web: Clients) -> None:
    now = [0.0]
    sessions = Sessions(Authenticator(admin.store), lifetime_s=60, clock=lambda: now[0])
    session = sessions.login(admin.tokens["viewer"])
    assert session is not None and sessions.current(session.id) == session
    assert sessions.current(session.id + "A") is None
    now[0] = 59.0
    assert sessions.current(session.id) is not None
    now[0] = 60.0
    assert sessions.current(session.id) is None and len(sessions) == 0
    assert sessions.login("servo_not-a-token") is None


def test_every_answer_carries_the_security_headers(admin: Admin, web: Clients) -> None:
    request = admin.file()
    anonymous = web.anonymous()
    for path in ("/console", "/console/login", "/console/models", "/console/static/console.css"):
        secured(anonymous.get(path))
    secured(anonymous.post("/console/login", data={}))
    client = web.login(admin.tokens["approver"])
    pages = ["/console/models", "/console/promotions", f"/console/promotions/{request}",
             "/console/runs", "/console/rollouts", "/console/monitors",
             "/console/monitors/digits"]  # fmt: skip
    for path in pages:
        page = client.get(path)
        assert page.status_code == 200, page.text
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        secured(page)
        # the CSP forbids inline scripts and styles: the pages hold none
        assert (
            "<script" not in page.text and "style=" not in page.text and "<style" not in page.text
        )
        assert re.search(r"\son[a-z]+=", page.text) is None  # no inline event handlers
        assert 'href="/console/static/console.css"' in page.text  # nothing from elsewhere:
        assert re.search(r'(src|href|action)="(https?:)?//', page.text) is None
    unknown = ("/console/nope", "/console/promotions/1/nope", "/console/a/b/c")
    for path in ("/console/promotions/999", "/console/promotions/abc", "/console/promotions/0",
                 *unknown):  # fmt: skip
        missing = client.get(path)
        assert missing.status_code == 404, path
        secured(missing)
    css = client.get("/console/static/console.css")
    assert css.headers["content-type"].startswith("text/css") and b"body" in css.content


def test_a_post_without_the_sessions_csrf_token_is_refused_and_audited(
    admin: Admin, web: Clients
) -> None:
    request = admin.file()
    approver, other = (
        web.login(admin.tokens["approver"]),
        web.login(admin.tokens["approver"]),
    )
    path = f"/console/promotions/{request}"
    page = approver.get(path)
    evidence = field(page.text, "evidence")
    before = snapshot(admin.store)
    for token in (None, csrf(other, path), "x" * 43):
        form = {"reason": "ship it", "evidence": evidence}
        if token is not None:
            form["csrf"] = token
        refused = approver.post(f"{path}/approve", data=form)
        assert refused.status_code == 403 and "CSRF" in refused.text
        secured(refused)
    no_session = web.anonymous().post(f"{path}/approve", data={"reason": "x", "csrf": "x"})
    assert no_session.status_code == 403
    assert snapshot(admin.store) == before
    refusals = attempts(admin)
    assert [e["detail"]["action"] for e in refusals] == ["console approve"] * 4
    assert all(e["subject"] == f"promotion/{request}" for e in refusals)
    assert [e["actor"] for e in refusals[:3]] == ["approver-1"] * 3
    trail = admin.store.promotion(request)["audit"]
    assert sum(e["action"] == "attempt" for e in trail) == 4  # linked to the request


def test_the_models_page_shows_versions_routes_loop_and_live_accuracy(
    admin: Admin, web: Clients
) -> None:
    client = web.login(admin.tokens["viewer"])
    page = client.get("/console/models").text
    assert "digits" in page and "champion" in page and "no labels yet" in page
    assert "the loop has not run for this model" in page
    shadow = admin.version()
    admin.store.set_deployments("digits", [(1, "champion", 100.0), (shadow, "shadow", 0.0)], "t")
    admin.store.pause_loop("digits", "operator-1", "maintenance")
    for labelled, correct in ((40, 30), (80, 68)):
        accuracy = AccuracyReport(
            labelled=labelled, correct=correct, accuracy=correct / labelled, wilson_low=None,
            wilson_high=None, predicted=200, coverage=labelled / 200, delay_p50_s=1.0,
            delay_p90_s=2.0, baseline=0.9, tolerance=0.05, detector="ucb",
            drift_detected=False, detected_at_label=None, detected_at=None,
            history_labels=labelled, verdict="ok",
        )  # fmt: skip
        from retrain.evidence import wilson

        low, high = wilson(correct, labelled)
        accuracy.wilson_low, accuracy.wilson_high = low, high
        report = MonitorReport("digits", "1", "payload-log", 900.0, None, "ok", accuracy=accuracy)
        admin.store.record_loop_event(
            "digits", "check", {"version": 1, "accuracy": check_accuracy(report)}
        )
    page = client.get("/console/models").text
    assert "no labels yet" not in page
    assert "<strong>0.850</strong>" in page  # the newest check: 68 of 80
    assert f"95% interval {low:.3f} to {high:.3f}" in page
    assert "on 80 labelled of 200 predicted rows" in page and "label coverage 40%" in page
    assert "<svg" in page and "live accuracy and label coverage" in page
    assert "<td>shadow</td>" in page and "(paused)" in page


def test_names_are_shown_escaped(admin: Admin, web: Clients) -> None:
    folder = admin.root / "hostile"
    folder.mkdir()
    admin.store.register_version(SCRIPT, folder.as_uri(), {})
    client = web.login(admin.tokens["viewer"])
    page = client.get("/console/models").text
    assert SCRIPT not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
