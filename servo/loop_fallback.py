"""TEMPORARY: an in-process interval scheduler with LoopScheduler's interface, used until
retrain.scheduler (APScheduler on the registry database) is merged. Delete it then."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("servo.loop")


class ThreadScheduler:
    def __init__(self, registry_url: str = ""):
        self._handlers: dict[str, Callable[[str], None]] = {}
        self._every: dict[str, float] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def on(self, kind: str, handler: Callable[[str], None]) -> None:
        self._handlers[kind] = handler

    def schedule_checks(self, model: str, every_s: float) -> None:
        self._every[model] = every_s

    def schedule_cron(self, model: str, cron: str | None) -> None:
        if cron is not None:
            log.warning("cron schedules need retrain.scheduler; %s's is ignored", model)

    def _run(self, model: str, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self._handlers["check"](model)
            except Exception:
                log.exception("check of %s failed", model)

    def start(self) -> None:
        for model, every_s in self._every.items():
            thread = threading.Thread(target=self._run, args=(model, every_s), daemon=True)
            thread.start()
            self._threads.append(thread)

    def shutdown(self, wait: bool = True) -> None:
        self._stop.set()
        if wait:
            for thread in self._threads:
                thread.join()
