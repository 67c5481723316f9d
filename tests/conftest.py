from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from servo.demo import export_digits, export_medium_mlp
from tests.models import ONNX_TYPES, identity_model, two_input_model, write_model
from tests.servers import RunningServer, start_server


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real model version folders: digits v1 and v2, an identity model per datatype,
    a two-input model, a corrupt one and one without model.onnx."""
    root = tmp_path_factory.mktemp("models")
    export_digits(root / "digits" / "1", version="1", seed=0)
    export_digits(root / "digits" / "2", version="2", seed=1)
    export_medium_mlp(root / "mlp" / "1")
    for datatype in ONNX_TYPES:
        write_model(
            root / f"identity_{datatype.lower()}" / "1",
            identity_model(datatype),
            f"identity_{datatype.lower()}",
            allow_non_finite=["x"] if datatype == "FP64" else [],
        )
    write_model(root / "pair" / "1", two_input_model(), "pair")
    corrupt = write_model(root / "corrupt" / "1", identity_model("FP32"), "corrupt")
    (corrupt / "model.onnx").write_bytes(b"\x08\x07this is not a protobuf of an ONNX model")
    missing = write_model(root / "missing" / "1", identity_model("FP32"), "missing")
    (missing / "model.onnx").unlink()
    return root


def good_folders(root: Path) -> list[Path]:
    return sorted(
        p / v
        for p in root.iterdir()
        if p.name not in {"corrupt", "missing"}
        for v in [x.name for x in p.iterdir()]
    )


@pytest.fixture(scope="session")
def server(model_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One real server with every model, the broken ones included, and a small body limit."""
    folders = [
        *good_folders(model_root),
        model_root / "corrupt" / "1",
        model_root / "missing" / "1",
    ]
    running = start_server(
        folders,
        tmp_path_factory.mktemp("logs") / "server.log",
        wait_for=["digits", "mlp", "pair", *(f"identity_{d.lower()}" for d in ONNX_TYPES)],
        env={"SERVO_MAX_REQUEST_BYTES": str(8 * 1024 * 1024)},
    )
    yield running
    assert running.stop() == 0, running.log()
