"""Batch image preprocessing: decode any format Pillow reads, convert to the model's colour
mode, resize, scale to [0, 1]. Usable on its own (`servo preprocess-images`) and as the
image path of the pipeline's ingest. Corrupt files are skipped and reported, never fatal.

Images are read from class subfolders (`SRC/<class>/<file>`); the output is one `.npz`
(x: (N, H, W, C) float32, y: class names, files: relative paths, loaded without pickle)
and a JSON report of what was skipped and why.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

MODES = {"RGB": 3, "L": 1}


@dataclass
class Result:
    x: npt.NDArray[np.float32]
    y: npt.NDArray[Any]
    files: list[str]
    skipped: list[dict[str, str]] = field(default_factory=list)


def discover(src: Path) -> list[tuple[Path, str]]:
    """Every file under a class subfolder, sorted (hidden files ignored)."""
    folders = sorted(p for p in Path(src).iterdir() if p.is_dir() and not p.name.startswith("."))
    return [
        (path, folder.name)
        for folder in folders
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    ]


def folder_digest(src: Path) -> str:
    """sha256 over every (relative path, content) under the class subfolders."""
    import hashlib

    digest = hashlib.sha256()
    for path, label in discover(src):
        digest.update(f"{label}/{path.name}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return "sha256:" + digest.hexdigest()


def load_one(path: Path, size: tuple[int, int], mode: str) -> npt.NDArray[np.float32]:
    from PIL import Image

    with Image.open(path) as image:
        image.draft(mode, size)  # lets JPEG decode at a reduced scale
        converted = image.convert(mode).resize(size, Image.Resampling.BILINEAR)
        array = np.asarray(converted, dtype=np.float32) / 255.0
    return array.reshape(size[1], size[0], MODES[mode])


def _chunk(
    paths: list[str], size: tuple[int, int], mode: str
) -> tuple[list[int], npt.NDArray[np.float32], list[tuple[int, str]]]:
    from PIL import Image

    kept: list[int] = []
    arrays: list[npt.NDArray[np.float32]] = []
    failed: list[tuple[int, str]] = []
    for index, path in enumerate(paths):
        try:
            arrays.append(load_one(Path(path), size, mode))
            kept.append(index)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            failed.append((index, f"{type(exc).__name__}: {exc}"))
    stacked = (
        np.stack(arrays) if arrays else np.zeros((0, size[1], size[0], MODES[mode]), np.float32)
    )
    return kept, stacked, failed


def _chunks(items: list[Any], size: int) -> Iterator[tuple[int, list[Any]]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def preprocess(
    src: Path,
    size: tuple[int, int],
    mode: str = "RGB",
    *,
    workers: int | None = None,
    progress: bool = False,
    chunk: int = 64,
) -> Result:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"size must be positive, got {size}")
    found = discover(src)
    paths = [str(p) for p, _ in found]
    workers = workers or min(os.cpu_count() or 1, 8)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), unit="img", desc="preprocess")
    parts: list[tuple[int, list[int], npt.NDArray[np.float32], list[tuple[int, str]]]] = []
    try:
        if workers <= 1:
            for start, batch in _chunks(paths, chunk):
                parts.append((start, *_chunk(batch, size, mode)))
                if bar is not None:
                    bar.update(len(batch))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [
                    (start, pool.submit(_chunk, batch, size, mode))
                    for start, batch in _chunks(paths, chunk)
                ]
                for start, future in futures:
                    parts.append((start, *future.result()))
                    if bar is not None:
                        bar.update(len(parts[-1][1]) + len(parts[-1][3]))
    finally:
        if bar is not None:
            bar.close()
    kept_index = [start + i for start, kept, _, _ in parts for i in kept]
    arrays = [a for _, _, a, _ in parts if len(a)]
    x = (
        np.concatenate(arrays)
        if arrays
        else np.zeros((0, size[1], size[0], MODES[mode]), np.float32)
    )
    skipped = [{"file": os.path.relpath(paths[start + i], src), "reason": reason}
               for start, _, _, failed in parts for i, reason in failed]  # fmt: skip
    return Result(
        x=x,
        y=np.asarray([found[i][1] for i in kept_index]),
        files=[os.path.relpath(paths[i], src) for i in kept_index],
        skipped=skipped,
    )


def write(result: Result, dst: Path) -> tuple[Path, Path]:
    dst.mkdir(parents=True, exist_ok=True)
    data = dst / "images.npz"
    np.savez(data, x=result.x, y=result.y, files=np.asarray(result.files))
    report = dst / "report.json"
    report.write_text(
        json.dumps({"images": len(result.files), "skipped": result.skipped}, indent=2)
    )
    return data, report
