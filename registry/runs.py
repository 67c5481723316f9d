"""Pipeline runs and their lineage, with leases: a run records the process that runs it,
and a run whose process died is found and marked failed.

A run holds a lease (registry.lease: host, pid, process identity) and a heartbeat that its
runner refreshes. The recovery check (`recover_runs`, run by `start_run`, `runs` and
`run`) marks a running run failed when its process is gone (a lease taken on this
machine: checked directly, pid reuse included) or when its heartbeat is older than
`lease_s` (a lease taken elsewhere). It also marks failed the versions such a run had
reserved but never published, and removes the temporary folders ("scratch", always named
*.tmp) that dead or finished runs of this machine left behind.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from registry.base import Invalid, NotFound, RegistryError, StoreBase, aware
from registry.lease import Lease, current, dead, local
from registry.models import RUN_STATUSES, Artifact, ModelVersion, PipelineRun, StepRun, utcnow

log = logging.getLogger("servo.registry")


class RunsMixin(StoreBase):
    def start_run(
        self,
        pipeline: str,
        trigger: str,
        parameters: dict[str, Any],
        scratch: list[str] | None = None,
        *,
        model: str | None = None,
        triggered_by: str | None = None,
    ) -> int:
        """A new running run leased to this process; `scratch`: temporary folders (named
        *.tmp) it will create, removed if it dies; `model`: the model it retrains;
        `triggered_by`: the token that triggered it by hand (None: the loop or a schedule).
        Dead runs are recovered first."""
        self.recover_runs()
        lease = current()

        def work(session: Session) -> int:
            now = utcnow()
            run = PipelineRun(
                pipeline=pipeline,
                trigger=trigger,
                parameters=parameters,
                status="running",
                started_at=now,
                lease_host=lease.host,
                lease_pid=lease.pid,
                lease_process=lease.process,
                heartbeat_at=now,
                scratch=list(scratch or []) or None,
                model=model,
                triggered_by=triggered_by,
            )
            session.add(run)
            session.flush()
            return run.id

        return self._retry(work)

    def heartbeat(self, run_id: int) -> bool:
        """Renew a running run's lease; False if it is no longer running."""

        def work(session: Session) -> bool:
            done = session.execute(
                update(PipelineRun)
                .where(PipelineRun.id == run_id, PipelineRun.status == "running")
                .values(heartbeat_at=utcnow())
            )
            return bool(getattr(done, "rowcount", 0))

        return self._retry(work)

    def add_scratch(self, run_id: int, path: str) -> None:
        """Declare one more temporary folder of a running run (before creating it)."""
        _check_scratch(path)

        def work(session: Session) -> None:
            run = _running(session, run_id)
            run.scratch = [*(run.scratch or []), path]

        self._retry(work)

    def finish_run(self, run_id: int, status: str, error: str | None = None) -> None:
        """End a running run (its scratch folders are gone: the runner removed them):
        succeeded, failed, or interrupted (stopped on purpose). A run that did not succeed
        fails the versions it reserved and never published."""
        if status not in RUN_STATUSES or status == "running":
            raise Invalid(f"a run ends succeeded, failed or interrupted, not {status!r}")

        def work(session: Session) -> None:
            run = _running(session, run_id)
            run.status, run.error, run.finished_at = status, error, utcnow()
            run.scratch = None
            if status != "succeeded":
                self._fail_unpublished(session, run_id, f"run {run_id} {status}")

        self._retry(work)

    def record_step(self, run_id: int, step: str, **fields: Any) -> None:
        self._retry(lambda session: session.add(StepRun(run_id=run_id, step=step, **fields)))

    def record_artifact(self, run_id: int, step: str, **fields: Any) -> None:
        self._retry(lambda session: session.add(Artifact(run_id=run_id, step=step, **fields)))

    def runs(
        self, limit: int = 50, model: str | None = None, recover: bool = True
    ) -> list[dict[str, Any]]:
        """The latest runs (of `model`), newest first, after the recovery check (unless
        `recover` is False)."""
        if recover:
            self.recover_runs()
        with self._session() as session:
            query = select(PipelineRun).order_by(PipelineRun.id.desc()).limit(limit)
            if model is not None:
                query = query.where(PipelineRun.model == model)
            rows = session.execute(query).scalars()
            return [_run_doc(r) for r in rows]

    def run(self, run_id: int, recover: bool = True) -> dict[str, Any]:
        """One run with its steps and artifacts (its lineage), after the recovery check."""
        if recover:
            self.recover_runs()
        with self._session() as session:
            run = session.get(PipelineRun, run_id)
            if run is None:
                raise NotFound(f"no pipeline run {run_id}")
            steps = session.execute(
                select(StepRun).where(StepRun.run_id == run_id).order_by(StepRun.id)
            ).scalars()
            artifacts = session.execute(
                select(Artifact).where(Artifact.run_id == run_id).order_by(Artifact.id)
            ).scalars()
            return {
                **_run_doc(run),
                "steps": [
                    {
                        "step": s.step,
                        "status": s.status,
                        "cache_key": s.cache_key,
                        "attempts": s.attempts,
                        "duration_s": s.duration_s,
                        "parameters": s.parameters,
                        "metrics": s.metrics,
                        "log_uri": s.log_uri,
                        "error": s.error,
                    }
                    for s in steps
                ],
                "artifacts": [
                    {
                        "step": a.step,
                        "name": a.name,
                        "direction": a.direction,
                        "uri": a.uri,
                        "content_hash": a.content_hash,
                        "size": a.size,
                    }
                    for a in artifacts
                ],
            }

    # recovery

    def recover_runs(self) -> list[int]:
        """Mark failed the running runs whose process died; fail the versions they reserved
        and never published; remove the scratch folders this machine's ended runs left.
        Returns the ids of the runs marked failed."""
        now = utcnow()
        with self._session() as session:
            running = session.execute(
                select(PipelineRun).where(PipelineRun.status == "running")
            ).scalars()
            dead = [(run.id, why) for run in running if (why := self._dead(run, now))]
        failed = [run_id for run_id, why in dead if self._retry(_mark_failed(self, run_id, why))]
        self._retry(lambda session: self._fail_unpublished(session, None, "its run ended"))
        self._remove_scratch()
        return failed

    def _dead(self, run: PipelineRun, now: dt.datetime) -> str | None:
        """Why a running run is dead, or None if it may still run."""
        if run.lease_host is None or run.lease_pid is None:  # from before leases
            age = (now - aware(run.started_at)).total_seconds()
            return f"no lease recorded and started {age:.0f} s ago" if age > self.lease_s else None
        lease = Lease(run.lease_host, run.lease_pid, run.lease_process or "")
        age = (now - aware(run.heartbeat_at or run.started_at)).total_seconds()
        return dead(lease, age, self.lease_s)

    def _fail_unpublished(self, session: Session, run_id: int | None, why: str) -> None:
        """Versions never published: of one run, or (run_id None) of every run that is no
        longer running, and those with no run at all."""
        query = select(ModelVersion).where(
            ModelVersion.servable.is_(False), ModelVersion.status != "failed"
        )
        if run_id is not None:
            query = query.where(ModelVersion.run_id == run_id)
        for row in session.execute(query.with_for_update()).scalars():
            if run_id is None and row.run_id is not None:
                run = session.get(PipelineRun, row.run_id)
                if run is not None and run.status == "running":
                    continue
            old, row.status = row.status, "failed"
            self._audit(
                session,
                actor="recovery",
                action="status",
                subject=f"{row.model}/{row.version}",
                detail={"from": old, "to": "failed", "reason": f"never published: {why}"},
                rollback=None,
            )

    def _remove_scratch(self) -> None:
        with self._session() as session:
            ended = session.execute(
                select(PipelineRun.id, PipelineRun.lease_host, PipelineRun.lease_pid,
                       PipelineRun.lease_process, PipelineRun.scratch)
                .where(PipelineRun.status != "running", PipelineRun.scratch.is_not(None))
            ).all()  # fmt: skip
        for run_id, host, pid, process, scratch in ended:
            if host is None or not local(Lease(host, pid or 0, process or "")):
                continue  # another machine's folders: its own next check removes them
            for path in scratch or []:
                try:
                    _check_scratch(path)
                except RegistryError as exc:
                    log.error("run %s: %s", run_id, exc)
                    continue
                shutil.rmtree(path, ignore_errors=True)
                if Path(path).exists():
                    log.error("run %s: could not remove its temporary folder %s", run_id, path)
            self._retry(_clear_scratch(run_id))


def _check_scratch(path: str) -> None:
    if not path.endswith(".tmp") or not Path(path).is_absolute():
        raise RegistryError(f"a scratch folder must be an absolute path named *.tmp: {path!r}")


def _running(session: Session, run_id: int) -> PipelineRun:
    run = session.execute(
        select(PipelineRun).where(PipelineRun.id == run_id).with_for_update()
    ).scalar_one_or_none()
    if run is None:
        raise NotFound(f"no pipeline run {run_id}")
    if run.status != "running":
        why = f"{run.status}: {run.error}" if run.error else run.status
        raise RegistryError(f"pipeline run {run_id} is no longer running ({why})")
    return run


def _mark_failed(store: RunsMixin, run_id: int, why: str) -> Callable[[Session], bool]:
    def work(session: Session) -> bool:
        run = session.execute(
            select(PipelineRun)
            .where(PipelineRun.id == run_id, PipelineRun.status == "running")
            .with_for_update()
        ).scalar_one_or_none()
        if run is None:  # finished meanwhile, or another check got there first
            return False
        run.status, run.finished_at = "failed", utcnow()
        run.error = f"found dead by the recovery check: {why}"
        store._fail_unpublished(session, run_id, f"run {run_id} died")
        store._audit(
            session,
            actor="recovery",
            action="run_failed",
            subject=f"run {run_id}",
            detail={"reason": why},
        )
        log.warning("pipeline run %d marked failed: %s", run_id, why)
        return True

    return work


def _clear_scratch(run_id: int) -> Callable[[Session], None]:
    def work(session: Session) -> None:
        run = session.get(PipelineRun, run_id)
        if run is not None:
            run.scratch = None

    return work


def _run_doc(run: PipelineRun) -> dict[str, Any]:
    return {
        "id": run.id,
        "pipeline": run.pipeline,
        "model": run.model,
        "trigger": run.trigger,
        "triggered_by": run.triggered_by,
        "status": run.status,
        "parameters": run.parameters,
        "error": run.error,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "lease": None
        if run.lease_host is None
        else {"host": run.lease_host, "pid": run.lease_pid, "heartbeat_at": run.heartbeat_at},
    }
