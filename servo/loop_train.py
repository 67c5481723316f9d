"""Bootstrap training for `servo up`: one pipeline run in a worker process
(servo.worker.TrainingJob, as the loop's retrains), never on the serving interpreter."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from servo.worker import TrainingJob, TrainOutcome, TrainSpec


def train_once(
    registry_url: str, directory: Path, model: str, params: dict[str, Any], trigger: str
) -> TrainOutcome:
    """Train `model` in a worker process and register it; blocks until the run ends."""
    spec = TrainSpec(registry_url=registry_url, work_dir=str(directory.resolve()), name=model,
                     params=params, trigger=trigger)  # fmt: skip
    job = TrainingJob.start(spec, directory / "logs")
    try:
        return job.wait()
    except BaseException:
        job.stop()
        raise


#: the loop's training workers run at this niceness: on a machine whose cores are all
#: busy, serving keeps the CPU it needs (nothing is lost when cores are idle)
WORKER_NICE = 10


def start_worker(spec: TrainSpec, log_dir: Path, nice: int = WORKER_NICE) -> TrainingJob:
    """A training job at `nice` (set right after the spawn, before the worker's imports
    create its threads, which inherit it)."""
    job = TrainingJob.start(spec, log_dir)
    if nice:
        with contextlib.suppress(OSError):  # the worker already exited
            os.setpriority(os.PRIO_PROCESS, job.pid, nice)
    return job
