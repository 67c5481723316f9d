"""The closed loop end to end (issue 10, point 16) on a real `servo up` on 127.0.0.1:
digits served, a traffic client with delayed labels, then a drift (a changed class mix and
shifted pixels). The loop alarms, retrains once, shadows the candidate, files a request
whose evidence shows the candidate ahead on the drifted traffic; an approver approves over
HTTP; the candidate serves and the accuracy on the drifted traffic recovers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from registry.store import RegistryStore
from tests.loop_traffic import Traffic
from tests.upservers import Up, start_up, wait_for

POLICY = """
defaults:
  check_every_s: 1
  monitor_window_s: 8
  trigger:
    on: [accuracy_stall, input_drift]
    k: 3
    cooldown_s: 3600
    budget_per_day: 3
  retrain:
    window_s: 3600
    share: 0.5
    holdout: 0.3
    min_labelled: 150   # drifted rows in the window before the retrain starts (CI once
    wait_s: 120         # retrained on fewer and recovered to only 0.68)
  shadow:
    min_labelled: 100
    timeout_s: 300
  gates:
    live_margin: 0.02
    offline_margin: 0.05
    latency_p99_ratio: 20.0
  approval:
    auto: false
  rollout:
    strategy: immediate     # the canary has its own end-to-end test (test_canary_e2e.py)
"""


def write_policy(folder: Path, text: str = POLICY) -> Path:
    path = folder / "servo.yaml"
    path.write_text(text)
    return path


def registry(up: Up) -> RegistryStore:
    store = RegistryStore(f"sqlite:///{(up.directory / 'registry.db').resolve()}")
    store.create_schema()
    return store


def events(store: RegistryStore, kind: str, model: str = "digits") -> list[dict[str, Any]]:
    return store.loop_events(model, kinds=[kind])


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_loop_notices_drift_retrains_once_and_recovers_after_approval(
    tmp_path: Path,
) -> None:
    up = start_up(tmp_path / "dot-servo", tmp_path / "up.log", policy=write_policy(tmp_path))
    store = registry(up)
    labeler = store.create_token("traffic", "labeler", actor="test")
    approver = store.create_token("alice", "approver", actor="test")
    traffic = Traffic(up.url, label_token=labeler).start()
    try:
        # normal traffic: the champion answers well and nothing is retrained
        wait_for(lambda: traffic.accuracy(drift=False)[1] >= 150)
        assert traffic.accuracy(drift=False)[0] > 0.9
        assert events(store, "retrain_started") == []
        drift_at = time.time()
        traffic.drift = True
        started = wait_for(lambda: events(store, "retrain_started"))
        assert started[0]["detail"]["trigger"] in ("input_drift", "accuracy_stall")
        assert wait_for(lambda: events(store, "alarm"))
        champion_drifted, n = traffic.accuracy(version="1", drift=True)
        assert n > 0 and champion_drifted < 0.6  # the drift hurts the champion
        wait_for(lambda: events(store, "shadow_started"), every_s=0.5)
        assert [d for d in store.deployments()["digits"] if d["role"] == "shadow"] == [
            {"version": 2, "role": "shadow", "percent": 100.0,
             "artifact_uri": store.version("digits", 2).artifact_uri, "servable": True,
             "url": None}
        ]  # fmt: skip
        pending = wait_for(lambda: store.promotions(model="digits", status="pending"), every_s=0.5)
        request = pending[0]
        live = request["evidence"]["live"]
        assert request["version"] == 2 and live["n_labelled"] >= 100
        assert live["candidate_accuracy"] > live["champion_accuracy"] + 0.2, live
        assert live["difference_ci95"][0] > 0  # ahead, beyond chance
        assert request["evidence"]["trigger"]["report"]["verdict"] == "alarm"
        # an approver approves over HTTP, bound to the evidence it saw
        reply = httpx.post(
            f"{up.admin}/admin/promotions/{request['id']}/approve",
            json={"reason": "candidate ahead on drifted traffic",
                  "evidence_hash": request["evidence_hash"]},
            headers={"Authorization": f"Bearer {approver}"},
            timeout=30,
        )  # fmt: skip
        assert reply.status_code == 200, reply.text
        assert reply.json()["status"] == "promoted"
        promoted_at = wait_for(
            lambda: next((a.at for a in list(traffic.answers) if a.version == "2"), None)
        )
        wait_for(lambda: traffic.accuracy(version="2", since=promoted_at)[1] >= 150)
        recovered, _ = traffic.accuracy(version="2", drift=True, since=promoted_at)
        print(
            f"drifted accuracy: champion {champion_drifted:.3f}, candidate live "
            f"{live['candidate_accuracy']:.3f}, after promotion {recovered:.3f}"
        )
        # 0.97 twice on an idle machine since the retrain waits for 150 drifted labels
        # (0.68 once in CI when it started at the alarm): recovered means well above the
        # champion on the same traffic
        assert recovered > 0.8 and recovered > champion_drifted + 0.3, (recovered, live)
        # retrained once (not once per alarmed check), and the loop is back to watching
        assert len(events(store, "retrain_started")) == 1
        assert _time(events(store, "retrain_started")[0]) >= drift_at
        wait_for(lambda: store.loop_states()["digits"]["state"] == "watching")
        runs = [r for r in store.runs(50) if r["trigger"] != "bootstrap"]
        assert [r["status"] for r in runs] == ["succeeded"]
        metrics = httpx.get(f"{up.url}/metrics", timeout=10).text
        assert 'servo_promotions_total{decision="promoted",model="digits"} 1.0' in metrics
        assert 'servo_model_info{model="digits",stage="champion",version="2"} 1.0' in metrics
    finally:
        traffic.stop()
        code = up.stop()
        store.close()
    assert code == 0, up.log()[-3000:]
    decisions = [e["event"] for e in up.events()]
    for event in ("alarm", "retrain_started", "retrain_finished", "shadow_started",
                  "promotion_filed", "awaiting_approval", "promoted"):  # fmt: skip
        assert event in decisions, event


def _time(event: dict[str, Any]) -> float:
    at = event["at"]
    return float(at.timestamp()) if hasattr(at, "timestamp") else float(at)
