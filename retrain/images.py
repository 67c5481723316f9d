"""Batch image preprocessing: decode any format Pillow reads, convert to the model's colour
mode, resize, scale to [0, 1]. Usable on its own (`servo preprocess-images`) and as the
image path of the pipeline's ingest. Corrupt files are skipped and reported, never fatal.

Images are read from class subfolders (`SRC/<class>/<file>`). The output is the same
tree of uniform images (`DST/<class>/<name>.png`, 8-bit, lossless: reading one back gives
the same array), which training takes as it takes any image folder, and a JSON report of
what was skipped and why (`DST/report.json`); on request also one `.npz` (x: (N, H, W, C)
float32, y: class names, files: relative paths, loaded without pickle), which training
takes too (`load_npz`).
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
    """sha256 over every (relative path, content) under the class subfolders (a `.npz`:
    over its content)."""
    import hashlib

    digest = hashlib.sha256()
    if Path(src).is_file():
        with Path(src).open("rb") as handle:
            return "sha256:" + hashlib.file_digest(handle, "sha256").hexdigest()
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


NPZ = "images.npz"
REPORT = "report.json"


def _png_names(files: list[str]) -> list[str]:
    """`<class>/<sub>/<stem>.png` for each relative path; a name another file took already
    keeps its old suffix (`a.jpg.png` beside `a.png`), then gets a number."""
    taken: set[str] = set()
    names = []
    for file in files:
        path = Path(file)
        for candidate in (path.with_suffix(".png"), Path(f"{path}.png")):
            if candidate.as_posix() not in taken:
                break
        n = 1
        while candidate.as_posix() in taken:
            candidate, n = Path(f"{path}.{n}.png"), n + 1
        taken.add(candidate.as_posix())
        names.append(candidate.as_posix())
    return names


def write(result: Result, dst: Path, *, npz: bool = False) -> tuple[Path, Path]:
    """Write the images as PNG files in their class subfolders (and `images.npz` when
    `npz`); returns (the folder or the .npz, the report)."""
    from PIL import Image

    dst.mkdir(parents=True, exist_ok=True)
    pixels = np.rint(result.x * 255.0).clip(0, 255).astype(np.uint8)
    names = _png_names(result.files)
    for image, name in zip(pixels, names, strict=True):
        path = dst / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path, "PNG")
    data = dst
    if npz:
        data = dst / NPZ
        np.savez(data, x=result.x, y=result.y, files=np.asarray(result.files))
    report = dst / REPORT
    doc = {"images": len(result.files), "files": names, "skipped": result.skipped}
    report.write_text(json.dumps(doc, indent=2))
    return data, report


def load_npz(path: Path) -> Result:
    """A `.npz` that `write(..., npz=True)` made, checked (no pickle)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            x, y = data["x"], data["y"]
            files = [str(f) for f in data["files"]] if "files" in data else []
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: not an images .npz with x and y ({exc})") from None
    if x.ndim != 4 or x.shape[-1] not in MODES.values() or len(y) != len(x):
        raise ValueError(f"{path}: x must be (N, H, W, 1 or 3) with one y per image")
    return Result(x=x.astype(np.float32), y=y, files=files)


def mode_of(x: npt.NDArray[Any]) -> str:
    return next(mode for mode, channels in MODES.items() if channels == x.shape[-1])
