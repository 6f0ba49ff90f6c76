"""`python cli.py report RUN_DIR [--report.heatmap gradcam++ ...]`: rebuild a finished run's report.

Loads the run's saved config and best checkpoint (weights-only) and evaluates again; nothing is retrained.
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

import torch
import yaml
from jsonargparse import ArgumentParser

from datamodules import ImageDataModule
from lightning_modules.classifier import ImageClassifier
from evaluation.report import ReportConfig, build_report
from errors import ConfigError


def load_run(run_dir: Path, checkpoint: str | None = None) -> tuple[dict, ImageClassifier, ImageDataModule]:
    """The saved config, the trained model (best checkpoint unless given) and the run's data module."""
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise ConfigError(f"'{run_dir}' is not a run directory (no config.yaml); pass artifacts/runs/<name>/<version>")
    cfg = yaml.safe_load(cfg_path.read_text())
    ckpt = Path(checkpoint) if checkpoint else run_dir / "checkpoints" / "best.ckpt"
    if not ckpt.exists():
        raise ConfigError(f"no checkpoint at '{ckpt}': the run has not finished training")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = ImageClassifier.load_trained(ckpt, map_location=device)
    datamodule = ImageDataModule(**(cfg.get("data") or {}))
    return cfg, model, datamodule


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="cli.py report", description=__doc__)
    parser.add_argument("run_dir", type=str, help="a run directory (artifacts/runs/<name>/<version>)")
    parser.add_argument("--checkpoint", type=str, default=None, help="checkpoint to evaluate (default: best)")
    parser.add_class_arguments(ReportConfig, "report")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    cfg, model, datamodule = load_run(run_dir, args.checkpoint)
    saved = cfg.get("report") or {}
    given = {f.name: getattr(args.report, f.name) for f in fields(ReportConfig)}
    defaults = ReportConfig()
    report = ReportConfig(**{k: (v if v != getattr(defaults, k) else saved.get(k, v)) for k, v in given.items()})
    mode = (cfg.get("run") or {}).get("wandb") or os.environ.get("WANDB_MODE", "offline")
    page = build_report(run_dir, model, datamodule, report, mode)
    print(f"[report] {page}")
    return 0
