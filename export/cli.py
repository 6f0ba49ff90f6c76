"""`python cli.py export --run <sweep | run dir | .ckpt> --format onnx|torchscript [--out DIR]`.

Writes the trained network with its normalisation and output probabilities (uint8 images (B, H, W, C) ->
probabilities (B, K), dynamic batch axis) as ONNX or TorchScript, its preprocessing file, export.json (the
file's sha256 and the parity check) and the model card. The export is run on the run's test split beside the
original model first; a file whose probabilities differ by more than 1e-4, or whose predicted class differs on
any image, is not written.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from jsonargparse import ArgumentParser

from errors import ConfigError, DataError
from export import layout

RANDOM_SOURCE = "random uint8 images, seed 0"


@dataclass
class ExportConfig:
    """Attributes:
        run: a sweep folder (exports its winner), a run directory, or a checkpoint file.
        format: onnx (ONNX Runtime, Triton, MONAI Deploy) or torchscript (torch.jit.load).
        out: the export folder (default: `export_<format>` inside the sweep folder or run directory).
        parity: images for the parity check: the run's test split, or random images (when the data is absent).
        parity_images: at most this many images are compared (default: the whole test split; 64 random).
        batch_size: batch size of the parity check (a batch of 1 is always run too).
    """

    run: str
    format: Literal["onnx", "torchscript"] = "onnx"
    out: str | None = None
    parity: Literal["test", "random"] = "test"
    parity_images: int | None = None
    batch_size: int = 16


def default_out(run: Path, fmt: str) -> Path:
    folder = run.parent if run.is_file() else run
    return folder / f"export_{fmt}"


def _rebatch(batches, batch_size: int, limit: int | None):
    """The images as batches of `batch_size`, after one batch of 1 (the batch axis must really be dynamic)."""
    import torch

    images = torch.cat(list(batches)) if batches else None
    if images is None or len(images) == 0:
        return []
    images = images[:limit] if limit else images
    return [images[:1], *images[1:].split(batch_size)]


def parity_batches(opened, cfg: ExportConfig) -> tuple[list, str]:
    """The parity check's uint8 (B, H, W, C) batches and a sentence saying where they come from."""
    import torch

    if cfg.parity == "random":
        hp = opened.model.hparams
        size = hp["image_size"]
        h, w = (size, size) if isinstance(size, int) else size
        n = cfg.parity_images or 64
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (n, h, w, int(hp.get("in_chans", 3))), dtype=torch.uint8, generator=gen)
        return _rebatch([images], cfg.batch_size, None), f"{n} {RANDOM_SOURCE}"
    dm = opened.datamodule
    try:
        dm.setup("test")
        loader = dm.test_dataloader()
    except (DataError, ConfigError, OSError) as e:
        raise DataError(f"{cfg.run}: the run's test split cannot be read for the parity check ({str(e).splitlines()[0]}). "
                        "Check with random images instead: --parity random") from None
    batches = _rebatch([images for images, _ in loader], cfg.batch_size, cfg.parity_images)
    n = sum(len(b) for b in batches)
    return batches, f"the run's test split ({'first ' if cfg.parity_images else ''}{n} images)"


def export_run(cfg: ExportConfig) -> Path:
    """Export `cfg.run`; returns the export folder. Raises MedselError subclasses for anything the user can fix."""
    from export import formats, parity
    from export.model_card import write_model_card
    from export.network import ProbabilityNet
    from export.preprocessing import preprocessing
    from runs.open import open_run

    source = Path(cfg.run).expanduser()
    opened = open_run(source, overrides={"data": {"num_workers": 0}})
    module = ProbabilityNet.from_classifier(opened.model)
    batches, where = parity_batches(opened, cfg)
    if not batches:
        raise DataError(f"{cfg.run}: the test split is empty, so parity cannot be checked. Use --parity random")
    out = Path(cfg.out).expanduser() if cfg.out else default_out(source, cfg.format)
    out.mkdir(parents=True, exist_ok=True)
    final = out / layout.MODEL_FILES[cfg.format]
    partial = out / f".{final.name}.partial"  # only a file that passed the parity check gets the final name
    try:
        formats.WRITERS[cfg.format](module, partial, batches[-1])
        check = parity.compare(module, formats.RUNNERS[cfg.format](partial), batches, where)
        parity.require(check, f"the {cfg.format} export")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, final)
    _write_side_files(out, final, cfg, opened, check, preprocessing(opened.model, opened.datamodule.dicom))
    write_model_card(source, out)
    return out


def _write_side_files(out: Path, final: Path, cfg: ExportConfig, opened, check, prep: dict) -> None:
    from export.formats import OPSET
    from export.model_card import versions

    hp = opened.model.hparams
    (out / layout.PREPROCESSING).write_text(json.dumps(prep, indent=2))
    for other in set(layout.MODEL_FILES.values()) - {final.name}:  # an earlier export of the other format
        (out / other).unlink(missing_ok=True)
    record = {
        "format": cfg.format, "file": final.name, "sha256": layout.sha256(final), "bytes": final.stat().st_size,
        "opset": OPSET if cfg.format == "onnx" else None,
        "parity": check.to_dict(),
        "source": {"run": cfg.run, "checkpoint": str(opened.checkpoint), "checkpoint_sha256": layout.sha256(opened.checkpoint)},
        "model": {"network": {k: v for k, v in (hp.get("network") or {}).items() if k != "pretrained_path"},
                  "loss": hp.get("loss"), "parameters": opened.model.num_parameters()},
        "versions": versions(("torch", "timm", "lightning", "onnx", "onnxruntime", "numpy")),
        "command": "python cli.py export " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["export"] else None,
    }
    (out / layout.EXPORT).write_text(json.dumps(record, indent=2))


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="cli.py export", description=__doc__)
    parser.add_argument("--config", action="config")
    parser.add_class_arguments(ExportConfig, None)
    args = parser.parse_args(argv)
    cfg = ExportConfig(**{k: getattr(args, k) for k in ExportConfig.__dataclass_fields__})
    out = export_run(cfg)
    record = layout.read_json(out / layout.EXPORT)
    p = record["parity"]
    print(f"[export] {out / record['file']}  sha256 {record['sha256']}\n"
          f"[export] parity on {p['source']}, batch sizes {p['batch_sizes']}: max probability difference "
          f"{p['max_abs_diff']:.2e} (limit {p['tolerance']:.0e}), predicted classes all equal\n"
          f"[export] beside it: {layout.PREPROCESSING}, {layout.EXPORT}, {layout.MODEL_CARD_MD}, {layout.MODEL_CARD_JSON}")
    return 0
