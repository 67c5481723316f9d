"""The README's routing claims on a running server (`servo serve --routes`): an invalid
routes file is ignored and a champion that fails to load leaves the old route serving;
canary stickiness by the `servo-routing-key` gRPC metadata; shadow answers in the payload
log (variant `shadow`)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import orjson
import pytest

from monitors.payload_log import PREDICTIONS, read_window, tensor_array
from serving import grpc_codec
from serving.grpc_stubs import pb_grpc
from servo.demo import digits_holdout
from tests.clients import request_of
from tests.models import identity_model, write_model
from tests.servers import RunningServer, start_server
from tests.test_protocol import digits_input
from tests.test_routing import dep, metric, versions_answering, wait_until, write_routes

ROUTING_KEY = "servo-routing-key"


@pytest.fixture(scope="module")
def root(model_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("claims")
    (root / "digits").mkdir()
    for version in ("1", "2"):
        os.symlink(model_root / "digits" / version, root / "digits" / version)
    # a version whose servo.json is fine and whose model.onnx is not an ONNX model
    broken = write_model(root / "digits" / "7", identity_model("FP32"), "digits", version="7")
    (broken / "model.onnx").write_bytes(b"\x08\x07not an ONNX model")
    return root


@pytest.fixture(scope="module")
def routed(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    logs = tmp_path_factory.mktemp("claims-server")
    routes = root / "routes.json"
    write_routes(routes, [{"name": "digits", "champion": dep(root, "1")}])
    server = start_server(
        ["--routes", str(routes)],
        logs / "server.log",
        wait_for=["digits"],
        env={"SERVO_ROUTES_POLL_S": "0.05", "SERVO_PAYLOAD_LOG_DIR": str(logs / "log"),
             "SERVO_PAYLOAD_LOG_FLUSH_S": "0.1"},
    )  # fmt: skip
    yield server
    assert server.stop() == 0, server.log()


def only(server: RunningServer, version: str, n: int = 20) -> bool:
    return versions_answering(server, n) == Counter({version: n})


def test_an_invalid_routes_file_and_a_broken_champion_leave_the_old_route_serving(
    routed: RunningServer, root: Path
) -> None:
    server, routes = routed, root / "routes.json"
    write_routes(routes, [{"name": "digits", "champion": dep(root, "1")}])
    wait_until(lambda: only(server, "1"))
    # not JSON, then JSON that is not a route table (a champion without a path)
    bad = ['{"models": [', '{"models": [{"name": "digits", "champion": {"version": "2"}}]}']
    for refused, text in enumerate(bad, start=server.log().count("routes not applied") + 1):
        tmp = routes.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, routes)
        wait_until(lambda n=refused: server.log().count("routes not applied") == n)
        assert only(server, "1")  # ignored: version 1 keeps answering
    # a champion that fails to load: the old route keeps serving, the failure is reported
    write_routes(routes, [{"name": "digits", "champion": dep(root, "7")}])
    wait_until(lambda: "champion version 7 is not ready; version 1 keeps serving" in server.log())
    assert only(server, "1", 50)
    reply = httpx.get(f"{server.url}/v2/models/digits/versions/7/ready")
    assert reply.status_code != 200
    # the watcher is still alive: a valid file is applied
    write_routes(routes, [{"name": "digits", "champion": dep(root, "2")}])
    wait_until(lambda: only(server, "2"))


def grpc_versions(stub: pb_grpc.GRPCInferenceServiceStub, key: str, n: int) -> set[str]:
    """The versions that answered `n` gRPC requests (distinct request ids) with `key`."""
    rows, _ = digits_holdout()
    seen = set()
    for i in range(n):
        request = request_of(digits_input(rows[:1]), id=f"{key}-request-{i}")
        message = grpc_codec.encode_request(request, "digits", raw=True)
        reply = stub.ModelInfer(message, metadata=[(ROUTING_KEY, key)], timeout=30)
        seen.add(reply.model_version)
    return seen


def test_canary_is_sticky_per_grpc_routing_key(routed: RunningServer, root: Path) -> None:
    server, routes = routed, root / "routes.json"
    write_routes(routes, [{"name": "digits", "champion": dep(root, "1"),
                           "canary": dep(root, "2", percent=30)}])  # fmt: skip
    wait_until(lambda: versions_answering(server, 40)["2"] > 0)
    by_key = {}
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for k in range(40):
            key = f"grpc-user-{k}"
            versions = grpc_versions(stub, key, 3)
            assert len(versions) == 1, (key, versions)  # sticky although the ids differ
            by_key[key] = versions.pop()
    # the same split as the REST header of the same name
    assert {k: versions_answering(server, 1, key=k).most_common(1)[0][0] for k in by_key} == by_key
    shares = Counter(by_key.values())
    assert shares["1"] > 0 and shares["2"] > 0, shares  # both sides of a 30% split (0.7**40)


def test_shadow_answers_are_in_the_payload_log(routed: RunningServer, root: Path) -> None:
    server, routes = routed, root / "routes.json"
    write_routes(routes, [{"name": "digits", "champion": dep(root, "1"),
                           "shadows": [dep(root, "2")]}])  # fmt: skip
    rows, _ = digits_holdout()
    direct = {}
    with httpx.Client(base_url=server.url, timeout=30) as client:

        def shadowed() -> bool:  # the table with the shadow is in force
            client.post("/v2/models/digits/infer", content=body(rows[0], "probe"))
            return metric(server, "servo_shadow_agreement_total", version="2") > 0

        wait_until(shadowed)
        for i in range(20):
            answer = client.post("/v2/models/digits/infer", content=body(rows[i], f"shadowed-{i}"))
            assert answer.status_code == 200 and answer.json()["model_version"] == "1"
            # what version 2 answers for the same row, asked directly
            reply = client.post(
                "/v2/models/digits/versions/2/infer", content=body(rows[i], f"direct-{i}")
            )
            direct[f"shadowed-{i}"] = {o["name"]: o["data"] for o in reply.json()["outputs"]}
    log = server.log_path.parent / "log"

    def logged() -> list[dict[str, object]]:
        table = read_window(log, table=PREDICTIONS, model="digits")
        return [r for r in table.to_pylist() if str(r["id"]).startswith("shadowed-")]

    wait_until(lambda: sum(r["variant"] == "shadow" for r in logged()) == 20)
    by_variant = Counter((r["variant"], r["version"]) for r in logged())
    assert by_variant == Counter({("champion", "1"): 20, ("shadow", "2"): 20}), by_variant
    for row in logged():
        if row["variant"] != "shadow":
            continue
        outputs = {t["name"]: tensor_array(t) for t in row["outputs"]}  # type: ignore[attr-defined]
        want = direct[str(row["id"])]
        assert outputs["label"].tolist() == want["label"]
        np.testing.assert_allclose(
            outputs["probabilities"].ravel(), want["probabilities"], rtol=1e-6
        )
        index = int(str(row["id"]).split("-")[1])
        (features,) = row["inputs"]  # type: ignore[misc]
        np.testing.assert_array_equal(tensor_array(features), rows[index : index + 1])


def body(row: np.ndarray, ident: str) -> bytes:
    return orjson.dumps(
        {"id": ident, "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                  "data": row.tolist()}]}
    )  # fmt: skip
