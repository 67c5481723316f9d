"""The loop under faults (issue 10, point 17), each on real `servo up` processes: a worse
candidate rejected by the gates; a trigger storm bounded by the budget; two `servo up` on
one registry never running two pipelines of one model; SIGTERM during a retrain. (`kill -9`
during a retrain and during shadowing, then a restart that resumes, never half-promoted
and losing nothing recorded: tests/test_crash_loop.py.)"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.loop_traffic import Traffic
from tests.test_loop_e2e import POLICY, events, registry, write_policy
from tests.upservers import Up, start_up, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def policy(**sections: str) -> str:
    """POLICY with some sections' bodies replaced (YAML text indented by four spaces)."""
    lines = POLICY.strip("\n").splitlines()
    out: list[str] = []
    skipping = False
    for line in lines:
        name = line.strip().rstrip(":")
        if line.startswith("  ") and not line.startswith("    ") and name in sections:
            out.append(line)
            out.extend(f"    {row}" for row in sections[name].strip().splitlines())
            skipping = True
            continue
        if skipping and line.startswith("    "):
            continue
        skipping = False
        out.append(line)
    return "\n".join(out) + "\n"


def champion_rows(up: Up) -> list[tuple[int, str]]:
    store = registry(up)
    try:
        return sorted((d["version"], d["role"]) for d in store.deployments().get("digits", []))
    finally:
        store.close()


def test_policy_helper_replaces_a_section() -> None:
    text = policy(shadow="min_labelled: 7\ntimeout_s: 9")
    assert "    min_labelled: 7\n    timeout_s: 9\n  gates:" in text
    assert "min_labelled: 100" not in text


def test_a_worse_candidate_is_rejected_by_the_gates(tmp_path: Path) -> None:
    # a candidate trained to be poor: 2 hidden units, 3 iterations
    text = policy(
        retrain="window_s: 3600\nshare: 0.5\nholdout: 0.3\nparams: {hidden: [2], max_iter: 3}",
        shadow="min_labelled: 60\ntimeout_s: 300",
    )
    up = start_up(tmp_path / "s", tmp_path / "up.log", policy=write_policy(tmp_path, text))
    store = registry(up)
    traffic = Traffic(up.url).start()
    try:
        store.request_retrain("digits", "cli:test", "a worse candidate, on purpose")
        rejected = wait_for(lambda: store.promotions(model="digits", status="rejected"),
                            every_s=0.5)  # fmt: skip
        request = rejected[0]
        reason = request["decision"]["reason"]
        assert request["decision"]["actor"] == "gates"
        # the failing gates and their numbers
        assert reason.startswith("gates failed: "), reason
        assert "live_non_inferiority: ci_low" in reason and "< -0.0200" in reason, reason
        assert "offline_non_inferiority" in reason, reason
        # the candidate left the shadow; the champion never changed
        wait_for(lambda: store.loop_states()["digits"]["state"] == "watching")
        assert champion_rows(up) == [(1, "champion")]
        assert store.alias("digits", "champion") == 1
        assert store.version("digits", 2).status == "rejected"
    finally:
        traffic.stop()
        up.stop()
        store.close()


def test_a_trigger_storm_retrains_no_more_than_the_budget(tmp_path: Path) -> None:
    # every check alarms (drifted traffic from the start, k 1, no cooldown); each candidate
    # is rejected at once (a gain nobody reaches), so the loop is free to retrain again
    text = policy(
        trigger="on: [input_drift, accuracy_stall]\nk: 1\ncooldown_s: 0\nbudget_per_day: 2",
        shadow="min_labelled: 20\ntimeout_s: 300",
        gates="live_margin: 0.02\noffline_margin: 0.05\nmin_gain: 0.9\nlatency_p99_ratio: 20.0",
    )
    up = start_up(tmp_path / "s", tmp_path / "up.log", policy=write_policy(tmp_path, text))
    store = registry(up)
    traffic = Traffic(up.url)
    traffic.drift = True
    traffic.start()
    try:
        wait_for(lambda: len(store.promotions(model="digits", status="rejected")) >= 2,
                 every_s=0.5)  # fmt: skip
        skipped = wait_for(
            lambda: [e for e in events(store, "skipped") if "budget" in e["detail"]["reason"]],
            every_s=0.5,
        )
        assert "budget_per_day 2" in skipped[0]["detail"]["reason"]
        # a storm: the checks keep alarming, yet no third retrain starts
        wait_for(lambda: len([e for e in events(store, "check")
                              if e["detail"]["signals"]
                              and e["at"] > skipped[0]["at"]]) >= 3)  # fmt: skip
        assert len(events(store, "retrain_started")) == 2
        runs = [r for r in store.runs(100) if r["trigger"] != "bootstrap"]
        assert len(runs) == 2
    finally:
        traffic.stop()
        up.stop()
        store.close()


def test_two_servo_up_on_one_registry_never_run_two_pipelines_of_a_model(
    tmp_path: Path,
) -> None:
    # no traffic: each candidate's shadow times out at once and its request (insufficient
    # evidence) fails the live gate; then the next retrain may start
    text = policy(
        retrain="window_s: 3600\nshare: 0.5\nholdout: 0.3\nparams: {hidden: [128, 128]}",
        shadow="min_labelled: 100000\ntimeout_s: 1",
    )
    path = write_policy(tmp_path, text)
    first = start_up(tmp_path / "a", tmp_path / "a.log", policy=path)
    url = f"sqlite:///{(first.directory / 'registry.db').resolve()}"
    second = start_up(tmp_path / "b", tmp_path / "b.log", policy=path, registry_url=url)
    store = registry(first)
    try:
        assert second.named("bootstrapped") == []  # the registry was not empty
        running_at_once = 0

        def manual_runs(finished: bool) -> int:
            return len([r for r in store.runs(100, recover=False) if r["trigger"] == "manual"
                        and (r["status"] != "running" or not finished)])  # fmt: skip

        while manual_runs(finished=True) < 2:
            running = [r for r in store.runs(100, recover=False) if r["status"] == "running"]
            running_at_once = max(running_at_once, len(running))
            assert len(running) <= 1, running
            if running:
                assert store.model_lock("digits") is not None
            state = store.loop_states().get("digits", {}).get("state", "watching")
            if not running and state == "watching" and manual_runs(finished=False) < 3:
                # two requests at once, for whichever process claims them first
                store.request_retrain("digits", "cli:test", "storm")
                store.request_retrain("digits", "cli:test", "storm")
                time.sleep(1.5)
            time.sleep(0.1)
        assert running_at_once == 1
        owners = {e["detail"].get("pid") for e in events(store, "retrain_started")}
        assert owners  # worker pids: the runs were started by the loop
    finally:
        first.stop()
        second.stop()
        store.close()


def _metrics_with(up: Up, needle: str) -> str | None:
    text = httpx.get(f"{up.url}/metrics", timeout=5).text
    return text if needle in text else None


def test_sigterm_during_a_retrain_stops_it_and_marks_it_interrupted(tmp_path: Path) -> None:
    text = policy(
        retrain="window_s: 3600\nshare: 0.5\nholdout: 0.3\n"
        "params: {hidden: [512, 512], max_iter: 500}",
    )
    up = start_up(tmp_path / "s", tmp_path / "up.log", policy=write_policy(tmp_path, text))
    store = registry(up)
    try:
        store.request_retrain("digits", "cli:test", "stopped by SIGTERM")
        wait_for(lambda: store.loop_states().get("digits", {}).get("state") == "retraining")
        run = wait_for(lambda: [r for r in store.runs(10, recover=False)
                                if r["trigger"] == "manual"])[0]  # fmt: skip
        assert up.stop() == 0
        assert store.run(run["id"], recover=False)["status"] == "interrupted"
        assert store.loop_states()["digits"]["state"] == "watching"
        assert store.model_lock("digits") is None
        stopped = up.named("retrain_stopped")
        assert stopped and stopped[0]["status"] == "interrupted"
        events_seen = [e["event"] for e in up.events()]
        assert events_seen.index("retrain_stopped") < events_seen.index("shutdown_finished")
    finally:
        up.stop()
        store.close()


def test_a_paused_model_is_not_retrained_until_resumed(tmp_path: Path) -> None:
    text = policy(retrain="window_s: 3600\nshare: 0.5\nholdout: 0.3\nparams: {seed: 1}")
    up = start_up(tmp_path / "s", tmp_path / "up.log", policy=write_policy(tmp_path, text))
    store = registry(up)
    try:
        store.pause_loop("digits", "cli:test", "maintenance")
        store.request_retrain("digits", "cli:test", "while paused")
        skipped = wait_for(lambda: events(store, "skipped"))
        assert skipped[0]["detail"]["reason"] == "paused"
        metrics = wait_for(lambda: _metrics_with(up, 'servo_loop_state{model="digits",'
                                                     'state="paused"} 1.0'))  # fmt: skip
        assert 'servo_loop_state{model="digits",state="watching"} 0.0' in metrics
        assert events(store, "retrain_started") == []
        store.resume_loop("digits", "cli:test", "done")
        store.request_retrain("digits", "cli:test", "after the pause")
        started = wait_for(lambda: events(store, "retrain_started"))
        assert started[0]["detail"]["trigger"] == "manual"
    finally:
        up.stop()
        store.close()


def test_a_passing_candidate_is_promoted_automatically_where_the_policy_says_so(
    tmp_path: Path,
) -> None:
    text = policy(
        retrain="window_s: 3600\nshare: 0.5\nholdout: 0.3\nparams: {seed: 1}",
        shadow="min_labelled: 60\ntimeout_s: 300",
        gates="live_margin: 0.3\noffline_margin: 0.3\nlatency_p99_ratio: 50.0",
        approval="auto: true",
    )
    up = start_up(tmp_path / "s", tmp_path / "up.log", policy=write_policy(tmp_path, text))
    store = registry(up)
    traffic = Traffic(up.url).start()
    try:
        store.request_retrain("digits", "cli:test", "an equal candidate")
        promoted = wait_for(lambda: store.promotions(model="digits", status="promoted"),
                            every_s=0.5)  # fmt: skip
        assert promoted[0]["decision"]["actor"] == "policy"
        assert "gates passed" in promoted[0]["decision"]["reason"]
        wait_for(lambda: store.alias("digits", "champion") == 2)
        wait_for(lambda: champion_rows(up) == [(2, "champion")])
        wait_for(lambda: any(a.version == "2" for a in list(traffic.answers)))
    finally:
        traffic.stop()
        up.stop()
        store.close()


def test_a_cron_schedule_retrains_without_an_alarm(tmp_path: Path) -> None:
    # no alarm can trigger (k is out of reach); the crontab fires at the next minute
    text = policy(
        trigger='on: [accuracy_stall]\nk: 1000\ncooldown_s: 3600\nbudget_per_day: 3\n'
                'cron: "* * * * *"',
        retrain="window_s: 3600\nshare: 0.5\nholdout: 0.3\nparams: {seed: 2}",
    )  # fmt: skip
    up = start_up(tmp_path / "s", tmp_path / "up.log", policy=write_policy(tmp_path, text))
    store = registry(up)
    try:
        jobs = wait_for(lambda: [e for e in up.events() if e.get("event") == "watching"])
        assert jobs[0]["cron"] == "* * * * *"
        started = wait_for(lambda: events(store, "retrain_started"), every_s=0.5)
        assert started[0]["detail"]["trigger"] == "cron"
        assert events(store, "alarm") == []
        runs = wait_for(lambda: [r for r in store.runs(20) if r["trigger"] == "cron"
                                 and r["status"] != "running"], every_s=0.5)  # fmt: skip
        assert runs[0]["status"] == "succeeded" and runs[0]["model"] == "digits"
    finally:
        up.stop()
        store.close()
