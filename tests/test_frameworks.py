"""Every trainer behind the train step, through `servo train` to a servable model folder:
scikit-learn (MLP, gradient boosting), XGBoost, PyTorch (MLP, and a small CNN on a folder
of images) and Keras (SavedModel, then ONNX from it with tf2onnx). The export check runs
in each (ONNX vs the framework's own holdout predictions, within 1e-4).

The XGBoost, PyTorch and TensorFlow tests need their extras (`pip install -e
'.[xgboost,torch,tensorflow]'`); `.ci/run` installs them, so they run in CI. Without them
these tests skip and say which extra is missing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from registry.store import RegistryStore
from serving.model_folder import read_card
from servo.cli import main
from servo.demo import digits_holdout
from servo.train import train

EXTRAS = {"xgboost": "xgboost", "torch": "torch", "keras": "tensorflow"}


def needs(framework: str) -> None:
    module = EXTRAS.get(framework)
    if module is not None and importlib.util.find_spec(module) is None:
        pytest.skip(f"the {module} extra is not installed (.ci/run installs it)")


@pytest.mark.parametrize("framework", ["sklearn", "sklearn-gbt", "xgboost", "torch", "keras"])
def test_each_framework_trains_exports_and_registers(tmp_path: Path, framework: str) -> None:
    needs(framework)
    store = RegistryStore(f"sqlite:///{tmp_path / 'r.db'}")
    store.create_schema()
    try:
        trained = train(store, work=tmp_path / "w", params={"framework": framework, "seed": 0})
        assert trained.metrics["accuracy"] > 0.9, trained.metrics
        assert trained.metrics["export_max_probability_gap"] <= 1e-4
        card = read_card(trained.folder)
        assert card.framework == framework and card.class_labels == [str(i) for i in range(10)]
        assert card.reference_profile is not None
        session = ort.InferenceSession(
            str(trained.folder / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        assert [o.name for o in session.get_outputs()] == ["label", "probabilities"]
        x, y = digits_holdout()
        labels, probabilities = session.run(None, {"input": x})
        assert labels.dtype == np.int64 and (labels == y).mean() > 0.9
        assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        if framework == "keras":  # the SavedModel is kept as an artifact of the run
            outputs = {a["name"] for a in store.run(trained.run.run_id)["artifacts"]}
            assert "saved_model.zip" in outputs
        # seeded: the same run again from scratch gives the same model, not a new version
        again = train(store, work=tmp_path / "again", params={"framework": framework, "seed": 0})
        assert again.reused and again.version == trained.version, framework
    finally:
        store.close()


def write_image_folder(root: Path) -> None:
    """Three digit classes as 16x16 grayscale PNGs in class subfolders, plus a corrupt
    file (skipped and counted)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    names = {0: "zero", 1: "one", 7: "seven"}
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        if label not in names:
            continue
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels, mode="L").resize((16, 16)).save(folder / f"{i}.png")
    (root / "one" / "broken.png").write_bytes(b"not a png")


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_image_folder_trains_a_small_cnn(tmp_path: Path, framework: str) -> None:
    needs(framework)
    write_image_folder(tmp_path / "images")
    url = f"sqlite:///{tmp_path / 'r.db'}"
    result = CliRunner().invoke(
        main,
        ["train", "--dataset", "images", "--images", str(tmp_path / "images"), "--size", "16x16",
         "--mode", "L", "--framework", framework, "--name", "glyphs", "--registry", url,
         "--work-dir", str(tmp_path / "w")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    store = RegistryStore(url)
    try:
        info = store.version("glyphs", 1)
        assert info.metrics["accuracy"] > 0.95, info.metrics
        lineage = store.run(info.run_id)  # type: ignore[arg-type]
        ingest = next(s for s in lineage["steps"] if s["step"] == "ingest")
        assert ingest["metrics"]["skipped_files"] == 1.0
    finally:
        store.close()
    folder = Path(json.loads(CliRunner().invoke(
        main, ["models", "show", "glyphs", "1", "--registry", url]
    ).output)["artifact_uri"].removeprefix("file://"))  # fmt: skip
    card = read_card(folder)
    assert card.class_labels == ["one", "seven", "zero"]
    assert tuple(card.signature.inputs[0].shape) == (-1, 16, 16, 1)  # the image tensor
