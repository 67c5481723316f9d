"""Training in a worker process: never on the serving process's interpreter.

`TrainingJob.start(spec, log_dir)` spawns `python -m servo.worker`, hands it the spec as
JSON on stdin, and returns at once. The worker runs `servo.train.train` (pipeline and
registration, with the registry's leases and recovery), writes its outcome as a JSON file
(atomically) and exits. Its stdout and stderr go to `log_dir/run-<n>.log`, kept.

- It never outlives its parent: it asks the kernel for SIGTERM when the thread that
  spawned it ends (PR_SET_PDEATHSIG; `TrainingJob` spawns from one long-lived thread, so
  that is when the parent process ends), and checks that its parent still lives once the
  request is set (a parent that died before it asked is noticed).
- SIGTERM (from `stop()`, or its parent's death) stops the run: before its next step, or
  inside the step it is running; the run is marked "interrupted", what it reserved and did
  not publish is failed. A run that does not end within the grace is killed (SIGKILL) and
  the registry's recovery check marks it failed (its process is gone).
- It runs in its own session: a Ctrl-C in the parent's terminal reaches the parent only,
  which stops the job its own way.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, TypeAdapter

from retrain.stop import Interrupted, Stop

log = logging.getLogger("servo")

Status = Literal["succeeded", "failed", "interrupted"]

#: exit codes of the worker (its outcome file says more)
EXIT_CODES: dict[str, int] = {"succeeded": 0, "failed": 1, "interrupted": 3}

PR_SET_PDEATHSIG = 1


@dataclass
class TrainSpec:
    """What one training job runs: servo.train.train's arguments."""

    registry_url: str
    work_dir: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    trigger: str = "manual"
    triggered_by: str | None = None
    artifacts: str | None = None
    cache: bool = True


@dataclass
class TrainOutcome:
    status: Status
    run_id: int | None
    version: int | None
    #: an identical version was registered before (nothing new)
    reused: bool
    #: the candidate's evaluation document (evaluation.json) when it succeeded
    metrics: dict[str, Any]
    error: str | None
    log_path: str


class _Request(BaseModel):
    """The worker's stdin (a wire format)."""

    model_config = ConfigDict(extra="forbid")

    spec: TrainSpec
    log_path: str
    parent_pid: int


_OUTCOME = TypeAdapter(TrainOutcome)


class _Spawner:
    """Starts worker processes from one long-lived daemon thread: PR_SET_PDEATHSIG fires
    when the thread that forked the child ends, so a short-lived caller thread must not be
    that thread."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], queue.Queue[Any]]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def call(self, fn: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="servo-spawner",
                                                daemon=True)  # fmt: skip
                self._thread.start()
        answer: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._jobs.put((fn, answer))
        result = answer.get()
        if isinstance(result, BaseException):
            raise result
        process: subprocess.Popen[bytes] = result
        return process

    def _serve(self) -> None:
        while True:
            fn, answer = self._jobs.get()
            try:
                answer.put(fn())
            except BaseException as exc:  # handed to the caller
                answer.put(exc)


_SPAWNER = _Spawner()


def _open_log(log_dir: Path) -> tuple[Path, IO[bytes]]:
    """A new log file `run-<n>.log` (the next free n; exclusive, so two processes sharing
    the folder never write one file)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name[4:-4]) for p in log_dir.glob("run-*.log") if p.name[4:-4].isdigit()]
    n = max(taken, default=0) + 1
    while True:
        path = log_dir / f"run-{n}.log"
        try:
            return path, path.open("xb")
        except FileExistsError:
            n += 1


class TrainingJob:
    """One pipeline run in a worker process (see the module docstring)."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path):
        self._process = process
        self.log_path = log_path
        self.outcome_path = _outcome_path(log_path)
        self._outcome: TrainOutcome | None = None
        self._stopped = False
        self._lock = threading.Lock()

    @classmethod
    def start(cls, spec: TrainSpec, log_dir: Path) -> TrainingJob:
        log_path, log_file = _open_log(Path(log_dir))
        request = _Request(spec=spec, log_path=str(log_path), parent_pid=os.getpid())

        def spawn() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [sys.executable, "-m", "servo.worker"], stdin=subprocess.PIPE,
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

        try:
            process = _SPAWNER.call(spawn)
        finally:
            log_file.close()
        if process.stdin is None:
            raise RuntimeError("the worker process has no stdin")
        with contextlib.suppress(BrokenPipeError):  # it died at once: its log says why
            process.stdin.write(request.model_dump_json().encode())
            process.stdin.close()
        log.info("training job for %s started: pid %d, log %s", spec.name, process.pid,
                 log_path)  # fmt: skip
        return cls(process, log_path)

    @property
    def pid(self) -> int:
        return self._process.pid

    def run_id(self) -> int | None:
        """The pipeline run's id once the worker has recorded the run (None before)."""
        try:
            return int(_started_path(self.log_path).read_text())
        except (OSError, ValueError):
            return None

    def poll(self) -> TrainOutcome | None:
        """The outcome once the worker has exited, else None."""
        code = self._process.poll()
        return None if code is None else self._finish(code)

    def wait(self, timeout_s: float | None = None) -> TrainOutcome:
        """Wait for the worker to exit (subprocess.TimeoutExpired after `timeout_s`)."""
        return self._finish(self._process.wait(timeout_s))

    def stop(self, grace_s: float = 10.0) -> TrainOutcome:
        """Stop the run: SIGTERM (the worker marks its run interrupted and exits), then
        SIGKILL if it still runs after `grace_s` (the recovery check then marks its run
        failed). A job that has already ended returns its outcome."""
        if self._process.poll() is None:
            self._stopped = True
            self._signal(signal.SIGTERM)
            try:
                self._process.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("training job pid %d did not stop within %.0f s: killed",
                            self.pid, grace_s)  # fmt: skip
                self._signal(signal.SIGKILL)
                self._process.wait()
        return self._finish(self._process.wait())

    def _signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # already gone
            self._process.send_signal(signum)

    def _read(self) -> TrainOutcome | None:
        try:
            return _OUTCOME.validate_json(self.outcome_path.read_bytes())
        except (OSError, ValueError):
            return None

    def _finish(self, code: int) -> TrainOutcome:
        with self._lock:
            if self._outcome is not None:
                return self._outcome
            written = self._read()  # written last: the run ended as it says
            if written is not None:
                if code != EXIT_CODES[written.status]:
                    log.warning("training job pid %d %s, then exited with %d", self.pid,
                                written.status, code)  # fmt: skip
                self._outcome = written
            else:  # killed, or crashed before it could say
                how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
                status: Status = "interrupted" if self._stopped else "failed"
                self._outcome = TrainOutcome(
                    status=status, run_id=self.run_id(), version=None, reused=False,
                    metrics={}, log_path=str(self.log_path),
                    error=f"the training worker {how} without an outcome (see {self.log_path})",
                )  # fmt: skip
            return self._outcome


def _outcome_path(log_path: Path) -> Path:
    return log_path.with_suffix(".outcome.json")


def _started_path(log_path: Path) -> Path:
    return log_path.with_suffix(".run-id")


# the worker process


def _write(path: Path, text: str) -> None:
    """Write a file atomically (a reader never sees half of it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _die_with_parent(parent_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("PR_SET_PDEATHSIG not set (errno %d)", ctypes.get_errno())
    if os.getppid() != parent_pid:  # it died before the request: nobody would signal us
        raise SystemExit(f"the parent process {parent_pid} is gone")


def main(stdin: IO[bytes] | None = None) -> int:
    """`python -m servo.worker`: the request on stdin, the outcome to its file."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID`: its threads' stacks, logged
    request = _Request.model_validate_json((stdin or sys.stdin.buffer).read())
    _die_with_parent(request.parent_pid)
    stop = Stop()

    def on_signal(signum: int, _frame: Any) -> None:
        log.warning("signal %d: stopping the run", signum)
        stop.interrupt()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    spec = request.spec
    log_path = request.log_path
    run: list[int] = []

    def started(run_id: int) -> None:
        run.append(run_id)
        _write(_started_path(Path(log_path)), str(run_id))

    outcome = TrainOutcome("failed", None, None, False, {}, None, log_path)
    began = time.monotonic()
    try:
        outcome = _train(spec, stop, started, log_path)
    except Interrupted as exc:
        outcome.status, outcome.error = "interrupted", str(exc)
    except Exception as exc:
        log.exception("training %s failed", spec.name)
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.run_id = outcome.run_id or (run[0] if run else None)
    # no signal may cut the outcome short now (a stop meanwhile changes nothing)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _write(_outcome_path(Path(log_path)),
           json.dumps(asdict(outcome), allow_nan=False, default=str))  # fmt: skip
    log.info("training %s %s in %.1f s (run %s, version %s)", spec.name, outcome.status,
             time.monotonic() - began, outcome.run_id, outcome.version)  # fmt: skip
    return EXIT_CODES[outcome.status]


def _train(
    spec: TrainSpec, stop: Stop, started: Callable[[int], None], log_path: str
) -> TrainOutcome:
    from registry.store import RegistryStore
    from servo.settings import Settings
    from servo.train import step_executor, train

    if spec.registry_url.startswith("sqlite:///"):
        Path(spec.registry_url.removeprefix("sqlite:///")).parent.mkdir(parents=True,
                                                                        exist_ok=True)  # fmt: skip
    # the environment servo up started it with: SERVO_STEPS=kubernetes runs steps as Jobs
    executor = step_executor(Settings(), Path(spec.work_dir))
    store = RegistryStore(spec.registry_url)
    try:
        store.create_schema()
        trained = train(
            store, work=Path(spec.work_dir), name=spec.name, params=dict(spec.params),
            cache=spec.cache, trigger=spec.trigger, artifacts=spec.artifacts,
            triggered_by=spec.triggered_by, stop=stop, on_start=started, executor=executor,
        )  # fmt: skip
    finally:
        store.close()
    return TrainOutcome("succeeded", trained.run.run_id, trained.version, trained.reused,
                        trained.metrics, None, log_path)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
