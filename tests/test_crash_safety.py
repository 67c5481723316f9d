"""The registry and the pipeline after a crash: leases (a run whose process died is marked
failed and its temporary folders removed), versions servable only once their folder is
complete, concurrent runs on one work folder, and a seeded kill -9 fault test."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.base import upgrade
from registry.store import RegistryError, RegistryStore
from retrain.pipeline import Pipeline, Runner, Step, StepContext
from servo.routes import table_from_deployments
from tests.crash import (
    ROOT,
    check_invariants,
    kill,
    kill_at,
    leftovers,
    query,
    run_cli,
    timed,
    train,
    wait_for,
)
from tests.postgres import postgres_cluster


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RegistryStore]:
    made = RegistryStore(f"sqlite:///{tmp_path / 'r.db'}")
    made.create_schema()
    yield made
    made.close()


def holder(url: str, code: str) -> subprocess.Popen[str]:
    """A real process that takes a run's lease (and does `code`), prints READY, and waits
    to be killed."""
    program = (
        textwrap.dedent(f"""
        import time
        from registry.store import RegistryStore
        store = RegistryStore({url!r})
    """)
        + textwrap.dedent(code)
        + "\nprint('READY', flush=True)\ntime.sleep(120)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", program], stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert process.stdout is not None and process.stdout.readline().strip() == "READY"
    return process


# 18: leases


def test_a_run_whose_process_died_is_marked_failed_and_its_scratch_removed(
    store: RegistryStore, tmp_path: Path
) -> None:
    scratch = tmp_path / "run-x.tmp"
    process = holder(store.url, f"""
        run = store.start_run("digits", "manual", {{}}, scratch=[{str(scratch)!r}])
        __import__("os").mkdir({str(scratch)!r})
    """)  # fmt: skip
    try:
        assert store.runs()[0]["status"] == "running"  # alive: the check leaves it alone
        assert scratch.is_dir()
    finally:
        kill(process)
    run = store.runs()[0]  # the recovery check runs first
    assert run["status"] == "failed" and run["finished_at"] is not None
    assert f"its process {process.pid} on" in run["error"] and "is gone" in run["error"]
    assert not scratch.exists()
    assert any(a["action"] == "run_failed" for a in store.audit())


def test_a_reused_pid_does_not_keep_a_dead_run_alive(store: RegistryStore) -> None:
    run = store.start_run("digits", "manual", {})  # leased to this (live) process
    with store.engine.begin() as connection:  # the same pid, another process's start time
        (process,) = connection.exec_driver_sql(
            "SELECT lease_process FROM pipeline_runs WHERE id = ?", (run,)
        ).one()
        boot_ns, _, ticks = process.rpartition("/")
        connection.exec_driver_sql(
            "UPDATE pipeline_runs SET lease_process = ? WHERE id = ?",
            (f"{boot_ns}/{int(ticks) + 1}", run),
        )
    assert store.run(run)["status"] == "failed"
    live = store.start_run("digits", "manual", {})
    assert store.run(live)["status"] == "running"


def test_a_run_elsewhere_is_judged_by_its_heartbeat(tmp_path: Path) -> None:
    store = RegistryStore(f"sqlite:///{tmp_path / 'r.db'}", lease_s=60)
    store.create_schema()
    try:
        fresh, stale = store.start_run("a", "manual", {}), store.start_run("b", "manual", {})
        with store.engine.begin() as connection:
            connection.exec_driver_sql("UPDATE pipeline_runs SET lease_host = 'elsewhere'")
            connection.exec_driver_sql(
                "UPDATE pipeline_runs SET heartbeat_at = '2020-01-01 00:00:00' WHERE id = ?",
                (stale,),
            )
        statuses = {r["id"]: r for r in store.runs()}
        assert statuses[fresh]["status"] == "running"
        assert statuses[stale]["status"] == "failed"
        assert "no heartbeat from pid" in statuses[stale]["error"]
        assert store.heartbeat(fresh) and not store.heartbeat(stale)
    finally:
        store.close()


def test_the_runner_renews_its_lease_while_a_step_runs(
    store: RegistryStore, tmp_path: Path
) -> None:
    beats: list[object] = []

    def slow(ctx: StepContext) -> None:
        first = store.runs(1, recover=False)[0]["lease"]["heartbeat_at"]
        beats.append(first)
        beats.append(wait_for(lambda: (store.runs(1, recover=False)[0]["lease"]["heartbeat_at"]
                                       != first), timeout=60, every=0.02))  # fmt: skip
        ctx.output("out").write_text("done")

    runner = Runner(tmp_path / "root", store, heartbeat_s=0.05)
    result = runner.run(Pipeline("p").add(Step("slow", slow, ("out",), cache=False)))
    assert beats and store.run(result.run_id)["status"] == "succeeded"
    assert leftovers(tmp_path / "root") == []


@pytest.mark.slow
def test_servo_train_killed_mid_pipeline_is_recovered_by_runs_list(tmp_path: Path) -> None:
    url, work = f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "w"
    process = train(url, work, log=tmp_path / "train.log")
    try:  # kill -9 while the train step works in the run's scratch folder
        wait_for(lambda: list((work / "pipeline" / "tmp").glob("run-*.tmp/train-*")), 120)
    finally:
        kill(process)
    assert [r["status"] for r in query(tmp_path / "r.db", "SELECT status FROM pipeline_runs")] == [
        "running"
    ]
    assert leftovers(work) != []
    listed = run_cli("runs", "list", "--registry", url)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("1\tdigits\tfailed\t")
    shown = json.loads(run_cli("runs", "show", "1", "--registry", url).stdout)
    assert f"its process {process.pid} on" in shown["error"]
    assert leftovers(work) == []
    again = train(url, work, log=tmp_path / "train.log")
    assert again.wait(timeout=300) == 0, (tmp_path / "train.log").read_text()


def test_leftovers_of_servo_before_leases_are_swept(store: RegistryStore, tmp_path: Path) -> None:
    from servo.train import sweep_legacy

    old, live = store.start_run("digits", "manual", {}), store.start_run("digits", "manual", {})
    store.register_version("digits", "", {}, run_id=old, servable=False)
    with store.engine.begin() as connection:  # as the 0002 migration leaves an old run
        connection.exec_driver_sql(
            "UPDATE pipeline_runs SET lease_host = NULL, lease_pid = NULL,"
            " started_at = '2026-01-01 00:00:00' WHERE id = ?",
            (old,),
        )
    work = tmp_path / "w"
    dead_step = work / "pipeline" / "artifacts" / "train" / f".{'a' * 64}.{old}.tmp"
    live_step = work / "pipeline" / "artifacts" / "train" / f".{'b' * 64}.{live}.tmp"
    dead_version = work / "models" / "digits" / ".1.tmp"
    for folder in (dead_step, live_step, dead_version):
        folder.mkdir(parents=True)
    assert sorted(sweep_legacy(store, work)) == sorted([dead_step, dead_version])
    assert live_step.is_dir() and not dead_step.exists() and not dead_version.exists()
    assert store.version("digits", 1).status == "failed"


# 19: a version is servable only once its folder is complete


def test_an_unpublished_version_cannot_be_deployed_aliased_or_routed(
    store: RegistryStore, tmp_path: Path
) -> None:
    run = store.start_run("digits", "manual", {})
    version = store.register_version("digits", "", {}, run_id=run, servable=False)
    refused = run_cli("deploy", "digits", "--champion", str(version), "--registry", store.url)
    assert refused.returncode != 0
    assert "model 'digits' version 1 is not servable" in refused.stderr
    with pytest.raises(RegistryError, match="version 1 is not servable"):
        store.set_alias("digits", "champion", version, actor="ops")
    with pytest.raises(RegistryError, match="needs the run"):
        store.register_version("digits", "", {}, servable=False)
    store.publish_version("digits", version, "file:///m/1", {"model.onnx": "sha256:00"})
    store.set_deployments("digits", [(version, "champion", 100.0)], actor="ops")
    info = store.version("digits", version)
    assert info.servable and info.artifact_hashes == {"model.onnx": "sha256:00"}
    # a deployment made before the flag existed, now pointing at a version never completed
    with store.engine.begin() as connection:
        connection.exec_driver_sql("UPDATE model_versions SET servable = 0")
    assert table_from_deployments(store.deployments()).models == {}  # ignored, not a 503


def test_a_kill_between_reserve_and_publish_fails_the_version(
    store: RegistryStore, tmp_path: Path
) -> None:
    process = holder(store.url, """
        run = store.start_run("digits", "manual", {})
        store.register_version("digits", "", {}, run_id=run, servable=False)
    """)  # fmt: skip
    kill(process)
    assert store.runs()[0]["status"] == "failed"
    info = store.version("digits", 1)
    assert info.status == "failed" and not info.servable
    refused = run_cli("deploy", "digits", "--champion", "1", "--registry", store.url)
    assert "version 1 is not servable: its folder was never completed" in refused.stderr
    with pytest.raises(RegistryError, match="marked failed"):
        store.publish_version("digits", 1, "file:///late", {})


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with postgres_cluster() as url:
        yield url


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_migration_makes_versions_without_a_folder_not_servable(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The issue's digits v7: registered, killed before its URI was set, then deployed."""
    url = f"sqlite:///{tmp_path / 'r.db'}" if backend == "sqlite" else request.getfixturevalue(
        "pg_url"
    )  # fmt: skip
    store = RegistryStore(url)
    try:
        with store.engine.begin() as connection:
            if backend == "postgresql":
                connection.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        upgrade(store.engine, "0001")
        with store.engine.begin() as connection:
            connection.exec_driver_sql(
                "INSERT INTO models (name, created_at, last_version) "
                "VALUES ('digits', '2026-01-01', 7)"
            )
            for version, uri in ((6, "file:///m/digits/6"), (7, "")):
                connection.exec_driver_sql(
                    "INSERT INTO model_versions (model, version, status, artifact_uri, metrics,"
                    f" created_at) VALUES ('digits', {version}, 'registered', '{uri}', '{{}}',"
                    " '2026-01-01')"
                )
            connection.exec_driver_sql(
                "INSERT INTO deployments (model, version, role, percent, updated_at) "
                "VALUES ('digits', 7, 'champion', 100, '2026-01-01')"
            )
        store.create_schema()  # to the latest revision
        assert [(v.version, v.servable) for v in store.versions("digits")] == [
            (6, True),
            (7, False),
        ]
        refused = run_cli("deploy", "digits", "--champion", "7", "--registry", url)
        assert refused.returncode != 0 and "version 7 is not servable" in refused.stderr
        assert table_from_deployments(store.deployments()).models == {}
        assert run_cli("deploy", "digits", "--champion", "6", "--registry", url).returncode == 0
    finally:
        store.close()


# 20: concurrent runs on one work folder


def nondeterministic(ctx: StepContext) -> None:
    ctx.output("out").write_bytes(os.urandom(16))


def test_a_published_step_folder_is_never_replaced(store: RegistryStore, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha")
    runner = Runner(tmp_path / "root", store)

    def copy(ctx: StepContext) -> None:
        ctx.output("out").write_text(ctx.inputs["src"].read_text().upper())

    pipeline = Pipeline("p").add(Step("copy", copy, ("out",), {"src": f"file:{tmp_path}/a.txt"}))
    first = runner.run(pipeline)
    folder = first.output("copy", "out").parent
    inode = folder.stat().st_ino
    again = runner.run(pipeline, cache=False)  # re-run, same bytes: the folder is the same one
    assert again.output("copy", "out") == first.output("copy", "out")
    assert folder.stat().st_ino == inode and first.output("copy", "out").read_text() == "ALPHA"
    # a step whose bytes differ run to run: the second run's outputs go beside the first's
    random_pipeline = Pipeline("r").add(Step("rand", nondeterministic, ("out",)))
    one = runner.run(random_pipeline)
    before = one.output("rand", "out").read_bytes()
    two = runner.run(random_pipeline, cache=False)
    assert one.output("rand", "out").read_bytes() == before
    assert two.output("rand", "out") != one.output("rand", "out")
    assert two.output("rand", "out").parent.name.startswith(one.steps["rand"].cache_key + ".")
    # a broken folder (an older version's leftover: no manifest) is set aside and replaced
    (folder / "manifest.json").unlink()
    third = runner.run(pipeline)
    assert third.steps["copy"].status == "succeeded" and (folder / "manifest.json").is_file()
    assert leftovers(tmp_path / "root") == []


@pytest.mark.slow
def test_two_servo_train_at_once_on_one_work_folder(tmp_path: Path) -> None:
    url, work = f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "w"
    log = tmp_path / "train.log"
    for trial in range(3):  # --no-cache: both compute and publish every step's folder
        pair = [train(url, work, "--no-cache", log=log) for _ in range(2)]
        try:
            codes = [process.wait(timeout=300) for process in pair]
        finally:
            for process in pair:
                kill(process)
        assert codes == [0, 0], f"trial {trial}: {codes}\n{log.read_text()}"
    runs = query(tmp_path / "r.db", "SELECT status FROM pipeline_runs")
    assert [r["status"] for r in runs] == ["succeeded"] * 6
    check_invariants(tmp_path / "r.db", work)


# 21: the seeded fault test


KILLS, PARALLEL, SEED = 25, 3, 21


@pytest.mark.slow
@pytest.mark.timeout(600)  # bounded: 25 kills, each process killed or waited for
def test_kill_9_at_random_points_keeps_the_registry_true(tmp_path: Path) -> None:
    """kill -9 `servo train` (3 at a time, one work folder and registry) at 25 seeded random
    points within the window measured on an unkilled run: half after the run started, half
    after it reserved its version. Then `servo runs list` (the recovery check) and the
    invariants; the figures (where the kills landed) are printed."""
    db, work, log = tmp_path / "r.db", tmp_path / "w", tmp_path / "train.log"
    url = f"sqlite:///{db}"
    # calibration on runs that are not killed, PARALLEL at once like the victims (their
    # ingest steps race to publish one cache folder)
    calibration = [train(url, work, "--seed", str(1000 + i), log=log) for i in range(PARALLEL)]
    pipeline_s = timed(calibration, db, "started", "reserved")
    assert run_cli("deploy", "digits", "--champion", "1", "--registry", url).returncode == 0
    aliases = RegistryStore(url)
    aliases.set_alias("digits", "champion", 1, actor="ops")  # the seeds compare with it
    aliases.close()
    register_s = timed([train(url, work, "--name", "cal", log=log)], db, "reserved", "finished")
    rng = random.Random(SEED)
    plans = [
        ("after run start", rng.uniform(0.0, pipeline_s)) if i % 2 else
        ("after reserve", rng.uniform(0.0, register_s))
        for i in range(KILLS)
    ]  # fmt: skip
    landed = kill_at(plans, url, db, work, log, PARALLEL)
    figures: dict[str, object] = {
        "windows_s": {"run_start_to_reserve": round(pipeline_s, 2),
                      "reserve_to_finish": round(register_s, 3)},
        "kills": dict(sorted(landed.items())),
    }  # fmt: skip
    listed = run_cli("runs", "list", "--limit", "100", "--registry", url)  # the recovery check
    assert listed.returncode == 0 and "\trunning\t" not in listed.stdout, listed.stdout
    figures["invariants"] = check_invariants(db, work)
    print(json.dumps(figures, indent=2))
    assert any(k.startswith(("4 ", "5 ")) for k in landed), figures  # the window was hit
    failed = query(db, "SELECT model, version FROM model_versions WHERE NOT servable")
    assert failed, figures
    refused = run_cli("deploy", failed[0]["model"], "--champion", str(failed[0]["version"]),
                      "--registry", url)  # fmt: skip
    assert refused.returncode != 0 and "is not servable" in refused.stderr
    assert train(url, work, "--seed", "999", log=log).wait(timeout=300) == 0  # still usable
    check_invariants(db, work)
