"""The registry's deployments as the gateway's route table: `servo deploy`, and
`servo serve --from-registry` following the changes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import httpx
import orjson
from click.testing import CliRunner

from registry.store import RegistryStore
from servo.cli import main
from servo.demo import digits_holdout
from servo.train import train
from tests.servers import start_server
from tests.test_routing import wait_until

BODY = orjson.dumps(
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                 "data": digits_holdout()[0][0].tolist()}]}
)  # fmt: skip


def answered(url: str, n: int = 40) -> Counter[str]:
    seen: Counter[str] = Counter()
    with httpx.Client(base_url=url, timeout=10) as client:
        for i in range(n):
            reply = client.post("/v2/models/digits/infer", content=BODY,
                                headers={"servo-routing-key": f"k{i}"})  # fmt: skip
            assert reply.status_code == 200, reply.text
            seen[reply.json()["model_version"]] += 1
    return seen


def test_serving_follows_the_registry(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    store = RegistryStore(url)
    store.create_schema()
    train(store, work=tmp_path / "w")
    train(store, work=tmp_path / "w", params={"seed": 1})
    store.close()
    cli = CliRunner()

    def deploy(*args: str) -> str:
        result = cli.invoke(main, ["deploy", "digits", *args, "--registry", url, "--actor", "ops"])
        assert result.exit_code == 0, result.output
        return result.output

    assert deploy("--champion", "1") == "digits: champion 1 (100%)\n"
    server = start_server(
        ["--from-registry"], tmp_path / "server.log", wait_for=["digits"],
        env={"SERVO_REGISTRY_URL": url, "SERVO_ROUTES_POLL_S": "0.1"},
    )  # fmt: skip
    try:
        assert answered(server.url) == Counter({"1": 40})
        deploy("--champion", "2", "--canary", "1", "--percent", "50")
        wait_until(lambda: set(answered(server.url)) == {"1", "2"})
        deploy("--champion", "2")
        wait_until(lambda: answered(server.url) == Counter({"2": 40}))
        bad = cli.invoke(main, ["deploy", "digits", "--champion", "9", "--registry", url])
        assert bad.exit_code != 0 and "has no version 9" in bad.output
        assert answered(server.url, 5) == Counter({"2": 5})  # a refused deploy changes nothing
    finally:
        assert server.stop() == 0, server.log()
    store = RegistryStore(url)
    deploys = [a for a in store.audit() if a["action"] == "deploy"]
    assert len(deploys) == 3 and deploys[-1]["actor"] == "ops"
    assert deploys[-1]["rollback"] == {"deployments": [[1, "canary", 50.0], [2, "champion", 100.0]]}
    store.close()
