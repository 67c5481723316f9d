"""`servo train`: the built-in pipeline plus the register step, which writes the model
version folder (model.onnx + servo.json) and registers it with its lineage."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrain.artifacts import open_store
from retrain.digits import digits_pipeline
from retrain.pipeline import Runner, RunResult
from serving.model_folder import MODEL_FILE, NAME_RULE, ModelCard, valid_name, write_card

if TYPE_CHECKING:
    from registry.store import RegistryStore


@dataclass(frozen=True)
class Trained:
    version: int
    folder: Path
    run: RunResult
    metrics: dict[str, Any]
    #: an earlier version with the same model and profile (nothing new was registered)
    reused: bool = False


def _same_model(store: RegistryStore, name: str, result: RunResult) -> int | None:
    """The registered version whose training run produced byte-identical model.onnx and
    profile.json, if any (a cached re-run must not register a copy)."""
    wanted = {o: result.steps["train"].hashes[o] for o in ("model.onnx", "profile.json")}
    for info in reversed(store.versions(name)):
        if info.run_id is None or info.run_id == result.run_id or not info.artifact_uri:
            continue
        outputs = {
            a["name"]: a["content_hash"]
            for a in store.run(info.run_id)["artifacts"]
            if a["step"] == "train" and a["direction"] == "output"
        }
        if all(outputs.get(o) == h for o, h in wanted.items()):
            return info.version
    return None


def register(result: RunResult, store: RegistryStore, model_root: Path, name: str) -> Trained:
    if not valid_name(name):
        raise ValueError(f"invalid model name {name!r} ({NAME_RULE})")
    evaluation = json.loads(result.output("evaluate", "evaluation.json").read_text())
    extra = json.loads(result.output("train", "profile.json").read_text())
    model_path = result.output("train", "model.onnx")
    existing = _same_model(store, name, result)
    if existing is not None:
        folder = Path(urllib.parse.urlparse(store.version(name, existing).artifact_uri).path)
        return Trained(existing, folder, result, evaluation, reused=True)
    import onnx  # only for a new version: a cached re-run that registers nothing skips it

    from serving import signature

    version = store.register_version(
        name, artifact_uri="", metrics=evaluation, run_id=result.run_id
    )
    folder = model_root / name / str(version)
    tmp = folder.with_name(f".{version}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copyfile(model_path, tmp / MODEL_FILE)
    proto = onnx.load(str(tmp / MODEL_FILE))
    write_card(
        tmp,
        ModelCard(
            name=name,
            version=str(version),
            framework=str(extra.get("framework", "sklearn")),
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            signature=signature.from_onnx(proto),
            class_labels=extra["classes"],
            metrics={k: v for k, v in evaluation.items() if isinstance(v, float)},
            reference_profile=extra["profile"],
        ),
    )
    tmp.rename(folder)
    store.set_artifact_uri(name, version, folder.resolve().as_uri())
    return Trained(version, folder, result, evaluation)


def train(
    store: RegistryStore,
    *, work: Path, name: str = "digits", params: dict[str, Any] | None = None,
    cache: bool = True, trigger: str = "manual", artifacts: str | None = None,
) -> Trained:  # fmt: skip
    """Run the pipeline and register its model; `artifacts` is the artifact store's URL
    (any fsspec URL; default: the work folder only)."""
    if not valid_name(name):  # before any work: a bad name must not cost (or record) a run
        raise ValueError(f"invalid model name {name!r} ({NAME_RULE})")
    runner = Runner(work / "pipeline", store, open_store(artifacts))
    champion = None
    champion_version = store.alias(name, "champion")
    if champion_version is not None:
        uri = store.version(name, champion_version).artifact_uri
        if uri.startswith("file://"):
            champion = Path(uri.removeprefix("file://")) / MODEL_FILE
    pipeline = digits_pipeline(params, champion if champion and champion.exists() else None)
    result = runner.run(pipeline, trigger=trigger, cache=cache, parameters=dict(params or {}))
    return register(result, store, work / "models", name)
