"""The retrain dataset: reference digits plus the labelled payload-log rows of a recent
window; the newest of them held out for evaluation (never trained on), the production
share of the training rows capped (newest kept), every count in the step metrics."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import numpy as np
import pytest

from monitors.payload_log import FEEDBACK, PREDICTIONS
from registry.store import RegistryStore
from retrain.digits import digits_pipeline
from retrain.labelled import Labelled, production_cap, split_newest
from serving.payload_log import PayloadLog, PayloadLogConfig
from servo.demo import digits_holdout
from servo.train import train

END = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
WINDOW_S = 86400.0


def write_log(root: Path) -> dict[str, dict[str, object]]:
    """90 requests, 10 of them older than the window; every 10th holds 3 rows, every 7th
    gets no label, request 5 (old) and 50 a label outside the classes. Inputs are digits
    shifted off the integer grid, each request's own, so no reference row equals one.
    Returns the labelled, usable requests in the window: id -> {time, rows, x}."""
    x, y = digits_holdout()
    log = PayloadLog(PayloadLogConfig(root, flush_s=0.05))
    usable: dict[str, dict[str, object]] = {}
    # written newest first, over two log sessions: the split must not follow file order
    order = list(range(89, -1, -1))
    for half in (order[:45], order[45:]):
        for i in half:
            ident = f"req-{i:03d}"
            old = i < 10
            at = END - dt.timedelta(days=2 if old else 0, minutes=90 - i)
            count = 3 if i % 10 == 0 else 1
            rows = x[i * 3 : i * 3 + count] + np.float32(0.5 + i * 1e-3)
            labels = [str(int(v)) for v in y[i * 3 : i * 3 + count]]
            log.submit(PREDICTIONS, {
                "id": ident, "time": at, "model": "digits", "version": "1",
                "variant": "champion", "inputs": [("input", "FP32", rows)],
                "outputs": [("label", "INT64", np.zeros(count, dtype=np.int64))],
            })  # fmt: skip
            if i % 7 == 0:
                continue
            if i in (5, 50):
                labels = ["cat"] * count
            text = labels[0] if count == 1 else json.dumps(labels)
            log.submit(FEEDBACK, {"id": ident, "time": at, "model": "digits", "version": "1",
                                  "label": text, "outcome": "correct"})  # fmt: skip
            if not old and i != 50:
                usable[ident] = {"time": at, "rows": count, "x": rows}
        log.close()
        log = PayloadLog(PayloadLogConfig(root, flush_s=0.05))
    # a shadow copy with a label is never a training row
    log.submit(PREDICTIONS, {
        "id": "shadow-1", "time": END - dt.timedelta(minutes=1), "model": "digits",
        "version": "2", "variant": "shadow", "inputs": [("input", "FP32", x[:1] + 0.25)],
        "outputs": [("label", "INT64", np.zeros(1, dtype=np.int64))],
    })  # fmt: skip
    log.submit(FEEDBACK, {"id": "shadow-1", "time": END, "model": "digits", "version": "2",
                          "label": "1", "outcome": "correct"})  # fmt: skip
    log.close()
    return usable


def expected_split(usable: dict[str, dict[str, object]], holdout: float) -> tuple[list[str], int]:
    """The held-out requests, computed here from the definition: the newest requests
    holding at least ceil(holdout * rows) rows."""
    newest_first = sorted(usable, key=lambda k: (usable[k]["time"], k), reverse=True)
    total = sum(int(str(usable[k]["rows"])) for k in usable)
    wanted = math.ceil(holdout * total)
    held: list[str] = []
    rows = 0
    for ident in newest_first:
        if rows >= wanted:
            break
        held.append(ident)
        rows += int(str(usable[ident]["rows"]))
    return held, total


@pytest.fixture
def store(tmp_path: Path) -> RegistryStore:
    made = RegistryStore(f"sqlite:///{tmp_path / 'r.db'}")
    made.create_schema()
    return made


def test_a_candidate_never_trains_on_the_held_out_rows(
    tmp_path: Path, store: RegistryStore
) -> None:
    usable = write_log(tmp_path / "log")
    holdout, share = 0.25, 0.02
    params = {"payload_log_root": str(tmp_path / "log"), "production_window_s": WINDOW_S,
              "production_end": END.isoformat(), "production_holdout": holdout,
              "production_share": share, "max_iter": 40, "hidden": [16]}  # fmt: skip
    try:
        trained = train(store, work=tmp_path / "w", params=params, trigger="input_drift")
        metrics = {s["step"]: s["metrics"] for s in store.run(trained.run.run_id)["steps"]}
    finally:
        store.close()
    held, total = expected_split(usable, holdout)
    held_rows = sum(int(str(usable[k]["rows"])) for k in held)
    training_ids = sorted(set(usable) - set(held))
    # the production step: the window's rows (the old ones and the bad label skipped)
    production = metrics["production"]
    assert production["production_window_s"] == WINDOW_S
    assert production["production_rows"] == total
    assert production["production_skipped_not_a_class"] == 1  # req-050 ("cat")
    assert production["production_holdout_rows"] == held_rows >= math.ceil(holdout * total)
    assert production["production_training_rows"] == total - held_rows
    with np.load(trained.run.output("production", "production.npz")) as evaluation_rows:
        assert sorted(set(evaluation_rows["ids"].tolist())) == sorted(held)
        expected_x = np.concatenate([np.asarray(usable[k]["x"]) for k in sorted(
            held, key=lambda k: (usable[k]["time"], k))])  # fmt: skip
        np.testing.assert_array_equal(evaluation_rows["x"], expected_x)
    # the ingest step: reference rows plus the newest training rows within the share
    ingest = metrics["ingest"]
    cap = math.floor(share * 1797 / (1 - share))
    assert ingest["reference_rows"] == 1797
    assert ingest["production_rows_available"] == total - held_rows > cap
    assert ingest["production_rows_used"] == cap
    assert ingest["production_rows_dropped"] == total - held_rows - cap
    assert ingest["production_share_used"] == pytest.approx(cap / (1797 + cap))
    assert ingest["production_share_used"] <= share
    with np.load(trained.run.output("ingest", "data.npz")) as data:
        ids = [i for i in data["ids"].tolist() if i]
        assert len(ids) == cap and not set(ids) & set(held)
        assert set(ids) <= set(training_ids)
        # the newest of the training requests were kept
        newest = sorted(training_ids, key=lambda k: (usable[k]["time"], k))
        assert set(ids) >= set(newest[-(cap // 3) :])
        assert "req-001" not in ids and "shadow-1" not in ids
    # what the model trained on (and its offline holdout) holds no held-out row, by value
    held_x = {np.asarray(row).tobytes() for k in held for row in np.asarray(usable[k]["x"])}
    for name in ("train.npz", "holdout.npz"):
        with np.load(trained.run.output("split", name)) as part:
            seen = {row.tobytes() for row in part["x"].astype(np.float32)}
        assert not seen & held_x, name
    # and the registered candidate's evaluation scored the held-out rows
    assert trained.metrics["production"]["rows"] == held_rows
    assert trained.metrics["production"]["window_rows"] == total


def test_the_whole_share_and_no_holdout(tmp_path: Path, store: RegistryStore) -> None:
    """Share 1: every training row of the window is used; holdout 0: none held out (an
    empty production evaluation set)."""
    usable = write_log(tmp_path / "log")
    params = {"payload_log_root": str(tmp_path / "log"), "production_window_s": WINDOW_S,
              "production_end": END.isoformat(), "production_holdout": 0.0,
              "production_share": 1.0, "max_iter": 20, "hidden": [8]}  # fmt: skip
    from retrain.pipeline import Runner

    result = Runner(tmp_path / "w", store).run(digits_pipeline(params))
    store.close()
    total = sum(int(str(v["rows"])) for v in usable.values())
    with np.load(result.output("ingest", "data.npz")) as data:
        assert sorted({i for i in data["ids"].tolist() if i}) == sorted(usable)
        assert len(data["y"]) == 1797 + total
    evaluation = json.loads(result.output("evaluate", "evaluation.json").read_text())
    assert evaluation["production"]["rows"] == 0


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("production_share", 1.5, "production_share must be within [0, 1], got 1.5"),
        ("production_holdout", -0.1, "production_holdout must be within [0, 1], got -0.1"),
        ("production_window_s", 0, "production_window_s must be > 0, got 0"),
        ("production_window_s", "week", "production_window_s must be a finite number"),
        ("production_share", float("nan"), "production_share must be a finite number"),
        ("production_holdout", True, "production_holdout must be a finite number"),
    ],
)
def test_bad_dataset_params_are_refused(key: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        digits_pipeline({"payload_log_root": "/nowhere", key: value})


def labelled(times: list[int], rows: list[int]) -> Labelled:
    ids = np.repeat([f"r{i}" for i in range(len(times))], rows)
    stamps = np.repeat(np.asarray(times, dtype="datetime64[us]"), rows)
    n = int(sum(rows))
    return Labelled(np.arange(n, dtype=np.float32).reshape(n, 1), np.zeros(n, dtype=np.int64),
                    {}, ids.astype(np.str_), stamps)  # fmt: skip


def test_split_newest_keeps_requests_whole() -> None:
    found = labelled([1, 2, 3, 4], [1, 3, 1, 1])  # 6 rows
    older, newest = split_newest(found, 0.5)  # 3 rows wanted: r3, r2 and all of r1
    assert newest.ids.tolist() == ["r1", "r1", "r1", "r2", "r3"]
    assert older.ids.tolist() == ["r0"]
    assert len(split_newest(found, 0.0)[1].y) == 0
    assert len(split_newest(found, 1.0)[0].y) == 0
    assert split_newest(found, 0.1)[1].ids.tolist() == ["r3"]  # any fraction > 0: a row
    with pytest.raises(ValueError, match="within"):
        split_newest(found, 1.2)
    assert production_cap(100, 0.5) == 100 and production_cap(100, 0.0) == 0
    assert production_cap(100, 1.0) is None
