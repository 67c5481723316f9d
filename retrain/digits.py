"""The built-in pipeline: ingest -> split -> train -> evaluate (registration is added by
whoever runs it: `servo train`)."""

from __future__ import annotations

from typing import Any

from retrain import steps
from retrain.pipeline import Pipeline, Step


def digits_pipeline(params: dict[str, Any] | None = None) -> Pipeline:
    p = dict(params or {})
    seed = int(p.get("seed", 0))
    return (
        Pipeline("digits")
        .add(Step("ingest", steps.ingest, ("data.npz",), params={"dataset": "digits"}))
        .add(Step("split", steps.split, ("train.npz", "holdout.npz"), {"data": "ingest.data.npz"},
                  {"seed": seed, "holdout": float(p.get("holdout", 0.25))}))
        .add(Step("train", steps.train, ("model.onnx", "framework.npz", "profile.json"),
                  {"train": "split.train.npz", "holdout": "split.holdout.npz"},
                  {"seed": seed, "hidden": list(p.get("hidden", [64])),
                   "max_iter": int(p.get("max_iter", 300))}))
        .add(Step("evaluate", steps.evaluate, ("evaluation.json",),
                  {"model": "train.model.onnx", "holdout": "split.holdout.npz",
                   "framework": "train.framework.npz"}))
    )  # fmt: skip
