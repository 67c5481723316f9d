"""The canary judge: anytime-valid sequential tests on per-look event counts.

Per metric and per look the gateway counts, since the previous look, trials and events of
the canary and of the champion: "errors" (requests, 5xx answers), "latency" (requests,
answers slower than the model's threshold), "incorrect" (labelled rows, incorrect labels).
Given that an event happened in a look, it came from the canary with probability

    theta(r) = n_c * r / (n_c * r + n_b)       (n: that look's trials of each arm,
                                                r: canary event rate / champion's)

whatever the base rate does from one look to the next. So, per metric:

- rollback e-process: a mixture over r > 1 (`ROLLBACK_RATIOS`, `ROLLBACK_WEIGHTS`) of the
  product over looks of Binomial(e_c | e_c + e_b, theta(r)) / Binomial(... theta(1)). It
  is a nonnegative supermartingale whenever r <= 1 (at every look), so by Ville's
  inequality it ever reaches m/alpha with probability at most alpha/m: rolling back when
  any of the m judged metrics reaches it keeps false rollbacks at or below alpha however
  often the judge looks. It runs over the whole rollout.
- promotion e-process: the mirror, a mixture over r < 1 + delta (`promotion_ratios`,
  `PROMOTION_WEIGHTS`) against theta(1 + delta); a canary worse by delta or more reaches
  1/beta with probability at most beta. It restarts at each step. A step advances when
  every judged metric has reached 1/beta or saw no event at all in the step (no evidence
  either way; the rollback test still guards it), and the step saw at least
  `min_requests` canary requests (the "errors" canary trials): a canary without traffic
  never advances.

The mixtures are fixed before any data (any such prior keeps the guarantees); they were
chosen with `benchmarks/canary_sim.py` (100 req/s, 10 % canary, 1 % base error rate, a
look a second, alpha = beta = 0.05, delta = 0.25; tuned on seeds other than the
benchmark's):

- rollback: r in {1.25, 1.5, 2, 3, 5, 10}, weights 0.1, 0.25, 0.3, 0.2, 0.1, 0.05: most
  mass on the doublings people fear (2x: p90 rollback time 3.6 minutes, goal 5), some on
  gross failures (10x: decided in seconds) and on a small rise (1.25x: mostly caught
  within the hour);
- promotion: r = (1 + delta) ** (1 - f) for f in {0.5, 0.75, 1, 2, 4, 7} "margins below
  the null" (at delta = 0.25: r = 1.118, 1.057, 1, 0.8, 0.41, 0.21), weights 0.3, 0.3,
  0.2, 0.1, 0.05, 0.05. Every point lies below 1 + delta for any delta (a point above it
  would break the guarantee). An A/A canary must pass within the hour at p90 (the tight
  goal: 47 minutes), and the fastest single point for it is not r = 1 but about
  f = 0.75 (its log-likelihood ratio grows almost as fast and wobbles less), so 80 % of
  the mass is on f <= 1; the rest lets clearly better canaries pass sooner.
  Relative to the margin, so a policy's delta moves the whole grid with it.

Everything is in log space (logsumexp over the grid): one look costs O(grid), and a
million looks lose nothing. `log_likelihood_ratios` is the one formula, vectorised: the
judge calls it per look, the benchmark on whole simulated streams.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

METRICS = ("errors", "latency", "incorrect")

ROLLBACK_RATIOS = np.array([1.25, 1.5, 2.0, 3.0, 5.0, 10.0])
ROLLBACK_WEIGHTS = np.array([0.1, 0.25, 0.3, 0.2, 0.1, 0.05])
PROMOTION_MARGINS = np.array([0.5, 0.75, 1.0, 2.0, 4.0, 7.0])
PROMOTION_WEIGHTS = np.array([0.3, 0.3, 0.2, 0.1, 0.05, 0.05])

#: e-values are reported as at most e**LOG_E_CAP (1e299), far past any threshold, so a
#: verdict stays finite JSON
LOG_E_CAP = 690.0

Array = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Counts:
    """One metric, one look: increments since the previous look."""

    canary_trials: int
    canary_events: int
    champion_trials: int
    champion_events: int

    def __post_init__(self) -> None:
        for name in ("canary_trials", "canary_events", "champion_trials", "champion_events"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for arm in ("canary", "champion"):
            trials, events = getattr(self, f"{arm}_trials"), getattr(self, f"{arm}_events")
            if events > trials:
                raise ValueError(f"{arm}_events ({events}) exceeds {arm}_trials ({trials})")

    def to_list(self) -> list[int]:
        return [self.canary_trials, self.canary_events, self.champion_trials, self.champion_events]


@dataclass(frozen=True)
class JudgeConfig:
    alpha: float = 0.05
    beta: float = 0.05
    delta: float = 0.25
    metrics: tuple[str, ...] = METRICS
    min_requests: int = 200

    def __post_init__(self) -> None:
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if not _real(value) or not 0 < value < 1:
                raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
        if not _real(self.delta) or not 0 < self.delta < math.inf:
            raise ValueError(f"delta must be a finite number > 0, got {self.delta!r}")
        if isinstance(self.metrics, str) or not isinstance(self.metrics, tuple | list):
            raise ValueError(f"metrics must be a list of names, got {self.metrics!r}")
        object.__setattr__(self, "metrics", tuple(self.metrics))
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics or len(set(self.metrics)) != len(self.metrics):
            raise ValueError(
                f"metrics must be distinct names among {', '.join(METRICS)} "
                f"(at least one), got {list(self.metrics)}"
            )
        value = self.min_requests
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"min_requests must be an integer >= 0, got {value!r}")

    @property
    def rollback_threshold(self) -> float:
        """m / alpha: alpha split equally over the m judged metrics."""
        return len(self.metrics) / self.alpha

    @property
    def promotion_threshold(self) -> float:
        return 1 / self.beta

    def to_json(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "delta": self.delta,
            "metrics": list(self.metrics),
            "min_requests": self.min_requests,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> JudgeConfig:
        if not isinstance(doc, Mapping):
            raise ValueError(f"judge config must be an object, got {doc!r}")
        unknown = sorted(set(doc) - {"alpha", "beta", "delta", "metrics", "min_requests"})
        if unknown:
            raise ValueError(f"judge config: unknown keys {', '.join(map(str, unknown))}")
        return cls(**doc)


@dataclass(frozen=True)
class Verdict:
    decision: Literal["rollback", "advance", "hold"]
    step: int
    looks: int  # looks so far in the rollout
    rollback_e: dict[str, float]  # per metric (whole rollout)
    promote_e: dict[str, float]  # per metric (this step)
    step_canary_requests: int
    step_events: dict[str, tuple[int, int]]  # per metric: canary, champion events this step
    reason: str  # names the metric(s), e-values and thresholds

    def to_json(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "step": self.step,
            "looks": self.looks,
            "rollback_e": dict(self.rollback_e),
            "promote_e": dict(self.promote_e),
            "step_canary_requests": self.step_canary_requests,
            "step_events": {m: list(pair) for m, pair in self.step_events.items()},
            "reason": self.reason,
        }


def log_likelihood_ratios(counts: npt.ArrayLike, ratios: Array, null_ratio: float) -> Array:
    """log Binomial(e_c | k, theta(r)) / Binomial(e_c | k, theta(null_ratio)) per look and r.

    `counts` has shape S + (4,): per look canary trials, canary events, champion trials,
    champion events (the order of `Counts`); the result has shape S + ratios.shape. With
    s = n_c / (n_c + n_b), theta(r) = s*r / (1 + s*(r - 1)), so the log ratio is
    e_c * log(r / r0) - k * (log1p(s*(r - 1)) - log1p(s*(r0 - 1))): 0 for a look without
    trials in one arm (no information), exact for any counts.
    """
    c = np.asarray(counts, float)
    n_c, e_c, n_b, e_b = (c[..., i, None] for i in range(4))
    n = n_c + n_b
    share = np.divide(n_c, n, out=np.zeros(n.shape), where=n > 0)
    log_r, log_r0 = np.log(ratios), math.log(null_ratio)
    growth = np.log1p(share * (ratios - 1)) - np.log1p(share * (null_ratio - 1))
    return np.asarray(e_c * (log_r - log_r0) - (e_c + e_b) * growth)


def promotion_ratios(delta: float) -> Array:
    """The promotion mixture's points: r = (1 + delta) ** (1 - f), f in PROMOTION_MARGINS."""
    return np.asarray((1 + delta) ** (1 - PROMOTION_MARGINS))


def log_mixture(log_lr: Array, weights: Array) -> Array:
    """log sum_j w_j exp(log_lr[..., j]), w normalised to sum 1 (logsumexp, last axis;
    exactly 0 where every log_lr is 0)."""
    top = log_lr.max(axis=-1)
    scaled = (weights * np.exp(log_lr - top[..., None])).sum(axis=-1) / weights.sum()
    return np.asarray(top + np.log(scaled))


@dataclass
class _Step:
    index: int
    canary_requests: int = 0
    events: dict[str, list[int]] = field(default_factory=dict)
    log_lr: dict[str, Array] = field(default_factory=dict)


class Judge:
    """The e-processes of one rollout; `observe` takes one look and returns the verdict."""

    def __init__(self, config: JudgeConfig) -> None:
        self.config = config
        self.looks = 0
        self._promotion_ratios = promotion_ratios(config.delta)
        self._rollback = {m: np.zeros(ROLLBACK_RATIOS.shape) for m in config.metrics}
        self._step: _Step | None = None

    def _new_step(self, index: int) -> _Step:
        metrics = self.config.metrics
        return _Step(
            index,
            events={m: [0, 0] for m in metrics},
            log_lr={m: np.zeros(PROMOTION_MARGINS.shape) for m in metrics},
        )

    def observe(self, step: int, counts: Mapping[str, Counts]) -> Verdict:
        """One look: `counts` per metric (a missing metric had no counts); a new step
        number restarts the promotion e-processes."""
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        for name, value in counts.items():
            if name not in METRICS:
                raise ValueError(f"unknown metric {name!r} (known: {', '.join(METRICS)})")
            if not isinstance(value, Counts):
                raise ValueError(f"counts[{name!r}] must be Counts, got {value!r}")
        current = self._step
        if current is not None and step < current.index:
            raise ValueError(f"step {step} after step {current.index}: steps only move forward")
        if current is None or step != current.index:
            current = self._step = self._new_step(step)
        cfg = self.config
        self.looks += 1
        errors = counts.get("errors")
        current.canary_requests += errors.canary_trials if errors is not None else 0
        for metric in cfg.metrics:
            look = counts.get(metric)
            if look is None:
                continue
            row = look.to_list()
            self._rollback[metric] += log_likelihood_ratios(row, ROLLBACK_RATIOS, 1.0)
            current.log_lr[metric] += log_likelihood_ratios(
                row, self._promotion_ratios, 1 + cfg.delta
            )
            current.events[metric][0] += look.canary_events
            current.events[metric][1] += look.champion_events
        rollback_log = {
            m: float(log_mixture(v, ROLLBACK_WEIGHTS)) for m, v in self._rollback.items()
        }
        promote_log = {
            m: float(log_mixture(v, PROMOTION_WEIGHTS)) for m, v in current.log_lr.items()
        }
        decision, reason = self._decide(current, rollback_log, promote_log)
        return Verdict(
            decision=decision,
            step=step,
            looks=self.looks,
            rollback_e={m: _e(v) for m, v in rollback_log.items()},
            promote_e={m: _e(v) for m, v in promote_log.items()},
            step_canary_requests=current.canary_requests,
            step_events={m: (pair[0], pair[1]) for m, pair in current.events.items()},
            reason=reason,
        )

    def _decide(
        self, current: _Step, rollback_log: dict[str, float], promote_log: dict[str, float]
    ) -> tuple[Literal["rollback", "advance", "hold"], str]:
        cfg = self.config
        m = len(cfg.metrics)
        high = math.log(cfg.rollback_threshold)
        fired = [f"{k} e-value {_e(v):.4g}" for k, v in rollback_log.items() if v >= high]
        if fired:
            split = f"alpha {cfg.alpha:g} / {m} metric{'s' if m > 1 else ''}"
            return "rollback", (
                f"rollback: {', '.join(fired)} >= {cfg.rollback_threshold:g} ({split}): "
                "the canary's event rate is higher than the champion's"
            )
        bar = math.log(cfg.promotion_threshold)
        parts, ready = [], True
        for metric, value in promote_log.items():
            if value >= bar:
                parts.append(f"{metric} e-value {_e(value):.4g} >= {cfg.promotion_threshold:g}")
            elif current.events[metric] == [0, 0]:
                parts.append(f"{metric}: no events this step")
            else:
                ready = False
                parts.append(f"{metric} e-value {_e(value):.4g} < {cfg.promotion_threshold:g}")
        requests = current.canary_requests
        enough = requests >= cfg.min_requests
        sign = ">=" if enough else "<"
        parts.append(f"{requests} canary requests {sign} min_requests {cfg.min_requests}")
        verdict: Literal["advance", "hold"] = "advance" if ready and enough else "hold"
        return verdict, (
            f"{verdict}: {'; '.join(parts)} (non-inferiority margin delta {cfg.delta:g})"
        )


def _e(log_value: float) -> float:
    return math.exp(min(log_value, LOG_E_CAP))


def _real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def replay(config: JudgeConfig, looks: Iterable[tuple[int, Mapping[str, Counts]]]) -> list[Verdict]:
    """The verdicts a fresh judge gives for these looks, in order (a stored rollout's
    looks give back its stored verdicts)."""
    judge = Judge(config)
    return [judge.observe(step, counts) for step, counts in looks]


def counts_from_json(doc: Mapping[str, Sequence[int]]) -> dict[str, Counts]:
    """{"errors": [canary_trials, canary_events, champion_trials, champion_events], ...}"""
    if not isinstance(doc, Mapping):
        raise ValueError(f"counts must be an object of metric -> [4 integers], got {doc!r}")
    out = {}
    for name, values in doc.items():
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r} (known: {', '.join(METRICS)})")
        if isinstance(values, str | bytes) or not isinstance(values, Sequence) or len(values) != 4:
            raise ValueError(
                f"counts[{name!r}] must be [canary_trials, canary_events, champion_trials, "
                f"champion_events], got {values!r}"
            )
        out[name] = Counts(*values)
    return out


def counts_to_json(counts: Mapping[str, Counts]) -> dict[str, list[int]]:
    return {name: c.to_list() for name, c in counts.items()}
