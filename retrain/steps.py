"""Built-in steps: ingest, split, train, evaluate. Artifacts are files: `.npz` arrays
(loaded with allow_pickle=False), ONNX models and JSON documents; nothing is pickled."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import numpy.typing as npt

from monitors.profile import fit as fit_profile
from retrain.pipeline import StepContext


def _load(path: Any) -> dict[str, npt.NDArray[Any]]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def ingest(ctx: StepContext) -> None:
    """`dataset`: "digits" (scikit-learn's), or a CSV file given as input `table` with a
    `label_column`."""
    dataset = ctx.params.get("dataset", "digits")
    if dataset == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x, y = digits.data.astype(np.float32), digits.target.astype(np.int64)
    elif dataset == "csv":
        import pyarrow.csv as pacsv

        table = pacsv.read_csv(ctx.inputs["table"])
        label = ctx.params["label_column"]
        if label not in table.column_names:
            raise ValueError(f"no label column {label!r} in {table.column_names}")
        y = np.asarray(table[label].to_numpy(), dtype=np.int64)
        features = [c for c in table.column_names if c != label]
        x = np.column_stack([table[c].to_numpy() for c in features]).astype(np.float32)
    else:
        raise ValueError(f"unknown dataset {dataset!r} (digits, csv)")
    if not np.isfinite(x).all():
        raise ValueError("the data holds NaN or Inf")
    np.savez(ctx.output("data.npz"), x=x, y=y)
    ctx.metrics["rows"] = float(len(y))


def split(ctx: StepContext) -> None:
    from sklearn.model_selection import train_test_split

    data = _load(ctx.inputs["data"])
    x_train, x_test, y_train, y_test = train_test_split(
        data["x"], data["y"], test_size=float(ctx.params.get("holdout", 0.25)),
        random_state=int(ctx.params.get("seed", 0)), stratify=data["y"],
    )  # fmt: skip
    np.savez(ctx.output("train.npz"), x=x_train, y=y_train)
    np.savez(ctx.output("holdout.npz"), x=x_test, y=y_test)


def train(ctx: StepContext) -> None:
    """A scikit-learn MLP, exported to ONNX; writes the framework's own holdout
    probabilities (for the export check) and the reference profile."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    data, holdout = _load(ctx.inputs["train"]), _load(ctx.inputs["holdout"])
    seed = int(ctx.params.get("seed", 0))
    hidden = tuple(int(h) for h in ctx.params.get("hidden", [64]))
    iterations = int(ctx.params.get("max_iter", 300))
    mlp = MLPClassifier(hidden_layer_sizes=hidden, max_iter=iterations, random_state=seed)
    clf = Pipeline([("scale", StandardScaler()), ("mlp", mlp)])
    clf.fit(data["x"], data["y"])
    width = data["x"].shape[1]
    model = to_onnx(
        clf, initial_types=[("input", FloatTensorType([None, width]))],
        options={id(clf.steps[-1][1]): {"zipmap": False}}, target_opset=17,
    )  # fmt: skip
    ctx.output("model.onnx").write_bytes(model.SerializeToString())
    np.savez(ctx.output("framework.npz"), labels=clf.predict(holdout["x"]),
             probabilities=clf.predict_proba(holdout["x"]).astype(np.float32))  # fmt: skip
    profile = fit_profile(data["x"], "input", labels=data["y"],
                          probabilities=clf.predict_proba(data["x"]))  # fmt: skip
    doc = {"profile": profile.to_json(), "classes": [str(c) for c in clf.classes_]}
    ctx.output("profile.json").write_text(json.dumps(doc))
    ctx.metrics["train_accuracy"] = float(clf.score(data["x"], data["y"]))


def evaluate(ctx: StepContext) -> None:
    """Holdout metrics of the ONNX model, and the export check against the framework:
    the same classes, probabilities within 1e-4; a mismatch fails the step."""
    import onnxruntime as ort

    holdout, framework = _load(ctx.inputs["holdout"]), _load(ctx.inputs["framework"])
    session = ort.InferenceSession(str(ctx.inputs["model"]), providers=["CPUExecutionProvider"])
    labels, probabilities = session.run(None, {"input": holdout["x"]})
    if not np.array_equal(labels, framework["labels"]):
        raise ValueError("ONNX export predicts other classes than the framework")
    gap = float(np.abs(probabilities - framework["probabilities"]).max())
    if gap > 1e-4:
        raise ValueError(f"ONNX probabilities differ from the framework's by {gap:.2e}")
    y = holdout["y"]
    classes = np.unique(y)
    recall = {str(c): float((labels[y == c] == c).mean()) for c in classes}
    precision = {str(c): float((y[labels == c] == c).mean()) if (labels == c).any() else 0.0
                 for c in classes}  # fmt: skip
    f1 = [2 * precision[k] * recall[k] / (precision[k] + recall[k]) if precision[k] + recall[k]
          else 0.0 for k in recall]  # fmt: skip
    picked = probabilities[np.arange(len(y)), np.searchsorted(classes, y)]
    confidence = probabilities.max(axis=1)
    bins = np.minimum((confidence * 10).astype(int), 9)
    ece = sum(
        abs(float((labels[bins == b] == y[bins == b]).mean()) - float(confidence[bins == b].mean()))
        * float((bins == b).mean())
        for b in range(10) if (bins == b).any()
    )  # fmt: skip
    doc = {
        "accuracy": float((labels == y).mean()),
        "macro_f1": float(np.mean(f1)),
        "log_loss": float(-np.mean(np.log(np.clip(picked, 1e-15, 1.0)))),
        "calibration_error": float(ece),
        "per_class_recall": recall,
        "holdout_rows": len(y),
        "export_max_probability_gap": gap,
    }
    ctx.output("evaluation.json").write_text(json.dumps(doc, indent=2))
    ctx.metrics.update({k: v for k, v in doc.items() if isinstance(v, float)})
