"""The loop's schedule: a monitor check per served model every `check_every_s`, and
optional cron retrains, on APScheduler 3.x with its job store in the registry database
(table `servo_scheduler_jobs`), so a restart keeps the jobs and their next run times.

Nothing in that table is unpickled. APScheduler's SQLAlchemy job store pickles each job's
state, so a row someone wrote into the database would run code when loaded. This store
writes the state as JSON text (function reference, trigger type and fields, arguments,
ids, next run time) and rebuilds jobs from it without pickle; a row that is not such a
document, or whose job calls anything but this module's `dispatch`, is refused (logged,
and removed as APScheduler removes jobs it cannot restore).

Jobs call `dispatch(kind, model)` by textual reference; it calls the handler that this
process registered for the kind (`LoopScheduler.on`): "check" for the monitor checks,
"retrain" for cron retrains. A handler that raises is logged; the scheduler goes on. One
instance of a job at a time (max_instances 1), missed runs coalesced into one.

Cron expressions are crontab's "minute hour day-of-month month day-of-week", day 0 or 7
being Sunday (converted: APScheduler 3 counts from Monday). Unlike crontab, when both the
day of month and the day of week are restricted, a day must match both.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
import threading
from collections.abc import Callable
from typing import Any, Literal

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.job import Job
from apscheduler.jobstores.base import ConflictingIdError, JobLookupError
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy import Column, Float, MetaData, Table, Text, Unicode

log = logging.getLogger("servo.retrain")

Kind = Literal["check", "retrain"]
KINDS: tuple[str, ...] = ("check", "retrain")
#: the only function a stored job may call
DISPATCH = "retrain.scheduler:dispatch"
#: a cron retrain missed by more than this (servo was down) waits for its next time; a
#: missed check runs once at start, however late
CRON_GRACE_S = 3600
CRON_FIELDS = ("year", "month", "day", "week", "day_of_week", "hour", "minute", "second")

_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


class RefusedJob(ValueError):
    """A stored job state that this store does not load."""


class _JobState(BaseModel):
    """A job as stored: JSON, checked field by field."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    id: str
    func: Literal["retrain.scheduler:dispatch"]
    trigger: dict[str, Any]
    executor: Literal["default"] = "default"
    args: tuple[Kind, str]
    kwargs: dict[str, str]
    name: str
    misfire_grace_time: int | None
    coalesce: bool
    max_instances: int
    next_run_time: dt.datetime | None


def _iso(at: dt.datetime | None) -> str | None:
    return None if at is None else at.isoformat()


def _zone(tz: Any) -> str:
    return str(getattr(tz, "key", None) or tz)


def trigger_json(trigger: BaseTrigger) -> dict[str, Any]:
    """An interval or cron trigger as JSON (anything else is refused)."""
    common = {
        "start_date": _iso(getattr(trigger, "start_date", None)),
        "end_date": _iso(getattr(trigger, "end_date", None)),
        "timezone": _zone(getattr(trigger, "timezone", "UTC")),
        "jitter": getattr(trigger, "jitter", None),
    }
    if isinstance(trigger, IntervalTrigger):
        return {"type": "interval", "seconds": trigger.interval.total_seconds(), **common}
    if isinstance(trigger, CronTrigger):
        fields = {f.name: str(f) for f in trigger.fields}
        return {"type": "cron", "fields": fields, **common}
    raise RefusedJob(f"cannot store a {type(trigger).__name__} as JSON")


def trigger_from_json(doc: dict[str, Any]) -> BaseTrigger:
    dates = {k: dt.datetime.fromisoformat(doc[k]) if doc.get(k) else None
             for k in ("start_date", "end_date")}  # fmt: skip
    jitter = doc.get("jitter")
    if jitter is not None and not isinstance(jitter, int | float):
        raise RefusedJob(f"bad jitter {jitter!r}")
    common: dict[str, Any] = {**dates, "timezone": str(doc["timezone"]), "jitter": jitter}
    if doc.get("type") == "interval":
        seconds = doc["seconds"]
        if not isinstance(seconds, int | float) or not seconds > 0:
            raise RefusedJob(f"bad interval {seconds!r}")
        return IntervalTrigger(seconds=float(seconds), **common)
    if doc.get("type") == "cron":
        fields = doc["fields"]
        if not isinstance(fields, dict) or set(fields) != set(CRON_FIELDS):
            raise RefusedJob(f"bad cron fields {fields!r}")
        return CronTrigger(**{k: str(v) for k, v in fields.items()}, **common)
    raise RefusedJob(f"unknown trigger type {doc.get('type')!r}")


class JsonJobStore(SQLAlchemyJobStore):  # type: ignore[misc]
    """APScheduler's SQLAlchemy job store with job state as JSON text, never pickle."""

    def __init__(self, engine: Any, tablename: str):
        super().__init__(engine=engine, tablename=tablename)
        self.jobs_t = Table(
            tablename,
            MetaData(),
            Column("id", Unicode(191), primary_key=True),
            Column("next_run_time", Float(25), index=True),
            Column("job_state", Text, nullable=False),
        )

    @staticmethod
    def dumps(job: Job) -> str:
        state = job.__getstate__()
        if state["func"] != DISPATCH:
            raise RefusedJob(f"job {job.id!r} calls {state['func']!r}, not {DISPATCH}")
        doc = {
            **state, "trigger": trigger_json(state["trigger"]), "args": list(state["args"]),
            "next_run_time": _iso(state["next_run_time"]),
        }  # fmt: skip
        return json.dumps(doc, sort_keys=True, allow_nan=False)

    def add_job(self, job: Job) -> None:
        from sqlalchemy.exc import IntegrityError

        insert = self.jobs_t.insert().values(
            id=job.id, next_run_time=_timestamp(job.next_run_time), job_state=self.dumps(job)
        )
        with self.engine.begin() as connection:
            try:
                connection.execute(insert)
            except IntegrityError:
                raise ConflictingIdError(job.id) from None

    def update_job(self, job: Job) -> None:
        update = (
            self.jobs_t.update()
            .values(next_run_time=_timestamp(job.next_run_time), job_state=self.dumps(job))
            .where(self.jobs_t.c.id == job.id)
        )
        with self.engine.begin() as connection:
            if connection.execute(update).rowcount == 0:
                raise JobLookupError(job.id)

    def lookup_job(self, job_id: str) -> Job | None:
        try:
            job: Job | None = super().lookup_job(job_id)
        except RefusedJob as exc:
            log.error("scheduler job %r refused: %s", job_id, exc)
            return None
        return job

    def _reconstitute_job(self, job_state: Any) -> Job:
        if not isinstance(job_state, str):  # bytes: a pickle (or anything but our JSON)
            raise RefusedJob(f"job state is {type(job_state).__name__}, not JSON text")
        try:
            state = _JobState.model_validate_json(job_state)
            trigger = trigger_from_json(state.trigger)
        except (ValidationError, ValueError, KeyError, TypeError) as exc:
            raise RefusedJob(f"not a job this store wrote: {exc}") from None
        if state.id != f"{'check' if state.args[0] == 'check' else 'cron'}:{state.args[1]}":
            raise RefusedJob(f"job id {state.id!r} does not match its arguments")
        at = state.next_run_time
        job = Job.__new__(Job)
        job.__setstate__({
            **state.model_dump(), "trigger": trigger, "args": list(state.args),
            "next_run_time": at.astimezone(dt.UTC) if at is not None else None,
        })  # fmt: skip
        job._scheduler = self._scheduler
        job._jobstore_alias = self._alias
        return job


def _timestamp(at: dt.datetime | None) -> float | None:
    return None if at is None else at.timestamp()


# the dispatcher: jobs find their handlers by table name

_ACTIVE: dict[str, LoopScheduler] = {}
_ACTIVE_LOCK = threading.Lock()


def dispatch(kind: str, model: str, table: str = "servo_scheduler_jobs") -> None:
    """What every stored job calls: the handler this process registered for `kind`."""
    with _ACTIVE_LOCK:
        scheduler = _ACTIVE.get(table)
    handler = scheduler.handler(kind) if scheduler is not None else None
    if handler is None:
        log.warning("scheduler: no %s handler in this process (model %s)", kind, model)
        return
    try:
        handler(model)
    except Exception:
        log.exception("scheduler: the %s handler failed for model %s", kind, model)


def check_model(model: str) -> str:
    if not isinstance(model, str) or not _MODEL.fullmatch(model) or ".." in model:
        raise ValueError(f"invalid model name {model!r}")
    return model


def _day(text: str) -> int:
    name = text.strip().lower()
    if name in _DAYS:
        return _DAYS.index(name)
    if name.isdigit() and int(name) <= 7:
        return int(name)
    raise ValueError(f"bad day of week {text!r} (0-7 or sun-sat)")


def crontab_day_of_week(text: str) -> str:
    """A crontab day-of-week field (0 and 7 Sunday) as APScheduler day names."""
    if text == "*":
        return "*"
    days: set[int] = set()
    for item in text.split(","):
        part, slash, step = item.partition("/")
        stride = int(step) if step.isdigit() and int(step) > 0 else 0
        if slash and not stride:
            raise ValueError(f"bad step in {item!r}")
        if part == "*":
            low, high = 0, 6
        elif "-" in part:
            low, high = (_day(v) for v in part.split("-", 1))
        else:
            low = _day(part)
            high = 6 if slash else low  # "1/2": from Monday on, every other day
        if low > high:
            raise ValueError(f"bad range {part!r}")
        days.update(d % 7 for d in range(low, high + 1, stride or 1))
    return ",".join(_DAYS[d] for d in sorted(days))


def cron_trigger(expr: str) -> CronTrigger:
    """A crontab expression "m h dom mon dow" as an APScheduler trigger (UTC)."""
    values = expr.split() if isinstance(expr, str) else []
    if len(values) != 5:
        raise ValueError(f"cron {expr!r}: expected 5 fields (minute hour day month weekday)")
    try:
        return CronTrigger(minute=values[0], hour=values[1], day=values[2], month=values[3],
                           day_of_week=crontab_day_of_week(values[4]), timezone="UTC")  # fmt: skip
    except ValueError as exc:
        raise ValueError(f"cron {expr!r}: {exc}") from None


class LoopScheduler:
    """The loop's schedule on the registry database (see the module docstring)."""

    def __init__(
        self, registry_url: str, *, tablename: str = "servo_scheduler_jobs", max_workers: int = 4
    ):
        from registry.store import RegistryStore  # its engine: WAL, busy timeout, retries

        self.tablename = tablename
        self._registry = RegistryStore(registry_url)
        self._handlers: dict[str, Callable[[str], None]] = {}
        self._store = JsonJobStore(self._registry.engine, tablename)
        self._scheduler = BackgroundScheduler(
            jobstores={"default": self._store},
            executors={"default": ThreadPoolExecutor(max_workers)},
            job_defaults={"coalesce": True, "max_instances": 1},
            timezone="UTC",
        )
        self._lock = threading.Lock()
        self._running = False

    def on(self, kind: str, handler: Callable[[str], None]) -> None:
        """Call `handler(model)` for the jobs of `kind` ("check" or "retrain")."""
        if kind not in KINDS:
            raise ValueError(f"unknown job kind {kind!r} (one of {', '.join(KINDS)})")
        self._handlers[kind] = handler

    def handler(self, kind: str) -> Callable[[str], None] | None:
        return self._handlers.get(kind)

    def schedule_checks(self, model: str, every_s: float) -> None:
        """A monitor check of `model` every `every_s` seconds (job "check:<model>"); an
        existing job with the same interval is kept as it is (its next run time too)."""
        check_model(model)
        if (
            isinstance(every_s, bool)
            or not isinstance(every_s, int | float)
            or not (math.isfinite(every_s) and every_s > 0)
        ):
            raise ValueError(f"every_s must be a number > 0, got {every_s!r}")
        trigger = IntervalTrigger(seconds=float(every_s), timezone="UTC")
        self._put(f"check:{model}", "check", model, trigger, grace=None)

    def schedule_cron(self, model: str, cron: str | None) -> None:
        """Retrain `model` on a crontab schedule (job "cron:<model>"); None removes it."""
        check_model(model)
        if cron is None:
            self._remove(f"cron:{model}")
            return
        self._put(f"cron:{model}", "retrain", model, cron_trigger(cron), grace=CRON_GRACE_S)

    def unschedule(self, model: str) -> None:
        """Remove every job of `model`."""
        check_model(model)
        for job_id in (f"check:{model}", f"cron:{model}"):
            self._remove(job_id)

    def jobs(self) -> list[dict[str, Any]]:
        """id, kind, model, next_run_time (UTC; None: paused), trigger (as stored)."""
        self._open()
        return [
            {"id": job.id, "kind": job.args[0], "model": job.args[1],
             "next_run_time": job.next_run_time, "trigger": trigger_json(job.trigger)}
            for job in self._scheduler.get_jobs()
        ]  # fmt: skip

    def start(self) -> None:
        """Run the jobs (due ones at once) until `shutdown`."""
        self._open()
        with _ACTIVE_LOCK:
            other = _ACTIVE.get(self.tablename)
            if other is not None and other is not self:
                raise RuntimeError(f"another scheduler on {self.tablename} runs in this process")
            _ACTIVE[self.tablename] = self
        self._scheduler.resume()

    def shutdown(self, wait: bool = True) -> None:
        """Stop running jobs (`wait`: for the running ones to finish); the schedule stays
        in the database."""
        with self._lock:
            if self._running:
                self._scheduler.shutdown(wait=wait)
                self._running = False
        with _ACTIVE_LOCK:
            if _ACTIVE.get(self.tablename) is self:
                del _ACTIVE[self.tablename]
        self._registry.close()

    def _open(self) -> None:
        """Start APScheduler paused: the job store is open (jobs read and written in the
        database), nothing runs until `start`."""
        with self._lock:
            if not self._running:
                self._scheduler.start(paused=True)
                self._running = True

    def _put(self, job_id: str, kind: str, model: str, trigger: BaseTrigger,
             grace: int | None) -> None:  # fmt: skip
        self._open()
        existing = self._scheduler.get_job(job_id)
        if existing is not None and _same(trigger_json(existing.trigger), trigger_json(trigger)):
            return
        self._scheduler.add_job(
            DISPATCH, trigger, args=[kind, model], kwargs={"table": self.tablename},
            id=job_id, name=job_id, replace_existing=True, misfire_grace_time=grace,
        )  # fmt: skip
        log.info("scheduled %s: %s", job_id, trigger)

    def _remove(self, job_id: str) -> None:
        self._open()
        try:
            self._scheduler.remove_job(job_id)
        except JobLookupError:
            return
        log.info("unscheduled %s", job_id)


def _same(stored: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """The same schedule (an interval's start date, set when it was added, aside)."""
    skip = {"start_date"}
    return {k: v for k, v in stored.items() if k not in skip} == {
        k: v for k, v in wanted.items() if k not in skip
    }
