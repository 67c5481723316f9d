"""Promotion gates: what a candidate's evidence must show before anyone may promote it.

- `signature`: the candidate takes what the champion took and answers alike
  (policy `signature: compatible`; `any` passes every diff);
- `live_non_inferiority`: on the labelled requests answered by both, the accuracy
  difference (candidate - champion) is at least `-live_margin`;
- `live_min_gain` (only with `min_gain` set): the difference is at least `min_gain`;
- `offline_non_inferiority`: the same as live on the offline held-out rows, with
  `offline_margin` (the held-out recent production rows when the evaluation had some,
  else the reference holdout: `offline_comparison`);
- `latency`: the candidate's live p99 is at most `latency_p99_ratio` times the champion's
  (off when the ratio is null).

The difference held against a margin is, by default (`statistic: ci_low`), the lower end
of its bootstrap 95% interval: a candidate passes only when the data show it is not
worse by more than the margin, so a handful of labels cannot pass it. `estimate` uses the
point estimate instead. No data is a failure, never a pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeGuard

from retrain.policy import Approval, Gates


@dataclass(frozen=True)
class GateResult:
    name: str
    passed: bool
    #: the numbers, the threshold, and `summary`: one line for people
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "detail": dict(self.detail)}


def _statistic(part: Mapping[str, Any], gates: Gates) -> float | None:
    if gates.statistic == "estimate":
        value = part.get("difference")
    else:
        interval = part.get("difference_ci95")
        value = interval[0] if isinstance(interval, list | tuple) and interval else None
    return float(value) if isinstance(value, int | float) else None


def _describe(part: Mapping[str, Any], unit: str) -> str:
    interval = part.get("difference_ci95") or [None, None]
    return (
        f"candidate {_fmt(part.get('candidate_accuracy'))} vs champion "
        f"{_fmt(part.get('champion_accuracy'))}, difference {_fmt(part.get('difference'))} "
        f"(95% CI {_fmt(interval[0])}..{_fmt(interval[1])}) on {part.get('n', 0)} {unit}"
    )


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "n/a"


def _difference_gate(
    name: str, part: Mapping[str, Any] | None, gates: Gates, threshold: float, unit: str
) -> GateResult:
    """`statistic(part) >= threshold`."""
    part = dict(part or {})
    value = _statistic(part, gates)
    detail: dict[str, Any] = {
        "statistic": gates.statistic,
        "value": value,
        "threshold": threshold,
        "difference": part.get("difference"),
        "difference_ci95": part.get("difference_ci95"),
        "candidate_accuracy": part.get("candidate_accuracy"),
        "champion_accuracy": part.get("champion_accuracy"),
        "n": part.get("n", 0),
    }
    if value is None:
        detail["summary"] = f"no paired comparison ({part.get('n', 0)} {unit})"
        return GateResult(name, False, detail)
    passed = value >= threshold
    sign = ">=" if passed else "<"
    detail["summary"] = (
        f"{gates.statistic} {value:.4f} {sign} {threshold:.4f}: {_describe(part, unit)}"
    )
    return GateResult(name, passed, detail)


def _signature_gate(signature: Mapping[str, Any] | None, gates: Gates) -> GateResult:
    signature = signature or {}
    compatible = signature.get("compatible")
    breaking = [
        f"{kind} {c.get('name')} {c.get('change')}"
        for kind in ("inputs", "outputs")
        for c in signature.get(kind) or []
        if c.get("breaking")
    ]
    if (signature.get("class_labels") or {}).get("changed"):
        breaking.append("class labels changed")
    detail: dict[str, Any] = {"mode": gates.signature, "compatible": compatible}
    detail["breaking"] = breaking
    if gates.signature == "any":
        detail["summary"] = "any signature is accepted"
        return GateResult("signature", True, detail)
    if compatible is None:
        detail["summary"] = "no signature diff"
        return GateResult("signature", False, detail)
    shown = "; ".join(breaking) or "incompatible"
    detail["summary"] = "compatible" if compatible else f"incompatible: {shown}"
    return GateResult("signature", bool(compatible), detail)


def _latency_gate(live: Mapping[str, Any], gates: Gates) -> GateResult:
    latency = live.get("latency") or {}
    champion = (latency.get("champion") or {}).get("p99_ms")
    candidate = (latency.get("candidate") or {}).get("p99_ms")
    ratio = gates.latency_p99_ratio
    detail: dict[str, Any] = {
        "champion_p99_ms": champion,
        "candidate_p99_ms": candidate,
        "max_ratio": ratio,
        "ratio": None,
    }
    if ratio is None:
        detail["summary"] = "no latency budget"
        return GateResult("latency", True, detail)
    if not isinstance(champion, int | float) or not isinstance(candidate, int | float):
        detail["summary"] = "latency not measured for both on live traffic"
        return GateResult("latency", False, detail)
    detail["ratio"] = candidate / champion if champion > 0 else None
    passed = candidate <= ratio * champion
    sign = "<=" if passed else ">"
    detail["summary"] = (
        f"candidate p99 {candidate:.3f} ms {sign} {ratio:g} x champion p99 {champion:.3f} ms"
    )
    return GateResult("latency", passed, detail)


def _is_comparison(doc: Any) -> TypeGuard[Mapping[str, Any]]:
    return isinstance(doc, Mapping) and "difference" in doc and "rows" in doc


def offline_comparison(offline: Any) -> tuple[dict[str, Any] | None, str]:
    """The paired comparison the offline gate judges, and which rows it is on: the
    section itself when it is one (`retrain.steps.compare`'s form), else the evaluation's
    comparison on the held-out recent production rows (the traffic the candidate was
    retrained for, never trained on) when it has rows, else the one on the reference
    holdout."""
    if not isinstance(offline, Mapping):
        return None, "held-out"
    production = offline.get("production")
    candidates = [
        (offline, "held-out"),
        (production.get("comparison") if isinstance(production, Mapping) else None,
         "held-out production"),
        (offline.get("comparison"), "reference holdout"),
    ]  # fmt: skip
    for doc, rows in candidates:
        if _is_comparison(doc) and (doc["rows"] or rows == "reference holdout"):
            return {**doc, "n": doc["rows"]}, rows
    return None, "held-out"


def evaluate(evidence: Mapping[str, Any], gates: Gates) -> list[GateResult]:
    """Every gate of `gates` on an evidence document (`retrain.evidence.build_evidence`)."""
    live = dict(evidence.get("live") or {})
    live["n"] = live.get("n_labelled", 0)
    offline, held_out = offline_comparison(evidence.get("offline"))
    live_unit = "labelled live rows answered by both"
    results = [
        _signature_gate(evidence.get("signature"), gates),
        _difference_gate("live_non_inferiority", live, gates, -gates.live_margin, live_unit),
    ]
    if gates.min_gain is not None:
        results.append(_difference_gate("live_min_gain", live, gates, gates.min_gain, live_unit))
    offline_gate = _difference_gate(
        "offline_non_inferiority", offline, gates, -gates.offline_margin, f"{held_out} rows"
    )
    offline_gate.detail["rows"] = held_out
    results.append(offline_gate)
    results.append(_latency_gate(live, gates))
    return results


def verdict(results: Sequence[GateResult]) -> Literal["pass", "fail"]:
    return "pass" if all(r.passed for r in results) else "fail"


def reason(results: Sequence[GateResult]) -> str:
    """The failing gates with their numbers (or that all passed), one line."""
    failed = [r for r in results if not r.passed]
    shown = failed or list(results)
    head = "gate failed" if len(failed) == 1 else "gates failed" if failed else "gates passed"
    return f"{head}: " + "; ".join(f"{r.name}: {r.detail.get('summary', '')}" for r in shown)


def outcome(
    evidence: Mapping[str, Any], results: Sequence[GateResult], approval: Approval
) -> Literal["rejected", "approved", "pending"]:
    """What happens to a filed request: a failing gate rejects it; a passing one is
    approved by the policy when `approval.auto` (never on insufficient evidence), else it
    waits for an approver."""
    if verdict(results) == "fail":
        return "rejected"
    if approval.auto and not evidence.get("insufficient_evidence"):
        return "approved"
    return "pending"


__all__ = ["GateResult", "evaluate", "offline_comparison", "outcome", "reason", "verdict"]
