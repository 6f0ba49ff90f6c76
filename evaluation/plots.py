"""Report figures as PNG files (matplotlib's object API: no pyplot, so no global backend or figure state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch
from matplotlib.figure import Figure
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_precision_recall_curve,
    binary_roc,
)

from evaluation.calibration import ReliabilityBins


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _subplots(*args, figsize, **kwargs):
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def confusion_matrices(cm: np.ndarray, classes: list[str], path: Path) -> Path:
    """Counts and row-normalised (recall per true class) side by side."""
    cm = np.asarray(cm, dtype=float)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    size = 1.0 + 0.7 * len(classes)
    fig, axes = _subplots(1, 2, figsize=(2 * size + 2, size + 1))
    for ax, data, title, fmt in ((axes[0], cm, "counts", "{:.0f}"), (axes[1], norm, "row-normalised", "{:.2f}")):
        ax.imshow(data, cmap="Blues", vmin=0, vmax=data.max() or 1)
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"Confusion matrix ({title})")
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, fmt.format(data[i, j]), ha="center", va="center",
                        color="white" if data[i, j] > 0.6 * (data.max() or 1) else "black")
    return _save(fig, path)


def _one_vs_rest(probs: np.ndarray, targets: np.ndarray, classes: list[str], positive_index: int):
    """(name, scores, binary targets) per curve: the positive class for binary tasks, each class otherwise."""
    wanted = [positive_index] if len(classes) == 2 else range(len(classes))
    for c in wanted:
        yield classes[c], torch.as_tensor(probs[:, c]), torch.as_tensor((targets == c).astype(int))


def roc_curves(probs, targets, classes, positive_index, path: Path) -> Path:
    fig, ax = _subplots(figsize=(5.2, 5))
    for name, s, y in _one_vs_rest(probs, targets, classes, positive_index):
        if y.sum() == 0 or y.sum() == len(y):
            continue
        fpr, tpr, _ = binary_roc(s, y)
        ax.plot(fpr.numpy(), tpr.numpy(), label=f"{name} (AUC {float(binary_auroc(s, y)):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title("ROC" + (" (one-vs-rest)" if len(classes) > 2 else ""))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def pr_curves(probs, targets, classes, positive_index, path: Path) -> Path:
    fig, ax = _subplots(figsize=(5.2, 5))
    for name, s, y in _one_vs_rest(probs, targets, classes, positive_index):
        if y.sum() == 0:
            continue
        precision, recall, _ = binary_precision_recall_curve(s, y)
        ap = float(binary_average_precision(s, y))
        ax.plot(recall.numpy(), precision.numpy(), label=f"{name} (AP {ap:.3f}, prevalence {float(y.float().mean()):.2f})")
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision")
    ax.set_ylim(0, 1.02)
    ax.set_title("Precision-recall" + (" (one-vs-rest)" if len(classes) > 2 else ""))
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def reliability_diagram(bins: dict[str, ReliabilityBins], eces: dict[str, float], path: Path) -> Path:
    """One panel per probability set (e.g. before / after temperature scaling)."""
    fig, axes = _subplots(1, len(bins), figsize=(4.6 * len(bins), 4.6), squeeze=False)
    for ax, (name, b) in zip(axes[0], bins.items(), strict=True):
        centers = (b.edges[:-1] + b.edges[1:]) / 2
        width = b.edges[1] - b.edges[0]
        ok = b.count > 0
        ax.bar(centers[ok], b.accuracy[ok], width=width * 0.95, color="#4C72B0", edgecolor="k", label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
        ax.plot(b.confidence[ok], b.accuracy[ok], "o", color="#DD8452", ms=4, label="bin mean confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top class probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}: ECE {eces[name]:.3f}")
        ax.legend(loc="upper left", fontsize=7)
    return _save(fig, path)


def training_curves(metrics_csv: Path, path: Path) -> Path | None:
    if not metrics_csv.exists():
        return None
    frame = pl.read_csv(metrics_csv, infer_schema_length=None)
    cols = [c for c in frame.columns if c not in ("epoch", "step")]
    epochs = frame.group_by("epoch", maintain_order=True).agg([pl.col(c).drop_nulls().last() for c in cols]).sort("epoch")
    fig, axes = _subplots(1, 2, figsize=(10, 4))
    for ax, keys, title in ((axes[0], ("train/loss", "val/loss"), "loss"), (axes[1], ("train/acc", "val/acc"), "accuracy")):
        for key in keys:
            if key in epochs.columns:
                sub = epochs.filter(pl.col(key).is_not_null())
                ax.plot(sub["epoch"].to_list(), sub[key].to_list(), marker="o", ms=3, label=key)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend(fontsize=8)
    return _save(fig, path)
