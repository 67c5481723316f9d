"""A small pipeline engine: typed steps in a DAG, content-addressed caching, lineage.

A step is a Python function with declared inputs (upstream outputs or source files),
outputs (files it writes) and parameters. Its cache key is the hash of its code, its
parameters and the content hashes of its inputs (not their names or paths), so a re-run
with nothing changed reuses every output, and changing one input byte re-runs exactly the
steps downstream of it. Every run, step, artifact (content hash and size), parameter,
metric, duration and log is recorded in the registry. A step that raises (after its
retries) fails the run: nothing downstream runs.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import shutil
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from retrain.artifacts import ArtifactStore

log = logging.getLogger("servo.retrain")


class LineageSink(Protocol):
    """Where runs are recorded (the registry store)."""

    def start_run(self, pipeline: str, trigger: str, parameters: dict[str, Any]) -> int: ...

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


class Runner:
    """Runs pipelines against a local artifact folder, recording lineage in `sink`; with a
    `store` (retrain.artifacts: any fsspec URL) outputs are also pushed there, cache hits
    are looked up there too, and lineage names the store's URIs."""

    def __init__(self, root: Path, sink: LineageSink, store: ArtifactStore | None = None):
        self.root = Path(root)
        self.sink = sink
        self.store = store

    def run(
        self,
        pipeline: Pipeline,
        trigger: str = "manual",
        cache: bool = True,
        parameters: dict[str, Any] | None = None,
    ) -> RunResult:
        order = pipeline.order()
        run_id = self.sink.start_run(pipeline.name, trigger, dict(parameters or {}))
        results: dict[str, StepResult] = {}
        try:
            for step in order:
                results[step.name] = self._run_step(run_id, step, results, cache)
        except StepFailed as exc:
            self.sink.finish_run(run_id, "failed", str(exc))
            raise
        self.sink.finish_run(run_id, "succeeded")
        return RunResult(run_id, "succeeded", results)

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

    def _run_step(self, run_id: int, step: Step, results: dict[str, StepResult],
                  cache: bool) -> StepResult:  # fmt: skip
        inputs, input_hashes = self._inputs(step, results)
        key_doc = {"code": step.code_version(), "params": step.params, "inputs": input_hashes,
                   "outputs": list(step.outputs)}  # fmt: skip
        key = hashlib.sha256(json.dumps(key_doc, sort_keys=True, default=str).encode()).hexdigest()
        final = self.root / "artifacts" / step.name / key
        manifest = final / "manifest.json"
        started = time.perf_counter()
        remote = self.store
        if cache and step.cache and not manifest.exists() and remote and remote.has(step.name, key):
            remote.fetch(step.name, key, final)
        if cache and step.cache and manifest.exists():
            cached = self._cached(final, manifest, step)
            if cached is not None:
                result = StepResult(
                    "cached", cached[0], cached[1], key, time.perf_counter() - started
                )
                self._record(
                    run_id,
                    step,
                    result,
                    inputs=inputs,
                    input_hashes=input_hashes,
                    metrics=cached[2],
                )
                return result
        log_path = self.root / "logs" / f"run-{run_id}" / f"{step.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        work = final.with_name(f".{key}.{run_id}.tmp")
        attempts = 0
        error = ""
        while attempts <= step.retries:
            attempts += 1
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            context = StepContext(dict(inputs), dict(step.params), work)
            try:
                step.fn(context)
                missing = [o for o in step.outputs if not context.output(o).is_file()]
                if missing:
                    raise PipelineError(f"did not write output(s) {', '.join(missing)}")
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                log_path.write_text(traceback.format_exc())
                log.warning("step %s attempt %d failed: %s", step.name, attempts, error)
                continue
            hashes = {o: file_hash(context.output(o)) for o in step.outputs}
            (work / "manifest.json").write_text(
                json.dumps({"hashes": hashes, "metrics": context.metrics}, sort_keys=True)
            )
            shutil.rmtree(final, ignore_errors=True)
            work.rename(final)
            if self.store is not None:
                self.store.push(step.name, key, final)
            outputs = {o: final / o for o in step.outputs}
            result = StepResult("succeeded", outputs, hashes, key, time.perf_counter() - started,
                                attempts)  # fmt: skip
            self._record(
                run_id,
                step,
                result,
                inputs=inputs,
                input_hashes=input_hashes,
                metrics=context.metrics,
                log_path=log_path,
            )
            return result
        shutil.rmtree(work, ignore_errors=True)
        self.sink.record_step(
            run_id, step.name, status="failed", cache_key=key, attempts=attempts,
            parameters=dict(step.params), duration_s=time.perf_counter() - started,
            log_uri=str(log_path), error=error,
        )  # fmt: skip
        raise StepFailed(step.name, error)

    def _cached(
        self, final: Path, manifest: Path, step: Step
    ) -> tuple[dict[str, Path], dict[str, str], dict[str, float]] | None:
        try:
            doc = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        outputs = {o: final / o for o in step.outputs}
        if not all(p.is_file() for p in outputs.values()):
            return None
        return outputs, dict(doc["hashes"]), dict(doc.get("metrics") or {})

    def _record(
        self,
        run_id: int,
        step: Step,
        result: StepResult,
        *,
        inputs: dict[str, Path],
        input_hashes: dict[str, str],
        metrics: dict[str, float],
        log_path: Path | None = None,
    ) -> None:  # fmt: skip
        self.sink.record_step(
            run_id, step.name, status=result.status, cache_key=result.cache_key,
            attempts=result.attempts, parameters=dict(step.params), metrics=dict(metrics),
            duration_s=result.duration_s, log_uri=str(log_path) if log_path else None,
        )  # fmt: skip
        for name, path in inputs.items():
            self.sink.record_artifact(
                run_id, step.name, name=name, direction="input", uri=str(path),
                content_hash=input_hashes[name], size=path.stat().st_size,
            )  # fmt: skip
        for name, path in result.outputs.items():
            uri = str(path)
            if self.store is not None:
                uri = self.store.uri(step.name, result.cache_key, name)
            self.sink.record_artifact(
                run_id, step.name, name=name, direction="output", uri=uri,
                content_hash=result.hashes[name], size=path.stat().st_size,
            )  # fmt: skip
