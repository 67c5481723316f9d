"""Image preprocessing over real files Pillow writes: formats, modes, corrupt files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from retrain.images import preprocess
from servo.cli import main


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label, colour in (("red", (255, 0, 0)), ("green", (0, 255, 0)), ("blue", (0, 0, 255))):
        folder = root / label
        folder.mkdir()
        for i, fmt in enumerate(["PNG", "JPEG", "BMP", "GIF", "PNG"]):
            size = (int(rng.integers(20, 90)), int(rng.integers(20, 90)))
            Image.new("RGB", size, colour).save(folder / f"{i}.{fmt.lower()}", fmt)
    (root / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not the rest of a png")
    (root / "green" / "notes.txt").write_text("not an image")
    (root / "blue" / "deep").mkdir()
    Image.new("LA", (10, 10)).save(root / "blue" / "deep" / "alpha.png")
    return root


@pytest.mark.parametrize("workers", [1, 2])
def test_every_readable_image_is_converted_and_corrupt_ones_reported(
    image_tree: Path, workers: int
) -> None:
    result = preprocess(image_tree, (28, 28), "RGB", workers=workers, chunk=4)
    assert result.x.shape == (16, 28, 28, 3) and result.x.dtype == np.float32
    assert result.x.min() >= 0.0 and result.x.max() <= 1.0
    assert sorted(set(result.y.tolist())) == ["blue", "green", "red"]
    red = result.x[result.y == "red"]
    assert (red[..., 0] > 0.95).all() and (red[..., 1] < 0.05).all()  # colours survive
    assert sorted(s["file"] for s in result.skipped) == ["green/notes.txt", "red/broken.png"]
    assert all(s["reason"] for s in result.skipped)


def test_grayscale_and_the_cli(image_tree: Path, tmp_path: Path) -> None:
    gray = preprocess(image_tree, (8, 12), "L", workers=1)
    assert gray.x.shape == (16, 12, 8, 1)
    out = CliRunner().invoke(
        main, ["preprocess-images", str(image_tree), str(tmp_path / "out"), "--size", "16x16",
               "--mode", "L", "--workers", "2", "--npz"],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "16 images" in out.output and "2 skipped" in out.output
    with np.load(tmp_path / "out" / "images.npz", allow_pickle=False) as data:
        assert data["x"].shape == (16, 16, 16, 1) and len(data["files"]) == 16
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["images"] == 16 and len(report["skipped"]) == 2
    bad = CliRunner().invoke(
        main, ["preprocess-images", str(image_tree), str(tmp_path), "--size", "big"]
    )
    assert bad.exit_code != 0 and "WIDTHxHEIGHT" in bad.output
