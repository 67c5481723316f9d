"""Evidence: Wilson intervals, the paired live comparison (hand-checked counts, McNemar's
exact p-value by hand), latency percentiles, pairing from a payload log (written by the
real writer, and by a real gateway with a shadow), the latency column (older files
without it still read), the signature diff and the evidence document."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from monitors.payload_log import (
    FEEDBACK,
    PREDICTION_SCHEMA,
    PREDICTIONS,
    as_records,
    partition_dir,
    read_window,
)
from retrain.evidence import (
    build_evidence,
    latency_summary,
    live_from_payload_log,
    offline_from_comparison,
    paired_live,
    signature_diff,
    wilson,
)
from retrain.steps import compare
from serving.log_index import LogIndex
from serving.payload_log import PayloadLog, PayloadLogConfig
from servo.demo import digits_holdout
from tests.servers import RunningServer, start_server
from tests.test_routing import dep, wait_until, write_routes

T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


def test_wilson_by_hand() -> None:
    # p = 0.8, n = 10, z = 1.96: centre (0.8 + 0.19208) / 1.38416, half-width
    # 1.96 * sqrt(0.016 + 0.009604) / 1.38416
    low, high = wilson(8, 10)
    assert low == pytest.approx(0.49016, abs=1e-4) and high == pytest.approx(0.94334, abs=1e-4)
    assert wilson(0, 5)[0] == 0.0 and wilson(5, 5)[1] == 1.0
    with pytest.raises(ValueError, match="at least one observation"):
        wilson(0, 0)


def four_ways(both: int, only_candidate: int, only_champion: int, neither: int) -> Any:
    """Paired rows with these outcomes (label "1" is the truth of every row)."""
    champion = ["1"] * both + ["0"] * only_candidate + ["1"] * only_champion + ["2"] * neither
    candidate = ["1"] * both + ["1"] * only_candidate + ["0"] * only_champion + ["2"] * neither
    return champion, candidate, ["1"] * len(champion)


def test_paired_live_counts_and_mcnemar_by_hand() -> None:
    champion, candidate, truth = four_ways(12, 5, 1, 2)
    # five unlabelled pairs that disagree
    champion += ["3"] * 5
    candidate += ["4"] * 5
    truth = truth + [None] * 5
    latency = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    doc = paired_live(champion, candidate, truth, latency, [None, *latency[:50]], seed=3)
    assert doc["n_paired"] == 25 and doc["n_labelled"] == 20
    assert doc["agreement"] == pytest.approx(14 / 25)  # 12 right together, 2 wrong together
    assert doc["candidate_accuracy"] == pytest.approx(17 / 20)
    assert doc["champion_accuracy"] == pytest.approx(13 / 20)
    assert doc["difference"] == pytest.approx(0.2)
    assert (doc["only_candidate_correct"], doc["only_champion_correct"]) == (5, 1)
    # exact McNemar: 6 discordant pairs, 5 one way: 2 * P(X <= 1 | Bin(6, 1/2)) = 14/64
    assert doc["mcnemar_p_value"] == pytest.approx(14 / 64)
    low, high = doc["difference_ci95"]
    assert -1 <= low < 0.2 < high <= 1
    assert doc["candidate_accuracy_ci95"] == pytest.approx(list(wilson(17, 20)))
    assert doc["champion_accuracy_ci95"] == pytest.approx(list(wilson(13, 20)))
    assert doc["latency"]["champion"] == {"n": 100, "p50_ms": pytest.approx(50.5),
                                          "p99_ms": pytest.approx(99.01)}  # fmt: skip
    assert doc["latency"]["candidate"]["n"] == 50  # the unmeasured one is left out
    assert paired_live(champion, candidate, truth, [], [], seed=3) == {
        **doc,
        "latency": {"champion": latency_summary([]), "candidate": latency_summary([])},
    }  # seeded: the same interval again
    json.dumps(doc, allow_nan=False)


def test_paired_live_without_labels_and_bad_lengths() -> None:
    doc = paired_live(["1", "2"], ["1", "3"], [None, None], [0.001], [0.002])
    assert doc["agreement"] == 0.5 and doc["n_labelled"] == 0
    assert doc["difference"] is None and doc["mcnemar_p_value"] is None
    assert doc["candidate_accuracy_ci95"] is None
    empty = paired_live([], [], [], [], [])
    assert empty["n_paired"] == 0 and empty["agreement"] is None
    assert latency_summary([None, float("nan")]) == {"n": 0, "p50_ms": None, "p99_ms": None}
    with pytest.raises(ValueError, match="2 champion, 1 candidate, 2 truth"):
        paired_live(["1", "2"], ["1"], [None, None], [], [])


def test_offline_from_a_real_comparison() -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 300).astype(bool)
    doc = offline_from_comparison(compare(truth | (rng.random(300) < 0.5), truth, seed=1))
    assert doc["rows"] == 300 and doc["champion_accuracy"] == pytest.approx(truth.mean())
    correct = round(doc["candidate_accuracy"] * 300)
    assert doc["candidate_accuracy_ci95"] == pytest.approx(list(wilson(correct, 300)))
    with pytest.raises(ValueError, match="rows missing"):
        offline_from_comparison({"candidate_accuracy": 1.0, "champion_accuracy": 1.0})


# pairing from a payload log written by the real writer


def prediction(ident: str, version: str, variant: str, labels: list[int], at: dt.datetime,
               latency: float | None = 0.001) -> dict[str, Any]:  # fmt: skip
    rows = len(labels)
    record: dict[str, Any] = {
        "id": ident,
        "time": at,
        "model": "digits",
        "version": version,
        "variant": variant,
        "inputs": [("input", "FP32", np.zeros((rows, 4), np.float32))],
        "outputs": [
            ("probabilities", "FP32", np.full((rows, 3), 1 / 3, np.float32)),
            ("label", "INT64", np.asarray(labels, np.int64)),
        ],
    }
    if latency is not None:
        record["latency_s"] = latency
    return record


def label(ident: str, text: str, outcome: str = "correct") -> dict[str, Any]:
    return {"id": ident, "time": T0 + dt.timedelta(minutes=5), "model": "digits",
            "version": "1", "label": text, "outcome": outcome}  # fmt: skip


def write_log(root: Path, predictions: list[dict[str, Any]], labels: list[dict[str, Any]]) -> None:
    log = PayloadLog(PayloadLogConfig(root, flush_s=60))
    try:
        for record in predictions:
            assert log.submit(PREDICTIONS, record)
        log.flush()
        log.store(FEEDBACK, labels).result(timeout=30)
    finally:
        log.close()


def test_pairs_are_joined_by_id_and_what_cannot_pair_is_counted(tmp_path: Path) -> None:
    at = T0
    records = [
        prediction("a", "1", "champion", [1], at, 0.002),
        prediction("a", "2", "shadow", [1], at, 0.004),
        prediction("b", "1", "champion", [0], at, 0.002),
        prediction("b", "2", "shadow", [1], at, 0.004),
        prediction("c", "1", "champion", [2, 2], at),  # two rows, one label each
        prediction("c", "2", "shadow", [2, 1], at),
        prediction("d", "2", "shadow", [1], at),  # the champion's answer is not logged
        prediction("e", "1", "champion", [1], at),  # no shadow copy (dropped or timed out)
        prediction("f", "1", "champion", [1], at),
        prediction("f", "2", "shadow", [1, 1], at),  # rows differ
        prediction("g", "1", "champion", [1], at),
        prediction("g", "2", "shadow", [1], at),  # a label of the wrong row count
        prediction("h", "1", "champion", [0], at),
        prediction("h", "2", "shadow", [0], at, None),  # not labelled, no latency
        prediction("a", "1", "champion", [0], at + dt.timedelta(seconds=1)),  # a reused id
        prediction("old", "1", "champion", [1], at - dt.timedelta(hours=2)),
        prediction("old", "2", "shadow", [1], at - dt.timedelta(hours=2)),
        prediction("x", "3", "shadow", [1], at),  # another candidate
        prediction("y", "2", "canary", [1], at),  # not a shadow answer
    ]
    labels = [label("a", "1"), label("b", "1", "incorrect"), label("c", '["2", "1"]'),
              label("d", "1"), label("g", '["1", "1"]'), label("a", "0"),
              label("zzz", "1", "unmatched"), label("old", "1")]  # fmt: skip
    write_log(tmp_path, records, labels)
    since = at - dt.timedelta(minutes=1)
    doc = live_from_payload_log(tmp_path, "digits", "1", "2", since=since)
    # pairs a, b, c (2 rows), g, h; labelled rows: a, b, c, c
    assert (doc["n_paired"], doc["n_labelled"], doc["paired_requests"]) == (6, 4, 5)
    assert doc["labelled_requests"] == 3
    assert doc["skipped"] == {"no_champion_answer": 1, "rows_mismatch": 1,
                              "label_rows_mismatch": 1}  # fmt: skip
    assert (doc["champion_requests"], doc["candidate_requests"]) == (7, 7)
    # champion: a right, b wrong, c right/wrong; candidate: a, b, c, c all right
    assert doc["champion_accuracy"] == pytest.approx(2 / 4)
    assert doc["candidate_accuracy"] == pytest.approx(4 / 4)
    assert doc["agreement"] == pytest.approx(4 / 6)  # a, c's first row, g, h
    assert doc["latency"]["champion"]["n"] == 5 and doc["latency"]["candidate"]["n"] == 4
    assert doc["latency"]["candidate"]["p50_ms"] == pytest.approx(2.5)  # 4, 4, 1, 1 ms
    assert doc["since"] == since.isoformat()
    everything = live_from_payload_log(tmp_path, "digits", "1", "2")
    assert everything["paired_requests"] == 6  # "old" too
    assert live_from_payload_log(tmp_path, "digits", "1", "9")["n_paired"] == 0
    assert live_from_payload_log(tmp_path / "none", "digits", "1", "2")["n_paired"] == 0


def test_files_written_before_the_latency_column_still_read(tmp_path: Path) -> None:
    write_log(tmp_path, [prediction("new", "1", "champion", [1], T0, 0.0125)], [])
    old_schema = pa.schema([f for f in PREDICTION_SCHEMA if f.name != "latency_s"])
    folder = partition_dir(tmp_path, PREDICTIONS, "digits", "1", T0.date())
    old_rows = []
    for ident in ("old-1", "old-2"):
        row = prediction(ident, "1", "champion", [0], T0, None)
        row["inputs"], row["outputs"] = as_records(row["inputs"]), as_records(row["outputs"])
        old_rows.append(row)
    pq.write_table(pa.Table.from_pylist(old_rows, schema=old_schema), folder / "part-0-0-0.parquet")
    table = read_window(tmp_path, table=PREDICTIONS)
    assert table.schema == PREDICTION_SCHEMA
    latency = dict(zip(table["id"].to_pylist(), table["latency_s"].to_pylist(), strict=True))
    assert latency == {"new": 0.0125, "old-1": None, "old-2": None}
    some = read_window(tmp_path, table=PREDICTIONS, columns=["id", "latency_s"])
    assert some.column_names == ["id", "latency_s"] and some.num_rows == 3
    # the gateway's lookup by id reads old files too
    index = LogIndex(tmp_path, PREDICTIONS)
    assert index.has("digits", ["old-1", "new"]) == {"old-1", "new"}


# a real gateway with a shadow


@pytest.fixture(scope="module")
def shadowed(
    model_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningServer, Path, Path]]:
    root = tmp_path_factory.mktemp("evidence")
    (root / "digits").mkdir()
    for version in ("1", "2"):
        os.symlink(model_root / "digits" / version, root / "digits" / version)
    routes = root / "routes.json"
    write_routes(routes, [{"name": "digits", "champion": dep(root, "1"),
                           "shadows": [dep(root, "2")]}])  # fmt: skip
    log = root / "log"
    server = start_server(
        ["--routes", str(routes)],
        root / "server.log",
        wait_for=["digits"],
        env={"SERVO_PAYLOAD_LOG_DIR": str(log), "SERVO_PAYLOAD_LOG_FLUSH_S": "0.1"},
    )
    yield server, log, root
    assert server.stop() == 0, server.log()


def predict(folder: Path, rows: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    labels: np.ndarray = session.run(["label"], {"input": rows})[0]
    return labels


def test_live_comparison_from_a_real_gateway_with_a_shadow(
    shadowed: tuple[RunningServer, Path, Path],
) -> None:
    server, log, root = shadowed
    x, y = digits_holdout()
    # a drifted slice (noisy pixels) where the two versions disagree more often
    rng = np.random.default_rng(0)
    x = np.clip(x[:150] + rng.normal(0, 4, x[:150].shape), 0, 16).astype(np.float32)
    y = y[:150]
    started = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for i, row in enumerate(x):
            tensor = {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": row.tolist()}
            body = {"id": f"ev-{i}", "inputs": [tensor]}
            reply = client.post("/v2/models/digits/infer", content=orjson.dumps(body))
            assert reply.status_code == 200 and reply.json()["model_version"] == "1"
        # labels for the first 100 (the rest stay unlabelled)
        labels = [{"id": f"ev-{i}", "label": int(y[i])} for i in range(100)]
        reply = client.post("/v2/models/digits/feedback", content=orjson.dumps(labels))
        assert reply.status_code == 200, reply.text

    def shadow_rows() -> int:
        table = read_window(log, table=PREDICTIONS, model="digits", version="2")
        return sum(1 for i in table["id"].to_pylist() if i.startswith("ev-"))

    wait_until(lambda: shadow_rows() == 150, timeout=60)
    wait_until(lambda: read_window(log, table=FEEDBACK).num_rows >= 100, timeout=60)
    doc = live_from_payload_log(log, "digits", "1", "2", since=started)
    champion, candidate = predict(root / "digits" / "1", x), predict(root / "digits" / "2", x)
    assert (doc["n_paired"], doc["n_labelled"], doc["paired_requests"]) == (150, 100, 150)
    assert doc["skipped"] == {}
    assert doc["agreement"] == pytest.approx(float((champion == candidate).mean()))
    assert doc["champion_accuracy"] == pytest.approx(float((champion[:100] == y[:100]).mean()))
    assert doc["candidate_accuracy"] == pytest.approx(float((candidate[:100] == y[:100]).mean()))
    expected = compare(candidate[:100] == y[:100], champion[:100] == y[:100])
    assert doc["mcnemar_p_value"] == pytest.approx(expected["mcnemar_p_value"])
    assert doc["difference_ci95"] == pytest.approx(expected["difference_ci95"])
    for side in ("champion", "candidate"):  # both measured their own latency
        summary = doc["latency"][side]
        assert summary["n"] == 150 and 0 < summary["p50_ms"] <= summary["p99_ms"]
    table = read_window(log, table=PREDICTIONS, model="digits", start=started)
    assert all(v is not None and v > 0 for v in table["latency_s"].to_pylist())


# signature diff


def card(model_root: Path, version: str = "1") -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((model_root / "digits" / version / "servo.json").read_text())
    return doc


def test_signature_diff_of_real_cards(model_root: Path) -> None:
    champion = card(model_root)
    same = signature_diff(champion, card(model_root, "2"))
    assert same == {"compatible": True, "inputs": [], "outputs": [],
                    "class_labels": same["class_labels"]}  # fmt: skip
    assert not same["class_labels"]["changed"]

    def changed(**edits: Any) -> dict[str, Any]:
        other = json.loads(json.dumps(champion))
        other.update(edits)
        return signature_diff(champion, other)

    inputs, outputs = champion["inputs"], champion["outputs"]
    assert inputs[0]["shape"] == [-1, 64] and outputs[0]["name"] == "label"
    wider = changed(outputs=[*outputs, {"name": "logits", "datatype": "FP32", "shape": [-1, 10]}])
    assert wider["compatible"] and wider["outputs"][0]["change"] == "added"
    fewer = changed(outputs=outputs[:1])
    assert not fewer["compatible"] and fewer["outputs"][0]["change"] == "removed"
    retyped = changed(inputs=[{**inputs[0], "datatype": "FP64"}])
    assert not retyped["compatible"] and retyped["inputs"][0]["change"] == "datatype"
    fixed = changed(inputs=[{**inputs[0], "shape": [1, 64]}])  # no longer takes any batch
    assert not fixed["compatible"] and fixed["inputs"][0]["breaking"]
    extra = changed(inputs=[*inputs, {"name": "mask", "datatype": "FP32", "shape": [-1, 64]}])
    assert not extra["compatible"] and extra["inputs"][0]["change"] == "added"
    relabelled = changed(class_labels=[*(champion["class_labels"] or []), "10"])
    assert not relabelled["compatible"] and relabelled["class_labels"]["added"] == ["10"]
    narrow = {**champion, "inputs": [{**inputs[0], "shape": [1, 64]}]}
    assert signature_diff(narrow, champion)["compatible"]  # takes any batch now: fine
    with pytest.raises(ValueError, match="'inputs' must be a list"):
        signature_diff({"outputs": []}, champion)


def test_the_evidence_document_is_finite_json(model_root: Path) -> None:
    live = paired_live(["1", "1"], ["1", "0"], ["1", "1"], [0.001], [0.002])
    doc = build_evidence(
        trigger={"verdict": "alarm", "psi": float("inf"), "p": np.float64(0.01)},
        policy={"k": np.int64(3)},
        lineage={"run": 4, "cache_keys": ("a", "b")},
        offline={"accuracy": float("nan")},
        live=live,
        signature=signature_diff(card(model_root), card(model_root, "2")),
        insufficient=True,
    )
    assert doc["format"] == 1 and doc["insufficient_evidence"] is True
    assert doc["trigger"] == {"verdict": "alarm", "psi": None, "p": 0.01}
    assert doc["policy"] == {"k": 3} and doc["lineage"]["cache_keys"] == ["a", "b"]
    assert doc["offline"] == {"accuracy": None}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)
    assert json.loads(text) == doc and "NaN" not in text and "Infinity" not in text
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in doc["live"].values())
    with pytest.raises(TypeError, match=r"evidence document\.lineage\.at: datetime"):
        build_evidence(trigger={}, policy={}, lineage={"at": T0}, offline={}, live={},
                       signature={})  # fmt: skip
    with pytest.raises(TypeError, match="key 1 is not a string"):
        build_evidence(trigger={1: "x"}, policy={}, lineage={}, offline={}, live={},
                       signature={})  # fmt: skip
