"""`kill -9` of `servo up` at each phase of the loop (issue 11, point 7), on real processes
under labelled traffic: during a pipeline run, during the shadow's evidence. After each
restart: the run is marked failed or interrupted, the route table is the one the killed
process last committed and is consistent, nothing is half-promoted or half-published, the
loop carries on from its stored state, and nothing recorded is lost: every payload-log
file on disk before the kill is there with the same rows, and every label answered
`"stored": true` is in the feedback table (once).

A kill can also fall between two transactions that belong together: a canary's look stored
with its verdict and the decision it made; a promotion request filed and the loop state
that records it (or the gates' decision and the shadow's removal). The restarted process
carries on from the first (unit tests on a real registry: the kill is played by doing the
first transaction by hand).

One `servo up` lineage for every phase (each start costs seconds): killed while
retraining, restarted with a quicker retrain, killed while shadowing, restarted. And the
payload log alone, its writer killed many times in the middle of its writes (a write every
few milliseconds, so kills land inside them), then opened again."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from monitors.payload_log import PREDICTIONS
from registry.store import RegistryStore
from retrain.judge import Counts, Judge, JudgeConfig, counts_from_json, counts_to_json, replay
from retrain.policy import parse_config
from retrain.rollout import ImmediateRollout
from serving.payload_log import PayloadLog, PayloadLogConfig
from servo.loop import Controller, ControllerConfig, now_iso
from tests.crash import (
    ROOT,
    check_invariants,
    check_nothing_lost,
    check_promotions,
    check_rollouts,
    check_route_chain,
    check_routes,
    frozen,
    last_audit,
    payload_files,
    query,
    routes,
)
from tests.loop_traffic import Traffic
from tests.test_canary_rollout import FakeCounts, approved, canary
from tests.test_loop_e2e import events, registry, write_policy
from tests.test_loop_faults import _metrics_with, policy
from tests.upservers import Up, start_up, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

RETRAIN = "window_s: 3600\nshare: 0.5\nholdout: 0.3\n"
#: long enough to be killed in the middle of its train step
SLOW = RETRAIN + "params: {hidden: [512, 512], max_iter: 500}"
#: another seed: the same seed would train the champion again (reused)
QUICK = RETRAIN + "params: {seed: 1}"
#: labelled pairs come at about 20 a second: the evidence takes long enough to be killed
SHADOW = "min_labelled: 300\ntimeout_s: 300"
#: no event can be counted (no 5xx, nothing slower than 2.5 s): a good candidate's step
#: advances by the floor test (rates below 5 %: about 100 canary requests without an
#: event) once it saw `min_requests` canary requests, a few looks at 10 %
ROLLOUT = ("steps: [10, 50, 100]\nlook_every_s: 1\nmin_requests: 100\nnegligible_rate: 0.05\n"
           "latency_threshold_s: 2.5\nmetrics: [errors, latency]")  # fmt: skip


@dataclass
class Killed:
    """What the killed process had recorded, read just before the kill."""

    files: dict[Path, list[str]]
    labels: list[str]
    routes: dict[str, list[tuple[int, str, float]]]
    #: the last audit entry then
    audit: int
    rollouts: list[dict[str, Any]]


class Lineage:
    """`servo up` processes one after the other on one folder, under one traffic client
    with labels; `kill_and_restart` kills the newest and starts the next."""

    def __init__(self, tmp_path: Path, text: str):
        self.tmp_path = tmp_path
        self.policy = write_policy(tmp_path, text)
        self.ups = [start_up(tmp_path / "s", tmp_path / "up-0.log", policy=self.policy)]
        self.db = self.up.directory / "registry.db"
        self.store = registry(self.up)
        self.traffic = Traffic(self.up.url, every_s=0.02).start()

    @property
    def up(self) -> Up:
        return self.ups[-1]

    def state(self) -> dict[str, Any]:
        return self.store.loop_states()["digits"]

    def frozen(self) -> Path:
        """A consistent copy of the registry now (the live one changes under a check); the
        next copy replaces it."""
        return frozen(self.db, self.tmp_path / "registry-copy.db")

    def kill_and_restart(self) -> Killed:
        """kill -9 the newest under traffic, start the next on its folder, point the
        traffic at it, and check that nothing recorded before the kill was lost and that
        the route table is the last one committed (or what the new process made of it)."""
        root = self.up.directory / "payload"
        files, labels = payload_files(root), list(self.traffic.stored)
        self.up.kill()
        db = self.frozen()  # as the kill left it
        killed = Killed(files, labels, check_routes(db), last_audit(db), check_rollouts(db))
        check_promotions(db)
        assert labels and any(p.is_relative_to(root / PREDICTIONS) for p in files)
        log = self.tmp_path / f"up-{len(self.ups)}.log"
        self.ups.append(start_up(self.up.directory, log, policy=self.policy))
        self.traffic.url = self.up.url
        # the journal was replayed before the restarted gateway answered anything
        check_nothing_lost(root, files, labels)
        self.check(killed)
        return killed

    def check(self, killed: Killed) -> Path:
        """The registry's invariants now, on a consistent copy (returned)."""
        db = self.frozen()
        check_route_chain(db, killed.routes, killed.audit)
        check_routes(db)
        check_promotions(db)
        check_rollouts(db)
        return db

    def close(self) -> None:
        self.traffic.stop()
        for up in self.ups:
            up.stop()
        self.store.close()


@pytest.fixture
def lineage(tmp_path: Path) -> Iterator[Lineage]:
    made = Lineage(tmp_path, policy(retrain=SLOW, shadow=SHADOW, rollout=ROLLOUT))
    try:
        yield made
    finally:
        made.close()


def kill_while_retraining(loop: Lineage) -> None:
    """During a pipeline run (its first step recorded, the train step running): the run
    ends failed or interrupted, the route table is the one before it, nothing published."""
    store = loop.store
    store.request_retrain("digits", "cli:test", "to be killed")
    run = wait_for(lambda: [r for r in store.runs(10, recover=False)
                            if r["trigger"] == "manual"])[0]  # fmt: skip
    wait_for(lambda: query(loop.db, "SELECT * FROM step_runs WHERE run_id = ?", run["id"]))
    assert loop.state()["state"] == "retraining"
    assert store.run(run["id"], recover=False)["status"] == "running"
    # read at the restart
    write_policy(loop.tmp_path, policy(retrain=QUICK, shadow=SHADOW, rollout=ROLLOUT))
    killed = loop.kill_and_restart()
    wait_for(lambda: loop.state()["state"] == "watching")
    assert store.run(run["id"], recover=False)["status"] in ("failed", "interrupted")
    ended = {e["detail"]["status"] for e in events(store, "retrain_finished")}
    assert ended & {"failed", "interrupted"}, ended
    db = loop.check(killed)
    assert routes(db) == killed.routes == {"digits": [(1, "champion", 100.0)]}
    counts = check_invariants(db, loop.up.directory)
    assert counts["servable"] == 1 and counts["failed"] <= 1, counts
    assert store.model_lock("digits") is None


def kill_while_shadowing(loop: Lineage) -> dict[str, Any]:
    """During the shadow's evidence (some labelled pairs counted, not enough yet): the
    shadow stays routed and the loop resumes; the evidence counted before the kill still
    counts, exactly one request is filed, the champion stays. Returns the request."""
    store = loop.store
    store.request_retrain("digits", "cli:test", "shadow, then killed")
    shadowing = wait_for(lambda: (s := loop.state())["state"] == "shadowing"
                         and (s["detail"]["candidate"] or {}).get("n_labelled", 0) >= 20
                         and s)  # fmt: skip
    counted = shadowing["detail"]["candidate"]["n_labelled"]
    version = shadowing["detail"]["candidate"]["version"]
    killed = loop.kill_and_restart()
    assert killed.routes == {"digits": [(1, "champion", 100.0), (version, "shadow", 100.0)]}
    assert routes(loop.check(killed)) == killed.routes
    check_invariants(loop.frozen(), loop.up.directory)
    assert loop.state()["state"] == "shadowing"
    metrics = wait_for(lambda: _metrics_with(loop.up, f'stage="shadow",version="{version}"'))
    assert 'servo_loop_state{model="digits",state="shadowing"} 1.0' in metrics
    filed = wait_for(lambda: store.promotions(model="digits"), every_s=0.5)
    assert [r["version"] for r in filed] == [version]
    assert filed[0]["evidence"]["live"]["n_labelled"] >= max(counted, 300)
    assert store.alias("digits", "champion") == 1
    resumed = loop.up.named("resumed")
    assert resumed and resumed[0]["state"] == "shadowing"
    wait_for(lambda: loop.state()["state"] == "awaiting_approval")
    loop.check(killed)
    return store.promotion(filed[0]["id"])


def approve(loop: Lineage, request: dict[str, Any]) -> int:
    """An approver approves over the admin API: the canary starts; its rollout's id."""
    token = loop.store.create_token("alice", "approver", actor="test")
    reply = httpx.post(
        f"{loop.up.admin}/admin/promotions/{request['id']}/approve",
        json={"reason": "as a canary", "evidence_hash": request["evidence_hash"]},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    (rollout,) = loop.store.rollouts(model="digits")
    return int(rollout["id"])


def kill_in_step(loop: Lineage, rollout_id: int, step: int) -> None:
    """During canary step `step` (a look of it stored): the rollout resumes from its
    stored looks (kept as they were; more follow, their verdicts what a replay of all of
    them gives: the judge went on, it did not start over), the canary and the champion
    are the rollout's, at one of its steps."""
    store = loop.store

    def in_step() -> bool:
        doc = store.rollout(rollout_id)
        assert doc["status"] == "running", doc  # a good candidate, never rolled back
        looks = store.rollout_looks(rollout_id)
        return doc["step"] == step and any(look["step"] == step for look in looks)

    wait_for(in_step, every_s=0.1)
    killed = loop.kill_and_restart()
    (before,) = [r for r in killed.rollouts if r["id"] == rollout_id]
    assert before["status"] == "running" and before["step"] >= step, before

    def resumed() -> dict[str, Any] | None:
        (now,) = check_rollouts(loop.check(killed))
        # a new look; or none, where the restart carried out the last stored decision
        over = now["status"] != "running"
        return now if len(now["looks"]) > len(before["looks"]) or over else None

    after = wait_for(resumed, every_s=0.2)
    assert after["looks"][: len(before["looks"])] == before["looks"]
    assert after["step"] >= before["step"]
    config = JudgeConfig.from_json(after["config"]["judge"])
    looks = [(look["step"], counts_from_json(look["counts"])) for look in after["looks"]]
    for look, verdict in zip(after["looks"], replay(config, looks), strict=True):
        stored = look["verdict"]
        assert (stored["decision"], stored["looks"], stored["step"]) == (
            verdict.decision, verdict.looks, verdict.step,
        )  # fmt: skip
        assert stored["rollback_e"] == pytest.approx(verdict.rollback_e)
        assert stored["promote_e"] == pytest.approx(verdict.promote_e)
    kinds = [e["kind"] for e in store.loop_events("digits") if e["kind"] == "rollout_resumed"]
    assert len(kinds) >= 1


@pytest.mark.timeout(420)  # five `servo up` starts, two retrains, a shadow and a canary
def test_kill_9_in_every_phase_of_the_loop_loses_nothing(lineage: Lineage) -> None:
    wait_for(lambda: len(lineage.traffic.stored) >= 20)
    kill_while_retraining(lineage)
    request = kill_while_shadowing(lineage)
    version = int(request["version"])
    lineage.traffic.stop()  # more traffic: each step's requests sooner
    lineage.traffic.senders = 4
    lineage.traffic.start()
    rollout_id = approve(lineage, request)
    kill_in_step(lineage, rollout_id, 0)
    kill_in_step(lineage, rollout_id, 1)
    store = lineage.store
    wait_for(lambda: store.rollout(rollout_id)["status"] != "running", every_s=0.5)
    assert store.rollout(rollout_id)["status"] == "promoted"
    db = lineage.frozen()
    assert routes(db) == {"digits": [(version, "champion", 100.0)]}
    assert store.promotion(request["id"])["status"] == "promoted"
    assert store.alias("digits", "champion") == version
    check_routes(db)
    check_promotions(db)
    check_rollouts(db)
    check_invariants(db, lineage.up.directory)
    wait_for(lambda: lineage.state()["state"] == "watching")


#: a payload-log writer as fast as it goes: predictions queued, a label stored (and its id
#: printed once the store says it is durable) for every other one, files every 10 ms
WRITER = """
import datetime as dt, itertools, sys
from pathlib import Path
import numpy as np
from monitors.payload_log import FEEDBACK, PREDICTIONS
from serving.payload_log import PayloadLog, PayloadLogConfig

log = PayloadLog(PayloadLogConfig(Path(sys.argv[1]), flush_s=0.01, batch_rows=20))
print("ready", flush=True)
rows = np.zeros((1, 64), dtype=np.float32)
for i in itertools.count():
    ident, now = f"{sys.argv[2]}-{i}", dt.datetime.now(dt.UTC)
    log.submit(PREDICTIONS, {"id": ident, "time": now, "model": "m", "version": "1",
                             "variant": "champion", "inputs": [("input", "FP32", rows)],
                             "outputs": [("label", "INT64", np.array([i % 10]))]})
    if i % 2 == 0:
        log.store(FEEDBACK, [{"id": ident, "time": now, "model": "m", "version": "1",
                              "label": "3", "outcome": "correct"}]).result()
        print(ident, flush=True)
"""


def _collect(lines: IO[str], into: list[str]) -> None:
    into.extend(line.strip() for line in lines)


@pytest.mark.timeout(120)
def test_a_payload_log_writer_killed_mid_write_loses_nothing_older(tmp_path: Path) -> None:
    root, rng = tmp_path / "log", random.Random(11)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    recovered = swept = 0
    for kill in range(6):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(root), f"w{kill}"],
                                  stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready"
        acked: list[str] = []
        reader = threading.Thread(target=_collect, args=(writer.stdout, acked))
        reader.start()
        try:
            time.sleep(rng.uniform(0.2, 0.8))
            files, labels = payload_files(root), list(acked)
        finally:
            writer.kill()
            writer.wait(timeout=20)
            reader.join(timeout=20)
            writer.stdout.close()
        assert labels
        opened = PayloadLog(PayloadLogConfig(root))  # replays the killed writer's journal
        opened.close()
        recovered += opened.labels.recovered
        swept += opened.swept
        check_nothing_lost(root, files, labels)
        assert not list((root / "feedback" / "_journal").glob("*.jsonl"))
        assert not list(root.rglob("*.tmp"))  # what a kill mid-write left was removed
    print(f"labels only in a journal at the kill, recovered: {recovered}; temporary files "
          f"of a write cut by the kill, removed: {swept}")  # fmt: skip


@pytest.mark.parametrize("decision", ["rollback", "advance"])
def test_a_verdict_stored_just_before_a_kill_is_carried_out_at_the_restart(
    tmp_path: Path, decision: str
) -> None:
    store = RegistryStore(f"sqlite:///{tmp_path / 'registry.db'}")
    store.create_schema()
    for version in (1, 2):
        store.register_version("digits", f"file:///m/digits/{version}", {})
    store.set_deployments("digits", [(1, "champion", 100.0)], actor="bootstrap")
    store.set_alias("digits", "champion", 1, actor="bootstrap")
    store.add_shadow("digits", 2, actor="loop", reason="candidate")
    fake = FakeCounts()
    killed, again = canary(store, fake), canary(store, fake)
    try:
        request = approved(store)
        assert killed.start(request, "alice") == "approved"
        killed.stop()  # the kill: its runner is gone, the rollout stays running
        (doc,) = store.rollouts(model="digits")
        # its last look: 7 errors in 100 canary requests against 9 in 900 (just past the
        # rollback threshold), or 150 canary requests and no event (advance to 50 %)
        errors = Counts(100, 7, 900, 9) if decision == "rollback" else Counts(150, 0, 1350, 0)
        counts = {"errors": errors, "latency": Counts(errors.canary_trials, 0,
                                                      errors.champion_trials, 0)}  # fmt: skip
        verdict = Judge(JudgeConfig.from_json(doc["config"]["judge"])).observe(0, counts)
        assert verdict.decision == decision
        store.record_look(doc["id"], step=0, percent=10.0, counts=counts_to_json(counts),
                          verdict=verdict.to_json())  # fmt: skip
        # the restart; then the canary looks better than the champion (50 canary requests,
        # below min_requests: the new step cannot decide on its own)
        assert again.resume() == [doc["id"]]
        fake.traffic(2, 1, 50, 450, champion_errors=30)
        if again.running(request["id"]):
            again.look(doc["id"])
        after = store.rollout(doc["id"])
        table = routes(tmp_path / "registry.db")["digits"]
        if decision == "rollback":
            assert after["status"] == "rolled_back" and after["looks"] == 1, after
            assert after["verdict"] == verdict.to_json()
            assert table == [(1, "champion", 100.0)]
            assert store.promotion(request["id"])["status"] == "rolled_back"
        else:
            assert (after["status"], after["step"]) == ("running", 1), after
            assert table == [(1, "champion", 100.0), (2, "canary", 50.0)]
        check_rollouts(tmp_path / "registry.db")
    finally:
        again.stop()
        store.close()


@pytest.mark.parametrize("then", ["filed", "rejected"])
def test_a_request_filed_just_before_a_kill_is_not_filed_again(
    model_root: Path, tmp_path: Path, then: str
) -> None:
    """Killed after filing the shadow's request (before the loop state recorded it), or
    after the gates rejected it (before the shadow was removed): the restarted controller
    takes that request on (the gates judge it, or its end is carried out); never a second."""
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    store = RegistryStore(url)
    store.create_schema()
    for version in (1, 2):
        store.register_version("digits", (model_root / "digits" / str(version)).as_uri(), {})
    store.set_deployments("digits", [(1, "champion", 100.0)], actor="bootstrap")
    store.set_alias("digits", "champion", 1, actor="bootstrap")
    store.add_shadow("digits", 2, actor="loop", reason="candidate")
    candidate = {"version": 2, "run_id": None, "since": now_iso(time.time() - 600),
                 "trigger": "manual", "triggered_by": "cli:test"}  # fmt: skip
    store.set_loop_state("digits", "shadowing", {"candidate": candidate, "reason": "test"})
    # the killed process's last transactions: its request (evidence that passes no gate)
    request_id = store.file_promotion("digits", 2, {"live": {}}, actor="loop")
    if then == "rejected":
        store.auto_decide(request_id, "rejected", "gates failed", actor="gates")
    text = "defaults:\n  shadow: {min_labelled: 100, timeout_s: 1}\n"
    controller = Controller(
        store, config=parse_config(text), reports=None, rollout=ImmediateRollout(store),
        scheduler=None, clock=time.time,
        settings=ControllerConfig(tmp_path, url, tmp_path / "payload"),
    )  # fmt: skip
    try:
        controller.tick("digits")  # shadowing: the request of the shadow is found
        if store.loop_states()["digits"]["state"] == "awaiting_approval":
            controller.tick("digits")  # its end carried out: the candidate leaves the shadow
        requests = store.promotions(model="digits")
        assert [(r["id"], r["status"]) for r in requests] == [(request_id, "rejected")]
        assert store.loop_states()["digits"]["state"] == "watching"
        assert routes(tmp_path / "registry.db") == {"digits": [(1, "champion", 100.0)]}
        check_promotions(tmp_path / "registry.db")
    finally:
        store.close()
