"""Built-in steps: production rows from the payload log, and the champion comparison."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import numpy as np
import pytest

from monitors.payload_log import FEEDBACK, PREDICTIONS
from registry.store import RegistryStore
from retrain.labelled import labelled_rows
from retrain.pipeline import Pipeline, Runner, Step, StepFailed
from retrain.steps import compare, evaluate, ingest, split, train
from serving.payload_log import PayloadLog, PayloadLogConfig
from servo.demo import digits_holdout

T0 = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)


def exact_mcnemar(only_candidate: int, only_champion: int) -> float:
    """McNemar's exact test from its definition: twice the binomial(n, 1/2) tail of the
    smaller discordant count, capped at 1 (computed here by direct count, not scipy)."""
    n = only_candidate + only_champion
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_candidate, only_champion) + 1))
    return min(1.0, 2 * tail / 2**n)


def predict(model: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    labels: np.ndarray = session.run(["label"], {"input": x.astype(np.float32)})[0]
    return labels


def fill_log(root: Path) -> tuple[np.ndarray, np.ndarray]:
    x, y = digits_holdout()
    log = PayloadLog(PayloadLogConfig(root, flush_s=0.05))

    def prediction(
        ident: str, rows: np.ndarray, variant: str = "champion", minute: int = 0
    ) -> None:
        log.submit(PREDICTIONS, {
            "id": ident, "time": T0 + dt.timedelta(minutes=minute), "model": "digits",
            "version": "1", "variant": variant, "inputs": [("input", "FP32", rows)],
            "outputs": [("label", "INT64", np.zeros(len(rows), dtype=np.int64))],
        })  # fmt: skip

    def label(ident: str, text: str, outcome: str = "correct") -> None:
        log.submit(FEEDBACK, {"id": ident, "time": T0, "model": "digits", "version": "1",
                              "label": text, "outcome": outcome})  # fmt: skip

    for i in range(10):
        prediction(f"p{i}", x[i : i + 1], minute=i)
        if i % 2 == 0:
            label(f"p{i}", str(int(y[i])))  # only the even ones get a label
    prediction("shadow-copy", x[20:21], variant="shadow")
    label("shadow-copy", "1")
    prediction("rows", x[30:33])
    label("rows", json.dumps([str(int(v)) for v in y[30:33]]))
    label("ghost", "4", outcome="unmatched")
    log.close()
    return x, y


def test_labelled_production_rows(tmp_path: Path) -> None:
    x, y = fill_log(tmp_path / "log")
    rows, labels = labelled_rows(tmp_path / "log", "digits", "input")
    expected = [0, 2, 4, 6, 8, 30, 31, 32]
    assert rows.shape == (8, 64) and labels.dtype == np.int64
    order = np.argsort([np.where((x == r).all(axis=1))[0][0] for r in rows])
    np.testing.assert_array_equal(labels[order], y[expected])
    start, end = T0 + dt.timedelta(minutes=3), T0 + dt.timedelta(minutes=7)
    window, _ = labelled_rows(tmp_path / "log", "digits", "input", start=start, end=end)
    assert len(window) == 2  # p4 and p6


def test_retraining_data_includes_production_rows(tmp_path: Path) -> None:
    fill_log(tmp_path / "log")
    store = RegistryStore(f"sqlite:///{tmp_path / 'r.db'}")
    store.create_schema()
    runner = Runner(tmp_path / "store", store)
    params = {"dataset": "digits+payload_log", "root": str(tmp_path / "log"), "model": "digits"}
    step = Step("ingest", ingest, ("data.npz",), params=params)
    result = runner.run(Pipeline("p").add(step))
    with np.load(result.output("ingest", "data.npz"), allow_pickle=False) as data:
        assert data["x"].shape == (1797 + 8, 64)
    nothing = {"dataset": "payload_log", "root": str(tmp_path / "nothing"), "model": "digits"}
    empty = Step("ingest", ingest, ("data.npz",), params=nothing)
    with pytest.raises(StepFailed, match="no labelled rows"):
        runner.run(Pipeline("p").add(empty))
    store.close()


def test_comparison_statistics() -> None:
    rng = np.random.default_rng(1)
    champion = rng.random(1000) < 0.80
    better = champion | (rng.random(1000) < 0.5)  # fixes about half of its mistakes
    result = compare(better, champion)
    assert result["difference"] > 0.05
    assert result["difference_ci95"][0] > 0 and result["mcnemar_p_value"] < 1e-6
    only_candidate, only_champion = int((better & ~champion).sum()), 0
    assert (result["only_candidate_correct"], result["only_champion_correct"]) == (
        only_candidate,
        only_champion,
    )
    assert result["mcnemar_p_value"] == pytest.approx(exact_mcnemar(only_candidate, 0), rel=1e-9)
    assert result["difference"] == pytest.approx((better.sum() - champion.sum()) / 1000)
    # both sides wrong on different rows: a two-sided p-value, neither tiny nor 1
    other = rng.random(1000) < 0.80
    mixed = compare(other, champion)
    b, c = int((other & ~champion).sum()), int((~other & champion).sum())
    assert b and c and b != c
    assert mixed["mcnemar_p_value"] == pytest.approx(exact_mcnemar(b, c), rel=1e-9)
    assert mixed["mcnemar_p_value"] == pytest.approx(exact_mcnemar(c, b), rel=1e-9)
    same = compare(champion, champion)
    assert same["difference"] == 0 and same["mcnemar_p_value"] == 1.0
    assert same["difference_ci95"] == [0.0, 0.0]


def test_evaluate_compares_with_the_champion(tmp_path: Path) -> None:
    store = RegistryStore(f"sqlite:///{tmp_path / 'r.db'}")
    store.create_schema()
    runner = Runner(tmp_path / "store", store)

    def pipeline(hidden: int, iters: int, champion: Path | None) -> Pipeline:
        inputs = {"model": "train.model.onnx", "holdout": "split.holdout.npz",
                  "framework": "train.framework.npz"}  # fmt: skip
        if champion is not None:
            inputs["champion"] = f"file:{champion}"
        return (
            Pipeline("p")
            .add(Step("ingest", ingest, ("data.npz",), params={"dataset": "digits"}))
            .add(Step("split", split, ("train.npz", "holdout.npz"), {"data": "ingest.data.npz"}))
            .add(Step("train", train, ("model.onnx", "framework.npz", "profile.json"),
                      {"train": "split.train.npz", "holdout": "split.holdout.npz"},
                      {"hidden": [hidden], "max_iter": iters}))
            .add(Step("evaluate", evaluate, ("evaluation.json",), inputs))
        )  # fmt: skip

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the weak model does not converge, on purpose
        weak = runner.run(pipeline(2, 5, None)).output("train", "model.onnx")
    strong = runner.run(pipeline(64, 300, weak))
    comparison = json.loads(strong.output("evaluate", "evaluation.json").read_text())["comparison"]
    assert comparison["candidate_accuracy"] > comparison["champion_accuracy"]
    assert comparison["difference_ci95"][0] > 0 and comparison["mcnemar_p_value"] < 0.01
    # the same numbers computed here from the two models on the holdout rows
    with np.load(strong.output("split", "holdout.npz")) as holdout:
        x, y = holdout["x"], holdout["y"]
    candidate = predict(strong.output("train", "model.onnx"), x) == y
    old = predict(weak, x) == y
    b, c = int((candidate & ~old).sum()), int((~candidate & old).sum())
    assert comparison["candidate_accuracy"] == candidate.mean()
    assert comparison["champion_accuracy"] == old.mean()
    assert (comparison["only_candidate_correct"], comparison["only_champion_correct"]) == (b, c)
    assert comparison["mcnemar_p_value"] == pytest.approx(exact_mcnemar(b, c), rel=1e-9)
    store.close()


def test_evaluation_on_the_latest_production_window(tmp_path: Path) -> None:
    """The digits pipeline with a payload log: retrains on digits + the older labelled rows
    of the window, and evaluates on its newest ones (held out) as a second metric set; a
    new label in the log is seen by the next run (reading the log is never a cache hit)."""
    from retrain.digits import digits_pipeline

    x, y = fill_log(tmp_path / "log")
    store = RegistryStore(f"sqlite:///{tmp_path / 'r.db'}")
    store.create_schema()
    runner = Runner(tmp_path / "store", store)
    params = {"payload_log_root": str(tmp_path / "log"), "production_window_s": 3600,
              "production_end": (T0 + dt.timedelta(minutes=30)).isoformat()}  # fmt: skip
    first = runner.run(digits_pipeline(params))
    doc = json.loads(first.output("evaluate", "evaluation.json").read_text())
    live = doc["production"]
    # the window's 8 labelled rows, in time order: p0, the 3 rows of "rows" (both minute
    # 0), p2, p4, p6, p8; the newest 30% (3 rows, rounded up) are held out: p4, p6, p8
    assert live["rows"] == 3 and live["window_rows"] == 8
    assert live["start"].startswith("2026-11-29T11:30")
    assert set(live) >= {"macro_f1", "log_loss", "per_class_recall"}
    held_out = [4, 6, 8]
    model = first.output("train", "model.onnx")
    correct = int((predict(model, x[held_out]) == y[held_out]).sum())
    assert live["accuracy"] == correct / 3
    recall = live["per_class_recall"]
    for cls in map(int, set(y[held_out])):
        rows = [i for i in held_out if y[i] == cls]
        assert recall[str(cls)] == pytest.approx((predict(model, x[rows]) == cls).mean()), cls
    assert doc["holdout_rows"] > 400 and doc["accuracy"] > 0.9  # the holdout set is still there
    with np.load(first.output("ingest", "data.npz"), allow_pickle=False) as data:
        assert data["x"].shape == (1797 + 5, 64)  # p0, rows (3), p2
        assert sorted(set(data["ids"].tolist()) - {""}) == ["p0", "p2", "rows"]
    # one more labelled prediction lands in the log: the production step sees it
    log = PayloadLog(PayloadLogConfig(tmp_path / "log", flush_s=0.05))
    log.submit(PREDICTIONS, {
        "id": "late", "time": T0 + dt.timedelta(minutes=20), "model": "digits", "version": "1",
        "variant": "champion", "inputs": [("input", "FP32", x[40:41])],
        "outputs": [("label", "INT64", np.zeros(1, dtype=np.int64))],
    })  # fmt: skip
    log.submit(FEEDBACK, {"id": "late", "time": T0, "model": "digits", "version": "1",
                          "label": str(int(y[40])), "outcome": "correct"})  # fmt: skip
    log.close()
    second = runner.run(digits_pipeline(params))
    assert second.steps["production"].status == "succeeded"
    # 9 rows: late, p8, p6 held out; p4 is now old enough to train on
    assert second.steps["ingest"].status == "succeeded"
    later = json.loads(second.output("evaluate", "evaluation.json").read_text())["production"]
    assert later["rows"] == 3 and later["window_rows"] == 9
    # the same log again: the same split, so every step after the production read is cached
    third = runner.run(digits_pipeline(params))
    assert third.steps["production"].status == "succeeded"
    assert {third.steps[s].status for s in ("ingest", "split", "train", "evaluate")} == {"cached"}
    store.close()
