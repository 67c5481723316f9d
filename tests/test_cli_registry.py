"""`servo models` and `servo runs` read a real registry (SQLite here)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from registry.store import RegistryStore
from servo.cli import main


def test_models_and_runs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    store = RegistryStore(url)
    store.create_schema()
    run = store.start_run("digits", "manual", {"seed": 0})
    store.record_step(run, "train", status="succeeded", cache_key="k1", duration_s=0.5)
    store.record_artifact(run, "export", name="model", direction="output", uri="file:///m",
                          content_hash="sha256:ab", size=3)  # fmt: skip
    store.finish_run(run, "succeeded")
    store.register_version("digits", "file:///m", {"accuracy": 0.97}, run_id=run)
    store.set_alias("digits", "champion", 1, actor="ops")
    store.close()
    runner = CliRunner()
    listed = runner.invoke(main, ["models", "list", "--registry", url])
    assert listed.exit_code == 0, listed.output
    assert listed.output.split("\t")[:3] == ["digits", "versions=1", "latest=1"]
    assert "champion=1" in listed.output
    shown = runner.invoke(main, ["models", "show", "digits", "1", "--registry", url])
    doc = json.loads(shown.output)
    assert doc["metrics"] == {"accuracy": 0.97}
    assert doc["lineage"]["steps"][0]["cache_key"] == "k1"
    assert doc["lineage"]["artifacts"][0]["content_hash"] == "sha256:ab"
    whole = json.loads(runner.invoke(main, ["models", "show", "digits", "--registry", url]).output)
    assert whole["aliases"] == {"champion": 1} and len(whole["versions"]) == 1
    missing = runner.invoke(main, ["models", "show", "nope", "--registry", url])
    assert missing.exit_code != 0 and "not registered" in missing.output
    runs = runner.invoke(main, ["runs", "list", "--registry", url])
    assert runs.output.startswith(f"{run}\tdigits\tsucceeded\tmanual")
    one = json.loads(runner.invoke(main, ["runs", "show", str(run), "--registry", url]).output)
    assert one["status"] == "succeeded" and one["steps"][0]["step"] == "train"
    assert runner.invoke(main, ["runs", "show", "99", "--registry", url]).exit_code != 0
