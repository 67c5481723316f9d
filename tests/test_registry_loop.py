"""Promotion requests and the loop's route changes on SQLite and a real PostgreSQL: the
evidence hash, every refusal of a decision in its order, expiry and void committed before
the refusal, one rollout per model (also between two racing approvers), the rollout's
outcome; shadow, promote and rollback with their audit's undo pointers; migration 0003
from a 0002 database with rows."""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from registry.base import downgrade, upgrade
from registry.models import PromotionRequest
from registry.store import (
    Conflict,
    Invalid,
    NotFound,
    PermissionDenied,
    RegistryStore,
    evidence_hash,
)
from tests.registry_backends import backend_store, fresh_url, pg_url  # noqa: F401

APPROVER = frozenset({"viewer", "approver"})


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RegistryStore]:
    with backend_store(request, tmp_path) as made:
        made.register_version("digits", "file:///m/digits/1", {})
        made.set_deployments("digits", [(1, "champion", 100.0)], actor="bootstrap")
        made.set_alias("digits", "champion", 1, actor="bootstrap")
        for version in (2, 3, 4):
            made.register_version("digits", f"file:///m/digits/{version}", {})
        yield made


def _set(store: RegistryStore, request_id: int, **values: Any) -> None:
    """Change a request behind the store's back (time passing, someone editing the row)."""
    with store.engine.begin() as connection:
        connection.execute(
            sa.update(PromotionRequest).where(PromotionRequest.id == request_id).values(**values)
        )


def test_the_evidence_hash_is_canonical() -> None:
    doc = {"b": 1, "a": [1.5, "é", None, True], "c": {"y": 0.1, "x": -0.0}}
    text = '{"a":[1.5,"é",null,true],"b":1,"c":{"x":-0.0,"y":0.1}}'
    assert evidence_hash(doc) == hashlib.sha256(text.encode()).hexdigest()
    assert evidence_hash(dict(reversed(list(doc.items())))) == evidence_hash(doc)
    assert evidence_hash({"a": 1}) != evidence_hash({"a": 1.0})
    with pytest.raises(ValueError):
        evidence_hash({"p": float("nan")})


def test_filing_stores_the_hashed_evidence(store: RegistryStore) -> None:
    evidence = {"live": {"accuracy": (0.91, 0.95)}, "note": "日本"}
    request = store.file_promotion("digits", 2, evidence, actor="loop", run_id=7,
                                   triggered_by="alice", expires_s=60)  # fmt: skip
    doc = store.promotion(request)
    assert doc["evidence"] == {"live": {"accuracy": [0.91, 0.95]}, "note": "日本"}
    assert doc["evidence_hash"] == evidence_hash(doc["evidence"]) == evidence_hash(evidence)
    assert (doc["model"], doc["version"], doc["status"], doc["run_id"], doc["triggered_by"]) == (
        "digits", 2, "pending", 7, "alice",
    )  # fmt: skip
    assert doc["decision"] is None and doc["status_reason"] == ""
    span = doc["expires_at"] - doc["created_at"]
    assert span == dt.timedelta(seconds=60)
    assert [(a["action"], a["detail"]["evidence_hash"]) for a in doc["audit"]] == [
        ("promotion_filed", doc["evidence_hash"]),
    ]
    for bad in ({"x": float("inf")}, {"x": {1, 2}}, [1, 2]):
        with pytest.raises(Invalid, match="evidence"):
            store.file_promotion("digits", 2, bad, actor="loop")  # type: ignore[arg-type]
    with pytest.raises(Invalid, match="expires_s"):
        store.file_promotion("digits", 2, {}, actor="loop", expires_s=0)
    with pytest.raises(NotFound):
        store.file_promotion("digits", 99, {}, actor="loop")
    with pytest.raises(NotFound):
        store.promotion(request + 1)
    assert len(store.promotions()) == 1


def test_decide_refuses_in_order_and_changes_nothing(store: RegistryStore) -> None:
    request = store.file_promotion("digits", 2, {"n": 1}, actor="loop", triggered_by="alice")
    digest = store.promotion(request)["evidence_hash"]
    with pytest.raises(Invalid, match="approved or rejected"):
        store.decide(request, "maybe", "bob", {"viewer"})  # before the role check
    with pytest.raises(Invalid, match="4097 characters"):
        store.decide(request, "approved", "bob", APPROVER, reason="x" * 4097)
    with pytest.raises(PermissionDenied, match="needs role approver"):
        store.decide(request + 100, "approved", "bob", {"viewer", "operator"})  # before NotFound
    with pytest.raises(NotFound, match=f"no promotion request {request + 100}"):
        store.decide(request + 100, "approved", "bob", APPROVER)
    with pytest.raises(Conflict, match="read it again"):
        store.decide(request, "approved", "bob", APPROVER, evidence_hash="0" * 64)
    with pytest.raises(PermissionDenied, match="separation of duties"):
        store.decide(request, "approved", "alice", APPROVER, evidence_hash=digest)
    assert store.promotion(request)["status"] == "pending"
    assert [a["action"] for a in store.promotion(request)["audit"]] == ["promotion_filed"]
    doc = store.decide(request, "approved", "bob", APPROVER, "better live", evidence_hash=digest)
    assert doc["status"] == "approved" and doc["status_reason"] == "better live"
    assert doc["decision"]["decision"] == "approved" and doc["decision"]["actor"] == "bob"
    with pytest.raises(Conflict, match="is already approved"):
        store.decide(request, "rejected", "carol", APPROVER)
    with pytest.raises(Conflict, match="is already approved"):
        store.auto_decide(request, "rejected", "late gate")


def test_separation_of_duties_can_be_off(store: RegistryStore) -> None:
    request = store.file_promotion("digits", 2, {}, actor="loop", triggered_by="alice")
    doc = store.decide(request, "rejected", "alice", APPROVER, separation_of_duties=False)
    assert doc["status"] == "rejected" and doc["decision"]["actor"] == "alice"


def test_one_rollout_per_model_and_its_outcome(store: RegistryStore) -> None:
    first = store.file_promotion("digits", 2, {"n": 2}, actor="loop")
    second = store.file_promotion("digits", 3, {"n": 3}, actor="loop")
    store.register_version("iris", "file:///m/iris/1", {})
    other_model = store.file_promotion("iris", 1, {}, actor="loop")
    store.decide(first, "approved", "bob", APPROVER)
    with pytest.raises(Conflict, match=f"request {first} of model 'digits' is approved"):
        store.decide(second, "approved", "bob", APPROVER)
    assert store.decide(other_model, "approved", "bob", APPROVER)["status"] == "approved"
    with pytest.raises(Conflict, match="pending: it cannot become promoted"):
        store.finish_promotion(second, "promoted", actor="rollout")
    with pytest.raises(Invalid, match="not 'done'"):
        store.finish_promotion(first, "done", actor="rollout")
    store.finish_promotion(first, "promoted", actor="rollout", reason="route swapped")
    assert store.promotion(first)["status"] == "promoted"
    assert store.decide(second, "approved", "bob", APPROVER)["status"] == "approved"
    store.finish_promotion(second, "failed", actor="rollout", reason="the canary died")
    store.finish_promotion(first, "rolled_back", actor="ops", reason="worse in production")
    with pytest.raises(Conflict, match="rolled_back: it cannot become promoted"):
        store.finish_promotion(first, "promoted", actor="rollout")
    actions = [a["action"] for a in store.promotion(first)["audit"]]
    assert actions == ["promotion_filed", "promotion_approved", "promotion_promoted",
                       "promotion_rolled_back"]  # fmt: skip
    assert store.promotion(second)["status_reason"] == "the canary died"


def test_the_gates_decide_without_a_role(store: RegistryStore) -> None:
    request = store.file_promotion("digits", 2, {}, actor="loop", triggered_by="gates")
    doc = store.auto_decide(request, "rejected", "live: candidate -0.050 < -0.020 margin")
    assert doc["status"] == "rejected"
    assert doc["decision"] == {"decision": "rejected", "actor": "gates",
                               "reason": "live: candidate -0.050 < -0.020 margin",
                               "at": doc["decision"]["at"]}  # fmt: skip
    with pytest.raises(Invalid):
        store.auto_decide(request, "promoted", "no")


def test_expiry_and_void_are_committed_then_refused(store: RegistryStore) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    late = store.file_promotion("digits", 2, {"n": 1}, actor="loop")
    _set(store, late, expires_at=past)
    with pytest.raises(Conflict, match=f"request {late} expired at"):
        store.decide(late, "approved", "bob", APPROVER)
    assert store.promotion(late)["status"] == "expired"
    edited = store.file_promotion("digits", 3, {"accuracy": 0.9}, actor="loop")
    _set(store, edited, evidence={"accuracy": 0.99})
    with pytest.raises(Conflict, match=f"request {edited} is void: its evidence changed"):
        store.auto_decide(edited, "approved", "gates passed")
    doc = store.promotion(edited)
    assert doc["status"] == "void" and "evidence changed" in doc["status_reason"]
    assert doc["decision"] is None
    assert [a["action"] for a in doc["audit"]] == ["promotion_filed", "promotion_void"]
    waiting = [store.file_promotion("digits", 4, {"i": i}, actor="loop") for i in range(3)]
    _set(store, waiting[1], expires_at=past)
    assert store.expire_promotions() == [waiting[1]]
    assert store.expire_promotions() == []
    assert [r["status"] for r in store.promotions(status="expired")] == ["expired", "expired"]
    listed = store.promotions("digits")  # pending first, then newest first
    assert [r["id"] for r in listed] == [waiting[2], waiting[0], waiting[1], edited, late]


def test_two_racing_approvers_start_one_rollout(store: RegistryStore) -> None:
    requests = [store.file_promotion("digits", v, {"v": v}, actor="loop") for v in (2, 3, 4)]
    barrier = threading.Barrier(len(requests))
    outcomes: dict[int, str] = {}

    def approve(request: int) -> None:
        barrier.wait()
        try:
            outcomes[request] = store.decide(request, "approved", f"ops{request}", APPROVER)[
                "status"
            ]
        except Conflict:
            outcomes[request] = "conflict"

    threads = [threading.Thread(target=approve, args=(r,)) for r in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes.values()) == ["approved", "conflict", "conflict"]
    assert len(store.promotions(status="approved")) == 1


def _deployed(store: RegistryStore) -> list[tuple[int, str]]:
    return [(d["version"], d["role"]) for d in store.deployments().get("digits", [])]


def _statuses(store: RegistryStore) -> dict[int, str]:
    return {v.version: v.status for v in store.versions("digits")}


def test_shadow_then_promote_then_rollback(store: RegistryStore) -> None:
    revision = store.deployments_revision()
    store.add_shadow("digits", 2, actor="loop", reason="candidate of run 5")
    assert _deployed(store) == [(1, "champion"), (2, "shadow")]
    assert _statuses(store)[2] == "shadow"
    assert store.deployments_revision() > revision  # the gateway reloads its routes
    entry = store.audit(limit=1)[0]
    assert (entry["action"], entry["actor"], entry["subject"]) == ("shadow_add", "loop", "digits")
    assert entry["rollback"] == {"deployments": [[1, "champion", 100.0]],
                                 "statuses": {"2": "registered"}}  # fmt: skip
    revision = store.deployments_revision()
    store.add_shadow("digits", 2, actor="loop")  # already: nothing changes
    assert store.deployments_revision() == revision
    with pytest.raises(Conflict, match="version 1 is already the champion"):
        store.add_shadow("digits", 1, actor="loop")
    store.add_shadow("digits", 3, actor="loop")
    store.remove_shadow("digits", 3, actor="gates", reason="live gate failed")
    assert _deployed(store) == [(1, "champion"), (2, "shadow")]
    assert _statuses(store)[3] == "rejected"
    with pytest.raises(Conflict, match="version 3 is not deployed in shadow"):
        store.remove_shadow("digits", 3, actor="gates")
    with pytest.raises(Invalid, match="unknown status"):
        store.remove_shadow("digits", 2, actor="gates", status="gone")
    store.add_shadow("digits", 4, actor="loop")
    request = store.file_promotion("digits", 2, {}, actor="loop")
    with pytest.raises(Conflict, match="is pending, not approved"):
        store.promote("digits", 2, actor="rollout", request_id=request)
    with pytest.raises(Conflict, match="is for digits/2, not digits/4"):
        store.promote("digits", 4, actor="rollout", request_id=request)
    assert _deployed(store) == [(1, "champion"), (2, "shadow"), (4, "shadow")]  # unchanged
    store.decide(request, "approved", "bob", APPROVER)
    assert store.promote("digits", 2, actor="rollout", reason="approved", request_id=request) == 1
    assert _deployed(store) == [(2, "champion"), (4, "shadow")]  # the other shadow is kept
    assert store.alias("digits", "champion") == 2
    assert _statuses(store) == {1: "archived", 2: "production", 3: "rejected", 4: "shadow"}
    entry = store.audit(limit=1)[0]
    assert entry["action"] == "promote" and entry["detail"]["request"] == request
    assert entry["rollback"] == {  # what to restore to undo it
        "deployments": [[1, "champion", 100.0], [2, "shadow", 100.0], [4, "shadow", 100.0]],
        "statuses": {"1": "registered", "2": "shadow"},
        "alias": {"alias": "champion", "version": 1},
    }
    assert "promote" in [a["action"] for a in store.promotion(request)["audit"]]
    with pytest.raises(Conflict, match="version 2 is already the champion"):
        store.promote("digits", 2, actor="ops")
    assert store.rollback("digits", actor="ops", reason="worse in production") == 1
    assert _deployed(store) == [(1, "champion"), (4, "shadow")]
    assert _statuses(store)[1] == "production" and _statuses(store)[2] == "archived"
    assert store.alias_history("digits")[-1]["reason"] == "worse in production"
    assert store.rollback("digits", actor="ops", to=4) == 4  # a shadow made champion
    assert _deployed(store) == [(4, "champion")]
    with pytest.raises(NotFound):
        store.rollback("digits", actor="ops", to=99)
    actions = [a["action"] for a in store.audit(subject="digits")]
    assert actions == ["deploy", "shadow_add", "shadow_add", "shadow_remove", "shadow_add",
                       "promote", "rollback", "rollback"]  # fmt: skip


def test_route_changes_refuse_what_cannot_serve(store: RegistryStore) -> None:
    run = store.start_run("digits", "manual", {}, model="digits")
    unpublished = store.register_version("digits", "", {}, run_id=run, servable=False)
    with pytest.raises(Conflict, match="not servable"):
        store.add_shadow("digits", unpublished, actor="loop")
    with pytest.raises(Conflict, match="not servable"):
        store.promote("digits", unpublished, actor="ops")
    store.register_version("iris", "file:///m/iris/1", {})
    with pytest.raises(Conflict, match="'iris' has no champion deployed"):
        store.add_shadow("iris", 1, actor="loop")
    store.set_deployments("iris", [(1, "champion", 100.0)], actor="ops")
    with pytest.raises(Conflict, match="no previous champion"):
        store.rollback("iris", actor="ops")
    store.set_deployments("digits", [(1, "champion", 90.0), (3, "canary", 10.0)], actor="ops")
    store.promote("digits", 2, actor="ops")
    assert _deployed(store) == [(2, "champion")]  # the canary is gone with the old champion
    assert _statuses(store)[3] == "archived"
    with pytest.raises(Invalid, match="4097"):
        store.promote("digits", 3, actor="ops", reason="r" * 4097)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migration_0003_keeps_the_rows_of_a_0002_database(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = RegistryStore(fresh_url(request, tmp_path, backend))
    try:
        upgrade(store.engine, "0002")
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        old, recent = now - dt.timedelta(days=30), now - dt.timedelta(hours=1)
        tables = sa.MetaData()
        tables.reflect(store.engine)
        evidence = {"trigger": {"psi": 0.31}, "accuracy": 0.5}
        with store.engine.begin() as connection:
            t = tables.tables
            connection.execute(t["models"].insert(), [{"name": "digits", "created_at": old,
                                                       "last_version": 2}])  # fmt: skip
            connection.execute(t["model_versions"].insert(), [
                {"model": "digits", "version": v, "status": "registered",
                 "artifact_uri": f"file:///m/{v}", "metrics": {}, "created_at": old,
                 "servable": True, "artifact_hashes": {}} for v in (1, 2)
            ])  # fmt: skip
            connection.execute(t["promotion_requests"].insert(), [
                {"model": "digits", "version": 2, "evidence": evidence, "status": "pending",
                 "created_at": created} for created in (old, recent)
            ])  # fmt: skip
            connection.execute(t["audit_log"].insert(), [
                {"at": at, "actor": "loop", "action": "promotion_filed", "subject": "digits/2",
                 "detail": {"request": i}, "rollback": None}
                for i, at in ((1, old), (2, recent))
            ])  # fmt: skip
            connection.execute(t["pipeline_runs"].insert(), [
                {"pipeline": "digits", "trigger": "manual", "status": "succeeded",
                 "parameters": {"seed": 0}, "started_at": old, "finished_at": old}
            ])  # fmt: skip
            # rows that refer to the tables the migration copies (SQLite: batch operations)
            connection.execute(t["step_runs"].insert(), [
                {"run_id": 1, "step": "train", "status": "succeeded", "attempts": 1,
                 "parameters": {}, "metrics": {}, "duration_s": 1.0}
            ])  # fmt: skip
            connection.execute(t["promotion_requests"].insert(), [
                {"model": "digits", "version": 1, "evidence": {}, "status": "rejected",
                 "created_at": recent}
            ])  # fmt: skip
            connection.execute(t["decisions"].insert(), [
                {"request_id": 3, "decision": "rejected", "actor": "ops", "reason": "worse",
                 "at": recent}
            ])  # fmt: skip
        store.create_schema()
        first, second = store.promotion(1), store.promotion(2)
        assert first["evidence"] == evidence and first["evidence_hash"] == evidence_hash(evidence)
        assert first["expires_at"] - first["created_at"] == dt.timedelta(days=7)
        assert [a["action"] for a in first["audit"]] == ["promotion_filed"]
        assert [a["detail"] for a in second["audit"]] == [{"request": 2}]
        assert store.runs(recover=False)[0]["model"] is None
        assert store.runs(recover=False)[0]["parameters"] == {"seed": 0}
        assert store.run(1, recover=False)["steps"][0]["step"] == "train"
        rejected = store.promotion(3)
        assert rejected["decision"]["actor"] == "ops" and rejected["status"] == "rejected"
        with pytest.raises(Conflict, match="expired"):
            store.decide(1, "approved", "bob", APPROVER)  # filed 30 days ago: 7 days passed
        assert store.decide(2, "approved", "bob", APPROVER)["status"] == "approved"
        assert [v.version for v in store.versions("digits")] == [1, 2]
        downgrade(store.engine, "0002")  # and back: the rows stay
        with store.engine.connect() as connection:
            count = sa.text("SELECT count(*) FROM promotion_requests")
            assert connection.execute(count).scalar_one() == 3
        store.create_schema()
        assert store.promotion(2)["status"] == "approved"
    finally:
        store.close()
