"""Built-in steps: ingest, split, train, evaluate. Artifacts are files: `.npz` arrays
(loaded with allow_pickle=False), ONNX models and JSON documents; nothing is pickled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrain.lazy import LazyModule
from retrain.pipeline import StepContext

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
else:  # imported by the first step that runs: a fully cached run never needs it
    np = LazyModule("numpy")


def _load(path: Any) -> dict[str, npt.NDArray[Any]]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


#: retraining defaults (pipeline params production_window_s, production_share,
#: production_holdout): the labelled rows of the last 7 days; of those, the newest 30% are
#: held out for evaluation; at most half of the training rows come from production
PRODUCTION_WINDOW_S = 7 * 86400.0
PRODUCTION_SHARE = 0.5
PRODUCTION_HOLDOUT = 0.3


def ingest(ctx: StepContext) -> None:
    """`dataset`: "digits" (scikit-learn's), "csv" (input `table` with a `label_column`),
    "payload_log" (the gateway's labelled rows for `model` under `root`, in the optional
    ISO `start`/`end` window), or "digits+payload_log" (both, for retraining). With a
    `production` input (the `production` step's training.npz: the window's labelled rows
    minus the held-out newest ones) the production rows come from it, not from the log,
    and at most `share` of the training rows are production rows (the newest kept)."""
    dataset = ctx.params.get("dataset", "digits")
    x = np.zeros((0, 0), dtype=np.float32)
    y: npt.NDArray[Any] = np.zeros(0, dtype=np.int64)
    if dataset in ("digits", "digits+payload_log"):
        from sklearn.datasets import load_digits

        digits = load_digits()
        x, y = digits.data.astype(np.float32), digits.target.astype(np.int64)
    if dataset == "digits+payload_log" and "production" in ctx.inputs:
        _mix_production(ctx, x, y)
        return
    if dataset in ("payload_log", "digits+payload_log"):
        import datetime as dt

        window = {
            k: dt.datetime.fromisoformat(ctx.params[k])
            for k in ("start", "end")
            if ctx.params.get(k)
        }
        classes: Any = ctx.params.get("classes")
        if classes is None and y.size:  # the digits' classes, 0..9
            classes = int(y.max()) + 1
        from retrain.labelled import read_labelled

        found = read_labelled(ctx.params["root"], ctx.params["model"],
                              ctx.params.get("input", "input"), **window, classes=classes,
                              width=x.shape[1] if x.size else None)  # fmt: skip
        found.record(ctx.metrics)
        px, py = found.x, found.y
        if len(py):
            x = px if x.size == 0 else np.concatenate([x, px])
            y = py if y.size == 0 else np.concatenate([y, py.astype(y.dtype)])
        elif dataset == "payload_log":
            unusable = sum(found.skipped.values())
            also = f" ({unusable} unusable rows skipped)" if unusable else ""
            raise ValueError(f"the payload log holds no labelled rows in that window{also}")
    elif dataset == "digits":
        pass
    elif dataset == "images":
        _ingest_images(ctx)
        return
    elif dataset in ("csv", "parquet"):
        _ingest_table(ctx, dataset)
        return
    else:
        raise ValueError(
            f"unknown dataset {dataset!r} (digits, csv, parquet, images, payload_log, "
            "digits+payload_log)"
        )
    if not np.isfinite(x).all():
        raise ValueError("the data holds NaN or Inf")
    np.savez(ctx.output("data.npz"), x=x, y=y)
    ctx.metrics["rows"] = float(len(y))


def _mix_production(ctx: StepContext, x: npt.NDArray[Any], y: npt.NDArray[Any]) -> None:
    """The reference rows plus the newest production training rows that keep production
    at most `share` of the rows; `ids` names each row's request ("" for reference rows)."""
    from retrain.labelled import production_cap

    rows = _load(ctx.inputs["production"])
    px, py, pids = rows["x"], rows["y"], rows["ids"]
    if len(py) and px.shape[1] != x.shape[1]:
        raise ValueError(f"production rows are {px.shape[1]} wide, the reference {x.shape[1]}")
    share = float(ctx.params.get("share", PRODUCTION_SHARE))
    cap = production_cap(len(y), share)
    keep = len(py) if cap is None else min(cap, len(py))
    start = len(py) - keep  # rows are in time order: the newest are kept
    px, py, pids = px[start:], py[start:], pids[start:]
    ids = np.concatenate([np.full(len(y), "", dtype=np.str_), pids.astype(np.str_)])
    x = np.concatenate([x, px.astype(x.dtype)]) if len(py) else x
    y = np.concatenate([y, py.astype(y.dtype)]) if len(py) else y
    if not np.isfinite(x).all():
        raise ValueError("the data holds NaN or Inf")
    np.savez(ctx.output("data.npz"), x=x, y=y, ids=ids)
    ctx.metrics.update({
        "rows": float(len(y)),
        "reference_rows": float(len(y) - keep),
        "production_rows_available": float(len(rows["y"])),
        "production_rows_used": float(keep),
        "production_rows_dropped": float(len(rows["y"]) - keep),
        "production_share_limit": share,
        "production_share_used": keep / len(y) if len(y) else 0.0,
    })  # fmt: skip


def _ingest_table(ctx: StepContext, kind: str) -> None:
    """A CSV or Parquet table (input `table`) with a `label_column`; the other columns are
    numeric features (`categorical_columns` among them hold integer category codes: the
    profile gives them top-K bins). Labels become class indices, their names `classes`."""
    if kind == "csv":
        import pyarrow.csv as pacsv

        table = pacsv.read_csv(ctx.inputs["table"])
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(ctx.inputs["table"])
    label = ctx.params["label_column"]
    if label not in table.column_names:
        raise ValueError(f"no label column {label!r} in {table.column_names}")
    features = [c for c in table.column_names if c != label]
    categorical = list(ctx.params.get("categorical_columns", []))
    unknown = sorted(set(categorical) - set(features))
    if unknown:
        raise ValueError(f"categorical column(s) {unknown} not among the features {features}")
    columns = []
    for name in features:
        column = table[name].to_numpy(zero_copy_only=False)
        if not np.issubdtype(column.dtype, np.number):
            raise ValueError(
                f"column {name!r} is not numeric ({column.dtype}); encode categories as "
                "integer codes and name the column in categorical_columns"
            )
        columns.append(column)
    x = np.column_stack(columns).astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError("the data holds NaN or Inf")
    names, y = np.unique(np.asarray(table[label].to_pylist()).astype(str), return_inverse=True)
    if all(n.lstrip("-").isdigit() for n in names):  # numeric labels keep their order
        order = np.argsort([int(n) for n in names])
        names, y = names[order], np.argsort(order)[y]
    codes = np.asarray([features.index(c) for c in categorical], dtype=np.int64)
    np.savez(ctx.output("data.npz"), x=x, y=y.astype(np.int64), classes=names,
             features=np.asarray(features), categorical=codes)  # fmt: skip
    ctx.metrics["rows"] = float(len(y))


def _ingest_images(ctx: StepContext) -> None:
    """Images in class subfolders (`root`: raw ones, or the uniform PNGs of `servo
    preprocess-images`), decoded, converted to `mode` (L or RGB, default L), resized to
    `size` ("WxH", default 28x28), scaled to [0, 1]; or the arrays of a preprocessed
    `.npz` (`root` a file), whose size and mode a given `size` or `mode` must match.
    Flattened to rows, with `image_shape` (H, W, C); labels are class indices, the class
    names (sorted) go along as `classes`. Corrupt files are skipped and counted."""
    from retrain.images import MODES, load_npz, mode_of, preprocess

    root = Path(ctx.params["root"])
    if root.is_file():
        result = load_npz(root)
        height, width = result.x.shape[1:3]
        size, mode = f"{width}x{height}", mode_of(result.x)
        wanted = {"size": ctx.params.get("size", size), "mode": ctx.params.get("mode", mode)}
        if (str(wanted["size"]).lower(), wanted["mode"]) != (size, mode):
            raise ValueError(
                f"{root} holds {size} {mode} images, not {wanted['size']} {wanted['mode']} "
                "(omit --size and --mode for a .npz, or preprocess again)"
            )
    else:
        size = str(ctx.params.get("size", "28x28")).lower()
        mode = str(ctx.params.get("mode", "L"))
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        try:
            width, height = (int(v) for v in size.split("x"))
        except ValueError:
            raise ValueError(f"size must be WIDTHxHEIGHT, got {size!r}") from None
        result = preprocess(root, (width, height), mode, workers=1)
    if len(result.y) == 0:
        raise ValueError(f"no readable images under {root} (images go in class subfolders)")
    names, y = np.unique(result.y, return_inverse=True)
    x = result.x.reshape(len(result.x), -1)
    np.savez(ctx.output("data.npz"), x=x, y=y.astype(np.int64), classes=names,
             image_shape=np.asarray(result.x.shape[1:], dtype=np.int64))  # fmt: skip
    ctx.metrics["rows"] = float(len(y))
    ctx.metrics["skipped_files"] = float(len(result.skipped))


def split(ctx: StepContext) -> None:
    from sklearn.model_selection import train_test_split

    data = _load(ctx.inputs["data"])
    x_train, x_test, y_train, y_test = train_test_split(
        data["x"], data["y"], test_size=float(ctx.params.get("holdout", 0.25)),
        random_state=int(ctx.params.get("seed", 0)), stratify=data["y"],
    )  # fmt: skip
    extra: dict[str, Any] = {
        k: data[k] for k in ("classes", "image_shape", "features", "categorical") if k in data
    }
    np.savez(ctx.output("train.npz"), x=x_train, y=y_train, **extra)
    np.savez(ctx.output("holdout.npz"), x=x_test, y=y_test, **extra)


def train(ctx: StepContext) -> None:
    """Fit a seeded classifier with the `framework` parameter's trainer (sklearn: the
    default MLP; sklearn-gbt, xgboost, torch, keras: see retrain.frameworks), export ONNX,
    write the framework's own holdout predictions (for the export check in evaluate) and
    the reference profile (bins from the training rows; output references from the
    holdout: live traffic is unseen data, and on its training rows a model is more
    confident than it will be live)."""
    from monitors.profile import fit as fit_profile
    from retrain import frameworks

    data, holdout = _load(ctx.inputs["train"]), _load(ctx.inputs["holdout"])
    seed = int(ctx.params.get("seed", 0))
    framework = str(ctx.params.get("framework", "sklearn"))
    names = _class_names(data)
    x = data["x"].astype(np.float32)
    top = float(np.abs(x).max()) if x.size else 1.0
    shape = tuple(int(d) for d in data["image_shape"]) if "image_shape" in data else None
    fitted = frameworks.fit(
        framework,
        frameworks.Data(
            x=x, y=data["y"].astype(np.int64), holdout=holdout["x"].astype(np.float32),
            classes=len(names), image_shape=shape,  # type: ignore[arg-type]
            scale=top if top > 1.0 else 1.0,
        ),
        seed,
        dict(ctx.params),
    )  # fmt: skip
    ctx.output("model.onnx").write_bytes(fitted.onnx)
    np.savez(ctx.output("framework.npz"), labels=fitted.labels,
             probabilities=fitted.probabilities)  # fmt: skip
    for name, content in fitted.files.items():
        ctx.output(name).write_bytes(content)
    profile = fit_profile(
        x, "input", labels=data["y"], probabilities=fitted.probabilities,
        predictions=fitted.labels,
        feature_names=[str(f) for f in data["features"]] if "features" in data else None,
        categorical=[int(j) for j in data["categorical"]] if "categorical" in data else (),
    )  # fmt: skip
    doc = {"profile": profile.to_json(), "classes": names, "framework": framework,
           "warnings": fitted.warnings}  # fmt: skip
    ctx.output("profile.json").write_text(json.dumps(doc))
    ctx.metrics["train_accuracy"] = fitted.train_accuracy
    ctx.metrics["training_warnings"] = float(len(fitted.warnings))


def _class_names(data: dict[str, npt.NDArray[Any]]) -> list[str]:
    """Labels are class indices 0..K-1; their names come with the data ("classes"), or
    are the indices themselves (scikit-learn's digits)."""
    if "classes" in data:
        return [str(c) for c in data["classes"].tolist()]
    y = data["y"]
    if y.size and (y.min() < 0 or not np.issubdtype(y.dtype, np.integer)):
        raise ValueError("labels must be class indices 0..K-1 (ingest maps names to indices)")
    return [str(i) for i in range(int(y.max()) + 1 if y.size else 0)]


def _classification_metrics(
    labels: npt.NDArray[Any], probabilities: npt.NDArray[Any], y: npt.NDArray[Any],
    classes: npt.NDArray[Any],
) -> dict[str, Any]:  # fmt: skip
    """Accuracy, macro-F1, per-class recall, log-loss and calibration error (10 bins)."""
    present = np.unique(y)
    recall = {str(c): float((labels[y == c] == c).mean()) for c in present}
    precision = {str(c): float((y[labels == c] == c).mean()) if (labels == c).any() else 0.0
                 for c in present}  # fmt: skip
    f1 = [2 * precision[k] * recall[k] / (precision[k] + recall[k]) if precision[k] + recall[k]
          else 0.0 for k in recall]  # fmt: skip
    column = np.searchsorted(classes, y)
    known = (column < len(classes)) & (classes[np.minimum(column, len(classes) - 1)] == y)
    picked = np.where(
        known, probabilities[np.arange(len(y)), np.minimum(column, len(classes) - 1)], 0.0
    )
    confidence = probabilities.max(axis=1)
    bins = np.minimum((confidence * 10).astype(int), 9)
    ece = sum(
        abs(float((labels[bins == b] == y[bins == b]).mean()) - float(confidence[bins == b].mean()))
        * float((bins == b).mean())
        for b in range(10) if (bins == b).any()
    )  # fmt: skip
    return {
        "accuracy": float((labels == y).mean()),
        "macro_f1": float(np.mean(f1)),
        "log_loss": float(-np.mean(np.log(np.clip(picked, 1e-15, 1.0)))),
        "calibration_error": float(ece),
        "per_class_recall": recall,
    }


def production(ctx: StepContext) -> None:
    """The labelled production rows of the last `window_s` seconds before `end` (ISO;
    default now): the gateway's payload log joined with its feedback, in time order. The
    newest `holdout` fraction of them (whole requests) goes to `production.npz`, the
    evaluation set the candidate never trains on; the older ones to `training.npz` (what
    the `ingest` step may train on). Both carry each row's request id. Not cached (the log
    grows): downstream steps are cached by these outputs' content."""
    import datetime as dt

    from retrain.labelled import read_labelled, split_newest

    end = dt.datetime.fromisoformat(ctx.params["end"]) if ctx.params.get("end") else None
    end = end or dt.datetime.now(dt.UTC)
    window_s = float(ctx.params.get("window_s", PRODUCTION_WINDOW_S))
    if not window_s > 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    start = end - dt.timedelta(seconds=window_s)
    found = read_labelled(
        ctx.params["root"], ctx.params["model"], ctx.params.get("input", "input"), start, end,
        classes=ctx.params.get("classes"), width=ctx.params.get("width"),
    )  # fmt: skip
    older, newest = split_newest(found, float(ctx.params.get("holdout", PRODUCTION_HOLDOUT)))
    np.savez(ctx.output("production.npz"), x=newest.x, y=newest.y, ids=newest.ids,
             start=start.isoformat(), end=end.isoformat(), window_rows=len(found.y))  # fmt: skip
    np.savez(ctx.output("training.npz"), x=older.x, y=older.y, ids=older.ids)
    found.record(ctx.metrics)
    ctx.metrics.update({
        "production_window_s": window_s,
        "production_holdout_rows": float(len(newest.y)),
        "production_training_rows": float(len(older.y)),
    })  # fmt: skip


def evaluate(ctx: StepContext) -> None:
    """Holdout metrics of the ONNX model, and the export check against the framework:
    the same classes, probabilities within 1e-4; a mismatch fails the step. With a
    `production` input, the same metrics on the latest labelled production rows (a second
    metric set); with a `champion`, a paired comparison on each set."""
    import onnxruntime as ort

    holdout, framework = _load(ctx.inputs["holdout"]), _load(ctx.inputs["framework"])
    session = ort.InferenceSession(str(ctx.inputs["model"]), providers=["CPUExecutionProvider"])
    labels, probabilities = session.run(None, {"input": as_input(session, holdout["x"])})
    if not np.array_equal(labels, framework["labels"]):
        raise ValueError("ONNX export predicts other classes than the framework")
    gap = float(np.abs(probabilities - framework["probabilities"]).max())
    if gap > 1e-4:
        raise ValueError(f"ONNX probabilities differ from the framework's by {gap:.2e}")
    y = holdout["y"]
    classes = np.unique(y)
    doc: dict[str, Any] = {
        **_classification_metrics(labels, probabilities, y, classes),
        "holdout_rows": len(y),
        "export_max_probability_gap": gap,
    }
    champion = None
    if "champion" in ctx.inputs:
        champion = ort.InferenceSession(
            str(ctx.inputs["champion"]), providers=["CPUExecutionProvider"]
        )
        champion_labels = champion.run(None, {"input": as_input(champion, holdout["x"])})[0]
        doc["comparison"] = compare(
            labels == y, champion_labels == y, int(ctx.params.get("seed", 0))
        )
    if "production" in ctx.inputs:
        rows = _load(ctx.inputs["production"])
        window = {"start": str(rows["start"]), "end": str(rows["end"])}
        px, py = rows["x"], rows["y"]
        # the held-out newest rows of the window (never trained on)
        live: dict[str, Any] = {"rows": len(py), **window}
        if "window_rows" in rows:
            live["window_rows"] = int(rows["window_rows"])
        if len(py):
            p_labels, p_probabilities = session.run(
                None, {"input": as_input(session, px.astype(np.float32))}
            )
            live.update(_classification_metrics(p_labels, p_probabilities, py, classes))
            if champion is not None:
                c_feed = {"input": as_input(champion, px.astype(np.float32))}
                c_labels = champion.run(None, c_feed)[0]
                live["comparison"] = compare(
                    p_labels == py, c_labels == py, int(ctx.params.get("seed", 0))
                )
            ctx.metrics["production_accuracy"] = live["accuracy"]
        doc["production"] = live
    ctx.output("evaluation.json").write_text(json.dumps(doc, indent=2))
    ctx.metrics.update({k: v for k, v in doc.items() if isinstance(v, float)})


def as_input(session: Any, rows: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Flattened rows in the shape of the session's input: [N, H, W, C] for an image
    model, unchanged for a model of rows."""
    shape = session.get_inputs()[0].shape
    if len(shape) > 2 and all(isinstance(d, int) and d > 0 for d in shape[1:]):
        return rows.reshape(len(rows), *shape[1:])
    return rows


def compare(candidate: npt.NDArray[Any], champion: npt.NDArray[Any], seed: int = 0,
            resamples: int = 2000) -> dict[str, Any]:  # fmt: skip
    """Paired comparison on the same rows (True = correct): McNemar's exact test and a
    bootstrap 95% interval of the accuracy difference (candidate - champion)."""
    from scipy.stats import binomtest

    candidate, champion = np.asarray(candidate, bool), np.asarray(champion, bool)
    only_candidate = int((candidate & ~champion).sum())
    only_champion = int((~candidate & champion).sum())
    discordant = only_candidate + only_champion
    p_value = 1.0 if discordant == 0 else float(binomtest(only_candidate, discordant, 0.5).pvalue)
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(candidate), size=(resamples, len(candidate)))
    differences = candidate[index].mean(axis=1) - champion[index].mean(axis=1)
    low, high = np.quantile(differences, [0.025, 0.975])
    return {
        "candidate_accuracy": float(candidate.mean()),
        "champion_accuracy": float(champion.mean()),
        "difference": float(candidate.mean() - champion.mean()),
        "difference_ci95": [float(low), float(high)],
        "mcnemar_p_value": p_value,
        "only_candidate_correct": only_candidate,
        "only_champion_correct": only_champion,
        "rows": len(candidate),
    }


#: the step functions a container may run by name (`servo step --function NAME`)
STEP_FUNCTIONS = {fn.__name__: fn for fn in (ingest, split, train, evaluate, production)}

__all__ = ["STEP_FUNCTIONS", "compare", "evaluate", "ingest", "production", "split", "train"]
