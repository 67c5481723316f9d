"""EmbeddedDeployer over a real registry (SQLite): the route table is the deployment."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry.store import RegistryStore
from servo.deploy import DeployError, EmbeddedDeployer, Target


def test_the_route_table_is_the_deployment(tmp_path: Path) -> None:
    store = RegistryStore(f"sqlite:///{tmp_path / 'r.db'}")
    store.create_schema()
    try:
        for version in (1, 2, 3):
            folder = tmp_path / "digits" / str(version)
            assert store.register_version("digits", folder.as_uri()) == version
        store.set_deployments("digits", [(1, "champion", 100.0), (2, "shadow", 100.0)], actor="ops")
        d = EmbeddedDeployer(store, gateway_url="http://127.0.0.1:8080/")
        assert [(v.version, v.ready) for v in d.versions("digits")] == [(1, True), (2, True)]
        assert d.wait_ready("digits", 2, timeout=1).url == (
            "http://127.0.0.1:8080/v2/models/digits/versions/2"
        )
        assert d.versions("other") == []
        with pytest.raises(DeployError, match="version 3 is not in the route table") as info:
            d.apply(Target("digits", 3, (tmp_path / "digits" / "3").as_uri()))
        assert info.value.status == 404
        with pytest.raises(DeployError, match="version 1 is routed") as info:
            d.delete("digits", 1)
        assert info.value.status == 409
        d.delete("digits", 3)  # not routed: nothing runs it
    finally:
        store.close()
