"""Canary rollouts in the registry on SQLite and a real PostgreSQL: the route table at each
transition with its audit's undo pointer, the looks in order, every refusal (while a
rollout runs, of a rollout that is over, of bad input), the operator's rollback of a
running rollout, two processes racing to finish one rollout, and migration 0004 from a
0003 database with rows (and the fast path's head check)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from registry.base import downgrade, upgrade
from registry.lite import LiteRegistry, migration_heads
from registry.models import PromotionRequest
from registry.store import Conflict, Invalid, NotFound, RegistryStore
from tests.registry_backends import backend_store, fresh_url, pg_url  # noqa: F401

APPROVER = frozenset({"viewer", "approver"})
CONFIG = {"judge": {"alpha": 0.05, "beta": 0.05}, "look_every_s": 5}
VERDICT = {"decision": "advance", "rollback_e": {"errors": 0.5}, "promote_e": {"errors": 30.0}}


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RegistryStore]:
    """digits: version 1 champion, 2 (the candidate) and 3 in shadow; iris: 1 champion."""
    with backend_store(request, tmp_path) as made:
        for version in (1, 2, 3, 4):
            made.register_version("digits", f"file:///m/digits/{version}", {})
        made.set_deployments("digits", [(1, "champion", 100.0)], actor="bootstrap")
        made.set_alias("digits", "champion", 1, actor="bootstrap")
        made.add_shadow("digits", 2, actor="loop")
        made.add_shadow("digits", 3, actor="loop")
        made.register_version("iris", "file:///m/iris/1", {})
        made.set_deployments("iris", [(1, "champion", 100.0)], actor="bootstrap")
        yield made


def _approved(store: RegistryStore, version: int = 2, model: str = "digits") -> int:
    request = store.file_promotion(model, version, {"v": version}, actor="loop")
    store.decide(request, "approved", "bob", APPROVER)
    return request


def _start(store: RegistryStore, steps: list[float] | None = None) -> dict[str, Any]:
    request = _approved(store)
    return store.start_rollout(request, "bob", steps=steps or [10, 50, 100], config=CONFIG)


def _deployed(store: RegistryStore, model: str = "digits") -> list[tuple[int, str, float]]:
    return [(d["version"], d["role"], d["percent"]) for d in store.deployments()[model]]


def _statuses(store: RegistryStore) -> dict[int, str]:
    return {v.version: v.status for v in store.versions("digits")}


def _counts(ct: int, ce: int, bt: int, be: int) -> dict[str, list[int]]:
    return {"errors": [ct, ce, bt, be], "latency": [ct, 0, bt, 1]}


def test_start_makes_the_candidate_canary_and_is_idempotent(store: RegistryStore) -> None:
    revision = store.deployments_revision()
    request = _approved(store)
    rollout = store.start_rollout(request, "bob", steps=[10, 50, 100], config=CONFIG)
    assert store.deployments_revision() > revision  # the gateway reloads
    assert _deployed(store) == [(1, "champion", 100.0), (2, "canary", 10.0), (3, "shadow", 100.0)]
    assert _statuses(store)[2] == "canary"
    assert {k: rollout[k] for k in ("request_id", "model", "version", "champion", "status",
                                    "steps", "step", "percent", "config", "held", "looks",
                                    "finished_at", "verdict")} == {
        "request_id": request, "model": "digits", "version": 2, "champion": 1,
        "status": "running", "steps": [10.0, 50.0, 100.0], "step": 0, "percent": 10.0,
        "config": CONFIG, "held": False, "looks": 0, "finished_at": None, "verdict": None,
    }  # fmt: skip
    assert rollout["started_at"].tzinfo is not None
    entry = store.audit(limit=1)[0]
    assert (entry["action"], entry["actor"], entry["subject"]) == ("canary_start", "bob", "digits")
    assert entry["detail"]["rollout"] == rollout["id"] and entry["detail"]["percent"] == 10.0
    assert entry["rollback"] == {
        "deployments": [[1, "champion", 100.0], [2, "shadow", 100.0], [3, "shadow", 100.0]],
        "statuses": {"2": "shadow"},
    }
    assert "canary_start" in [a["action"] for a in store.promotion(request)["audit"]]
    again = store.start_rollout(request, "carol", steps=[5, 100], config={})
    assert again == rollout  # the running one, as it is
    assert store.promotion(request)["status"] == "approved"  # until the rollout ends
    assert store.active_rollout("digits") == rollout
    assert store.active_rollout("iris") is None


def test_start_refuses(store: RegistryStore) -> None:
    pending = store.file_promotion("digits", 2, {}, actor="loop")
    with pytest.raises(Conflict, match=f"request {pending} is pending, not approved"):
        store.start_rollout(pending, "bob", steps=[10, 100], config={})
    with pytest.raises(NotFound, match="no promotion request 999"):
        store.start_rollout(999, "bob", steps=[10, 100], config={})
    bad_steps: list[Any] = [[], [50, 10, 100], [10, 50], [0, 100], [10, 10, 100], [10, "50", 100],
                            [True, 100], [10, float("nan"), 100], [10, 150], "10,100"]  # fmt: skip
    for steps in bad_steps:
        with pytest.raises(Invalid, match="step"):
            store.start_rollout(pending, "bob", steps=steps, config={})
    for config in ({"x": float("inf")}, [1]):
        with pytest.raises(Invalid, match="config"):
            store.start_rollout(pending, "bob", steps=[10, 100], config=config)  # type: ignore[arg-type]
    champion = _approved(store, 1, "iris")  # its own champion
    with pytest.raises(Conflict, match="version 1 is already the champion"):
        store.start_rollout(champion, "bob", steps=[10, 100], config={})
    store.finish_promotion(champion, "failed", actor="test")
    store.set_deployments("iris", [(1, "champion", 100.0)], actor="ops")
    store.register_version("iris", "file:///m/iris/2", {})
    store.register_version("iris", "file:///m/iris/3", {})
    store.set_deployments("iris", [(1, "champion", 100.0), (3, "canary", 5.0)], actor="ops")
    other = _approved(store, 2, "iris")
    with pytest.raises(Conflict, match="version 3 as its canary"):
        store.start_rollout(other, "bob", steps=[10, 100], config={})
    assert _deployed(store, "iris") == [(1, "champion", 100.0), (3, "canary", 5.0)]  # unchanged
    assert store.rollouts() == []


def test_one_running_rollout_per_model(store: RegistryStore) -> None:
    first = _start(store)
    second = store.file_promotion("digits", 3, {}, actor="loop")
    with store.engine.begin() as connection:  # approved behind decide's back
        connection.execute(
            sa.update(PromotionRequest)
            .where(PromotionRequest.id == second)
            .values(status="approved")
        )
    with pytest.raises(Conflict, match=f"rollout {first['id']} of version 2 running"):
        store.start_rollout(second, "bob", steps=[10, 100], config={})
    assert [r["id"] for r in store.rollouts()] == [first["id"]]


def test_looks_are_stored_in_order_and_checked(store: RegistryStore) -> None:
    rollout = _start(store)
    rid = rollout["id"]
    seqs = [
        store.record_look(rid, step=0, percent=10.0, counts=_counts(10 * i, i, 90 * i, 9 * i),
                          verdict={"decision": "hold", "looks": i})
        for i in (1, 2, 3)
    ]  # fmt: skip
    assert seqs == [1, 2, 3]
    looks = store.rollout_looks(rid)
    assert [(look["seq"], look["step"], look["percent"]) for look in looks] == [
        (1, 0, 10.0), (2, 0, 10.0), (3, 0, 10.0),
    ]  # fmt: skip
    assert looks[1]["counts"] == {"errors": [20, 2, 180, 18], "latency": [20, 0, 180, 1]}
    assert looks[2]["verdict"] == {"decision": "hold", "looks": 3}
    assert store.rollout(rid)["looks"] == 3
    bad: list[Any] = [
        {"errors": [1, 2, 3, 0]},  # more canary events than trials
        {"errors": [1, 0, 3, 4]},
        {"errors": [1, 0, 3]},
        {"errors": [-1, 0, 3, 0]},
        {"errors": [1.5, 0, 3, 0]},
        {"errors": [True, 0, 3, 0]},
        {"": [1, 0, 1, 0]},
        [[1, 0, 1, 0]],
    ]
    for counts in bad:
        with pytest.raises(Invalid, match=r"counts|metric"):
            store.record_look(rid, step=0, percent=10.0, counts=counts, verdict={})
    with pytest.raises(Invalid, match="verdict"):
        store.record_look(rid, step=0, percent=10.0, counts={}, verdict={"e": float("nan")})
    for percent in (-1.0, 101.0, float("inf")):
        with pytest.raises(Invalid, match="percent"):
            store.record_look(rid, step=0, percent=percent, counts={}, verdict={})
    with pytest.raises(Conflict, match="at step 0, not 1"):  # a stale or confused runner
        store.record_look(rid, step=1, percent=50.0, counts={}, verdict={})
    with pytest.raises(NotFound, match="no rollout 999"):
        store.record_look(999, step=0, percent=10.0, counts={}, verdict={})
    with pytest.raises(NotFound):
        store.rollout_looks(999)
    assert len(store.rollout_looks(rid)) == 3  # the refused ones left nothing
    store.rollback_rollout(rid, "judge", "errors e=40 >= 40", {"decision": "rollback"})
    with pytest.raises(Conflict, match=f"rollout {rid} is already rolled_back"):
        store.record_look(rid, step=0, percent=10.0, counts={}, verdict={})


def test_advance_then_promote(store: RegistryStore) -> None:
    rollout = _start(store)
    rid, request = rollout["id"], rollout["request_id"]
    store.hold_rollout(rid, True, "step 0 undecided after 3600 s")
    assert store.rollout(rid)["held"] is True
    for wrong in (0, 2, 5):
        with pytest.raises(Conflict, match="can only advance to step 1"):
            store.advance_rollout(rid, wrong, "judge", "no", VERDICT)
    revision = store.deployments_revision()
    store.advance_rollout(rid, 1, "judge", "promotion e >= 20 on every metric", VERDICT)
    assert store.deployments_revision() > revision
    assert _deployed(store) == [(1, "champion", 100.0), (2, "canary", 50.0), (3, "shadow", 100.0)]
    doc = store.rollout(rid)
    assert (doc["step"], doc["percent"], doc["held"], doc["verdict"]) == (1, 50.0, False, VERDICT)
    assert doc["step_started_at"] >= doc["started_at"]
    entry = store.audit(limit=1)[0]
    assert entry["action"] == "canary_step" and entry["detail"]["verdict"] == VERDICT
    assert entry["rollback"]["deployments"][1] == [2, "canary", 10.0]
    with pytest.raises(Invalid, match="100 %: promote_rollout"):
        store.advance_rollout(rid, 2, "judge", "last", VERDICT)
    store.record_look(rid, step=1, percent=50.0, counts=_counts(50, 0, 50, 1), verdict=VERDICT)
    assert store.promote_rollout(rid, "judge", "step 1 passed", VERDICT) == 1
    assert _deployed(store) == [(2, "champion", 100.0), (3, "shadow", 100.0)]
    assert store.alias("digits", "champion") == 2
    assert _statuses(store) == {1: "archived", 2: "production", 3: "shadow", 4: "registered"}
    doc = store.rollout(rid)
    assert (doc["status"], doc["reason"], doc["looks"]) == ("promoted", "step 1 passed", 1)
    assert doc["finished_at"] is not None and store.active_rollout("digits") is None
    promotion = store.promotion(request)
    assert promotion["status"] == "promoted"
    assert [a["action"] for a in promotion["audit"]] == [
        "promotion_filed", "promotion_approved", "canary_start", "canary_hold", "canary_step",
        "canary_promote", "promotion_promoted",
    ]  # fmt: skip
    for finish in (
        lambda: store.rollback_rollout(rid, "judge", "late", None),
        lambda: store.fail_rollout(rid, "judge", "late"),
        lambda: store.promote_rollout(rid, "judge", "again", VERDICT),
        lambda: store.advance_rollout(rid, 2, "judge", "again", VERDICT),
        lambda: store.hold_rollout(rid, True, "late"),
    ):
        with pytest.raises(Conflict, match="is already promoted"):
            finish()
    assert store.rollback("digits", actor="ops", reason="worse later") == 1  # as after promote


def test_rollback_restores_the_route_table_in_one_step(store: RegistryStore) -> None:
    rollout = _start(store)
    rid, request = rollout["id"], rollout["request_id"]
    store.advance_rollout(rid, 1, "judge", "passed", VERDICT)
    verdict = {"decision": "rollback", "rollback_e": {"errors": 123.4}, "reason": "errors"}
    store.rollback_rollout(rid, "judge", "errors: e=123.4 >= 60", verdict)
    assert _deployed(store) == [(1, "champion", 100.0), (3, "shadow", 100.0)]
    assert _statuses(store)[2] == "rolled_back" and _statuses(store)[1] == "registered"
    assert store.alias("digits", "champion") == 1
    doc = store.rollout(rid)
    assert (doc["status"], doc["verdict"], doc["reason"]) == (
        "rolled_back", verdict, "errors: e=123.4 >= 60",
    )  # fmt: skip
    entry = store.audit(action="canary_rollback")[0]
    assert entry["detail"]["verdict"] == verdict and entry["actor"] == "judge"
    assert entry["rollback"] == {
        "deployments": [[1, "champion", 100.0], [2, "canary", 50.0], [3, "shadow", 100.0]],
        "statuses": {"2": "canary"},
    }
    assert store.promotion(request)["status"] == "rolled_back"
    # the model is free again: a new request can be approved and rolled out
    store.remove_shadow("digits", 3, actor="gates")
    store.add_shadow("digits", 4, actor="loop")
    failing = store.start_rollout(_approved(store, 4), "bob", steps=[100], config={})
    assert _deployed(store) == [(1, "champion", 100.0), (4, "canary", 100.0)]
    store.fail_rollout(failing["id"], "rollout", "version 4 did not load")
    assert _deployed(store) == [(1, "champion", 100.0)]
    assert _statuses(store)[4] == "archived"
    assert store.rollout(failing["id"])["status"] == "failed"
    assert store.promotion(failing["request_id"])["status"] == "failed"
    assert store.audit(limit=3)[-2]["action"] == "canary_fail"
    assert [r["status"] for r in store.rollouts("digits")] == ["failed", "rolled_back"]


def test_while_a_rollout_runs_the_route_table_is_its_own(store: RegistryStore) -> None:
    rollout = _start(store)
    rid, request = rollout["id"], rollout["request_id"]
    before = _deployed(store)
    named = f"rollout {rid} of version 2 running"
    with pytest.raises(Conflict, match=named):
        store.promote("digits", 3, actor="ops")
    with pytest.raises(Conflict, match=named):
        store.set_deployments("digits", [(1, "champion", 100.0)], actor="ops")
    with pytest.raises(Conflict, match=named):
        store.add_shadow("digits", 4, actor="loop")
    with pytest.raises(Conflict, match=f"has rollout {rid} running"):
        store.finish_promotion(request, "promoted", actor="immediate")
    with pytest.raises(Conflict, match="ends it with version 1 champion, not 3"):
        store.rollback("digits", actor="ops", to=3)
    assert _deployed(store) == before
    store.register_version("iris", "file:///m/iris/2", {})
    store.add_shadow("iris", 2, actor="loop")  # other models are free
    store.promote("iris", 2, actor="ops")
    assert store.rollback("digits", actor="ops:alice", reason="pager") == 1
    assert _deployed(store) == [(1, "champion", 100.0), (3, "shadow", 100.0)]
    doc = store.rollout(rid)
    assert (doc["status"], doc["reason"]) == ("rolled_back", "pager")
    entry = store.audit(action="canary_rollback")[0]
    assert entry["actor"] == "ops:alice" and entry["detail"]["verdict"] is None
    promotion = store.promotion(request)
    assert promotion["status"] == "rolled_back"
    assert promotion["audit"][-1]["actor"] == "ops:alice"
    store.add_shadow("digits", 4, actor="loop")  # free again


def test_lists_and_bad_queries(store: RegistryStore) -> None:
    first = _start(store)
    store.record_look(first["id"], step=0, percent=10.0, counts={}, verdict={})
    store.rollback_rollout(first["id"], "judge", "bad", None)
    store.remove_shadow("digits", 3, actor="gates")
    second = store.start_rollout(_approved(store, 4), "bob", steps=[25, 100], config={})
    assert [(r["id"], r["looks"]) for r in store.rollouts()] == [(second["id"], 0),
                                                                (first["id"], 1)]  # fmt: skip
    assert [r["id"] for r in store.rollouts(status="running")] == [second["id"]]
    assert [r["id"] for r in store.rollouts(model="digits", status="rolled_back")] == [first["id"]]
    assert store.rollouts(model="iris") == [] and len(store.rollouts(limit=1)) == 1
    with pytest.raises(Invalid, match="unknown rollout status 'done'"):
        store.rollouts(status="done")
    for limit in (0, 1001, True):
        with pytest.raises(Invalid, match="limit"):
            store.rollouts(limit=limit)
    with pytest.raises(NotFound, match="no rollout 12345"):
        store.rollout(12345)
    for call in (
        lambda: store.advance_rollout(12345, 1, "judge", "", VERDICT),
        lambda: store.promote_rollout(12345, "judge", "", VERDICT),
        lambda: store.rollback_rollout(12345, "judge", "", None),
        lambda: store.hold_rollout(12345, True, ""),
    ):
        with pytest.raises(NotFound):
            call()
    with pytest.raises(Invalid, match="4097"):
        store.rollback_rollout(second["id"], "judge", "r" * 4097, None)
    assert store.rollout(second["id"])["status"] == "running"


def test_two_processes_finish_a_rollout_once(store: RegistryStore) -> None:
    rid = _start(store)["id"]
    barrier = threading.Barrier(3)
    outcomes: dict[str, str] = {}

    def finish(name: str, work: Any) -> None:
        barrier.wait()
        try:
            work()
            outcomes[name] = "done"
        except Conflict:
            outcomes[name] = "conflict"

    works = {
        "promote": lambda: store.promote_rollout(rid, "judge-a", "passed", VERDICT),
        "rollback": lambda: store.rollback_rollout(rid, "judge-b", "failed", None),
        "operator": lambda: store.rollback("digits", actor="ops"),
    }
    threads = [threading.Thread(target=finish, args=item) for item in works.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done = {name for name, outcome in outcomes.items() if outcome == "done"}
    # one of them ends the rollout; an operator's rollback after the promotion swaps back
    assert done in ({"promote"}, {"promote", "operator"}, {"rollback"}, {"operator"})
    status = store.rollout(rid)["status"]
    assert status == ("promoted" if "promote" in done else "rolled_back")
    roles = [role for _, role, _ in _deployed(store)]
    assert roles.count("champion") == 1 and "canary" not in roles


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migration_0004_upgrades_a_0003_database(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = fresh_url(request, tmp_path, backend)
    store = RegistryStore(url)
    try:
        upgrade(store.engine, "0003")
        store.register_version("digits", "file:///m/1", {})  # the 0003 tables, written as is
        store.register_version("digits", "file:///m/2", {})
        with store.engine.begin() as connection:
            connection.exec_driver_sql(
                "INSERT INTO deployments (model, version, role, percent, updated_at) "
                "VALUES ('digits', 1, 'champion', 100.0, CURRENT_TIMESTAMP)"
            )
            connection.exec_driver_sql(
                "INSERT INTO aliases (model, alias, version, updated_at, updated_by) "
                "VALUES ('digits', 'champion', 1, CURRENT_TIMESTAMP, 'bootstrap')"
            )
        filed = store.file_promotion("digits", 2, {"v": 2}, actor="loop")
        store.decide(filed, "approved", "bob", APPROVER)
        assert not sa.inspect(store.engine).has_table("rollouts")
        store.create_schema()
        assert sa.inspect(store.engine).has_table("rollout_looks")
        assert store.promotion(filed)["status"] == "approved"  # the old rows stay
        rollout = store.start_rollout(filed, "bob", steps=[10, 100], config={})
        store.record_look(rollout["id"], step=0, percent=10.0, counts={}, verdict={})
        downgrade(store.engine, "0003")
        assert not sa.inspect(store.engine).has_table("rollouts")
        assert [v.version for v in store.versions("digits")] == [1, 2]
        store.create_schema()
        assert store.rollouts() == []
    finally:
        store.close()
    assert "0004" not in (migration_heads() or ())  # 0005 (endpoints) came after it
    if backend == "sqlite":  # the fast path (servo train, models list) accepts the new head
        lite = LiteRegistry.open(url)
        assert lite is not None
        lite.close()
