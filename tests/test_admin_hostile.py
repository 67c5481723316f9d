"""Hostile admin requests (issue 10 point 18): missing, unknown, malformed, revoked and
wrong-role tokens, self-approval, double approval, an expired request, evidence that
changed, a 1 MB reason, ids that do not exist, model names with `../`, bad JSON and bad
fields. Each gets a precise 4xx with an `{"error": ...}` body; the registry is compared
before and after (nothing changed); every refused attempt to act is in the audit log."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.admin import Admin, running_admin, snapshot
from tests.servers import read_http_reply


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[Admin]:
    with running_admin(tmp_path) as running:
        yield running


def attempts(admin: Admin, since: int) -> list[dict[str, Any]]:
    return [e for e in admin.store.audit() if e["id"] > since]


def last_id(admin: Admin) -> int:
    return max(e["id"] for e in admin.store.audit())


def refused(
    admin: Admin,
    client: httpx.Client,
    method: str,
    path: str,
    status: int,
    message: str,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Send a request that must be refused with `status` and an error containing
    `message`; check that nothing changed; return the audit entries it added."""
    before, since = snapshot(admin.store), last_id(admin)
    reply = client.request(method, path, **kwargs)
    assert reply.status_code == status, reply.text
    assert message in reply.json()["error"], reply.json()
    assert snapshot(admin.store) == before
    return attempts(admin, since)


def assert_attempt(entries: list[dict[str, Any]], actor: str, status: int) -> dict[str, Any]:
    assert len(entries) == 1, entries
    (entry,) = entries
    assert entry["actor"] == actor and entry["action"] == "attempt", entry
    assert entry["detail"]["status"] == status, entry
    return entry


@pytest.mark.parametrize(
    ("header", "actor", "what"),
    [
        (None, "(missing token)", "missing"),
        ("Bearer servo_" + "A" * 43, "(unknown, revoked or malformed token)", "unknown"),
        ("Basic YWRtaW46YWRtaW4=", "(unknown, revoked or malformed token)", "malformed"),
        ("Bearer", "(unknown, revoked or malformed token)", "malformed"),
    ],
)
def test_no_valid_token_is_401_with_a_challenge(
    admin: Admin, header: str | None, actor: str, what: str
) -> None:
    request_id = admin.file()
    headers = {"authorization": header} if header is not None else {}
    with httpx.Client(base_url=admin.url, headers=headers, timeout=10) as client:
        for path in ("/admin/promotions", "/admin/audit", "/admin/tokens"):
            reply = client.get(path)
            assert reply.status_code == 401 and reply.headers["www-authenticate"].startswith(
                "Bearer"
            )
        entries = refused(
            admin,
            client,
            "POST",
            f"/admin/promotions/{request_id}/approve",
            401,
            "a bearer token is needed",
            json={"reason": "x"},
        )
    entry = assert_attempt(entries, actor, 401)
    assert entry["detail"]["request"] == request_id
    for secret in admin.tokens.values():  # a presented token never goes into the log
        assert secret not in str(entry)
    assert "A" * 43 not in str(entry)


def test_a_revoked_token_is_refused_at_once(admin: Admin) -> None:
    with admin.client("operator") as client:
        assert client.get("/admin/loop").status_code == 200
        admin.store.revoke_token("operator-1", actor="test")
        entries = refused(
            admin,
            client,
            "POST",
            "/admin/models/digits/retrain",
            401,
            "unknown, revoked or malformed",
            json={},
        )
    assert_attempt(entries, "(unknown, revoked or malformed token)", 401)
    assert admin.store.take_retrain_requests() == []


@pytest.mark.parametrize(
    ("role", "method", "path", "needs"),
    [
        ("viewer", "POST", "/admin/promotions/{id}/approve", "approver"),
        ("labeler", "POST", "/admin/promotions/{id}/reject", "approver"),
        ("operator", "POST", "/admin/promotions/{id}/approve", "approver"),
        ("viewer", "POST", "/admin/models/digits/retrain", "operator"),
        ("labeler", "POST", "/admin/models/digits/rollback", "operator"),
        ("approver", "POST", "/admin/models/digits/pause", "operator"),
        ("viewer", "POST", "/admin/models/digits/resume", "operator"),
    ],
)
def test_a_wrong_role_is_403_and_audited(
    admin: Admin, role: str, method: str, path: str, needs: str
) -> None:
    request_id = admin.file()
    with admin.client(role) as client:
        entries = refused(
            admin,
            client,
            method,
            path.format(id=request_id),
            403,
            f"needs role {needs}",
            json={"reason": "try"},
        )
    assert_attempt(entries, f"{role}-1", 403)
    assert admin.store.take_retrain_requests() == []


def test_self_approval_is_403(admin: Admin) -> None:
    request_id = admin.file(triggered_by="approver-1")
    with admin.client("approver") as client:
        entries = refused(
            admin,
            client,
            "POST",
            f"/admin/promotions/{request_id}/approve",
            403,
            "",
            json={"reason": "my own run"},
        )
    entry = assert_attempt(entries, "approver-1", 403)
    assert entry["detail"]["request"] == request_id
    assert request_id in [e["detail"].get("request") for e in [entry]]
    assert admin.store.promotion(request_id)["status"] == "pending"


def test_double_approval_and_deciding_a_decided_request_are_409(admin: Admin) -> None:
    request_id = admin.file()
    with admin.client("approver") as client:
        first = client.post(f"/admin/promotions/{request_id}/approve", json={"reason": "ok"})
        assert first.status_code == 200 and first.json()["status"] == "promoted"
        again = refused(
            admin,
            client,
            "POST",
            f"/admin/promotions/{request_id}/approve",
            409,
            "already",
            json={"reason": "again"},
        )
        assert_attempt(again, "approver-1", 409)
        late = refused(
            admin,
            client,
            "POST",
            f"/admin/promotions/{request_id}/reject",
            409,
            "already",
            json={"reason": "changed my mind"},
        )
        assert_attempt(late, "approver-1", 409)
        rejected = admin.file()
        assert client.post(f"/admin/promotions/{rejected}/reject", json={}).status_code == 200
        entries = refused(
            admin,
            client,
            "POST",
            f"/admin/promotions/{rejected}/approve",
            409,
            "already rejected",
            json={},
        )
        assert_attempt(entries, "approver-1", 409)


def test_an_expired_request_is_409(admin: Admin) -> None:
    request_id = admin.file(expires_s=0.2)
    with admin.client("approver") as client:
        time.sleep(0.3)  # past its expiry (not a timing assertion)
        reply = client.post(f"/admin/promotions/{request_id}/approve", json={"reason": "late"})
        assert reply.status_code == 409, reply.text
        assert "expired" in reply.json()["error"]
    assert admin.store.promotion(request_id)["status"] == "expired"
    assert admin.store.aliases("digits")["champion"] == 1


def test_evidence_other_than_the_one_seen_is_409(admin: Admin) -> None:
    request_id = admin.file()
    with admin.client("approver") as client:
        entries = refused(
            admin,
            client,
            "POST",
            f"/admin/promotions/{request_id}/approve",
            409,
            "evidence",
            json={"reason": "ok", "evidence_hash": "0" * 64},
        )
    assert_attempt(entries, "approver-1", 409)


def test_a_one_megabyte_reason_is_413_and_a_long_one_400(admin: Admin) -> None:
    request_id = admin.file()
    with admin.client("approver") as client:
        before, since = snapshot(admin.store), last_id(admin)
        reply = client.post(
            f"/admin/promotions/{request_id}/approve", json={"reason": "x" * (1024 * 1024)}
        )
        assert reply.status_code == 413 and "exceeds 65536 bytes" in reply.json()["error"]
        assert snapshot(admin.store) == before
        # audited off the event loop: wait for it (bounded by pytest-timeout)
        while not attempts(admin, since):
            time.sleep(0.05)
        (entry,) = attempts(admin, since)
        assert (entry["actor"], entry["detail"]["action"]) == ("(unread request)", "approve")
        assert entry["detail"]["status"] == 413 and entry["detail"]["request"] == request_id
        entries = refused(
            admin,
            client,
            "POST",
            f"/admin/promotions/{request_id}/approve",
            400,
            "field 'reason': longer than 4096",
            json={"reason": "x" * 5000},
        )
        assert_attempt(entries, "approver-1", 400)
    assert admin.store.promotion(request_id)["status"] == "pending"


@pytest.mark.parametrize(
    ("method", "path", "status", "message", "audited"),
    [
        ("GET", "/admin/promotions/999", 404, "999", False),
        ("POST", "/admin/promotions/999/approve", 404, "999", True),
        ("POST", "/admin/promotions/999/reject", 404, "999", True),
        ("GET", "/admin/promotions/abc", 400, "must be a positive integer, got 'abc'", False),
        ("POST", "/admin/promotions/-1/approve", 400, "must be a positive integer", True),
        ("POST", "/admin/promotions/0/approve", 400, "must be a positive integer", True),
        ("POST", "/admin/promotions/1e3/approve", 400, "must be a positive integer", True),
        ("POST", f"/admin/promotions/{'9' * 40}/approve", 400, "must be a positive integer", True),
        ("POST", "/admin/models/nosuch/retrain", 404, "model 'nosuch' is not registered", True),
        ("POST", "/admin/models/nosuch/rollback", 404, "not registered", True),
        ("POST", "/admin/models/.hidden/pause", 400, "invalid model name", True),
        ("POST", "/admin/models/..%2E/retrain", 400, "invalid model name", True),
        # decoded, these are more path segments: no route at all, nothing acted on
        ("POST", "/admin/models/..%2F..%2Fetc/rollback", 404, "no route", False),
        ("POST", "/admin/models/digits%2F..%2F..%2Fx/retrain", 404, "no route", False),
        ("GET", "/admin/promotions/1/approve", 405, "not allowed", False),
        ("DELETE", "/admin/promotions/1", 405, "not allowed", False),
    ],
)
def test_ids_and_names_that_do_not_exist(
    admin: Admin, method: str, path: str, status: int, message: str, audited: bool
) -> None:
    admin.file()
    role = "operator" if "/models/" in path else "approver"
    with admin.client(role) as client:
        entries = refused(admin, client, method, path, status, message, json={"reason": "x"})
    if audited:
        entry = assert_attempt(entries, f"{role}-1", status)
        assert len(entry["subject"]) <= 80
    else:
        assert entries == [], entries


def test_raw_dot_dot_segments_never_reach_a_path(admin: Admin) -> None:
    """`..` sent as is (no client normalising it): an invalid name, or no route."""
    token = admin.tokens["operator"]
    for target, status in [
        ("/admin/models/../retrain", 400),
        ("/admin/models/../../etc/passwd", 404),
        ("/admin/models/./rollback", 400),
    ]:
        before = snapshot(admin.store)
        with socket.create_connection(("127.0.0.1", admin.server.port or 0), timeout=10) as sock:
            sock.sendall(
                f"POST {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                "Content-Length: 2\r\n\r\n{}".encode()
            )
            code, body = read_http_reply(sock)
        assert code == status, (target, body)
        assert b'"error"' in body
        assert snapshot(admin.store) == before


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "the body is not valid JSON"),
        (b"\xff\xfe", "the body is not valid JSON"),
        (b"[]", "the body must be a JSON object"),
        (b'"reason"', "the body must be a JSON object"),
        (b'{"reason": 5}', "field 'reason'"),
        (b'{"reason": null}', "field 'reason'"),
        (b'{"reasn": "typo"}', "unknown field 'reasn'"),
        (b'{"reason": "ok", "evidence_hash": "abc"}', "field 'evidence_hash'"),
        (b'{"reason": "ok", "evidence_hash": 7}', "field 'evidence_hash'"),
    ],
)
def test_bad_decision_bodies_are_400(admin: Admin, body: bytes, message: str) -> None:
    request_id = admin.file()
    with admin.client("approver") as client:
        entries = refused(
            admin,
            client,
            "POST",
            f"/admin/promotions/{request_id}/approve",
            400,
            message,
            content=body,
        )
    assert_attempt(entries, "approver-1", 400)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b'{"to": "1"}', 400, "field 'to'"),
        (b'{"to": true}', 400, "field 'to'"),
        (b'{"to": 1.5}', 400, "field 'to'"),
        (b'{"to": 0}', 400, "field 'to'"),
        (b'{"to": 99}', 404, "99"),
        (b'{"to": 1e400}', 400, ""),
    ],
)
def test_bad_rollbacks(admin: Admin, body: bytes, status: int, message: str) -> None:
    with admin.client("operator") as client:
        entries = refused(
            admin, client, "POST", "/admin/models/digits/rollback", status, message, content=body
        )
    assert_attempt(entries, "operator-1", status)


def test_a_rollback_without_a_previous_champion_is_409(admin: Admin) -> None:
    with admin.client("operator") as client:
        entries = refused(
            admin,
            client,
            "POST",
            "/admin/models/digits/rollback",
            409,
            "",
            json={"reason": "nothing to go back to"},
        )
    assert_attempt(entries, "operator-1", 409)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/admin/promotions?bogus=1", "unknown query parameter 'bogus'"),
        ("/admin/promotions?status=a&status=b", "given twice"),
        ("/admin/promotions?model=../x", "invalid model name"),
        ("/admin/audit?limit=abc", "limit must be a positive integer"),
        ("/admin/audit?limit=0", "limit must be a positive integer"),
        ("/admin/audit?since_id=-4", "since_id must be an integer >= 0"),
        ("/admin/promotions?status=bogus", "unknown status 'bogus' (known: pending, approved"),
        (f"/admin/audit?action={'a' * 3000}", "longer than 2048 bytes"),
    ],
)
def test_bad_query_strings_are_400(admin: Admin, path: str, message: str) -> None:
    with admin.client("viewer") as client:
        assert refused(admin, client, "GET", path, 400, message) == []


def test_a_flood_of_unauthenticated_attempts_is_audited_within_a_budget(admin: Admin) -> None:
    since = last_id(admin)
    with httpx.Client(base_url=admin.url, timeout=10) as client:
        for _ in range(150):
            assert client.post("/admin/models/digits/retrain", json={}).status_code == 401
    added = attempts(admin, since)
    assert 0 < len(added) < 150  # the burst is audited, the flood is counted, not logged
    assert {e["actor"] for e in added} == {"(missing token)"}
