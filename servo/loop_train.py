"""Bootstrap training for `servo up`: one pipeline run in a worker process
(servo.worker.TrainingJob, as the loop's retrains), never on the serving interpreter."""

from __future__ import annotations

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
