"""Clinical metrics through torchmetrics, one collection per split.

Binary tasks use a configurable positive class (the diseased one): sensitivity = recall of the positive
class, specificity = recall of the negative class. Multi-class tasks use macro one-vs-rest averages.
Names are the same in both cases so leaderboards and reports can rely on them.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    BinaryMatthewsCorrCoef,
    BinaryPrecision,
    BinaryRecall,
    BinarySpecificity,
    BinaryStatScores,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassMatthewsCorrCoef,
    MulticlassPrecision,
    MulticlassRecall,
    MulticlassSpecificity,
)

METRIC_NAMES = ("acc", "balanced_acc", "precision", "sensitivity", "specificity", "f1", "mcc", "auroc")


class BinaryBalancedAccuracy(BinaryStatScores):
    """(sensitivity + specificity) / 2; torchmetrics has no binary balanced accuracy."""

    def compute(self) -> torch.Tensor:
        tp, fp, tn, fn = self._final_state()[:4]
        sens = tp / (tp + fn).clamp_min(1)
        spec = tn / (tn + fp).clamp_min(1)
        return (sens + spec).float() / 2


class ClassificationMetrics(MetricCollection):
    """The metric collection for one split.

    `update(probs, target)` takes (B, K) class probabilities and (B,) integer targets in both the binary
    and the multi-class case; binary metrics see the positive class's probability.

    Args:
        num_classes: K.
        positive_index: index of the positive class for binary tasks.
        prefix: key prefix, e.g. "val/".
        sync_on_compute: gather states across DDP ranks in `compute` (False for a pass on one rank only).
    """

    def __init__(self, num_classes: int, positive_index: int = 1, prefix: str = "", sync_on_compute: bool = True):
        self.num_classes = num_classes
        self.positive_index = positive_index
        sync = dict(sync_on_compute=sync_on_compute)
        if num_classes == 2:
            metrics: dict[str, Metric] = {
                "acc": BinaryAccuracy(**sync),
                "balanced_acc": BinaryBalancedAccuracy(**sync),
                "precision": BinaryPrecision(**sync),
                "sensitivity": BinaryRecall(**sync),
                "specificity": BinarySpecificity(**sync),
                "f1": BinaryF1Score(**sync),
                "mcc": BinaryMatthewsCorrCoef(**sync),
                "auroc": BinaryAUROC(**sync),
            }
        else:
            k = dict(num_classes=num_classes, average="macro", **sync)
            metrics = {
                "acc": MulticlassAccuracy(num_classes=num_classes, average="micro", **sync),
                "balanced_acc": MulticlassAccuracy(**k),
                "precision": MulticlassPrecision(**k),
                "sensitivity": MulticlassRecall(**k),
                "specificity": MulticlassSpecificity(**k),
                "f1": MulticlassF1Score(**k),
                "mcc": MulticlassMatthewsCorrCoef(num_classes=num_classes, **sync),
                "auroc": MulticlassAUROC(**k),
            }
        # compute_groups=False: binary and macro metrics share states in ways torchmetrics' grouping
        # check would have to rediscover on every new collection; the cost of separate states is tiny.
        super().__init__(metrics, prefix=prefix, compute_groups=False)

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:  # type: ignore[override]
        if self.num_classes == 2:
            super().update(probs[:, self.positive_index], (target == self.positive_index).long())
        else:
            super().update(probs, target)


def confusion_matrix(num_classes: int) -> MulticlassConfusionMatrix:
    """Rows: true class, columns: predicted class, in `classes` order."""
    return MulticlassConfusionMatrix(num_classes=num_classes)
