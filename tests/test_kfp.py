"""`servo pipeline compile --kfp`: the digits pipeline as a Kubeflow Pipelines v2 spec,
loaded back with the kfp SDK, and its containers' commands (`servo step ...`) executed
here in DAG order, with each artifact placeholder replaced by a local path, as a KFP
launcher would."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

from servo.cli import main

PLACEHOLDER = re.compile(r"\{\{\$\.(inputs|outputs)\.artifacts\['([^']+)'\]\.path\}\}")


def compile_digits(tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "digits.yaml"
    result = CliRunner().invoke(
        main, ["pipeline", "compile", "--kfp", str(out), "--image", "servo:test"]
    )
    assert result.exit_code == 0, result.output
    spec: dict[str, Any] = yaml.safe_load(out.read_text())
    return spec


def test_compiled_spec_loads_back_with_the_kfp_sdk(tmp_path: Path) -> None:
    from kfp import components

    spec = compile_digits(tmp_path)
    loaded = components.load_component_from_file(str(tmp_path / "digits.yaml"))
    assert loaded.name == "digits"
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"step-ingest", "step-split", "step-train", "step-evaluate"}
    assert tasks["step-evaluate"]["dependentTasks"] == ["step-split", "step-train"]
    for name in ("ingest", "split", "train", "evaluate"):
        container = spec["deploymentSpec"]["executors"][f"exec-step-{name}"]["container"]
        assert container["image"] == "servo:test"
        assert container["command"] == ["servo", "step", name]
        assert container["args"][:2] == ["--function", name]


def test_compiled_containers_run_the_pipeline(tmp_path: Path) -> None:
    spec = compile_digits(tmp_path)
    tasks = spec["root"]["dag"]["tasks"]
    executors = spec["deploymentSpec"]["executors"]
    done: dict[str, dict[str, Path]] = {}  # task -> output artifact -> path
    pending = dict(tasks)
    while pending:
        ready = [t for t, d in pending.items() if set(d.get("dependentTasks", [])) <= set(done)]
        assert ready, f"no task can run: {list(pending)}"
        for task in ready:
            definition = pending.pop(task)
            inputs = {
                key: done[ref["taskOutputArtifact"]["producerTask"]][
                    ref["taskOutputArtifact"]["outputArtifactKey"]
                ]
                for key, ref in definition.get("inputs", {}).get("artifacts", {}).items()
            }
            outputs: dict[str, Path] = {}

            def path_for(
                match: re.Match[str],
                task: str = task,
                inputs: dict[str, Path] = inputs,
                outputs: dict[str, Path] = outputs,
            ) -> str:
                kind, key = match.groups()
                if kind == "inputs":
                    return str(inputs[key])
                outputs[key] = tmp_path / "minio" / task / key
                return str(outputs[key])

            container = executors[f"exec-{task}"]["container"]
            args = [PLACEHOLDER.sub(path_for, a) for a in container["args"]]
            command = container["command"]
            run = subprocess.run(
                [sys.executable, "-m", "servo.cli", *command[1:], *args],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert run.returncode == 0, run.stdout + run.stderr
            assert all(p.is_file() for p in outputs.values()), outputs
            done[task] = outputs
    evaluation = json.loads(done["step-evaluate"]["out_evaluation_json"].read_text())
    assert evaluation["accuracy"] > 0.9 and evaluation["export_max_probability_gap"] <= 1e-4


def test_servo_step_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    unknown = CliRunner().invoke(main, ["step", "x", "--function", "os.system"])
    assert unknown.exit_code == 1 and "unknown step function 'os.system'" in unknown.output
    missing = CliRunner().invoke(
        main, ["step", "split", "--function", "split", "--input", "data", str(tmp_path / "nope")]
    )
    assert missing.exit_code == 1 and "does not exist" in missing.output
