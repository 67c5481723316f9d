"""Stopping a pipeline run on purpose (retrain.pipeline.Runner takes a `Stop`)."""

from __future__ import annotations

import threading


class Interrupted(BaseException):
    """A run stopped on purpose (like KeyboardInterrupt, not an Exception: a step's own
    `except Exception` does not swallow it)."""


class Stop:
    """A cooperative stop, shared by whoever runs a pipeline and whoever stops it."""

    def __init__(self) -> None:
        self._event = threading.Event()
        #: the step whose function runs now (set by the runner)
        self.step: str | None = None

    def set(self) -> None:
        """Ask the run to stop (any thread): it ends before its next step."""
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def interrupt(self) -> None:
        """From a signal handler (main thread): stop, and if a step function is running,
        raise `Interrupted` inside it."""
        self.set()
        step = self.step
        if step is not None:
            raise Interrupted(f"stopped during step '{step}'")

    def check(self, where: str) -> None:
        """Raise Interrupted ("stopped WHERE") if a stop was asked for."""
        if self.is_set():
            raise Interrupted(f"stopped {where}")
