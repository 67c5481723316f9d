"""Feedback joined to predictions by id, against a real server with a payload log."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from monitors.payload_log import FEEDBACK, PREDICTIONS, read_window, tensor_array
from servo.demo import digits_holdout
from tests.servers import RunningServer, start_server
from tests.test_routing import metric, wait_until


@pytest.fixture(scope="module")
def logged(
    model_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningServer, Path]]:
    root = tmp_path_factory.mktemp("payload")
    server = start_server(
        [model_root / "digits" / "1"],
        root / "server.log",
        wait_for=["digits"],
        env={"SERVO_PAYLOAD_LOG_DIR": str(root / "log"), "SERVO_PAYLOAD_LOG_FLUSH_S": "0.1",
             "SERVO_FEEDBACK_INDEX_SIZE": "5"},
    )  # fmt: skip
    yield server, root / "log"
    assert server.stop() == 0, server.log()


def predict(server: RunningServer, rows: np.ndarray, ident: str) -> list[int]:
    doc = {"id": ident, "inputs": [{"name": "input", "datatype": "FP32", "shape": list(rows.shape),
                                    "data": rows.ravel().tolist()}]}  # fmt: skip
    reply = httpx.post(f"{server.url}/v2/models/digits/infer", content=orjson.dumps(doc))
    assert reply.status_code == 200
    labels: list[int] = reply.json()["outputs"][0]["data"]
    return labels


def feedback(server: RunningServer, body: object) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/digits/feedback", content=orjson.dumps(body))


def test_labels_join_predictions_in_memory_and_from_the_log(
    logged: tuple[RunningServer, Path],
) -> None:
    server, root = logged
    x_test, y_test = digits_holdout()
    predicted = [predict(server, x_test[i : i + 1], f"fb-{i}")[0] for i in range(40)]
    # only the last 5 ids are still in memory: the other 35 are joined from the payload log
    wait_until(lambda: read_window(root, table=PREDICTIONS).num_rows >= 40)
    body = [{"id": f"fb-{i}", "label": int(y_test[i])} for i in range(40)]
    reply = feedback(server, body)
    assert reply.status_code == 200, reply.text
    result = reply.json()
    correct = sum(p == y for p, y in zip(predicted, y_test[:40], strict=True))
    assert result == {"accepted": 40, "correct": correct, "incorrect": 40 - correct,
                      "unmatched": 0, "duplicates": 0, "stored": True}  # fmt: skip
    assert (
        metric(server, "servo_feedback_total", model="digits", version="1", outcome="correct")
        == correct
    )
    # idempotent: the same labels again change nothing
    again = feedback(server, body).json()
    assert again["duplicates"] == 40 and again["accepted"] == 0
    assert metric(server, "servo_feedback_total", model="digits", version="1") == 40
    wait_until(lambda: read_window(root, table=FEEDBACK).num_rows >= 40)
    stored = read_window(root, table=FEEDBACK).to_pylist()
    assert sorted(r["id"] for r in stored) == sorted(f"fb-{i}" for i in range(40))
    assert {r["label"] for r in stored if r["id"] == "fb-0"} == {str(y_test[0])}
    # the logged prediction holds the request's inputs and the answer
    row = next(r for r in read_window(root, table=PREDICTIONS).to_pylist() if r["id"] == "fb-3")
    np.testing.assert_array_equal(tensor_array(row["inputs"][0]), x_test[3:4])
    assert tensor_array(row["outputs"][0]).tolist() == [predicted[3]]


def test_unknown_ids_are_stored_and_counted(logged: tuple[RunningServer, Path]) -> None:
    server, root = logged
    reply = feedback(server, {"id": "never-seen", "label": "7"})
    assert reply.json()["unmatched"] == 1
    assert metric(server, "servo_feedback_unmatched_total", model="digits") >= 1
    wait_until(
        lambda: any(r["id"] == "never-seen" for r in read_window(root, table=FEEDBACK).to_pylist())
    )
    row = next(r for r in read_window(root, table=FEEDBACK).to_pylist() if r["id"] == "never-seen")
    assert (row["version"], row["outcome"], row["label"]) == (None, "unmatched", "7")


def test_multi_row_predictions_take_one_label_per_row(logged: tuple[RunningServer, Path]) -> None:
    server, _ = logged
    x_test, y_test = digits_holdout()
    predicted = predict(server, x_test[100:103], "rows-3")
    bad = feedback(server, {"id": "rows-3", "label": 1})
    assert bad.status_code == 400
    assert bad.json()["error"] == "id 'rows-3': the prediction has 3 rows; send one label per row"
    good = feedback(server, {"id": "rows-3", "label": [int(v) for v in y_test[100:103]]})
    hits = sum(p == y for p, y in zip(predicted, y_test[100:103], strict=True))
    assert good.json()["correct"] == hits and good.json()["incorrect"] == 3 - hits


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{", 400, "malformed JSON"),
        (b"[]", 400, 'feedback needs at least one {"id": ..., "label": ...}'),
        (b'{"id": 5, "label": 1}', 400, "feedback[0]: 'id' must be a non-empty string"),
        (b'{"id": "a"}', 400, "feedback[0]: 'label' is missing"),
        (b'[{"id": "a", "label": 1}, {"id": "b", "label": {"x": 1}}]', 400,
         "feedback[1]: a label must be a string or a number"),
        (b'{"id": "a", "label": true}', 400, "feedback[0]: a label must be a string or a number"),
        (b'{"id": "a", "label": 1, "extra": 2}', 400, "feedback[0]: unknown field(s) extra"),
    ],
)  # fmt: skip
def test_bad_feedback_bodies(
    logged: tuple[RunningServer, Path], body: bytes, status: int, message: str
) -> None:
    server, _ = logged
    reply = httpx.post(f"{server.url}/v2/models/digits/feedback", content=body)
    assert reply.status_code == status
    assert reply.json()["error"].startswith(message)
    assert predict(server, digits_holdout()[0][:1], "still-serving")


def test_feedback_for_an_unknown_model(logged: tuple[RunningServer, Path]) -> None:
    server, _ = logged
    reply = httpx.post(f"{server.url}/v2/models/nope/feedback", content=b'{"id": "a", "label": 1}')
    assert (reply.status_code, reply.json()) == (404, {"error": "model 'nope' not found"})


def test_an_unwritable_payload_log_never_stops_serving(model_root: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the payload log folder should be")
    server = start_server(
        [model_root / "digits" / "1"],
        tmp_path / "server.log",
        wait_for=["digits"],
        env={"SERVO_PAYLOAD_LOG_DIR": str(blocker / "log"), "SERVO_PAYLOAD_LOG_FLUSH_S": "0.05",
             "SERVO_PAYLOAD_LOG_CAPACITY": "20"},
    )  # fmt: skip
    try:
        x_test, _ = digits_holdout()
        for i in range(100):
            assert predict(server, x_test[:1], f"u-{i}") == predict(server, x_test[:1], f"v-{i}")
        wait_until(lambda: metric(server, "servo_payload_log_write_errors_total") > 0)
        dropped = metric(server, "servo_payload_log_dropped_total")
        assert dropped > 0  # bounded: what cannot be kept is counted, never blocking
        assert "payload log write failed" in server.log()
    finally:
        assert server.stop() == 0
