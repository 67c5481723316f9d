"""A promotion request's evidence: the live paired comparison of champion and candidate
(the same requests answered by both), the offline one, the signature diff, and the
document that carries them all (JSON, finite numbers only: it is hashed).

Live pairs come from the payload log: the champion's answer (variant `champion`) and the
candidate's shadow copy (variant `shadow`) of one request share its id, and the label a
client sent back for that id is the truth of both. Accuracy is per row (a request of n
rows is n paired rows), latency per request.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monitors.detectors import wilson_interval
from retrain.labelled import _label_values as label_values
from retrain.steps import compare

FORMAT = 1
#: integer and string datatypes a label output may have (the gateway's rule: the first
#: output of rank 1 of one of these)
_LABEL_TYPES = frozenset(
    {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "BYTES"}
)


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (n >= 1)."""
    return wilson_interval(successes, n, z)


def latency_summary(seconds: Sequence[float | None]) -> dict[str, Any]:
    """p50 and p99 in milliseconds of the measured latencies (None entries: not measured,
    e.g. rows from a gateway older than the column); None when nothing was measured."""
    values = np.asarray([s for s in seconds if s is not None and math.isfinite(s)], float)
    if not values.size:
        return {"n": 0, "p50_ms": None, "p99_ms": None}
    p50, p99 = np.quantile(values, [0.5, 0.99])
    return {"n": int(values.size), "p50_ms": float(p50) * 1e3, "p99_ms": float(p99) * 1e3}


def paired_live(
    champion_labels: Sequence[str],
    candidate_labels: Sequence[str],
    truth: Sequence[str | None],
    champion_latency_s: Sequence[float | None],
    candidate_latency_s: Sequence[float | None],
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """The paired comparison of rows answered by both (labels as text; `truth` None:
    not labelled): agreement over all pairs; on the labelled ones, each accuracy with its
    Wilson interval, McNemar's exact p-value and the bootstrap 95% interval of the
    difference (candidate - champion, `retrain.steps.compare`); latency p50/p99 of each."""
    n = len(champion_labels)
    if len(candidate_labels) != n or len(truth) != n:
        raise ValueError(
            f"paired rows differ in length: {n} champion, {len(candidate_labels)} candidate, "
            f"{len(truth)} truth"
        )
    champion = np.asarray([str(v) for v in champion_labels], dtype=object)
    candidate = np.asarray([str(v) for v in candidate_labels], dtype=object)
    labelled = np.asarray([t is not None for t in truth], dtype=bool)
    known = np.asarray([str(t) for t in truth if t is not None], dtype=object)
    n_labelled = int(labelled.sum())
    doc: dict[str, Any] = {
        "n_paired": n,
        "agreement": float((champion == candidate).mean()) if n else None,
        "n_labelled": n_labelled,
        "champion_accuracy": None,
        "champion_accuracy_ci95": None,
        "candidate_accuracy": None,
        "candidate_accuracy_ci95": None,
        "difference": None,
        "difference_ci95": None,
        "mcnemar_p_value": None,
        "only_candidate_correct": 0,
        "only_champion_correct": 0,
        "latency": {
            "champion": latency_summary(champion_latency_s),
            "candidate": latency_summary(candidate_latency_s),
        },
    }
    if n_labelled:
        champion_right = champion[labelled] == known
        candidate_right = candidate[labelled] == known
        found = compare(candidate_right, champion_right, seed)
        found.pop("rows")
        doc.update(found)
        doc["champion_accuracy_ci95"] = list(wilson(int(champion_right.sum()), n_labelled))
        doc["candidate_accuracy_ci95"] = list(wilson(int(candidate_right.sum()), n_labelled))
    return doc


def offline_from_comparison(comparison: Mapping[str, Any]) -> dict[str, Any]:
    """An evaluation's paired comparison (`retrain.steps.compare`, in the run's
    evaluation.json) with the Wilson interval of each accuracy added."""
    missing = [
        k for k in ("candidate_accuracy", "champion_accuracy", "rows") if k not in comparison
    ]
    if missing:
        raise ValueError(f"not a paired comparison: {', '.join(missing)} missing")
    doc = dict(comparison)
    rows = int(comparison["rows"])
    for side in ("champion", "candidate"):
        accuracy = comparison[f"{side}_accuracy"]
        ok = rows > 0 and accuracy is not None
        correct = round(float(accuracy) * rows) if ok else 0
        doc[f"{side}_accuracy_ci95"] = list(wilson(correct, rows)) if ok else None
    return doc


def _label_tensor(outputs: list[dict[str, Any]], name: str | None) -> dict[str, Any] | None:
    for tensor in outputs:
        if name is not None:
            if tensor["name"] == name:
                return tensor
        elif len(tensor["shape"]) == 1 and tensor["datatype"] in _LABEL_TYPES:
            return tensor
    return None


def _labels_of(outputs: list[dict[str, Any]], name: str | None) -> list[str] | None:
    from monitors.payload_log import tensor_array

    tensor = _label_tensor(outputs, name)
    if tensor is None:
        return None
    values = tensor_array(tensor).reshape(-1).tolist()
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]


def live_from_payload_log(
    root: Path,
    model: str,
    champion_version: str,
    candidate_version: str,
    since: dt.datetime | None = None,
    *,
    until: dt.datetime | None = None,
    label_output: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """`paired_live` over the payload log: the champion's answers and the candidate's
    shadow answers of `model` since `since` (UTC), joined by request id, with the first
    label sent back for each id. The label output is `label_output`, else the first output
    of rank 1 with an integer or string datatype (the gateway's rule). Requests that
    cannot be paired are counted by reason, never failing the comparison."""
    from monitors.payload_log import FEEDBACK, PREDICTIONS, read_window

    columns = ["id", "time", "variant", "outputs", "latency_s"]

    def answers(version: str, variant: str) -> dict[str, dict[str, Any]]:
        table = read_window(root, table=PREDICTIONS, model=model, version=version,
                            start=since, end=until, columns=columns)  # fmt: skip
        out: dict[str, dict[str, Any]] = {}
        rows = [r for r in table.to_pylist() if r["variant"] == variant]
        for row in sorted(rows, key=lambda r: r["time"]):
            out.setdefault(row["id"], row)  # a reused id: its first answer counts
        return out

    champion_rows = answers(champion_version, "champion")
    candidate_rows = answers(candidate_version, "shadow")
    labels: dict[str, str] = {}
    # a label comes after its prediction: none of a prediction since `since` is older
    feedback = read_window(root, table=FEEDBACK, model=model, start=since,
                           columns=["id", "label", "outcome"])  # fmt: skip
    for row in feedback.to_pylist():
        if row["outcome"] != "unmatched" and row["id"] not in labels:
            labels[row["id"]] = row["label"] or ""
    skipped: dict[str, int] = {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    ours: list[str] = []
    theirs: list[str] = []
    truth: list[str | None] = []
    champion_latency: list[float | None] = []
    candidate_latency: list[float | None] = []
    labelled_requests = 0

    def request_order(ident: str) -> tuple[Any, str]:
        # the champion answered in request order; shadow copies finish on threads in any
        # order, and the bootstrap's pairs must not depend on which finished first
        return (champion_rows.get(ident, candidate_rows[ident])["time"], ident)

    for ident in sorted(candidate_rows, key=request_order):
        shadow_row = candidate_rows[ident]
        champion_row = champion_rows.get(ident)
        if champion_row is None:
            skip("no_champion_answer")
            continue
        mine = _labels_of(champion_row["outputs"], label_output)
        other = _labels_of(shadow_row["outputs"], label_output)
        if mine is None or other is None:
            skip("no_label_output")
            continue
        if len(mine) != len(other):
            skip("rows_mismatch")
            continue
        text = labels.get(ident)
        values = label_values(text) if text is not None else None
        if text is not None and (values is None or len(values) != len(mine)):
            skip("label_rows_mismatch")  # kept as a pair, without its label
            values = None
        ours += mine
        theirs += other
        truth += values if values is not None else [None] * len(mine)
        labelled_requests += values is not None
        champion_latency.append(champion_row["latency_s"])
        candidate_latency.append(shadow_row["latency_s"])
    doc = paired_live(ours, theirs, truth, champion_latency, candidate_latency, seed=seed)
    doc.update(
        {
            "champion_version": champion_version,
            "candidate_version": candidate_version,
            "since": since.isoformat() if since is not None else None,
            "until": until.isoformat() if until is not None else None,
            "champion_requests": len(champion_rows),
            "candidate_requests": len(candidate_rows),
            "paired_requests": len(champion_latency),
            "labelled_requests": labelled_requests,
            "skipped": skipped,
        }
    )
    return doc


def _specs(card: Mapping[str, Any], key: str) -> dict[str, dict[str, Any]]:
    specs = card.get(key)
    if not isinstance(specs, list):
        raise ValueError(f"not a servo.json card: '{key}' must be a list")
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        if not isinstance(spec, dict) or not {"name", "datatype", "shape"} <= set(spec):
            raise ValueError(f"not a servo.json card: '{key}' entries need name, datatype, shape")
        out[str(spec["name"])] = {"datatype": spec["datatype"], "shape": list(spec["shape"])}
    return out


def _fits(narrow: list[int], wide: list[int]) -> bool:
    """Every shape `narrow` allows, `wide` allows too (-1: any size)."""
    return len(narrow) == len(wide) and all(w in (-1, n) for n, w in zip(narrow, wide, strict=True))


def _tensor_changes(
    champion: dict[str, dict[str, Any]], candidate: dict[str, dict[str, Any]], *, inputs: bool
) -> list[dict[str, Any]]:
    changes: list[dict[str, Any]] = []
    for name in sorted(set(champion) | set(candidate)):
        old, new = champion.get(name), candidate.get(name)
        if old == new:
            continue
        change: dict[str, Any] = {"name": name, "champion": old, "candidate": new}
        if old is None:
            # a new input is one the champion's clients never send; a new output is extra
            change.update(change="added", breaking=inputs)
        elif new is None:
            # a removed input is one clients may still send; a removed output, one they read
            change.update(change="removed", breaking=True)
        elif old["datatype"] != new["datatype"]:
            change.update(change="datatype", breaking=True)
        else:
            # the candidate must take every input shape the champion took, and answer only
            # shapes the champion's answers could have had
            fits = (
                _fits(old["shape"], new["shape"]) if inputs else _fits(new["shape"], old["shape"])
            )
            change.update(change="shape", breaking=not fits)
        changes.append(change)
    return changes


def signature_diff(
    champion_card: Mapping[str, Any], candidate_card: Mapping[str, Any]
) -> dict[str, Any]:
    """What changes for a client between two servo.json cards: inputs and outputs added,
    removed, or of another datatype or shape, and the class labels. `compatible`: no
    change breaks a client of the champion (a new output, or an input dimension the
    candidate takes at any size, does not)."""
    inputs = _tensor_changes(_specs(champion_card, "inputs"), _specs(candidate_card, "inputs"),
                             inputs=True)  # fmt: skip
    outputs = _tensor_changes(_specs(champion_card, "outputs"), _specs(candidate_card, "outputs"),
                              inputs=False)  # fmt: skip
    old_labels, new_labels = champion_card.get("class_labels"), candidate_card.get("class_labels")
    labels = {
        "champion": old_labels,
        "candidate": new_labels,
        "changed": old_labels != new_labels,
        "added": [c for c in new_labels or [] if c not in (old_labels or [])],
        "removed": [c for c in old_labels or [] if c not in (new_labels or [])],
    }
    breaking = [c for c in inputs + outputs if c["breaking"]]
    return {
        "compatible": not breaking and not labels["changed"],
        "inputs": inputs,
        "outputs": outputs,
        "class_labels": labels,
    }


def _with_intervals(doc: Any) -> Any:
    if not isinstance(doc, Mapping):
        return doc
    out = {key: _with_intervals(value) for key, value in doc.items()}
    comparison = {"candidate_accuracy", "champion_accuracy", "rows"} <= set(doc)
    if comparison and "candidate_accuracy_ci95" not in doc:
        return offline_from_comparison(out)
    return out


def _finite(value: Any, where: str) -> Any:
    """JSON values only; NaN and infinities become null (the evidence is hashed with
    allow_nan=False)."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"evidence {where}: key {key!r} is not a string")
            out[key] = _finite(item, f"{where}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [_finite(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise TypeError(f"evidence {where}: {type(value).__name__} is not a JSON value")


def build_evidence(
    *,
    trigger: dict[str, Any],
    policy: dict[str, Any],
    lineage: dict[str, Any],
    offline: dict[str, Any],
    live: dict[str, Any],
    signature: dict[str, Any],
    insufficient: bool = False,
) -> dict[str, Any]:
    """The evidence document of a promotion request: JSON values only, finite numbers
    (NaN, inf -> null), ready for `registry.promotions.evidence_hash`. `insufficient`:
    filed at the shadow timeout, before `min_labelled` labelled pairs were seen. Every
    paired comparison in `offline` (`retrain.steps.compare`'s form, at any depth) gets
    the Wilson interval of each accuracy."""
    doc = _finite(
        {
            "format": FORMAT,
            "insufficient_evidence": bool(insufficient),
            "trigger": trigger,
            "policy": policy,
            "lineage": lineage,
            "offline": _with_intervals(offline),
            "live": live,
            "signature": signature,
        },
        "document",
    )
    json.dumps(doc, allow_nan=False)  # a last check: what is hashed must serialise
    result: dict[str, Any] = doc
    return result


__all__ = [
    "build_evidence",
    "latency_summary",
    "live_from_payload_log",
    "offline_from_comparison",
    "paired_live",
    "signature_diff",
    "wilson",
]
