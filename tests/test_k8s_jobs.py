"""Pipeline steps as Kubernetes Jobs (retrain.k8s_jobs) against the kmock emulator.

kmock (PyPI) emulates the Kubernetes API over HTTP on 127.0.0.1 (objects kept in memory:
create, read, patch, delete, list, watch); it runs no controller and no pod. The test
plays the Job controller: once the Job exists it creates the Job's pod, serves its log
and patches the Job's status with the condition a real controller would set. What this
cannot prove (a real scheduler, real pods, label selectors applied server-side): see
docs/kubernetes.md.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

kmock = pytest.importorskip("kmock", reason="the k8s extra (kmock) is not installed")
client = pytest.importorskip("kubernetes.client")

from retrain.k8s_jobs import JobFailed, JobRunner, JobSpec, JobTimedOut  # noqa: E402

NS = "servo"
POD = "step-pod"
LOG = "loading digits\ntrained: accuracy 0.97\n"


class Emulator:
    """A kmock KubernetesEmulator served on 127.0.0.1 from a thread with its own loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.done: asyncio.Event | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> None:
        self.handler = kmock.KubernetesEmulator()
        await self.handler.__aenter__()
        self.server = kmock.Server(self.handler)
        await self.server.__aenter__()
        self.handler[f"get /api/v1/namespaces/{NS}/pods/{POD}/log"] << LOG.encode()
        self.url = str(self.server.url).rstrip("/")

    async def _stop(self) -> None:
        await self.server.__aexit__(None, None, None)
        await self.handler.__aexit__(None, None, None)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def requests(self, method: str) -> list[Any]:
        return list(self.handler[method.lower()])  # the requests kmock saw, by method


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    emu = Emulator()
    yield emu
    emu.close()


@pytest.fixture
def api(emulator: Emulator) -> Iterator[Any]:
    with client.ApiClient(client.Configuration(host=emulator.url)) as api_client:
        yield api_client


def spec(timeout_s: int = 60) -> JobSpec:
    return JobSpec(
        run_id=7, step="train", function="train_digits", params={"epochs": 3},
        inputs={"data": PurePosixPath("/artifacts/load/abc/data.npz")},
        outputs={"model": PurePosixPath("/artifacts/tmp/run-7/train/model.onnx")},
        timeout_s=timeout_s,
    )  # fmt: skip


def play_controller(api: Any, condition: dict[str, str] | None) -> threading.Thread:
    """Once a Job exists: create its pod (the log is served) and set `condition`."""
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)

    def act() -> None:
        for _ in range(200):
            try:  # kmock answers 404 for a kind until one object of it exists
                jobs = batch.list_namespaced_job(NS).items
            except client.ApiException:
                jobs = []
            if jobs:
                break
            time.sleep(0.02)
        else:
            return
        name = jobs[0].metadata.name
        pod = {"metadata": {"name": POD, "namespace": NS, "labels": {"job-name": name}},
               "spec": {"containers": [{"name": "step", "image": "x"}]}}  # fmt: skip
        core.create_namespaced_pod(NS, pod)
        if condition is not None:
            status = {"status": {"conditions": [{**condition, "status": "True"}]}}
            batch.patch_namespaced_job_status(name, NS, status)

    thread = threading.Thread(target=act, daemon=True)
    thread.start()
    return thread


def runner(api: Any, **kwargs: Any) -> JobRunner:
    return JobRunner(namespace=NS, image="ghcr.io/example/servo:1.2", claim="servo-artifacts",
                     poll_s=0.05, api_client=api, **kwargs)  # fmt: skip


def the_job(emulator: Emulator) -> dict[str, Any]:
    created = emulator.requests("POST")
    jobs = [r.data for r in created if r.data.get("kind") == "Job"]
    assert len(jobs) == 1
    return dict(jobs[0])


def assert_deleted(emulator: Emulator, api: Any, job: dict[str, Any]) -> None:
    deletes = [r for r in emulator.requests("DELETE") if r.name == job["metadata"]["name"]]
    assert len(deletes) == 1
    assert deletes[0].data.get("propagationPolicy") == "Background"
    assert client.BatchV1Api(api).list_namespaced_job(NS).items == []


def test_manifest_runs_servo_step_with_the_deadline_and_labels() -> None:
    jobs = JobRunner(namespace=NS, image="servo:9", claim="arts", service_account="servo")
    manifest = jobs.manifest(spec(timeout_s=90), "servo-7-train-x")
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    job = manifest["spec"]
    assert job["backoffLimit"] == 0 and job["activeDeadlineSeconds"] == 90
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "servo"
    (container,) = pod["containers"]
    assert container["image"] == "servo:9"
    assert container["command"] == ["servo", "step", "train"]
    assert container["args"] == [
        "--function", "train_digits", "--params", '{"epochs": 3}',
        "--input", "data", "/artifacts/load/abc/data.npz",
        "--output", "model", "/artifacts/tmp/run-7/train/model.onnx",
    ]  # fmt: skip
    assert container["volumeMounts"] == [{"name": "artifacts", "mountPath": "/artifacts"}]
    assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "arts"}
    labels = manifest["metadata"]["labels"]
    assert labels["servo.dev/run"] == "7" and labels["servo.dev/step"] == "train"
    odd = JobSpec(**{**spec().__dict__, "step": "-évaluer le modèle-"})
    assert jobs.manifest(odd, "x")["metadata"]["labels"]["servo.dev/step"] == "valuer_le_mod_le"
    assert job["template"]["metadata"]["labels"] == labels
    with pytest.raises(ValueError, match="timeout must be > 0"):
        jobs.manifest(spec(timeout_s=0), "x")


def test_success_returns_the_pod_log_and_deletes_the_job(emulator: Emulator, api: Any) -> None:
    controller = play_controller(api, {"type": "Complete", "reason": "CompletionsReached"})
    log = runner(api).run(spec())
    controller.join(10)
    assert log == LOG
    job = the_job(emulator)
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/example/servo:1.2"
    assert job["metadata"]["name"].startswith("servo-7-train-")
    assert_deleted(emulator, api, job)


def test_failure_raises_with_the_pod_log(emulator: Emulator, api: Any) -> None:
    condition = {"type": "Failed", "reason": "BackoffLimitExceeded",
                 "message": "Job has reached the specified backoff limit"}  # fmt: skip
    controller = play_controller(api, condition)
    with pytest.raises(JobFailed, match="BackoffLimitExceeded") as caught:
        runner(api).run(spec())
    controller.join(10)
    assert not isinstance(caught.value, JobTimedOut)
    assert "trained: accuracy 0.97" in str(caught.value) and caught.value.log == LOG
    assert_deleted(emulator, api, the_job(emulator))


def test_deadline_exceeded_is_a_timeout(emulator: Emulator, api: Any) -> None:
    condition = {"type": "Failed", "reason": "DeadlineExceeded",
                 "message": "Job was active longer than specified deadline"}  # fmt: skip
    controller = play_controller(api, condition)
    with pytest.raises(JobTimedOut, match=r"timed out after 60 s \(DeadlineExceeded") as caught:
        runner(api).run(spec())
    controller.join(10)
    assert caught.value.log == LOG
    assert_deleted(emulator, api, the_job(emulator))


def test_no_condition_in_time_is_a_timeout_and_the_job_is_deleted(
    emulator: Emulator, api: Any
) -> None:
    controller = play_controller(api, None)  # a pod that never ends
    with pytest.raises(JobTimedOut, match="no Complete or Failed condition"):
        runner(api, grace_s=0.0).run(spec(timeout_s=1))
    controller.join(10)
    assert_deleted(emulator, api, the_job(emulator))


def test_the_job_vanishing_is_a_clear_failure(emulator: Emulator, api: Any) -> None:
    def delete_it() -> None:
        batch = client.BatchV1Api(api)
        for _ in range(200):
            try:
                jobs = batch.list_namespaced_job(NS).items
            except client.ApiException:
                jobs = []
            if jobs:
                batch.delete_namespaced_job(jobs[0].metadata.name, NS)
                return
            time.sleep(0.02)

    thief = threading.Thread(target=delete_it, daemon=True)
    thief.start()
    with pytest.raises(JobFailed, match="reading its status failed: 404"):
        runner(api).run(spec())
    thief.join(10)


def test_create_rejected_is_a_clear_failure(emulator: Emulator, api: Any) -> None:
    (
        emulator.handler[f"post /apis/batch/v1/namespaces/{NS}/jobs"]
        << 403
        << {"kind": "Status", "message": 'jobs.batch is forbidden: User "x" cannot create'}
    )
    with pytest.raises(JobFailed, match=r"creating Job .* failed: 403 .*forbidden"):
        runner(api).run(spec())


def play_kubelet(emulator: Emulator, api: Any, jobs: int) -> threading.Thread:
    """For each of `jobs` Jobs in turn: run its container's `servo step ...` here (the
    runner's folder stands for the shared volume), serve the output as its pod's log and
    set Complete or Failed by the exit code, as the Job controller would."""
    from click.testing import CliRunner

    from servo.cli import main

    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)

    def act() -> None:
        done: set[str] = set()
        for _ in range(1000):
            if len(done) == jobs:
                return
            try:
                items = batch.list_namespaced_job(NS).items
            except client.ApiException:
                items = []
            for job in items:
                name = job.metadata.name
                if name in done:
                    continue
                done.add(name)
                container = job.spec.template.spec.containers[0]
                assert container.command[:2] == ["servo", "step"]
                result = CliRunner().invoke(main, [*container.command[1:], *container.args])
                pod = f"{name}-pod"
                path = f"get /api/v1/namespaces/{NS}/pods/{pod}/log"
                log = result.output.encode()
                emulator.loop.call_soon_threadsafe(lambda p=path, b=log: emulator.handler[p] << b)
                core.create_namespaced_pod(
                    NS,
                    {
                        "metadata": {"name": pod, "namespace": NS, "labels": {"job-name": name}},
                        "spec": {"containers": [{"name": "step", "image": container.image}]},
                    },
                )
                kind = "Complete" if result.exit_code == 0 else "Failed"
                condition = {"type": kind, "status": "True", "reason": "PodFailed"}
                batch.patch_namespaced_job_status(name, NS, {"status": {"conditions": [condition]}})
            time.sleep(0.02)

    thread = threading.Thread(target=act, daemon=True)
    thread.start()
    return thread


def test_a_pipeline_runs_its_steps_as_jobs(emulator: Emulator, api: Any, tmp_path: Path) -> None:
    import numpy as np

    from registry.store import RegistryStore
    from retrain.k8s_jobs import JobStepExecutor
    from retrain.pipeline import Pipeline, Runner, Step, StepFailed
    from retrain.steps import ingest

    sink = RegistryStore(f"sqlite:///{tmp_path / 'r.db'}")
    sink.create_schema()
    csv = tmp_path / "table.csv"
    csv.write_text("a,b,y\n1.5,2,0\n3,4.25,1\n")
    jobs = JobRunner(namespace=NS, image="servo:1", mount_path=str(tmp_path.resolve()),
                     poll_s=0.05, api_client=api)  # fmt: skip
    runner = Runner(
        tmp_path / "root", sink, executor=JobStepExecutor(jobs, timeouts={"ingest": 30})
    )
    good = Step("ingest", ingest, ("data.npz",), {"table": f"file:{csv}"},
                {"dataset": "csv", "label_column": "y"})  # fmt: skip
    kubelet = play_kubelet(emulator, api, jobs=2)
    result = runner.run(Pipeline("csv").add(good))
    with np.load(result.output("ingest", "data.npz"), allow_pickle=False) as data:
        np.testing.assert_array_equal(data["y"], [0, 1])
    (step,) = sink.run(result.run_id)["steps"]
    assert step["status"] == "succeeded"
    assert '"step": "ingest"' in Path(step["log_uri"]).read_text()  # the pod's log, kept
    assert step["metrics"] == {"rows": 2.0}  # what servo step printed
    (manifest,) = [r.data for r in emulator.requests("POST") if r.data.get("kind") == "Job"]
    assert manifest["spec"]["activeDeadlineSeconds"] == 30
    assert manifest["metadata"]["labels"]["servo.dev/run"] == str(result.run_id)

    bad = Step("ingest", ingest, ("data.npz",), {"table": f"file:{csv}"},
               {"dataset": "csv", "label_column": "label"})  # fmt: skip
    with pytest.raises(StepFailed, match=r"(?s)PodFailed.*no label column 'label'"):
        runner.run(Pipeline("csv").add(bad))
    kubelet.join(10)
    (failed,) = sink.run(result.run_id + 1)["steps"]
    assert failed["status"] == "failed"
    assert "no label column 'label'" in Path(failed["log_uri"]).read_text()  # the pod's log
    assert client.BatchV1Api(api).list_namespaced_job(NS).items == []


def test_a_stop_during_the_job_deletes_it(emulator: Emulator, api: Any, tmp_path: Path) -> None:
    import os
    import signal

    from registry.store import RegistryStore
    from retrain.k8s_jobs import JobStepExecutor
    from retrain.pipeline import Pipeline, Runner, Step
    from retrain.steps import ingest
    from retrain.stop import Interrupted, Stop

    sink = RegistryStore(f"sqlite:///{tmp_path / 'r.db'}")
    sink.create_schema()
    stop = Stop()
    jobs = JobRunner(namespace=NS, image="servo:1", mount_path=str(tmp_path.resolve()),
                     poll_s=0.05, api_client=api)  # fmt: skip
    runner = Runner(tmp_path / "root", sink, stop=stop, executor=JobStepExecutor(jobs))
    step = Step("ingest", ingest, ("data.npz",), params={"dataset": "digits"})
    batch = client.BatchV1Api(api)

    def signal_once_the_job_exists() -> None:
        for _ in range(500):
            try:
                if batch.list_namespaced_job(NS).items:
                    os.kill(os.getpid(), signal.SIGUSR1)  # the Job never ends by itself
                    return
            except client.ApiException:
                pass
            time.sleep(0.02)

    previous = signal.signal(signal.SIGUSR1, lambda *_: stop.interrupt())
    try:
        signaller = threading.Thread(target=signal_once_the_job_exists, daemon=True)
        signaller.start()
        with pytest.raises(Interrupted):
            runner.run(Pipeline("digits").add(step))
        signaller.join(10)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert batch.list_namespaced_job(NS).items == []
    (run,) = sink.runs()
    assert run["status"] == "interrupted"
    assert [s["status"] for s in sink.run(run["id"])["steps"]] == ["interrupted"]


def test_a_retrain_runs_its_steps_as_jobs_with_servo_steps_kubernetes(
    emulator: Emulator, api: Any, tmp_path: Path
) -> None:
    """SERVO_STEPS=kubernetes as the loop's training worker reads it: servo.train.train
    runs every step of the digits pipeline as a Job with the data claim mounted at the
    work folder's path, and registers the version."""
    from registry.store import RegistryStore
    from servo.settings import Settings
    from servo.train import step_executor, train

    with pytest.raises(ValueError, match="SERVO_K8S_JOB_IMAGE and SERVO_K8S_JOB_CLAIM"):
        Settings(steps="kubernetes")
    assert step_executor(Settings(), tmp_path) is None  # the default: steps run here
    settings = Settings(steps="kubernetes", k8s_namespace=NS, k8s_job_image="servo:1",
                        k8s_job_claim="servo-data", k8s_job_timeout_s=900)  # fmt: skip
    work = tmp_path / "work"
    executor = step_executor(settings, work, api_client=api)
    assert executor is not None
    executor.jobs.poll_s = 0.05  # type: ignore[attr-defined]
    store = RegistryStore(f"sqlite:///{tmp_path / 'r.db'}")
    store.create_schema()
    kubelet = play_kubelet(emulator, api, jobs=4)
    trained = train(store, work=work, params={"max_iter": 50}, cache=False, executor=executor)
    kubelet.join(10)
    assert trained.version == 1 and trained.metrics["accuracy"] > 0.8
    steps = store.run(trained.run.run_id)["steps"]
    assert [s["step"] for s in steps] == ["ingest", "split", "train", "evaluate"]
    for step in steps:  # each one's log is its pod's: what servo step printed there
        assert f'"step": "{step["step"]}"' in Path(step["log_uri"]).read_text()
    jobs = [r.data for r in emulator.requests("POST") if r.data.get("kind") == "Job"]
    assert len(jobs) == 4
    for job in jobs:
        pod = job["spec"]["template"]["spec"]
        assert pod["volumes"] == [
            {"name": "artifacts", "persistentVolumeClaim": {"claimName": "servo-data"}}
        ]
        assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == str(work.resolve())
        assert pod["containers"][0]["image"] == "servo:1"
        assert job["spec"]["activeDeadlineSeconds"] == 900
    assert client.BatchV1Api(api).list_namespaced_job(NS).items == []
