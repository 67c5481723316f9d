"""`servo train`: the built-in pipeline plus the register step, which writes the model
version folder (model.onnx + servo.json) and registers it with its lineage."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import shutil
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from retrain.artifacts import open_store
from retrain.atomic import fsync_tree, rename_into_place
from retrain.digits import digits_pipeline
from retrain.pipeline import Runner, RunResult, StepResult, file_hash
from retrain.stop import Stop
from serving.model_folder import MODEL_FILE, NAME_RULE, ModelCard, valid_name, write_card

if TYPE_CHECKING:
    from registry.lite import LiteRegistry
    from registry.store import RegistryStore
    from retrain.pipeline import StepExecutor
    from servo.settings import Settings

log = logging.getLogger("servo")


@dataclass(frozen=True)
class Trained:
    version: int
    folder: Path
    run: RunResult
    metrics: dict[str, Any]
    #: an earlier version with the same model and profile (nothing new was registered)
    reused: bool = False


class _Version(Protocol):
    @property
    def version(self) -> int: ...
    @property
    def run_id(self) -> int | None: ...
    @property
    def servable(self) -> bool: ...
    @property
    def artifact_uri(self) -> str: ...


class _Registry(Protocol):
    """What registering a re-run reads: RegistryStore, or the fast path's LiteRegistry."""

    def alias(self, model: str, alias: str) -> int | None: ...
    def version(self, model: str, version: int) -> _Version: ...
    def versions(self, model: str) -> Sequence[_Version]: ...
    def run(self, run_id: int, recover: bool = ...) -> dict[str, Any]: ...


def _same_model(store: _Registry, name: str, train: StepResult, run_id: int | None) -> int | None:
    """The servable version whose training run produced byte-identical model.onnx and
    profile.json (the `train` step's outputs), if any (a cached re-run must not register
    a copy); the versions of run `run_id` (the run registering) do not count."""
    wanted = {o: train.hashes[o] for o in ("model.onnx", "profile.json")}
    for info in reversed(store.versions(name)):
        if info.run_id is None or info.run_id == run_id or not info.servable:
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
    existing = _same_model(store, name, result.steps["train"], result.run_id)
    if existing is not None:
        folder = _version_folder(store, name, existing)
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


def _version_folder(store: _Registry, name: str, version: int) -> Path:
    return Path(urllib.parse.urlparse(store.version(name, version).artifact_uri).path)


LEGACY_STEP_TMP = re.compile(r"^\.[0-9a-f]{64}\.(\d+)\.tmp$")
LEGACY_VERSION_TMP = re.compile(r"^\.(\d+)\.tmp$")


def _legacy_tmp(work: Path) -> Iterator[tuple[str, Path, int]]:
    """("step", folder, its run id) and ("version", folder, its version number) of the
    temporary folders servo before run leases named."""
    for kind, parent, pattern in (("step", work / "pipeline" / "artifacts", LEGACY_STEP_TMP),
                                  ("version", work / "models", LEGACY_VERSION_TMP)):  # fmt: skip
        for path in parent.glob("*/.*.tmp"):
            match = pattern.match(path.name)
            if match is not None:
                yield kind, path, int(match[1])


def sweep_legacy(store: RegistryStore, work: Path) -> list[Path]:
    """Remove the temporary folders that servo before run leases left when it was killed
    (`.KEY.RUN.tmp` beside step outputs, `.VERSION.tmp` beside version folders), once
    the recovery check has found their run dead or their version failed."""
    from registry.store import NotFound

    store.recover_runs()
    removed: list[Path] = []
    for kind, path, number in _legacy_tmp(work):
        if kind == "step":
            try:
                status = store.run(number, recover=False)["status"]
            except NotFound:
                status = None
            if status != "running":
                removed.append(path)
            continue
        try:
            failed = store.version(path.parent.name, number).status == "failed"
        except NotFound:
            failed = True
        if failed:
            removed.append(path)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def step_executor(settings: Settings, work: Path, api_client: Any = None) -> StepExecutor | None:
    """Where a retrain's steps run: None (`SERVO_STEPS=local`) in this process; with
    `SERVO_STEPS=kubernetes` each step that runs (not a cache hit) as a Job of
    `SERVO_K8S_JOB_IMAGE` in `SERVO_K8S_NAMESPACE`, with the claim `SERVO_K8S_JOB_CLAIM`
    mounted at `work`'s path, where it is mounted here too (so the paths the runner hands
    a step are the pod's)."""
    if settings.steps != "kubernetes":
        return None
    from retrain.k8s_jobs import JobRunner, JobStepExecutor

    if api_client is None:
        from kubernetes import client

        from servo.deploy import load_kube_config

        load_kube_config()
        api_client = client.ApiClient()
    jobs = JobRunner(
        namespace=settings.k8s_namespace, image=settings.k8s_job_image,
        claim=settings.k8s_job_claim, mount_path=str(work.resolve()),
        service_account=settings.k8s_job_service_account or None, api_client=api_client,
    )  # fmt: skip
    return JobStepExecutor(jobs, timeout_s=settings.k8s_job_timeout_s)


def train(
    store: RegistryStore,
    *, work: Path, name: str = "digits", params: dict[str, Any] | None = None,
    cache: bool = True, trigger: str = "manual", artifacts: str | None = None,
    triggered_by: str | None = None, stop: Stop | None = None,
    on_start: Callable[[int], None] | None = None, executor: StepExecutor | None = None,
) -> Trained:  # fmt: skip
    """Run the pipeline and register its model (within the run: a run that dies while
    registering is found by the recovery check); `artifacts` is the artifact store's URL
    (any fsspec URL; default: the work folder only). `trigger`: why it runs (manual, cron,
    accuracy_stall, ...); `triggered_by`: who asked for it by hand; `stop`: stops it on
    purpose (the run is marked interrupted, retrain.pipeline.Interrupted raised);
    `on_start(run_id)`: called once the run is recorded; `executor`: where the steps run
    (`step_executor`; None: here)."""
    if not valid_name(name):  # before any work: a bad name must not cost (or record) a run
        raise ValueError(f"invalid model name {name!r} ({NAME_RULE})")
    sweep_legacy(store, work)
    runner = Runner(work / "pipeline", store, open_store(artifacts), stop=stop, executor=executor)
    pipeline = digits_pipeline(params, _champion_model(store, name, store.alias(name, "champion")))
    trained: list[Trained] = []

    def finalize(result: RunResult, scratch: Path) -> None:
        trained.append(register(result, store, work / "models", name))

    runner.run(
        pipeline, trigger=trigger, cache=cache, parameters=dict(params or {}), finalize=finalize,
        on_start=on_start, model=name, triggered_by=triggered_by,
    )  # fmt: skip
    return trained[0]


def _champion_model(store: _Registry, name: str, champion: int | None) -> Path | None:
    """The champion's model.onnx (evaluated beside the candidate) if it is a local file."""
    if champion is None:
        return None
    uri = store.version(name, champion).artifact_uri
    path = Path(uri.removeprefix("file://")) / MODEL_FILE if uri.startswith("file://") else None
    return path if path is not None and path.exists() else None


def train_cached(
    registry_url: str,
    *, work: Path, name: str = "digits", params: dict[str, Any] | None = None,
    trigger: str = "manual", artifacts: str | None = None,
    trace: Callable[[str], None] | None = None,
) -> Trained | None:  # fmt: skip
    """The fast path of `train`: a fully cached re-run recorded without SQLAlchemy
    (registry.lite). It applies only when the registry is a SQLite file at the migration
    head, the recovery check has nothing to do, no legacy temporary folder is left, every
    step is a cache hit and a servable version with the same model exists; then it records
    the run (rows as `train` records them) and returns what `train` would. Otherwise, or
    on anything unexpected, it writes nothing and answers None: call `train`. `trace`:
    called with each SQL statement (tests)."""
    from registry.lite import LiteRegistry

    if not valid_name(name) or next(_legacy_tmp(work), None) is not None:
        return None
    lite = LiteRegistry.open(registry_url, trace=trace)
    if lite is None:
        return None
    try:
        return _record_cached(lite, work=work, name=name, params=params, trigger=trigger,
                              artifacts=artifacts)  # fmt: skip
    except Exception as exc:  # never a wrong record: the normal path decides
        log.debug("cached re-run: fast path not taken: %s: %s", type(exc).__name__, exc)
        return None
    finally:
        lite.close()


def _record_cached(
    lite: LiteRegistry,
    *, work: Path, name: str, params: dict[str, Any] | None, trigger: str,
    artifacts: str | None,
) -> Trained | None:  # fmt: skip
    from registry.lite import FinishedRun

    started = dt.datetime.now(dt.UTC)
    why = lite.recovery_needed()
    if why is not None:
        log.debug("cached re-run: fast path not taken: %s", why)
        return None
    champion = lite.alias(name, "champion")
    pipeline = digits_pipeline(params, _champion_model(lite, name, champion))
    plan = Runner(work / "pipeline", None, open_store(artifacts)).plan(pipeline)
    if plan is None:
        return None
    train = plan.results["train"]
    existing = _same_model(lite, name, train, None)
    if existing is None:
        return None
    evaluation = json.loads(plan.results["evaluate"].outputs["evaluation.json"].read_text())
    json.loads(train.outputs["profile.json"].read_text())  # as `register` reads it
    folder = _version_folder(lite, name, existing)

    def unchanged() -> bool:  # under the write lock: what the plan was built on still holds
        return lite.alias(name, "champion") == champion and (
            _same_model(lite, name, train, None) == existing
        )

    # the model it trains, as the normal path's Runner.run -> start_run records it (a cached
    # re-run from the CLI was triggered by no token: triggered_by stays None)
    run = FinishedRun(plan.pipeline, trigger, dict(params or {}), started, model=name)
    run_id = lite.record_finished_run(run, plan.records, unchanged)
    if run_id is None:
        return None
    # recorded: nothing below may fail (the caller would record the run a second time)
    return Trained(existing, folder, RunResult(run_id, "succeeded", plan.results), evaluation,
                   reused=True)  # fmt: skip
