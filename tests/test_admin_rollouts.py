"""The admin API's rollout routes on a real server on 127.0.0.1 over a real SQLite registry:
rollouts listed and filtered, one with every look of its judge, an operator's rollback of
a running rollout (also through the model's rollback route), and hostile requests: wrong
roles, no reason, bad ids, bad filters and bodies, each a precise 4xx that changes
nothing, every refused attempt to act audited."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.admin import Admin, running_admin, snapshot
from tests.rollouts import approved, judged_rollout


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[Admin]:
    with running_admin(tmp_path) as running:
        yield running


def _running(admin: Admin) -> dict[str, Any]:
    version = admin.version()
    admin.store.add_shadow("digits", version, actor="loop")
    request = approved(admin.store, "digits", version)
    return admin.store.start_rollout(request, "bob", steps=[10, 50, 100], config={})


def _state(admin: Admin) -> dict[str, Any]:
    return {**snapshot(admin.store), "rollouts": admin.store.rollouts()}


def _refused(
    admin: Admin, client: httpx.Client, method: str, path: str, status: int, message: str,
    **kwargs: Any,
) -> list[dict[str, Any]]:  # fmt: skip
    """A request refused with `status` and `message` that changed nothing; returns the
    audit entries it added."""
    before, since = _state(admin), admin.store.audit(limit=1)[0]["id"]
    reply = client.request(method, path, **kwargs)
    assert reply.status_code == status, reply.text
    assert message in reply.json()["error"], reply.json()
    assert _state(admin) == before
    return admin.store.audit(since_id=since)


def test_rollouts_and_their_looks(admin: Admin) -> None:
    candidate = admin.version()
    done = judged_rollout(admin.store, "digits", candidate, error_rates=(0.1, 0.02), seed=3)
    running = _running(admin)
    with admin.client("viewer") as viewer:
        listed = viewer.get("/admin/rollouts").json()["rollouts"]
        assert [(r["id"], r["status"]) for r in listed] == [
            (running["id"], "running"), (done["id"], "rolled_back"),
        ]  # fmt: skip
        assert listed[1]["looks"] == done["looks"] > 0 and listed[0]["looks"] == 0
        only = viewer.get("/admin/rollouts", params={"status": "running", "model": "digits"})
        assert [r["id"] for r in only.json()["rollouts"]] == [running["id"]]
        assert len(viewer.get("/admin/rollouts", params={"limit": "1"}).json()["rollouts"]) == 1
        assert viewer.get("/admin/rollouts", params={"model": "iris"}).json() == {"rollouts": []}
        shown = viewer.get(f"/admin/rollouts/{done['id']}")
    assert shown.status_code == 200, shown.text
    doc = shown.json()
    assert doc["rollout"]["verdict"]["decision"] == "rollback"
    assert doc["rollout"]["version"] == candidate and doc["rollout"]["champion"] == 1
    stored = admin.store.rollout_looks(done["id"])
    assert [(look["seq"], look["counts"], look["verdict"]) for look in doc["looks"]] == [
        (look["seq"], look["counts"], look["verdict"]) for look in stored
    ]


def test_an_operator_rolls_a_running_rollout_back(admin: Admin) -> None:
    rollout = _running(admin)
    path = f"/admin/rollouts/{rollout['id']}/rollback"
    for role in ("viewer", "labeler", "approver"):
        with admin.client(role) as client:
            (entry,) = _refused(admin, client, "POST", path, 403, "needs role operator",
                                json={"reason": "bad"})  # fmt: skip
        assert (entry["actor"], entry["subject"]) == (f"{role}-1", f"rollout/{rollout['id']}")
        assert entry["detail"]["action"] == "rollback rollout"
    with admin.client("operator") as operator:
        for body, message in (({}, "field 'reason': Field required"),
                              ({"reason": ""}, "field 'reason'"),
                              ({"reason": "x" * 4097}, "longer than 4096"),
                              ({"reason": "x", "to": 1}, "unknown field 'to'"),
                              ({"reason": 5}, "field 'reason'")):  # fmt: skip
            (entry,) = _refused(admin, operator, "POST", path, 400, message, json=body)
            assert entry["detail"]["status"] == 400
        reply = operator.post(path, json={"reason": "pager at 3am"})
        assert reply.status_code == 200, reply.text
        assert (reply.json()["status"], reply.json()["reason"]) == ("rolled_back", "pager at 3am")
        rows = [(d["version"], d["role"]) for d in admin.store.deployments()["digits"]]
        assert rows == [(1, "champion")]
        entry = admin.store.audit(action="canary_rollback")[-1]
        assert entry["actor"] == "operator-1" and entry["detail"]["reason"] == "pager at 3am"
        (entry,) = _refused(admin, operator, "POST", path, 409, "is already rolled_back",
                            json={"reason": "again"})  # fmt: skip
        assert entry["detail"]["status"] == 409
    assert admin.store.promotion(rollout["request_id"])["status"] == "rolled_back"


def test_the_models_rollback_route_ends_a_running_rollout(admin: Admin) -> None:
    rollout = _running(admin)
    with admin.client("operator") as operator:
        reply = operator.post("/admin/models/digits/rollback", json={"reason": "by model"})
        assert reply.status_code == 200, reply.text
        assert reply.json() == {"model": "digits", "champion": 1, "was": 1}
        assert admin.store.rollout(rollout["id"])["status"] == "rolled_back"
        other = _running(admin)
        _refused(admin, operator, "POST", "/admin/models/digits/rollback", 409,
                 f"rollout {other['id']} of version {other['version']} running: a rollback "
                 "ends it with version 1 champion, not 2", json={"to": 2})  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "status", "message"),
    [
        ("GET", "/admin/rollouts/abc", 400, "a rollout id must be a positive integer, got 'abc'"),
        ("GET", "/admin/rollouts/0", 400, "a rollout id must be a positive integer"),
        ("GET", "/admin/rollouts/-1", 400, "a rollout id must be a positive integer"),
        ("GET", "/admin/rollouts/1e3", 400, "a rollout id must be a positive integer"),
        ("GET", "/admin/rollouts/" + "9" * 19, 400, "a rollout id must be a positive integer"),
        ("GET", "/admin/rollouts/%F0%9F%92%A5", 400, "a rollout id must be a positive integer"),
        ("GET", "/admin/rollouts/999", 404, "no rollout 999"),
        ("GET", "/admin/rollouts?status=done", 400, "unknown status 'done'"),
        ("GET", "/admin/rollouts?model=..%2Fetc", 400, "invalid model name '../etc'"),
        ("GET", "/admin/rollouts?limit=0", 400, "limit must be a positive integer"),
        ("GET", "/admin/rollouts?limit=1&limit=2", 400, "given twice"),
        ("GET", "/admin/rollouts?since_id=1", 400, "unknown query parameter 'since_id'"),
        ("POST", "/admin/rollouts/abc/rollback", 400, "a rollout id must be a positive integer"),
        ("POST", "/admin/rollouts/999/rollback", 404, "no rollout 999"),
    ],
)
def test_hostile_rollout_requests(
    admin: Admin, method: str, path: str, status: int, message: str
) -> None:
    _running(admin)
    with admin.client("operator") as operator:
        body = {"json": {"reason": "x"}} if method == "POST" else {}
        added = _refused(admin, operator, method, path, status, message, **body)
    if method == "POST":
        (entry,) = added
        assert entry["action"] == "attempt" and entry["subject"].startswith("rollout/")
    else:
        assert added == []  # reads are not attempts to act
    with admin.client() as anonymous:
        reply = anonymous.request(method, path.split("?", maxsplit=1)[0])
        assert reply.status_code == 401 and "bearer token" in reply.json()["error"]


def test_a_bad_body_is_400(admin: Admin) -> None:
    rollout = _running(admin)
    path = f"/admin/rollouts/{rollout['id']}/rollback"
    with admin.client("operator") as operator:
        for content, message in ((b"{", "not valid JSON"), (b"[1]", "must be a JSON object")):
            _refused(admin, operator, "POST", path, 400, message, content=content)
