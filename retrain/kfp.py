"""Compile a pipeline to a Kubeflow Pipelines v2 spec (the `kfp` SDK, an optional extra):
each step becomes a container component running `servo step NAME` with the step's
parameters and its artifacts' paths; source files become importer tasks. The same
steps, the same parameters, the same DAG as the local runner.

`run_step` is what `servo step` does inside such a container: run one step function
(named; only retrain.steps' step functions can be named) with its inputs at the given
paths and copy its outputs to the given paths.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from retrain.pipeline import Pipeline, Step, StepContext
from retrain.steps import STEP_FUNCTIONS

DEFAULT_IMAGE = "servo:latest"


def _ident(prefix: str, name: str) -> str:
    return prefix + re.sub(r"\W", "_", name)


def _component(step: Step, image: str) -> Any:
    from kfp import dsl

    inputs = {name: _ident("in_", name) for name in step.inputs}
    outputs = {name: _ident("out_", name) for name in step.outputs}
    signature = [f"{v}: dsl.Input[dsl.Artifact]" for v in inputs.values()]
    signature += [f"{v}: dsl.Output[dsl.Artifact]" for v in outputs.values()]
    function_name = getattr(step.fn, "__name__", "")
    if STEP_FUNCTIONS.get(function_name) is not step.fn:
        raise ValueError(
            f"step {step.name!r}: {function_name!r} is not one of retrain.steps' step "
            f"functions ({', '.join(sorted(STEP_FUNCTIONS))}); a container could not run it"
        )
    args = ["'--function'", repr(function_name), "'--params'", repr(json.dumps(dict(step.params)))]
    for name, ident in inputs.items():
        args += ["'--input'", repr(name), f"{ident}.path"]
    for name, ident in outputs.items():
        args += ["'--output'", repr(name), f"{ident}.path"]
    function = _ident("step_", step.name)
    source = (
        f"def {function}({', '.join(signature)}):\n"
        f"    return dsl.ContainerSpec(image={image!r}, command=['servo', 'step', "
        f"{step.name!r}], args=[{', '.join(args)}])\n"
    )
    namespace: dict[str, Any] = {"dsl": dsl}
    # dont_inherit: the annotations must be real types, not this module's lazy strings
    exec(compile(source, f"<servo step {step.name}>", "exec", dont_inherit=True), namespace)
    return dsl.container_component(namespace[function]), inputs, outputs


def compile_kfp(pipeline: Pipeline, out: Path, *, image: str = DEFAULT_IMAGE) -> None:
    """Write `pipeline` as a KFP v2 pipeline spec (YAML) to `out`."""
    from kfp import compiler, dsl

    order = pipeline.order()
    components = {step.name: _component(step, image) for step in order}

    def kfp_pipeline() -> None:
        tasks: dict[str, Any] = {}
        for step in order:
            component, inputs, _ = components[step.name]
            kwargs = {}
            for name, ref in step.inputs.items():
                if ref.startswith("file:"):
                    path = Path(ref.removeprefix("file:"))
                    uri = path.resolve().as_uri() if not path.is_absolute() else path.as_uri()
                    imported = dsl.importer(artifact_uri=uri, artifact_class=dsl.Artifact)
                    kwargs[inputs[name]] = imported.output
                else:
                    upstream, _, output = ref.partition(".")
                    producer = components[upstream][2][output]
                    kwargs[inputs[name]] = tasks[upstream].outputs[producer]
            task = component(**kwargs)
            task.set_display_name(step.name)
            if not step.cache:
                task.set_caching_options(False)
            tasks[step.name] = task

    kfp_pipeline.__annotations__ = {}  # kfp reads annotations as outputs; it has none
    spec = dsl.pipeline(name=pipeline.name, description=f"Servo pipeline {pipeline.name}")(
        kfp_pipeline
    )
    compiler.Compiler().compile(spec, str(out))


def run_step(
    step: str,
    *,
    function: str,
    params: dict[str, Any],
    inputs: dict[str, Path],
    outputs: dict[str, Path],
) -> dict[str, float]:
    """Run one step as a KFP container does: `function` (one of retrain.steps' step
    functions, by name: nothing else can be named) with its inputs at the given paths;
    each output it writes is copied to its given path. Returns the step's metrics."""
    fn = STEP_FUNCTIONS.get(function)
    if fn is None:
        raise KeyError(f"unknown step function {function!r} ({', '.join(sorted(STEP_FUNCTIONS))})")
    for name, path in inputs.items():
        if not path.is_file():
            raise FileNotFoundError(f"step {step!r}: input {name!r} at {path} does not exist")
    with tempfile.TemporaryDirectory(prefix=f"servo-step-{step}-") as work:
        context = StepContext(dict(inputs), dict(params), Path(work))
        fn(context)
        for name, target in outputs.items():
            written = context.output(name)
            if not written.is_file():
                raise RuntimeError(f"step {step!r} did not write output {name!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(written, target)
    return context.metrics
