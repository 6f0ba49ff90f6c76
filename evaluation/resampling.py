"""Stratified, patient-grouped bootstrap resampling (numpy only, so a sweep's coordinator can use it
without importing torch).

Resampling is by patient when ids exist (images of one patient are not independent), by image otherwise,
and always stratified by class: each class's patients (images) are redrawn among themselves, so every
resample has as many of each class as the data. Without strata, a resample of a test set with 3
positives lacks them now and then, and its sensitivity (0 by torchmetrics' convention) dragged the
interval of a perfect detector down to [0, 1]. An image without a patient id is a patient of its own,
as in the split code.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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
