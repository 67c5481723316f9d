"""The controller's second half (a mixin of servo.loop.Controller): the candidate in
shadow, its evidence and promotion request, the gates, the approval and the rollout."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from retrain.rollout import Background
from servo import logs
from servo.loop_evidence import gather_evidence

if TYPE_CHECKING:
    from registry.store import RegistryStore
    from retrain.policy import Policy
    from retrain.rollout import Rollout
    from servo.deploy import KubernetesDeployer
    from servo.loop import ControllerConfig

log = logging.getLogger("servo.loop")

#: an approval made elsewhere (the CLI in another process) whose rollout did not follow
#: within this long is rolled out by the controller
ORPHAN_APPROVAL_S = 10.0
#: who decides automatically (their approvals need no other process's rollout)
AUTOMATIC = ("policy", "gates")


class GuardedRollout:
    """One rollout per request at a time in this process, whoever asks (the admin API
    after an approval, or the controller for an approval whose rollout did not run); a
    rollout that runs on in the background (retrain.rollout.Background: the canary) is
    running while its runner is."""

    def __init__(self, inner: Rollout):
        self.inner = inner
        self._lock = threading.Lock()
        self._active: set[int] = set()

    def running(self, request_id: int) -> bool:
        with self._lock:
            if request_id in self._active:
                return True
        inner = self.inner
        return isinstance(inner, Background) and inner.running(request_id)

    def resume(self, may_run: Callable[[str], bool] | None = None) -> list[int]:
        inner = self.inner
        return inner.resume(may_run) if isinstance(inner, Background) else []

    def stop(self) -> None:
        if isinstance(self.inner, Background):
            self.inner.stop()

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


class PromotionSteps:
    store: RegistryStore
    rollout: Rollout
    settings: ControllerConfig
    deployer: KubernetesDeployer | None

    clock: Callable[[], float]

    # provided by servo.loop.Controller
    def champion(self, model: str) -> int | None: ...
    def set_state(self, model: str, state: str, detail: dict[str, Any]) -> None: ...
    def back_to_watching(self, model: str, detail: dict[str, Any]) -> None: ...
    def note(self, model: str, kind: str | None, event: str | None = None, *,
             level: int = logging.INFO, **detail: Any) -> None: ...  # fmt: skip

    def deploy_candidate(self, model: str, policy: Policy, detail: dict[str, Any],
                         version: int, run_id: int | None) -> None:  # fmt: skip
        """A new version: shadowed at once by the embedded gateway; with the Kubernetes
        deployer, its InferenceService is created first and the model stays retraining
        (detail "deploying") until it is Ready (`deploying`)."""
        from servo.loop import RETRAINING, now_iso

        kubernetes = self.settings.kubernetes
        if kubernetes is None or self.deployer is None:
            self.start_shadow(model, policy, detail, version, run_id)
            return
        try:
            uri = self.store.version(model, version).artifact_uri
            target = kubernetes.target(model, version, uri)
            deployed = self.deployer.apply(target)
        except Exception as exc:  # DeployError, or the API server unreachable
            self._not_deployed(model, detail, version, run_id, str(exc) or type(exc).__name__)
            return
        detail["deploying"] = {"version": version, "run_id": run_id, "name": deployed.name,
                               "since": now_iso(self.clock())}  # fmt: skip
        self.note(model, "candidate_deploying", version=version, run_id=run_id,
                  name=deployed.name, storage_uri=target.storage_uri,
                  timeout_s=kubernetes.ready_timeout_s)  # fmt: skip
        self.set_state(model, RETRAINING, detail)

    def deploying(self, model: str, policy: Policy, detail: dict[str, Any]) -> None:
        """One look at the candidate's InferenceService: Ready starts its shadow; KServe
        giving up, or no Ready within the timeout, is a loop event with the deployer's
        message and the candidate is not shadowed (the reconciler deletes it after its
        grace)."""
        from servo.deploy import DeployError
        from servo.loop import ACTOR, RETRAINING, timestamp
        from servo.reconcile import BACKEND, endpoint_of

        candidate = dict(detail["deploying"])
        version, run_id = int(candidate["version"]), candidate.get("run_id")
        kubernetes = self.settings.kubernetes
        if kubernetes is None or self.deployer is None:  # restarted with the embedded one
            detail["deploying"] = None
            self.start_shadow(model, policy, detail, version, run_id)
            return
        waited = self.clock() - timestamp(candidate["since"])
        try:
            ready = self.deployer.poll_ready(model, version, kubernetes.ready_timeout_s, waited)
        except Exception as exc:  # DeployError, or the API server unreachable
            gave_up = isinstance(exc, DeployError) and exc.status is None
            if gave_up or waited >= kubernetes.ready_timeout_s:
                self._not_deployed(model, detail, version, run_id, str(exc))
                return
            # the API server did not answer (down, or a 404 while it is recreated): next check
            self.note(model, None, "candidate_status_unread", level=logging.WARNING,
                      version=version, error=str(exc) or type(exc).__name__)  # fmt: skip
            return
        if ready is None:
            logs.decision("candidate_deploying", model=model, version=version,
                          waited_s=round(waited, 1))  # fmt: skip
            self.set_state(model, RETRAINING, detail)
            return
        detail["deploying"] = None
        self.note(model, "candidate_ready", version=version, url=ready.url,
                  waited_s=round(waited, 1))  # fmt: skip
        # its endpoint first: the gateways call it from the shadow's first request on
        url, is_ready, why = endpoint_of(ready)
        self.store.set_endpoint(model, version, backend=BACKEND, name=ready.name, url=url,
                                ready=is_ready, detail=why, actor=ACTOR)  # fmt: skip
        self.start_shadow(model, policy, detail, version, run_id)

    def _not_deployed(self, model: str, detail: dict[str, Any], version: int,
                      run_id: int | None, error: str) -> None:  # fmt: skip
        detail["deploying"] = None
        self.note(model, "deploy_failed", level=logging.WARNING, version=version,
                  run_id=run_id, error=error)  # fmt: skip
        self.back_to_watching(model, detail)

    def start_shadow(self, model: str, policy: Policy, detail: dict[str, Any], version: int,
                     run_id: int | None) -> None:  # fmt: skip
        from servo.loop import ACTOR, SHADOWING, now_iso

        job = detail.get("job") or {}
        self.store.add_shadow(model, version, ACTOR, f"candidate of run {run_id} "
                              f"({detail.get('reason')})")  # fmt: skip
        detail["candidate"] = {"version": version, "run_id": run_id,
                               "since": now_iso(self.clock()), "trigger": job.get("trigger"),
                               "triggered_by": job.get("triggered_by")}  # fmt: skip
        detail["job"] = None
        self.note(model, "shadow_started", version=version, run_id=run_id,
                  min_labelled=policy.shadow.min_labelled)  # fmt: skip
        self.set_state(model, SHADOWING, detail)

    def shadowing(self, model: str, policy: Policy, detail: dict[str, Any]) -> None:
        """Evidence from the payload log; enough (or the timeout) files the request, then
        the gates decide whether it is rejected at once or waits for an approver."""
        from retrain import gates
        from servo.loop import ACTOR, AWAITING, SHADOWING, timestamp

        candidate = detail.get("candidate") or {}
        champion = self.champion(model)
        if not candidate or champion is None:
            self.back_to_watching(model, detail)
            return
        version = int(candidate["version"])
        filed = self._filed(model, version, candidate)
        if filed is not None and filed["status"] != "pending":
            detail["request"] = int(filed["id"])  # decided: awaiting carries on from there
            self.set_state(model, AWAITING, detail)
            return
        if filed is not None:  # filed by a process that stopped before the gates judged it
            doc, request_id = dict(filed["evidence"]), int(filed["id"])
            insufficient = bool(doc.get("insufficient_evidence"))
            detail["request"] = request_id
        else:
            timed_out = self.clock() - timestamp(candidate["since"]) >= policy.shadow.timeout_s
            gathered, n_labelled = gather_evidence(
                self.store, model, champion=champion, candidate=version, policy=policy,
                detail=detail, payload_root=self.settings.payload_root, timed_out=timed_out,
            )  # fmt: skip
            if gathered is None:
                detail["candidate"] = {**candidate, "n_labelled": n_labelled}
                self.set_state(model, SHADOWING, detail)
                return
            doc = gathered
            insufficient = bool(doc.get("insufficient_evidence"))
            request_id = self.store.file_promotion(
                model, version, doc, ACTOR, run_id=candidate.get("run_id"),
                triggered_by=candidate.get("triggered_by"),
                expires_s=float(policy.approval.expires_s),
            )  # fmt: skip
            detail["request"] = request_id
            self.note(model, "promotion_filed", version=version, request=request_id,
                      n_labelled=n_labelled, insufficient=insufficient)  # fmt: skip
        results = gates.evaluate(doc, policy.gates)
        why = gates.reason(results)
        decision = gates.outcome(doc, results, policy.approval)
        if decision == "rejected":
            self.store.auto_decide(request_id, "rejected", why, actor="gates")
            self.store.remove_shadow(model, version, "gates", why)
            self.note(model, "promotion_decided", "promotion_rejected", request=request_id,
                      version=version, decision="rejected", actor="gates", reason=why)  # fmt: skip
            self.back_to_watching(model, detail)
            return
        if decision == "approved":
            self.store.auto_decide(request_id, "approved", f"{why}; the policy approves "
                                   "automatically", actor="policy")  # fmt: skip
            self.note(model, "promotion_decided", "promotion_approved", request=request_id,
                      version=version, decision="approved", actor="policy")  # fmt: skip
        else:
            self.note(model, None, "awaiting_approval", version=version, request=request_id,
                      reason=why, insufficient=insufficient)  # fmt: skip
        self.set_state(model, AWAITING, detail)

    def _filed(self, model: str, version: int, candidate: dict[str, Any]) -> dict[str, Any] | None:
        """The request for the candidate filed since its shadow started, where the process
        that filed it stopped (a kill) before the loop state recorded it; else None. Filing
        and recording are two transactions: without this, a restart files a second one."""
        from servo.loop import timestamp

        since = timestamp(candidate["since"]) if candidate.get("since") else 0.0
        for request in self.store.promotions(model=model):
            # the state keeps whole seconds: a request of this shadow is not older than it
            if request["version"] == version and timestamp(request["created_at"]) >= since:
                return request
        return None

    def awaiting(self, model: str, policy: Policy, detail: dict[str, Any]) -> None:
        """A pending request waits; an approved one is rolled out (unless the admin API
        that approved it is doing so); any other end takes the candidate out of shadow."""
        from servo.loop import ACTOR, ROLLING_OUT, timestamp

        request_id = detail.get("request")
        if request_id is None:
            self.back_to_watching(model, detail)
            return
        self.store.expire_promotions()
        request = self.store.promotion(int(request_id))
        version = int(request["version"])
        decision = request.get("decision") or {}
        if request["status"] == "approved":
            if isinstance(self.rollout, Background) and self.rollout.running(request_id):
                self.set_state(model, ROLLING_OUT, detail)  # also one the admin API started
                return
            decided = decision.get("at")
            age = self.clock() - timestamp(decided) if decided else ORPHAN_APPROVAL_S
            if decision.get("actor") not in AUTOMATIC and age < ORPHAN_APPROVAL_S:
                return  # the admin API or CLI that approved it runs its rollout
            self.set_state(model, ROLLING_OUT, detail)
            self.note(model, None, "rollout_started", version=version, request=request_id)
            self.rollout.start(request, ACTOR)
            request = self.store.promotion(int(request_id))
        status = str(request["status"])
        if status in ("pending", "approved"):
            return
        if status == "promoted":
            self.note(model, "promoted", version=version, request=request_id,
                      approved_by=decision.get("actor"))  # fmt: skip
            # a new champion: the debounce starts over (cooldown and budget stay)
            detail["trigger"] = {**(detail.get("trigger") or {}), "consecutive": 0}
            self.back_to_watching(model, detail)
            return
        # rejected, expired, void, failed, rolled_back: the candidate leaves the shadow
        why = decision.get("reason") or request.get("status_reason")
        actor = decision.get("actor")
        self.note(model, "promotion_decided", "promotion_closed", request=request_id,
                  version=version, decision=status, actor=actor, reason=why)  # fmt: skip
        routed = self.store.deployments().get(model, [])
        if any(r["version"] == version and r["role"] == "shadow" for r in routed):
            self.store.remove_shadow(model, version, ACTOR, f"request {request_id} {status}")
        self.back_to_watching(model, detail)
