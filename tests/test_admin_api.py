"""The admin API on a real server on 127.0.0.1 over a real SQLite registry: every endpoint,
the promotion flow (a filed request approved over HTTP: the candidate becomes champion at
once, the old one archived, all audited with a rollback pointer), rejection, rollback,
manual retrains, pause and resume, and the same flow with curl as the README shows it."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from registry.promotions import evidence_hash
from retrain.rollout import ImmediateRollout
from servo.admin import AdminServer
from tests.admin import EVIDENCE, Admin, running_admin


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[Admin]:
    with running_admin(tmp_path) as running:
        yield running


def champion(admin: Admin) -> int:
    rows = admin.store.deployments()["digits"]
    (version,) = [r["version"] for r in rows if r["role"] == "champion"]
    assert admin.store.aliases("digits")["champion"] == version
    return version


def test_listens_on_loopback_and_answers_json(admin: Admin) -> None:
    assert admin.server.host == "127.0.0.1"
    with socket.create_connection(("127.0.0.1", admin.server.port or 0), timeout=5):
        pass
    with admin.client("viewer") as client:
        me = client.get("/admin/whoami")
        assert me.status_code == 200 and me.headers["content-type"] == "application/json"
        assert me.json() == {"name": "viewer-1", "role": "viewer", "roles": ["viewer"]}
        missing = client.get("/admin/nothing")
        assert missing.status_code == 404 and "error" in missing.json()


def test_approve_makes_the_candidate_champion_at_once(admin: Admin) -> None:
    candidate = admin.version()
    request_id = admin.file(candidate)
    with admin.client("viewer") as viewer:
        pending = viewer.get("/admin/promotions", params={"status": "pending"}).json()
        assert [p["id"] for p in pending["promotions"]] == [request_id]
        doc = viewer.get(f"/admin/promotions/{request_id}").json()
    assert doc["status"] == "pending" and doc["evidence"] == EVIDENCE
    assert doc["evidence_hash"] == evidence_hash(EVIDENCE)
    with admin.client("approver") as approver:
        reply = approver.post(
            f"/admin/promotions/{request_id}/approve",
            json={"reason": "ahead on the drifted traffic", "evidence_hash": doc["evidence_hash"]},
        )
    assert reply.status_code == 200, reply.text
    done = reply.json()
    assert done["status"] == "promoted"
    assert done["decision"]["decision"] == "approved" and done["decision"]["actor"] == "approver-1"
    assert done["decision"]["reason"] == "ahead on the drifted traffic"
    assert champion(admin) == candidate
    statuses = {v.version: v.status for v in admin.store.versions("digits")}
    assert statuses == {1: "archived", candidate: "production"}
    with admin.client("operator") as operator:
        assert operator.get("/admin/promotions", params={"status": "pending"}).json() == {
            "promotions": []
        }
        audit = operator.get("/admin/audit", params={"limit": "50"}).json()["entries"]
    actions = [e["action"] for e in audit]
    assert "promotion_approved" in actions or "promotion_decided" in actions, actions
    swaps = [e for e in audit if e.get("rollback") and e["subject"].startswith("digits")]
    assert swaps, audit  # the route change, with what it replaced
    assert any(e["actor"] == "approver-1" for e in swaps)


def test_reject_keeps_the_champion(admin: Admin) -> None:
    request_id = admin.file()
    with admin.client("approver") as client:
        reply = client.post(f"/admin/promotions/{request_id}/reject", json={"reason": "not now"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["status"] == "rejected"
    assert reply.json()["decision"]["reason"] == "not now"
    assert champion(admin) == 1
    with admin.client("viewer") as client:
        rejected = client.get("/admin/promotions", params={"status": "rejected"}).json()
    assert [p["id"] for p in rejected["promotions"]] == [request_id]


def test_rollback_to_the_previous_champion_and_to_a_version(admin: Admin) -> None:
    second = admin.version()
    request_id = admin.file(second)
    with admin.client("approver") as client:
        assert client.post(f"/admin/promotions/{request_id}/approve", json={}).status_code == 200
    assert champion(admin) == second
    with admin.client("operator") as client:
        back = client.post("/admin/models/digits/rollback", json={"reason": "regression"})
        assert back.status_code == 200, back.text
        assert back.json() == {"model": "digits", "champion": 1, "was": second}
        assert champion(admin) == 1
        to = client.post("/admin/models/digits/rollback", json={"to": second})
        assert to.status_code == 200, to.text
        assert to.json()["champion"] == second and champion(admin) == second
    rollbacks = [e for e in admin.store.audit() if e["actor"] == "operator-1"]
    assert rollbacks and all(e.get("rollback") for e in rollbacks if e["subject"] == "digits")


def test_manual_retrain_is_queued_for_the_loop(admin: Admin) -> None:
    with admin.client("operator") as client:
        reply = client.post("/admin/models/digits/retrain", json={"reason": "new labels"})
    assert reply.status_code == 202, reply.text
    queued = reply.json()
    assert queued["model"] == "digits" and queued["status"] == "queued"
    taken = admin.store.take_retrain_requests()
    assert [(t["id"], t["model"], t["actor"], t["reason"]) for t in taken] == [
        (queued["request"], "digits", "operator-1", "new labels")
    ]


def test_pause_resume_and_the_loop_state(admin: Admin) -> None:
    with admin.client("operator") as client:
        paused = client.post("/admin/models/digits/pause", json={"reason": "maintenance"})
        assert paused.status_code == 200 and paused.json() == {"model": "digits", "paused": True}
        states = client.get("/admin/loop").json()["models"]
        assert states["digits"]["paused"] is True
        resumed = client.post("/admin/models/digits/resume")
        assert resumed.status_code == 200 and resumed.json()["paused"] is False
        assert client.get("/admin/loop").json()["models"]["digits"]["paused"] is False
    actions = [e["action"] for e in admin.store.audit() if e["actor"] == "operator-1"]
    assert "loop_paused" in actions and "loop_resumed" in actions


def test_audit_filters(admin: Admin) -> None:
    request_id = admin.file()
    with admin.client("viewer") as client:
        everything = client.get("/admin/audit").json()["entries"]
        assert len(everything) >= 6  # versions, deploy, alias, tokens, the filing
        filed = client.get("/admin/audit", params={"action": "promotion_filed"}).json()["entries"]
        assert [e["action"] for e in filed] == ["promotion_filed"]
        assert filed[0]["detail"]["request"] == request_id
        newest = client.get("/admin/audit", params={"limit": "2"}).json()["entries"]
        assert len(newest) == 2
        since = max(e["id"] for e in everything) - 1
        after = client.get("/admin/audit", params={"since_id": str(since)}).json()["entries"]
        assert [e["id"] for e in after] == [since + 1]
        from_start = client.get("/admin/audit", params={"since_id": "0", "limit": "3"}).json()
        assert [e["id"] for e in from_start["entries"]] == [e["id"] for e in everything[:3]]


def test_tokens_list_names_and_roles_never_secrets(admin: Admin) -> None:
    with admin.client("viewer") as client:
        reply = client.get("/admin/tokens")
    assert reply.status_code == 200
    listed = {t["name"]: t for t in reply.json()["tokens"]}
    assert {n: t["role"] for n, t in listed.items()} == {
        "viewer-1": "viewer",
        "labeler-1": "labeler",
        "operator-1": "operator",
        "approver-1": "approver",
    }
    for secret in admin.tokens.values():
        assert secret not in reply.text and secret.removeprefix("servo_") not in reply.text
    assert all("hash" not in key for t in listed.values() for key in t)


def test_the_rollout_is_the_injected_one(tmp_path: Path) -> None:
    """The approval hands the approved request to the Rollout it was given (the canary
    rollout replaces ImmediateRollout behind this interface)."""
    seen: list[tuple[int, str, str]] = []

    class Recording:
        def __init__(self) -> None:
            self.inner: ImmediateRollout | None = None

        def start(self, request: dict[str, Any], actor: str) -> str:
            seen.append((request["id"], request["status"], actor))
            assert self.inner is not None
            return self.inner.start(request, actor)

    rollout = Recording()
    with running_admin(tmp_path, rollout) as admin:
        rollout.inner = ImmediateRollout(admin.store)
        request_id = admin.file()
        with admin.client("approver") as client:
            reply = client.post(f"/admin/promotions/{request_id}/approve", json={"reason": "ok"})
        assert reply.status_code == 200 and reply.json()["status"] == "promoted"
    assert seen == [(request_id, "approved", "approver-1")]


def test_a_policy_without_separation_of_duties_lets_the_trigger_approve(tmp_path: Path) -> None:
    class Approval:
        separation_of_duties = False

    class Policy:
        approval = Approval()

    with running_admin(tmp_path, policy_for=lambda model: Policy()) as admin:
        request_id = admin.file(triggered_by="approver-1")
        with admin.client("approver") as client:
            reply = client.post(f"/admin/promotions/{request_id}/approve", json={"reason": "mine"})
        assert reply.status_code == 200, reply.text
    with running_admin(tmp_path / "strict") as admin:
        request_id = admin.file(triggered_by="approver-1")
        with admin.client("approver") as client:
            reply = client.post(f"/admin/promotions/{request_id}/approve", json={"reason": "mine"})
        assert reply.status_code == 403, reply.text


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_the_curl_flow_of_the_readme(admin: Admin) -> None:
    request_id = admin.file()
    base = admin.url
    approver = ["-H", f"Authorization: Bearer {admin.tokens['approver']}"]

    def curl(*args: str) -> tuple[int, Any]:
        run = subprocess.run(
            ["curl", "-s", "-w", "\n%{http_code}", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        body, _, code = run.stdout.rpartition("\n")
        return int(code), json.loads(body)

    code, listed = curl(*approver, f"{base}/admin/promotions?status=pending")
    assert code == 200 and [p["id"] for p in listed["promotions"]] == [request_id]
    code, shown = curl(*approver, f"{base}/admin/promotions/{request_id}")
    assert code == 200 and shown["evidence_hash"] == evidence_hash(EVIDENCE)
    body = json.dumps({"reason": "candidate ahead", "evidence_hash": shown["evidence_hash"]})
    code, done = curl(
        *approver,
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "-d",
        body,
        f"{base}/admin/promotions/{request_id}/approve",
    )
    assert code == 200 and done["status"] == "promoted", done
    code, refused = curl("-X", "POST", f"{base}/admin/models/digits/rollback")
    assert code == 401 and "bearer token" in refused["error"]
    operator = ["-H", f"Authorization: Bearer {admin.tokens['operator']}"]
    code, back = curl(
        *operator, "-X", "POST", "-d", '{"reason": "undo"}', f"{base}/admin/models/digits/rollback"
    )
    assert code == 200 and back["champion"] == 1


def test_a_refused_route_swap_fails_the_request_and_keeps_the_champion(admin: Admin) -> None:
    """An approved request whose swap the registry refuses (here: its version is the
    champion already) ends `failed` with the reason; nothing else changes."""
    request_id = admin.file(version=1)
    with admin.client("approver") as client:
        reply = client.post(f"/admin/promotions/{request_id}/approve", json={"reason": "ok"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["status"] == "failed"
    assert "route swap refused" in reply.json()["status_reason"]
    assert "already the champion" in reply.json()["status_reason"]
    assert champion(admin) == 1


def test_two_rollouts_of_one_request_swap_once(admin: Admin) -> None:
    """Two processes that both pick up an approved request (the admin API and the loop's
    controller): one swap, one finish, the request promoted."""
    candidate = admin.version()
    request_id = admin.file(candidate)
    doc = admin.store.auto_decide(request_id, "approved", "gates passed, auto approval")
    results: list[str] = []
    barrier = threading.Barrier(2)

    def roll() -> None:
        barrier.wait()
        results.append(ImmediateRollout(admin.store).start(doc, "loop"))

    threads = [threading.Thread(target=roll) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == ["promoted", "promoted"]
    final = admin.store.promotion(request_id)
    assert final["status"] == "promoted"
    assert [e["action"] for e in final["audit"]].count("promote") == 1
    assert champion(admin) == candidate
    # and a rollout of a request finished already leaves it as it is
    assert ImmediateRollout(admin.store).start(doc, "late") == "promoted"


def test_a_taken_port_fails_start_and_stop_is_idempotent(admin: Admin) -> None:
    other = AdminServer(admin.server.app)
    with pytest.raises(OSError):
        other.start(port=admin.server.port or 0)
    other.stop()  # never started: nothing to do
    admin.server.stop()
    admin.server.stop()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{admin.url}/admin/whoami", timeout=5)
