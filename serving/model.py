"""The served model: found from a sweep, run directory or checkpoint, loaded once, used thread-safely."""

from __future__ import annotations

import base64
import io
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from datamodules.images import decode, resize
from lightning_modules.classifier import ImageClassifier
from errors import ConfigError


@dataclass
class ServedRun:
    """Where the model comes from and what is known about it."""

    checkpoint: Path
    run_dir: Path | None
    sweep: dict[str, Any] | None = None
    resize_mode: str = "squash"
    evaluation: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def locate(path: str | Path) -> ServedRun:
    """Resolve `--run`: a sweep folder (its winner), a run directory (its best checkpoint) or a .ckpt file."""
    p = Path(path).expanduser()
    sweep = None
    if (p / "winner.json").exists():
        sweep = json.loads((p / "winner.json").read_text())
        run_dir = Path(sweep["run_dir"])
        checkpoint = run_dir / "checkpoints" / "best.ckpt"
        if not checkpoint.exists() and (p / "winner.ckpt").exists():
            checkpoint = p / "winner.ckpt"
    elif (p / "checkpoints" / "best.ckpt").exists():
        run_dir, checkpoint = p, p / "checkpoints" / "best.ckpt"
    elif p.is_file() and p.suffix == ".ckpt":
        checkpoint = p
        run_dir = p.parent.parent if p.parent.name == "checkpoints" else None
    else:
        raise ConfigError(f"--run '{p}' is not a sweep folder (winner.json), a run directory (checkpoints/best.ckpt) "
                          "or a .ckpt file. Train one first: python cli.py sweep --config configs/sweep_demo.yaml")
    served = ServedRun(checkpoint=checkpoint, run_dir=run_dir if run_dir and run_dir.exists() else None, sweep=sweep)
    if served.run_dir is not None:
        cfg_file = served.run_dir / "config.yaml"
        if cfg_file.exists():
            served.resize_mode = (yaml.safe_load(cfg_file.read_text()).get("data") or {}).get("resize", "squash")
        ev = served.run_dir / "evaluation.json"
        if ev.exists():
            served.evaluation = json.loads(ev.read_text())
    return served


class Predictor:
    """The model and its preprocessing, loaded once. Inference is serialised by a lock: heat maps register
    hooks on the network, so two requests must not run it at the same time."""

    def __init__(self, run: ServedRun, device: str | None = None, heatmap: str = "gradcam"):
        self.run = run
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = ImageClassifier.load_trained(run.checkpoint, map_location=self.device)
        hp = self.model.hparams
        size = hp["image_size"]
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.channels = int(hp.get("in_chans", 3))
        self.classes = list(self.model.classes)
        self.heatmap_method = heatmap
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        hp = self.model.hparams
        net = hp.get("network") or {}
        info: dict[str, Any] = {
            "name": net.get("name"), "network": net, "classes": self.classes,
            "positive_class": self.classes[self.model.positive_index] if len(self.classes) == 2 else None,
            "input": {"height": self.image_size[0], "width": self.image_size[1], "channels": self.channels,
                      "resize": self.run.resize_mode, "mean": self.model.net.mean.flatten().tolist(),
                      "std": self.model.net.std.flatten().tolist()},
            "loss": hp.get("loss"), "parameters": self.model.num_parameters(),
            "checkpoint": str(self.run.checkpoint), "heatmap": self.heatmap_method,
        }
        if self.run.sweep:
            info["selected_by_sweep"] = {k: self.run.sweep.get(k) for k in ("sweep", "base_architecture", "optimizer", "loss", "selection")}
        if self.run.evaluation:
            info["test_metrics"] = {"n_images": self.run.evaluation["n_images"], "level": self.run.evaluation["level"],
                                    "metrics": self.run.evaluation["metrics"]}
        return info

    def preprocess(self, data: bytes) -> np.ndarray:
        """Encoded bytes -> (H, W, C) uint8 exactly as training saw images (decode, channels, resize)."""
        return resize(decode(data, self.channels), self.image_size, self.run.resize_mode)

    def predict(self, image: np.ndarray, with_heatmap: bool) -> dict[str, Any]:
        batch = torch.from_numpy(image).unsqueeze(0).to(self.device)  # (1, H, W, C) uint8
        with self._lock:
            with torch.inference_mode():
                probs = self.model.loss_fn.probabilities(self.model(self.model.net.normalize(batch)))[0].float().cpu()
            k = int(probs.argmax())
            out: dict[str, Any] = {
                "class": self.classes[k], "class_index": k,
                "probabilities": {c: float(p) for c, p in zip(self.classes, probs.tolist(), strict=True)},
            }
            if with_heatmap and self.heatmap_method != "none":
                from evaluation.heatmaps import HeatmapUnavailable, heatmaps, overlay

                try:
                    cams, _ = heatmaps(self.model.net, batch.cpu(), [k], self.heatmap_method)
                    out["heatmap_png"] = _png_base64(overlay(image, cams[0]))
                except HeatmapUnavailable as e:
                    out["heatmap_error"] = str(e)
        return out


def _png_base64(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
