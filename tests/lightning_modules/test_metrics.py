"""Metric definitions: positive class, specificity, macro one-vs-rest, overfitting gap."""

from __future__ import annotations

import torch

from lightning_modules.metrics import ClassificationMetrics


def test_binary_metrics_use_the_configured_positive_class():
    # classes [diseased, healthy]; positive = diseased (index 0)
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    target = torch.tensor([0, 0, 0, 1, 1])  # 3 diseased, 2 healthy
    m = ClassificationMetrics(2, positive_index=0)
    m.update(probs, target)
    v = {k: float(x) for k, x in m.compute().items()}
    assert abs(v["sensitivity"] - 2 / 3) < 1e-6  # diseased found: 2 of 3
    assert abs(v["specificity"] - 1 / 2) < 1e-6  # healthy kept: 1 of 2
    assert abs(v["precision"] - 2 / 3) < 1e-6
    assert abs(v["acc"] - 3 / 5) < 1e-6
    assert abs(v["balanced_acc"] - (2 / 3 + 1 / 2) / 2) < 1e-6


def test_multiclass_metrics_are_macro_one_vs_rest():
    probs = torch.eye(3)[[0, 1, 1, 2, 2, 2]].float()
    target = torch.tensor([0, 1, 2, 2, 2, 2])
    m = ClassificationMetrics(3)
    m.update(probs, target)
    v = {k: float(x) for k, x in m.compute().items()}
    assert abs(v["acc"] - 5 / 6) < 1e-6
    assert abs(v["sensitivity"] - (1 + 1 + 3 / 4) / 3) < 1e-6  # macro recall = balanced accuracy
    assert abs(v["balanced_acc"] - v["sensitivity"]) < 1e-6
    spec = [1.0, 4 / 5, 2 / 2]  # class 1: one false positive among 5 negatives
    assert abs(v["specificity"] - sum(spec) / 3) < 1e-6
