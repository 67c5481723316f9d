"""Bearer tokens in the registry (SQLite and a real PostgreSQL): created once and shown
once, stored only as a hash, roles, revocation, throttled last-use writes; the audit
log's filters and refused attempts."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import update

from registry.models import ApiToken
from registry.store import ROLES, Conflict, Identity, Invalid, NotFound, RegistryStore
from registry.tokens import token_digest
from tests.registry_backends import backend_store, pg_url  # noqa: F401


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RegistryStore]:
    with backend_store(request, tmp_path) as made:
        yield made


def test_a_token_is_shown_once_and_names_its_identity(store: RegistryStore) -> None:
    assert not store.has_tokens()
    token = store.create_token("alice", "approver", actor="cli:root")
    assert token.startswith("servo_") and len(token) >= 6 + 43
    assert store.has_tokens()
    identity = store.authenticate(token)
    assert identity == Identity("alice", "approver")
    assert identity.roles == frozenset({"viewer", "approver"})
    other = store.create_token("bob", "labeler", actor="cli:root")
    assert other != token
    assert store.authenticate(other) == Identity("bob", "labeler")
    listed = store.tokens()
    assert [(t["name"], t["role"], t["created_by"]) for t in listed] == [
        ("alice", "approver", "cli:root"),
        ("bob", "labeler", "cli:root"),
    ]
    assert set(listed[0]) == {"name", "role", "created_at", "created_by", "revoked_at",
                              "last_used_at"}  # fmt: skip
    assert listed[0]["last_used_at"] is not None and listed[0]["revoked_at"] is None
    assert token not in repr(listed) and token_digest(token) not in repr(listed)


def test_refusals_are_precise(store: RegistryStore) -> None:
    store.create_token("ci.bot-1", "operator", actor="ops")
    with pytest.raises(Conflict, match=r"already named 'ci\.bot-1'"):
        store.create_token("ci.bot-1", "viewer", actor="ops")
    for name in ("", "Alice", "-x", "../etc", "a" * 65, "a b", "é"):
        with pytest.raises(Invalid, match="invalid token name"):
            store.create_token(name, "viewer", actor="ops")
    with pytest.raises(Invalid, match="unknown role 'root'"):
        store.create_token("carol", "root", actor="ops")
    with pytest.raises(NotFound, match="no active token named 'nobody'"):
        store.revoke_token("nobody", actor="ops")
    assert [t["name"] for t in store.tokens()] == ["ci.bot-1"]  # nothing else was stored
    assert set(ROLES) == {"viewer", "labeler", "operator", "approver"}


def test_revoked_and_malformed_tokens_authenticate_nobody(store: RegistryStore) -> None:
    token = store.create_token("alice", "approver", actor="ops")
    for bad in ("", "servo_", "Bearer " + token, token + "x", token.upper(), "servo_" + "A" * 43,
                "x" * 10_000, token[:-1] + "\x00"):  # fmt: skip
        assert store.authenticate(bad) is None, bad
    store.revoke_token("alice", actor="security")
    assert store.authenticate(token) is None
    assert not store.has_tokens()
    with pytest.raises(NotFound):
        store.revoke_token("alice", actor="security")
    again = store.create_token("alice", "viewer", actor="ops")  # a revoked name is free again
    assert store.authenticate(again) == Identity("alice", "viewer")
    assert store.authenticate(token) is None
    listed = store.tokens()
    assert [(t["name"], t["revoked_at"] is not None) for t in listed] == [
        ("alice", True),
        ("alice", False),
    ]
    audit = store.audit()
    assert [(a["action"], a["actor"], a["subject"]) for a in audit] == [
        ("token_created", "ops", "token:alice"),
        ("token_revoked", "security", "token:alice"),
        ("token_created", "ops", "token:alice"),
    ]
    assert audit[0]["detail"] == {"name": "alice", "role": "approver"}
    for secret in (token, again, token_digest(token), token_digest(again)):
        assert secret not in repr(audit)


def test_last_use_is_written_at_most_once_a_minute(store: RegistryStore) -> None:
    token = store.create_token("alice", "viewer", actor="ops")
    assert store.tokens()[0]["last_used_at"] is None
    store.authenticate(token)
    first = store.tokens()[0]["last_used_at"]
    assert first is not None
    revision = len(store.audit())
    for _ in range(5):
        assert store.authenticate(token) is not None
    assert store.tokens()[0]["last_used_at"] == first  # no write per request
    old = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=2)
    with store.engine.begin() as connection:
        connection.execute(update(ApiToken).values(last_used_at=old))
    store.authenticate(token)
    assert store.tokens()[0]["last_used_at"] != first
    assert len(store.audit()) == revision  # using a token is not an audited change


def test_the_token_never_reaches_the_database_file(tmp_path: Path) -> None:
    store = RegistryStore(f"sqlite:///{tmp_path / 'registry.db'}")
    store.create_schema()
    try:
        tokens = [store.create_token(f"user{i}", ROLES[i % 4], actor="ops") for i in range(4)]
        for token in tokens:
            store.authenticate(token)
    finally:
        store.close()
    files = list(tmp_path.glob("registry.db*"))  # the database, its WAL and shared memory
    data = b"".join(path.read_bytes() for path in files)
    for token in tokens:
        assert token.encode() not in data
        assert token.removeprefix("servo_").encode() not in data
        assert token_digest(token).encode() in data  # what is stored, so the search works


def test_two_creators_of_one_name_one_wins(store: RegistryStore) -> None:
    results: list[str] = []
    barrier = threading.Barrier(4)

    def create(i: int) -> None:
        barrier.wait()
        try:
            store.create_token("shared", "operator", actor=f"ops{i}")
            results.append("created")
        except Conflict:
            results.append("conflict")

    threads = [threading.Thread(target=create, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == ["conflict", "conflict", "conflict", "created"]
    assert len(store.tokens()) == 1


def test_audit_filters_and_refused_attempts(store: RegistryStore) -> None:
    store.register_version("digits", "file:///1", {})
    store.register_version("digits", "file:///2", {})
    store.set_alias("digits", "champion", 1, actor="ops")
    request = store.file_promotion("digits", 2, {"n": 1}, actor="loop")
    store.audit_attempt("mallory", "approve", f"promotion:{request}",
                        {"request": request, "reason": "x" * 1_000_000, "why": "needs approver",
                         "action": "spoofed"})  # fmt: skip
    everything = store.audit()
    assert [a["action"] for a in everything] == [
        "register", "register", "alias", "promotion_filed", "attempt",
    ]  # fmt: skip
    attempt = everything[-1]
    assert attempt["actor"] == "mallory" and attempt["subject"] == f"promotion:{request}"
    assert attempt["detail"]["action"] == "approve"  # what was tried, not the caller's key
    assert attempt["detail"]["why"] == "needs approver"
    assert len(attempt["detail"]["reason"]) < 600  # a 1 MB reason is cut
    assert attempt["detail"]["reason"].endswith("(1000000 chars)")
    assert [a["action"] for a in store.audit(limit=2)] == ["promotion_filed", "attempt"]
    ids = [a["id"] for a in everything]
    assert [a["id"] for a in store.audit(since_id=ids[1])] == ids[2:]
    assert [a["id"] for a in store.audit(since_id=ids[0], limit=2)] == ids[1:3]
    assert [a["action"] for a in store.audit(subject="digits/2")] == [
        "register", "promotion_filed",
    ]  # fmt: skip
    assert [a["id"] for a in store.audit(action="attempt")] == [ids[-1]]
    assert store.audit(action="nothing") == []
    linked = store.promotion(request)["audit"]
    assert [a["action"] for a in linked] == ["promotion_filed", "attempt"]
    store.audit_attempt("x" * 500, "deploy", "s" * 1000, {"nested": {"deep": [1.5, float("nan")]}})
    last = store.audit(limit=1)[0]
    assert len(last["actor"]) == 128 and len(last["subject"]) == 256
    assert last["detail"]["nested"] == {"deep": [1.5, "nan"]}
