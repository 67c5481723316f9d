"""Training in a worker process (servo.worker): real `python -m servo.worker` processes on
a real SQLite registry. A run that succeeds, one that fails, one stopped mid-step (marked
interrupted, nothing half-registered), one killed after its grace, and a parent killed
with -9 whose worker does not outlive it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.lease import Lease, alive, process_identity
from registry.store import RegistryStore
from servo.worker import TrainingJob, TrainSpec
from tests.crash import ROOT, check_invariants, query

#: a model that trains fast (a few seconds with the imports)
QUICK = {"max_iter": 40, "hidden": [16]}
#: a train step that would run for hours: gradient boosting without early stopping
SLOW = {"framework": "sklearn-gbt", "max_iter": 1_000_000}


@pytest.fixture
def db(tmp_path: Path) -> Path:
    store = RegistryStore(f"sqlite:///{tmp_path / 'r.db'}")
    store.create_schema()
    store.close()
    return tmp_path / "r.db"


@pytest.fixture
def jobs() -> Iterator[list[TrainingJob]]:
    """Jobs a test started: killed at the end if they still run."""
    started: list[TrainingJob] = []
    yield started
    for job in started:
        if job.poll() is None:
            job.stop(grace_s=0)


def spec(db: Path, tmp_path: Path, params: dict[str, object], **fields: object) -> TrainSpec:
    return TrainSpec(
        registry_url=f"sqlite:///{db}", work_dir=str(tmp_path / "work"),
        name=str(fields.pop("name", "digits")), params=dict(params), **fields,  # type: ignore[arg-type]
    )  # fmt: skip


def start(jobs: list[TrainingJob], made: TrainSpec, log_dir: Path) -> TrainingJob:
    job = TrainingJob.start(made, log_dir)
    jobs.append(job)
    return job


def wait_until(condition: object, every: float = 0.05) -> None:
    """Poll until `condition()` holds (the test's timeout bounds it)."""
    while not condition():  # type: ignore[operator]
        time.sleep(every)


def step_started(db: Path, run_id: int | None, done: str) -> bool:
    """Whether the run has recorded step `done` (so the next step runs)."""
    if run_id is None:
        return False
    rows = query(db, "SELECT step FROM step_runs WHERE run_id = ?", run_id)
    return done in {r["step"] for r in rows}


def in_step(work: Path, step: str) -> bool:
    """Whether a run's step has begun (its work folder is in the run's scratch folder)."""
    return any((work / "pipeline" / "tmp").glob(f"run-*.tmp/{step}-*"))


def test_a_run_that_succeeds(db: Path, tmp_path: Path, jobs: list[TrainingJob]) -> None:
    made = spec(db, tmp_path, QUICK, trigger="manual", triggered_by="alice")
    job = start(jobs, made, tmp_path / "logs")
    assert job.pid != os.getpid()
    outcome = job.wait(timeout_s=240)
    assert outcome.status == "succeeded", outcome.error
    assert outcome.version == 1 and not outcome.reused and outcome.error is None
    assert outcome.metrics["accuracy"] > 0.8 and outcome.metrics["holdout_rows"] > 400
    assert job.run_id() == outcome.run_id
    (run,) = query(db, "SELECT * FROM pipeline_runs")
    assert (run["id"], run["status"], run["trigger"]) == (outcome.run_id, "succeeded", "manual")
    assert (run["model"], run["triggered_by"]) == ("digits", "alice")
    assert run["lease_pid"] == job.pid  # the run ran in the worker, not here
    (version,) = query(db, "SELECT * FROM model_versions")
    assert version["servable"] and version["run_id"] == outcome.run_id
    # the log is kept, named run-1.log, and holds the worker's own lines
    assert outcome.log_path == str(tmp_path / "logs" / "run-1.log")
    assert "training digits succeeded" in Path(outcome.log_path).read_text()
    assert json.loads(job.outcome_path.read_text())["status"] == "succeeded"
    assert job.poll() == outcome  # the same outcome, again
    # a second job gets the next log; the same spec again registers nothing new
    again = start(jobs, spec(db, tmp_path, QUICK), tmp_path / "logs").wait(timeout_s=240)
    assert again.status == "succeeded" and again.reused and again.version == 1
    assert again.log_path.endswith("run-2.log")
    (_, second) = query(db, "SELECT * FROM pipeline_runs ORDER BY id")
    assert (second["model"], second["triggered_by"]) == ("digits", None)
    check_invariants(db, tmp_path / "work")


def test_a_run_that_fails(db: Path, tmp_path: Path, jobs: list[TrainingJob]) -> None:
    job = start(jobs, spec(db, tmp_path, {"framework": "no-such-framework"}), tmp_path / "l")
    outcome = job.wait(timeout_s=240)
    assert outcome.status == "failed" and outcome.version is None
    assert outcome.error is not None and "no-such-framework" in outcome.error
    assert "step 'train' failed" in outcome.error
    (run,) = query(db, "SELECT * FROM pipeline_runs")
    assert run["id"] == outcome.run_id and run["status"] == "failed"
    assert query(db, "SELECT * FROM model_versions") == []
    assert "no-such-framework" in Path(outcome.log_path).read_text()
    # refused before any run: a bad name, a bad dataset parameter
    bad_name = start(jobs, spec(db, tmp_path, QUICK, name="../etc"), tmp_path / "l")
    outcome = bad_name.wait(timeout_s=240)
    assert outcome.status == "failed" and outcome.run_id is None
    assert outcome.error is not None and "invalid model name '../etc'" in outcome.error
    share = {"payload_log_root": str(tmp_path / "log"), "production_share": 2}
    outcome = start(jobs, spec(db, tmp_path, share), tmp_path / "l").wait(timeout_s=240)
    assert outcome.status == "failed" and outcome.run_id is None
    assert outcome.error == "ValueError: production_share must be within [0, 1], got 2"
    assert len(query(db, "SELECT * FROM pipeline_runs")) == 1
    check_invariants(db, tmp_path / "work")


def test_a_run_stopped_mid_step_is_interrupted(
    db: Path, tmp_path: Path, jobs: list[TrainingJob]
) -> None:
    job = start(jobs, spec(db, tmp_path, SLOW), tmp_path / "logs")
    wait_until(lambda: in_step(tmp_path / "work", "train"))
    outcome = job.stop(grace_s=120)
    assert outcome.status == "interrupted", (outcome, Path(outcome.log_path).read_text())
    assert outcome.error == "stopped during step 'train'"
    assert outcome.run_id == job.run_id() and outcome.version is None
    (run,) = query(db, "SELECT * FROM pipeline_runs")
    assert run["status"] == "interrupted" and run["scratch"] is None
    assert run["error"] == "Interrupted: stopped during step 'train'"
    steps = {r["step"]: r["status"] for r in query(db, "SELECT * FROM step_runs")}
    assert steps == {"ingest": "succeeded", "split": "succeeded", "train": "interrupted"}
    assert query(db, "SELECT * FROM model_versions") == []
    assert "signal 15: stopping the run" in Path(outcome.log_path).read_text()
    check_invariants(db, tmp_path / "work")  # no scratch folder, nothing running
    # the registry and the work folder are fit for the next run: it reuses the cached
    # steps and registers version 1
    after = start(jobs, spec(db, tmp_path, QUICK), tmp_path / "logs").wait(timeout_s=240)
    assert after.status == "succeeded" and after.version == 1
    check_invariants(db, tmp_path / "work")


def test_a_run_that_outlives_its_grace_is_killed(
    db: Path, tmp_path: Path, jobs: list[TrainingJob]
) -> None:
    job = start(jobs, spec(db, tmp_path, SLOW), tmp_path / "logs")
    wait_until(lambda: step_started(db, job.run_id(), "split"))
    # a worker that cannot act on SIGTERM (stopped: the signal stays pending) is killed
    # once the grace is over
    os.kill(job.pid, signal.SIGSTOP)
    outcome = job.stop(grace_s=0.5)
    assert outcome.status == "interrupted" and outcome.run_id == job.run_id()
    assert outcome.error is not None and "killed by signal 9" in outcome.error
    (run,) = query(db, "SELECT * FROM pipeline_runs")
    assert run["status"] == "running"  # as it was when it died
    store = RegistryStore(f"sqlite:///{db}")
    try:
        assert store.recover_runs() == [run["id"]]  # found dead by the recovery check
    finally:
        store.close()
    (run,) = query(db, "SELECT * FROM pipeline_runs")
    assert run["status"] == "failed" and "found dead" in run["error"]
    check_invariants(db, tmp_path / "work")


def gone(pid: int, identity: str) -> bool:
    """The process is gone (or a zombie: nobody reaped it yet)."""
    return not alive(Lease("", pid, identity))


def test_a_worker_does_not_outlive_its_parent(db: Path, tmp_path: Path) -> None:
    made = spec(db, tmp_path, SLOW)
    program = textwrap.dedent(f"""
        import sys, threading, time
        from pathlib import Path
        from servo.worker import TrainingJob, TrainSpec
        spec = TrainSpec(**{made.__dict__!r})
        job = []
        # started from a thread that then ends: the worker must not stop with it
        thread = threading.Thread(target=lambda: job.append(
            TrainingJob.start(spec, Path({str(tmp_path / "logs")!r}))))
        thread.start(); thread.join()
        print(job[0].pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen(
        [sys.executable, "-c", program], stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    child, identity = 0, ""
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        identity = process_identity(child)
        wait_until(lambda: step_started(db, run_of(db), "split"))
        assert not gone(child, identity)  # the spawning thread ended; the worker runs on
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        wait_until(lambda: gone(child, identity))
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=30)
        if parent.stdout is not None:
            parent.stdout.close()
        if child and not gone(child, identity):  # a failed check leaves no worker behind
            os.kill(child, signal.SIGKILL)
    # it stopped the way a stop does: its run is interrupted, not left for recovery
    (run,) = query(db, "SELECT * FROM pipeline_runs")
    worker_log = (tmp_path / "logs" / "run-1.log").read_text()
    assert run["status"] == "interrupted", (dict(run), worker_log)
    outcome = json.loads((tmp_path / "logs" / "run-1.outcome.json").read_text())
    assert outcome["status"] == "interrupted"
    check_invariants(db, tmp_path / "work")


def run_of(db: Path) -> int | None:
    rows = query(db, "SELECT id FROM pipeline_runs")
    return int(rows[0]["id"]) if rows else None


# the runner's cooperative stop, in process


def test_a_stop_between_steps_ends_the_run_before_the_next(tmp_path: Path) -> None:
    from retrain.pipeline import Pipeline, Runner, Step, StepContext
    from retrain.stop import Interrupted, Stop

    stop = Stop()
    ran: list[str] = []

    def first(ctx: StepContext) -> None:
        ran.append("first")
        ctx.output("a.txt").write_text("a")
        stop.set()  # as another thread would

    def second(ctx: StepContext) -> None:
        ran.append("second")
        ctx.output("b.txt").write_text("b")

    store = RegistryStore(f"sqlite:///{tmp_path / 'r.db'}")
    store.create_schema()
    pipeline = Pipeline("p").add(Step("first", first, ("a.txt",)))
    pipeline.add(Step("second", second, ("b.txt",), {"a": "first.a.txt"}))
    try:
        with pytest.raises(Interrupted, match="stopped before step 'second'"):
            Runner(tmp_path / "w", store, stop=stop).run(pipeline)
        (run,) = store.runs()
        assert run["status"] == "interrupted" and ran == ["first"]
        assert [s["step"] for s in store.run(run["id"])["steps"]] == ["first"]
    finally:
        store.close()


def test_a_signal_interrupts_the_step_it_lands_in(tmp_path: Path) -> None:
    """Inside a step function a signal's handler raises Interrupted, which the step's own
    `except Exception` does not swallow, and the step is not retried."""
    from retrain.pipeline import Pipeline, Runner, Step, StepContext
    from retrain.stop import Interrupted, Stop

    stop = Stop()
    attempts: list[int] = []

    def stubborn(ctx: StepContext) -> None:
        attempts.append(1)
        try:
            signal.raise_signal(signal.SIGUSR2)
            ctx.output("a.txt").write_text("not reached")
        except Exception:
            ctx.output("a.txt").write_text("swallowed")

    previous = signal.signal(signal.SIGUSR2, lambda *_: stop.interrupt())
    store = RegistryStore(f"sqlite:///{tmp_path / 'r.db'}")
    store.create_schema()
    try:
        with pytest.raises(Interrupted, match="stopped during step 'stubborn'"):
            Runner(tmp_path / "w", store, stop=stop).run(
                Pipeline("p").add(Step("stubborn", stubborn, ("a.txt",), retries=3))
            )
        (run,) = store.runs()
        assert run["status"] == "interrupted" and attempts == [1]
        (step,) = store.run(run["id"])["steps"]
        assert step["status"] == "interrupted"
        assert not (tmp_path / "w" / "artifacts").exists()
    finally:
        signal.signal(signal.SIGUSR2, previous)
        store.close()
