"""A small pipeline engine: typed steps in a DAG, content-addressed caching, lineage.

A step is a Python function with declared inputs (upstream outputs or source files),
outputs (files it writes) and parameters. Its cache key is the hash of its code, its
parameters and the content hashes of its inputs (not their names or paths), so a re-run
with nothing changed reuses every output, and changing one input byte re-runs exactly the
steps downstream of it. Every run, step, artifact (content hash and size), parameter,
metric, duration and log is recorded in the registry. A step that raises (after its
retries) fails the run: nothing downstream runs.

Crashes and concurrent runs: a run works in its own scratch folder
(`<root>/tmp/run-<token>.tmp`, declared in the registry before it exists, removed when the
run ends or is found dead) and publishes each step's outputs with one atomic rename into
`<root>/artifacts/<step>/<key>/`. A published folder is complete (outputs and manifest
fsynced first) and is never removed or replaced while it is complete, so two runs on one
folder never delete what the other reads: when both computed a key, the first rename wins
and the other uses it (or, with different bytes, keeps its own beside it). While it runs,
a thread renews the run's lease in the registry every `heartbeat_s`.

Stopping a run on purpose (a `Stop` handed to the runner): between steps the run ends
before its next step; inside a step function, a signal handler of the main thread
(`Stop.interrupt`) raises `Interrupted` there. Either way the run is marked "interrupted"
and whatever it reserved but did not publish is failed. Registering (`finalize`) is never
cut short: a stop asked for meanwhile lets it complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import shutil
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from retrain.artifacts import ArtifactStore
from retrain.atomic import fsync_tree, rename_into_place
from retrain.stop import Interrupted, Stop

log = logging.getLogger("servo.retrain")


class LineageSink(Protocol):
    """Where runs are recorded (the registry store)."""

    def start_run(
        self,
        pipeline: str,
        trigger: str,
        parameters: dict[str, Any],
        scratch: list[str] | None = None,
        *,
        model: str | None = None,
        triggered_by: str | None = None,
    ) -> int: ...

    def heartbeat(self, run_id: int) -> bool: ...

    def finish_run(self, run_id: int, status: str, error: str | None = None) -> None: ...

    def record_step(self, run_id: int, step: str, **fields: Any) -> None: ...

    def record_artifact(self, run_id: int, step: str, **fields: Any) -> None: ...


class PipelineError(Exception):
    pass


class StepFailed(PipelineError):
    def __init__(self, step: str, error: str):
        super().__init__(f"step '{step}' failed: {error}")
        self.step = step
        self.error = error


class StepExecutionError(PipelineError):
    """A step that ran elsewhere (an executor) failed; `log` is its log there."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(message)
        self.log = log


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


@dataclass
class StepContext:
    """What a step function gets: its input files, its output paths, its metrics."""

    inputs: dict[str, Path]
    params: dict[str, Any]
    out_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)

    def output(self, name: str) -> Path:
        return self.out_dir / name


StepFn = Callable[[StepContext], None]


@dataclass(frozen=True)
class Step:
    name: str
    fn: StepFn
    outputs: tuple[str, ...]
    #: input name -> "step.output" (an upstream output) or "file:PATH" (a source file)
    inputs: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    cache: bool = True
    retries: int = 0

    def code_version(self) -> str:
        try:
            source = inspect.getsource(self.fn)
        except (OSError, TypeError):
            source = f"{self.fn.__module__}.{self.fn.__qualname__}"
        return hashlib.sha256(source.encode()).hexdigest()

    def upstream(self) -> set[str]:
        return {ref.split(".", 1)[0] for ref in self.inputs.values() if not ref.startswith("file:")}


class StepExecutor(Protocol):
    """Runs one step function somewhere else (a Kubernetes Job): its inputs at
    `context.inputs`, its outputs written to `context.output(name)`, both on storage it
    shares with the runner. Returns the step's log; raises (StepExecutionError with the
    log) when the step failed."""

    def __call__(self, run_id: int, step: Step, context: StepContext) -> str: ...


@dataclass
class Pipeline:
    name: str
    steps: list[Step] = field(default_factory=list)

    def add(self, step: Step) -> Pipeline:
        if any(s.name == step.name for s in self.steps):
            raise PipelineError(f"step '{step.name}' is defined twice")
        self.steps.append(step)
        return self

    def order(self) -> list[Step]:
        """Topological order (stable: definition order among ready steps)."""
        by_name = {s.name: s for s in self.steps}
        for step in self.steps:
            for ref in step.inputs.values():
                if ref.startswith("file:"):
                    continue
                upstream, _, output = ref.partition(".")
                if upstream not in by_name or output not in by_name[upstream].outputs:
                    raise PipelineError(f"step '{step.name}': input {ref!r} names no output")
        done: list[Step] = []
        names: set[str] = set()
        pending = list(self.steps)
        while pending:
            ready = [s for s in pending if s.upstream() <= names]
            if not ready:
                raise PipelineError(f"cycle among steps {[s.name for s in pending]}")
            for step in ready:
                done.append(step)
                names.add(step.name)
                pending.remove(step)
        return done


@dataclass
class StepResult:
    status: str  # succeeded, cached, failed
    outputs: dict[str, Path]
    hashes: dict[str, str]
    cache_key: str
    duration_s: float
    attempts: int = 1


@dataclass
class RunResult:
    run_id: int
    status: str
    steps: dict[str, StepResult]

    def output(self, step: str, name: str) -> Path:
        return self.steps[step].outputs[name]


@dataclass(frozen=True)
class StepRecord:
    """What a run records of one step: the `LineageSink.record_step` fields, then one
    `record_artifact` field set per input and output, in that order."""

    step: str
    fields: dict[str, Any]
    artifacts: list[dict[str, Any]]


@dataclass(frozen=True)
class Plan:
    """A dry run (`Runner.plan`) in which every step is a cache hit: the results a run
    would return and the records it would write, in order."""

    pipeline: str
    results: dict[str, StepResult]
    records: list[StepRecord]


@dataclass(frozen=True)
class _Lookup:
    inputs: dict[str, Path]
    input_hashes: dict[str, str]
    key: str
    final: Path
    #: outputs, their hashes and the metrics of a complete published folder for the key
    hit: tuple[dict[str, Path], dict[str, str], dict[str, float]] | None


#: how often a running run renews its lease in the registry (registry.runs: LEASE_S)
HEARTBEAT_S = 15.0


class _Heartbeat:
    """Renews a run's lease from a daemon thread until stopped."""

    def __init__(self, sink: LineageSink, run_id: int, every_s: float):
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, args=(sink, run_id, every_s), name=f"heartbeat-{run_id}",
            daemon=True,
        )  # fmt: skip
        self._thread.start()

    def _beat(self, sink: LineageSink, run_id: int, every_s: float) -> None:
        while not self._stopped.wait(every_s):
            try:
                if not sink.heartbeat(run_id):
                    log.error("pipeline run %d is no longer running in the registry", run_id)
                    return
            except Exception as exc:  # the registry is away: the next beat may get through
                log.warning("heartbeat of pipeline run %d not recorded: %s", run_id, exc)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


class Runner:
    """Runs pipelines against a local artifact folder, recording lineage in `sink`; with a
    `store` (retrain.artifacts: any fsspec URL) outputs are also pushed there, cache hits
    are looked up there too, and lineage names the store's URIs. Without a sink a runner
    can only `plan`. With an `executor` (e.g. retrain.k8s_jobs.JobStepExecutor) a step
    function runs there instead of in this process, its log kept as the step's log."""

    def __init__(
        self,
        root: Path,
        sink: LineageSink | None,
        store: ArtifactStore | None = None,
        heartbeat_s: float = HEARTBEAT_S,
        stop: Stop | None = None,
        *,
        executor: StepExecutor | None = None,
    ):
        self.root = Path(root)
        self.sink = sink
        self.store = store
        self.heartbeat_s = heartbeat_s
        self.stop = stop or Stop()
        self.executor = executor

    @property
    def lineage(self) -> LineageSink:
        if self.sink is None:
            raise PipelineError("this runner has no lineage sink: it can only plan")
        return self.sink

    def plan(self, pipeline: Pipeline, cache: bool = True) -> Plan | None:
        """A dry run: without running, fetching or recording anything, the results and
        records of a run in which every step is a cache hit in the local folder (the same
        cache keys and lookup as `run`), or None if any step would run (not cached, a
        step that is never cached, only in the remote store, a missing input)."""
        if not cache:
            return None
        results: dict[str, StepResult] = {}
        records: list[StepRecord] = []
        try:
            for step in pipeline.order():
                started = time.perf_counter()
                found = self._lookup(step, results, cache, scratch=None)
                if found.hit is None:
                    return None
                outputs, hashes, metrics = found.hit
                result = StepResult(
                    "cached", outputs, hashes, found.key, time.perf_counter() - started
                )
                records.append(self._records(step, result, found, metrics))
                results[step.name] = result
        except (PipelineError, OSError):
            return None
        return Plan(pipeline.name, results, records)

    def run(
        self,
        pipeline: Pipeline,
        trigger: str = "manual",
        cache: bool = True,
        parameters: dict[str, Any] | None = None,
        finalize: Callable[[RunResult, Path], None] | None = None,
        *,
        on_start: Callable[[int], None] | None = None,
        model: str | None = None,
        triggered_by: str | None = None,
    ) -> RunResult:
        """Run every step, then `finalize(result, scratch)` (e.g. registering the model)
        while the run still holds its lease; anything raised fails the run, a stop
        (`self.stop`) interrupts it. `on_start(run_id)` is called once the run is
        recorded; `model` and `triggered_by` (who asked for it by hand) go to its record."""
        order = pipeline.order()
        scratch = (self.root / "tmp").resolve() / f"run-{uuid.uuid4().hex[:16]}.tmp"
        parameters = dict(parameters or {})
        run_id = self.lineage.start_run(pipeline.name, trigger, parameters, scratch=[str(scratch)],
                                     model=model, triggered_by=triggered_by)  # fmt: skip
        results: dict[str, StepResult] = {}
        try:
            if on_start is not None:
                on_start(run_id)
            scratch.mkdir(parents=True)
            heartbeat = _Heartbeat(self.lineage, run_id, self.heartbeat_s)
            try:
                for step in order:
                    self.stop.check(f"before step '{step.name}'")
                    results[step.name] = self._run_step(run_id, step, results, cache, scratch)
                self.stop.check("before registering")
                result = RunResult(run_id, "succeeded", results)
                if finalize is not None:
                    finalize(result, scratch)
            finally:
                heartbeat.stop()
                shutil.rmtree(scratch, ignore_errors=True)
        except BaseException as exc:
            status = "interrupted" if isinstance(exc, Interrupted) else "failed"
            error = str(exc) if isinstance(exc, StepFailed) else f"{type(exc).__name__}: {exc}"
            self.lineage.finish_run(run_id, status, error)
            raise
        self.lineage.finish_run(run_id, "succeeded")
        return result

    def _inputs(
        self, step: Step, results: dict[str, StepResult]
    ) -> tuple[dict[str, Path], dict[str, str]]:
        paths: dict[str, Path] = {}
        hashes: dict[str, str] = {}
        for name, ref in step.inputs.items():
            if ref.startswith("file:"):
                path = Path(ref.removeprefix("file:"))
                if not path.is_file():
                    raise StepFailed(step.name, f"source file {path} does not exist")
                paths[name], hashes[name] = path, file_hash(path)
            else:
                upstream, _, output = ref.partition(".")
                paths[name] = results[upstream].outputs[output]
                hashes[name] = results[upstream].hashes[output]
        return paths, hashes

    def _lookup(
        self, step: Step, results: dict[str, StepResult], cache: bool, scratch: Path | None
    ) -> _Lookup:
        """The step's inputs, cache key and, if its outputs are published for that key, the
        hit; with a `scratch` folder a hit in the remote store is fetched first."""
        inputs, input_hashes = self._inputs(step, results)
        key_doc = {"code": step.code_version(), "params": step.params, "inputs": input_hashes,
                   "outputs": list(step.outputs)}  # fmt: skip
        key = hashlib.sha256(json.dumps(key_doc, sort_keys=True, default=str).encode()).hexdigest()
        final = self.root / "artifacts" / step.name / key
        manifest = final / "manifest.json"
        remote = self.store
        hit = None
        if cache and step.cache:
            if scratch and not manifest.exists() and remote and remote.has(step.name, key):
                fetched = scratch / f"fetch-{step.name}-{key[:16]}"
                remote.fetch(step.name, key, fetched)
                final.parent.mkdir(parents=True, exist_ok=True)
                if not rename_into_place(fetched, final):
                    shutil.rmtree(fetched, ignore_errors=True)  # another run placed it first
            if manifest.exists():
                hit = self._cached(final, manifest, step)
        return _Lookup(inputs, input_hashes, key, final, hit)

    def _run_step(self, run_id: int, step: Step, results: dict[str, StepResult],
                  cache: bool, scratch: Path) -> StepResult:  # fmt: skip
        started = time.perf_counter()
        found = self._lookup(step, results, cache, scratch)
        inputs, key, final = found.inputs, found.key, found.final
        if found.hit is not None:
            outputs, hashes, metrics = found.hit
            result = StepResult("cached", outputs, hashes, key, time.perf_counter() - started)
            self._record(run_id, self._records(step, result, found, metrics))
            return result
        log_path = self.root / "logs" / f"run-{run_id}" / f"{step.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("")  # every attempt appends: its records, then its outcome
        work = scratch / f"{step.name}-{key[:16]}"
        attempts = 0
        error = ""
        while attempts <= step.retries:
            attempts += 1
            if step.retries:
                _append(log_path, f"--- attempt {attempts} of {step.retries + 1}\n")
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            context = StepContext(dict(inputs), dict(step.params), work)
            try:
                failure = self._call(run_id, step, context, log_path)
            except Interrupted:
                self._record_ended(run_id, step, key, attempts=attempts, started=started,
                                   log_path=log_path, status="interrupted",
                                   error="stopped on purpose")  # fmt: skip
                raise
            if failure is not None:
                error = failure
                log.warning("step %s attempt %d failed: %s", step.name, attempts, error)
                continue
            hashes = {o: file_hash(context.output(o)) for o in step.outputs}
            (work / "manifest.json").write_text(
                json.dumps({"hashes": hashes, "metrics": context.metrics}, sort_keys=True)
            )
            placed = self._place(work, final, hashes, step, scratch)
            if self.store is not None and placed == final:
                self.store.push(step.name, key, final)
            outputs = {o: placed / o for o in step.outputs}
            result = StepResult("succeeded", outputs, hashes, key, time.perf_counter() - started,
                                attempts)  # fmt: skip
            if self.executor is None:  # (a Job's pod log already ends with servo step's)
                _append(log_path, json.dumps({
                    "step": step.name, "status": "succeeded", "attempts": attempts,
                    "duration_s": round(result.duration_s, 3), "metrics": context.metrics,
                    "outputs": hashes}, sort_keys=True) + "\n")  # fmt: skip
            self._record(run_id, self._records(step, result, found, context.metrics, log_path))
            return result
        shutil.rmtree(work, ignore_errors=True)
        self._record_ended(run_id, step, key, attempts=attempts, started=started,
                           log_path=log_path, status="failed", error=error)  # fmt: skip
        raise StepFailed(step.name, error)

    def _call(self, run_id: int, step: Step, context: StepContext, log_path: Path) -> str | None:
        """Run the step function once (here, or on the executor): None, or the error it
        failed with. While it runs, a stop's signal handler may raise Interrupted in it."""
        try:
            self.stop.step = step.name
            # a stop asked for since the last check, before a signal could interrupt the step
            self.stop.check(f"during step '{step.name}'")
            if self.executor is None:
                with _StepLog(log_path):
                    step.fn(context)
            else:
                _append(log_path, self.executor(run_id, step, context))
            missing = [o for o in step.outputs if not context.output(o).is_file()]
            if missing:
                raise PipelineError(f"did not write output(s) {', '.join(missing)}")
        except Exception as exc:
            # an executor's error may carry the remote log (StepExecutionError.log)
            remote = exc.log + "\n" if isinstance(exc, StepExecutionError) and exc.log else ""
            _append(log_path, remote + traceback.format_exc())
            if self.stop.is_set():
                # the stop's Interrupted, raised inside a C extension, can come out as
                # another error (seen: numpy's "buffer format string" ValueError): a step
                # that fails once a stop was asked for was stopped, not failed
                raise Interrupted(f"stopped during step '{step.name}'") from exc
            return f"{type(exc).__name__}: {exc}"
        finally:
            self.stop.step = None
        return None

    def _record_ended(self, run_id: int, step: Step, key: str, *, attempts: int,
                      started: float, log_path: Path, status: str, error: str) -> None:  # fmt: skip
        self.lineage.record_step(
            run_id, step.name, status=status, cache_key=key, attempts=attempts,
            parameters=dict(step.params), duration_s=time.perf_counter() - started,
            log_uri=str(log_path), error=error,
        )  # fmt: skip

    def _place(
        self, work: Path, final: Path, hashes: dict[str, str], step: Step, scratch: Path
    ) -> Path:
        """Publish the complete folder `work` as `final` with one rename; returns the folder
        whose outputs this run uses. A complete `final` is never removed or replaced (other
        runs may be reading it): if it holds the same bytes it is used; if not (a step that
        is not deterministic, re-run without the cache) this run's outputs go beside it,
        named by their hashes. Only a broken `final` (no manifest or missing outputs: left
        by an older version, or damaged) is moved aside into this run's scratch folder."""
        fsync_tree(work)
        final.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if rename_into_place(work, final):
                return final
            theirs = _complete(final, step)
            if theirs is None:
                with contextlib.suppress(FileNotFoundError):
                    final.rename(scratch / f"broken-{uuid.uuid4().hex[:8]}")
                continue
            if theirs == hashes:
                return final  # ours is removed with the scratch folder
            digest = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()
            variant = final.with_name(f"{final.name}.{digest[:16]}")
            if rename_into_place(work, variant) or _complete(variant, step) == hashes:
                return variant
        raise PipelineError(f"could not publish the outputs of step '{step.name}' at {final}")

    def _cached(
        self, final: Path, manifest: Path, step: Step
    ) -> tuple[dict[str, Path], dict[str, str], dict[str, float]] | None:
        # a published folder is complete (renamed in after its manifest was written)
        try:
            doc = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        outputs = {o: final / o for o in step.outputs}
        if not all(p.is_file() for p in outputs.values()):
            return None
        return outputs, dict(doc["hashes"]), dict(doc.get("metrics") or {})

    def _records(
        self,
        step: Step,
        result: StepResult,
        found: _Lookup,
        metrics: dict[str, float],
        log_path: Path | None = None,
    ) -> StepRecord:
        """The lineage of a step that succeeded or was a cache hit (a run and a plan)."""
        fields: dict[str, Any] = dict(
            status=result.status, cache_key=result.cache_key, attempts=result.attempts,
            parameters=dict(step.params), metrics=dict(metrics), duration_s=result.duration_s,
            log_uri=str(log_path) if log_path else None,
        )  # fmt: skip
        artifacts = [
            dict(name=name, direction="input", uri=str(path),
                 content_hash=found.input_hashes[name], size=path.stat().st_size)
            for name, path in found.inputs.items()
        ]  # fmt: skip
        for name, path in result.outputs.items():
            uri = str(path)
            if self.store is not None:
                uri = self.store.uri(step.name, result.cache_key, name)
            artifacts.append(
                dict(name=name, direction="output", uri=uri, content_hash=result.hashes[name],
                     size=path.stat().st_size)
            )  # fmt: skip
        return StepRecord(step.name, fields, artifacts)

    def _record(self, run_id: int, record: StepRecord) -> None:
        self.lineage.record_step(run_id, record.step, **record.fields)
        for artifact in record.artifacts:
            self.lineage.record_artifact(run_id, record.step, **artifact)


def _complete(folder: Path, step: Step) -> dict[str, str] | None:
    """The output hashes of a published folder, or None if it is not complete."""
    try:
        doc = json.loads((folder / "manifest.json").read_text())
        hashes = {o: str(doc["hashes"][o]) for o in step.outputs}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not all((folder / o).is_file() for o in step.outputs):
        return None
    return hashes


def _append(path: Path, text: str) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(text)


class _StepLog(logging.Handler):
    """While a step function runs here: the log records it emits on its own thread
    (through any logger, at the levels that logger passes), appended to the step's log
    file, which the run keeps (its `log_uri`)."""

    def __init__(self, path: Path) -> None:
        super().__init__(logging.DEBUG)
        self.path = path
        self.thread = threading.get_ident()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._file: Any = None

    def __enter__(self) -> _StepLog:
        self._file = self.path.open("a", encoding="utf-8")
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeHandler(self)
        self._file.close()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread:
            return
        try:
            self._file.write(self.format(record) + "\n")
            self._file.flush()
        except Exception:
            self.handleError(record)
