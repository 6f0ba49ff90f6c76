"""The served model: found from a sweep, run directory or checkpoint, loaded once, used thread-safely."""

from __future__ import annotations

import base64
import io
import pickle
import sys
import threading
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from datamodules.dicom import DicomConfig
from errors import ConfigError
from lightning_modules.classifier import ImageClassifier
from runs import files
from serving.images import decode_upload


@dataclass
class ServedRun:
    """Where the model comes from and what is known about it.

    Attributes:
        checkpoint: the checkpoint file; it alone defines the model and its preprocessing.
        run_dir: the run directory, when the checkpoint still sits in one (for its test metrics).
        label: the checkpoint's path relative to what `--run` named (never absolute; shown by `/model`).
        sweep: the sweep's winner.json, when a sweep folder was served.
        evaluation: the run's evaluation.json (test metrics with intervals), when there is one.
    """

    checkpoint: Path
    run_dir: Path | None
    label: str
    sweep: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None


def _relative(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return path.name


def locate(path: str | Path) -> ServedRun:
    """Resolve `--run`: a sweep folder (its winner), a run directory (its best checkpoint) or a .ckpt file.

    Every path is resolved against the folder named, never the working directory: a sweep's winner.json
    holds its run directory relative to the sweep folder.
    """
    p = Path(path).expanduser()
    sweep = files.RunFiles(p).read_json(files.WINNER) if p.is_dir() else None
    if sweep is not None:
        run_dir = files.winner_run_dir(p)
        checkpoint = files.RunFiles(run_dir).best_checkpoint if run_dir is not None else None
        if checkpoint is None or not checkpoint.exists():
            checkpoint, run_dir = p / files.WINNER_CKPT, None
        base = p
    elif p.is_dir() and files.is_run_dir(p):
        run_dir, checkpoint, base = p, files.RunFiles(p).best_checkpoint, p
    elif p.is_file() and p.suffix == ".ckpt":
        checkpoint, base = p, p.parent
        run_dir = p.parent.parent if p.parent.name == files.CHECKPOINTS else None
    else:
        raise ConfigError(f"--run '{p}' is not a sweep folder ({files.WINNER}), a run directory "
                          f"({files.CHECKPOINTS}/{files.BEST}.ckpt) or a .ckpt file. Train one first: "
                          "python cli.py sweep --config configs/sweep_demo.yaml")
    if not checkpoint.is_file():
        raise ConfigError(f"--run '{p}': the checkpoint {checkpoint} does not exist; rerun the sweep or serve a run directory")
    if run_dir is not None and not run_dir.is_dir():
        run_dir = None
    evaluation = files.RunFiles(run_dir).read_json(files.EVALUATION) if run_dir is not None else None
    return ServedRun(checkpoint, run_dir, _relative(checkpoint, base), sweep, evaluation)


def load_model(checkpoint: Path, device: torch.device) -> ImageClassifier:
    """Weights-only loading; anything else in the file is refused with one line instead of a traceback.

    Raises:
        ConfigError: an empty file, a file that is not a PyTorch checkpoint, a checkpoint that needs unpickling
            of arbitrary objects, or not a medsel checkpoint.
    """
    what = checkpoint_kind(checkpoint)
    if what is not None:
        raise ConfigError(f"{checkpoint.name}: {what}, not a model checkpoint. Serve a checkpoint written by "
                          "`cli.py fit` or a sweep (a run's checkpoints/best.ckpt), or the sweep folder itself.")
    try:
        with warnings.catch_warnings():  # torch warns about the protocol of the bytes it is about to refuse
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return ImageClassifier.load_trained(checkpoint, map_location=device)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():  # torch names the class a pickle would import; else it is just damaged
            raise ConfigError(f"{checkpoint.name}: a damaged or foreign file, not a model checkpoint (its pickle data "
                              f"cannot be read: {_unpickler_reason(e)}). Serve a checkpoint written by `cli.py fit` "
                              "or a sweep.") from None
        raise ConfigError(
            f"{checkpoint.name}: not a weights-only checkpoint (it holds pickled Python objects, which could run "
            "code when loaded), so it is not loaded. Serve a checkpoint written by `cli.py fit` or a sweep."
        ) from None
    except (KeyError, RuntimeError, EOFError, IndexError, zipfile.BadZipFile, TypeError) as e:
        raise ConfigError(f"{checkpoint.name}: not a medsel checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                          "Serve a checkpoint written by `cli.py fit` or a sweep.") from None


def _unpickler_reason(e: Exception) -> str:
    """The line of torch's weights-only error that says what failed (its message is a page of advice)."""
    lines = [line.strip() for line in str(e).split("WeightsUnpickler error:")[-1].splitlines() if line.strip()]
    return lines[0][:200] if lines else type(e).__name__


def checkpoint_kind(path: Path) -> str | None:
    """What a file that cannot be a PyTorch checkpoint is ("an empty file (0 bytes)", "not a PyTorch file
    ..."), or None when it may be one: a zip archive (torch.save's format) or a legacy pickle."""
    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        return "an empty file (0 bytes; an interrupted copy or save?)"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # zip archive, or pickle protocol >= 2
        return None
    return f"not a PyTorch file (it starts with bytes {head.hex(' ')}: neither a zip archive nor a pickle)"


def datamodule_hparams(checkpoint: Path) -> dict[str, Any]:
    """The DataModule's hyper-parameters saved in the checkpoint (e.g. `dicom`), read weights-only and
    memory-mapped (the tensors are not read)."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    return dict(ckpt.get("datamodule_hyper_parameters") or {})


class Predictor:
    """The model and its preprocessing, loaded once. Inference is serialised by a lock: heat maps register
    hooks on the network, so two requests must not run it at the same time."""

    def __init__(self, run: ServedRun, device: str | None = None, heatmap: str = "gradcam"):
        self.run = run
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_model(run.checkpoint, self.device)
        hp = self.model.hparams
        size = hp["image_size"]
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.channels = int(hp.get("in_chans", 3))
        self.resize_mode = hp.get("resize")
        if self.resize_mode is None:  # checkpoints written before the resize mode was stored in them
            self.resize_mode = "squash"
            print(f"[serve] warning: {run.label} does not record its resize mode (trained before it was stored); "
                  "assuming squash. Retrain to serve letterbox models exactly.", file=sys.stderr)
        self.dicom = DicomConfig(**(datamodule_hparams(run.checkpoint).get("dicom") or {}))
        self.classes = list(self.model.classes)
        self.heatmap_method = heatmap
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        """The model card served at `/model`: no absolute path (the checkpoint is named relative to `--run`)."""
        hp = self.model.hparams
        net = {k: v for k, v in (hp.get("network") or {}).items() if k != "pretrained_path"}
        info: dict[str, Any] = {
            "name": net.get("name"), "network": net, "classes": self.classes,
            "positive_class": self.classes[self.model.positive_index] if len(self.classes) == 2 else None,
            "input": {"height": self.image_size[0], "width": self.image_size[1], "channels": self.channels,
                      "resize": self.resize_mode, "mean": self.model.net.mean.flatten().tolist(),
                      "std": self.model.net.std.flatten().tolist()},
            "loss": hp.get("loss"), "parameters": self.model.num_parameters(),
            "checkpoint": self.run.label, "heatmap": self.heatmap_method,
        }
        if self.run.sweep:
            info["selected_by_sweep"] = {k: self.run.sweep.get(k) for k in ("sweep", "base_architecture", "optimizer", "loss", "selection")}
        if self.run.evaluation:
            info["test_metrics"] = {"n_images": self.run.evaluation["n_images"], "level": self.run.evaluation["level"],
                                    "metrics": self.run.evaluation["metrics"]}
        return info

    def preprocess(self, source, max_pixels: int) -> np.ndarray:
        """An upload (bytes or a binary file) -> (H, W, C) uint8, as training saw images (see serving.images).

        Raises:
            ImageDecodeError: and its subclasses UnsupportedImage (415) and TooManyPixels (413).
        """
        return decode_upload(source, self.channels, self.image_size, self.resize_mode, max_pixels, self.dicom)

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
