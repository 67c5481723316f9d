"""Issue 9, section E: a route's batching applied on a running server (and bad values
refused), readiness that one bad candidate cannot take away, model folders other users
can read, and `servo train` refusing a bad name before any work."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from registry.store import RegistryStore
from serving.batcher import BatchingConfig
from serving.model_folder import CARD_FILE, MODEL_FILE, read_card
from serving.routes import RouteError, parse_routes
from servo.cli import main
from servo.demo import digits_holdout, export_digits
from servo.train import train
from tests.models import identity_model, write_model
from tests.servers import RunningServer, start_server

DIGITS = orjson.dumps(
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                 "data": digits_holdout()[0][0].tolist()}]}
)  # fmt: skip
MLP = orjson.dumps(
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": [0.5] * 784}]}
)


def write_routes(path: Path, models: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"models": models}))
    os.replace(tmp, path)


def samples(server: RunningServer, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def merged_calls(server: RunningServer, model: str) -> float:
    """ONNX Runtime calls of `model` that ran more than one row (each request has one)."""
    calls = samples(server, "servo_batch_rows_count", model=model)
    single = samples(server, "servo_batch_rows_bucket", model=model, le="1.0")
    return calls - single


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def burst(server: RunningServer, model: str, body: bytes, n: int = 32) -> None:
    """`n` requests at once; every one must be answered 200."""

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            replies = await asyncio.gather(
                *(client.post(f"/v2/models/{model}/infer", content=body) for _ in range(n))
            )
        return [r.status_code for r in replies]

    assert asyncio.run(run()) == [200] * n


def applied(server: RunningServer, n: int) -> bool:
    return f"routes applied ({n})" in server.log()


# 22: a route's batching


def test_route_batching_values() -> None:
    server = BatchingConfig(enabled=None, max_rows=64, max_delay_us=2000.0)

    def batching(value: object) -> BatchingConfig | None:
        """The batching a route with this value gets on that server."""
        doc = {"models": [{"name": "digits", "champion": {"version": "1", "path": "d/1"},
                           "batching": value}]}  # fmt: skip
        override = parse_routes(json.dumps(doc), Path("/srv")).models["digits"].batching
        return None if override is None else override.over(server)

    assert batching(None) is None  # the server's
    assert batching(False) == BatchingConfig(False, 64, 2000.0)
    assert batching(True) == BatchingConfig(True, 64, 2000.0)
    # an object turns batching on; what it leaves out stays the server's
    assert batching({"max_rows": 8}) == BatchingConfig(True, 8, 2000.0)
    assert batching({"max_delay_us": 0}) == BatchingConfig(True, 64, 0.0)
    assert batching({"enabled": False}) == BatchingConfig(False, 64, 2000.0)
    for bad, says in [
        ("garbage", "batching must be true, false or an object"),
        (1, "batching must be true, false or an object"),
        ([], "batching must be true, false or an object"),
        ({"enabled": "yes"}, "enabled must be true or false"),
        ({"max_rows": 0}, "max_rows must be an integer >= 1"),
        ({"max_rows": 2.5}, "max_rows must be an integer >= 1"),
        ({"max_delay_us": -1}, "max_delay_us must be a number of microseconds >= 0"),
        ({"max_delay_us": True}, "max_delay_us must be a number of microseconds >= 0"),
        ({"rows": 4}, "not rows"),
    ]:
        with pytest.raises(RouteError) as raised:
            batching(bad)
        assert "model 'digits'" in str(raised.value) and says in str(raised.value), bad


@pytest.fixture
def batch_server(model_root: Path, tmp_path: Path) -> Iterator[tuple[RunningServer, Path]]:
    routes = tmp_path / "routes.json"
    write_routes(routes, [
        # the server batches everything (SERVO_BATCHING=on); digits: its own max_rows, the
        # server's delay; mlp: off
        {"name": "digits", "champion": {"version": "1", "path": str(model_root / "digits/1")},
         "batching": {"max_rows": 16}},
        {"name": "mlp", "champion": {"version": "1", "path": str(model_root / "mlp/1")},
         "batching": False},
    ])  # fmt: skip
    server = start_server(
        ["--routes", str(routes)], tmp_path / "server.log", wait_for=["digits", "mlp"],
        env={"SERVO_ROUTES_POLL_S": "0.05", "SERVO_BATCHING": "on",
             "SERVO_BATCH_MAX_DELAY_US": "50000"},
    )  # fmt: skip
    yield server, routes
    assert server.stop() == 0, server.log()


def test_route_batching_on_a_running_server(
    batch_server: tuple[RunningServer, Path], model_root: Path
) -> None:
    server, routes = batch_server
    # batching on for digits: concurrent requests merge into calls of several rows
    for _ in range(20):
        burst(server, "digits", DIGITS)
        if merged_calls(server, "digits") > 0:
            break
    assert merged_calls(server, "digits") > 0
    # off for mlp although the server batches: every call runs one request
    for _ in range(3):
        burst(server, "mlp", MLP)
    assert samples(server, "servo_batch_rows_count", model="mlp") >= 96
    assert merged_calls(server, "mlp") == 0

    # a new table turns digits' batching off while it serves
    champion = {"version": "1", "path": str(model_root / "digits/1")}
    write_routes(routes, [{"name": "digits", "champion": champion, "batching": False}])
    wait_until(lambda: applied(server, 2))
    before = merged_calls(server, "digits")
    for _ in range(3):
        burst(server, "digits", DIGITS)
    assert merged_calls(server, "digits") == before

    # an invalid value: the file is refused (the log names the model), the table stays
    write_routes(routes, [{"name": "digits", "champion": champion, "batching": "garbage"}])
    wait_until(lambda: "routes not applied" in server.log())
    line = next(ln for ln in server.log().splitlines() if "routes not applied" in ln)
    assert "model 'digits'" in line and "batching must be" in line, line
    assert not applied(server, 3)
    burst(server, "digits", DIGITS)
    assert merged_calls(server, "digits") == before
    assert httpx.get(f"{server.url}/v2/models/mlp/ready").status_code == 404  # table 2 holds


# 23: readiness


@pytest.fixture
def broken_versions(model_root: Path, tmp_path: Path) -> Path:
    """digits v2 with a corrupt model.onnx, v3 without one, model 'bad' v1 corrupt."""
    root = tmp_path / "models"
    corrupt = write_model(root / "digits" / "2", identity_model("FP32"), "digits", version="2")
    (corrupt / MODEL_FILE).write_bytes(b"\x08\x07not a protobuf of an ONNX model")
    missing = write_model(root / "digits" / "3", identity_model("FP32"), "digits", version="3")
    (missing / MODEL_FILE).unlink()
    bad = write_model(root / "bad" / "1", identity_model("FP32"), "bad")
    (bad / MODEL_FILE).write_bytes(b"\x08\x07not a protobuf of an ONNX model")
    return root


def test_ready_while_every_champion_serves(
    model_root: Path, broken_versions: Path, tmp_path: Path
) -> None:
    routes = tmp_path / "routes.json"
    digits = {
        "name": "digits",
        "champion": {"version": "1", "path": str(model_root / "digits/1")},
        "canary": {"version": "2", "path": str(broken_versions / "digits/2"), "percent": 50},
        "shadows": [{"version": "3", "path": str(broken_versions / "digits/3")}],
    }
    write_routes(routes, [digits])
    server = start_server(
        ["--routes", str(routes)], tmp_path / "server.log", wait_for=["digits"],
        env={"SERVO_ROUTES_POLL_S": "0.05"},
    )  # fmt: skip
    try:
        url = server.url
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
        assert httpx.get(f"{url}/v2/models/digits/ready").status_code == 200
        assert httpx.get(f"{url}/v2/models/digits/versions/1/ready").status_code == 200
        for version, says in (("2", "not a valid ONNX model"), ("3", "cannot read")):
            reply = httpx.get(f"{url}/v2/models/digits/versions/{version}/ready")
            assert reply.status_code == 503
            doc = reply.json()
            assert doc["ready"] is False and doc["name"] == "digits"
            assert doc["reason"].startswith(f"version {version} is failed: "), doc
            assert says in doc["reason"], doc
            failures = "servo_model_load_failures_total"
            assert samples(server, failures, model="digits", version=version) == 1
        assert samples(server, "servo_model_load_failures_total", model="digits", version="1") == 0
        # the champion answers everyone: the failed canary takes no traffic
        for i in range(20):
            reply = httpx.post(f"{url}/v2/models/digits/infer", content=DIGITS,
                               headers={"servo-routing-key": f"user-{i}"})  # fmt: skip
            assert reply.status_code == 200 and reply.json()["model_version"] == "1"

        # a routed model whose champion fails to load: the server is not ready
        bad = {"name": "bad", "champion": {"version": "1", "path": str(broken_versions / "bad/1")}}
        write_routes(routes, [digits, bad])
        wait_until(lambda: applied(server, 2))
        assert httpx.get(f"{url}/v2/health/ready").status_code == 503
        reply = httpx.get(f"{url}/v2/models/bad/ready")
        assert reply.status_code == 503 and "not a valid ONNX model" in reply.json()["reason"]
        assert samples(server, "servo_model_load_failures_total", model="bad", version="1") == 1
        # the failed versions were tried again with the new table, and counted again
        assert samples(server, "servo_model_load_failures_total", model="digits", version="2") == 2
        # and ready again once the table no longer routes it
        write_routes(routes, [digits])
        wait_until(lambda: applied(server, 3))
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    finally:
        assert server.stop() == 0, server.log()


def test_a_corrupt_champion_makes_the_server_unready(
    model_root: Path, broken_versions: Path, tmp_path: Path
) -> None:
    routes = tmp_path / "routes.json"
    write_routes(routes, [
        {"name": "digits", "champion": {"version": "2", "path": str(broken_versions / "digits/2")},
         "others": [{"version": "1", "path": str(model_root / "digits/1")}]},
    ])  # fmt: skip
    server = start_server(["--routes", str(routes)], tmp_path / "server.log")
    try:
        wait_until(lambda: applied(server, 1))
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 503
        assert httpx.get(f"{server.url}/v2/models/digits/ready").status_code == 503
        assert httpx.get(f"{server.url}/v2/models/digits/versions/1/ready").status_code == 200
    finally:
        assert server.stop() == 0, server.log()


# 24: model folders other users can read


def test_model_folders_are_world_readable(tmp_path: Path) -> None:
    old = os.umask(0o077)  # what mkstemp always does, and a strict umask too
    try:
        folder = tmp_path / "digits" / "1"
        export_digits(folder, version="1", seed=0)
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert stat.S_IMODE((folder / CARD_FILE).stat().st_mode) == 0o644
    assert stat.S_IMODE((folder / MODEL_FILE).stat().st_mode) == 0o644
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []
    assert read_card(folder).version == "1"


def test_registered_versions_are_world_readable(tmp_path: Path) -> None:
    store = RegistryStore(f"sqlite:///{tmp_path / 'r.db'}")
    store.create_schema()
    old = os.umask(0o022)
    try:
        trained = train(store, work=tmp_path / "w", params={"max_iter": 20})
    finally:
        os.umask(old)
        store.close()
    assert stat.S_IMODE(trained.folder.stat().st_mode) == 0o755
    for name in (CARD_FILE, MODEL_FILE):
        assert stat.S_IMODE((trained.folder / name).stat().st_mode) == 0o644, name


# 25: names checked before any work


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "", "x" * 200])
def test_train_refuses_a_bad_name_before_any_work(tmp_path: Path, name: str) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    work = tmp_path / "w"
    result = CliRunner().invoke(
        main, ["train", "--name", name, "--registry", url, "--work-dir", str(work)]
    )
    assert result.exit_code == 2, result.output
    assert "Invalid value for --name" in result.output
    assert f"invalid model name {name!r}" in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert not work.exists() and not (tmp_path / "evil").exists()
    store = RegistryStore(url)
    store.create_schema()
    try:
        assert store.runs() == []
        with pytest.raises(ValueError, match="invalid model name"):
            train(store, work=work, name=name)
        assert store.runs() == [] and not work.exists()
    finally:
        store.close()


def test_a_flattened_feature_width_error_is_unchanged(server: RunningServer) -> None:
    """Models of rows take only their own shape (the flattened form is for image inputs)."""
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 8, 8],
                        "data": np.zeros(64).tolist()}]}  # fmt: skip
    reply = httpx.post(f"{server.url}/v2/models/digits/infer", json=body)
    assert reply.status_code == 400
    assert reply.json()["error"] == (
        "input 'input': expected shape [-1, 64] (-1: any size), got [1, 8, 8]"
    )
