"""The pipeline engine: content-addressed caching, exact invalidation, lineage, failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry.store import RegistryStore
from retrain.pipeline import Pipeline, PipelineError, Runner, Step, StepContext, StepFailed

#: the output folder of every step function call, in order (a cache hit calls nothing)
RAN: list[Path] = []


def copy_upper(ctx: StepContext) -> None:
    RAN.append(ctx.out_dir)
    ctx.output("out").write_text(ctx.inputs["src"].read_text().upper())


def join(ctx: StepContext) -> None:
    RAN.append(ctx.out_dir)
    text = ctx.inputs["left"].read_text() + "|" + ctx.inputs["right"].read_text()
    ctx.output("joined").write_text(text * int(ctx.params["times"]))
    ctx.metrics["length"] = float(len(text))


def explode(ctx: StepContext) -> None:
    raise ValueError("bad data in row 3")


def diamond(tmp: Path, times: int = 1) -> Pipeline:
    return (
        Pipeline("diamond")
        .add(Step("a", copy_upper, ("out",), {"src": f"file:{tmp / 'a.txt'}"}))
        .add(Step("b", copy_upper, ("out",), {"src": "a.out"}))
        .add(Step("c", copy_upper, ("out",), {"src": f"file:{tmp / 'c.txt'}"}))
        .add(Step("d", copy_upper, ("out",), {"src": "c.out"}))
        .add(Step("e", join, ("joined",), {"left": "b.out", "right": "d.out"}, {"times": times}))
    )


@pytest.fixture
def runner(tmp_path: Path) -> Runner:
    store = RegistryStore(f"sqlite:///{tmp_path / 'r.db'}")
    store.create_schema()
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "c.txt").write_text("gamma")
    return Runner(tmp_path / "store", store)


def statuses(runner: Runner, run_id: int) -> dict[str, str]:
    store = runner.sink
    assert isinstance(store, RegistryStore)
    return {s["step"]: s["status"] for s in store.run(run_id)["steps"]}


def test_cache_reuses_everything_and_invalidates_exactly(runner: Runner, tmp_path: Path) -> None:
    RAN.clear()
    first = runner.run(diamond(tmp_path))
    assert first.output("e", "joined").read_text() == "ALPHA|GAMMA"
    assert set(statuses(runner, first.run_id).values()) == {"succeeded"}
    assert len(RAN) == 5
    RAN.clear()
    second = runner.run(diamond(tmp_path))
    # every step a cache hit: no step function ran, each output is the first run's file
    # (the re-run's speed is measured by benchmarks/pipeline.py, not asserted here)
    assert set(statuses(runner, second.run_id).values()) == {"cached"} and RAN == []
    for name in "abcde":
        assert second.steps[name].outputs == first.steps[name].outputs
    (tmp_path / "c.txt").write_text("gammb")  # one byte of one source
    third = runner.run(diamond(tmp_path))
    assert statuses(runner, third.run_id) == {
        "a": "cached", "b": "cached", "c": "succeeded", "d": "succeeded", "e": "succeeded",
    }  # fmt: skip
    assert third.output("e", "joined").read_text() == "ALPHA|GAMMB"
    fourth = runner.run(diamond(tmp_path, times=2))  # a parameter: only that step
    assert statuses(runner, fourth.run_id)["e"] == "succeeded"
    assert statuses(runner, fourth.run_id)["d"] == "cached"
    off = runner.run(diamond(tmp_path), cache=False)
    assert set(statuses(runner, off.run_id).values()) == {"succeeded"}


def test_same_content_under_another_name_is_a_cache_hit(runner: Runner, tmp_path: Path) -> None:
    runner.run(diamond(tmp_path))
    (tmp_path / "renamed").mkdir()
    (tmp_path / "renamed" / "a.txt").write_text("alpha")
    (tmp_path / "renamed" / "c.txt").write_text("gamma")
    again = runner.run(diamond(tmp_path / "renamed"))
    assert set(statuses(runner, again.run_id).values()) == {"cached"}


def test_lineage_is_recorded(runner: Runner, tmp_path: Path) -> None:
    result = runner.run(diamond(tmp_path))
    store = runner.sink
    assert isinstance(store, RegistryStore)
    run = store.run(result.run_id)
    assert run["status"] == "succeeded" and run["pipeline"] == "diamond"
    e_step = next(s for s in run["steps"] if s["step"] == "e")
    assert e_step["metrics"] == {"length": 11.0} and e_step["parameters"] == {"times": 1}
    e_artifacts = {(a["direction"], a["name"]): a for a in run["artifacts"] if a["step"] == "e"}
    assert set(e_artifacts) == {("input", "left"), ("input", "right"), ("output", "joined")}
    assert e_artifacts[("output", "joined")]["size"] == 11
    assert e_artifacts[("output", "joined")]["content_hash"].startswith("sha256:")


def test_a_failing_step_fails_the_run_and_stops_downstream(runner: Runner, tmp_path: Path) -> None:
    pipeline = diamond(tmp_path).add(Step("boom", explode, ("x",), {"src": "e.joined"}))
    pipeline.add(Step("register", copy_upper, ("y",), {"src": "boom.x"}))
    with pytest.raises(StepFailed, match="step 'boom' failed: ValueError: bad data in row 3"):
        runner.run(pipeline)
    store = runner.sink
    assert isinstance(store, RegistryStore)
    run = store.runs(1)[0]
    assert run["status"] == "failed" and "bad data" in run["error"]
    steps = statuses(runner, run["id"])
    assert steps["boom"] == "failed" and "register" not in steps
    failed = next(s for s in store.run(run["id"])["steps"] if s["step"] == "boom")
    assert "Traceback" in Path(failed["log_uri"]).read_text()


def test_a_step_failing_once_a_stop_was_asked_for_is_interrupted(
    runner: Runner, tmp_path: Path
) -> None:
    """The stop's Interrupted raised inside a C extension can come out as another error
    (seen under load: numpy's "buffer format string" ValueError): once a stop was asked
    for, that step and its run are interrupted, not failed (and not retried)."""
    from retrain.stop import Interrupted, Stop

    stop = Stop()

    def stopped_mid_step(ctx: StepContext) -> None:
        stop.set()  # as the signal handler does, before it raises into the step
        raise ValueError("buffer format string")

    stopping = Runner(tmp_path / "store", runner.sink, stop=stop)
    pipeline = diamond(tmp_path).add(Step("boom", stopped_mid_step, ("x",), {"src": "e.joined"},
                                          retries=2))  # fmt: skip
    with pytest.raises(Interrupted, match="stopped during step 'boom'"):
        stopping.run(pipeline)
    store = runner.sink
    assert isinstance(store, RegistryStore)
    run = store.runs(1)[0]
    assert run["status"] == "interrupted"
    boom = next(s for s in store.run(run["id"])["steps"] if s["step"] == "boom")
    assert boom["status"] == "interrupted" and boom["attempts"] == 1


def test_a_succeeded_step_keeps_its_log_with_the_run(runner: Runner, tmp_path: Path) -> None:
    """What a step logs while it runs (its own thread's records), then its outcome: kept in
    the file the run records as the step's log_uri (the console shows it)."""
    import json
    import logging
    import threading

    def elsewhere() -> None:  # another thread's records, while the step runs: not its own
        logging.getLogger("servo.retrain.test").warning("not the step's line")

    def chatty(ctx: StepContext) -> None:
        logging.getLogger("servo.retrain.test").warning("read %d rows", 3)
        noise = threading.Thread(target=elsewhere)
        noise.start()
        noise.join()
        ctx.output("x").write_text("ok")
        ctx.metrics["rows"] = 3.0

    pipeline = Pipeline("chatty").add(Step("chatty", chatty, ("x",)))
    result = runner.run(pipeline)
    store = runner.sink
    assert isinstance(store, RegistryStore)
    (step,) = store.run(result.run_id)["steps"]
    text = Path(step["log_uri"]).read_text()
    assert "WARNING servo.retrain.test: read 3 rows" in text
    assert "not the step's line" not in text
    summary = json.loads(text.splitlines()[-1])
    assert summary["step"] == "chatty" and summary["status"] == "succeeded"
    assert summary["metrics"] == {"rows": 3.0} and summary["outputs"]["x"].startswith("sha256:")


def test_retries(runner: Runner, tmp_path: Path) -> None:
    calls = tmp_path / "calls"

    def flaky(ctx: StepContext) -> None:
        count = int(calls.read_text()) if calls.exists() else 0
        calls.write_text(str(count + 1))
        if count == 0:
            raise OSError("transient")
        ctx.output("ok").write_text("fine")

    result = runner.run(Pipeline("p").add(Step("flaky", flaky, ("ok",), retries=1)))
    assert result.steps["flaky"].attempts == 2


def test_bad_wiring_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="names no output"):
        Pipeline("p").add(Step("x", copy_upper, ("out",), {"src": "nope.out"})).order()
    cycle = Pipeline("p").add(Step("x", copy_upper, ("out",), {"src": "y.out"}))
    cycle.add(Step("y", copy_upper, ("out",), {"src": "x.out"}))
    with pytest.raises(PipelineError, match="cycle"):
        cycle.order()


def test_ingest_reads_a_csv_table(runner: Runner, tmp_path: Path) -> None:
    import numpy as np

    from retrain.steps import ingest

    csv = tmp_path / "table.csv"
    csv.write_text("a,b,y\n1.5,2,0\n3,4.25,1\n")
    step = Step("ingest", ingest, ("data.npz",), {"table": f"file:{csv}"},
                {"dataset": "csv", "label_column": "y"})  # fmt: skip
    result = runner.run(Pipeline("csv").add(step))
    with np.load(result.output("ingest", "data.npz"), allow_pickle=False) as data:
        np.testing.assert_array_equal(data["x"], [[1.5, 2.0], [3.0, 4.25]])
        np.testing.assert_array_equal(data["y"], [0, 1])
    bad = Step("ingest", ingest, ("data.npz",), {"table": f"file:{csv}"},
               {"dataset": "csv", "label_column": "label"})  # fmt: skip
    with pytest.raises(StepFailed, match="no label column 'label'"):
        runner.run(Pipeline("csv").add(bad))


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_artifact_store_by_fsspec_url(tmp_path: Path, scheme: str) -> None:
    """Outputs are pushed to the store at its URL; a runner on another (empty) local folder
    with the same store reuses them as cache hits; lineage names the store's URIs."""
    import fsspec

    from retrain.artifacts import open_store

    url = f"file://{tmp_path / 'bucket'}" if scheme == "file" else f"memory://servo-{tmp_path.name}"
    sink = RegistryStore(f"sqlite:///{tmp_path / 'r.db'}")
    sink.create_schema()
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "c.txt").write_text("gamma")
    first = Runner(tmp_path / "here", sink, open_store(url)).run(diamond(tmp_path))
    assert set(statuses(Runner(tmp_path, sink), first.run_id).values()) == {"succeeded"}
    fs, base = fsspec.core.url_to_fs(url)
    key = first.steps["e"].cache_key
    assert fs.cat_file(f"{base}/e/{key}/joined") == b"ALPHA|GAMMA"
    elsewhere = Runner(tmp_path / "elsewhere", sink, open_store(url))
    second = elsewhere.run(diamond(tmp_path))
    assert set(statuses(elsewhere, second.run_id).values()) == {"cached"}
    assert second.output("e", "joined").read_text() == "ALPHA|GAMMA"
    assert str(second.output("e", "joined")).startswith(str(tmp_path / "elsewhere"))
    output = next(
        a for a in sink.run(second.run_id)["artifacts"]
        if a["step"] == "e" and a["direction"] == "output"
    )  # fmt: skip
    assert output["uri"] == f"{url}/e/{key}/joined"
    # a half-pushed folder (no manifest) is not a cache hit: the step runs again
    fs.rm(f"{base}/e/{key}/manifest.json")
    third = Runner(tmp_path / "third", sink, open_store(url)).run(diamond(tmp_path))
    assert third.steps["e"].status == "succeeded" and third.steps["a"].status == "cached"


def test_ingest_parquet_with_string_labels_and_a_categorical_column(
    runner: Runner, tmp_path: Path
) -> None:
    """Parquet table -> split -> train (the profile gets the column names and top-K bins
    for the categorical column) -> evaluate; labels are names, mapped to indices."""
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from retrain.steps import evaluate, ingest, split, train

    rng = np.random.default_rng(0)
    n = 600
    colour = rng.integers(0, 4, n)
    size = rng.standard_normal(n)
    label = np.where(size + (colour == 2) > 0.5, "big", "small")
    path = tmp_path / "table.parquet"
    pq.write_table(pa.table({"size": size, "colour": colour, "kind": label}), path)
    params = {"dataset": "parquet", "label_column": "kind", "categorical_columns": ["colour"]}
    pipeline = (
        Pipeline("table")
        .add(Step("ingest", ingest, ("data.npz",), {"table": f"file:{path}"}, params))
        .add(Step("split", split, ("train.npz", "holdout.npz"), {"data": "ingest.data.npz"}))
        .add(Step("train", train, ("model.onnx", "framework.npz", "profile.json"),
                  {"train": "split.train.npz", "holdout": "split.holdout.npz"}))
        .add(Step("evaluate", evaluate, ("evaluation.json",),
                  {"model": "train.model.onnx", "holdout": "split.holdout.npz",
                   "framework": "train.framework.npz"}))
    )  # fmt: skip
    result = runner.run(pipeline)
    doc = json.loads(result.output("train", "profile.json").read_text())
    assert doc["classes"] == ["big", "small"]
    assert doc["profile"]["features"] == ["size", "colour"]
    assert sorted(doc["profile"]["categories"]["colour"]) == [0.0, 1.0, 2.0, 3.0]
    evaluation = json.loads(result.output("evaluate", "evaluation.json").read_text())
    assert evaluation["accuracy"] > 0.9
    # scikit-learn's ConvergenceWarning is recorded with the run, not raised
    assert any("ConvergenceWarning" in w for w in doc["warnings"])
    strings = tmp_path / "strings.parquet"
    pq.write_table(pa.table({"colour": ["red", "blue"], "kind": ["big", "small"]}), strings)
    bad = Step("ingest", ingest, ("data.npz",), {"table": f"file:{strings}"},
               {"dataset": "parquet", "label_column": "kind"})  # fmt: skip
    with pytest.raises(StepFailed, match="column 'colour' is not numeric"):
        runner.run(Pipeline("bad").add(bad))
