"""The export folder's contract: every file `cli.py export` writes, named once (imports no torch).

    <out>/
        model.onnx | model.pt   the network with its normalisation and output probabilities: uint8 images
                                (B, H, W, C) -> probabilities (B, K), dynamic batch axis
        preprocessing.json      how an image file becomes that input (classes, channels, size, resize, DICOM)
        export.json             the exported file's sha256, the parity check's figures, the source run, versions
        model_card.md/.json     how the model was chosen and how sure we are (export.model_card)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

ONNX = "model.onnx"
TORCHSCRIPT = "model.pt"
MODEL_FILES = {"onnx": ONNX, "torchscript": TORCHSCRIPT}
PREPROCESSING = "preprocessing.json"
EXPORT = "export.json"
MODEL_CARD_MD = "model_card.md"
MODEL_CARD_JSON = "model_card.json"
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"


def is_export_dir(path: str | Path) -> bool:
    """A folder written by `cli.py export` (it has export.json and preprocessing.json)."""
    p = Path(path)
    return p.is_dir() and (p / EXPORT).is_file() and (p / PREPROCESSING).is_file()


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def sha256(path: Path) -> str:
    """The file's sha256, read in 1 MiB chunks (exports are recorded and checked by it)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
