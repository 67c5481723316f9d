"""`servo monitor`: find a version's profile and evaluation accuracy, run the monitors
against a source, print the report as a table (or JSON)."""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitors.monitor import MonitorReport, window_label
from monitors.profile import ReferenceProfile
from monitors.report import DriftReport
from serving.model_folder import read_card

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """ "15m" -> 900.0; "90s", "1h", "2d"; a bare number is seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 1h, 2d)")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


@dataclass
class Target:
    model: str
    #: the version label the gateway exports (the model folder's version)
    version: str
    profile: ReferenceProfile | None
    baseline: float | None
    folder: Path


def folder_of(uri: str) -> Path:
    if uri.startswith("file://"):
        return Path(urllib.parse.urlparse(uri).path)
    return Path(uri)


def resolve(model: str, version: int | None, model_dir: Path | None, store: Any) -> Target:
    """The version to watch: `model_dir` when given; else the registry's version (default:
    the champion alias, else the deployed champion, else the latest)."""
    if model_dir is None:
        if store is None:
            raise LookupError("give --model-dir or a registry")
        if version is None:
            aliases = store.aliases(model)
            deployed = store.deployments().get(model, [])
            champions = [d["version"] for d in deployed if d["role"] == "champion"]
            versions = store.versions(model)
            if "champion" in aliases:
                version = int(aliases["champion"])
            elif champions:
                version = int(champions[0])
            elif versions:
                version = versions[-1].version
            else:
                raise LookupError(
                    f"model '{model}' is not registered in the registry; for a model served "
                    f"from folders, pass --model-dir with its version folder (e.g. "
                    f"--model-dir models/{model}/1)"
                )
        info = store.version(model, version)
        model_dir = folder_of(info.artifact_uri)
    card = read_card(model_dir)
    profile = ReferenceProfile.from_json(card.reference_profile) if card.reference_profile else None
    accuracy = card.metrics.get("accuracy")
    return Target(
        model=model,
        version=card.version,
        profile=profile,
        baseline=float(accuracy) if isinstance(accuracy, int | float) else None,
        folder=model_dir,
    )


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _drift_lines(title: str, part: DriftReport | None, top: int) -> list[str]:
    if part is None:
        return [f"{title}: not monitored (no reference in the profile)"]
    if not part.features:
        return [f"{title}: {part.verdict} (n={part.window_n}, needs {part.min_samples})"]
    drifted = part.drifted()
    head = f"{title}: {part.verdict} (n={part.window_n}"
    if len(part.features) > 1:
        head += f", {len(drifted)} of {len(part.features)} drifted"
    lines = [head + ")"]
    shown = sorted(part.features, key=lambda f: (not f.drifted, -f.js_distance))[:top]
    lines.append(
        f"  {'feature':<24} {'js':>7} {'thresh':>7} {'psi':>7} {'chi2 p':>9} {'ks':>6}  drifted"
    )
    lines.extend(
        f"  {f.feature[:24]:<24} {f.js_distance:7.4f} {f.js_threshold:7.4f} {f.psi:7.4f} "
        f"{f.chi2_p_value:9.2e} {f.ks_distance_bound:6.3f}  {'yes' if f.drifted else 'no'}"
        for f in shown
    )
    return lines


def table(report: MonitorReport, *, top: int = 10) -> str:
    title = (
        f"{report.model} version {report.version}: {report.verdict.upper()}"
        + (f" ({', '.join(report.reasons)})" if report.reasons else "")
        + f"  [window {window_label(report.window_s)}"
        + (
            f" (data for {report.covered_s:.0f} s of it)"
            if report.covered_s is not None and report.covered_s < report.window_s
            else ""
        )
        + f", source {report.source}"
        + (f", until {report.end}" if report.end else "")
        + "]"
    )
    if report.error:
        return f"{title}\n  cannot tell: {report.error}"
    lines = [title]
    lines += _drift_lines("input drift", report.features, top)
    lines += _drift_lines("prediction drift", report.predictions, 1)
    lines += _drift_lines("confidence drift", report.confidence, 1)
    acc = report.accuracy
    if acc is not None:
        interval = f"[{_fmt(acc.wilson_low)}, {_fmt(acc.wilson_high)}]"
        coverage = "-" if acc.coverage is None else f"{acc.coverage:.0%}"
        lines.append(
            f"accuracy: {acc.verdict}: {_fmt(acc.accuracy)} {interval} over {acc.labelled} labels,"
            f" coverage {coverage} of {acc.predicted} predictions; label delay p50 <= "
            f"{_fmt(acc.delay_p50_s, 0)} s, p90 <= {_fmt(acc.delay_p90_s, 0)} s"
        )
        detected = (
            f"fired at label {acc.detected_at_label} of {acc.history_labels}"
            if acc.drift_detected
            else f"quiet over {acc.history_labels} labels"
        )
        lines.append(
            f"  baseline (evaluation accuracy) {_fmt(acc.baseline)}, tolerance "
            f"{acc.tolerance}; detector {acc.detector}: {detected}"
        )
    return "\n".join(lines)
