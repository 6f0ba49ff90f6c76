"""The ONNX back end of `cli.py serve --run <export dir>`: an export of `cli.py export --format onnx` run by
ONNX Runtime. It imports neither torch nor Lightning (a test checks `sys.modules`), so the server runs where
only numpy, Pillow, OpenCV, pydicom, FastAPI and onnxruntime are installed.

It answers like `serving.model.Predictor`: the same preprocessing (serving.images, with the settings of the
export's preprocessing.json), the same `/model` description, the same probabilities (the export's parity check
bounds the difference by 1e-4). Heat maps need the network's gradients (Grad-CAM), which an ONNX file does not
give: a request for one gets `heatmap_error` saying so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from datamodules.dicom import DicomConfig
from errors import ConfigError
from export import layout
from serving.images import decode_upload

HEATMAP_UNAVAILABLE = ("heat map unavailable for an exported model: Grad-CAM needs the network's gradients in torch; "
                       "serve the sweep or run folder for heat maps")


def _session(model: Path):
    """An ONNX Runtime CPU session; a file ONNX Runtime cannot read is one ConfigError line."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own InvalidProtobuf, Fail, ... (no common base class)
        raise ConfigError(f"{model}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]}); export it again "
                          "with python cli.py export") from None


class OnnxPredictor:
    """An ONNX export, loaded once. ONNX Runtime's `run` is thread-safe, so requests are not serialised.

    Args:
        export_dir: a folder written by `cli.py export --format onnx`.
    """

    def __init__(self, export_dir: str | Path):
        self.dir = Path(export_dir)
        self.record = layout.read_json(self.dir / layout.EXPORT)
        if self.record.get("format") != "onnx":
            raise ConfigError(f"{self.dir}: holds a {self.record.get('format')} export; serve an ONNX export "
                              "(python cli.py export --format onnx) or the sweep/run folder itself")
        model = self.dir / self.record["file"]
        if not model.is_file() or layout.sha256(model) != self.record["sha256"]:
            raise ConfigError(f"{model}: missing, or its sha256 differs from {layout.EXPORT}'s (the file was changed "
                              "after export); export it again with python cli.py export")
        self.prep = layout.read_json(self.dir / layout.PREPROCESSING)
        card = self.dir / layout.MODEL_CARD_JSON
        self.card = layout.read_json(card) if card.is_file() else {}
        self.session = _session(model)
        size = self.prep["input_size"]
        self.image_size = (int(size["height"]), int(size["width"]))
        self.channels = int(self.prep["channels"])
        self.resize_mode = self.prep["resize"]
        dicom = self.prep.get("dicom") or {}
        self.dicom = DicomConfig(window=dicom.get("window"), frame=dicom.get("frame"))
        self.classes = list(self.prep["classes"])
        self.heatmap_method = "none"

    def describe(self) -> dict[str, Any]:
        """The `/model` description, with the same keys as the torch back end's, plus the back end."""
        model = self.record.get("model") or {}
        network = model.get("network") or {}
        norm = self.prep.get("normalization") or {}
        info: dict[str, Any] = {
            "name": network.get("name"), "network": network, "classes": self.classes,
            "positive_class": self.prep.get("positive_class"),
            "input": {"height": self.image_size[0], "width": self.image_size[1], "channels": self.channels,
                      "resize": self.resize_mode, "mean": norm.get("mean"), "std": norm.get("std")},
            "loss": model.get("loss"), "parameters": model.get("parameters"),
            "checkpoint": self.record["file"], "heatmap": "none", "heatmap_unavailable": HEATMAP_UNAVAILABLE,
            "backend": "onnxruntime", "sha256": self.record["sha256"],
        }
        selection = self.card.get("selection")
        if selection:
            winner = selection.get("winner") or {}
            info["selected_by_sweep"] = {"sweep": selection.get("sweep"), **{k: winner.get(k) for k in ("base_architecture", "optimizer", "loss")},
                                         "selection": (selection.get("rule") or {}).get("rule")}
        test = self.card.get("test")
        if test:
            info["test_metrics"] = {"n_images": test["n_images"], "level": test["level"], "metrics": test["metrics"]}
        return info

    def preprocess(self, source, max_pixels: int) -> np.ndarray:
        """An upload -> (H, W, C) uint8, exactly as the torch back end (serving.images)."""
        return decode_upload(source, self.channels, self.image_size, self.resize_mode, max_pixels, self.dicom)

    def predict(self, image: np.ndarray, with_heatmap: bool) -> dict[str, Any]:
        probs = self.session.run([layout.OUTPUT_NAME], {layout.INPUT_NAME: image[None]})[0][0]  # (K,) float32
        k = int(probs.argmax())
        out: dict[str, Any] = {
            "class": self.classes[k], "class_index": k,
            "probabilities": {c: float(p) for c, p in zip(self.classes, probs.tolist(), strict=True)},
        }
        if with_heatmap:
            out["heatmap_error"] = HEATMAP_UNAVAILABLE
        return out
