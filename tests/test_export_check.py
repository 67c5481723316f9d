"""The export check of `servo train`'s evaluate step: an ONNX model whose probabilities
differ from the framework's own by more than 1e-4 is refused, one within 1e-4 passes.

The models are the real trained digits export with one extra node scaling its
probabilities output by (1 + eps): labels unchanged, probabilities off by about eps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from registry.store import RegistryStore
from retrain.pipeline import Pipeline, Runner, Step, StepContext
from retrain.steps import evaluate, ingest, split, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-check")
    store = RegistryStore(f"sqlite:///{root / 'r.db'}")
    store.create_schema()
    try:
        pipeline = (
            Pipeline("p")
            .add(Step("ingest", ingest, ("data.npz",), params={"dataset": "digits"}))
            .add(Step("split", split, ("train.npz", "holdout.npz"), {"data": "ingest.data.npz"}))
            .add(Step("train", train, ("model.onnx", "framework.npz", "profile.json"),
                      {"train": "split.train.npz", "holdout": "split.holdout.npz"}))
        )  # fmt: skip
        run = Runner(root / "store", store).run(pipeline)
    finally:
        store.close()
    return {
        "model": run.output("train", "model.onnx"),
        "framework": run.output("train", "framework.npz"),
        "holdout": run.output("split", "holdout.npz"),
    }


def scaled(model_path: Path, eps: float, out: Path) -> Path:
    """The same model, its `probabilities` output multiplied by (1 + eps)."""
    model = onnx.load(str(model_path))
    graph = model.graph
    (output,) = [o for o in graph.output if o.name == "probabilities"]
    for node in graph.node:  # the label stays computed from the exact probabilities
        node.input[:] = ["probabilities_exact" if i == "probabilities" else i for i in node.input]
        node.output[:] = ["probabilities_exact" if o == "probabilities" else o for o in node.output]
    graph.initializer.append(
        numpy_helper.from_array(np.array(1.0 + eps, dtype=np.float32), "probability_scale")
    )
    graph.node.append(
        helper.make_node("Mul", ["probabilities_exact", "probability_scale"], [output.name])
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


def run_evaluate(trained: dict[str, Path], model: Path, out: Path) -> dict[str, float]:
    out.mkdir()
    inputs = {"model": model, "framework": trained["framework"], "holdout": trained["holdout"]}
    evaluate(StepContext(inputs, {}, out))
    doc: dict[str, float] = json.loads((out / "evaluation.json").read_text())
    return doc


def test_the_exact_export_passes(trained: dict[str, Path], tmp_path: Path) -> None:
    doc = run_evaluate(trained, trained["model"], tmp_path / "exact")
    assert doc["export_max_probability_gap"] <= 1e-5 and doc["accuracy"] > 0.9


def test_probabilities_within_1e4_pass(trained: dict[str, Path], tmp_path: Path) -> None:
    model = scaled(trained["model"], 5e-5, tmp_path / "close.onnx")
    doc = run_evaluate(trained, model, tmp_path / "close")
    assert 1e-5 < doc["export_max_probability_gap"] <= 1e-4


def test_probabilities_off_by_more_than_1e4_are_refused(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    model = scaled(trained["model"], 3e-4, tmp_path / "off.onnx")
    # the gap is 3e-4 times the largest probability (close to 1)
    with pytest.raises(ValueError, match=r"differ from the framework's by (2\.9\d|3\.00)e-04$"):
        run_evaluate(trained, model, tmp_path / "off")
    assert not (tmp_path / "off" / "evaluation.json").exists()
