"""The `servo` command starts without the serving stack or the trainers: what each command
imports is checked on `sys.modules` in a fresh interpreter (never a timer; the speed is in
benchmarks/cli_startup.py). Also: every command's --help still works, and `servo monitor`
on a model served from folders says to pass --model-dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent

#: never imported by `import servo.cli` nor by --help, --version and the registry commands
HEAVY = ("onnxruntime", "grpc", "sklearn", "onnx", "skl2onnx", "kserve", "numpy", "pyarrow",
         "sqlalchemy", "alembic", "pydantic_settings", "uvloop", "torch", "tensorflow")  # fmt: skip
#: never imported by a cached `servo train` re-run (its fast path records the run with
#: sqlite3: not even SQLAlchemy; tests/test_fast_cache.py)
TRAINERS = ("onnxruntime", "grpc", "sklearn", "onnx", "skl2onnx", "kserve", "numpy", "pyarrow",
            "torch", "tensorflow", "xgboost", "alembic", "scipy", "sqlalchemy")  # fmt: skip

PROBE = """
import json, sys
from servo.cli import main
codes = []
for args in json.loads(sys.argv[1]):
    try:
        main(args, prog_name="servo")
    except SystemExit as exc:
        codes.append(exc.code or 0)
print("\\nMODULES=" + json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
print("CODES=" + json.dumps(codes))
"""


def probe(*invocations: list[str], cwd: Path) -> tuple[set[str], str, list[object]]:
    """Run `servo ARGS` for each ARGS in one fresh interpreter (none: only import
    servo.cli): the top-level packages imported, the output and the exit codes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(invocations)], cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:]
    output, _, tail = run.stdout.rpartition("\nMODULES=")
    modules_line, _, codes_line = tail.partition("\nCODES=")
    return set(json.loads(modules_line)), output, json.loads(codes_line)


def test_importing_the_cli_imports_no_serving_stack_nor_trainers(tmp_path: Path) -> None:
    modules, _, codes = probe(cwd=tmp_path)
    assert codes == []
    assert "click" in modules and "servo" in modules  # the probe sees what was imported
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_settings_import_the_serving_stack_only_to_build_its_config(tmp_path: Path) -> None:
    code = (
        "import json, sys; from servo.settings import Settings; Settings(); "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    serving_stack = {"onnxruntime", "grpc", "kserve", "onnx", "uvloop", "pyarrow"}
    assert not set(json.loads(run.stdout)) & serving_stack
    # and serving_config() still builds the server's config
    code = "from servo.settings import Settings; print(type(Settings().serving_config()).__name__)"
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert run.stdout.strip() == "ServingConfig"


@pytest.mark.parametrize("args", [["--version"], ["--help"]])
def test_version_and_help_import_nothing_heavy(tmp_path: Path, args: list[str]) -> None:
    modules, output, codes = probe(args, cwd=tmp_path)
    assert codes == [0], output
    assert ("servo, version" in output) if args == ["--version"] else ("Usage: servo" in output)
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_models_list_imports_the_registry_only(tmp_path: Path) -> None:
    from registry.store import RegistryStore

    url = f"sqlite:///{tmp_path / 'registry.db'}"
    store = RegistryStore(url)
    store.create_schema()
    try:
        store.register_version(
            "digits", artifact_uri=(tmp_path / "digits" / "1").as_uri(), metrics={}, run_id=None
        )
    finally:
        store.close()
    modules, output, codes = probe(["models", "list", "--registry", url], cwd=tmp_path)
    assert codes == [0], output
    assert output.strip().startswith("digits\tversions=1\tlatest=1"), output
    assert "sqlalchemy" in modules
    heavy = modules & (set(HEAVY) - {"sqlalchemy"})
    assert not heavy, sorted(heavy)  # the schema is current: not even Alembic


def test_models_list_on_a_new_registry_creates_its_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new' / 'registry.db'}"
    modules, output, codes = probe(["models", "list", "--registry", url],
                                   ["models", "list", "--registry", url], cwd=tmp_path)  # fmt: skip
    assert codes == [0, 0], output
    assert "alembic" in modules  # the migrations ran (the schema was not current)
    assert (tmp_path / "new" / "registry.db").is_file()


def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = []
    for name, command in sorted(group.commands.items()):
        paths.append((*prefix, name))
        if isinstance(command, click.Group):
            paths += _command_paths(command, (*prefix, name))
    return paths


def test_help_lists_every_command_and_each_help_works(tmp_path: Path) -> None:
    from servo.cli import main

    paths = _command_paths(main)
    top = sorted({p[0] for p in paths})
    assert {"serve", "models", "runs", "train", "preprocess-images", "deploy", "pipeline",
            "step", "monitor", "export-demo", "demo"} <= set(top)  # fmt: skip
    modules, output, codes = probe(["--help"], *([*p, "--help"] for p in paths), cwd=tmp_path)
    assert codes == [0] * (len(paths) + 1), output
    listing = output.split("Commands:", 1)[1].split("Usage:", 1)[0]
    assert sorted(line.split()[0] for line in listing.strip().splitlines()) == top
    for path in paths:
        assert f"Usage: servo {' '.join(path)} [OPTIONS]" in output, path
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))  # --help runs no command


@pytest.mark.slow
def test_a_cached_train_rerun_needs_only_hashes_and_manifests(tmp_path: Path) -> None:
    """The re-run reuses every step and registers nothing new, without importing numpy,
    the trainers, ONNX or ONNX Runtime (the first run imports them: the check can fail)."""
    args = ["train", "--work-dir", str(tmp_path / "w"),
            "--registry", f"sqlite:///{tmp_path / 'registry.db'}"]  # fmt: skip
    first_modules, first, codes = probe(args, cwd=tmp_path)
    assert codes == [0], first
    assert "registered digits version 1" in first
    assert {"numpy", "sklearn", "onnx", "onnxruntime"} <= first_modules
    modules, again, codes = probe(args, cwd=tmp_path)
    assert codes == [0], again
    assert "unchanged: already registered as digits version 1" in again
    assert "ingest=cached, split=cached, train=cached, evaluate=cached" in again
    assert not modules & set(TRAINERS), sorted(modules & set(TRAINERS))


def test_monitor_on_a_model_served_from_folders_says_to_pass_model_dir(
    model_root: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    down = f"http://127.0.0.1:{free_port()}"
    _, output, codes = probe(["monitor", "digits", "--registry", url, "--source", down],
                             cwd=tmp_path)  # fmt: skip
    assert codes == [2], output  # cannot tell (not 1: drift)
    assert "model 'digits' is not registered" in output and "--model-dir" in output, output
    # following the advice finds the version (Prometheus is down: exit 2, unavailable)
    folder = str(model_root / "digits" / "1")
    _, output, codes = probe(["monitor", "digits", "--model-dir", folder, "--source", down],
                             cwd=tmp_path)  # fmt: skip
    assert codes == [2], output
    assert output.startswith("digits version 1: UNAVAILABLE"), output


@pytest.mark.slow
def test_startup_benchmark_runs(tmp_path: Path) -> None:
    """benchmarks/cli_startup.py still runs end to end (a smoke run, not a measurement)."""
    out = tmp_path / "startup.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cli_startup.py"), "--repeat", "1",
         "--train-repeat", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    commands = ["floor (python -c pass)", "--version", "--help", "models list", "train, first",
                "train, cached"]  # fmt: skip
    assert [r["command"] for r in rows] == commands
    assert all(len(r["runs_s"]) == 1 and r["median_s"] > 0 for r in rows)
    assert "cached train re-run:" in run.stdout


def test_migration_heads_read_without_alembic_agree_with_alembic(tmp_path: Path) -> None:
    from alembic.script import ScriptDirectory

    from registry.base import MIGRATIONS, _migration_heads, alembic_config
    from registry.store import RegistryStore

    store = RegistryStore(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        script = ScriptDirectory.from_config(alembic_config(store.engine))
        assert _migration_heads() == set(script.get_heads())
    finally:
        store.close()
    assert (MIGRATIONS / "versions").is_dir()
    # the forms Alembic's templates write, a merge, and a file that does not read: None
    versions = tmp_path / "versions"
    versions.mkdir()
    (versions / "a.py").write_text('revision = "a"\ndown_revision = None\n')
    (versions / "b.py").write_text('revision: str = "b"\ndown_revision: str | None = "a"\n')
    (versions / "c.py").write_text("revision = 'c'\ndown_revision = 'a'\n")
    assert _migration_heads(versions) == {"b", "c"}
    (versions / "d.py").write_text('revision = "d"\ndown_revision = ("b", "c")\n')
    assert _migration_heads(versions) == {"d"}
    (versions / "e.py").write_text("revision = make_id()\ndown_revision = 'd'\n")
    assert _migration_heads(versions) is None  # then Alembic decides
