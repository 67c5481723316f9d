"""`servo train`: the built-in pipeline plus the register step, which writes the model
version folder (model.onnx + servo.json) and registers it with its lineage."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrain.artifacts import open_store
from retrain.atomic import fsync_tree, rename_into_place
from retrain.digits import digits_pipeline
from retrain.pipeline import Runner, RunResult, file_hash
from retrain.stop import Stop
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
    """The servable version whose training run produced byte-identical model.onnx and
    profile.json, if any (a cached re-run must not register a copy)."""
    wanted = {o: result.steps["train"].hashes[o] for o in ("model.onnx", "profile.json")}
    for info in reversed(store.versions(name)):
        if info.run_id is None or info.run_id == result.run_id or not info.servable:
            continue
        outputs = {
            a["name"]: a["content_hash"]
            for a in store.run(info.run_id, recover=False)["artifacts"]
            if a["step"] == "train" and a["direction"] == "output"
        }
        if all(outputs.get(o) == h for o, h in wanted.items()):
            return info.version
    return None


def register(result: RunResult, store: RegistryStore, model_root: Path, name: str) -> Trained:
    """Register the run's model as a new version of `name`: the number is reserved first
    (not servable), the folder is written under a temporary name the run declares as its
    scratch, fsynced and renamed into place, and only then is the version published
    (URI, file hashes, servable) in one transaction. A kill at any point leaves either no
    version, or one the recovery check marks failed; never a servable half."""
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
        name, artifact_uri="", metrics=evaluation, run_id=result.run_id, servable=False
    )
    folder = (model_root / name / str(version)).resolve()
    tmp = folder.with_name(f".{version}.run-{result.run_id}.tmp")
    store.add_scratch(result.run_id, str(tmp))
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
    hashes = {p.name: file_hash(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    fsync_tree(tmp)
    if not rename_into_place(tmp, folder):
        raise RuntimeError(f"{folder} already exists: it belongs to no registered version")
    store.publish_version(name, version, folder.as_uri(), hashes)
    return Trained(version, folder, result, evaluation)


LEGACY_STEP_TMP = re.compile(r"^\.[0-9a-f]{64}\.(\d+)\.tmp$")
LEGACY_VERSION_TMP = re.compile(r"^\.(\d+)\.tmp$")


def sweep_legacy(store: RegistryStore, work: Path) -> list[Path]:
    """Remove the temporary folders that servo before run leases left when it was killed
    (`.KEY.RUN.tmp` beside step outputs, `.VERSION.tmp` beside version folders), once
    the recovery check has found their run dead or their version failed."""
    from registry.store import NotFound

    store.recover_runs()
    removed: list[Path] = []
    for path in (work / "pipeline" / "artifacts").glob("*/.*.tmp"):
        match = LEGACY_STEP_TMP.match(path.name)
        if match is None:
            continue
        try:
            status = store.run(int(match[1]), recover=False)["status"]
        except NotFound:
            status = None
        if status != "running":
            removed.append(path)
    for path in (work / "models").glob("*/.*.tmp"):
        match = LEGACY_VERSION_TMP.match(path.name)
        if match is None:
            continue
        try:
            failed = store.version(path.parent.name, int(match[1])).status == "failed"
        except NotFound:
            failed = True
        if failed:
            removed.append(path)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def train(
    store: RegistryStore,
    *, work: Path, name: str = "digits", params: dict[str, Any] | None = None,
    cache: bool = True, trigger: str = "manual", artifacts: str | None = None,
    triggered_by: str | None = None, stop: Stop | None = None,
    on_start: Callable[[int], None] | None = None,
) -> Trained:  # fmt: skip
    """Run the pipeline and register its model (within the run: a run that dies while
    registering is found by the recovery check); `artifacts` is the artifact store's URL
    (any fsspec URL; default: the work folder only). `trigger`: why it runs (manual, cron,
    accuracy_stall, ...); `triggered_by`: who asked for it by hand; `stop`: stops it on
    purpose (the run is marked interrupted, retrain.pipeline.Interrupted raised);
    `on_start(run_id)`: called once the run is recorded."""
    if not valid_name(name):  # before any work: a bad name must not cost (or record) a run
        raise ValueError(f"invalid model name {name!r} ({NAME_RULE})")
    sweep_legacy(store, work)
    runner = Runner(work / "pipeline", store, open_store(artifacts), stop=stop)
    champion = None
    champion_version = store.alias(name, "champion")
    if champion_version is not None:
        uri = store.version(name, champion_version).artifact_uri
        if uri.startswith("file://"):
            champion = Path(uri.removeprefix("file://")) / MODEL_FILE
    pipeline = digits_pipeline(params, champion if champion and champion.exists() else None)
    trained: list[Trained] = []

    def finalize(result: RunResult, scratch: Path) -> None:
        trained.append(register(result, store, work / "models", name))

    runner.run(
        pipeline, trigger=trigger, cache=cache, parameters=dict(params or {}), finalize=finalize,
        on_start=on_start, model=name, triggered_by=triggered_by,
    )  # fmt: skip
    return trained[0]
