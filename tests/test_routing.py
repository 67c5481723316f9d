"""Champion/canary/shadow routing from a routes file, swapped at run time under load."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from servo.demo import digits_holdout
from tests.models import failing_model, slow_model, write_model
from tests.servers import RunningServer, start_server


def write_routes(path: Path, models: list[dict[str, Any]]) -> None:
    """Atomically, as an operator's tool should."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"models": models}))
    os.replace(tmp, path)


def dep(
    root: Path, version: str, percent: float | None = None, name: str = "digits"
) -> dict[str, Any]:
    out: dict[str, Any] = {"version": version, "path": str(root / name / version)}
    if percent is not None:
        out["percent"] = percent
    return out


@pytest.fixture(scope="module")
def routed_root(model_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("routed")
    for version in ("1", "2"):
        (root / "digits").mkdir(exist_ok=True)
        os.symlink(model_root / "digits" / version, root / "digits" / version)
    write_model(root / "digits" / "8", failing_model(), "digits", version="8")
    write_model(root / "digits" / "9", slow_model(), "digits", version="9")
    return root


@pytest.fixture
def routed(routed_root: Path, tmp_path: Path) -> Iterator[tuple[RunningServer, Path]]:
    routes = tmp_path / "routes.json"
    write_routes(routes, [{"name": "digits", "champion": dep(routed_root, "1")}])
    server = start_server(
        ["--routes", str(routes)],
        tmp_path / "server.log",
        wait_for=["digits"],
        env={"SERVO_ROUTES_POLL_S": "0.05", "SERVO_SHADOW_TIMEOUT_S": "0.1",
             "SERVO_SHADOW_MAX_PENDING": "4"},
    )  # fmt: skip
    yield server, routes
    assert server.stop() == 0, server.log()


BODY = orjson.dumps(
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                 "data": digits_holdout()[0][0].tolist()}]}
)  # fmt: skip


def metric(server: RunningServer, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def wait_until(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def versions_answering(server: RunningServer, n: int, key: str | None = None) -> Counter[str]:
    seen: Counter[str] = Counter()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for i in range(n):
            headers = {"servo-routing-key": key if key is not None else f"user-{i}"}
            reply = client.post("/v2/models/digits/infer", content=BODY, headers=headers)
            assert reply.status_code == 200, reply.text
            seen[reply.json()["model_version"]] += 1
    return seen


def test_canary_share_is_deterministic_and_sticky(
    routed: tuple[RunningServer, Path], routed_root: Path
) -> None:
    server, routes = routed
    write_routes(routes, [{"name": "digits", "champion": dep(routed_root, "1"),
                           "canary": dep(routed_root, "2", percent=30)}])  # fmt: skip
    wait_until(lambda: versions_answering(server, 40)["2"] > 0)
    seen = versions_answering(server, 1000)
    assert 250 <= seen["2"] <= 350, seen  # 30% of 1000 keys, give or take hash noise
    for key in ("alice", "bob", "carol"):
        assert len(versions_answering(server, 20, key=key)) == 1  # sticky per key
    assert metric(server, "servo_requests_total", version="2", variant="canary") >= seen["2"]
    # the same 1000 keys split the same way again
    assert versions_answering(server, 1000) == seen


def test_shadow_copies_are_compared_and_never_answer(
    routed: tuple[RunningServer, Path], routed_root: Path
) -> None:
    server, routes = routed
    write_routes(routes, [{"name": "digits", "champion": dep(routed_root, "1"),
                           "shadows": [dep(routed_root, "2")]}])  # fmt: skip
    wait_until(
        lambda: httpx.get(f"{server.url}/v2/models/digits/versions/2/ready").status_code == 200
    )
    assert versions_answering(server, 200) == Counter({"1": 200})
    # every copy is either compared or (past SERVO_SHADOW_MAX_PENDING=4) dropped and counted
    wait_until(
        lambda: (
            metric(server, "servo_shadow_agreement_total", version="2")
            + metric(server, "servo_shadow_dropped_total", model="digits")
            == 200
        )
    )
    compared = metric(server, "servo_shadow_agreement_total", version="2")
    agreed = metric(server, "servo_shadow_agreement_total", version="2", agree="true")
    assert compared >= 100
    assert agreed >= 0.95 * compared  # two digits models trained with different seeds mostly agree


def test_failing_and_slow_shadows_never_hurt_the_client(
    routed: tuple[RunningServer, Path], routed_root: Path
) -> None:
    server, routes = routed
    write_routes(routes, [{"name": "digits", "champion": dep(routed_root, "1"),
                           "shadows": [dep(routed_root, "8"), dep(routed_root, "9")]}])  # fmt: skip
    wait_until(
        lambda: httpx.get(f"{server.url}/v2/models/digits/versions/9/ready").status_code == 200
    )
    assert metric(server, "servo_shadow_dropped_total") == 0
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for _ in range(100):  # one request at a time
            reply = client.post("/v2/models/digits/infer", content=BODY)
            assert reply.status_code == 200 and reply.json()["model_version"] == "1"
    # The client never waits for a shadow, shown by counting, not timing: this client
    # sends its next request only once it has the previous answer, so had an answer waited
    # for its request's shadow copies, no copy would still be pending when the next request
    # came and none would ever be dropped. Copies were dropped: requests were answered
    # while SERVO_SHADOW_MAX_PENDING (4) earlier copies had not finished.
    assert metric(server, "servo_shadow_dropped_total", model="digits") > 0
    wait_until(lambda: metric(server, "servo_shadow_errors_total", version="8", reason="error") > 0)
    assert metric(server, "servo_shadow_errors_total", version="9", reason="timeout") > 0
    # unload both shadows while copies are still running: nothing fails
    write_routes(routes, [{"name": "digits", "champion": dep(routed_root, "1")}])
    wait_until(
        lambda: httpx.get(f"{server.url}/v2/models/digits/versions/9/ready").status_code == 404
    )
    assert versions_answering(server, 20) == Counter({"1": 20})


def test_swaps_under_load_lose_no_request(
    routed: tuple[RunningServer, Path], routed_root: Path
) -> None:
    server, routes = routed
    tables = [
        [{"name": "digits", "champion": dep(routed_root, "2")}],
        [
            {
                "name": "digits",
                "champion": dep(routed_root, "2"),
                "canary": dep(routed_root, "1", 50),
            }
        ],
        [{"name": "digits", "champion": dep(routed_root, "1"), "shadows": [dep(routed_root, "2")]}],
        [{"name": "digits", "champion": dep(routed_root, "1")}],
        [{"name": "digits", "champion": dep(routed_root, "2")}],
        [{"name": "digits", "champion": dep(routed_root, "1")}],
    ]

    # the versions a request may get once table i is in force (a canary splits, a shadow
    # never answers)
    allowed = [{"2"}, {"1", "2"}, {"1"}, {"1"}, {"2"}, {"1"}]
    per_phase = 40  # requests answered under each table before the next one is written

    async def load() -> tuple[Counter[int], dict[int, Counter[str]], list[str]]:
        codes: Counter[int] = Counter()
        #: table index -> versions that answered requests sent and answered while that
        #: table was in force (applied before the request, no newer table written yet)
        under: dict[int, Counter[str]] = {i: Counter() for i in range(len(tables))}
        failures: list[str] = []
        state = {"applied": -1, "written": -1}
        stop = asyncio.Event()
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client:

            async def worker(i: int) -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    applied = state["applied"]
                    try:
                        reply = await client.post(
                            "/v2/models/digits/infer", content=BODY,
                            headers={"servo-routing-key": f"{i}-{n}"},
                        )  # fmt: skip
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
                        continue
                    codes[reply.status_code] += 1
                    if reply.status_code != 200:
                        failures.append(reply.text)
                    elif applied >= 0 and applied == state["written"]:
                        under[applied][reply.json()["model_version"]] += 1

            async def wait_for(condition: Any) -> None:  # a hang guard, not a timer
                for _ in range(1200):
                    if await asyncio.to_thread(condition):
                        return
                    await asyncio.sleep(0.05)
                raise AssertionError("condition not met in time")

            workers = [asyncio.create_task(worker(i)) for i in range(32)]
            applied_before = server.log().count("routes applied")
            for index, table in enumerate(tables):
                state["written"] = index
                await asyncio.to_thread(write_routes, routes, table)
                # the server logs "routes applied" once the new routing state is installed
                await wait_for(
                    lambda n=applied_before + index + 1: server.log().count("routes applied") >= n
                )
                state["applied"] = index
                await wait_for(lambda i=index: sum(under[i].values()) >= per_phase)
            stop.set()
            await asyncio.gather(*workers)
        return codes, under, failures

    codes, under, failures = asyncio.run(load())
    assert failures == [] and set(codes) == {200}, (codes, failures[:5])
    for index, versions in under.items():
        assert sum(versions.values()) >= per_phase
        assert set(versions) <= allowed[index], (index, versions)
    # the last table is in force, and version 2 was unloaded after draining
    assert versions_answering(server, 10) == Counter({"1": 10})
    wait_until(
        lambda: httpx.get(f"{server.url}/v2/models/digits/versions/2/ready").status_code == 404
    )
    assert "unloaded model digits version 2" in server.log()


def test_metric_names_and_bounded_labels(routed: tuple[RunningServer, Path]) -> None:
    server, _ = routed
    versions_answering(server, 5)
    for name in ("no-such-model", "another-one"):
        assert httpx.post(f"{server.url}/v2/models/{name}/infer", content=BODY).status_code == 404
    assert httpx.post(f"{server.url}/v2/models/digits/infer", content=b"{").status_code == 400
    text = httpx.get(f"{server.url}/metrics").text
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    for expected in (
        "servo_requests_total",
        "servo_request_duration_seconds_bucket",
        "servo_inference_duration_seconds_count",
        "servo_prediction_total",
        "servo_prediction_confidence_bucket",
    ):
        assert expected in names
    assert metric(server, "servo_requests_total", model="_unknown", code="404") == 2
    assert metric(server, "servo_requests_total", model="digits", code="400") == 1
    assert 'model="no-such-model"' not in text
    assert (
        metric(server, "servo_prediction_total", model="digits", version="1", **{"class": "2"}) >= 5
    )
