"""`servo train`: the digits pipeline end to end into a registry and a servable folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from registry.store import RegistryStore
from serving.repository import ModelRepository, State
from servo.cli import main
from servo.train import train
from tests.test_steps import exact_mcnemar, predict


def test_pipeline_registers_a_servable_version(tmp_path: Path) -> None:
    store = RegistryStore(f"sqlite:///{tmp_path / 'r.db'}")
    store.create_schema()
    try:
        # the first run's and the cached re-run's speed are measured by
        # benchmarks/pipeline.py, not asserted here
        first = train(store, work=tmp_path / "w")
        assert first.version == 1 and first.metrics["accuracy"] > 0.9
        assert {s.status for s in first.run.steps.values()} == {"succeeded"}
        assert first.metrics["export_max_probability_gap"] <= 1e-4
        assert set(first.metrics["per_class_recall"]) == {str(i) for i in range(10)}
        info = store.version("digits", 1)
        assert info.artifact_uri == first.folder.resolve().as_uri()
        assert info.metrics["macro_f1"] > 0.9 and info.run_id == first.run.run_id
        lineage = store.run(first.run.run_id)
        assert [s["step"] for s in lineage["steps"]] == ["ingest", "split", "train", "evaluate"]
        repository = ModelRepository()
        try:
            entry = repository.load_folder(first.folder)
            assert entry.state is State.READY, entry.error
            assert entry.model is not None and entry.model.profile is not None
        finally:
            repository.close()
        second = train(store, work=tmp_path / "w")
        # every step a cache hit, reading the first run's artifacts
        assert {s.status for s in second.run.steps.values()} == {"cached"}
        for name, step in second.run.steps.items():
            assert step.outputs == first.run.steps[name].outputs
            assert step.cache_key == first.run.steps[name].cache_key
        # the same model is not registered twice; the run is still in the lineage
        assert second.reused and second.version == 1 and second.folder == first.folder
        assert [v.version for v in store.versions("digits")] == [1]
        assert store.run(second.run.run_id)["status"] == "succeeded"
        third = train(store, work=tmp_path / "w", params={"seed": 1})
        assert not third.reused and third.version == 2
    finally:
        store.close()


def test_cli_train(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    result = CliRunner().invoke(main, ["train", "--registry", url, "--work-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("registered digits version 1 (run 1: ingest=succeeded")
    again = CliRunner().invoke(main, ["train", "--registry", url, "--work-dir", str(tmp_path)])
    assert again.output.startswith("unchanged: already registered as digits version 1 (run 2:")
    # a fresh work folder with an artifact store: trained again (seeded: the same bytes),
    # pushed to the store, and still the same version
    bucket = tmp_path / "bucket"
    fresh = CliRunner().invoke(
        main,
        ["train", "--registry", url, "--work-dir", str(tmp_path / "fresh"),
         "--artifacts", bucket.as_uri()],
    )  # fmt: skip
    assert fresh.output.startswith("unchanged: already registered as digits version 1 (run 3:")
    assert "train=succeeded" in fresh.output
    assert len(list(bucket.glob("train/*/model.onnx"))) == 1
    shown = CliRunner().invoke(main, ["models", "show", "digits", "1", "--registry", url])
    assert json.loads(shown.output)["lineage"]["status"] == "succeeded"


def test_a_new_candidate_is_compared_with_the_champion(tmp_path: Path) -> None:
    store = RegistryStore(f"sqlite:///{tmp_path / 'r.db'}")
    store.create_schema()
    try:
        first = train(store, work=tmp_path / "w")
        assert "comparison" not in first.metrics  # no champion yet
        store.set_alias("digits", "champion", first.version, actor="ops")
        second = train(store, work=tmp_path / "w", params={"seed": 1})
        comparison = second.metrics["comparison"]
        # the same holdout rows for both (seed 1 splits differently from the first run)
        assert comparison["candidate_accuracy"] == second.metrics["accuracy"]
        assert comparison["champion_accuracy"] > 0.9 and comparison["rows"] == 450
        # the comparison's numbers, computed here from both versions' models on those rows
        with np.load(second.run.steps["split"].outputs["holdout.npz"]) as holdout:
            x, y = holdout["x"], holdout["y"]
        candidate = predict(second.folder / "model.onnx", x) == y
        champion = predict(first.folder / "model.onnx", x) == y
        b, c = int((candidate & ~champion).sum()), int((~candidate & champion).sum())
        assert comparison["champion_accuracy"] == champion.mean()
        assert (comparison["only_candidate_correct"], comparison["only_champion_correct"]) == (
            b,
            c,
        )
        assert comparison["mcnemar_p_value"] == pytest.approx(exact_mcnemar(b, c), rel=1e-9)
        low, high = comparison["difference_ci95"]
        assert low <= comparison["difference"] <= high
    finally:
        store.close()
