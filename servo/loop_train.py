"""Training for the loop: one pipeline run in a worker process (servo.worker), never on
the serving interpreter."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from registry.store import RegistryStore


@dataclass
class Outcome:
    status: str
    run_id: int | None
    version: int | None
    reused: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def train_once(
    store: RegistryStore, directory: Path, model: str, params: dict[str, Any], trigger: str
) -> Outcome:
    """Train `model` and register it; blocks until the run ends."""
    from servo.train import train

    trained = train(store, work=directory, name=model, params=params, trigger=trigger)
    return Outcome("succeeded", trained.run.run_id, trained.version, trained.reused,
                   trained.metrics)  # fmt: skip
