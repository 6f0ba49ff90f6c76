"""Suspected label errors: out-of-fold predicted probabilities, then cleanlab's `find_label_issues`.

`out_of_fold_probabilities` trains a quick k-fold model itself, through the same `MedselCLI` as `cli.py fit`
(a small network at a small size for a few epochs, one generated manifest per fold with
`data.split.use_manifest_split`), so every image is predicted by a model that never saw it. Folds keep
patients and duplicate clusters together (StratifiedGroupKFold), else a copy in the training folds would
vouch for its own label.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch

from datamodules.splits import SplitConfig, group_by_keys


def fold_assignment(frame: pl.DataFrame, folds: int, seed: int) -> np.ndarray:
    """Fold number per image, stratified by label, grouped by patient id and duplicate cluster."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups = group_by_keys(frame, SplitConfig())
    if groups is None:
        groups = np.arange(frame.height).astype(str)
    out = np.empty(frame.height, np.int64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, held) in enumerate(splitter.split(np.zeros(frame.height), frame["label"].to_numpy(), groups)):
        out[held] = k
    return out


def out_of_fold_probabilities(
    config: str, frame: pl.DataFrame, classes: list[str], work: Path, folds: int = 5, epochs: int = 4,
    image_size: int = 64, network: str = "resnet10t", seed: int = 0, extra: list[str] | None = None,
) -> np.ndarray:
    """Predicted class probabilities of every image from the fold model that did not train on it.

    Args:
        config: the fit config (its data section: classes, channels, augmentation ...).
        frame: the resolved images (`path`, `label`, `patient_id`, optional `cluster_id`).
        classes: class order of the probability columns.
        work: folder for the fold manifests and runs.
        folds: number of folds (each model trains on folds-2, validates on 1, predicts 1).
        epochs: training epochs per fold.
        image_size: input size of the quick model.
        network: timm name of the quick model (trained from scratch: no download).
        seed: fold assignment and training seed.
        extra: more CLI arguments for every fold run (e.g. `--trainer.accelerator=cpu`).

    Returns:
        (N, K) float array aligned with `frame`.
    """
    from runs.cli import MedselCLI  # torch/Lightning only when label issues are asked for

    fold = fold_assignment(frame, folds, seed)
    probs = np.full((frame.height, len(classes)), np.nan)
    for k in range(folds):
        split = np.where(fold == k, "test", np.where(fold == (k + 1) % folds, "val", "train"))
        manifest = work / f"fold{k}.parquet"
        manifest.parent.mkdir(parents=True, exist_ok=True)
        frame.select("path", "label", "patient_id").with_columns(split=pl.Series(split)).write_parquet(manifest)
        args = [
            "--config", config, f"--data.source={manifest}", "--data.split.use_manifest_split=true",
            f"--data.image_size={image_size}", "--data.on_conflict=keep", "--data.source_hint=null",
            f"--model.network.name={network}", "--model.network.pretrained=false",
            "--model.network.pretrained_path=null", "--model.network.hidden=[]", f"--trainer.max_epochs={epochs}",
            f"--run.root={work / 'runs'}", f"--run.name=fold{k}", "--run.wandb=disabled",
            "--run.early_stopping_patience=null", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--seed_everything={seed + k}", *(extra or []),
        ]
        cli = MedselCLI(args=args, run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        batches = cli.trainer.predict(cli.model, datamodule=cli.datamodule, ckpt_path="best")
        held = cli.datamodule.resolve().frame.filter(pl.col("split") == "test")["path"].to_list()
        index = {p: i for i, p in enumerate(frame["path"].to_list())}
        probs[[index[p] for p in held]] = torch.cat(batches).float().numpy()
    return probs


def find_issues(frame: pl.DataFrame, probs: np.ndarray, classes: list[str]) -> pl.DataFrame:
    """Suspected label errors, most suspicious first.

    Args:
        frame: images (`relpath`, `path`, `label`) aligned with `probs`.
        probs: (N, K) out-of-fold probabilities in `classes` order.
        classes: class names.

    Returns:
        rank, relpath, path, label, suggested (the model's class), label_probability.
    """
    from cleanlab.filter import find_label_issues

    labels = frame["label"].replace_strict({c: i for i, c in enumerate(classes)}, return_dtype=pl.Int64).to_numpy()
    ranked = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    return pl.DataFrame({
        "rank": np.arange(1, len(ranked) + 1),
        "relpath": frame["relpath"].gather(ranked),
        "path": frame["path"].gather(ranked),
        "label": frame["label"].gather(ranked),
        "suggested": [classes[i] for i in probs[ranked].argmax(1)],
        "label_probability": probs[ranked, labels[ranked]].astype(np.float64),
    })
