"""The controller of `servo up`: per model, a state machine advanced by the scheduler's
checks, its state kept in the registry (loop_state), so a restart resumes where the last
process stopped.

    watching ──(k alarmed checks, cron, or a manual request; not paused, cooldown, budget)──▶
    retraining (a worker process runs the pipeline) ──(new version)──▶
    shadowing (the candidate answers copies; evidence from the payload log) ──(min_labelled
    labelled requests, or the timeout)──▶ request filed ──gates fail──▶ rejected, watching
                                          └─gates pass──▶ awaiting_approval ──approved──▶
    rolling_out (Rollout.start) ──▶ watching

One pipeline per model, also across processes: a model's lease row in the registry
(lock_model) is taken when it leaves `watching` and given back when it returns there; a
process that does not hold it leaves the model alone. Each decision is one log line
(servo.logs.decision) and, where it changes the loop, a loop event in the registry.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monitors.monitor import MonitorConfig, MonitorReport
from servo import logs
from servo.loop_evidence import gather_evidence

if TYPE_CHECKING:
    from registry.store import RegistryStore
    from retrain.policy import LoopConfig, Policy
    from retrain.rollout import Rollout
    from servo.up import Reports

log = logging.getLogger("servo.loop")

ACTOR = "loop"
WATCHING, RETRAINING, SHADOWING = "watching", "retraining", "shadowing"
AWAITING, ROLLING_OUT, PAUSED = "awaiting_approval", "rolling_out", "paused"
#: an approval filed in another process (the CLI) whose rollout did not follow within this
#: long is rolled out by the controller
ORPHAN_APPROVAL_S = 10.0


def _now_iso(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.UTC).isoformat(timespec="seconds")


def _ts(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


def monitor_config(policy: Policy) -> MonitorConfig:
    return MonitorConfig(window_s=float(policy.monitor_window_s),
                         step_s=float(policy.check_every_s))  # fmt: skip


@dataclass
class ControllerConfig:
    directory: Path
    registry_url: str
    payload_root: Path
    #: how often held model locks are renewed (well within the registry's lease)
    heartbeat_s: float = 10.0
    owner: str = field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    )


class Controller:
    def __init__(
        self,
        store: RegistryStore,
        config: LoopConfig,
        reports: Reports,
        rollout: Rollout,
        scheduler: Any,
        settings: ControllerConfig,
        *,
        clock: Callable[[], float] = time.time,
    ):
        self.store = store
        self.config = config
        self.reports = reports
        self.rollout = rollout
        self.scheduler = scheduler
        self.settings = settings
        self.owner = settings.owner
        self.clock = clock
        self._jobs: dict[str, Any] = {}
        self._held: set[str] = set()
        self._manual: dict[str, list[dict[str, Any]]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._stopping = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # lifecycle

    def models(self) -> list[str]:
        return sorted(self.store.deployments())

    def start(self) -> None:
        self.scheduler.on("check", self.tick)
        self.scheduler.on("retrain", self.cron)
        for model in self.models():
            policy = self.config.for_model(model)
            self.scheduler.schedule_checks(model, float(policy.check_every_s))
            self.scheduler.schedule_cron(model, policy.trigger.cron)
            logs.decision("watching", model=model, check_every_s=policy.check_every_s,
                          state=self._state(model)[0])  # fmt: skip
        self.scheduler.start()
        self._heartbeat = threading.Thread(target=self._beat, name="servo-loop-lease", daemon=True)
        self._heartbeat.start()

    def stop(self) -> None:
        """Stop: no new check starts, checks in flight finish, a running pipeline is
        stopped (its run marked interrupted), the model locks are given back."""
        self._stopping.set()
        self.scheduler.shutdown(wait=True)
        for model, job in list(self._jobs.items()):
            outcome = job.stop()
            self._jobs.pop(model, None)
            logs.decision("retrain_stopped", model=model, run_id=outcome.run_id,
                          status=outcome.status, reason="shutdown")  # fmt: skip
            self.store.record_loop_event(model, "retrain_finished", {
                "status": outcome.status, "run_id": outcome.run_id, "reason": "shutdown"})  # fmt: skip
            _, detail = self._state(model)
            self._set(model, WATCHING, {**detail, "job": None})
        for model in list(self._held):
            self._release(model)
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)

    def _beat(self) -> None:
        while not self._stopping.wait(self.settings.heartbeat_s):
            for model in list(self._held):
                try:
                    if not self.store.heartbeat_model_lock(model, self.owner):
                        self._held.discard(model)
                        logs.decision("lock_lost", logging.WARNING, model=model, owner=self.owner)
                except Exception as exc:
                    log.warning("model lock of %s not renewed: %s", model, exc)

    # registry state

    def _state(self, model: str) -> tuple[str, dict[str, Any]]:
        row = self.store.loop_states().get(model)
        if row is None:
            return WATCHING, {}
        if row.get("paused"):
            return PAUSED, dict(row.get("detail") or {})
        state = str(row.get("state") or WATCHING)
        return (WATCHING if state == PAUSED else state), dict(row.get("detail") or {})

    def _set(self, model: str, state: str, detail: dict[str, Any]) -> None:
        self.store.set_loop_state(model, state, detail)

    def _acquire(self, model: str, purpose: str) -> bool:
        if model in self._held:
            return True
        if self.store.lock_model(model, self.owner, purpose):
            self._held.add(model)
            return True
        return False

    def _release(self, model: str) -> None:
        self._held.discard(model)
        try:
            self.store.unlock_model(model, self.owner)
        except Exception as exc:
            log.warning("model lock of %s not given back: %s", model, exc)

    def _lock_for(self, model: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(model, threading.Lock())

    # the scheduler's entry points

    def cron(self, model: str) -> None:
        self._manual.setdefault(model, []).append(
            {"trigger": "cron", "actor": None, "reason": "cron schedule"}
        )
        self.tick(model)

    def tick(self, model: str) -> None:
        """One check of `model`: advance its state machine by at most one step."""
        if self._stopping.is_set():
            return
        for request in self.store.take_retrain_requests():
            self._manual.setdefault(str(request["model"]), []).append(
                {
                    "trigger": "manual",
                    "actor": request.get("actor"),
                    "reason": request.get("reason") or "",
                    "id": request.get("id"),
                }  # fmt: skip
            )
        with self._lock_for(model):
            policy = self.config.for_model(model)
            state, detail = self._state(model)
            if state == PAUSED:
                if self._manual.pop(model, None):
                    logs.decision("skipped", model=model, reason="paused")
                    self.store.record_loop_event(model, "skipped", {"reason": "paused"})
                return
            if state != WATCHING and not self._acquire(model, state):
                return  # another process is running this model's pipeline
            if (
                state != WATCHING
                and model not in self._jobs
                and detail.get("resumed") != self.owner
            ):
                logs.decision("resumed", model=model, state=state)
                detail["resumed"] = self.owner
            step = {
                WATCHING: self._watch,
                RETRAINING: self._retraining,
                SHADOWING: self._shadowing,
                AWAITING: self._awaiting,
                ROLLING_OUT: self._awaiting,
            }.get(state, self._watch)
            step(model, policy, detail)

    # watching: checks, the trigger, and starting a retrain

    def _watch(self, model: str, policy: Policy, detail: dict[str, Any]) -> None:
        from retrain import trigger

        champion = self.store.alias(model, "champion")
        if champion is None:
            return
        now = self.clock()
        report = self.reports.report(model, champion, monitor_config(policy))
        signals = sorted(trigger.signals(report))
        self.store.record_loop_event(model, "check", {
            "version": champion, "verdict": report.verdict, "reasons": report.reasons,
            "signals": signals})  # fmt: skip
        state = trigger.TriggerState.from_json(detail.get("trigger") or {})
        state, verdict = trigger.decide(state, report, policy, now)
        detail["trigger"] = state.to_json()
        manual = self._manual.pop(model, [])
        if verdict.retrain or manual:
            request = manual[0] if manual else None
            why = request["trigger"] if request else (verdict.signals or signals or ["alarm"])[0]
            if request is None:
                logs.decision("alarm", model=model, version=champion, signals=verdict.signals,
                              reason=verdict.reason, consecutive=state.consecutive)  # fmt: skip
                self.store.record_loop_event(model, "alarm", {
                    "version": champion, "signals": verdict.signals, "reason": verdict.reason})  # fmt: skip
            self._start_retrain(model, policy, detail, report, why, request)
            return
        logs.decision("check", model=model, version=champion, verdict=report.verdict,
                      signals=signals, consecutive=state.consecutive,
                      retrain=False, reason=verdict.reason)  # fmt: skip
        if verdict.reason and ("cooldown" in verdict.reason or "budget" in verdict.reason):
            self.store.record_loop_event(model, "skipped", {"reason": verdict.reason})
        self._set(model, WATCHING, detail)

    def _registry_allows(self, model: str, policy: Policy, now: float) -> str | None:
        """Cooldown and budget from the registry's events (another process may have
        retrained since our trigger state was written): the reason not to, or None."""
        since = dt.datetime.fromtimestamp(now - 86400, dt.UTC)
        started = self.store.loop_events(model, kinds=["retrain_started"], since=since)
        if len(started) >= policy.trigger.budget_per_day:
            return f"budget spent: {len(started)} retrains in 24 h (budget_per_day " \
                   f"{policy.trigger.budget_per_day})"  # fmt: skip
        if started:
            last = _event_time(started[-1])
            if now - last < policy.trigger.cooldown_s:
                return f"cooldown: last retrain {now - last:.0f} s ago (cooldown_s " \
                       f"{policy.trigger.cooldown_s})"  # fmt: skip
        return None

    def _start_retrain(
        self, model: str, policy: Policy, detail: dict[str, Any], report: MonitorReport,
        why: str, request: dict[str, Any] | None,
    ) -> None:  # fmt: skip
        from retrain import trigger
        from servo.worker import TrainingJob, TrainSpec

        now = self.clock()
        if not self._acquire(model, "retrain"):
            holder = self.store.model_lock(model) or {}
            reason = f"another pipeline of {model} is running (lock held by {holder.get('owner')})"
            logs.decision("skipped", model=model, reason=reason)
            self.store.record_loop_event(model, "skipped", {"reason": reason})
            self._set(model, WATCHING, detail)
            return
        refusal = None if request is not None else self._registry_allows(model, policy, now)
        if refusal is not None:
            logs.decision("skipped", model=model, reason=refusal)
            self.store.record_loop_event(model, "skipped", {"reason": refusal})
            self._set(model, WATCHING, detail)
            self._release(model)
            return
        actor = request.get("actor") if request else None
        spec = TrainSpec(
            registry_url=self.settings.registry_url,
            work_dir=str(self.settings.directory),
            name=model,
            params=self._params(model, policy),
            trigger=why,
            triggered_by=actor,
            artifacts=None,
        )
        job = TrainingJob.start(spec, self.settings.directory / "logs")
        self._jobs[model] = job
        state = trigger.started(trigger.TriggerState.from_json(detail.get("trigger") or {}), now)
        detail.update({
            "trigger": state.to_json(),
            "job": {"pid": job.pid, "owner": self.owner, "trigger": why, "triggered_by": actor,
                    "started_at": _now_iso(now)},
            "report": report.to_json(),
            "reason": request["reason"] if request else why,
            "candidate": None, "request": None,
        })  # fmt: skip
        self.store.record_loop_event(model, "retrain_started", {
            "trigger": why, "triggered_by": actor, "pid": job.pid})  # fmt: skip
        logs.decision("retrain_started", model=model, trigger=why, triggered_by=actor,
                      pid=job.pid, log=str(self.settings.directory / "logs"))  # fmt: skip
        self._set(model, RETRAINING, detail)

    def _params(self, model: str, policy: Policy) -> dict[str, Any]:
        retrain = policy.retrain
        return {
            **dict(retrain.params),
            "model": model,
            "payload_log_root": str(self.settings.payload_root),
            "production_window_s": float(retrain.window_s),
            "production_share": float(retrain.share),
            "production_holdout": float(retrain.holdout),
        }

    # retraining: the worker's outcome

    def _retraining(self, model: str, policy: Policy, detail: dict[str, Any]) -> None:
        job = self._jobs.get(model)
        if job is None:  # its process died with the servo up that started it
            recovered = self.store.recover_runs()
            reason = "the worker is gone (servo up restarted); its run was marked failed"
            logs.decision("retrain_lost", logging.WARNING, model=model, runs=recovered,
                          reason=reason)  # fmt: skip
            self.store.record_loop_event(model, "retrain_finished", {
                "status": "failed", "reason": reason, "runs": recovered})  # fmt: skip
            self._back_to_watching(model, detail)
            return
        outcome = job.poll()
        if outcome is None:
            return
        self._jobs.pop(model, None)
        self.store.record_loop_event(model, "retrain_finished", {
            "status": outcome.status, "run_id": outcome.run_id, "version": outcome.version,
            "reused": outcome.reused, "error": outcome.error})  # fmt: skip
        logs.decision("retrain_finished", model=model, status=outcome.status,
                      run_id=outcome.run_id, version=outcome.version, reused=outcome.reused,
                      error=outcome.error, log=outcome.log_path)  # fmt: skip
        if outcome.status != "succeeded" or outcome.version is None or outcome.reused:
            self._back_to_watching(model, detail)
            return
        reason = f"candidate of run {outcome.run_id} ({detail.get('reason')})"
        self.store.add_shadow(model, outcome.version, ACTOR, reason)
        now = self.clock()
        detail["candidate"] = {"version": outcome.version, "run_id": outcome.run_id,
                               "since": _now_iso(now),
                               "trigger": (detail.get("job") or {}).get("trigger"),
                               "triggered_by": (detail.get("job") or {}).get("triggered_by")}  # fmt: skip
        detail["job"] = None
        self.store.record_loop_event(model, "shadow_started", {
            "version": outcome.version, "run_id": outcome.run_id})  # fmt: skip
        logs.decision("shadow_started", model=model, version=outcome.version,
                      min_labelled=policy.shadow.min_labelled)  # fmt: skip
        self._set(model, SHADOWING, detail)

    # shadowing: evidence, the request, the gates

    def _shadowing(self, model: str, policy: Policy, detail: dict[str, Any]) -> None:
        from retrain import gates

        candidate = detail.get("candidate") or {}
        champion = self.store.alias(model, "champion")
        if not candidate or champion is None:
            self._back_to_watching(model, detail)
            return
        version = int(candidate["version"])
        now = self.clock()
        timed_out = now - _ts(candidate["since"]) >= policy.shadow.timeout_s
        doc, n_labelled = gather_evidence(
            self.store, model, champion, version, policy, detail,
            self.settings.payload_root, insufficient=None if not timed_out else True,
        )  # fmt: skip
        if doc is None:
            detail["candidate"] = {**candidate, "n_labelled": n_labelled}
            self._set(model, SHADOWING, detail)
            return
        insufficient = bool(doc.get("insufficient"))
        request_id = self.store.file_promotion(
            model, version, doc, ACTOR, run_id=candidate.get("run_id"),
            triggered_by=candidate.get("triggered_by"),
            expires_s=float(policy.approval.expires_s),
        )  # fmt: skip
        self.store.record_loop_event(model, "promotion_filed", {
            "request": request_id, "version": version, "n_labelled": n_labelled,
            "insufficient": insufficient})  # fmt: skip
        logs.decision("promotion_filed", model=model, version=version, request=request_id,
                      n_labelled=n_labelled, insufficient=insufficient)  # fmt: skip
        results = gates.evaluate(doc, policy.gates)
        verdict, why = gates.verdict(results), gates.reason(results)
        detail["request"] = request_id
        if verdict == "fail" and not insufficient:
            self.store.auto_decide(request_id, "rejected", why, actor="gates")
            self.store.remove_shadow(model, version, "gates", why)
            self.store.record_loop_event(model, "promotion_decided", {
                "request": request_id, "decision": "rejected", "actor": "gates", "reason": why})  # fmt: skip
            logs.decision("promotion_rejected", model=model, version=version,
                          request=request_id, actor="gates", reason=why)  # fmt: skip
            self._back_to_watching(model, detail)
            return
        if verdict == "pass" and policy.approval.auto and not insufficient:
            self.store.auto_decide(request_id, "approved", f"gates passed ({why}); the "
                                   "policy approves automatically", actor="policy")  # fmt: skip
            logs.decision("promotion_approved", model=model, version=version,
                          request=request_id, actor="policy")  # fmt: skip
        else:
            logs.decision("awaiting_approval", model=model, version=version,
                          request=request_id, gates=verdict, reason=why)  # fmt: skip
        self._set(model, AWAITING, detail)

    # awaiting approval, rolling out

    def _awaiting(self, model: str, policy: Policy, detail: dict[str, Any]) -> None:
        request_id = detail.get("request")
        if request_id is None:
            self._back_to_watching(model, detail)
            return
        self.store.expire_promotions()
        request = self.store.promotion(int(request_id))
        status = request["status"]
        version = int(request["version"])
        if status == "pending":
            return
        if status == "approved":
            decided = (request.get("decision") or {}).get("at")
            age = self.clock() - _when(decided) if decided is not None else ORPHAN_APPROVAL_S
            if isinstance(self.rollout, GuardedRollout) and self.rollout.running(int(request_id)):
                return
            if age < ORPHAN_APPROVAL_S and (request.get("decision") or {}).get("actor") not in (
                "policy", "gates"):  # fmt: skip
                return  # the admin API / CLI that approved it runs its rollout
            self._set(model, ROLLING_OUT, detail)
            logs.decision("rollout_started", model=model, version=version, request=request_id)
            self.rollout.start(request, ACTOR)
            request = self.store.promotion(int(request_id))
            status = str(request["status"])
        if status == "promoted":
            self.store.record_loop_event(model, "promoted", {"request": request_id,
                                                              "version": version})  # fmt: skip
            logs.decision("promoted", model=model, version=version, request=request_id,
                          actor=(request.get("decision") or {}).get("actor"))  # fmt: skip
            detail["trigger"] = {}  # a new champion: the debounce starts over
            self._back_to_watching(model, detail)
            return
        if status in ("approved", "pending"):
            return
        # rejected, expired, void, failed, rolled_back: the candidate leaves the shadow
        decision = request.get("decision") or {}
        self.store.record_loop_event(model, "promotion_decided", {
            "request": request_id, "decision": status, "actor": decision.get("actor"),
            "reason": decision.get("reason") or request.get("status_reason")})  # fmt: skip
        logs.decision("promotion_closed", model=model, version=version, request=request_id,
                      status=status, reason=decision.get("reason") or request.get("status_reason"))  # fmt: skip
        if any(r["version"] == version and r["role"] == "shadow"
               for r in self.store.deployments().get(model, [])):  # fmt: skip
            self.store.remove_shadow(model, version, ACTOR, f"request {request_id} {status}")
        self._back_to_watching(model, detail)

    def _back_to_watching(self, model: str, detail: dict[str, Any]) -> None:
        detail.update({"job": None, "candidate": None, "request": None, "resumed": None})
        self._set(model, WATCHING, detail)
        self._release(model)


class GuardedRollout:
    """One rollout per request at a time in this process, whoever asks (the admin API
    after an approval, or the controller for an approval whose rollout did not run)."""

    def __init__(self, inner: Rollout):
        self.inner = inner
        self._lock = threading.Lock()
        self._active: set[int] = set()

    def running(self, request_id: int) -> bool:
        with self._lock:
            return request_id in self._active

    def start(self, request: dict[str, Any], actor: str) -> str:
        request_id = int(request["id"])
        with self._lock:
            if request_id in self._active:
                return str(request.get("status"))
            self._active.add(request_id)
        try:
            return self.inner.start(request, actor)
        finally:
            with self._lock:
                self._active.discard(request_id)


def _when(value: Any) -> float:
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).timestamp()
    return _ts(str(value))


def _event_time(event: dict[str, Any]) -> float:
    return _when(event.get("at") or event.get("created_at"))
