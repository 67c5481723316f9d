"""Run one pipeline step as a Kubernetes Job (batch/v1), with the `kubernetes` client.

The Job runs the same image as the controller, `servo step NAME --function F --params
JSON --input NAME PATH ... --output NAME PATH ...` (what `retrain.kfp.run_step` does),
with the artifacts at paths on a volume the pod mounts (the artifact store). It has
`backoffLimit: 0` (the runner's own retries decide whether to try again) and
`activeDeadlineSeconds` = the step's timeout. `JobRunner.run` watches it until the
`Complete` or `Failed` condition, reads the pod's log (kept in the run's lineage), deletes
the Job (propagationPolicy Background: its pods too) and returns the log or raises:
`JobFailed` (the pod's log in the message), `JobTimedOut` (the deadline was exceeded, or
no condition came within the timeout plus a grace period).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from retrain.pipeline import Step, StepContext, StepExecutionError

LABEL_RUN = "servo.dev/run"
LABEL_STEP = "servo.dev/step"
LABEL_PART = "app.kubernetes.io/component"
#: the label Kubernetes' Job controller sets on a Job's pods
POD_JOB_LABEL = "job-name"
#: how long past its deadline a Job may take to show a condition before we stop waiting
GRACE_S = 30.0
#: how much of a failed pod's log goes into the error message (the lineage keeps all of it)
ERROR_LOG_CHARS = 4000


class JobError(StepExecutionError):
    """A step's Job did not succeed; `log` is its pod's log (may be empty)."""


class JobFailed(JobError):
    pass


class JobTimedOut(JobError):
    pass


@dataclass(frozen=True)
class JobSpec:
    """What a step's Job runs: `servo step` for step `step` (the step function `function`
    with `params`), its inputs and outputs at paths inside the pod."""

    run_id: int
    step: str
    function: str
    params: Mapping[str, Any]
    inputs: Mapping[str, PurePosixPath]
    outputs: Mapping[str, PurePosixPath]
    timeout_s: int


@dataclass
class JobRunner:
    """Runs `JobSpec`s in `namespace` with `image`; `claim` names a PersistentVolumeClaim
    (the artifact store) mounted at `mount_path`, where the specs' paths lie."""

    namespace: str
    image: str
    claim: str | None = None
    mount_path: str = "/artifacts"
    service_account: str | None = None
    poll_s: float = 1.0
    grace_s: float = GRACE_S
    api_client: Any = None
    labels: Mapping[str, str] = field(default_factory=dict)

    def _batch(self) -> Any:
        from kubernetes import client

        return client.BatchV1Api(self.api_client)

    def _core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api_client)

    def job_name(self, spec: JobSpec) -> str:
        """A DNS-1123 name naming the run and step, unique per attempt (63 chars at most)."""
        step = re.sub(r"[^a-z0-9-]+", "-", spec.step.lower()).strip("-")[:30] or "step"
        return f"servo-{spec.run_id}-{step}-{uuid.uuid4().hex[:8]}"

    def manifest(self, spec: JobSpec, name: str) -> dict[str, Any]:
        """The Job's manifest (batch/v1) as a dict."""
        if spec.timeout_s <= 0:
            raise ValueError(f"step {spec.step!r}: timeout must be > 0 s, not {spec.timeout_s}")
        args = ["--function", spec.function, "--params", json.dumps(dict(spec.params))]
        for name_, path in spec.inputs.items():
            args += ["--input", name_, str(path)]
        for name_, path in spec.outputs.items():
            args += ["--output", name_, str(path)]
        labels = {**self.labels, LABEL_PART: "pipeline-step", LABEL_RUN: str(spec.run_id),
                  LABEL_STEP: _label_value(spec.step)}  # fmt: skip
        container: dict[str, Any] = {
            "name": "step",
            "image": self.image,
            "command": ["servo", "step", spec.step],
            "args": args,
        }
        pod: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
        if self.service_account:
            pod["serviceAccountName"] = self.service_account
        if self.claim:
            container["volumeMounts"] = [{"name": "artifacts", "mountPath": self.mount_path}]
            pod["volumes"] = [
                {"name": "artifacts", "persistentVolumeClaim": {"claimName": self.claim}}
            ]
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name, "namespace": self.namespace, "labels": labels},
            "spec": {
                "backoffLimit": 0,
                "activeDeadlineSeconds": int(spec.timeout_s),
                "template": {"metadata": {"labels": labels}, "spec": pod},
            },
        }

    def run(self, spec: JobSpec) -> str:
        """Create the step's Job, wait for it to end, delete it; return its pod's log or
        raise JobFailed / JobTimedOut."""
        from kubernetes.client.exceptions import ApiException

        name = self.job_name(spec)
        batch = self._batch()
        try:
            batch.create_namespaced_job(self.namespace, self.manifest(spec, name))
        except ApiException as exc:
            raise JobFailed(f"step {spec.step!r}: creating Job {name} failed: "
                            f"{exc.status} {exc.reason}: {_body(exc)}") from exc  # fmt: skip
        where = f"step {spec.step!r} (Job {self.namespace}/{name})"
        try:
            outcome, reason = self._wait(name, spec.timeout_s + self.grace_s)
            log = self._log(name)
        except ApiException as exc:
            raise JobFailed(f"{where}: reading its status failed: {exc.status} {exc.reason}: "
                            f"{_body(exc)}") from exc  # fmt: skip
        finally:
            self._delete(name)
        if outcome == "succeeded":
            return log
        if outcome == "timeout":
            raise JobTimedOut(f"{where} timed out after {spec.timeout_s} s ({reason})"
                              f"{_tail(log)}", log)  # fmt: skip
        raise JobFailed(f"{where} failed: {reason}{_tail(log)}", log)

    def _wait(self, name: str, wait_s: float) -> tuple[str, str]:
        """("succeeded" | "failed" | "timeout", reason) from the Job's conditions."""
        batch = self._batch()
        until = time.monotonic() + wait_s
        while True:
            job = batch.read_namespaced_job(name, self.namespace)
            for cond in (job.status.conditions if job.status else None) or []:
                if cond.status != "True":
                    continue
                if cond.type in ("Complete", "SuccessCriteriaMet"):
                    return "succeeded", cond.reason or "complete"
                if cond.type in ("Failed", "FailureTarget"):
                    text = f"{cond.reason or 'Failed'}: {cond.message or 'no message'}"
                    if cond.reason == "DeadlineExceeded":
                        return "timeout", text
                    return "failed", text
            if time.monotonic() >= until:
                return "timeout", f"no Complete or Failed condition within {wait_s:.0f} s"
            time.sleep(self.poll_s)

    def _log(self, name: str) -> str:
        """The logs of the Job's pods (normally one), or a note why there are none."""
        from kubernetes.client.exceptions import ApiException

        core = self._core()
        try:
            selector = f"{POD_JOB_LABEL}={name}"
            pods = core.list_namespaced_pod(self.namespace, label_selector=selector)
        except ApiException as exc:
            return f"(pods of Job {name} not listed: {exc.status} {exc.reason})"
        parts = []
        for pod in pods.items or []:
            pod_name = pod.metadata.name
            try:
                # raw bytes: the client would parse a log that is valid JSON into a dict
                raw = core.read_namespaced_pod_log(
                    pod_name, self.namespace, container="step", _preload_content=False
                )
                text = raw.data.decode("utf-8", "replace")
            except ApiException as exc:
                text = f"(log of pod {pod_name} not read: {exc.status} {exc.reason})"
            parts.append(text if len(pods.items) == 1 else f"--- pod {pod_name}\n{text}")
        return "\n".join(parts) if parts else f"(no pod of Job {name} found)"

    def _delete(self, name: str) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            self._batch().delete_namespaced_job(
                name, self.namespace, body=client.V1DeleteOptions(propagation_policy="Background")
            )
        except ApiException as exc:
            if exc.status != 404:
                raise


@dataclass
class JobStepExecutor:
    """A `retrain.pipeline.StepExecutor`: each step that runs (not a cache hit) runs as a
    Job. The runner's folder must be the artifact volume, mounted at the same path in the
    controller and in the Job's pod (`jobs.mount_path`), so the paths the runner hands a
    step are the pod's paths too. Only retrain.steps' step functions can run in a pod.
    Metrics: what `servo step` printed at the end of its log."""

    jobs: JobRunner
    #: activeDeadlineSeconds of every step, unless `timeouts` names the step
    timeout_s: int = 3600
    timeouts: Mapping[str, int] = field(default_factory=dict)

    def __call__(self, run_id: int, step: Step, context: StepContext) -> str:
        from retrain.steps import STEP_FUNCTIONS

        function = getattr(step.fn, "__name__", "")
        if STEP_FUNCTIONS.get(function) is not step.fn:
            raise StepExecutionError(
                f"step {step.name!r}: {function!r} is not one of retrain.steps' step "
                f"functions; a Job's pod could not run it"
            )
        spec = JobSpec(
            run_id=run_id, step=step.name, function=function, params=dict(context.params),
            inputs={k: self._path(v) for k, v in context.inputs.items()},
            outputs={o: self._path(context.output(o)) for o in step.outputs},
            timeout_s=int(self.timeouts.get(step.name, self.timeout_s)),
        )  # fmt: skip
        log = self.jobs.run(spec)
        context.metrics.update(step_metrics(log))
        return log

    def _path(self, path: Path) -> PurePosixPath:
        posix = PurePosixPath(path.resolve().as_posix())
        if not posix.is_relative_to(self.jobs.mount_path):
            raise StepExecutionError(
                f"{path} is not under the artifact volume's mount path {self.jobs.mount_path}"
                " (run the pipeline with its folder on that volume)"
            )
        return posix


def step_metrics(log: str) -> dict[str, float]:
    """The metrics `servo step` printed last in `log` ({"step": ..., "metrics": {...}})."""
    start = log.rfind('{\n  "step": ')
    if start < 0:
        return {}
    try:
        doc, _ = json.JSONDecoder().raw_decode(log[start:])
        return {str(k): float(v) for k, v in dict(doc.get("metrics") or {}).items()}
    except (ValueError, TypeError, AttributeError):
        return {}


def _label_value(text: str) -> str:
    """`text` as a label value: 63 characters of [A-Za-z0-9_.-], alphanumeric at the ends."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:63].strip("_.-") or "step"


def _body(exc: Any) -> str:
    try:
        return str(json.loads(exc.body).get("message", exc.body))
    except (TypeError, ValueError, AttributeError):
        return str(exc.body)


def _tail(log: str) -> str:
    if not log:
        return ""
    text = log if len(log) <= ERROR_LOG_CHARS else "..." + log[-ERROR_LOG_CHARS:]
    return f"\n--- pod log:\n{text}"
