"""Labels that stay true (issue 9, points 13-17): validated against the version that
answered, all or nothing per request, durable before "stored", joined through the log's
id index, on ids nobody can guess; and retraining skips what it cannot use."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from monitors.payload_log import (
    FEEDBACK,
    FEEDBACK_SCHEMA,
    PREDICTION_SCHEMA,
    PREDICTIONS,
    as_records,
    ids_path,
    partition_dir,
    read_window,
)
from registry.store import RegistryStore
from serving.errors import ServingError
from serving.feedback import Caller, FeedbackService
from serving.ids import RequestIds
from serving.labels import Label, LabelSpace
from serving.log_index import LogIndex
from serving.payload_log import PayloadLog, PayloadLogConfig
from serving.recorder import Recorder
from serving.repository import ModelRepository
from serving.router import Router
from servo.demo import digits_holdout
from servo.train import train
from tests.servers import RunningServer, start_server
from tests.test_routing import metric, wait_until


def predict(server: RunningServer, rows: np.ndarray, ident: str | None = None) -> dict[str, Any]:
    tensor = {"name": "input", "datatype": "FP32", "shape": list(rows.shape),
              "data": rows.ravel().tolist()}  # fmt: skip
    doc: dict[str, Any] = {"inputs": [tensor]}
    if ident is not None:
        doc["id"] = ident
    reply = httpx.post(f"{server.url}/v2/models/digits/infer", content=orjson.dumps(doc))
    assert reply.status_code == 200, reply.text
    answer: dict[str, Any] = reply.json()
    return answer


def feedback(server: RunningServer, body: object, model: str = "digits") -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/{model}/feedback", content=orjson.dumps(body))


def labelled_total(server: RunningServer) -> float:
    return metric(server, "servo_feedback_total", model="digits") + metric(
        server, "servo_feedback_unmatched_total", model="digits"
    )


@pytest.fixture(scope="module")
def named(model_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits v1 whose class_labels are names: "zero" is class 0, ..."""
    folder = tmp_path_factory.mktemp("named") / "digits" / "1"
    shutil.copytree(model_root / "digits" / "1", folder)
    card = json.loads((folder / "servo.json").read_text())
    card["class_labels"] = ["zero", "one", "two", "three", "four", "five", "six", "seven",
                            "eight", "nine"]  # fmt: skip
    (folder / "servo.json").write_text(json.dumps(card))
    return folder


@pytest.fixture(scope="module")
def logged(
    named: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningServer, Path]]:
    root = tmp_path_factory.mktemp("integrity")
    server = start_server(
        [named],
        root / "server.log",
        wait_for=["digits"],
        env={"SERVO_PAYLOAD_LOG_DIR": str(root / "log"), "SERVO_PAYLOAD_LOG_FLUSH_S": "0.1"},
    )
    yield server, root / "log"
    assert server.stop() == 0, server.log()


# 13: labels are validated


@pytest.mark.parametrize(
    ("label", "shown"),
    [(999, "999"), (10, "10"), (-1, "-1"), (-1.5, "-1.5"), (2.5, "2.5"), ("cat", "'cat'"),
     ("10", "'10'"), ("", "''"), (" 3", "' 3'")],
)  # fmt: skip
def test_a_label_that_is_not_a_class_is_refused(
    logged: tuple[RunningServer, Path], label: object, shown: str
) -> None:
    server, _ = logged
    x, _ = digits_holdout()
    ident = f"bad-{shown}"
    predict(server, x[:1], ident)
    before = labelled_total(server)
    reply = feedback(server, {"id": ident, "label": label})
    assert reply.status_code == 400
    assert reply.json()["error"] == (
        f"feedback[0] (id '{ident}'): label {shown} is not a class of model 'digits' version "
        "'1' (a label is a class index 0..9 or one of its class_labels ('zero', 'one', "
        "'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine'))"
    )
    assert labelled_total(server) == before
    # nothing of it was kept: a good label for the same id is still taken
    assert feedback(server, {"id": ident, "label": 3}).json()["accepted"] == 1


@pytest.mark.parametrize(
    "label",
    [True, None, [[1]], {"x": 1}, [1, [2]]],
    ids=["true", "null", "nested", "object", "mixed"],
)
def test_a_label_that_is_not_a_value_is_refused(
    logged: tuple[RunningServer, Path], label: object
) -> None:
    server, _ = logged
    reply = feedback(server, {"id": "never", "label": label})
    assert reply.status_code == 400
    assert reply.json()["error"].startswith("feedback[0]: a label must be a string or a number")


def test_indices_and_class_names_are_stored_as_the_version_predicts(
    logged: tuple[RunningServer, Path],
) -> None:
    server, root = logged
    x, _ = digits_holdout()
    predicted = [
        predict(server, x[i : i + 1], f"form-{i}")["outputs"][0]["data"][0] for i in range(4)
    ]
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    # the same class four ways: a name, an index, a float index, an index as text
    forms: list[object] = [
        names[predicted[0]],
        predicted[1],
        float(predicted[2]),
        str(predicted[3]),
    ]
    reply = feedback(server, [{"id": f"form-{i}", "label": v} for i, v in enumerate(forms)])
    assert reply.json() == {"accepted": 4, "correct": 4, "incorrect": 0, "unmatched": 0,
                            "duplicates": 0, "stored": True}  # fmt: skip
    # an unknown id is checked against the champion, and stored the same way
    assert feedback(server, {"id": "form-unknown", "label": "seven"}).json()["unmatched"] == 1

    def stored() -> dict[str, str]:
        rows = read_window(root, table=FEEDBACK).to_pylist()
        return {r["id"]: r["label"] for r in rows if r["id"].startswith("form-")}

    wait_until(lambda: len(stored()) == 5)
    assert stored() == {
        **{f"form-{i}": str(p) for i, p in enumerate(predicted)},
        "form-unknown": "7",
    }


def test_label_space_of_a_version() -> None:
    names = LabelSpace(3, ("one", "seven", "zero"))
    assert [names.canonical(v) for v in ("seven", 1, 1.0, "1", "+1")] == ["1"] * 5
    assert [names.canonical(v) for v in (3, -1, "3", "cat", 0.5, "1.0")] == [None] * 6
    by_name = LabelSpace(2, ("cat", "dog"), by_name=True)
    assert [by_name.canonical(v) for v in ("dog", 1, "1")] == ["dog"] * 3
    assert by_name.canonical("cow") is None
    unknown = LabelSpace(None)  # no class_labels, no class count: any index, no names
    assert (unknown.canonical(12345), unknown.canonical("x"), unknown.canonical(-2)) == (
        "12345",
        None,
        None,
    )


# 14: all or nothing


def test_a_refused_request_applies_none_of_its_labels(logged: tuple[RunningServer, Path]) -> None:
    server, root = logged
    x, y = digits_holdout()
    predict(server, x[:1], "whole-0")
    predict(server, x[1:2], "whole-1")
    predict(server, x[2:5], "whole-rows")
    before = labelled_total(server)
    for bad in ({"id": "whole-1", "label": "cat"}, {"id": "whole-rows", "label": 1}):
        body = [{"id": "whole-0", "label": int(y[0])}, {"id": "whole-unknown", "label": 1}, bad]
        reply = feedback(server, body)
        assert reply.status_code == 400, reply.text
        assert labelled_total(server) == before
    good = [{"id": "whole-0", "label": int(y[0])}, {"id": "whole-1", "label": int(y[1])},
            {"id": "whole-unknown", "label": 1}]  # fmt: skip
    result = feedback(server, good).json()
    assert (result["accepted"], result["duplicates"], result["unmatched"]) == (3, 0, 1)
    wait_until(
        lambda: {"whole-0", "whole-1"} <= set(read_window(root, table=FEEDBACK)["id"].to_pylist())
    )
    ids = read_window(root, table=FEEDBACK)["id"].to_pylist()
    assert ids.count("whole-0") == 1 and "whole-rows" not in ids


def test_many_labels_in_one_request(logged: tuple[RunningServer, Path]) -> None:
    server, _ = logged
    same = feedback(server, [{"id": "one-id", "label": i % 10} for i in range(10_000)]).json()
    assert (same["accepted"], same["duplicates"]) == (1, 9_999)
    distinct = feedback(server, [{"id": f"many-{i}", "label": i % 10} for i in range(10_000)])
    assert distinct.json()["unmatched"] == 10_000
    assert feedback(server, {"id": "many-9999", "label": 1}).json()["duplicates"] == 1


# 15: a late label reads only the file that holds its id


def _prediction(ident: str, minute: int) -> dict[str, Any]:
    rows = np.full((1, 64), minute, dtype=np.float32)
    return {"id": ident, "time": dt.datetime(2026, 11, 29, 12, minute, tzinfo=dt.UTC),
            "model": "digits", "version": "1", "variant": "champion",
            "inputs": [("input", "FP32", rows)],
            "outputs": [("label", "INT64", np.array([minute % 10]))]}  # fmt: skip


def test_a_lookup_opens_only_the_files_holding_its_ids(tmp_path: Path) -> None:
    log = PayloadLog(PayloadLogConfig(tmp_path, flush_s=60))
    for batch in range(6):
        for i in range(50):
            log.submit(PREDICTIONS, _prediction(f"b{batch}-{i}", batch))
        log.flush()
    log.close()
    parts = list(tmp_path.rglob("part-*.parquet"))
    assert len(parts) == 6 and all(ids_path(p).exists() for p in parts)
    # an older file, written before the id index existed (no index beside it)
    old = partition_dir(tmp_path, PREDICTIONS, "digits", "0", dt.date(2026, 11, 1))
    old.mkdir(parents=True)
    rows = [{**_prediction(f"old-{i}", 7), "version": "0"} for i in range(3)]
    for row in rows:
        row["inputs"], row["outputs"] = as_records(row["inputs"]), as_records(row["outputs"])
    pq.write_table(pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA), old / "part-1-1-0.parquet")
    index = LogIndex(tmp_path, PREDICTIONS)
    found = index.rows("digits", ["b3-17"], ["id", "time"])
    assert found["id"].to_pylist() == ["b3-17"]
    assert (index.indexes_read, index.files_read) == (6, 2)  # the old file's ids, once; one file
    assert index.has("digits", ["b5-0", "b0-49", "nope", "old-2"]) == {"b5-0", "b0-49", "old-2"}
    assert (index.indexes_read, index.files_read) == (6, 2 + 3)  # kept: only the files read
    assert index.has("digits", ["nope", "never"]) == set()
    assert index.files_read == 5  # no file holds them: none opened


# 16: durable before "stored"


def test_a_label_survives_kill_9_and_a_conflicting_one_is_refused(
    model_root: Path, tmp_path: Path
) -> None:
    env = {"SERVO_PAYLOAD_LOG_DIR": str(tmp_path / "log"),
           # labels reach Parquet only after a minute: before that, only the journal has them
           "SERVO_PAYLOAD_LOG_FLUSH_S": "60"}  # fmt: skip
    server = start_server([model_root / "digits" / "1"], tmp_path / "1.log", ["digits"], env)
    try:
        x, y = digits_holdout()
        ident = predict(server, x[:1])["id"]
        first = feedback(server, {"id": ident, "label": int(y[0])}).json()
        assert first["accepted"] == 1 and first["stored"] is True
        server.process.kill()  # SIGKILL: nothing gets to flush
        server.process.wait(timeout=20)
    finally:
        server.stop()
    assert read_window(tmp_path / "log", table=FEEDBACK).num_rows == 0  # only in the journal
    again = start_server([model_root / "digits" / "1"], tmp_path / "2.log", ["digits"], env)
    try:
        conflicting = feedback(again, {"id": ident, "label": (int(y[0]) + 1) % 10}).json()
        assert (conflicting["accepted"], conflicting["duplicates"]) == (0, 1)
        assert "feedback journal replayed: 1 label(s) recovered" in again.log()
    finally:
        assert again.stop() == 0, again.log()
    stored = read_window(tmp_path / "log", table=FEEDBACK).to_pylist()
    assert [(r["id"], r["label"]) for r in stored] == [(ident, str(int(y[0])))]


def test_a_journal_left_behind_is_replayed_once(tmp_path: Path) -> None:
    at = dt.datetime(2026, 11, 29, 12, tzinfo=dt.UTC)
    rows = [{"id": f"j{i}", "time": at.isoformat(), "model": "digits", "version": "1",
             "label": "3", "outcome": "correct"} for i in range(3)]  # fmt: skip
    journal = tmp_path / FEEDBACK / "_journal"
    journal.mkdir(parents=True)
    # j0 already reached the table; the last line is torn (the kill came mid-write)
    log = PayloadLog(PayloadLogConfig(tmp_path))
    log.store(FEEDBACK, [{**rows[0], "time": at}]).result()
    log.close()
    lines = b"".join(orjson.dumps(r) + b"\n" for r in rows) + b'{"id": "j3", "ti'
    (journal / "journal-999999999-1.jsonl").write_bytes(lines)
    log = PayloadLog(PayloadLogConfig(tmp_path))
    log.close()
    assert log.labels.recovered == 2
    assert sorted(read_window(tmp_path, table=FEEDBACK)["id"].to_pylist()) == ["j0", "j1", "j2"]
    assert list(journal.iterdir()) == []


def test_a_label_that_cannot_be_stored_is_answered_503_and_not_applied(
    model_root: Path, tmp_path: Path
) -> None:
    (tmp_path / "log").mkdir()
    blocker = tmp_path / "log" / FEEDBACK  # a file where the feedback folder should be
    blocker.write_text("in the way")
    env = {"SERVO_PAYLOAD_LOG_DIR": str(tmp_path / "log"), "SERVO_PAYLOAD_LOG_FLUSH_S": "0.1"}
    server = start_server([model_root / "digits" / "1"], tmp_path / "s.log", ["digits"], env)
    try:
        x, y = digits_holdout()
        ident = predict(server, x[:1])["id"]
        reply = feedback(server, {"id": ident, "label": int(y[0])})
        assert reply.status_code == 503
        assert reply.json()["error"].startswith("labels not stored (")
        assert reply.json()["error"].endswith("none was applied, send them again")
        assert labelled_total(server) == 0
        blocker.unlink()
        retry = feedback(server, {"id": ident, "label": int(y[0])}).json()
        assert (retry["accepted"], retry["duplicates"], retry["stored"]) == (1, 0, True)
    finally:
        assert server.stop() == 0, server.log()


# 17: ids nobody can guess; the place for the writer check


def test_server_ids_do_not_reveal_the_next_one(logged: tuple[RunningServer, Path]) -> None:
    server, _ = logged
    x, _ = digits_holdout()
    ids = [predict(server, x[:1])["id"] for _ in range(200)]
    assert len(set(ids)) == 200
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)  # 128 bits, nothing else
    values = [int(i, 16) for i in ids]
    for a, b in itertools.pairwise(values):
        assert abs(b - a) > 2**64  # not a counter
        assert 20 < bin(a ^ b).count("1") < 108  # about half the bits differ (mean 64, sd 5.7)
    prefix = max(len(_common_prefix(a, b)) for a, b in itertools.pairwise(ids))
    assert prefix < 8  # no shared structure (7 equal leading hex digits: p < 2e-6 a pair)
    for bit in range(128):  # every bit varies
        assert 50 < sum(v >> bit & 1 for v in values) < 150


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def test_request_ids_are_a_keyed_hash() -> None:
    a, b = RequestIds(b"k" * 32), RequestIds(b"k" * 32)
    assert [a.next() for _ in range(3)] == [b.next() for _ in range(3)]
    assert RequestIds(b"j" * 32).next() != RequestIds(b"k" * 32).next()
    assert RequestIds().next() != RequestIds().next()  # a key per process (per instance)


def test_every_label_request_passes_the_writer_check() -> None:
    seen: list[tuple[Caller, str]] = []

    class Forbidden(ServingError):
        pass

    def check(caller: Caller, model: str) -> None:
        seen.append((caller, model))
        if "labeller" not in caller.roles:
            raise Forbidden(f"{caller.identity} may not label {model}")

    repository = ModelRepository()
    try:
        service = FeedbackService(repository=repository, router=Router(), recorder=Recorder(),
                                  payload_log=None, check=check)  # fmt: skip
        with pytest.raises(Forbidden, match="ann may not label digits"):
            asyncio.run(service.submit("digits", [Label("a", [1])], Caller("ann")))
        assert not service.index.labelled("a")
        with pytest.raises(ServingError, match="model 'digits' not found"):  # checked first
            asyncio.run(
                service.submit("digits", [Label("a", [1])], Caller("bo", frozenset({"labeller"})))
            )
        assert [(c.identity, m) for c, m in seen] == [("ann", "digits"), ("bo", "digits")]
    finally:
        repository.close()


# 13: retraining skips and counts the rows it cannot use


def test_ingest_skips_and_counts_labels_an_older_gateway_let_through(tmp_path: Path) -> None:
    x, y = digits_holdout()
    log = PayloadLog(PayloadLogConfig(tmp_path / "log", flush_s=0.05))
    now = dt.datetime.now(dt.UTC)
    for i in range(12):
        log.submit(PREDICTIONS, {**_prediction(f"p{i}", 0), "time": now,
                                 "inputs": [("input", "FP32", x[i : i + 1])]})  # fmt: skip
    log.close()
    # labels as an older gateway stored them: no validation, written straight to the table
    labels = [str(int(v)) for v in y[:6]] + ["cat", "999", "-1.5", "true", '["1", ', '["1", "2"]']
    rows = [{"id": f"p{i}", "time": now, "model": "digits", "version": "1", "label": text,
             "outcome": "incorrect"} for i, text in enumerate(labels)]  # fmt: skip
    folder = partition_dir(tmp_path / "log", FEEDBACK, "digits", "1", now.date())
    folder.mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist(rows, schema=FEEDBACK_SCHEMA), folder / "part-0-0-0.parquet"
    )
    store = RegistryStore(f"sqlite:///{tmp_path / 'r.db'}")
    store.create_schema()
    try:
        # nothing held out for evaluation: every usable row goes to training
        params = {"payload_log_root": str(tmp_path / "log"), "max_iter": 30, "hidden": [16],
                  "production_holdout": 0.0}  # fmt: skip
        trained = train(store, work=tmp_path / "w", params=params)
        assert trained.run.steps["ingest"].status == "succeeded"
        steps = {s["step"]: s["metrics"] for s in store.run(trained.run.run_id)["steps"]}
    finally:
        store.close()
    production = steps["production"]  # the step that reads the log
    assert production["production_rows"] == 6
    assert production["production_skipped"] == 6
    assert production["production_skipped_not_a_class"] == 4  # cat, 999, -1.5, true
    assert production["production_skipped_malformed_label"] == 1
    assert production["production_skipped_rows_mismatch"] == 1  # 2 labels, 1 row
    assert steps["ingest"]["production_rows_used"] == 6
    with np.load(trained.run.output("ingest", "data.npz"), allow_pickle=False) as data:
        assert data["x"].shape == (1797 + 6, 64) and set(data["y"].tolist()) == set(range(10))
