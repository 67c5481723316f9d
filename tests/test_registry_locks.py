"""The loop's coordination in the registry, on SQLite and a real PostgreSQL: one model
lock per model across processes (exactly one of two racing processes wins; a dead
holder's lock is taken over), loop state with pauses, the event log, manual retrain
requests claimed once, runs that record their model and can end interrupted."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from registry.models import ModelLock
from registry.store import Invalid, NotFound, RegistryStore
from tests.registry_backends import backend_store, pg_url  # noqa: F401

ROUNDS = 8


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RegistryStore]:
    with backend_store(request, tmp_path) as made:
        made.register_version("digits", "file:///m/digits/1", {})
        yield made


def _contender(url: str, owner: str, barrier: Any, results: Any) -> None:
    store = RegistryStore(url)
    try:
        for i in range(ROUNDS):
            barrier.wait(60)
            results.put((i, owner, store.lock_model(f"model{i}", owner)))
    finally:
        store.close()


def test_of_two_racing_processes_exactly_one_gets_each_lock(store: RegistryStore) -> None:
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    contenders = [
        context.Process(target=_contender, args=(store.url, f"servo-up-{k}", barrier, results))
        for k in range(2)
    ]
    for process in contenders:
        process.start()
    outcomes = [results.get(timeout=120) for _ in range(2 * ROUNDS)]
    for process in contenders:
        process.join(60)
        assert process.exitcode == 0
    for i in range(ROUNDS):
        won = [owner for round_, owner, taken in outcomes if round_ == i and taken]
        assert len(won) == 1, (i, outcomes)
        assert store.model_lock(f"model{i}")["owner"] == won[0]  # type: ignore[index]


def _lock_and_exit(url: str) -> None:
    store = RegistryStore(url)
    assert store.lock_model("digits", "crashed-up", purpose="retrain")
    store.close()


def test_a_dead_holders_lock_is_taken_over(store: RegistryStore) -> None:
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=_lock_and_exit, args=(store.url,))
    process.start()
    process.join(60)
    assert process.exitcode == 0
    held = store.model_lock("digits")
    assert held is not None and held["owner"] == "crashed-up" and held["pid"] == process.pid
    assert store.lock_model("digits", "new-up")  # its holder's process is gone
    assert store.model_lock("digits")["owner"] == "new-up"  # type: ignore[index]
    taken = store.audit(action="lock_taken_over")
    assert [(a["actor"], a["detail"]["from"]) for a in taken] == [("new-up", "crashed-up")]
    assert "is gone" in taken[0]["detail"]["reason"]


def test_a_lock_from_elsewhere_lives_by_its_heartbeat(store: RegistryStore) -> None:
    assert store.lock_model("digits", "other-host-up")
    with store.engine.begin() as connection:  # as if another machine had taken it
        connection.execute(sa.update(ModelLock).values(lease_host="elsewhere.example"))
    assert not store.lock_model("digits", "me")  # its heartbeat is fresh
    stale = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=store.lease_s + 30)
    with store.engine.begin() as connection:
        connection.execute(sa.update(ModelLock).values(heartbeat_at=stale))
    assert store.lock_model("digits", "me")
    assert not store.heartbeat_model_lock("digits", "other-host-up")  # it lost the lock
    assert store.heartbeat_model_lock("digits", "me")


def test_lock_heartbeat_and_unlock(store: RegistryStore) -> None:
    assert store.model_lock("digits") is None
    assert store.lock_model("digits", "up-1", purpose="bootstrap")
    first = store.model_lock("digits")
    assert first is not None and (first["owner"], first["purpose"]) == ("up-1", "bootstrap")
    assert not store.lock_model("digits", "up-2")  # a live holder keeps it
    assert store.lock_model("digits", "up-1")  # the holder again: still its own
    assert store.heartbeat_model_lock("digits", "up-1")
    assert not store.heartbeat_model_lock("digits", "up-2")
    store.unlock_model("digits", "up-2")  # not the holder: nothing happens
    assert store.model_lock("digits")["owner"] == "up-1"  # type: ignore[index]
    store.unlock_model("digits", "up-1")
    assert store.model_lock("digits") is None
    assert not store.heartbeat_model_lock("digits", "up-1")
    assert store.lock_model("digits", "up-2")
    with pytest.raises(Invalid, match="owner"):
        store.lock_model("digits", "")


def test_loop_state_and_pauses(store: RegistryStore) -> None:
    assert store.loop_states() == {}
    store.set_loop_state("digits", "watching", {"trigger": {"consecutive": 1}})
    store.set_loop_state("digits", "retraining")  # no detail: the stored one stays
    state = store.loop_states()["digits"]
    assert (state["state"], state["paused"], state["detail"]) == (
        "retraining", False, {"trigger": {"consecutive": 1}},
    )  # fmt: skip
    store.pause_loop("digits", actor="ops", reason="maintenance")
    store.pause_loop("digits", actor="ops")  # already paused: nothing changes
    store.set_loop_state("digits", "watching", {})
    state = store.loop_states()["digits"]
    assert (state["state"], state["paused"], state["detail"]) == ("watching", True, {})
    store.resume_loop("digits", actor="ops2", reason="done")
    assert not store.loop_states()["digits"]["paused"]
    audit = [(a["action"], a["actor"], a["detail"]) for a in store.audit(subject="digits")]
    assert audit == [("loop_paused", "ops", {"reason": "maintenance"}),
                     ("loop_resumed", "ops2", {"reason": "done"})]  # fmt: skip
    with pytest.raises(Invalid, match="unknown loop state 'sleeping'"):
        store.set_loop_state("digits", "sleeping")
    with pytest.raises(Invalid, match="not finite JSON"):
        store.set_loop_state("digits", "watching", {"x": float("nan")})
    with pytest.raises(NotFound, match=r"no model named '\.\./etc'"):
        store.pause_loop("../etc", actor="ops")
    with pytest.raises(Invalid, match="4097"):
        store.pause_loop("digits", actor="ops", reason="r" * 4097)


def test_loop_events(store: RegistryStore) -> None:
    kinds = ["check", "alarm", "check", "retrain_started", "check"]
    ids = [store.record_loop_event("digits", kind, {"i": i}) for i, kind in enumerate(kinds)]
    store.record_loop_event("iris", "check", {})
    events = store.loop_events("digits")
    assert [e["id"] for e in events] == ids  # newest last
    assert [e["detail"]["i"] for e in store.loop_events("digits", kinds=["check"])] == [0, 2, 4]
    assert [e["detail"]["i"] for e in store.loop_events("digits", limit=2)] == [3, 4]
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1)
    assert store.loop_events("digits", since=later) == []
    earlier = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(minutes=1)  # naive: UTC
    assert len(store.loop_events("digits", since=earlier)) == 5
    assert store.loop_events("digits", kinds=["retrain_started"])[0]["model"] == "digits"
    for kind in ("", "Check", "a" * 33, "drop table"):
        with pytest.raises(Invalid, match="invalid event kind"):
            store.record_loop_event("digits", kind, {})


def test_manual_retrain_requests_are_claimed_once(store: RegistryStore) -> None:
    store.register_version("iris", "file:///m/iris/1", {})
    first = store.request_retrain("digits", actor="alice", reason="new labels")
    second = store.request_retrain("iris", actor="bob")
    with pytest.raises(NotFound):
        store.request_retrain("nope", actor="alice")
    assert [r["id"] for r in store.take_retrain_requests("up-1", models=["iris"])] == [second]
    taken = store.take_retrain_requests("up-1")
    assert [(r["id"], r["model"], r["actor"], r["reason"]) for r in taken] == [
        (first, "digits", "alice", "new labels"),
    ]
    assert store.take_retrain_requests("up-1") == []
    audit = store.audit(action="retrain_requested")
    assert [(a["subject"], a["actor"]) for a in audit] == [("digits", "alice"), ("iris", "bob")]
    queued = {store.request_retrain("digits", actor="alice") for _ in range(20)}
    claimed: list[int] = []
    barrier = threading.Barrier(3)

    def claim(name: str) -> None:
        barrier.wait()
        for _ in range(5):
            claimed.extend(r["id"] for r in store.take_retrain_requests(name))

    threads = [threading.Thread(target=claim, args=(f"up-{k}",)) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(queued)  # each exactly once


def test_runs_record_their_model_and_may_end_interrupted(store: RegistryStore) -> None:
    loop_run = store.start_run("digits-pipeline", "accuracy_stall", {}, model="digits")
    manual = store.start_run("digits-pipeline", "manual", {}, model="digits", triggered_by="alice")
    store.start_run("other", "manual", {})
    reserved = store.register_version("digits", "", {}, run_id=manual, servable=False)
    store.finish_run(manual, "interrupted", "stopped by SIGTERM")
    store.finish_run(loop_run, "succeeded")
    runs = store.runs(model="digits")
    assert [(r["id"], r["model"], r["triggered_by"], r["status"]) for r in runs] == [
        (manual, "digits", "alice", "interrupted"),
        (loop_run, "digits", None, "succeeded"),
    ]
    assert len(store.runs()) == 3 and store.runs(1)[0]["model"] is None
    assert store.version("digits", reserved).status == "failed"  # like a failed run
    with pytest.raises(Invalid, match="not 'cancelled'"):
        store.finish_run(store.start_run("x", "manual", {}), "cancelled")
