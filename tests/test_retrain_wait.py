"""An alarm-triggered retrain waits for `retrain.min_labelled` labelled rows since the
alarm (or `wait_s`), on the real controller: a real SQLite registry, real monitor reports
(the regular check from seeded drifted windows, the count from a real EmbeddedSource over
real feedback counters, on the controller's clock) and a real training worker once the
retrain starts. A restart (a new controller on the same registry) keeps waiting; 0 starts
at once; a manual request while waiting starts at once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from monitors.monitor import MonitorConfig, MonitorReport, build_report
from monitors.profile import ReferenceProfile
from monitors.sources import EmbeddedSource
from registry.store import RegistryStore
from retrain.policy import parse_config
from servo.loop import Controller, ControllerConfig
from tests import test_monitor, test_trigger

reference_profile = test_monitor.profile
MODEL = "digits"
WINDOW_S = 2.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Reports:
    """The controller's reports: its regular check (window WINDOW_S) from seeded input-drift
    windows, any other window from an EmbeddedSource over the labels given by `label`."""

    def __init__(self, profile: ReferenceProfile, clock: Clock):
        self.profile = profile
        self.seeded = test_trigger.Reports(profile, seed=0)
        self.metrics = CollectorRegistry()
        self.feedback = Counter("servo_feedback", "labels", ["model", "version", "outcome"],
                                registry=self.metrics)  # fmt: skip
        self.source = EmbeddedSource(self.metrics, clock=clock)
        self.counted: list[float] = []

    def label(self, n: int) -> None:
        self.feedback.labels(MODEL, "1", "correct").inc(n)

    def report(self, model: str, version: int, config: MonitorConfig, timeout_s: float = 30.0,
               *, export: bool = True) -> MonitorReport:  # fmt: skip
        if config.window_s == WINDOW_S:  # the check: the embedded source snapshots, too
            self.source.snapshot()
            return self.seeded.input_drift()
        assert not export  # a count, not the monitors' window shown in the metrics
        self.counted.append(config.window_s)
        data = self.source.window(model, str(version), config.window_s,
                                  history_s=config.history_s, step_s=config.step_s)  # fmt: skip
        return build_report(data, self.profile, baseline=0.95, config=config)


class Scheduler:
    def shutdown(self, wait: bool = True) -> None:
        pass


def policy(min_labelled: int, wait_s: float = 600.0) -> str:
    return f"""
defaults:
  check_every_s: 1
  monitor_window_s: {WINDOW_S}
  trigger: {{on: [input_drift], k: 2, cooldown_s: 3600, budget_per_day: 3}}
  retrain: {{window_s: 10, min_labelled: {min_labelled}, wait_s: {wait_s}}}
"""


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RegistryStore]:
    made = RegistryStore(f"sqlite:///{tmp_path / 'registry.db'}")
    made.create_schema()
    made.register_version(MODEL, "file:///m/digits/1", {})
    made.set_deployments(MODEL, [(1, "champion", 100.0)], actor="bootstrap")
    made.set_alias(MODEL, "champion", 1, actor="bootstrap")
    yield made
    made.close()


class Loop:
    """A controller on `store`, ticked by hand on a clock moved by hand."""

    def __init__(self, store: RegistryStore, tmp_path: Path, profile: ReferenceProfile,
                 text: str, clock: Clock | None = None):  # fmt: skip
        self.store = store
        self.clock = clock or Clock()
        self.reports = Reports(profile, self.clock)
        settings = ControllerConfig(directory=tmp_path, registry_url=str(store.engine.url),
                                    payload_root=tmp_path / "payloads")  # fmt: skip
        self.controller = Controller(store, config=parse_config(text), reports=self.reports,  # type: ignore[arg-type]
                                     rollout=object(), scheduler=Scheduler(),  # type: ignore[arg-type]
                                     settings=settings, clock=self.clock)  # fmt: skip

    def tick(self, seconds: float = 1.0) -> None:
        self.clock.now += seconds
        self.controller.tick(MODEL)

    def kinds(self) -> list[str]:
        return [e["kind"] for e in self.store.loop_events(MODEL) if e["kind"] != "check"]

    def detail(self) -> dict[str, Any]:
        return dict(self.store.loop_states()[MODEL]["detail"] or {})

    def started(self) -> dict[str, Any]:
        (event,) = self.store.loop_events(MODEL, kinds=["retrain_started"])
        return dict(event["detail"])


@pytest.fixture
def stopped() -> Iterator[list[Loop]]:
    loops: list[Loop] = []
    yield loops
    for loop in loops:
        loop.controller.stop()  # a started training worker is stopped


def test_an_alarm_waits_for_min_labelled_rows_since_it(
    store: RegistryStore, tmp_path: Path, reference_profile: ReferenceProfile,
    stopped: list[Loop],
) -> None:  # fmt: skip
    loop = Loop(store, tmp_path, reference_profile, policy(min_labelled=100))
    stopped.append(loop)
    loop.reports.label(500)  # before the alarm: not counted
    loop.tick()
    loop.tick()  # the 2nd alarmed check: the alarm, then waiting
    assert loop.kinds() == ["alarm", "retrain_waiting"]
    alarm = loop.detail()["alarm"]
    assert alarm["signals"] == ["input_drift"] and alarm["at"] == loop.clock.now
    assert "input_drift on 2 consecutive checks" in alarm["reason"]
    assert store.loop_states()[MODEL]["state"] == "watching"
    loop.reports.label(60)
    loop.tick()
    loop.tick(5.0)  # 60 of 100: waits on (one log line per check, no new event)
    assert loop.kinds() == ["alarm", "retrain_waiting"]
    assert loop.reports.counted == [1.0, 6.0]  # the window since the alarm
    loop.reports.label(40)
    loop.tick()
    assert loop.kinds() == ["alarm", "retrain_waiting", "retrain_started"]
    started = loop.started()
    assert started["trigger"] == "input_drift" and started["labelled"] == 100
    assert started["min_labelled"] == 100 and started["waited_s"] == 7.0
    assert store.loop_states()[MODEL]["state"] == "retraining"
    assert loop.detail()["alarm"] is None


def test_an_alarm_starts_anyway_after_wait_s(
    store: RegistryStore, tmp_path: Path, reference_profile: ReferenceProfile,
    stopped: list[Loop],
) -> None:  # fmt: skip
    loop = Loop(store, tmp_path, reference_profile, policy(min_labelled=100, wait_s=30))
    stopped.append(loop)
    loop.tick()
    loop.tick()
    loop.reports.label(10)
    loop.tick(29.0)
    assert loop.kinds() == ["alarm", "retrain_waiting"]
    loop.tick(1.0)  # 30 s after the alarm, 10 of 100 labelled rows
    started = loop.started()
    assert started["labelled"] == 10 and started["why"] == "wait_s 30 passed"


def test_a_restart_while_waiting_keeps_waiting(
    store: RegistryStore, tmp_path: Path, reference_profile: ReferenceProfile,
    stopped: list[Loop],
) -> None:  # fmt: skip
    first = Loop(store, tmp_path, reference_profile, policy(min_labelled=100))
    first.tick()
    first.tick()
    first.reports.label(60)
    first.tick()
    assert first.kinds() == ["alarm", "retrain_waiting"]
    # a new process: its embedded source starts empty, so the count starts again (never
    # more than the truth); the alarm is in the registry and is waited for
    second = Loop(store, tmp_path, reference_profile, policy(min_labelled=100), first.clock)
    stopped.append(second)
    second.tick()
    second.reports.label(99)
    second.tick()
    assert second.kinds() == ["alarm", "retrain_waiting"]
    assert second.detail()["alarm"] == first.detail()["alarm"]
    second.reports.label(1)
    second.tick()
    assert second.started()["labelled"] == 100
    assert second.kinds().count("alarm") == 1  # the same alarm, not a second one


def test_min_labelled_0_starts_at_the_alarm(
    store: RegistryStore, tmp_path: Path, reference_profile: ReferenceProfile,
    stopped: list[Loop],
) -> None:  # fmt: skip
    loop = Loop(store, tmp_path, reference_profile, policy(min_labelled=0))
    stopped.append(loop)
    loop.tick()
    loop.tick()
    assert loop.kinds() == ["alarm", "retrain_started"]
    assert loop.reports.counted == []
    assert "labelled" not in loop.started()


def test_a_manual_request_while_waiting_starts_at_once(
    store: RegistryStore, tmp_path: Path, reference_profile: ReferenceProfile,
    stopped: list[Loop],
) -> None:  # fmt: skip
    loop = Loop(store, tmp_path, reference_profile, policy(min_labelled=100))
    stopped.append(loop)
    loop.tick()
    loop.tick()
    request = store.request_retrain(MODEL, "cli:test", "now, please")
    loop.tick()
    started = loop.started()
    assert started["trigger"] == "manual" and started["requests"] == [request]
    assert loop.detail()["alarm"] is None
