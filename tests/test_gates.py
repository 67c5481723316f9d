"""Promotion gates on evidence built by retrain.evidence from seeded paired outcomes:
non-inferiority (live and offline), minimum gain, latency budget, signature, the
verdict, the reason (gate and numbers) and what happens to the request."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from retrain.evidence import build_evidence, offline_from_comparison, paired_live, wilson
from retrain.gates import GateResult, evaluate, outcome, reason, verdict
from retrain.policy import Approval, Gates, Policy, to_json
from retrain.steps import compare

COMPATIBLE = {"compatible": True, "inputs": [], "outputs": [],
              "class_labels": {"changed": False}}  # fmt: skip


def live_pairs(
    n: int, champion_acc: float, candidate_acc: float, seed: int, latency_ratio: float = 1.0
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 10, n)
    champion = np.where(rng.random(n) < champion_acc, truth, (truth + 1) % 10)
    candidate = np.where(rng.random(n) < candidate_acc, truth, (truth + 2) % 10)
    latency = rng.uniform(0.001, 0.003, n)
    return paired_live(
        [str(v) for v in champion], [str(v) for v in candidate], [str(v) for v in truth],
        latency.tolist(), (latency * latency_ratio).tolist(), seed=seed,
    )  # fmt: skip


def offline_rows(n: int, champion_acc: float, candidate_acc: float, seed: int) -> dict[str, Any]:
    """Outcomes of two models that mostly agree: rows are hard or easy alike for both."""
    hardness = np.random.default_rng(seed).random(n)
    return offline_from_comparison(
        compare(hardness < candidate_acc, hardness < champion_acc, seed=seed)
    )


def evidence(
    live: dict[str, Any],
    offline: dict[str, Any] | None,
    signature: dict[str, Any] | None = None,
    insufficient: bool = False,
) -> dict[str, Any]:
    return build_evidence(
        trigger={"verdict": "alarm"}, policy=to_json(Policy()), lineage={"run": 1},
        offline=offline or {}, live=live, signature=signature or COMPATIBLE,
        insufficient=insufficient,
    )  # fmt: skip


def by_name(results: list[GateResult]) -> dict[str, GateResult]:
    return {r.name: r for r in results}


def test_a_better_candidate_passes_every_gate() -> None:
    doc = evidence(live_pairs(600, 0.80, 0.93, 1), offline_rows(800, 0.85, 0.95, 2))
    results = evaluate(doc, Gates(min_gain=0.05))
    assert [r.name for r in results] == ["signature", "live_non_inferiority", "live_min_gain",
                                         "offline_non_inferiority", "latency"]  # fmt: skip
    assert verdict(results) == "pass", reason(results)
    assert reason(results).startswith("gates passed: signature: compatible; ")
    assert outcome(doc, results, Approval()) == "pending"
    assert outcome(doc, results, Approval(auto=True)) == "approved"
    for result in results:
        assert isinstance(result.to_json()["detail"]["summary"], str)


def test_a_worse_candidate_is_rejected_with_the_gate_and_its_numbers() -> None:
    live = live_pairs(600, 0.90, 0.80, 3)
    doc = evidence(live, offline_rows(800, 0.90, 0.90, 4))
    results = evaluate(doc, Gates())
    assert verdict(results) == "fail"
    gate = by_name(results)["live_non_inferiority"]
    assert not gate.passed and gate.detail["threshold"] == -0.02
    assert gate.detail["value"] == pytest.approx(live["difference_ci95"][0])
    text = reason(results)
    assert text.startswith("gate failed: live_non_inferiority: ci_low ")
    assert f"{live['difference_ci95'][0]:.4f} < -0.0200" in text
    assert f"candidate {live['candidate_accuracy']:.4f}" in text and "on 600 labelled" in text
    assert outcome(doc, results, Approval(auto=True)) == "rejected"


def test_the_interval_not_the_estimate_must_clear_the_margin() -> None:
    # equal models, few labels: the estimate is near 0 but the interval is wide
    live = live_pairs(60, 0.85, 0.85, 5)
    offline = offline_rows(2000, 0.9, 0.9, 6)
    strict = by_name(evaluate(evidence(live, offline), Gates()))["live_non_inferiority"]
    assert live["difference_ci95"][0] < -0.02 and not strict.passed
    lenient = Gates(statistic="estimate", live_margin=0.1)
    loose = by_name(evaluate(evidence(live, offline), lenient))["live_non_inferiority"]
    assert loose.passed and loose.detail["value"] == pytest.approx(live["difference"])


def test_min_gain_needs_a_real_gain() -> None:
    doc = evidence(live_pairs(600, 0.90, 0.91, 7), offline_rows(800, 0.9, 0.9, 8))
    results = by_name(evaluate(doc, Gates(min_gain=0.05, statistic="estimate")))
    assert not results["live_min_gain"].passed
    assert results["live_min_gain"].detail["threshold"] == 0.05
    assert "live_min_gain" not in by_name(evaluate(doc, Gates()))


def test_offline_gate_fails_on_a_worse_or_a_missing_comparison() -> None:
    live = live_pairs(600, 0.8, 0.95, 9)
    worse = by_name(evaluate(evidence(live, offline_rows(1000, 0.95, 0.85, 10)), Gates()))
    assert not worse["offline_non_inferiority"].passed
    assert "on 1000 held-out rows" in worse["offline_non_inferiority"].detail["summary"]
    missing = evaluate(evidence(live, None), Gates())
    assert reason(missing) == (
        "gate failed: offline_non_inferiority: no paired comparison (0 held-out rows)"
    )


def test_no_labelled_pairs_never_pass() -> None:
    live = paired_live(["1"] * 50, ["1"] * 50, [None] * 50, [0.001] * 50, [0.001] * 50)
    doc = evidence(live, offline_rows(800, 0.9, 0.95, 11), insufficient=True)
    results = by_name(evaluate(doc, Gates(statistic="estimate", live_margin=1.0)))
    assert not results["live_non_inferiority"].passed
    assert "no paired comparison (0 labelled" in results["live_non_inferiority"].detail["summary"]


def test_insufficient_evidence_that_passes_waits_for_a_person() -> None:
    doc = evidence(live_pairs(600, 0.8, 0.95, 12), offline_rows(800, 0.8, 0.95, 13),
                   insufficient=True)  # fmt: skip
    results = evaluate(doc, Gates())
    assert verdict(results) == "pass"
    assert outcome(doc, results, Approval(auto=True)) == "pending"


def test_latency_budget() -> None:
    offline = offline_rows(800, 0.8, 0.95, 14)
    slow = evidence(live_pairs(600, 0.8, 0.95, 15, latency_ratio=3.0), offline)
    gate = by_name(evaluate(slow, Gates()))["latency"]
    assert not gate.passed and gate.detail["ratio"] == pytest.approx(3.0, rel=0.05)
    assert (
        gate.detail["summary"].startswith("candidate p99 ")
        and "> 2 x champion p99" in (gate.detail["summary"])
    )
    assert by_name(evaluate(slow, Gates(latency_p99_ratio=4.0)))["latency"].passed
    assert by_name(evaluate(slow, Gates(latency_p99_ratio=None)))["latency"].passed
    unmeasured = live_pairs(600, 0.8, 0.95, 16)
    unmeasured["latency"]["candidate"] = {"n": 0, "p50_ms": None, "p99_ms": None}
    gate = by_name(evaluate(evidence(unmeasured, offline), Gates()))["latency"]
    assert not gate.passed and "not measured" in gate.detail["summary"]


def test_signature_gate() -> None:
    live, offline = live_pairs(600, 0.8, 0.95, 17), offline_rows(800, 0.8, 0.95, 18)
    broken = {
        "compatible": False,
        "inputs": [{"name": "input", "change": "datatype", "breaking": True}],
        "outputs": [{"name": "logits", "change": "added", "breaking": False}],
        "class_labels": {"changed": True},
    }
    results = evaluate(evidence(live, offline, broken), Gates())
    assert reason(results) == (
        "gate failed: signature: incompatible: inputs input datatype; class labels changed"
    )
    assert verdict(evaluate(evidence(live, offline, broken), Gates(signature="any"))) == "pass"
    no_diff = evidence(live, offline)
    no_diff["signature"] = {}
    assert not by_name(evaluate(no_diff, Gates()))["signature"].passed


def test_the_offline_gate_reads_an_evaluation_document() -> None:
    """The evaluate step's evaluation.json form: the reference holdout's comparison, and
    the held-out production rows' (judged first: the traffic the candidate is for)."""
    live = live_pairs(600, 0.8, 0.95, 19)
    holdout = compare(*(np.random.default_rng(20).random((2, 450)) < 0.95), seed=0)
    production = compare(*(np.random.default_rng(21).random((2, 300)) < [[0.9], [0.6]]))
    evaluation = {"accuracy": 0.95, "holdout_rows": 450, "comparison": holdout,
                  "production": {"rows": 300, "comparison": production}}  # fmt: skip
    doc = evidence(live, evaluation)
    for part in (doc["offline"]["comparison"], doc["offline"]["production"]["comparison"]):
        assert part["candidate_accuracy_ci95"] == pytest.approx(
            list(wilson(round(part["candidate_accuracy"] * part["rows"]), part["rows"]))
        )
    gate = by_name(evaluate(doc, Gates()))["offline_non_inferiority"]
    assert gate.detail["rows"] == "held-out production" and gate.passed
    assert "on 300 held-out production rows" in gate.detail["summary"]
    worse = compare(*(np.random.default_rng(22).random((2, 300)) < [[0.6], [0.9]]))
    evaluation["production"] = {"rows": 300, "comparison": worse}
    gate = by_name(evaluate(evidence(live, evaluation), Gates()))["offline_non_inferiority"]
    assert not gate.passed and gate.detail["difference"] == pytest.approx(worse["difference"])
    evaluation["production"] = {"rows": 0}  # no labelled production rows yet
    gate = by_name(evaluate(evidence(live, evaluation), Gates()))["offline_non_inferiority"]
    assert gate.detail["rows"] == "reference holdout"
    assert gate.detail["n"] == 450
