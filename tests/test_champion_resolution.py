"""Which version `servo monitor MODEL` watches without --version, with two registered
versions so that each rule is told apart from the others: the champion alias, else the
deployed champion, else the latest version. The alias and the deployment point at the
lower version; the latest is the higher one."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from registry.store import RegistryStore
from servo.cli import main
from tests.servers import free_port


def registry(tmp_path: Path, model_root: Path, alias: int | None, deployed: int | None) -> str:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    store = RegistryStore(url)
    store.create_schema()
    try:
        for version in (1, 2):  # the model folders' own servo.json say 1 and 2
            folder = model_root / "digits" / str(version)
            assert store.register_version("digits", folder.resolve().as_uri()) == version
        if alias is not None:
            store.set_alias("digits", "champion", alias, actor="ops")
        if deployed is not None:
            store.set_deployments("digits", [(deployed, "champion", 100.0)], actor="ops")
    finally:
        store.close()
    return url


@pytest.mark.parametrize(
    ("alias", "deployed", "watched"),
    [
        (1, 2, "1"),  # the alias wins over the deployment and the latest
        (None, 1, "1"),  # no alias: the deployed champion, not the latest
        (None, None, "2"),  # neither: the latest version
    ],
    ids=["alias", "deployed-champion", "latest"],
)
def test_servo_monitor_watches_the_champion(
    tmp_path: Path, model_root: Path, alias: int | None, deployed: int | None, watched: str
) -> None:
    url = registry(tmp_path, model_root, alias, deployed)
    down = f"http://127.0.0.1:{free_port()}"  # no Prometheus: exit 2, the version still named
    result = CliRunner().invoke(main, ["monitor", "digits", "--registry", url, "--source", down])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"digits version {watched}: UNAVAILABLE"), result.output
    # --version overrides every rule
    other = "2" if watched == "1" else "1"
    named = CliRunner().invoke(
        main, ["monitor", "digits", "--version", other, "--registry", url, "--source", down]
    )
    assert named.output.startswith(f"digits version {other}: UNAVAILABLE"), named.output
