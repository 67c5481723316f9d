"""Built-in demo models: the digits classifier (trained) and a medium MLP (benchmark shape).

Until the retraining pipeline lands (issue 4), this is how a model version folder is made.
"""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from monitors.profile import fit as fit_profile
from serving import signature
from serving.model_folder import MODEL_FILE, ModelCard, write_card


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _write(folder: Path, model: onnx.ModelProto, card_fields: dict[str, Any]) -> ModelCard:
    folder.mkdir(parents=True, exist_ok=True)
    onnx.checker.check_model(model)
    (folder / MODEL_FILE).write_bytes(model.SerializeToString())
    card = ModelCard(signature=signature.from_onnx(model), created_at=_now(), **card_fields)
    write_card(folder, card)
    return card


def digits_holdout(seed: int = 0) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    digits = load_digits()
    _, x_test, _, y_test = train_test_split(
        digits.data, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )
    return x_test.astype(np.float32), y_test


def export_digits(
    folder: Path, name: str = "digits", version: str = "1", seed: int = 0
) -> ModelCard:
    """Train an MLP on scikit-learn's digits and write `model.onnx` + `servo.json`.

    The ONNX export is checked against scikit-learn's own predictions on the holdout
    (classes equal, probabilities within 1e-4) and refused if they differ.
    """
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data.astype(np.float32),
        digits.target,
        test_size=0.25,
        random_state=seed,
        stratify=digits.target,
    )
    clf = Pipeline(
        [
            ("scale", StandardScaler()),
            ("mlp", MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=seed)),
        ]
    )
    clf.fit(x_train, y_train)
    model = to_onnx(
        clf,
        initial_types=[("input", FloatTensorType([None, 64]))],
        options={id(clf.steps[-1][1]): {"zipmap": False}},
        target_opset=17,
    )
    # outputs: label [N] INT64, probabilities [N,10] FP32
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    labels, probabilities = session.run(None, {"input": x_test})
    expected = clf.predict_proba(x_test)
    if not np.array_equal(labels, clf.predict(x_test)) or not np.allclose(
        probabilities, expected, atol=1e-4
    ):
        raise RuntimeError("ONNX export disagrees with scikit-learn; refusing to write it")
    accuracy = float((labels == y_test).mean())
    profile = fit_profile(
        x_train,
        "input",
        labels=y_train,
        probabilities=expected,  # held-out rows: live traffic is unseen data
        predictions=labels,
    )
    return _write(
        folder,
        model,
        {
            "name": name,
            "version": version,
            "framework": "sklearn",
            "class_labels": [str(c) for c in clf.classes_],
            "metrics": {"accuracy": accuracy, "holdout_rows": float(len(y_test))},
            "reference_profile": profile.to_json(),
        },
    )


def export_medium_mlp(
    folder: Path, name: str = "mlp", version: str = "1", seed: int = 0
) -> ModelCard:
    """A medium MLP, [N,784] -> 1024 -> 1024 -> 10 (seeded random weights), as ONNX."""
    rng = np.random.default_rng(seed)
    sizes = [784, 1024, 1024, 10]
    nodes, inits = [], []
    current = "input"
    for layer, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        weight = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        bias = np.zeros(n_out, dtype=np.float32)
        inits += [
            numpy_helper.from_array(weight, f"w{layer}"),
            numpy_helper.from_array(bias, f"b{layer}"),
        ]
        out = f"h{layer}" if layer < len(sizes) - 2 else "logits"
        nodes.append(
            helper.make_node(
                "Gemm",
                [current, f"w{layer}", f"b{layer}"],
                [out + "_pre" if out != "logits" else out],
            )
        )
        if out != "logits":
            nodes.append(helper.make_node("Relu", [out + "_pre"], [out]))
        current = out
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    graph = helper.make_graph(
        nodes,
        "medium_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 784])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return _write(
        folder,
        model,
        {"name": name, "version": version, "framework": "onnx", "class_labels": None},
    )
