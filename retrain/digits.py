"""The built-in pipeline: ingest -> split -> train -> evaluate (registration is added by
whoever runs it: `servo train`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retrain import steps
from retrain.pipeline import Pipeline, Step


def digits_pipeline(params: dict[str, Any] | None = None, champion: Path | None = None) -> Pipeline:
    """`params`: seed, holdout, hidden, max_iter, and optionally payload_log_root (retrain on
    digits plus the gateway's labelled rows, and evaluate on the labelled rows of the last
    `production_window_s` seconds, default 7 days, as a second metric set). `champion`: the
    current champion's ONNX file, compared with the candidate on the same rows."""
    p = dict(params or {})
    seed = int(p.get("seed", 0))
    ingest_params: dict[str, Any] = {"dataset": "digits"}
    if p.get("payload_log_root"):
        ingest_params = {"dataset": "digits+payload_log", "root": str(p["payload_log_root"]),
                         "model": str(p.get("model", "digits"))}  # fmt: skip
    evaluate_inputs = {"model": "train.model.onnx", "holdout": "split.holdout.npz",
                       "framework": "train.framework.npz"}  # fmt: skip
    if champion is not None:
        evaluate_inputs["champion"] = f"file:{champion}"
    reads_log = bool(p.get("payload_log_root"))
    pipeline = Pipeline("digits")
    if reads_log:
        # the latest labelled production rows, a second evaluation set
        pipeline.add(Step("production", steps.production, ("production.npz",), params={
            "root": str(p["payload_log_root"]), "model": str(p.get("model", "digits")),
            "window_s": float(p.get("production_window_s", 7 * 86400)),
            "end": str(p.get("production_end", "")),
        }, cache=False))  # fmt: skip
        evaluate_inputs["production"] = "production.production.npz"
    return (
        pipeline
        # the payload log grows: reading it is never a cache hit (downstream steps are
        # cached by the content it produced)
        .add(Step("ingest", steps.ingest, ("data.npz",), params=ingest_params,
                  cache=not reads_log))
        .add(Step("split", steps.split, ("train.npz", "holdout.npz"), {"data": "ingest.data.npz"},
                  {"seed": seed, "holdout": float(p.get("holdout", 0.25))}))
        .add(Step("train", steps.train, ("model.onnx", "framework.npz", "profile.json"),
                  {"train": "split.train.npz", "holdout": "split.holdout.npz"},
                  {"seed": seed, "hidden": list(p.get("hidden", [64])),
                   "max_iter": int(p.get("max_iter", 300))}))
        .add(Step("evaluate", steps.evaluate, ("evaluation.json",), evaluate_inputs,
                  {"seed": seed}))
    )  # fmt: skip
