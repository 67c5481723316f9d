"""A canary rollout driven look by look by the real judge over seeded synthetic counts,
recorded in a real registry the way a rollout runner records it (each look's counts and
verdict, then the decision), for the tests of `servo rollouts` and the admin API."""

from __future__ import annotations

from typing import Any

import numpy as np

from registry.store import RegistryStore
from retrain.judge import Counts, Judge, JudgeConfig, counts_to_json

APPROVER = frozenset({"viewer", "approver"})
JUDGE = JudgeConfig(metrics=("errors", "latency"), min_requests=100)


def approved(store: RegistryStore, model: str, version: int) -> int:
    request = store.file_promotion(model, version, {"version": version}, actor="loop")
    store.decide(request, "approved", "bob", APPROVER)
    return request


def judged_rollout(
    store: RegistryStore,
    model: str,
    version: int,
    *,
    error_rates: tuple[float, float],
    seed: int = 0,
    steps: tuple[float, ...] = (10, 50, 100),
    requests_per_look: int = 100,
    max_looks: int = 5000,
    config: JudgeConfig = JUDGE,
) -> dict[str, Any]:
    """Roll `version` out against the champion until the judge decides (error_rates:
    canary's, champion's, for errors and for slow answers alike); returns the finished
    rollout."""
    request = approved(store, model, version)
    doc = store.start_rollout(
        request, "bob", steps=list(steps), config={"judge": config.to_json(), "look_every_s": 1}
    )
    rid, step, judge = doc["id"], 0, Judge(config)
    rng = np.random.default_rng(seed)
    for _ in range(max_looks):
        canary = int(rng.binomial(requests_per_look, steps[step] / 100))
        champion = requests_per_look - canary
        looked = {
            "errors": Counts(canary, int(rng.binomial(canary, error_rates[0])),
                             champion, int(rng.binomial(champion, error_rates[1]))),
            "latency": Counts(canary, int(rng.binomial(canary, error_rates[0])),
                              champion, int(rng.binomial(champion, error_rates[1]))),
        }  # fmt: skip
        verdict = judge.observe(step, looked)
        store.record_look(rid, step=step, percent=steps[step], counts=counts_to_json(looked),
                          verdict=verdict.to_json())  # fmt: skip
        if verdict.decision == "rollback":
            store.rollback_rollout(rid, "rollout", verdict.reason, verdict.to_json())
            break
        if verdict.decision == "advance":
            if steps[step + 1] >= 100:
                store.promote_rollout(rid, "rollout", verdict.reason, verdict.to_json())
                break
            step += 1
            store.advance_rollout(rid, step, "rollout", verdict.reason, verdict.to_json())
    finished = store.rollout(rid)
    assert finished["status"] != "running", "the judge did not decide"
    return finished
