"""What `servo demo` reports: the summary (accuracy before, during and after, the oracle,
detection delay, recovery, failed requests, the goals), the timeline, the table, the JSON
document and the PNG of accuracy over time with the events marked (matplotlib, Agg)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from servo.demo_traffic import BEFORE, DRIFT, FRESH, Drift, Pools

if TYPE_CHECKING:
    from servo.demo_loop import Run

#: the issue's goals
DETECTION_MAX_LABELLED = 500
ORACLE_RATIO_MIN = 0.95
DURATION_MAX_S = 180.0
#: the plot's resolution (seconds per point)
BIN_S = 2.0
#: what the timeline shows of the loop's events (its checks are counted, not listed)
MARKED = {"drift": "drift", "alarm": "alarm", "retrain_started": "retrain",
          "shadow_started": "shadow", "promotion_filed": "request filed",
          "approved": "approved", "canary_started": "canary 10%", "canary_step": "canary 50%",
          "promoted": "promoted"}  # fmt: skip


def oracle_predictions(rows: npt.NDArray[np.float32], pools: Pools, drift: Drift,
                       params: dict[str, Any], seed: int = 0) -> npt.NDArray[np.int64]:  # fmt: skip
    """The oracle: the loop's model (the digits pipeline's trainer, with the retrain's
    params) trained on the drifted digits (every digit the champion trained on, and the
    `stream` pool, drifted once each with their own noise; never the `fresh` pool the
    after-promotion traffic comes from); its predictions on `rows`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from retrain import frameworks

    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target.astype(np.int64)
    # the held-out rows in servo.demo.digits_holdout's order (the same split of the indices)
    _, held = train_test_split(np.arange(len(y)), test_size=0.25, random_state=seed, stratify=y)
    if not np.array_equal(x[held], pools.x):
        raise RuntimeError("the traffic's held-out digits are not servo.demo.digits_holdout's")
    keep = np.ones(len(y), dtype=bool)
    keep[held[pools.fresh]] = False
    rng = np.random.default_rng(seed + 1)
    train_x = drift.apply(x[keep], rng)
    trainer = {k: v for k, v in params.items() if k in ("hidden", "max_iter")}
    fitted = frameworks.fit(
        "sklearn",
        frameworks.Data(x=train_x, y=y[keep], holdout=np.asarray(rows, np.float32),
                        classes=10, scale=16.0),
        seed,
        {"hidden": [64], "max_iter": 300, **trainer},
    )  # fmt: skip
    return np.asarray(fitted.labels, dtype=np.int64)


def retrain_params() -> dict[str, Any]:
    """The pipeline params of the demo policy's retrains (the oracle trains alike)."""
    from retrain.policy import parse_config
    from servo.demo_loop import POLICY

    return dict(parse_config(POLICY, "the demo policy").defaults.retrain.params)


def summarize(run: Run) -> dict[str, Any]:
    """Everything but the duration (`write` adds it, once the plot is drawn)."""
    a, marks, t0 = run.traffic.answers, run.marks, run.started
    n = len(a)
    at = np.asarray(a.at[:n]) - t0
    phase = np.asarray(a.phase[:n])
    version = np.asarray(a.version[:n])
    correct = a.correct()
    champion, candidate = str(run.champion), str(run.candidate)
    drift_t, promoted_t = marks["drift"] - t0, marks["promoted"] - t0
    before = (phase == BEFORE) & (version == champion)
    during = (phase != BEFORE) & (version == champion) & (at < promoted_t)
    after = (at >= promoted_t) & (version == candidate)
    rows = np.stack([a.rows[i] for i in np.flatnonzero(after)])
    oracle = oracle_predictions(rows, run.traffic.pools, run.traffic.drift, retrain_params())
    oracle_acc = float((oracle == np.asarray(a.truth[:n])[after]).mean())
    events = [e for e in run.events if e["kind"] != "check"]
    checks = [e for e in run.events if e["kind"] == "check"]
    alarmed = [e for e in checks if (e["detail"] or {}).get("verdict") == "alarm"]
    alarms = [e for e in events if e["kind"] == "alarm"]
    seen = next((e for e in alarmed if e["t"] >= drift_t), None)
    alarm = next((e for e in alarms if e["t"] >= drift_t), None)
    started = next((e for e in events if e["kind"] == "retrain_started" and e["t"] >= drift_t),
                   None)  # fmt: skip
    waited = (started or {}).get("detail") or {}

    def labelled(event: dict[str, Any] | None) -> int | None:
        if event is None:
            return None
        return run.traffic.labelled(phases=(DRIFT, FRESH), until=event["t"] + t0)

    detection = {
        # the detection: the trigger's alarm (k alarmed checks in a row)
        "alarm_t": None if alarm is None else alarm["t"],
        "delay_s": None if alarm is None else alarm["t"] - drift_t,
        "delay_labelled": labelled(alarm),
        "delay_requests": None
        if alarm is None
        else int(((phase != BEFORE) & (at <= alarm["t"])).sum()),
        "signals": None if alarm is None else (alarm["detail"] or {}).get("signals"),
        # the monitors' first alarmed check after the drift
        "seen_t": None if seen is None else seen["t"],
        "seen_delay_s": None if seen is None else seen["t"] - drift_t,
        "seen_delay_labelled": labelled(seen),
        # the retrain: it waited for retrain.min_labelled labelled rows since the alarm
        "retrain_t": None if started is None else started["t"],
        "retrain_labelled": waited.get("labelled"),
        "retrain_waited_s": waited.get("waited_s"),
        "retrain_min_labelled": waited.get("min_labelled"),
        "alarms_before_drift": sum(e["t"] < drift_t for e in alarms),
        "alarmed_checks_before_drift": sum(e["t"] < drift_t for e in alarmed),
        "checks_before_drift": sum(e["t"] < drift_t for e in checks),
    }
    accuracy = {
        "before": _mean(correct[before]), "during": _mean(correct[during]),
        "after": _mean(correct[after]), "oracle": oracle_acc,
    }  # fmt: skip
    ratio = accuracy["after"] / oracle_acc if oracle_acc else 0.0
    failed = len(run.traffic.failed)
    timeline = sorted(
        [{"t": marks[k] - t0, "event": k, "source": "demo"} for k in marks]
        + [{"t": e["t"], "event": e["kind"], "source": "loop", "detail": e["detail"]}
           for e in events],
        key=lambda e: float(e["t"]),
    )  # fmt: skip
    delay = detection["delay_labelled"]
    return {
        "model": "digits",
        "champion": run.champion,
        "candidate": run.candidate,
        "request": run.request.get("id"),
        "rollout": _rollout_kind(run),
        "drift": run.traffic.drift.to_json(),
        "accuracy": accuracy,
        "answers": {
            "before": int(before.sum()),
            "during": int(during.sum()),
            "after": int(after.sum()),
        },
        "after_vs_oracle": ratio,
        "detection": detection,
        "recovery_s": promoted_t - drift_t,
        "requests": {
            "answered": n,
            "failed": failed,
            "labels_failed": len(run.traffic.label_failures),
            "failures": run.traffic.failed[:10],
        },
        "duration_s": None,
        "goals": {
            "detection_within_500_labelled": delay is not None and delay <= DETECTION_MAX_LABELLED,
            "no_alarm_before_drift": detection["alarms_before_drift"] == 0,
            "after_at_least_95pct_of_oracle": ratio >= ORACLE_RATIO_MIN,
            "no_failed_requests": failed == 0,
        },
        "timeline": timeline,
        "series": _series(at, correct, version, candidate),
        "up_log": str(run.up_log),
    }


def _rollout_kind(run: Run) -> str:
    kinds = {e["kind"] for e in run.events}
    return "canary" if any(k.startswith("canary") or k.startswith("rollout") for k in kinds) \
        else "immediate"  # fmt: skip


def _mean(values: npt.NDArray[Any]) -> float:
    return float(values.mean()) if values.size else float("nan")


def _series(at: npt.NDArray[Any], correct: npt.NDArray[np.bool_], version: npt.NDArray[Any],
            candidate: str) -> dict[str, list[float]]:  # fmt: skip
    """Accuracy per BIN_S seconds: all answers, and the candidate's share of them."""
    if not at.size:
        return {"t": [], "accuracy": [], "candidate_share": []}
    edges = np.arange(np.floor(at.min()), at.max() + BIN_S, BIN_S)
    which = np.digitize(at, edges) - 1
    t, acc, share = [], [], []
    for b in range(len(edges) - 1):
        chosen = which == b
        if chosen.sum() < 5:
            continue
        t.append(float(edges[b] + BIN_S / 2))
        acc.append(float(correct[chosen].mean()))
        share.append(float((version[chosen] == candidate).mean()))
    return {"t": t, "accuracy": acc, "candidate_share": share}


def table(summary: dict[str, Any]) -> str:
    acc, det, goals = summary["accuracy"], summary["detection"], summary["goals"]
    n = summary["answers"]
    delay = det["delay_labelled"]
    rows = [
        ("accuracy before the drift (champion)", f"{_p(acc['before'])} ({n['before']} answers)",
         ""),
        ("accuracy during the drift (champion)", f"{_p(acc['during'])} ({n['during']} answers)",
         ""),
        ("accuracy after the promotion", f"{_p(acc['after'])} ({n['after']} answers)", ""),
        ("oracle (same model trained on drifted digits)", _p(acc["oracle"]), ""),
        ("after / oracle", _p(summary["after_vs_oracle"]),
         _goal(goals["after_at_least_95pct_of_oracle"], ">= 95%")),
        ("detection (alarm: k alarmed checks in a row)",
         "never" if delay is None else f"after {delay} labelled, {det['delay_requests']} "
         f"requests ({det['delay_s']:.1f} s)",
         _goal(goals["detection_within_500_labelled"], "<= 500 labelled")),
        (f"retrain started (retrain.min_labelled {det['retrain_min_labelled']})",
         "never" if det["retrain_t"] is None else f"after {det['retrain_labelled']} labelled "
         f"rows, {det['retrain_waited_s']:.1f} s after the alarm", ""),
        ("alarms before the drift",
         f"{det['alarms_before_drift']} ({det['alarmed_checks_before_drift']} alarmed of "
         f"{det['checks_before_drift']} checks)",
         _goal(goals["no_alarm_before_drift"], "0")),
        ("time to recovery (drift -> promoted)", f"{summary['recovery_s']:.1f} s", ""),
        ("rollout", summary["rollout"], ""),
        ("requests failed", f"{summary['requests']['failed']} of "
         f"{summary['requests']['answered'] + summary['requests']['failed']}",
         _goal(goals["no_failed_requests"], "0")),
        ("whole demo", f"{summary['duration_s']:.0f} s",
         _goal(goals["under_3_minutes"], "< 3 min")),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    value = max(len(r[1]) for r in rows)
    lines = [f"| {'':{width}} | {'value':{value}} | goal |", f"|{'-' * (width + 2)}|"
             f"{'-' * (value + 2)}|------|"]  # fmt: skip
    lines += [f"| {a:{width}} | {b:{value}} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def timeline_text(summary: dict[str, Any]) -> str:
    lines = []
    for entry in summary["timeline"]:
        detail = entry.get("detail") or {}
        extra = ", ".join(f"{k}={detail[k]}" for k in ("signals", "version", "status", "step",
                          "percent", "request") if detail.get(k) not in (None, [], ""))  # fmt: skip
        lines.append(f"  {entry['t']:6.1f} s  {entry['source']:4}  {entry['event']}"
                     + (f" ({extra})" if extra else ""))  # fmt: skip
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> Path:
    """Accuracy over time (per BIN_S s), the candidate's share of the answers, the oracle,
    and the events as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = summary["series"]
    figure, axes = plt.subplots(figsize=(10, 4.8), dpi=110)
    axes.plot(series["t"], series["accuracy"], color="#1f77b4", lw=2,
              label="accuracy of the answers")  # fmt: skip
    axes.fill_between(series["t"], 0, series["candidate_share"], color="#2ca02c", alpha=0.15,
                      step="mid", label="share answered by the candidate")  # fmt: skip
    axes.axhline(summary["accuracy"]["oracle"], color="#7f7f7f", ls=":", lw=1.5,
                 label="oracle (trained on drifted digits)")  # fmt: skip
    marks = list(summary["timeline"])
    drawn: set[str] = set()
    for entry in sorted(marks, key=lambda e: float(e["t"])):
        name = MARKED.get(entry["event"])
        if name is None or name in drawn:
            continue
        color = "#d62728" if entry["event"] in ("drift", "alarm") else "#444444"
        axes.axvline(entry["t"], color=color, ls="--", lw=1)
        height = 0.62 - 0.07 * (len(drawn) % 5)  # staggered: close events stay readable
        box = {"facecolor": "white", "edgecolor": "none", "pad": 1}
        axes.text(entry["t"], height, " " + name, fontsize=8, ha="left", va="center",
                  color=color, bbox=box)  # fmt: skip
        drawn.add(name)
    axes.set_ylim(0, 1.0)
    axes.set_xlabel("seconds since the demo started")
    axes.set_ylabel("accuracy (per 2 s)")
    acc = summary["accuracy"]
    axes.set_title(f"servo demo: before {_p(acc['before'])}, during {_p(acc['during'])}, "
                   f"after {_p(acc['after'])} (oracle {_p(acc['oracle'])})")  # fmt: skip
    axes.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def write(summary: dict[str, Any], png: Path, started: float) -> tuple[Path, Path]:
    """The PNG at `png`, the demo's duration since `started` (Unix seconds) and its goal,
    and the JSON summary beside the PNG (same name, .json)."""
    plot(summary, png)
    summary["duration_s"] = time.time() - started
    summary["goals"]["under_3_minutes"] = summary["duration_s"] < DURATION_MAX_S
    doc = png.with_suffix(".json")
    doc.write_text(json.dumps({**summary, "plot": str(png)}, indent=2, default=str) + "\n")
    return png, doc


def _p(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}%"


def _goal(met: bool, text: str) -> str:
    return f"{'met' if met else 'MISSED'} ({text})"
