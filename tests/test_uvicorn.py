"""`SERVO_HTTP_SERVER=uvicorn`: the REST half of the OIP conformance suite
(tests/test_protocol.py, JSON and binary) against the same models behind uvicorn."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.clients import RestClient
from tests.conftest import good_folders
from tests.models import ONNX_TYPES
from tests.servers import RunningServer, start_server

# the suite's tests, collected here again: they run with this module's `server` and
# `client` fixtures below
from tests.test_protocol import (  # noqa: F401
    test_bad_requests_get_precise_errors,
    test_every_datatype_round_trips,
    test_infer_matches_onnx_runtime_for_each_version,
    test_metadata_from_the_onnx_graph,
    test_model_ready,
    test_non_finite_allowed_where_the_card_says_so,
    test_request_id_is_echoed_or_generated,
    test_requested_outputs_only,
    test_two_inputs_and_missing_input,
)


@pytest.fixture(scope="module")
def server(model_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """conftest's server (every model, the broken ones included, an 8 MiB body limit),
    its REST port served by uvicorn."""
    running = start_server(
        [*good_folders(model_root), model_root / "corrupt" / "1", model_root / "missing" / "1"],
        tmp_path_factory.mktemp("uvicorn") / "server.log",
        wait_for=["digits", "mlp", "pair", *(f"identity_{d.lower()}" for d in ONNX_TYPES)],
        env={"SERVO_HTTP_SERVER": "uvicorn", "SERVO_MAX_REQUEST_BYTES": str(8 * 1024 * 1024)},
    )
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture(params=["rest-json", "rest-binary"])
def client(request: pytest.FixtureRequest, server: RunningServer) -> Iterator[RestClient]:
    made = RestClient(server.url, binary=request.param == "rest-binary")
    yield made
    made.close()


def test_uvicorn_is_the_one_answering(server: RunningServer) -> None:
    reply = httpx.get(f"{server.url}/v2/health/live")
    assert reply.status_code == 200 and reply.headers.get("server") == "uvicorn", reply.headers
