"""The last step of a promotion: an approved request's candidate takes the traffic.

One interface, `Rollout`: `start(request, actor)` takes an approved request (the
registry's promotion document) and returns the request's status: final ("promoted",
"failed", "rolled_back") or "approved" while a rollout runs on in the background.

`ImmediateRollout` swaps the route at once: the candidate becomes champion (the registry's
`promote`: one transaction, audited with a rollback pointer, the old champion archived),
and the request is finished as `promoted`. A swap the registry refuses (the version is no
longer servable, the model has changed) finishes it as `failed`, with the registry's
reason, and the old champion keeps serving. A request that is no longer `approved` when it
starts (another process rolled it out) is left as it is.

`CanaryRollout` (the policy's `rollout.strategy: canary`, the default) makes the candidate
a canary taking `steps[0]` % of the traffic and returns at once; a runner thread looks
every `look_every_s`: the counts of champion and canary since its last look (a
`CountsSource`), judged by `retrain.judge`, stored with the verdict (`record_look`), then
rollback (the route table restored in one step), advance to the next step, promotion once
the next step is 100, or hold; a step still undecided after `step_timeout_s` holds with an
alert, or rolls back, as the policy says. The registry keeps everything a runner needs:
after a restart `resume()` rebuilds each running rollout's judge by replaying its stored
looks, and the first read of the counts is the new baseline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from registry.base import aware
from registry.store import Conflict, RegistryError

if TYPE_CHECKING:
    from registry.store import RegistryStore
    from retrain.judge import Counts, Judge, JudgeConfig, Verdict
    from retrain.policy import Policy
    from retrain.policy import Rollout as RolloutPolicy

# retrain.judge (numpy) is imported where the canary needs it: the CLI's ImmediateRollout
# stays light
log = logging.getLogger("servo.retrain")
#: the logger of the loop's decisions (servo.logs: one structured line each)
decisions = logging.getLogger("servo.loop")

ACTOR = "canary"
#: cumulative counts: version -> metric -> (trials, events)
Cumulative = dict[int, dict[str, tuple[int, int]]]


class Rollout(Protocol):
    def start(self, request: dict[str, Any], actor: str) -> str:
        """Roll out an approved request's candidate; returns the request's status: final
        ("promoted", "failed", or "rolled_back" for a rollout that undid itself), or
        "approved" while the rollout goes on in the background."""
        ...


@runtime_checkable
class Background(Protocol):
    """A rollout that runs on after `start` returns (runner threads of this process)."""

    def running(self, request_id: int) -> bool: ...
    def resume(self, may_run: Callable[[str], bool] | None = None) -> list[int]: ...
    def stop(self) -> None: ...


class CountsSource(Protocol):
    def cumulative(
        self, model: str, versions: Sequence[int], latency_threshold_s: float
    ) -> Cumulative:
        """Per version, per metric (retrain.judge.METRICS), cumulative (trials, events)
        since some fixed origin: errors (requests, 5xx answers), latency (requests,
        requests slower than the threshold), incorrect (labelled rows, incorrect ones)."""
        ...


class ImmediateRollout:
    """The candidate becomes champion at once (route swap, old champion archived)."""

    def __init__(self, store: RegistryStore):
        self.store = store

    def start(self, request: dict[str, Any], actor: str) -> str:
        store = self.store
        request_id, model, version = int(request["id"]), request["model"], int(request["version"])
        current = store.promotion(request_id)["status"]
        if current != "approved":  # finished meanwhile (another process rolled it out)
            return str(current)
        reason = f"promotion request {request_id}"
        try:
            old = store.promote(model, version, actor, reason=reason, request_id=request_id)
        except RegistryError as exc:
            current = store.promotion(request_id)["status"]
            if current != "approved":  # another rollout of it finished first
                return str(current)
            if _swapped(store.promotion(request_id)):
                return "promoted"  # another rollout of it swapped first, and finishes it
            log.error(
                "promotion request %s: %s version %s not promoted: %s",
                request_id,
                model,
                version,
                exc,
            )
            store.finish_promotion(request_id, "failed", actor, reason=f"route swap refused: {exc}")
            return "failed"
        try:
            store.finish_promotion(
                request_id, "promoted", actor, reason=f"version {version} replaced version {old}"
            )
        except Conflict:  # finished by another process meanwhile
            return str(store.promotion(request_id)["status"])
        log.info(
            "promotion request %s: %s version %s is champion (was %s)",
            request_id,
            model,
            version,
            old,
        )
        return "promoted"


def _swapped(request: dict[str, Any]) -> bool:
    """Whether a route swap carried this request out (its audit has the promote)."""
    return any(entry["action"] == "promote" for entry in request.get("audit", ()))


def judge_config(policy: RolloutPolicy) -> JudgeConfig:
    from retrain.judge import JudgeConfig

    return JudgeConfig(
        alpha=policy.alpha,
        beta=policy.beta,
        delta=policy.delta,
        metrics=tuple(policy.metrics),
        min_requests=policy.min_requests,
        negligible_rate=policy.negligible_rate,
    )


def snapshot(policy: RolloutPolicy) -> dict[str, Any]:
    """What a rollout keeps of the policy (its `config`): the judge's parameters and the
    runner's; a resumed rollout goes on with these, whatever the policy file says now."""
    return {"judge": judge_config(policy).to_json(), "rollout": policy.model_dump(mode="json")}


def increments(
    before: Cumulative, after: Cumulative, champion: int, canary: int
) -> dict[str, Counts] | None:
    """Per metric, the counts of one look (after - before); None if a counter went back (a
    gateway restarted its counts: the next look starts from `after`)."""
    from retrain.judge import METRICS, Counts

    out: dict[str, Counts] = {}
    for metric in METRICS:
        values = []
        for version in (canary, champion):
            trials, events = after.get(version, {}).get(metric, (0, 0))
            old_trials, old_events = before.get(version, {}).get(metric, (0, 0))
            values += [trials - old_trials, events - old_events]
        if min(values) < 0 or values[1] > values[0] or values[3] > values[2]:
            return None
        out[metric] = Counts(*values)
    return out


@dataclass
class _Runner:
    rollout_id: int
    request_id: int
    model: str
    judge: Judge
    #: the counts at the last look (None: the next read is the baseline)
    last: Cumulative | None = None
    verdict: Verdict | None = None
    stopped: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class CanaryRollout:
    """Canary rollouts judged look by look, one runner thread per running rollout.

    `policy_for(model)` gives the policy in force (its `rollout` section at the start);
    `counts` the cumulative counts; `clock` the time (Unix seconds: step timeouts against
    the registry's times); `may_run(model)` whether this process runs that model's rollout
    (servo up: it holds the model's loop lock), default yes."""

    def __init__(
        self,
        store: RegistryStore,
        counts: CountsSource,
        policy_for: Callable[[str], Policy],
        clock: Callable[[], float] = time.time,
        *,
        may_run: Callable[[str], bool] | None = None,
        actor: str = ACTOR,
    ):
        self.store = store
        self.counts = counts
        self.policy_for = policy_for
        self.clock = clock
        self.may_run = may_run
        self.actor = actor
        self._lock = threading.Lock()
        self._runners: dict[int, _Runner] = {}  # rollout id -> its runner
        self._stopping = threading.Event()

    # the Rollout protocol

    def start(self, request: dict[str, Any], actor: str) -> str:
        """Start the canary of an approved request (or resume its running rollout) and
        return at once: "approved" while it runs, or the request's status if it is no
        longer approved; "failed" if the registry refuses the canary."""
        store = self.store
        request_id, model = int(request["id"]), str(request["model"])
        current = str(store.promotion(request_id)["status"])
        if current != "approved":
            return current
        policy = self.policy_for(model).rollout
        active = store.active_rollout(model)
        resumed = active is not None and int(active["request_id"]) == request_id
        if policy.strategy == "immediate" and not resumed:  # (a running canary goes on)
            return ImmediateRollout(store).start(request, actor)
        try:
            doc = store.start_rollout(
                request_id, actor, steps=list(policy.steps), config=snapshot(policy)
            )
        except RegistryError as exc:
            current = str(store.promotion(request_id)["status"])
            if current != "approved":  # finished meanwhile (another process)
                return current
            log.error("promotion request %s: canary of %s version %s not started: %s",
                      request_id, model, request["version"], exc)  # fmt: skip
            try:
                store.finish_promotion(request_id, "failed", actor, reason=f"canary refused: {exc}")
            except Conflict:
                return str(store.promotion(request_id)["status"])
            return "failed"
        if not resumed:
            note(store, model, "canary_started", rollout=doc["id"], version=doc["version"],
                 champion=doc["champion"], steps=doc["steps"], percent=doc["percent"],
                 request=request_id, actor=actor, look_every_s=policy.look_every_s)  # fmt: skip
        self._run(doc, resumed=resumed)
        return "approved"

    # background runners

    def running(self, request_id: int) -> bool:
        """Whether a runner of this process carries the rollout of `request_id` on."""
        with self._lock:
            return any(
                r.request_id == request_id and not r.stopped.is_set()
                for r in self._runners.values()
            )

    def resume(self, may_run: Callable[[str], bool] | None = None) -> list[int]:
        """A runner for every running rollout in the registry (of the models `may_run`
        allows); returns the ids of those resumed."""
        resumed = []
        for doc in self.store.rollouts(status="running"):
            if may_run is not None and not may_run(str(doc["model"])):
                continue
            if self._run(doc, resumed=True):
                resumed.append(int(doc["id"]))
        return resumed

    def stop(self) -> None:
        """The runners stop (their rollouts stay running in the registry: a restart
        resumes them)."""
        self._stopping.set()
        with self._lock:
            runners = list(self._runners.values())
        for runner in runners:
            runner.stopped.set()
        for runner in runners:
            if runner.thread is not None:
                runner.thread.join(timeout=10)

    def verdicts(self) -> dict[str, tuple[int, Verdict]]:
        """model -> (rollout id, the last verdict of its runner), for the metrics."""
        with self._lock:
            return {
                r.model: (r.rollout_id, r.verdict)
                for r in self._runners.values()
                if r.verdict is not None
            }

    def _run(self, doc: dict[str, Any], *, resumed: bool) -> bool:
        """Start the runner of rollout `doc` unless one runs (or this process may not);
        True if started."""
        rollout_id, model = int(doc["id"]), str(doc["model"])
        if self._stopping.is_set():
            return False
        if self.may_run is not None and not self.may_run(model):
            log.info("rollout %s of %s: left to the process that holds the model", rollout_id,
                     model)  # fmt: skip
            return False
        with self._lock:
            if self._alive(rollout_id):
                return False
        runner = self._runner(doc)  # reads the registry: not under the lock
        with self._lock:
            if self._alive(rollout_id):  # started meanwhile
                return False
            self._runners[rollout_id] = runner
            runner.thread = threading.Thread(
                target=self._loop,
                args=(runner, float(_policy(doc)["look_every_s"])),
                name=f"servo-canary-{rollout_id}",
                daemon=True,
            )
        if resumed:
            note(self.store, model, "rollout_resumed", rollout=rollout_id, version=doc["version"],
                 step=doc["step"], percent=doc["percent"], looks=runner.judge.looks)  # fmt: skip
        if self._carry_out(doc, runner):  # its last stored verdict ended it
            self._end(runner)
            return True
        self._baseline(runner)
        runner.thread.start()
        return True

    def _alive(self, rollout_id: int) -> bool:
        """Whether a runner of `rollout_id` goes on (call it under the lock)."""
        old = self._runners.get(rollout_id)
        return old is not None and not old.stopped.is_set()

    def _runner(self, doc: dict[str, Any]) -> _Runner:
        """A runner whose judge has seen the rollout's stored looks (a resumed rollout goes
        on from its stored counts)."""
        from retrain.judge import Judge, JudgeConfig, counts_from_json

        rollout_id = int(doc["id"])
        judge = Judge(JudgeConfig.from_json(doc["config"]["judge"]))
        verdict = None
        for look in self.store.rollout_looks(rollout_id):
            verdict = judge.observe(int(look["step"]), counts_from_json(look["counts"]))
        runner = _Runner(rollout_id, int(doc["request_id"]), str(doc["model"]), judge)
        runner.verdict = verdict
        return runner

    def _carry_out(self, doc: dict[str, Any], runner: _Runner) -> bool:
        """The decision of the last stored look, where the process that stored it died
        before acting on it (a rollback, or an advance from the step the rollout is still
        at): taken now, as that look decided (the next looks would judge on, past it).
        True when the rollout is over."""
        verdict = runner.verdict
        if verdict is None or verdict.decision == "hold" or verdict.step != int(doc["step"]):
            return False
        log.warning("rollout %s: look %s decided %s before its process stopped; carried out now",
                    doc["id"], verdict.looks, verdict.decision)  # fmt: skip
        return self._act(doc, verdict)

    def _baseline(self, runner: _Runner) -> None:
        try:
            doc = self.store.rollout(runner.rollout_id)
            runner.last = self._read(doc)
        except Exception as exc:  # the next look tries again
            log.warning("rollout %s: counts not read: %s", runner.rollout_id, exc)

    def _read(self, doc: dict[str, Any]) -> Cumulative:
        threshold = float(_policy(doc)["latency_threshold_s"])
        versions = [int(doc["champion"]), int(doc["version"])]
        return self.counts.cumulative(str(doc["model"]), versions, threshold)

    def _loop(self, runner: _Runner, every: float) -> None:
        while not runner.stopped.wait(every):
            try:
                self.look(runner.rollout_id)
            except Exception:  # the registry or the counts failed: the next look retries
                log.exception("rollout %s: look failed", runner.rollout_id)

    # one look

    def look(self, rollout_id: int) -> bool:
        """One look of rollout `rollout_id`'s runner: read, judge, record, decide. True
        when the rollout is over (finished here or elsewhere): its runner ends."""
        with self._lock:
            runner = self._runners.get(rollout_id)
        if runner is None:
            raise KeyError(f"no runner of rollout {rollout_id} in this process")
        over = self._look(runner)
        if over:
            self._end(runner)
        return over

    def _end(self, runner: _Runner) -> None:
        runner.stopped.set()
        with self._lock:
            if self._runners.get(runner.rollout_id) is runner:
                del self._runners[runner.rollout_id]

    def _look(self, runner: _Runner) -> bool:
        store, rollout_id = self.store, runner.rollout_id
        doc = store.rollout(rollout_id)
        if doc["status"] != "running":
            return True  # finished elsewhere (an operator's rollback, another process)
        now_counts = self._read(doc)
        before, runner.last = runner.last, now_counts
        if before is None:
            return False  # the baseline
        champion, canary = int(doc["champion"]), int(doc["version"])
        counts = increments(before, now_counts, champion, canary)
        if counts is None:
            log.warning("rollout %s: a count went back; this look is the new baseline",
                        rollout_id)  # fmt: skip
            return False
        step = int(doc["step"])
        verdict = runner.judge.observe(step, counts)
        runner.verdict = verdict
        try:
            store.record_look(rollout_id, step=step, percent=float(doc["percent"]),
                              counts={m: c.to_list() for m, c in counts.items()},
                              verdict=verdict.to_json())  # fmt: skip
        except Conflict:
            return True  # finished meanwhile
        decisions.debug("canary_look", extra={"fields": {
            "model": runner.model, "rollout": rollout_id, "step": step,
            "decision": verdict.decision, "rollback_e": verdict.rollback_e,
            "promote_e": verdict.promote_e}})  # fmt: skip
        return self._act(doc, verdict)

    def _act(self, doc: dict[str, Any], verdict: Verdict) -> bool:
        """Carry out `verdict` on rollout `doc`; True when the rollout is over."""
        store, rollout_id = self.store, int(doc["id"])
        try:
            return self._decide(doc, verdict)
        except RegistryError as exc:
            if store.rollout(rollout_id)["status"] != "running":
                return True  # finished by another process first
            # the registry refuses the step (the candidate is no longer servable, ...):
            # the champion alone again, the rollout failed
            why = f"{verdict.decision} refused by the registry: {exc}"
            try:
                store.fail_rollout(rollout_id, self.actor, why)
            except Conflict:
                return True
            note(store, str(doc["model"]), "canary_failed", level=logging.ERROR,
                 rollout=rollout_id, version=doc["version"], request=doc["request_id"],
                 reason=why)  # fmt: skip
            return True

    def _decide(self, doc: dict[str, Any], verdict: Verdict) -> bool:
        store, actor = self.store, self.actor
        rollout_id, model, step = int(doc["id"]), str(doc["model"]), int(doc["step"])
        steps = [float(s) for s in doc["steps"]]
        shown = {"rollout": rollout_id, "version": doc["version"], "request": doc["request_id"],
                 "step": step, "percent": steps[step], "looks": verdict.looks,
                 "rollback_e": verdict.rollback_e, "promote_e": verdict.promote_e,
                 "step_canary_requests": verdict.step_canary_requests}  # fmt: skip
        if verdict.decision == "rollback":
            store.rollback_rollout(rollout_id, actor, verdict.reason, verdict.to_json())
            note(store, model, "canary_rolled_back", level=logging.WARNING, reason=verdict.reason,
                 **shown)  # fmt: skip
            return True
        if verdict.decision == "advance":
            following = step + 1
            if following >= len(steps) - 1:  # the next step is 100: the candidate is champion
                old = store.promote_rollout(rollout_id, actor, verdict.reason, verdict.to_json())
                note(store, model, "canary_promoted", reason=verdict.reason, replaced=old, **shown)
                return True
            store.advance_rollout(rollout_id, following, actor, verdict.reason, verdict.to_json())
            note(store, model, "canary_step", reason=verdict.reason, to_step=following,
                 to_percent=steps[following], **shown)  # fmt: skip
            return False
        policy = _policy(doc)
        waited = self.clock() - aware(doc["step_started_at"]).timestamp()
        if waited < float(policy["step_timeout_s"]):
            return False
        why = (f"step {step} ({steps[step]:g} %) undecided after {waited:.0f} s "
               f"(step_timeout_s {policy['step_timeout_s']:g}): {verdict.reason}")  # fmt: skip
        if policy["on_timeout"] == "rollback":
            store.rollback_rollout(rollout_id, actor, why, verdict.to_json())
            note(store, model, "canary_rolled_back", level=logging.WARNING, reason=why, **shown)
            return True
        if not doc["held"]:
            store.hold_rollout(rollout_id, True, why)
            note(store, model, "canary_held", level=logging.WARNING, reason=why, **shown)
        return False


def _policy(doc: Mapping[str, Any]) -> dict[str, Any]:
    rollout: dict[str, Any] = doc["config"]["rollout"]
    return rollout


def note(store: RegistryStore, model: str, kind: str, *, level: int = logging.INFO,
         **detail: Any) -> None:  # fmt: skip
    """One decision of a rollout: a loop event `kind` in the registry and one log line of
    the same name (the loop's decision logger)."""
    try:
        store.record_loop_event(model, kind, detail)
    except RegistryError as exc:
        log.warning("loop event %s of %s not recorded: %s", kind, model, exc)
    decisions.log(level, kind, extra={"fields": {"model": model, **detail}})
