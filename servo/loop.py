"""The controller of `servo up`: per model, a state machine advanced by the scheduler's
checks, its state kept in the registry (loop_state), so a restart resumes where the last
process stopped.

    watching --(k alarmed checks, then retrain.min_labelled labelled rows or wait_s; cron,
    or a manual request; not paused, cooldown, budget)--> retraining (a worker process
    runs the pipeline) --(new version)--> shadowing (the candidate answers copies;
    evidence from the payload log) --(min_labelled labelled requests, or the timeout)-->
    request filed --gates fail--> rejected, watching
                  '--gates pass--> awaiting_approval --approved-->
    rolling_out (Rollout.start: a canary judged step by step, promoted or rolled back by
    itself) --> watching

One pipeline per model, also across processes: a model's lease row in the registry
(lock_model) is taken when it leaves `watching` and given back when it returns; a process
that does not hold it leaves the model alone. Each decision is one log line
(servo.logs.decision) and, where it changes the loop, a loop event in the registry.
The shadow, evidence and approval steps are in servo.loop_promotion.
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
from retrain.rollout import Background
from servo import logs
from servo.loop_promotion import PromotionSteps
from servo.loop_train import WORKER_NICE

if TYPE_CHECKING:
    from registry.store import RegistryStore
    from retrain.policy import LoopConfig, Policy
    from retrain.rollout import Rollout
    from servo.deploy import KubernetesDeployer
    from servo.reconcile import KubernetesConfig, Reconciler
    from servo.up import Reports

log = logging.getLogger("servo.loop")

ACTOR = "loop"
WATCHING, RETRAINING, SHADOWING = "watching", "retraining", "shadowing"
AWAITING, ROLLING_OUT, PAUSED = "awaiting_approval", "rolling_out", "paused"


def now_iso(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.UTC).isoformat(timespec="seconds")


def timestamp(value: Any) -> float:
    """A registry time (datetime, naive = UTC, or ISO text) as Unix seconds."""
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).timestamp()
    return dt.datetime.fromisoformat(str(value)).timestamp()


def check_drift(report: MonitorReport) -> dict[str, Any] | None:
    """A check's input drift, kept in its loop event (the console's Monitors page draws it
    over time): the window's size, the largest JS distance of a feature (a distance: larger
    is more drift) with its threshold and feature, and the share of features drifted; None
    when the monitors compared no feature."""
    features = report.features
    if features is None or not features.features:
        return None
    worst = max(features.features, key=lambda f: f.js_distance)
    return {
        "n": features.window_n, "js_distance_max": worst.js_distance,
        "js_threshold": worst.js_threshold, "js_feature": worst.feature,
        "share_drifted": features.share_drifted,
    }  # fmt: skip


def check_accuracy(report: MonitorReport) -> dict[str, Any] | None:
    """A check's live accuracy, kept in its loop event (the console shows it): labelled
    and correct rows of the window, the accuracy with its Wilson interval, label coverage
    (labelled / predicted rows); None when the monitors had no accuracy part."""
    acc = report.accuracy
    if acc is None:
        return None
    return {
        "window_s": report.window_s, "end": report.end, "labelled": acc.labelled,
        "correct": acc.correct, "accuracy": acc.accuracy, "wilson_low": acc.wilson_low,
        "wilson_high": acc.wilson_high, "predicted": acc.predicted, "coverage": acc.coverage,
    }  # fmt: skip


def monitor_config(policy: Policy) -> MonitorConfig:
    return MonitorConfig(
        window_s=float(policy.monitor_window_s), step_s=float(policy.check_every_s)
    )


@dataclass
class ControllerConfig:
    directory: Path
    registry_url: str
    payload_root: Path
    #: how often held model locks are renewed (well within the registry's lease)
    heartbeat_s: float = 10.0
    #: niceness of the training workers (servo.loop_train.WORKER_NICE)
    worker_nice: int = WORKER_NICE
    owner: str = field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    )
    #: SERVO_DEPLOYER=kubernetes: versions run as InferenceServices (servo.reconcile);
    #: None: in the gateway (embedded)
    kubernetes: KubernetesConfig | None = None


class Controller(PromotionSteps):
    def __init__(
        self,
        store: RegistryStore,
        *,
        config: LoopConfig,
        reports: Reports,
        rollout: Rollout,
        scheduler: Any,
        settings: ControllerConfig,
        clock: Callable[[], float] = time.time,
        deployer: KubernetesDeployer | None = None,
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
        self._scheduled: set[str] = set()
        self._manual: dict[str, list[dict[str, Any]]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._stopping = threading.Event()
        self._heartbeat: threading.Thread | None = None
        #: with settings.kubernetes: its deployer (built at start unless given) and the
        #: reconciler thread that keeps the routed versions' InferenceServices
        self.deployer = deployer
        self.reconciler: Reconciler | None = None

    # lifecycle

    def start(self) -> None:
        kubernetes = self.settings.kubernetes
        if kubernetes is not None:  # first: a missing cluster configuration stops it here
            from servo.reconcile import Reconciler

            if self.deployer is None:
                self.deployer = kubernetes.deployer()
            self.reconciler = Reconciler(self.store, self.deployer, kubernetes)
            self.reconciler.start()
        self.scheduler.on("check", self.tick)
        self.scheduler.on("retrain", self.cron)
        self.sync()
        if isinstance(self.rollout, Background):  # the rollouts a stopped process left
            resumed = self.rollout.resume(self.may_roll_out)
            if resumed:
                logs.decision("rollouts_resumed", rollouts=resumed)
        self.scheduler.start()
        self._heartbeat = threading.Thread(target=self._beat, name="servo-loop-lease", daemon=True)
        self._heartbeat.start()

    def stop(self) -> None:
        """No new check starts, checks in flight finish, a running pipeline is stopped
        (the worker marks its run interrupted), the model locks are given back."""
        self._stopping.set()
        self.scheduler.shutdown(wait=True)
        if self.reconciler is not None:
            self.reconciler.stop()
        if isinstance(self.rollout, Background):  # they stay running: a restart resumes them
            self.rollout.stop()
        for model, job in list(self._jobs.items()):
            outcome = job.stop()
            self._jobs.pop(model, None)
            self.note(model, "retrain_finished", "retrain_stopped", status=outcome.status,
                      run_id=outcome.run_id, reason="shutdown")  # fmt: skip
            _, detail = self.state(model)
            self.back_to_watching(model, detail)
        for model in list(self._held):
            self.release(model)
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)

    def sync(self) -> None:
        """Schedule the checks (and cron retrains) of every deployed model not scheduled
        yet: at start, then at every heartbeat (a model deployed later is watched too)."""
        for model in sorted(set(self.store.deployments()) - self._scheduled):
            policy = self.config.for_model(model)
            self.scheduler.schedule_checks(model, float(policy.check_every_s))
            self.scheduler.schedule_cron(model, policy.trigger.cron)
            self._scheduled.add(model)
            if model not in self.store.loop_states():  # shown (admin API, metrics) at once
                self.store.set_loop_state(model, WATCHING)
            state, _ = self.state(model)
            logs.decision("watching", model=model, state=state,
                          check_every_s=policy.check_every_s, cron=policy.trigger.cron)  # fmt: skip

    def _beat(self) -> None:
        while not self._stopping.wait(self.settings.heartbeat_s):
            try:
                self.sync()
            except Exception as exc:
                log.warning("deployed models not synced with the schedule: %s", exc)
            for model in list(self._held):
                try:
                    if not self.store.heartbeat_model_lock(model, self.owner):
                        self._held.discard(model)
                        logs.decision("lock_lost", logging.WARNING, model=model, owner=self.owner)
                except Exception as exc:
                    log.warning("model lock of %s not renewed: %s", model, exc)

    # registry state, locks, notes

    def state(self, model: str) -> tuple[str, dict[str, Any]]:
        row = self.store.loop_states().get(model)
        if row is None:
            return WATCHING, {}
        detail = dict(row.get("detail") or {})
        if row.get("paused"):
            return PAUSED, detail
        state = str(row.get("state") or WATCHING)
        return (WATCHING if state == PAUSED else state), detail

    def champion(self, model: str) -> int | None:
        """The version that answers: the champion deployment (what the gateway routes),
        else the champion alias."""
        for row in self.store.deployments().get(model, []):
            if row["role"] == "champion":
                return int(row["version"])
        return self.store.alias(model, "champion")

    def set_state(self, model: str, state: str, detail: dict[str, Any]) -> None:
        # a process that does not hold the model's lock only records its checks while the
        # model is watching: its `detail` was read before the holder may have moved on (it
        # once overwrote the holder's "retraining" with "watching", and the holder started
        # a second pipeline)
        only_if = WATCHING if state == WATCHING and model not in self._held else None
        self.store.set_loop_state(model, state, detail, only_if=only_if)

    def acquire(self, model: str, purpose: str) -> bool:
        if model in self._held:
            return True
        if self.store.lock_model(model, self.owner, purpose):
            self._held.add(model)
            return True
        return False

    def may_roll_out(self, model: str) -> bool:
        """Whether this process runs `model`'s rollout: it holds (or takes) the model's
        lock, as for any step of its pipeline (one runner across processes)."""
        return not self._stopping.is_set() and self.acquire(model, ROLLING_OUT)

    def release(self, model: str) -> None:
        self._held.discard(model)
        try:
            self.store.unlock_model(model, self.owner)
        except Exception as exc:
            log.warning("model lock of %s not given back: %s", model, exc)

    def note(self, model: str, kind: str | None, event: str | None = None, *,
             level: int = logging.INFO, **detail: Any) -> None:  # fmt: skip
        """One decision: a loop event `kind` in the registry (None: log only) and one log
        line named `event` (default: the kind)."""
        if kind is not None:
            self.store.record_loop_event(model, kind, logs.plain(detail))
        logs.decision(event or kind or "loop", level, model=model, **detail)

    def back_to_watching(self, model: str, detail: dict[str, Any]) -> None:
        detail.update({"job": None, "candidate": None, "request": None, "deploying": None})
        self.set_state(model, WATCHING, detail)
        self.release(model)

    def _model_lock(self, model: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(model, threading.Lock())

    # the scheduler's entry points

    def cron(self, model: str) -> None:
        request = {"trigger": "cron", "actor": None, "reason": "cron schedule"}
        self._manual.setdefault(model, []).append(request)
        self.tick(model)

    def tick(self, model: str) -> None:
        """One check of `model`: advance its state machine by at most one step."""
        if self._stopping.is_set():
            return
        with self._model_lock(model):
            policy = self.config.for_model(model)
            state, detail = self.state(model)
            if state == PAUSED:
                for request in self._manual.pop(model, []) + self._claim(model):
                    self.note(model, "skipped", reason="paused", request=request.get("id"))
                return
            if state != WATCHING:
                taken = model not in self._held
                if not self.acquire(model, state):
                    return  # another process runs this model's pipeline
                if taken:  # left by a process that stopped or died: carry on from here
                    self.note(model, None, "resumed", state=state)
            step = {
                WATCHING: self._watch,
                RETRAINING: self._retraining,
                SHADOWING: self.shadowing,
                AWAITING: self.awaiting,
                ROLLING_OUT: self.awaiting,
            }.get(state, self._watch)
            step(model, policy, detail)

    # watching: checks, the trigger, and starting a retrain

    def _watch(self, model: str, policy: Policy, detail: dict[str, Any]) -> None:
        from retrain import trigger

        champion = self.champion(model)
        if champion is None:
            return
        active = self.store.active_rollout(model)
        if active is not None:  # started elsewhere (an approval while watching): followed
            if self.acquire(model, ROLLING_OUT):
                detail.update({"request": int(active["request_id"]), "job": None, "alarm": None,
                               "candidate": {"version": int(active["version"])}})  # fmt: skip
                self.note(model, None, "rollout_followed", rollout=active["id"],
                          request=active["request_id"], version=active["version"])  # fmt: skip
                self.set_state(model, ROLLING_OUT, detail)
            return
        now = self.clock()
        report = self.reports.report(model, champion, monitor_config(policy))
        signals = sorted(trigger.signals(report))
        self.store.record_loop_event(model, "check", logs.plain({
            "version": champion, "verdict": report.verdict, "reasons": report.reasons,
            "signals": signals, "source": report.source, "error": report.error,
            "accuracy": check_accuracy(report), "drift": check_drift(report)}))  # fmt: skip
        manual = self._manual.pop(model, []) + self._claim(model)
        if detail.get("alarm") and not manual:  # an alarm waiting for labelled rows
            self._wait_for_labels(model, policy, detail, champion, report)
            return
        state, verdict = trigger.decide(self._trigger_state(model, detail), report, policy, now)
        detail["trigger"] = state.to_json()
        if verdict.retrain or manual:
            request = manual[0] if manual else None
            if request is None:
                self.note(model, "alarm", version=champion, signals=verdict.signals,
                          reason=verdict.reason, consecutive=state.consecutive)  # fmt: skip
                why = (list(verdict.signals) or signals or ["alarm"])[0]
                if policy.retrain.min_labelled > 0:
                    named, why_text = list(verdict.signals) or [why], verdict.reason
                    self._wait(model, policy, detail, champion, signals=named, reason=why_text)
                    return
            else:
                why = str(request["trigger"])
            self._start_retrain(model, policy, detail, report, why=why, requests=manual)
            return
        logs.decision("check", model=model, version=champion, verdict=report.verdict,
                      signals=signals, consecutive=state.consecutive, retrain=False,
                      reason=verdict.reason)  # fmt: skip
        skip = verdict.kind if verdict.kind in ("cooldown", "budget") else None
        if skip is not None and detail.get("skip") != skip:  # once per spell, not per check
            self.note(model, "skipped", reason=verdict.reason)
        detail["skip"] = skip
        self.set_state(model, WATCHING, detail)

    # an alarm waiting for labelled rows (retrain.min_labelled)

    def _wait(self, model: str, policy: Policy, detail: dict[str, Any], champion: int, *,
              signals: list[str], reason: str) -> None:  # fmt: skip
        """Keep the alarm in the model's detail (a restart keeps waiting): the retrain
        starts once retrain.min_labelled labelled rows arrived since (or after wait_s)."""
        retrain = policy.retrain
        at = self.clock()  # after this check's report: its snapshot is the count's start
        detail["alarm"] = {"at": at, "version": champion, "signals": signals, "reason": reason}
        self.note(model, "retrain_waiting", version=champion, signals=signals,
                  min_labelled=retrain.min_labelled, wait_s=retrain.wait_s)  # fmt: skip
        self.set_state(model, WATCHING, detail)

    def labelled_since(self, model: str, version: int, policy: Policy, since: float) -> int | None:
        """Labels of `version` that arrived in the last `since` seconds (None: the source
        cannot say); fewer when the source's history is shorter (embedded, after a restart:
        only since the restart), so a count is never more than the truth."""
        step = float(policy.check_every_s)
        window = max(since, 1e-3)
        config = MonitorConfig(window_s=window, history_s=window, step_s=step)
        report = self.reports.report(model, version, config, export=False)
        if report.accuracy is None:
            return None
        return int(report.accuracy.labelled)

    def _wait_for_labels(self, model: str, policy: Policy, detail: dict[str, Any],
                         champion: int, report: MonitorReport) -> None:  # fmt: skip
        alarm = dict(detail["alarm"])
        if int(alarm.get("version", champion)) != champion:  # another champion answers now
            detail["alarm"] = None
            self.note(model, None, "alarm_dropped", version=alarm.get("version"),
                      champion=champion, reason="the champion changed while waiting")  # fmt: skip
            self.set_state(model, WATCHING, detail)
            return
        retrain = policy.retrain
        waited = max(0.0, self.clock() - float(alarm["at"]))
        labelled = self.labelled_since(model, champion, policy, waited)
        enough = labelled is not None and labelled >= retrain.min_labelled
        if enough or waited >= retrain.wait_s:
            why = str((alarm.get("signals") or ["alarm"])[0])
            reason = "enough labelled rows" if enough else f"wait_s {retrain.wait_s:g} passed"
            self._start_retrain(model, policy, detail, report, why=why, requests=[],
                                waited={"labelled": labelled, "waited_s": round(waited, 3),
                                        "min_labelled": retrain.min_labelled,
                                        "why": reason})  # fmt: skip
            return
        logs.decision("retrain_waiting", model=model, version=champion, labelled=labelled,
                      needed=retrain.min_labelled, waited_s=round(waited, 3),
                      wait_s=retrain.wait_s)  # fmt: skip
        self.set_state(model, WATCHING, detail)

    def _trigger_state(self, model: str, detail: dict[str, Any]) -> Any:
        """The persisted debounce/cooldown/budget state (a damaged one starts afresh: the
        registry's events still bound cooldown and budget)."""
        from retrain import trigger

        try:
            return trigger.TriggerState.from_json(detail.get("trigger") or {})
        except ValueError as exc:
            self.note(model, None, "trigger_state_reset", level=logging.WARNING, reason=str(exc))
            return trigger.TriggerState()

    def _claim(self, model: str) -> list[dict[str, Any]]:
        """The manual retrain requests of `model`, claimed (only while it is watching: a
        claimed request is used at once, never held in memory across a crash)."""
        return [
            {"trigger": "manual", "actor": r.get("actor"), "reason": r.get("reason") or "",
             "id": r.get("id")}
            for r in self.store.take_retrain_requests(self.owner, models=[model])
        ]  # fmt: skip

    def _registry_refuses(self, model: str, policy: Policy, now: float) -> str | None:
        """Cooldown and budget again, under the model's lock, from the registry's
        retrain_started events (another process may have retrained since this trigger
        state was written): the reason not to retrain, or None."""
        from retrain import trigger

        since = dt.datetime.fromtimestamp(now - 86400, dt.UTC)
        started = self.store.loop_events(model, kinds=["retrain_started"], since=since)
        times = sorted(timestamp(e["at"]) for e in started)
        state = trigger.TriggerState(0, times[-1] if times else None, times)
        return trigger.limit_reason(state, policy, now)

    def _start_retrain(self, model: str, policy: Policy, detail: dict[str, Any],
                       report: MonitorReport, *, why: str, requests: list[dict[str, Any]],
                       waited: dict[str, Any] | None = None) -> None:  # fmt: skip
        """Start a retrain (manual `requests`, all served by this one run, skip the
        cooldown and budget; nothing else does). It serves a waiting alarm too (`waited`:
        how long and for how many labelled rows); one refused by the cooldown or budget is
        dropped, one that finds the model's lock held waits on."""
        from retrain import trigger
        from servo.loop_train import start_worker
        from servo.worker import TrainSpec

        request = requests[0] if requests else None
        now = self.clock()
        if not self.acquire(model, "retrain"):
            holder = (self.store.model_lock(model) or {}).get("owner")
            reason = f"another pipeline of {model} is running (lock held by {holder})"
            self.note(model, "skipped", reason=reason, requests=[r.get("id") for r in requests])
            self._manual.setdefault(model, []).extend(requests)  # tried again when free
            self.set_state(model, WATCHING, detail)
            return
        refusal = None if request is not None else self._registry_refuses(model, policy, now)
        if refusal is not None:
            skip = refusal.split(":", 1)[0]
            if detail.get("skip") != skip:
                self.note(model, "skipped", reason=refusal)
            detail.update({"skip": skip, "alarm": None})
            self.set_state(model, WATCHING, detail)
            self.release(model)
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
        job = start_worker(spec, self.settings.directory / "logs", self.settings.worker_nice)
        self._jobs[model] = job
        state = trigger.started(self._trigger_state(model, detail), now)
        detail.update({
            "trigger": state.to_json(),
            "job": {"pid": job.pid, "owner": self.owner, "trigger": why, "triggered_by": actor,
                    "started_at": now_iso(now)},
            "report": report.to_json(),
            "reason": request["reason"] if request else why,
            "candidate": None, "request": None, "skip": None, "alarm": None,
        })  # fmt: skip
        self.note(model, "retrain_started", trigger=why, triggered_by=actor, pid=job.pid,
                  requests=[r.get("id") for r in requests], **(waited or {}))  # fmt: skip
        self.set_state(model, RETRAINING, detail)

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
        if detail.get("deploying"):  # the candidate's InferenceService, not Ready yet
            self.deploying(model, policy, detail)
            return
        job = self._jobs.get(model)
        if job is None:  # its worker died with the servo up that started it
            runs = self.store.recover_runs()
            self.note(model, "retrain_finished", "retrain_lost", level=logging.WARNING,
                      status="failed", runs=runs,
                      reason="the worker is gone (servo up restarted); its run was marked "
                      "failed by the recovery check")  # fmt: skip
            self.back_to_watching(model, detail)
            return
        outcome = job.poll()
        if outcome is None:
            return
        self._jobs.pop(model, None)
        self.note(model, "retrain_finished", status=outcome.status, run_id=outcome.run_id,
                  version=outcome.version, reused=outcome.reused, error=outcome.error,
                  log=outcome.log_path)  # fmt: skip
        if outcome.status != "succeeded" or outcome.version is None or outcome.reused:
            self.back_to_watching(model, detail)
            return
        self.deploy_candidate(model, policy, detail, outcome.version, outcome.run_id)
