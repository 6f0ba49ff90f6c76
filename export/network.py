"""The exported computation: the trained network with its normalisation and output probabilities."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class ProbabilityNet(nn.Module):
    """uint8 images (B, H, W, C) -> class probabilities (B, K), exactly as `ImageClassifier.predict_probabilities`
    computes them (the network's own `normalize`, the network, the loss's link function).

    Args:
        net: a `lightning_modules.networks.factory.Network` (it carries `normalize`, mean and std).
        probabilities: the loss's logits -> probabilities function (softmax, or sigmoid for one output).
    """

    def __init__(self, net: nn.Module, probabilities: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.net = net
        self.probabilities = probabilities

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.probabilities(self.net(self.net.normalize(images)))  # (B, K) float32

    @classmethod
    def from_classifier(cls, model) -> ProbabilityNet:
        """From a trained `ImageClassifier` (its loss module holds the link function)."""
        return cls(model.net, model.loss_fn.probabilities).eval()
