"""The built-in pipeline: ingest -> split -> train -> evaluate (registration is added by
whoever runs it: `servo train`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from retrain import steps
from retrain.pipeline import Pipeline, Step

#: pipeline parameters handed to the trainer (retrain.frameworks)
TRAINER_PARAMS = ("hidden", "max_iter", "epochs", "lr", "n_estimators", "max_depth",
                  "learning_rate")  # fmt: skip


def production_params(p: dict[str, Any]) -> dict[str, float]:
    """The retrain dataset's parameters, checked: `production_window_s` (> 0, default 7
    days), `production_share` and `production_holdout` (fractions in [0, 1])."""
    values = {
        "production_window_s": p.get("production_window_s", steps.PRODUCTION_WINDOW_S),
        "production_share": p.get("production_share", steps.PRODUCTION_SHARE),
        "production_holdout": p.get("production_holdout", steps.PRODUCTION_HOLDOUT),
    }
    checked: dict[str, float] = {}
    for key, value in values.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (math.isfinite(value))
        ):
            raise ValueError(f"{key} must be a finite number, got {value!r}")
        if key == "production_window_s" and not value > 0:
            raise ValueError(f"{key} must be > 0, got {value!r}")
        if key != "production_window_s" and not 0 <= value <= 1:
            raise ValueError(f"{key} must be within [0, 1], got {value!r}")
        checked[key] = float(value)
    return checked


def digits_pipeline(params: dict[str, Any] | None = None, champion: Path | None = None) -> Pipeline:
    """`params`: seed, holdout, framework (sklearn, sklearn-gbt, xgboost, torch, keras) and
    its parameters (hidden, max_iter, epochs, lr, n_estimators, max_depth, learning_rate);
    images (a folder of class subfolders, or a preprocessed .npz: train on it instead of
    the digits, with size "WxH" and mode L or RGB); and optionally payload_log_root: retrain
    on digits plus the gateway's labelled rows of the last `production_window_s` seconds
    (default 7 days, before `production_end`, default now) whose newest
    `production_holdout` fraction (default 0.3) is held out as a second evaluation set and
    never trained on, with at most `production_share` (default 0.5) of the training rows
    from production (the newest kept). `champion`: the current champion's ONNX file,
    compared with the candidate on the same rows."""
    p = dict(params or {})
    seed = int(p.get("seed", 0))
    ingest_params: dict[str, Any] = {"dataset": "digits"}
    ingest_inputs: dict[str, str] = {}
    reads_log = bool(p.get("payload_log_root"))
    if reads_log and p.get("images"):
        raise ValueError("payload_log_root retrains the digits model: not with images")
    if p.get("images"):
        # a folder (resized to size, default 28x28, in mode, default L), or a .npz (used as
        # it is; a size or mode given must match it)
        from retrain.images import folder_digest

        ingest_params = {
            "dataset": "images", "root": str(p["images"]),
            **{k: str(p[k]) for k in ("size", "mode") if p.get(k)},
            # the folder's content is the step's input: a changed image re-runs it
            "content": folder_digest(Path(p["images"])),
        }  # fmt: skip
    elif reads_log:
        window = production_params(p)
        # the production rows come from the production step (which holds out the newest):
        # one read of the log, so training and evaluation split the same rows
        ingest_params = {"dataset": "digits+payload_log", "share": window["production_share"]}
        ingest_inputs = {"production": "production.training.npz"}
    evaluate_inputs = {"model": "train.model.onnx", "holdout": "split.holdout.npz",
                       "framework": "train.framework.npz"}  # fmt: skip
    if champion is not None:
        evaluate_inputs["champion"] = f"file:{champion}"
    framework = str(p.get("framework", "sklearn"))
    train_outputs: tuple[str, ...] = ("model.onnx", "framework.npz", "profile.json")
    if framework == "keras":
        train_outputs += ("saved_model.zip",)  # the TensorFlow SavedModel, kept as an artifact
    trainer_params = {k: p[k] for k in TRAINER_PARAMS if k in p}
    if framework == "sklearn":
        trainer_params = {"hidden": list(p.get("hidden", [64])),
                          "max_iter": int(p.get("max_iter", 300)), **trainer_params}  # fmt: skip
    pipeline = Pipeline("images" if p.get("images") else "digits")
    if reads_log:
        # the labelled production rows of the window: the newest held out (evaluation),
        # the older ones for training. The payload log grows: reading it is never a cache
        # hit (downstream steps are cached by the content it produced)
        pipeline.add(Step("production", steps.production, ("production.npz", "training.npz"),
                          params={
            "root": str(p["payload_log_root"]), "model": str(p.get("model", "digits")),
            "window_s": window["production_window_s"],
            "holdout": window["production_holdout"],
            "end": str(p.get("production_end", "")),
            # labels outside the classes are skipped and counted (digits: 0..9), and so are
            # inputs of another width
            "classes": 10, "width": 64,
        }, cache=False))  # fmt: skip
        evaluate_inputs["production"] = "production.production.npz"
    return (
        pipeline
        .add(Step("ingest", steps.ingest, ("data.npz",), ingest_inputs, ingest_params))
        .add(Step("split", steps.split, ("train.npz", "holdout.npz"), {"data": "ingest.data.npz"},
                  {"seed": seed, "holdout": float(p.get("holdout", 0.25))}))
        .add(Step("train", steps.train, train_outputs,
                  {"train": "split.train.npz", "holdout": "split.holdout.npz"},
                  {"seed": seed, "framework": framework, **trainer_params}))
        .add(Step("evaluate", steps.evaluate, ("evaluation.json",), evaluate_inputs,
                  {"seed": seed}))
    )  # fmt: skip
