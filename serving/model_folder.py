"""A model version on disk: a folder holding `model.onnx` and `servo.json`.

`servo.json` (format version 1):

    {"format": 1, "name": "digits", "version": "1", "framework": "sklearn",
     "created_at": "2026-11-29T18:00:00+00:00",
     "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
     "outputs": [...], "class_labels": ["0", ...], "metrics": {"accuracy": 0.97},
     "allow_non_finite": [], "reference_profile": null}

The signature in `servo.json` is a copy for people and tools; the served signature is
read from the ONNX graph, and a folder whose copy disagrees with its graph fails to load.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.errors import ModelLoadError
from serving.signature import Signature, TensorSpec

MODEL_FILE = "model.onnx"
CARD_FILE = "servo.json"
FORMAT_VERSION = 1

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


#: the rule `valid_name` checks, for messages
NAME_RULE = "1-128 letters, digits, '_', '.' or '-', starting with a letter or digit, no '..'"


def valid_name(name: str) -> bool:
    """Model names: letters, digits, `_`, `.`, `-`; no path separators, no leading dot."""
    return bool(_NAME.match(name)) and ".." not in name


def valid_version(version: str) -> bool:
    return bool(_VERSION.match(version)) and ".." not in version


@dataclass(slots=True)
class ModelCard:
    """The contents of `servo.json`."""

    name: str
    version: str
    framework: str
    created_at: str
    signature: Signature
    class_labels: list[str] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    #: inputs that may carry NaN or +-Inf (all others are refused with a 400)
    allow_non_finite: list[str] = field(default_factory=list)
    #: filled by the export step for the monitors (issue 5)
    reference_profile: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "framework": self.framework,
            "created_at": self.created_at,
            **self.signature.to_json(),
            "class_labels": self.class_labels,
            "metrics": self.metrics,
            "allow_non_finite": self.allow_non_finite,
            "reference_profile": self.reference_profile,
        }

    @classmethod
    def from_json(cls, doc: Any, where: str) -> ModelCard:
        if not isinstance(doc, dict):
            raise ModelLoadError(f"{where}: expected a JSON object")
        if doc.get("format") != FORMAT_VERSION:
            raise ModelLoadError(f"{where}: unsupported format {doc.get('format')!r}")
        try:
            name, version = str(doc["name"]), str(doc["version"])
            signature = Signature(
                inputs=tuple(_spec_from_json(s) for s in doc["inputs"]),
                outputs=tuple(_spec_from_json(s) for s in doc["outputs"]),
            )
            card = cls(
                name=name,
                version=version,
                framework=str(doc.get("framework", "unknown")),
                created_at=str(doc.get("created_at", "")),
                signature=signature,
                class_labels=doc.get("class_labels"),
                metrics=dict(doc.get("metrics") or {}),
                allow_non_finite=list(doc.get("allow_non_finite") or []),
                reference_profile=doc.get("reference_profile"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{where}: malformed ({exc!r})") from None
        if not valid_name(name):
            raise ModelLoadError(f"{where}: invalid model name {name!r}")
        if not valid_version(version):
            raise ModelLoadError(f"{where}: invalid version {version!r}")
        return card


def _spec_from_json(doc: dict[str, Any]) -> TensorSpec:
    return TensorSpec(
        name=str(doc["name"]),
        datatype=str(doc["datatype"]),
        shape=tuple(int(d) for d in doc["shape"]),
    )


def read_card(folder: Path) -> ModelCard:
    path = folder / CARD_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None
    return ModelCard.from_json(doc, str(path))


#: a model folder is read by the server, which may run as another user
FOLDER_MODE, FILE_MODE = 0o755, 0o644


def write_card(folder: Path, card: ModelCard) -> Path:
    """Write `servo.json` atomically (temp file + rename), the last file of a version
    folder: the folder is left 0755 and its files 0644, whatever the umask (mkstemp's
    0600 made servo.json unreadable to a server running as another user)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = json.dumps(card.to_json(), indent=2, sort_keys=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".servo.json.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(data)
            os.fchmod(handle.fileno(), FILE_MODE)
        os.replace(tmp, folder / CARD_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    os.chmod(folder, FOLDER_MODE)
    model = folder / MODEL_FILE
    if model.is_file() and not model.is_symlink():
        os.chmod(model, FILE_MODE)
    return folder / CARD_FILE
