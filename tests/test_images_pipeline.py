"""The image use case end to end: a folder of mixed images -> `servo preprocess-images`
-> uniform PNGs in the same class subfolders -> `servo train` on that folder (or on the
raw one, or on the `.npz`) -> a served CNN that takes the image tensor [N, H, W, C] and
its rows flattened."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from registry.store import RegistryStore
from retrain.images import preprocess
from serving.model_folder import read_card
from serving.types import Tensor
from servo.cli import main
from tests.clients import GrpcClient, request_of
from tests.servers import start_server

CLASSES = {0: "zero", 1: "one", 7: "seven"}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three digit classes in mixed formats, sizes and colour modes, a corrupt file, a
    text file and a nested folder."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("mixed")
    digits = load_digits()
    formats = ["PNG", "JPEG", "BMP", "GIF", "PNG"]
    n = 0
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        if label not in CLASSES:
            continue
        folder = root / CLASSES[label]
        folder.mkdir(exist_ok=True)
        pixels = Image.fromarray((image * 255 / 16).astype(np.uint8), mode="L")
        side = 12 + 4 * (n % 5)
        converted = pixels.resize((side, side)).convert(["L", "RGB", "P"][n % 3])
        fmt = formats[n % len(formats)]
        if fmt == "JPEG" and converted.mode == "P":
            converted = converted.convert("RGB")
        converted.save(folder / f"{i}.{fmt.lower()}", fmt)
        n += 1
    (root / "zero" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot the rest of a png")
    (root / "one" / "notes.txt").write_text("not an image")
    (root / "seven" / "deep").mkdir()
    Image.new("RGB", (30, 20), (200, 200, 200)).save(root / "seven" / "deep" / "grey.png")
    return root


@pytest.fixture(scope="module")
def uniform(mixed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uniform") / "out"
    result = CliRunner().invoke(
        main, ["preprocess-images", str(mixed), str(out), "--size", "16x16", "--mode", "L",
               "--workers", "1", "--npz"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "2 skipped" in result.output
    return out


def test_preprocessing_writes_uniform_images_in_the_class_folders(
    mixed: Path, uniform: Path, tmp_path: Path
) -> None:
    source = preprocess(mixed, (16, 16), "L", workers=1)
    pngs = sorted(p.relative_to(uniform).as_posix() for p in uniform.rglob("*.png"))
    assert len(pngs) == len(source.files) > 300
    assert {p.split("/")[0] for p in pngs} == {"zero", "one", "seven"}
    assert "seven/deep/grey.png" in pngs and "zero/broken.png" not in pngs
    for path in list(uniform.rglob("*.png"))[:20]:
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "L", (16, 16))
    # lossless: the preprocessed folder reads back as the very same arrays
    again = preprocess(uniform, (16, 16), "L", workers=1)
    order = np.argsort([Path(f).with_suffix("").as_posix() for f in again.files])
    source_order = np.argsort([Path(f).with_suffix("").as_posix() for f in source.files])
    assert np.array_equal(again.x[order], source.x[source_order])
    assert again.y[order].tolist() == source.y[source_order].tolist()
    assert again.skipped == []
    report = json.loads((uniform / "report.json").read_text())
    assert report["images"] == len(pngs) and sorted(report["files"]) == pngs
    assert sorted(s["file"] for s in report["skipped"]) == ["one/notes.txt", "zero/broken.png"]
    with np.load(uniform / "images.npz", allow_pickle=False) as data:
        assert data["x"].shape == (len(pngs), 16, 16, 1)
    # without --npz no array file
    out = tmp_path / "plain"
    result = CliRunner().invoke(main, ["preprocess-images", str(mixed), str(out), "--size",
                                       "8x8", "--workers", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not (out / "images.npz").exists() and len(list(out.rglob("*.png"))) == len(pngs)
    with Image.open(next(out.rglob("*.png"))) as image:
        assert (image.mode, image.size) == ("RGB", (8, 8))


def test_png_names_never_collide(tmp_path: Path) -> None:
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    for name, fmt in (("x.png", "PNG"), ("x.jpg", "JPEG"), ("x.bmp", "BMP"), ("x", "PNG")):
        Image.new("L", (4, 4), 10 * len(name)).save(src / name, fmt)
    out = tmp_path / "out"
    args = ["preprocess-images", str(tmp_path / "src"), str(out), "--size", "4x4", "--mode", "L"]
    result = CliRunner().invoke(main, [*args, "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert len(list((out / "a").iterdir())) == 4


def train(*args: str, registry: str, work: Path) -> str:
    result = CliRunner().invoke(
        main, ["train", "--dataset", "images", *args, "--registry", registry,
               "--work-dir", str(work)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return result.output


def test_training_takes_the_raw_the_preprocessed_folder_and_the_npz(
    mixed: Path, uniform: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    work = tmp_path / "w"
    for source in (uniform, mixed):
        out = train("--images", str(source), "--size", "16x16", "--mode", "L", "--name",
                    "glyphs", registry=url, work=work)  # fmt: skip
        assert "glyphs version" in out
    # the .npz: its own size and mode, the same rows as the folder it came with
    out = train("--images", str(uniform / "images.npz"), "--name", "glyphs",
                registry=url, work=work)  # fmt: skip
    assert "unchanged: already registered as glyphs version 1" in out, out
    bad = CliRunner().invoke(main, ["train", "--dataset", "images", "--images",
                                    str(uniform / "images.npz"), "--mode", "RGB", "--registry",
                                    url, "--work-dir", str(work)])  # fmt: skip
    assert bad.exit_code == 1 and "holds 16x16 L images, not 16x16 RGB" in bad.output
    store = RegistryStore(url)
    try:
        info = store.version("glyphs", 1)
        assert info.metrics["accuracy"] > 0.9, info.metrics
        ingest = next(s for s in store.run(info.run_id)["steps"] if s["step"] == "ingest")  # type: ignore[arg-type]
        assert ingest["metrics"]["rows"] > 300
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.parametrize(("framework", "extra"), [("torch", "torch"), ("keras", "tensorflow")])
def test_a_cnn_serves_the_image_tensor_and_flattened_rows(
    uniform: Path, tmp_path: Path, framework: str, extra: str
) -> None:
    if importlib.util.find_spec(extra) is None:
        pytest.skip(f"the {extra} extra is not installed (.ci/run installs it)")
    url = f"sqlite:///{tmp_path / 'r.db'}"
    out = train("--images", str(uniform), "--size", "16x16", "--mode", "L", "--framework",
                framework, "--epochs", "4", "--name", "glyphs", registry=url,
                work=tmp_path / "w")  # fmt: skip
    folder = Path(out.rsplit("-> ", 1)[1].strip())
    card = read_card(folder)
    assert card.signature.inputs[0].shape == (-1, 16, 16, 1)
    assert card.reference_profile is not None  # the profile's features: the flattened rows
    images = preprocess(uniform, (16, 16), "L", workers=1)
    x, y = images.x[::40], images.y[::40]
    server = start_server([folder], tmp_path / "server.log", wait_for=["glyphs"])
    try:
        meta = httpx.get(f"{server.url}/v2/models/glyphs").json()
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 16, 16, 1]}]
        answers = []
        for shape in ([len(x), 16, 16, 1], [len(x), 256]):
            body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": shape,
                                "data": x.reshape(-1).tolist()}]}  # fmt: skip
            reply = httpx.post(f"{server.url}/v2/models/glyphs/infer", json=body)
            assert reply.status_code == 200, reply.text
            answers.append({o["name"]: o["data"] for o in reply.json()["outputs"]})
        assert answers[0] == answers[1]
        grpc = GrpcClient(server.grpc_target, raw=True)  # the binary gRPC path, both forms
        try:
            for shape in ([len(x), 16, 16, 1], [len(x), 256]):
                data = np.ascontiguousarray(x.reshape(shape), dtype=np.float32)
                got = grpc.infer("glyphs", request_of(Tensor("input", "FP32", shape, data)))
                assert got.outputs[0].data.tolist() == answers[0]["label"], shape
        finally:
            grpc.close()
        names = card.class_labels or []
        predicted = [names[i] for i in answers[0]["label"]]
        assert np.mean(np.asarray(predicted) == y) > 0.8
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 255],
                            "data": [0.0] * 255}]}  # fmt: skip
        reply = httpx.post(f"{server.url}/v2/models/glyphs/infer", json=body)
        assert reply.status_code == 400
        assert reply.json()["error"] == (
            "input 'input': expected shape [-1, 16, 16, 1] or its rows flattened [-1, 256] "
            "(-1: any size), got [1, 255]"
        )
    finally:
        assert server.stop() == 0, server.log()
