"""Bootstrap confidence intervals for every test metric, resampling patients when patient ids are known.

At 70-200 test images a 2-point accuracy difference is noise; an interval says how much. Resampling is
by patient when ids exist, by image otherwise, always stratified by class (see `evaluation.resampling`).
The metrics are computed by the same torchmetrics collection that training logs, so the definitions match.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.functional.classification import (
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
    multiclass_specificity,
)

from evaluation.resampling import Resampler, patient_groups, resampling_method  # noqa: F401 -- re-exported for reports
from lightning_modules.metrics import METRIC_NAMES, ClassificationMetrics

PER_CLASS = {
    "sensitivity": multiclass_recall, "specificity": multiclass_specificity,
    "precision": multiclass_precision, "f1": multiclass_f1_score,
}


@dataclass(frozen=True)
class Interval:
    """A point estimate (on all test images) and its percentile bootstrap interval."""

    value: float
    low: float
    high: float

    @property
    def width(self) -> float:
        return self.high - self.low


def _metrics(collection: ClassificationMetrics, probs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    collection.reset()
    collection.update(probs, targets)
    return {k: float(v) for k, v in collection.compute().items()}


def _per_class(probs: torch.Tensor, targets: torch.Tensor, k: int) -> dict[str, np.ndarray]:
    preds = probs.argmax(1)
    return {name: fn(preds, targets, num_classes=k, average="none").numpy() for name, fn in PER_CLASS.items()}


def bootstrap(
    probs: np.ndarray, targets: np.ndarray, positive_index: int = 1, groups: np.ndarray | None = None,
    n_resamples: int = 1000, level: float = 0.95, seed: int = 0,
) -> tuple[dict[str, Interval], dict[str, list[Interval]]]:
    """Metrics with percentile bootstrap intervals.

    Args:
        probs: (N, K) predicted class probabilities.
        targets: (N,) integer labels.
        positive_index: positive class for binary metrics.
        groups: (N,) patient ids; resampling draws patients (with all their images) when given. Missing
            ids (None) are single-image patients (see `patient_groups`). Either way resampling is
            stratified by class (see `Resampler`; `resampling_method` words it for a report).
        n_resamples: bootstrap resamples.
        level: interval coverage.
        seed: resampling seed.

    Returns:
        (overall, per_class): overall[name] for every metric in METRIC_NAMES; per_class[name][k] for
        sensitivity, specificity, precision and F1 of each class (multi-class only; empty for binary).
    """
    p = torch.as_tensor(probs, dtype=torch.float32)
    t = torch.as_tensor(targets, dtype=torch.long)
    k = p.shape[1]
    collection = ClassificationMetrics(k, positive_index)
    point = _metrics(collection, p, t)
    point_pc = _per_class(p, t, k) if k > 2 else {}
    rng = np.random.default_rng(seed)
    resampler = Resampler(targets, groups)
    samples = {m: [] for m in METRIC_NAMES}
    samples_pc = {m: [] for m in point_pc}
    for _ in range(n_resamples):
        idx = torch.as_tensor(resampler.draw(rng))
        for m, v in _metrics(collection, p[idx], t[idx]).items():
            samples[m].append(v)
        if point_pc:
            for m, v in _per_class(p[idx], t[idx], k).items():
                samples_pc[m].append(v)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    overall = {m: Interval(point[m], float(np.nanpercentile(samples[m], lo)), float(np.nanpercentile(samples[m], hi)))
               for m in METRIC_NAMES}
    per_class = {
        m: [Interval(float(point_pc[m][c]), float(np.nanpercentile(np.array(samples_pc[m])[:, c], lo)),
                     float(np.nanpercentile(np.array(samples_pc[m])[:, c], hi))) for c in range(k)]
        for m in point_pc
    }
    return overall, per_class
