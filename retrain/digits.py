"""The built-in pipeline: ingest -> split -> train -> evaluate (registration is added by
whoever runs it: `servo train`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retrain import steps
from retrain.pipeline import Pipeline, Step

#: pipeline parameters handed to the trainer (retrain.frameworks)
TRAINER_PARAMS = ("hidden", "max_iter", "epochs", "lr", "n_estimators", "max_depth",
                  "learning_rate")  # fmt: skip


def digits_pipeline(params: dict[str, Any] | None = None, champion: Path | None = None) -> Pipeline:
    """`params`: seed, holdout, framework (sklearn, sklearn-gbt, xgboost, torch, keras) and
    its parameters (hidden, max_iter, epochs, lr, n_estimators, max_depth, learning_rate);
    images (a folder of class subfolders, or a preprocessed .npz: train on it instead of
    the digits, with size "WxH" and mode L or RGB); and optionally payload_log_root (retrain on
    digits plus the gateway's labelled rows, and evaluate on the labelled rows of the last
    `production_window_s` seconds, default 7 days, as a second metric set). `champion`: the
    current champion's ONNX file, compared with the candidate on the same rows."""
    p = dict(params or {})
    seed = int(p.get("seed", 0))
    ingest_params: dict[str, Any] = {"dataset": "digits"}
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
    elif p.get("payload_log_root"):
        ingest_params = {"dataset": "digits+payload_log", "root": str(p["payload_log_root"]),
                         "model": str(p.get("model", "digits"))}  # fmt: skip
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
    reads_log = bool(p.get("payload_log_root"))
    pipeline = Pipeline("images" if p.get("images") else "digits")
    if reads_log:
        # the latest labelled production rows, a second evaluation set
        pipeline.add(Step("production", steps.production, ("production.npz",), params={
            "root": str(p["payload_log_root"]), "model": str(p.get("model", "digits")),
            "window_s": float(p.get("production_window_s", 7 * 86400)),
            "end": str(p.get("production_end", "")),
            # labels outside the classes are skipped and counted (digits: 0..9)
            **({} if p.get("images") else {"classes": 10}),
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
        .add(Step("train", steps.train, train_outputs,
                  {"train": "split.train.npz", "holdout": "split.holdout.npz"},
                  {"seed": seed, "framework": framework, **trainer_params}))
        .add(Step("evaluate", steps.evaluate, ("evaluation.json",), evaluate_inputs,
                  {"seed": seed}))
    )  # fmt: skip
