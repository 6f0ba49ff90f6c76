"""Loss registry. Every loss maps logits and integer targets to a scalar and owns logits -> probabilities.

| name        | what                                                              | study |
|-------------|-------------------------------------------------------------------|-------|
| ce          | categorical cross-entropy (label smoothing, class weights)         | 000, 002 |
| bce         | binary cross-entropy on one logit (2 classes; logit = classes[1]) | 001 |
| mse / mae   | squared / absolute error of softmax probabilities vs one-hot      | 002 |
| logcosh     | log(cosh(p - y)) on softmax probabilities                         | 003 |
| ce_logcosh  | alpha * CE + beta * log-cosh summed over classes (eq. 3-5)        | 003 |
| focal       | focal loss, (1 - p_t)^gamma * CE                                  | -   |

Class weights weight each sample by its class; the mean is normalised by the sum of weights (as
`torch.nn.functional.cross_entropy` does), so weighted and unweighted losses have the same scale.

Example:
    >>> loss = build_loss("ce_logcosh", num_classes=2)
    >>> loss(torch.zeros(4, 2), torch.tensor([0, 1, 1, 0])).item() > 0
    True
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F
from torch import nn

from errors import ConfigError
from lightning_modules.registry import Registry


class ClassificationLoss(nn.Module, abc.ABC):
    """Base class: per-sample loss from `_per_sample`, class-weighted mean, softmax probabilities."""

    binary_logit = False

    def __init__(self, num_classes: int, class_weights: list[float] | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("class_weights", None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32))

    @property
    def num_outputs(self) -> int:
        return 1 if self.binary_logit else self.num_classes

    def set_class_weights(self, weights: list[float] | torch.Tensor | None) -> None:
        self.class_weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, num_outputs) logits -> (B, num_classes) probabilities."""
        return logits.float().softmax(dim=1)

    @abc.abstractmethod
    def _per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, num_outputs) float logits, (B,) int targets -> (B,) losses."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_sample = self._per_sample(logits.float(), target)  # (B,)
        if self.class_weights is None:
            return per_sample.mean()
        w = self.class_weights.to(per_sample.device)[target]
        return (per_sample * w).sum() / w.sum().clamp_min(1e-12)

    def _one_hot(self, target: torch.Tensor) -> torch.Tensor:
        return F.one_hot(target, self.num_classes).float()


LOSSES: Registry[type[ClassificationLoss]] = Registry("loss", "model.loss")


@LOSSES.register("ce")
class CrossEntropy(ClassificationLoss):
    """Categorical cross-entropy."""

    def __init__(self, num_classes: int, class_weights=None, label_smoothing: float = 0.0):
        super().__init__(num_classes, class_weights)
        self.label_smoothing = label_smoothing

    def _per_sample(self, logits, target):
        return F.cross_entropy(logits, target, reduction="none", label_smoothing=self.label_smoothing)


@LOSSES.register("bce")
class BinaryCrossEntropy(ClassificationLoss):
    """Binary cross-entropy on a single logit, the sigmoid output of study 001; the logit is classes[1]."""

    binary_logit = True

    def __init__(self, num_classes: int, class_weights=None):
        if num_classes != 2:
            raise ConfigError(f"model.loss: 'bce' needs exactly 2 classes, the data has {num_classes}; use 'ce'.")
        super().__init__(num_classes, class_weights)

    def probabilities(self, logits):
        p = torch.sigmoid(logits.float().squeeze(1))
        return torch.stack([1 - p, p], dim=1)

    def _per_sample(self, logits, target):
        return F.binary_cross_entropy_with_logits(logits.squeeze(1), target.float(), reduction="none")


@LOSSES.register("mse")
class MeanSquaredError(ClassificationLoss):
    """Mean squared error between softmax probabilities and the one-hot target (Keras 'mse', study 002)."""

    def _per_sample(self, logits, target):
        return (self.probabilities(logits) - self._one_hot(target)).pow(2).mean(1)


@LOSSES.register("mae")
class MeanAbsoluteError(ClassificationLoss):
    """Mean absolute error between softmax probabilities and the one-hot target (Keras 'mae', study 002)."""

    def _per_sample(self, logits, target):
        return (self.probabilities(logits) - self._one_hot(target)).abs().mean(1)


def _log_cosh(x: torch.Tensor) -> torch.Tensor:
    # log(cosh(x)) = |x| + log1p(exp(-2|x|)) - log 2, stable for large |x|
    ax = x.abs()
    return ax + torch.log1p(torch.exp(-2 * ax)) - math.log(2.0)


@LOSSES.register("logcosh")
class LogCosh(ClassificationLoss):
    """Log of the hyperbolic cosine of the probability error, averaged over classes (Keras 'log_cosh')."""

    def _per_sample(self, logits, target):
        return _log_cosh(self.probabilities(logits) - self._one_hot(target)).mean(1)


@LOSSES.register("ce_logcosh")
class CELogCosh(ClassificationLoss):
    """Study 003's ensemble loss, eq. 5: alpha * L_CE + beta * L_LCH, with (eq. 3, 4)
    L_CE = -sum_i y_i log p_i and L_LCH = sum_i log(cosh(p_i - y_i)), both summed over the classes i.

    Unlike the `logcosh` loss (Keras' log_cosh, a mean over classes), the log-cosh term here is the sum
    the paper writes: averaging would divide beta by the number of classes.
    """

    def __init__(self, num_classes: int, class_weights=None, alpha: float = 0.5, beta: float = 0.5):
        super().__init__(num_classes, class_weights)
        self.alpha, self.beta = alpha, beta

    def _per_sample(self, logits, target):
        ce = F.cross_entropy(logits, target, reduction="none")
        lc = _log_cosh(self.probabilities(logits) - self._one_hot(target)).sum(1)  # eq. 4: sum over classes
        return self.alpha * ce + self.beta * lc


@LOSSES.register("focal")
class Focal(ClassificationLoss):
    """Focal loss (Lin et al. 2017): down-weights easy examples, for heavily imbalanced data."""

    def __init__(self, num_classes: int, class_weights=None, gamma: float = 2.0):
        super().__init__(num_classes, class_weights)
        self.gamma = gamma

    def _per_sample(self, logits, target):
        logp = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
        return -((1 - logp.exp()) ** self.gamma) * logp


def build_loss(name: str, num_classes: int, class_weights: list[float] | None = None, **kwargs) -> ClassificationLoss:
    """Instantiate a registered loss; unknown names or arguments give a ConfigError naming `model.loss`."""
    cls = LOSSES.get(name)
    try:
        return cls(num_classes, class_weights, **kwargs)
    except TypeError as e:
        raise ConfigError(f"model.loss_kwargs for '{name}': {e}") from None


def available() -> list[str]:
    return LOSSES.available()
