"""Bootstrap resampling: stratified by class, grouped by patient, tolerant of missing patient ids."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.intervals import bootstrap
from evaluation.resampling import Resampler, patient_groups, resampling_method


def rare_positives():
    # 40 test images, 2 positives, all detected; 5 false positives keep specificity below 1. An
    # unstratified resample lacks both positives with probability (38/40)^40 = 13%.
    targets = np.array([1] * 2 + [0] * 38)
    probs = np.zeros((40, 2), dtype=np.float32)
    probs[:, 0] = 0.9
    probs[:2, 0] = 0.2
    probs[2:7, 0] = 0.4
    probs[:, 1] = 1 - probs[:, 0]
    return probs, targets


def test_no_resample_lacks_a_class_so_perfect_sensitivity_has_a_degenerate_interval():
    probs, targets = rare_positives()
    overall, _ = bootstrap(probs, targets, n_resamples=300, seed=0)
    # Before: resamples without a positive scored sensitivity 0 and the interval was [0.0, 1.0].
    assert (overall["sensitivity"].value, overall["sensitivity"].low, overall["sensitivity"].high) == (1.0, 1.0, 1.0)
    assert overall["specificity"].low < overall["specificity"].value < overall["specificity"].high


def test_small_class_keeps_auroc_interval_tight():
    # Three classes, one with 3 images; a near-perfect ranker. Macro AUROC's interval must not collapse
    # towards the resamples that lost the small class (before: [0.658, 1.0] around 0.991).
    rng = np.random.default_rng(0)
    targets = np.array([0] * 40 + [1] * 40 + [2] * 3)
    logits = rng.normal(0, 1, (83, 3))
    logits[np.arange(83), targets] += 4
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    overall, _ = bootstrap(probs, targets, n_resamples=200, seed=1)
    assert overall["auroc"].low > overall["auroc"].value - 0.05


def test_resamples_keep_class_counts_and_whole_patients():
    targets = np.array([0, 0, 0, 1, 1, 0, 1, 0])
    groups = np.array(["a", "a", "b", "c", "c", "d", "e", "f"])
    sampler = Resampler(targets, groups)
    rng = np.random.default_rng(3)
    for _ in range(50):
        idx = sampler.draw(rng)
        # patients a,b,d,f (class 0, 5 images in 4 patients) and c,e (class 1): 4 + 2 patients per draw
        drawn = groups[idx]
        assert len(set(drawn[targets[idx] == 1]) | {"c", "e"}) == 2  # class-1 draws come from c, e only
        assert (targets[idx] == 1).sum() in (2, 3, 4)  # two class-1 patients drawn: cc, ce or ee
        for g in set(drawn):  # a drawn patient comes with all its images, as often as it was drawn
            assert (drawn == g).sum() % (groups == g).sum() == 0


def test_stratified_image_resamples_have_exact_class_counts():
    targets = np.array([0] * 10 + [1] * 3 + [2] * 7)
    sampler = Resampler(targets)
    idx = sampler.draw(np.random.default_rng(0))
    assert np.bincount(targets[idx]).tolist() == [10, 3, 7]


def test_partial_patient_ids_are_single_image_patients():
    assert patient_groups([None, None]) is None
    groups = patient_groups(["p1", None, "p1", None])
    assert groups[0] == groups[2] and len(set(groups)) == 3
    probs, targets = rare_positives()
    ids = [f"p{i // 2}" if i % 3 else None for i in range(40)]
    overall, _ = bootstrap(probs, targets, groups=np.array(ids, dtype=object), n_resamples=50, seed=0)
    assert overall["acc"].low <= overall["acc"].value <= overall["acc"].high


def test_method_is_stated():
    probs, targets = rare_positives()
    assert "stratified by class" in resampling_method(targets, None)
    method = resampling_method(targets, [f"p{i // 2}" for i in range(40)])
    assert "patients" in method and "20 patients" in method and "stratified by class" in method


@pytest.mark.parametrize("seed", [0, 1])
def test_same_seed_same_interval(seed):
    probs, targets = rare_positives()
    a, _ = bootstrap(probs, targets, n_resamples=30, seed=seed)
    b, _ = bootstrap(probs, targets, n_resamples=30, seed=seed)
    assert a == b
