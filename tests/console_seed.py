"""A registry for the console's tests and benchmark, seeded with the registry's own methods
and real trained models: the digits champion (a real bootstrap run), a retrained candidate
with a pending promotion request whose evidence is what the loop files (offline comparison
on the same rows, the paired live comparison of both models' real answers, the drift
report that triggered it, the signature diff), a finished canary rollout with the judge's
looks, and a failed pipeline run with its log.

`seed(directory)` writes DIR/registry.db, the registry `servo up --dir DIR` opens; `bulk`
adds many records for the benchmark (1,000 runs, 100 promotion requests)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from registry.store import RegistryStore
from retrain.pipeline import Pipeline, Runner, Step, StepContext, StepFailed

MODEL = "digits"
#: a token of each role the console tests use
ROLES = ("viewer", "operator", "approver")


@dataclass
class Seeded:
    store: RegistryStore
    directory: Path
    champion: int
    candidate: int
    promotion: int  # the pending request (candidate)
    rollout: int  # the finished rollout
    failed_run: int
    tokens: dict[str, str]

    @property
    def url(self) -> str:
        return f"sqlite:///{(self.directory / 'registry.db').resolve()}"


def open_registry(directory: Path) -> RegistryStore:
    directory.mkdir(parents=True, exist_ok=True)
    store = RegistryStore(f"sqlite:///{(directory / 'registry.db').resolve()}")
    store.create_schema()
    return store


def _answers(folder: Path, rows: np.ndarray[Any, Any]) -> tuple[list[str], list[float]]:
    """The model's label for each row, answered one at a time, and each answer's latency
    (the fastest of three tries: a busy machine's pauses are not the model's)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    labels, seconds = [], []
    for row in rows:
        tries = []
        for _ in range(3):
            start = time.perf_counter()
            label = session.run(None, {"input": row[None, :]})[0]
            tries.append(time.perf_counter() - start)
        seconds.append(min(tries))
        labels.append(str(int(label[0])))
    return labels, seconds


def _drift_report(folder: Path, rows: np.ndarray[Any, Any], version: int) -> dict[str, Any]:
    """The champion's check that triggered the retrain: its reference profile against a
    live window whose first features are shifted (a sensor gone bright)."""
    from monitors.profile import ReferenceProfile
    from monitors.report import compare
    from serving.model_folder import read_card

    card = read_card(folder)
    profile = ReferenceProfile.from_json(card.reference_profile)
    live = rows.copy()
    live[:, :8] += 6.0
    counts = profile.bin_counts(live)
    drift = compare(profile.features, profile.reference_counts, counts)
    # the bins of the features that drifted most, as monitors.monitor keeps them
    drift.attach_histograms(profile.edges, profile.reference_counts, counts,
                            ~profile.categorical_mask())  # fmt: skip
    return {
        "model": MODEL, "version": str(version), "source": "payload_log",
        "verdict": "alarm" if drift.verdict == "drift" else "ok",
        "reasons": ["input drift"] if drift.verdict == "drift" else [],
        "n": drift.window_n, "features": drift.to_json(),
    }  # fmt: skip


def recorded_checks(store: RegistryStore, version: int, every_s: float = 60.0) -> None:
    """The loop's checks of the champion as servo.loop records them, each a real monitors
    report (monitors.monitor.build_report) over a window of digits rows: eight calm
    windows, then four whose first features are shifted and whose accuracy drops; then
    the alarm and the retrain it started."""
    from monitors.monitor import MonitorConfig, build_report
    from monitors.profile import ReferenceProfile
    from monitors.sources import WindowData
    from retrain import trigger
    from serving.model_folder import read_card
    from servo.demo import digits_holdout
    from servo.loop import check_accuracy, check_drift

    folder = Path(store.version(MODEL, version).artifact_uri.removeprefix("file://"))
    card = read_card(folder)
    profile = ReferenceProfile.from_json(card.reference_profile)
    x, y = digits_holdout()
    rng = np.random.default_rng(0)
    end, checks = time.time() - 12 * every_s, 12
    for i in range(checks):
        rows = x[rng.choice(len(x), 200, replace=False)]
        drifted = i >= checks - 4
        if drifted:
            rows = rows.copy()
            rows[:, :8] += 6.0
        counts = profile.bin_counts(rows)
        features = {name: {label: float(counts[j, index]) for index, label in profile.bin_labels(j)}
                    for j, name in enumerate(profile.features)}  # fmt: skip
        labelled = 60
        correct = int(rng.binomial(labelled, 0.78 if drifted else 0.97))
        classes, counts_of = np.unique(y[:200], return_counts=True)
        data = WindowData(
            MODEL, str(version), window_s=every_s * 5, end=end + i * every_s,
            features=features,
            predictions={str(c): float(n) for c, n in zip(classes, counts_of, strict=True)},
            feedback={"correct": float(correct), "incorrect": float(labelled - correct)},
        )  # fmt: skip
        report = build_report(data, profile, baseline=card.metrics.get("accuracy"),
                              config=MonitorConfig(), source="payload_log")  # fmt: skip
        store.record_loop_event(MODEL, "check", {
            "version": version, "verdict": report.verdict, "reasons": report.reasons,
            "signals": sorted(trigger.signals(report)), "source": report.source,
            "error": report.error, "accuracy": check_accuracy(report), "drift": check_drift(report),
        })  # fmt: skip
    alarm = {"version": version, "signals": ["drift"], "reason": "input drift", "consecutive": 2}
    store.record_loop_event(MODEL, "alarm", alarm)


def pending_evidence(
    store: RegistryStore, champion: int, candidate: int, run_id: int | None
) -> dict[str, Any]:
    """The evidence the loop files for `candidate` (servo.loop_evidence's parts), the live
    comparison from both models' answers to the digits holdout, half of them labelled."""
    from retrain import evidence
    from retrain.policy import LoopConfig, to_json
    from serving.model_folder import read_card
    from servo.demo import digits_holdout
    from servo.loop_evidence import lineage, offline

    x, y = digits_holdout()
    folders = {v: Path(store.version(MODEL, v).artifact_uri.removeprefix("file://"))
               for v in (champion, candidate)}  # fmt: skip
    old, old_s = _answers(folders[champion], x)
    new, new_s = _answers(folders[candidate], x)
    truth = [str(int(t)) if i % 2 else None for i, t in enumerate(y)]
    report = _drift_report(folders[champion], x, champion)
    return evidence.build_evidence(
        trigger={"trigger": "drift", "reason": "input drift", "report": report,
                 "state": {"signal": "drift"}},
        policy=to_json(LoopConfig().for_model(MODEL)),
        lineage={**lineage(store, run_id), "champion": champion, "candidate": candidate},
        offline=offline(store, MODEL, candidate),
        live=evidence.paired_live(old, new, truth, old_s, new_s),
        signature=evidence.signature_diff(read_card(folders[champion]).to_json(),
                                          read_card(folders[candidate]).to_json()),
    )  # fmt: skip


def _load(ctx: StepContext) -> None:
    ctx.output("rows").write_text("pixel_0,pixel_1\n0,1\n")


def _explode(ctx: StepContext) -> None:
    print(f"reading {ctx.inputs['rows']}")
    raise ValueError("label column missing in the new batch")


def failed_run(store: RegistryStore, work: Path, trigger: str = "manual") -> int:
    """A real pipeline run whose second step fails (its log holds the traceback)."""
    pipeline = Pipeline("digits-refresh").add(Step("ingest", _load, ("rows",)))
    pipeline.add(Step("validate", _explode, ("report",), {"rows": "ingest.rows"}))
    with contextlib.suppress(StepFailed):
        Runner(work, store).run(pipeline, trigger=trigger, model=MODEL, cache=False)
    return int(store.runs(limit=1, recover=False)[0]["id"])


def finished_rollout(store: RegistryStore, champion: int) -> int:
    """A canary of another version (the champion's folder) that the judge rolled back:
    its errors are worse than the champion's."""
    from tests.rollouts import judged_rollout

    uri = store.version(MODEL, champion).artifact_uri
    version = store.register_version(MODEL, uri, {"accuracy": 0.9})
    done = judged_rollout(store, MODEL, version, error_rates=(0.2, 0.02), steps=(10, 50, 100))
    return int(done["id"])


def seed(directory: Path) -> Seeded:
    """DIR/registry.db with the champion serving, the loop's checks (calm, then drift), a
    finished rollout (rolled back), a failed run, the retrain the drift started and its
    candidate in shadow with a pending promotion, and one token per role."""
    from servo.train import train

    store = open_registry(directory)
    # the champion: a smaller network than the retrained candidate (which beats it)
    first = train(store, work=directory, name=MODEL, params={"hidden": [8]},
                  trigger="bootstrap")  # fmt: skip
    store.set_alias(MODEL, "champion", first.version, actor="setup")
    store.set_deployments(MODEL, [(first.version, "champion", 100.0)], actor="setup")
    store.set_loop_state(MODEL, "watching", {"reason": "seeded"})
    recorded_checks(store, first.version)
    rollout = finished_rollout(store, first.version)
    broken = failed_run(store, directory / "pipeline")
    store.record_loop_event(MODEL, "retrain_started", {"trigger": "drift", "triggered_by": None})
    second = train(store, work=directory, name=MODEL, trigger="drift")
    store.record_loop_event(MODEL, "retrain_finished", {"status": "succeeded",
                            "run_id": second.run.run_id, "version": second.version})  # fmt: skip
    doc = pending_evidence(store, first.version, second.version, second.run.run_id)
    request = store.file_promotion(MODEL, second.version, doc, "loop",
                                   run_id=second.run.run_id)  # fmt: skip
    # as the loop leaves it: the candidate in shadow, waiting for an approver
    store.set_deployments(MODEL, [(first.version, "champion", 100.0),
                                  (second.version, "shadow", 100.0)], actor="loop")  # fmt: skip
    store.set_loop_state(MODEL, "awaiting_approval", {"request": request, "candidate": {
        "version": second.version, "run_id": second.run.run_id, "trigger": "drift"}})  # fmt: skip
    tokens = {role: store.create_token(f"console-{role}", role, "setup") for role in ROLES}
    return Seeded(store, directory, first.version, second.version, request, rollout, broken,
                  tokens)  # fmt: skip


def bulk(store: RegistryStore, runs: int = 1000, requests: int = 100) -> None:
    """`runs` more pipeline runs (every tenth failed, each with two steps and their
    artifacts) and `requests` more promotion requests (of new versions, half decided),
    recorded as the runner and the loop record theirs, for the benchmark."""
    champion = store.alias(MODEL, "champion")
    assert champion is not None, "seed the registry first"
    uri = store.version(MODEL, champion).artifact_uri
    template = store.promotions(model=MODEL)[0]["evidence"]
    for i in range(runs):
        run = store.start_run("digits", "cron" if i % 3 else "drift", {"seed": i}, model=MODEL)
        for step in ("ingest", "train"):
            store.record_step(
                run, step, status="succeeded", cache_key=f"{run}-{step}", attempts=1,
                duration_s=0.5 + i % 7, parameters={}, metrics={},
            )  # fmt: skip
            store.record_artifact(
                run, step, name="out", direction="output", uri=f"file:///{run}",
                content_hash=f"sha256:{run:064x}", size=1024,
            )  # fmt: skip
        store.finish_run(run, "failed" if i % 10 == 0 else "succeeded",
                         "step 'train' failed" if i % 10 == 0 else None)  # fmt: skip
    for i in range(requests):
        version = store.register_version(MODEL, uri, {"accuracy": 0.9})
        request = store.file_promotion(MODEL, version, template, "loop")
        if i % 2:
            store.auto_decide(request, "rejected", "gate failed: accuracy", actor="gates")
