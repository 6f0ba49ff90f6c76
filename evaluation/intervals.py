"""Bootstrap confidence intervals for every test metric, resampling patients when patient ids are known.

At 70-200 test images a 2-point accuracy difference is noise; an interval says how much. Resampling is
by patient when ids exist (images of one patient are not independent), by image otherwise, and always
stratified by class: each class's patients (images) are redrawn among themselves, so every resample has
as many of each class as the data. Without strata, a resample of a test set with 3 positives lacks them
now and then, and its sensitivity (0 by torchmetrics' convention) dragged the interval of a perfect
detector down to [0, 1]. The metrics are computed by the same torchmetrics collection that training logs,
so the definitions match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.functional.classification import (
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
    multiclass_specificity,
)

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


def patient_groups(patient_ids: Sequence[str | None] | np.ndarray | None) -> np.ndarray | None:
    """Resampling groups from patient ids, some of which may be missing.

    A row without an id is a group of its own (it is one image of an unknown patient, which is what the
    split code assumes too). Returns None when no row has an id (resample images).

    Example:
        >>> patient_groups(["p1", None, "p1"]).tolist()
        ['id:p1', 'row:1', 'id:p1']
    """
    if patient_ids is None:
        return None
    ids = list(patient_ids)
    missing = [v is None or (isinstance(v, float) and np.isnan(v)) for v in ids]
    if all(missing):
        return None
    return np.array([f"row:{i}" if m else f"id:{v}" for i, (v, m) in enumerate(zip(ids, missing, strict=True))], dtype=object)


def resampling_method(targets: np.ndarray, groups: np.ndarray | Sequence | None) -> str:
    """One sentence naming how `bootstrap` resamples these data (for evaluation.json and reports)."""
    k = len(np.unique(np.asarray(targets)))
    groups = patient_groups(groups)
    if groups is None:
        return f"images redrawn with replacement within each of the {k} classes (stratified by class)"
    return (f"patients redrawn with replacement, all their images together, within each class "
            f"({len(np.unique(groups))} patients; stratified by class; an image without a patient id counts "
            "as a patient of its own)")


class Resampler:
    """Stratified (by class), optionally grouped (by patient) bootstrap index draws.

    A group's stratum is the set of classes among its images, so a patient with images of two classes is
    drawn with other such patients and every class keeps its count of groups in every resample.

    Args:
        targets: (N,) integer labels.
        groups: (N,) patient ids (None entries allowed) or None to resample images.
    """

    def __init__(self, targets: np.ndarray, groups: np.ndarray | Sequence | None = None):
        targets = np.asarray(targets)
        groups = patient_groups(groups)
        if groups is None:
            members = [np.array([i]) for i in range(len(targets))]
        else:
            _, inverse = np.unique(groups, return_inverse=True)
            order = np.argsort(inverse, kind="stable")
            members = np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1)
        strata: dict[tuple, list[int]] = {}
        for g, idx in enumerate(members):
            strata.setdefault(tuple(np.unique(targets[idx])), []).append(g)
        self.members = members
        self.strata = [np.array(gs) for gs in strata.values()]

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """Indices of one resample (groups drawn with replacement within each stratum)."""
        picked = np.concatenate([rng.choice(gs, len(gs)) for gs in self.strata])
        return np.concatenate([self.members[g] for g in picked])


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
