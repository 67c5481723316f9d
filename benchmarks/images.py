"""Image preprocessing throughput: `retrain.images.preprocess` against a plain Pillow loop
over the same generated PNGs, in one run.

    python benchmarks/images.py [--count 5000] [--size 28x28] [--mode RGB]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from retrain.images import preprocess


def generate(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class{i % 10}"
        folder.mkdir(exist_ok=True)
        side = int(rng.integers(48, 129))
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")


def plain_loop(root: Path, size: tuple[int, int], mode: str) -> int:
    done = 0
    for path in sorted(root.rglob("*.png")):
        with Image.open(path) as image:
            array = np.asarray(image.convert(mode).resize(size), dtype=np.float32) / 255.0
        done += array.shape[0] > 0
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--size", default="28x28")
    parser.add_argument("--mode", default="RGB")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    root = Path(tempfile.mkdtemp(prefix="servo-images-"))
    try:
        generate(root, args.count)
        started = time.perf_counter()
        plain = plain_loop(root, (width, height), args.mode)
        plain_s = time.perf_counter() - started
        rows = []
        for workers in (1, 2):
            started = time.perf_counter()
            result = preprocess(root, (width, height), args.mode, workers=workers)
            elapsed = time.perf_counter() - started
            rows.append((workers, len(result.files), elapsed))
        print("| method | images | seconds | images/s | x plain loop |")
        print("|---|---:|---:|---:|---:|")
        print(f"| plain Pillow loop | {plain} | {plain_s:.2f} | {plain / plain_s:,.0f} | 1.00 |")
        for workers, count, elapsed in rows:
            print(
                f"| preprocess, {workers} worker(s) | {count} | {elapsed:.2f} | "
                f"{count / elapsed:,.0f} | {plain_s / elapsed:.2f} |"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
