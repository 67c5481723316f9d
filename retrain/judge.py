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
  its threshold with probability at most its share of beta. It restarts at each step.
- floor e-process (`negligible_rate` f > 0): the canary arm alone, Bernoulli on its trials
  and events of the step, against H0: canary event rate >= f. A mixture over rates
  f * g below the floor (`FLOOR_FRACTIONS`, `FLOOR_WEIGHTS`) of the product over looks
  of (g ** e_c) * ((1 - f*g) / (1 - f)) ** (n_c - e_c): each trial's factor has mean
  p*g + (1 - p)(1 - f*g)/(1 - f) <= 1 for any rate p >= f (at every trial, whatever the
  rate does over time), so it is a nonnegative supermartingale under H0. It restarts at
  each step. It lets rare events pass: a metric whose canary rate is negligible in
  absolute terms (one slow request in ten thousand) need not show a relative ratio the
  few events cannot tell.

A metric passes a step when its promotion e-value reaches 1 / (beta * w) OR its floor
e-value reaches 1 / (beta * (1 - w)), w = `RELATIVE_SHARE` (0.8); with negligible_rate 0
the floor path is off and the promotion threshold is 1 / beta. A false promotion of a
metric (canary worse than the champion by delta AND its rate at or above the floor:
both nulls true) needs one of the two to cross, so by Ville's inequality and the union
bound it has probability at most beta*w + beta*(1 - w) = beta. A step advances when every
judged metric passes and the step saw at least `min_requests` canary requests (the
"errors" canary trials; at least one whatever min_requests). A metric the canary gave no
trial in the step (no label came back for "incorrect") is not judged in it: there is no
rate to test; whether a metric has trials does not depend on its events, so the bound
holds for every metric that has them (and the rollback test guards all of them over the
whole rollout). A step with no event at all passes only by the floor test, once
the canary's trials show its rate below the floor (at f = 0.001: 5,100 canary requests
in the step without an event, 8,800 with one, 11,100 with two; about 5 / f, 9 / f and
11 / f for other floors): no evidence is no pass. A canary without traffic never
advances (its floor and promotion e-values stay at 1 and it never reaches min_requests).

The mixtures are fixed before any data (any such prior keeps the guarantees); they were
chosen with `benchmarks/canary_sim.py` (100 req/s, 10 % canary, 1 % base error rate, a
look a second, alpha = beta = 0.05, delta = 0.25; tuned on seeds other than the
benchmark's):

- rollback: r in {1.25, 1.5, 2, 3, 5, 10}, weights 0.1, 0.25, 0.3, 0.2, 0.1, 0.05: most
  mass on the doublings people fear (2x: p90 rollback time 3.6 minutes, goal 5), some on
  gross failures (10x: p90 9 seconds) and on smaller rises (1.5x: p90 13 minutes; 1.25x:
  89 % within the hour);
- promotion: r = (1 + delta) ** (1 - f) for f in {0.5, 0.75, 1, 2, 4, 7} "margins below
  the null" (at delta = 0.25: r = 1.118, 1.057, 1, 0.8, 0.41, 0.21), weights 0.3, 0.3,
  0.2, 0.1, 0.05, 0.05. Every point lies below 1 + delta for any delta (a point above it
  would break the guarantee). An A/A canary must pass within the hour at p90 (the tight
  goal: 49.6 minutes at the threshold 1 / (0.8 beta) = 25; 47 at 1 / beta), and the
  fastest single point for it is not r = 1 but about f = 0.75 (its log-likelihood ratio
  grows almost as fast and wobbles less), so 80 % of the mass is on f <= 1; the rest
  lets clearly better canaries pass sooner. Relative to the margin, so a policy's delta
  moves the whole grid with it.
- floor: g in {0.5, 0.25, 0.1, 0.01, 0} (rates f/2 to 0), weights 0.15, 0.2, 0.2, 0.15,
  0.3: g = 0 passes a step without any canary event soonest (ln(1/(1 - f)) a trial), the
  others tolerate a few events (g = 0.1 is the best point for one event in about 1/f
  trials). The beta split w = 0.8 keeps most of beta on the relative test, so the A/A
  promotion time of the simulation (1 % errors: far above the floor) moves little.

Everything is in log space (logsumexp over the grid): one look costs O(grid), and a
million looks lose nothing. `log_likelihood_ratios` is the one formula, vectorised: the
judge calls it per look, the benchmark on whole simulated streams.
"""

from __future__ import annotations

import math
import numbers
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
FLOOR_FRACTIONS = np.array([0.5, 0.25, 0.1, 0.01, 0.0])
FLOOR_WEIGHTS = np.array([0.15, 0.2, 0.2, 0.15, 0.3])
#: w: the share of beta spent on the relative promotion test (1 - w on the floor test)
RELATIVE_SHARE = 0.8

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
            if not isinstance(value, numbers.Integral) or isinstance(value, bool | np.bool_):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
            object.__setattr__(self, name, int(value))  # numpy integers too, stored as int
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
    #: canary event rates below this are negligible (0: no floor path)
    negligible_rate: float = 0.001

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
        value = self.negligible_rate
        if not _real(value) or not 0 <= value < 1:
            raise ValueError(f"negligible_rate must be a number in [0, 1), got {value!r}")

    @property
    def rollback_threshold(self) -> float:
        """m / alpha: alpha split equally over the m judged metrics."""
        return len(self.metrics) / self.alpha

    @property
    def promotion_threshold(self) -> float:
        """1 / (beta * w) with the floor path, 1 / beta without it."""
        if self.negligible_rate == 0:
            return 1 / self.beta
        return 1 / (self.beta * RELATIVE_SHARE)

    @property
    def floor_threshold(self) -> float:
        """1 / (beta * (1 - w)); inf without the floor path."""
        if self.negligible_rate == 0:
            return math.inf
        return 1 / (self.beta * (1 - RELATIVE_SHARE))

    def to_json(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "delta": self.delta,
            "metrics": list(self.metrics),
            "min_requests": self.min_requests,
            "negligible_rate": self.negligible_rate,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> JudgeConfig:
        if not isinstance(doc, Mapping):
            raise ValueError(f"judge config must be an object, got {doc!r}")
        unknown = sorted(set(doc) - _CONFIG_KEYS)
        if unknown:
            raise ValueError(f"judge config: unknown keys {', '.join(map(str, unknown))}")
        return cls(**doc)


_CONFIG_KEYS = {"alpha", "beta", "delta", "metrics", "min_requests", "negligible_rate"}


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
    #: per metric (this step): the canary's rate below negligible_rate (1.0 when off)
    floor_e: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "step": self.step,
            "looks": self.looks,
            "rollback_e": dict(self.rollback_e),
            "promote_e": dict(self.promote_e),
            "floor_e": dict(self.floor_e),
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


def floor_log_likelihood_ratios(counts: npt.ArrayLike, floor: float) -> Array:
    """log prod over trials of the canary's Bernoulli(f*g) / Bernoulli(f) per look and g in
    FLOOR_FRACTIONS: e_c * log(g) + (n_c - e_c) * (log1p(-f*g) - log1p(-f)); -inf for g = 0
    once the canary had an event; 0 for a look without canary trials. `counts` as in
    `log_likelihood_ratios` (only the canary's columns are read); floor f in (0, 1)."""
    c = np.asarray(counts, float)
    n_c, e_c = c[..., 0, None], c[..., 1, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        hits = np.where(e_c > 0, e_c * np.log(FLOOR_FRACTIONS), 0.0)  # 0 * log(0) is 0
    misses = (n_c - e_c) * (np.log1p(-floor * FLOOR_FRACTIONS) - math.log1p(-floor))
    return np.asarray(hits + misses)


def promotion_ratios(delta: float) -> Array:
    """The promotion mixture's points: r = (1 + delta) ** (1 - f), f in PROMOTION_MARGINS."""
    return np.asarray((1 + delta) ** (1 - PROMOTION_MARGINS))


def log_mixture(log_lr: Array, weights: Array) -> Array:
    """log sum_j w_j exp(log_lr[..., j]), w normalised to sum 1 (logsumexp, last axis;
    exactly 0 where every log_lr is 0; a -inf point weighs 0 while another is finite)."""
    top = log_lr.max(axis=-1)
    scaled = (weights * np.exp(log_lr - top[..., None])).sum(axis=-1) / weights.sum()
    return np.asarray(top + np.log(scaled))


@dataclass
class _Step:
    index: int
    canary_requests: int = 0
    events: dict[str, list[int]] = field(default_factory=dict)
    canary_trials: dict[str, int] = field(default_factory=dict)
    log_lr: dict[str, Array] = field(default_factory=dict)
    floor_lr: dict[str, Array] = field(default_factory=dict)


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
            canary_trials=dict.fromkeys(metrics, 0),
            log_lr={m: np.zeros(PROMOTION_MARGINS.shape) for m in metrics},
            floor_lr={m: np.zeros(FLOOR_FRACTIONS.shape) for m in metrics},
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
            if cfg.negligible_rate > 0:
                current.floor_lr[metric] += floor_log_likelihood_ratios(row, cfg.negligible_rate)
            current.events[metric][0] += look.canary_events
            current.events[metric][1] += look.champion_events
            current.canary_trials[metric] += look.canary_trials
        rollback_log = {
            m: float(log_mixture(v, ROLLBACK_WEIGHTS)) for m, v in self._rollback.items()
        }
        promote_log = {
            m: float(log_mixture(v, PROMOTION_WEIGHTS)) for m, v in current.log_lr.items()
        }
        floor_log = {m: float(log_mixture(v, FLOOR_WEIGHTS)) for m, v in current.floor_lr.items()}
        decision, reason = self._decide(current, rollback_log, promote_log, floor_log)
        return Verdict(
            decision=decision,
            step=step,
            looks=self.looks,
            rollback_e={m: _e(v) for m, v in rollback_log.items()},
            promote_e={m: _e(v) for m, v in promote_log.items()},
            step_canary_requests=current.canary_requests,
            step_events={m: (pair[0], pair[1]) for m, pair in current.events.items()},
            reason=reason,
            floor_e={m: _e(v) for m, v in floor_log.items()},
        )

    def _decide(
        self,
        current: _Step,
        rollback_log: dict[str, float],
        promote_log: dict[str, float],
        floor_log: dict[str, float],
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
        bar, floor_bar = math.log(cfg.promotion_threshold), math.log(cfg.floor_threshold)
        relative, floor = f"{cfg.promotion_threshold:g}", f"{cfg.floor_threshold:g}"
        parts, ready = [], True
        for metric, value in promote_log.items():
            below = floor_log[metric]
            if value >= bar:
                parts.append(f"{metric} e-value {_e(value):.4g} >= {relative}")
            elif current.canary_trials[metric] == 0:
                parts.append(f"{metric}: no canary trials this step (not judged)")
            elif below >= floor_bar:
                parts.append(
                    f"{metric} floor e-value {_e(below):.4g} >= {floor}: canary rate below "
                    f"negligible_rate {cfg.negligible_rate:g}"
                )
            else:
                ready = False
                text = f"{metric} e-value {_e(value):.4g} < {relative}"
                if cfg.negligible_rate > 0:
                    text += f", floor e-value {_e(below):.4g} < {floor}"
                parts.append(text)
        requests = current.canary_requests
        enough = requests >= max(cfg.min_requests, 1)  # no canary traffic never passes
        sign = ">=" if enough else "<"
        if requests == 0 and cfg.min_requests == 0:
            parts.append("0 canary requests: no canary traffic")
        else:
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
