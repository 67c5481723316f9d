"""The loop's scheduler (retrain.scheduler) on a real SQLite registry database: jobs and
their next run times survive a restart, handlers run and a failing one stops nothing, job
state is JSON text (never pickle), and rows that are not ours are refused, not loaded."""

from __future__ import annotations

import datetime as dt
import json
import logging
import pickle
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from registry.store import RegistryStore
from retrain.scheduler import DISPATCH, LoopScheduler, crontab_day_of_week


@pytest.fixture
def url(tmp_path: Path) -> str:
    made = RegistryStore(f"sqlite:///{tmp_path / 'r.db'}")
    made.create_schema()
    made.close()
    return f"sqlite:///{tmp_path / 'r.db'}"


@pytest.fixture
def schedulers() -> Iterator[list[LoopScheduler]]:
    made: list[LoopScheduler] = []
    yield made
    for scheduler in made:
        scheduler.shutdown(wait=False)


@pytest.fixture
def no_pickle(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Any use of pickle during the test is recorded (and fails)."""
    used: list[str] = []

    def refuse(name: str) -> Any:
        def call(*_: Any, **__: Any) -> Any:
            used.append(name)
            raise AssertionError(f"pickle.{name} called")

        return call

    for name in ("loads", "dumps", "load", "dump"):
        monkeypatch.setattr(pickle, name, refuse(name))
    return used


def rows(url: str) -> list[sqlite3.Row]:
    connection = sqlite3.connect(url.removeprefix("sqlite:///"))
    connection.row_factory = sqlite3.Row
    try:
        return list(connection.execute(
            "SELECT id, next_run_time, typeof(job_state) AS kind, job_state "
            "FROM servo_scheduler_jobs ORDER BY id"
        ))  # fmt: skip
    finally:
        connection.close()


def insert(url: str, ident: str, state: object, due: float) -> None:
    connection = sqlite3.connect(url.removeprefix("sqlite:///"))
    try:
        with connection:
            connection.execute(
                "INSERT INTO servo_scheduler_jobs (id, next_run_time, job_state) VALUES (?, ?, ?)",
                (ident, due, state),
            )
    finally:
        connection.close()


def wait_until(condition: Any, every: float = 0.02) -> None:
    while not condition():  # bounded by the test's timeout
        time.sleep(every)


def test_jobs_and_next_run_times_survive_a_restart(
    url: str, schedulers: list[LoopScheduler], no_pickle: list[str]
) -> None:
    first = LoopScheduler(url)
    schedulers.append(first)
    first.schedule_checks("digits", 60)
    first.schedule_checks("iris", 90)
    first.schedule_cron("digits", "30 3 * * 1")  # Mondays 03:30 UTC
    first.start()
    before = {job["id"]: job for job in first.jobs()}
    assert sorted(before) == ["check:digits", "check:iris", "cron:digits"]
    assert before["check:digits"]["kind"] == "check" and before["check:digits"]["model"] == "digits"
    assert before["cron:digits"]["kind"] == "retrain"
    assert before["check:iris"]["trigger"]["seconds"] == 90
    monday = before["cron:digits"]["next_run_time"]
    assert (monday.weekday(), monday.hour, monday.minute) == (0, 3, 30)
    assert monday.utcoffset() == dt.timedelta(0)
    first.shutdown()

    second = LoopScheduler(url)
    schedulers.append(second)
    after = {job["id"]: job for job in second.jobs()}
    assert after == before  # the same jobs, the same next run times, exactly
    # scheduling the same again (what a restarted controller does) keeps them as they are
    second.schedule_checks("digits", 60)
    second.schedule_cron("digits", "30 3 * * 1")
    assert {job["id"]: job for job in second.jobs()} == before
    # a changed interval or cron replaces the job
    second.schedule_checks("digits", 30)
    second.schedule_cron("digits", "0 0 * * 0")  # crontab's Sunday is 0
    changed = {job["id"]: job for job in second.jobs()}
    assert changed["check:digits"]["trigger"]["seconds"] == 30
    assert changed["check:digits"]["next_run_time"] != before["check:digits"]["next_run_time"]
    assert changed["cron:digits"]["next_run_time"].weekday() == 6
    second.schedule_cron("digits", None)
    second.unschedule("iris")
    assert [job["id"] for job in second.jobs()] == ["check:digits"]
    assert [r["id"] for r in rows(url)] == ["check:digits"]
    assert no_pickle == []


def test_handlers_run_and_a_failing_one_stops_nothing(
    url: str, schedulers: list[LoopScheduler], caplog: pytest.LogCaptureFixture
) -> None:
    scheduler = LoopScheduler(url)
    schedulers.append(scheduler)
    calls: list[str] = []

    def check(model: str) -> None:
        calls.append(model)
        if model == "bad":
            raise RuntimeError("the monitor is away")

    scheduler.on("check", check)
    scheduler.schedule_checks("good", 0.2)
    scheduler.schedule_checks("bad", 0.2)
    with caplog.at_level(logging.ERROR, logger="servo.retrain"):
        scheduler.start()
        wait_until(lambda: calls.count("bad") >= 3 and calls.count("good") >= 3)
    failures = [r for r in caplog.records if "the check handler failed for model bad" in r.message]
    assert len(failures) >= 3 and failures[0].exc_info is not None
    assert {job["id"] for job in scheduler.jobs()} == {"check:good", "check:bad"}
    # one scheduler per table in a process: a second one would steal the handlers
    other = LoopScheduler(url)
    schedulers.append(other)
    with pytest.raises(RuntimeError, match="another scheduler"):
        other.start()
    scheduler.shutdown()
    count = len(calls)
    time.sleep(0.5)
    assert len(calls) == count  # shut down: nothing runs


def test_job_state_is_json_text(url: str, schedulers: list[LoopScheduler]) -> None:
    scheduler = LoopScheduler(url)
    schedulers.append(scheduler)
    scheduler.schedule_checks("digits", 60)
    scheduler.schedule_cron("digits", "*/15 * * * *")
    stored = rows(url)
    assert [r["kind"] for r in stored] == ["text", "text"]
    for row in stored:
        assert not row["job_state"].encode().startswith(b"\x80")  # no pickle header
        doc = json.loads(row["job_state"])
        assert doc["func"] == DISPATCH and doc["args"][1] == "digits"
        assert doc["next_run_time"] is not None
        assert dt.datetime.fromisoformat(doc["next_run_time"]).timestamp() == pytest.approx(
            row["next_run_time"]
        )
    cron = json.loads(stored[1]["job_state"])["trigger"]
    assert cron["type"] == "cron" and cron["fields"]["minute"] == "*/15"


class Evil:
    """Unpickling this creates a file: proof that it was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_a_crafted_row_is_refused_not_loaded(
    url: str, tmp_path: Path, schedulers: list[LoopScheduler], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    marker = tmp_path / "unpickled"
    crafted = pickle.dumps(Evil(marker))
    due = time.time() - 10  # due at once: a loaded job would run
    scheduler = LoopScheduler(url)
    schedulers.append(scheduler)
    scheduler.schedule_checks("digits", 3600)  # creates the table
    honest = json.loads(rows(url)[0]["job_state"])
    insert(url, "check:pickled", crafted, due)
    insert(url, "check:system", json.dumps({**honest, "id": "check:system",
           "func": "os:system", "args": ["check", f"touch {marker}"]}), due)  # fmt: skip
    insert(url, "check:mismatch", json.dumps({**honest, "id": "check:mismatch",
           "args": ["check", "other"]}), due)  # fmt: skip
    insert(url, "check:date", json.dumps({**honest, "id": "check:date",
           "trigger": {"type": "date", "run_date": "2026-01-01T00:00:00+00:00"}}), due)  # fmt: skip
    insert(url, "check:garbage", "{not json", due)
    calls: list[str] = []
    scheduler.on("check", calls.append)
    loads = pickle.loads
    used: list[bytes] = []

    def spy(data: bytes, *args: Any, **kwargs: Any) -> Any:
        used.append(data)
        return loads(data, *args, **kwargs)

    monkeypatch.setattr(pickle, "loads", spy)
    with caplog.at_level(logging.ERROR):
        scheduler.start()
        jobs = scheduler.jobs()
    assert [job["id"] for job in jobs] == ["check:digits"]
    assert used == [] and not marker.exists()
    assert [r["id"] for r in rows(url)] == ["check:digits"]  # refused rows are removed
    refused = " ".join(r.getMessage() for r in caplog.records)
    for ident in ("pickled", "system", "mismatch", "date", "garbage"):
        assert f"check:{ident}" in refused, ident
    assert calls == []


def test_bad_schedules_are_refused(url: str, schedulers: list[LoopScheduler]) -> None:
    scheduler = LoopScheduler(url)
    schedulers.append(scheduler)
    for every in (0, -1, float("nan"), float("inf"), True, "60"):
        with pytest.raises(ValueError, match="every_s must be a number > 0"):
            scheduler.schedule_checks("digits", every)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"invalid model name '\.\./x'"):
        scheduler.schedule_checks("../x", 60)
    with pytest.raises(ValueError, match="expected 5 fields"):
        scheduler.schedule_cron("digits", "every day")
    with pytest.raises(ValueError, match=r"cron '61 \* \* \* \*'"):
        scheduler.schedule_cron("digits", "61 * * * *")
    with pytest.raises(ValueError, match="bad day of week '8'"):
        scheduler.schedule_cron("digits", "0 0 * * 8")
    with pytest.raises(ValueError, match="unknown job kind 'nope'"):
        scheduler.on("nope", print)
    assert scheduler.jobs() == [] and rows(url) == []


def test_crontab_days_of_week() -> None:
    assert crontab_day_of_week("0") == "sun" and crontab_day_of_week("7") == "sun"
    assert crontab_day_of_week("1-5") == "mon,tue,wed,thu,fri"
    assert crontab_day_of_week("*/2") == "sun,tue,thu,sat"
    assert crontab_day_of_week("5-7") == "sun,fri,sat"
    assert crontab_day_of_week("mon,WED") == "mon,wed"
    assert crontab_day_of_week("1/3") == "mon,thu"
    assert crontab_day_of_week("*") == "*"
    for bad in ("5-1", "*/0", "8", "funday"):
        with pytest.raises(ValueError):
            crontab_day_of_week(bad)
