"""The monitors inside `servo serve` (the embedded default): every `every_s` seconds the
gateway's own registry is snapshotted (`EmbeddedSource`), a `MonitorReport` is computed
for each loaded version that has a reference profile, and the reports are exported on the
same `/metrics` as `servo_drift_score{feature,stat}`, `servo_accuracy{window}` and
`servo_label_coverage{window}`. Everything runs on the serving event loop (the recorder
belongs to it); a report takes milliseconds (benchmarks/monitors.py)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from monitors.monitor import MonitorConfig, MonitorExporter, build_report
from monitors.sources import EmbeddedSource

log = logging.getLogger("servo.monitor")


class EmbeddedMonitor:
    def __init__(self, server: Any, *, every_s: float, config: MonitorConfig):
        self.server = server
        self.every_s = every_s
        self.config = config
        self.source = EmbeddedSource(
            server.registry, full_s=config.window_s + every_s, keep_s=config.history_s
        )
        self.exporter = MonitorExporter(server.registry)
        self.rounds = 0

    def check(self) -> None:
        """One round: one snapshot, then a report per loaded version with a profile."""
        self.source.snapshot()
        for entry in self.server.repository.entries():
            model = entry.model
            if model is None or model.profile is None:
                continue
            data = self.source.window(
                entry.name,
                entry.version,
                self.config.window_s,
                history_s=self.config.history_s,
                step_s=self.every_s,
                fresh=False,
            )
            accuracy = model.card.metrics.get("accuracy")
            report = build_report(
                data,
                model.profile,
                baseline=float(accuracy) if isinstance(accuracy, int | float) else None,
                config=self.config,
                source="embedded",
            )
            self.exporter.update(report)
            if report.reasons:
                log.warning(
                    "%s version %s: %s", entry.name, entry.version, ", ".join(report.reasons)
                )
        self.rounds += 1

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            try:
                self.check()
            except Exception:
                log.exception("monitor round failed; the gateway keeps serving")
