"""The canary rollout (retrain.rollout.CanaryRollout) on a real registry (SQLite) with
counts and a clock the test drives: each look's decision (advance through the steps,
promotion at the last, rollback), the step timeout (hold with one alert, or rollback), a
restart that resumes from the stored looks, the immediate strategy, a refused canary; the
counts source on a real Recorder, a failing canary's errors counted as its own by a real
gateway, and the policy's rollout section."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from registry.models import ModelVersion
from registry.store import RegistryStore
from retrain.judge import Counts, Judge, JudgeConfig, counts_from_json, counts_to_json, replay
from retrain.policy import LATENCY_EDGES, Policy, PolicyError, parse_config
from retrain.rollout import CanaryRollout, Cumulative, increments, judge_config
from serving.recorder import LATENCY_BUCKETS, Recorder
from servo.canary import counts
from servo.demo import digits_holdout
from servo.loop_metrics import LoopMetrics
from tests.crash import wait_for
from tests.models import failing_model, write_model
from tests.servers import start_server
from tests.test_routing import BODY, dep, write_routes
from tests.test_routing import metric as scraped

FAST = """
defaults:
  rollout:
    steps: [10, 50, 100]
    look_every_s: 3600      # the test looks (runner.look), the thread never does
    min_requests: 100
    negligible_rate: 0.05   # a step without events passes by the floor test (~100 requests)
    step_timeout_s: 600
    on_timeout: {on_timeout}
    metrics: [errors, latency, incorrect]
"""


class FakeCounts:
    """Cumulative counts the test adds to: version -> metric -> [trials, events]."""

    def __init__(self) -> None:
        self.totals: dict[int, dict[str, list[int]]] = {}
        self.reads = 0
        self.lock = threading.Lock()

    def add(self, version: int, metric: str, trials: int, events: int) -> None:
        with self.lock:
            row = self.totals.setdefault(version, {}).setdefault(metric, [0, 0])
            row[0] += trials
            row[1] += events

    def traffic(self, canary: int, champion: int, n_canary: int, n_champion: int, *,
                canary_errors: int = 0, champion_errors: int = 0) -> None:  # fmt: skip
        for metric in ("errors", "latency"):
            self.add(canary, metric, n_canary, canary_errors if metric == "errors" else 0)
            self.add(champion, metric, n_champion, champion_errors if metric == "errors" else 0)

    def cumulative(
        self, model: str, versions: Sequence[int], latency_threshold_s: float
    ) -> Cumulative:
        with self.lock:
            self.reads += 1
            return {
                v: {m: (row[0], row[1]) for m, row in self.totals.get(v, {}).items()}
                for v in versions
            }


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RegistryStore]:
    made = RegistryStore(f"sqlite:///{tmp_path / 'registry.db'}")
    made.create_schema()
    made.register_version("digits", "file:///m/digits/1", {})
    made.set_deployments("digits", [(1, "champion", 100.0)], actor="bootstrap")
    made.set_alias("digits", "champion", 1, actor="bootstrap")
    made.register_version("digits", "file:///m/digits/2", {})
    made.add_shadow("digits", 2, actor="loop", reason="candidate")
    try:
        yield made
    finally:
        made.close()


def approved(store: RegistryStore) -> dict[str, Any]:
    request_id = store.file_promotion("digits", 2, {"live": {}}, actor="loop")
    return store.auto_decide(request_id, "approved", "gates passed", actor="policy")


def canary(store: RegistryStore, counts: FakeCounts, clock: Clock | None = None,
           on_timeout: str = "hold", **kwargs: Any) -> CanaryRollout:  # fmt: skip
    config = parse_config(FAST.format(on_timeout=on_timeout))
    return CanaryRollout(store, counts, config.for_model, clock or Clock(), **kwargs)


def routes(store: RegistryStore) -> list[tuple[int, str, float]]:
    return sorted((d["version"], d["role"], d["percent"]) for d in store.deployments()["digits"])


def kinds(store: RegistryStore) -> list[str]:
    return [e["kind"] for e in store.loop_events("digits")]


def test_a_good_canary_goes_through_10_50_and_is_promoted(store: RegistryStore) -> None:
    fake = FakeCounts()
    rollout = canary(store, fake)
    request = approved(store)
    try:
        assert rollout.start(request, "alice") == "approved"  # returns at once
        (doc,) = store.rollouts(model="digits")
        assert rollout.running(request["id"])
        assert routes(store) == [(1, "champion", 100.0), (2, "canary", 10.0)]  # shadow replaced
        assert fake.reads == 1  # the baseline
        # no traffic: inconclusive, never a pass
        assert rollout.look(doc["id"]) is False
        assert store.rollout(doc["id"])["step"] == 0
        # a canary as good as the champion, labelled too: enough requests, no events
        fake.traffic(2, 1, 150, 1350)
        fake.add(2, "incorrect", 100, 0)
        fake.add(1, "incorrect", 900, 0)
        assert rollout.look(doc["id"]) is False
        assert store.rollout(doc["id"])["step"] == 1 and routes(store)[1] == (2, "canary", 50.0)
        # step 2 (50 %) starts afresh: its own minimum of canary requests
        fake.traffic(2, 1, 60, 60)
        assert rollout.look(doc["id"]) is False
        assert store.rollout(doc["id"])["step"] == 1
        fake.traffic(2, 1, 60, 60)
        assert rollout.look(doc["id"]) is True  # the next step is 100: promoted
        finished = store.rollout(doc["id"])
        assert finished["status"] == "promoted" and finished["verdict"]["decision"] == "advance"
        assert store.promotion(request["id"])["status"] == "promoted"
        assert routes(store) == [(2, "champion", 100.0)]
        assert store.alias("digits", "champion") == 2
        assert store.version("digits", 1).status == "archived"
        looks = store.rollout_looks(doc["id"])
        assert [(look["step"], look["percent"]) for look in looks] == [
            (0, 10.0), (0, 10.0), (1, 50.0), (1, 50.0)
        ]  # fmt: skip
        assert looks[1]["counts"]["errors"] == [150, 0, 1350, 0]
        assert kinds(store) == ["canary_started", "canary_step", "canary_promoted"]
        # every stored verdict is what a replay of the stored counts gives
        config = JudgeConfig.from_json(finished["config"]["judge"])
        again = replay(config, [(lk["step"], counts_from_json(lk["counts"])) for lk in looks])
        assert [v.to_json() for v in again] == [lk["verdict"] for lk in looks]
    finally:
        rollout.stop()


def test_a_canary_with_more_errors_is_rolled_back_in_one_step(store: RegistryStore) -> None:
    fake = FakeCounts()
    rollout = canary(store, fake)
    request = approved(store)
    try:
        rollout.start(request, "loop")
        (doc,) = store.rollouts(model="digits")
        looks = 0
        while store.rollout(doc["id"])["status"] == "running":
            # 10 % canary, 5 % errors against the champion's 1 %
            fake.traffic(2, 1, 100, 900, canary_errors=5, champion_errors=9)
            rollout.look(doc["id"])
            looks += 1
            assert looks < 50
        finished = store.rollout(doc["id"])
        assert finished["status"] == "rolled_back"
        assert finished["verdict"]["decision"] == "rollback"
        assert finished["verdict"]["rollback_e"]["errors"] >= 3 / 0.05
        assert "errors" in finished["reason"]
        assert routes(store) == [(1, "champion", 100.0)]  # the canary row gone at once
        assert store.version("digits", 2).status == "rolled_back"
        assert store.promotion(request["id"])["status"] == "rolled_back"
        assert store.alias("digits", "champion") == 1
        event = store.loop_events("digits", kinds=["canary_rolled_back"])[0]["detail"]
        assert event["rollback_e"]["errors"] == finished["verdict"]["rollback_e"]["errors"]
        assert not rollout.running(request["id"])
    finally:
        rollout.stop()


def test_an_undecided_step_holds_once_past_its_timeout(store: RegistryStore) -> None:
    fake, clock = FakeCounts(), Clock()
    rollout = canary(store, fake, clock)
    try:
        rollout.start(approved(store), "loop")
        (doc,) = store.rollouts(model="digits")
        fake.traffic(2, 1, 10, 90)  # too few canary requests: hold
        assert rollout.look(doc["id"]) is False
        assert store.rollout(doc["id"])["held"] is False
        clock.offset = 601  # past step_timeout_s
        for _ in range(3):
            assert rollout.look(doc["id"]) is False
        held = store.rollout(doc["id"])
        assert held["held"] is True and held["status"] == "running" and held["step"] == 0
        assert routes(store) == [(1, "champion", 100.0), (2, "canary", 10.0)]  # kept
        assert kinds(store).count("canary_held") == 1  # one alert, not one per look
        held_metric = {f.name: f for f in LoopMetrics(store, ttl_s=0).collect()}
        assert [s.value for s in held_metric["servo_rollout_held"].samples] == [1.0]
        reason = store.loop_events("digits", kinds=["canary_held"])[0]["detail"]["reason"]
        assert "undecided after" in reason and "min_requests 100" in reason
    finally:
        rollout.stop()


def test_an_undecided_step_rolls_back_past_its_timeout_if_the_policy_says_so(
    store: RegistryStore,
) -> None:
    fake, clock = FakeCounts(), Clock()
    rollout = canary(store, fake, clock, on_timeout="rollback")
    request = approved(store)
    try:
        rollout.start(request, "loop")
        (doc,) = store.rollouts(model="digits")
        assert rollout.look(doc["id"]) is False  # no traffic at all
        clock.offset = 601
        assert rollout.look(doc["id"]) is True
        assert store.rollout(doc["id"])["status"] == "rolled_back"
        assert "step_timeout_s 600" in store.rollout(doc["id"])["reason"]
        assert routes(store) == [(1, "champion", 100.0)]
        assert store.promotion(request["id"])["status"] == "rolled_back"
    finally:
        rollout.stop()


def test_a_restart_resumes_from_the_stored_looks(store: RegistryStore) -> None:
    fake = FakeCounts()
    first = canary(store, fake)
    request = approved(store)
    first.start(request, "loop")
    (doc,) = store.rollouts(model="digits")
    # evidence against the canary, not yet enough to roll back
    fake.traffic(2, 1, 100, 900, canary_errors=3, champion_errors=9)
    first.look(doc["id"])
    before = store.rollout_looks(doc["id"])[-1]["verdict"]["rollback_e"]["errors"]
    assert 1 < before < 3 / 0.05
    first.stop()  # SIGTERM: the rollout stays running
    assert store.rollout(doc["id"])["status"] == "running"
    fake.traffic(2, 1, 1000, 9000, canary_errors=500)  # while nobody looked: not counted
    second = canary(store, fake)
    try:
        assert second.resume() == [doc["id"]]
        assert second.running(request["id"])
        rebuilt = second.verdicts()["digits"]
        assert rebuilt[0] == doc["id"] and rebuilt[1].looks == 1
        assert rebuilt[1].rollback_e["errors"] == pytest.approx(before)
        assert second.resume() == []  # one runner per rollout
        fake.traffic(2, 1, 100, 900, canary_errors=3, champion_errors=9)
        second.look(doc["id"])
        look = store.rollout_looks(doc["id"])[-1]
        assert look["counts"]["errors"] == [100, 3, 900, 9]  # from the new baseline
        assert look["verdict"]["looks"] == 2
        assert look["verdict"]["rollback_e"]["errors"] > before  # the evidence carried on
        assert "rollout_resumed" in kinds(store)
    finally:
        second.stop()


def test_a_stored_decision_its_process_did_not_carry_out_is_carried_out_on_resume(
    store: RegistryStore,
) -> None:
    first = canary(store, FakeCounts())
    request = approved(store)
    first.start(request, "loop")
    first.stop()
    (doc,) = store.rollouts(model="digits")
    # the look a process stored just before it was killed: a rollback it never made
    looked = {"errors": Counts(100, 30, 900, 9), "latency": Counts(100, 0, 900, 0)}
    verdict = Judge(JudgeConfig.from_json(doc["config"]["judge"])).observe(0, looked)
    assert verdict.decision == "rollback"
    store.record_look(doc["id"], step=0, percent=10.0, counts=counts_to_json(looked),
                      verdict=verdict.to_json())  # fmt: skip
    second = canary(store, FakeCounts())
    try:
        assert second.resume() == [doc["id"]]
        assert store.rollout(doc["id"])["status"] == "rolled_back"
        assert routes(store) == [(1, "champion", 100.0)]
        assert not second.running(request["id"])
    finally:
        second.stop()


def test_a_runner_thread_decides_by_itself(store: RegistryStore) -> None:
    fake = FakeCounts()
    text = FAST.format(on_timeout="hold").replace("look_every_s: 3600", "look_every_s: 0.05")
    rollout = CanaryRollout(store, fake, parse_config(text).for_model)
    request = approved(store)
    try:
        rollout.start(request, "loop")
        fake.traffic(2, 1, 1000, 1000, canary_errors=100, champion_errors=1)
        wait_for(lambda: store.promotion(request["id"])["status"] != "approved", 20, 0.05)
        assert store.promotion(request["id"])["status"] == "rolled_back"
        # the runner ends with its rollout
        wait_for(lambda: not rollout.running(request["id"]), 5, 0.02)
    finally:
        rollout.stop()


def test_an_operator_rollback_ends_the_runner(store: RegistryStore) -> None:
    fake = FakeCounts()
    rollout = canary(store, fake)
    request = approved(store)
    try:
        rollout.start(request, "loop")
        (doc,) = store.rollouts(model="digits")
        store.rollback_rollout(doc["id"], "ops:alice", "by hand", None)
        fake.traffic(2, 1, 500, 500)
        assert rollout.look(doc["id"]) is True
        assert len(store.rollout_looks(doc["id"])) == 0
    finally:
        rollout.stop()


def test_a_step_the_registry_refuses_fails_the_rollout(store: RegistryStore) -> None:
    fake = FakeCounts()
    rollout = canary(store, fake)
    request = approved(store)
    try:
        rollout.start(request, "loop")
        (doc,) = store.rollouts(model="digits")
        fake.traffic(2, 1, 150, 1350)
        assert rollout.look(doc["id"]) is False  # to 50 %
        with store.engine.begin() as connection:  # its folder went bad behind our back
            connection.execute(
                sa.update(ModelVersion).where(ModelVersion.version == 2).values(servable=False)
            )
        fake.traffic(2, 1, 150, 150)
        assert rollout.look(doc["id"]) is True  # the promotion is refused
        failed = store.rollout(doc["id"])
        assert failed["status"] == "failed" and "refused by the registry" in failed["reason"]
        assert routes(store) == [(1, "champion", 100.0)]
        assert store.promotion(request["id"])["status"] == "failed"
        assert "canary_failed" in kinds(store) and not rollout.running(request["id"])
    finally:
        rollout.stop()


def test_the_immediate_strategy_swaps_at_once(store: RegistryStore) -> None:
    config = parse_config("defaults: {rollout: {strategy: immediate}}")
    rollout = CanaryRollout(store, FakeCounts(), config.for_model)
    assert rollout.start(approved(store), "loop") == "promoted"
    assert routes(store) == [(2, "champion", 100.0)]
    assert store.rollouts(model="digits") == []


def test_a_refused_canary_fails_the_request_and_keeps_the_champion(store: RegistryStore) -> None:
    rollout = canary(store, FakeCounts())
    request = approved(store)
    store.register_version("digits", "file:///m/digits/3", {})
    hand_made = [(1, "champion", 100.0), (3, "canary", 5.0)]  # someone's own canary
    store.set_deployments("digits", hand_made, actor="ops")
    assert rollout.start(request, "loop") == "failed"
    doc = store.promotion(request["id"])
    assert doc["status"] == "failed" and "canary refused" in doc["status_reason"]
    assert "version 3 as its canary" in doc["status_reason"]
    assert routes(store) == hand_made
    assert not rollout.running(request["id"])
    # a request no longer approved is left as it is
    assert rollout.start(request, "loop") == "failed"


def test_a_process_that_may_not_run_it_leaves_it_to_the_lock_holder(
    store: RegistryStore,
) -> None:
    fake = FakeCounts()
    rollout = canary(store, fake, may_run=lambda model: False)
    request = approved(store)
    assert rollout.start(request, "alice") == "approved"
    assert store.rollouts(model="digits")[0]["status"] == "running"  # the canary is routed
    assert not rollout.running(request["id"]) and fake.reads == 0
    assert kinds(store) == ["canary_started"]
    other = canary(store, fake)
    try:
        assert other.resume() == [store.rollouts(model="digits")[0]["id"]]
        assert kinds(store) == ["canary_started", "rollout_resumed"]
    finally:
        other.stop()


def test_increments_refuse_counters_that_go_back() -> None:
    before = {1: {"errors": (10, 1)}, 2: {"errors": (5, 0)}}
    after = {1: {"errors": (30, 2)}, 2: {"errors": (9, 1)}}
    out = increments(before, after, champion=1, canary=2)
    assert out is not None and out["errors"].to_list() == [4, 1, 20, 1]
    assert out["incorrect"].to_list() == [0, 0, 0, 0]
    assert increments(after, before, champion=1, canary=2) is None


def test_counts_from_the_recorder_are_exact_at_the_threshold_edge() -> None:
    recorder = Recorder()
    for version, variant, code, seconds in (
        ("1", "champion", "200", 0.01), ("1", "champion", "200", 0.1),
        ("1", "champion", "500", 0.2), ("2", "canary", "200", 0.1000001),
        ("2", "canary", "503", 0.0), ("2", "canary", "400", 3.0),
        ("3", "shadow", "500", 9.0),
    ):  # fmt: skip
        recorder.request(("digits", version, variant, "rest"), code, seconds)
    recorder.request(("other", "1", "champion", "rest"), "500", 1.0)
    recorder.count(recorder.feedback, ("digits", "2", "correct"), 7)
    recorder.count(recorder.feedback, ("digits", "2", "incorrect"), 3)
    recorder.count(recorder.feedback, ("digits", "1", "incorrect"), 1)
    got = counts(recorder, "digits", [1, 2], 0.1)
    assert got == {
        1: {"errors": (3, 1), "latency": (3, 1), "incorrect": (1, 1)},
        2: {"errors": (3, 1), "latency": (3, 2), "incorrect": (10, 3)},
    }
    assert counts(recorder, "digits", [1], 1.0)[1]["latency"] == (3, 0)
    assert counts(recorder, "digits", [9], 0.1) == {
        9: {"errors": (0, 0), "latency": (0, 0), "incorrect": (0, 0)}
    }


@pytest.mark.slow
def test_a_failing_canary_s_errors_are_counted_against_it(model_root: Path, tmp_path: Path) -> None:
    """A routed request that the canary fails is a 5xx of the canary's version (the
    judge's errors), not of an unknown version."""
    root = tmp_path / "models"
    (root / "digits").mkdir(parents=True)
    os.symlink(model_root / "digits" / "1", root / "digits" / "1")
    write_model(root / "digits" / "8", failing_model(), "digits", version="8")
    routes = tmp_path / "routes.json"
    write_routes(routes, [{"name": "digits", "champion": dep(root, "1"),
                           "canary": dep(root, "8", 50)}])  # fmt: skip
    server = start_server(["--routes", str(routes)], tmp_path / "server.log",
                          wait_for=["digits"])  # fmt: skip
    try:
        codes = [httpx.post(f"{server.url}/v2/models/digits/infer", content=BODY).status_code
                 for _ in range(40)]  # fmt: skip
        assert set(codes) == {200, 500}
        failed = scraped(server, "servo_requests_total", model="digits", version="8",
                        variant="canary", code="500")  # fmt: skip
        assert failed == codes.count(500)
        assert scraped(server, "servo_requests_total", version="1", code="200") == codes.count(200)
        assert scraped(server, "servo_requests_total", version="", code="500") == 0
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.slow
def test_prometheus_counts_are_the_gateways_counts(model_root: Path, tmp_path: Path) -> None:
    """PromQL over a real Prometheus scraping a real gateway (champion digits 1, a canary
    that fails every request at 50 %) gives the counts the traffic made."""
    from monitors.sources import PrometheusSource
    from servo.canary import PrometheusCounts
    from tests.prometheus import binary, start_prometheus

    if binary() is None:
        pytest.skip("the Debian package prometheus is not installed")
    root = tmp_path / "models"
    (root / "digits").mkdir(parents=True)
    os.symlink(model_root / "digits" / "1", root / "digits" / "1")
    write_model(root / "digits" / "8", failing_model(), "digits", version="8")
    routes = tmp_path / "routes.json"
    write_routes(routes, [{"name": "digits", "champion": dep(root, "1"),
                           "canary": dep(root, "8", 50)}])  # fmt: skip
    server = start_server(["--routes", str(routes)], tmp_path / "server.log",
                          wait_for=["digits"])  # fmt: skip
    prometheus = start_prometheus(tmp_path / "prom", [f"127.0.0.1:{server.http_port}"])
    try:
        x, y = digits_holdout()
        answered: dict[str, tuple[int, int]] = {}  # id -> (predicted, truth)
        failed = 0
        for i in range(40):
            body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                "data": x[i].tolist()}]}  # fmt: skip
            reply = httpx.post(f"{server.url}/v2/models/digits/infer", json=body)
            if reply.status_code == 500:
                failed += 1
                continue
            assert reply.status_code == 200 and reply.json()["model_version"] == "1"
            doc = reply.json()
            answered[doc["id"]] = (int(doc["outputs"][0]["data"][0]), int(y[i]))
        labels = [{"id": rid, "label": truth} for rid, (_, truth) in answered.items()]
        reply = httpx.post(f"{server.url}/v2/models/digits/feedback", json=labels)
        assert reply.status_code == 200, reply.text
        wrong = sum(p != t for p, t in answered.values())
        n = len(answered)
        assert 0 < failed < 40
        expected = {
            1: {"errors": (n, 0), "latency": (n, 0), "incorrect": (n, wrong)},
            8: {"errors": (failed, failed), "latency": (failed, 0), "incorrect": (0, 0)},
        }
        source = PrometheusCounts(PrometheusSource(prometheus.url))
        # Prometheus scrapes every second: wait until it has every count (a hang guard)
        try:
            wait_for(lambda: source.cumulative("digits", [1, 8], 10.0) == expected, 30, 0.5)
        except AssertionError:  # show what Prometheus has
            assert source.cumulative("digits", [1, 8], 10.0) == expected
        slow = source.cumulative("digits", [1, 8], 0.0001)  # nearly all slower than 0.1 ms
        assert slow[1]["latency"][0] == n and 0 < slow[1]["latency"][1] <= n
    finally:
        prometheus.stop()
        assert server.stop() == 0, server.log()


def test_the_loop_metrics_show_the_canary(store: RegistryStore) -> None:
    fake = FakeCounts()
    rollout = canary(store, fake)
    metrics = LoopMetrics(store, ttl_s=0, verdicts=rollout.verdicts)
    try:
        rollout.start(approved(store), "loop")
        (doc,) = store.rollouts(model="digits")
        fake.traffic(2, 1, 10, 90, canary_errors=1)
        rollout.look(doc["id"])
        families = {f.name: f for f in metrics.collect()}
        samples = [(s.labels, s.value) for s in families["servo_rollout_canary_percent"].samples]
        assert samples == [({"model": "digits"}, 10.0)]
        assert [s.value for s in families["servo_rollout_held"].samples] == [0.0]
        e_values = {
            (s.labels["metric"], s.labels["test"]): s.value
            for s in families["servo_rollout_e_value"].samples
        }
        verdict = store.rollout_looks(doc["id"])[-1]["verdict"]
        assert e_values[("errors", "rollback")] == verdict["rollback_e"]["errors"] > 1
        assert e_values[("latency", "promotion")] == verdict["promote_e"]["latency"]
        assert len(e_values) == 6
    finally:
        rollout.stop()


# the policy's rollout section


def test_the_latency_edges_are_the_recorders_buckets() -> None:
    assert LATENCY_EDGES == LATENCY_BUCKETS


def test_the_rollout_defaults() -> None:
    rollout = Policy().rollout
    assert rollout.strategy == "canary" and rollout.steps == [10.0, 50.0, 100.0]
    assert (rollout.look_every_s, rollout.alpha, rollout.beta) == (5, 0.05, 0.05)
    assert rollout.delta == 0.25
    assert (rollout.min_requests, rollout.step_timeout_s, rollout.on_timeout) == (200, 3600, "hold")
    assert rollout.latency_threshold_s == 0.1
    assert rollout.metrics == ["errors", "latency", "incorrect"]
    assert rollout.negligible_rate == 0.001
    assert judge_config(rollout).negligible_rate == 0.001  # the judge gets it
    off = parse_config("defaults: {rollout: {negligible_rate: 0}}").for_model("digits").rollout
    assert judge_config(off).negligible_rate == 0 and judge_config(off).promotion_threshold == 20


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("steps: [10, 5, 100]", "rollout.steps: steps must be strictly increasing"),
        ("steps: [10, 50]", "rollout.steps: the last step must be 100"),
        ("steps: [0, 100]", r"rollout.steps: each step must be a percent in \(0, 100\]"),
        ("steps: [10, 100, 101]", r"rollout.steps: each step must be a percent in \(0, 100\]"),
        ("steps: [100]", "rollout.steps: needs a canary step below 100"),
        ("steps: []", "rollout.steps: needs at least one step"),
        ("latency_threshold_s: 0.2", r"rollout.latency_threshold_s: must be one of .* \(got 0.2\)"),
        ("metrics: [errors, errors]", "rollout.metrics: lists a metric twice"),
        ("metrics: [cost]", "rollout.metrics.0: must be one of"),
        ("alpha: 1", "rollout.alpha: must be < 1"),
        ("min_requests: 0", "rollout.min_requests: must be >= 1"),
        ("negligible_rate: 1", "rollout.negligible_rate: must be < 1"),
        ("negligible_rate: -0.01", "rollout.negligible_rate: must be >= 0"),
        ("on_timeout: pause", "rollout.on_timeout: must be one of 'hold' or 'rollback'"),
        ("strategy: blue_green", "rollout.strategy: must be one of 'canary' or 'immediate'"),
        ("look_every_s: 0", "rollout.look_every_s: must be > 0"),
    ],
)
def test_a_bad_rollout_section_is_refused_precisely(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=f"servo.yaml: models.digits.{message}"):
        parse_config(f"models:\n  digits:\n    rollout: {{{text}}}\n")
