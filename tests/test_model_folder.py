"""Model version folders: what `servo export-demo` writes, and loads that must fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from serving.model_folder import read_card, valid_name
from serving.repository import ModelRepository, State
from servo.cli import main
from servo.demo import digits_holdout
from tests.models import identity_model, write_model


def test_export_demo_writes_a_checked_model_folder(tmp_path: Path) -> None:
    folder = tmp_path / "digits" / "7"
    result = CliRunner().invoke(main, ["export-demo", str(folder), "--version", "7"])
    assert result.exit_code == 0, result.output
    assert "holdout accuracy" in result.output
    doc = json.loads((folder / "servo.json").read_text())
    assert doc["name"] == "digits" and doc["version"] == "7"
    assert doc["framework"] == "sklearn"
    assert doc["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert [o["name"] for o in doc["outputs"]] == ["label", "probabilities"]
    assert doc["class_labels"] == [str(i) for i in range(10)]
    assert doc["metrics"]["accuracy"] > 0.9
    assert doc["created_at"]
    profile = doc["reference_profile"]
    assert profile["input"] == "input" and len(profile["features"]) == 64
    assert all(sum(row) == profile["n"] for row in profile["reference_counts"])
    assert abs(sum(profile["class_prior"].values()) - 1.0) < 1e-9
    # outputs' references come from the 450 held-out rows, the bins from the 1,347 training rows
    assert sum(profile["confidence_counts"]) == sum(profile["prediction_counts"].values()) == 450
    assert profile["n"] == 1347
    x_test, y_test = digits_holdout()
    session = ort.InferenceSession(str(folder / "model.onnx"))
    labels, _ = session.run(None, {"input": x_test})
    assert np.isclose((labels == y_test).mean(), doc["metrics"]["accuracy"])


@pytest.mark.parametrize("name", ["../etc", "a/b", ".hidden", "", "x" * 200, "a..b", "ok:no"])
def test_names_that_could_be_paths_are_refused(name: str) -> None:
    assert not valid_name(name)


def load(folder: Path) -> tuple[State, str]:
    repository = ModelRepository()
    try:
        entry = repository.load_folder(folder)
        return entry.state, entry.error or ""
    finally:
        repository.close()


def test_card_must_match_the_graph(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m" / "1", identity_model("FP32"), "m")
    doc = json.loads((folder / "servo.json").read_text())
    doc["inputs"][0]["shape"] = [-1, 4]
    (folder / "servo.json").write_text(json.dumps(doc))
    state, error = load(folder)
    assert state is State.FAILED
    assert "does not match the ONNX graph" in error


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(name="../../etc"), "invalid model name '../../etc'"),
        (lambda d: d.update(format=9), "unsupported format 9"),
        (lambda d: d.pop("inputs"), "malformed"),
    ],
)
def test_bad_cards_fail_with_a_reason(tmp_path: Path, mutate: object, message: str) -> None:
    folder = write_model(tmp_path / "m" / "1", identity_model("FP32"), "m")
    doc = json.loads((folder / "servo.json").read_text())
    mutate(doc)  # type: ignore[operator]
    (folder / "servo.json").write_text(json.dumps(doc))
    state, error = load(folder)
    assert state is State.FAILED
    assert message in error


def test_a_profile_that_does_not_fit_the_model_fails_the_load(tmp_path: Path) -> None:
    from monitors.profile import fit

    folder = write_model(tmp_path / "m" / "1", identity_model("FP32"), "m")
    doc = json.loads((folder / "servo.json").read_text())
    doc["reference_profile"] = fit(np.ones((5, 4)), "x").to_json()  # x has 3 columns
    (folder / "servo.json").write_text(json.dumps(doc))
    state, error = load(folder)
    assert state is State.FAILED
    assert "reference profile has 4 features, input 'x' has 3" in error


def test_unreadable_card_is_keyed_by_folder(tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "servo.json").write_text("{not json")
    repository = ModelRepository()
    try:
        entry = repository.load_folder(folder)
        assert (entry.name, entry.state) == ("broken", State.FAILED)
        assert "not valid JSON" in (entry.error or "")
    finally:
        repository.close()


def test_round_trip_of_the_card(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m" / "3", identity_model("INT64"), "m", version="3")
    card = read_card(folder)
    assert (card.name, card.version) == ("m", "3")
    assert card.signature.inputs[0].datatype == "INT64"
