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
from pathlib import PurePosixPath
from typing import Any

from retrain.pipeline import PipelineError

LABEL_RUN = "servo.dev/run"
LABEL_STEP = "servo.dev/step"
LABEL_PART = "app.kubernetes.io/component"
#: the label Kubernetes' Job controller sets on a Job's pods
POD_JOB_LABEL = "job-name"
#: how long past its deadline a Job may take to show a condition before we stop waiting
GRACE_S = 30.0
#: how much of a failed pod's log goes into the error message (the lineage keeps all of it)
ERROR_LOG_CHARS = 4000


class JobError(PipelineError):
    """A step's Job did not succeed; `log` is its pod's log (may be empty)."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(message)
        self.log = log


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
                  LABEL_STEP: re.sub(r"[^A-Za-z0-9_.-]", "_", spec.step)[:63]}  # fmt: skip
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
        try:
            outcome, reason = self._wait(name, spec.timeout_s + self.grace_s)
            log = self._log(name)
        finally:
            self._delete(name)
        where = f"step {spec.step!r} (Job {self.namespace}/{name})"
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
                text = core.read_namespaced_pod_log(pod_name, self.namespace, container="step")
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
