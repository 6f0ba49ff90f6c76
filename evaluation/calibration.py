"""Calibration: expected calibration error, reliability-diagram bins, temperature scaling.

Temperature scaling (Guo et al. 2017) divides the logits by one scalar T fitted on the validation split;
accuracy is unchanged, confidences become honest. It works from probabilities because
softmax(log p / T) equals softmax(z / T) for the logits z that produced p (also for one sigmoid logit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_calibration_error


@dataclass
class ReliabilityBins:
    """Per confidence bin: mean confidence, accuracy and image count (top-label)."""

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, n_bins: int = 10) -> float:
    """Top-label ECE: count-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    p = torch.as_tensor(probs, dtype=torch.float32)
    return float(multiclass_calibration_error(p, torch.as_tensor(targets), num_classes=p.shape[1], n_bins=n_bins, norm="l1"))


def reliability(probs: np.ndarray, targets: np.ndarray, n_bins: int = 10) -> ReliabilityBins:
    conf = probs.max(1)
    correct = (probs.argmax(1) == targets).astype(float)
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, conf, n_bins) / count
        acc = np.bincount(which, correct, n_bins) / count
    return ReliabilityBins(edges, mean_conf, acc, count)


def fit_temperature(probs: np.ndarray, targets: np.ndarray, max_iter: int = 200) -> float:
    """The temperature minimising the negative log-likelihood of `targets` (fit on validation data).

    Runs under `inference_mode(False)`: it is called from inside Lightning's test loop.
    """
    with torch.inference_mode(False), torch.enable_grad():
        logp = torch.log(torch.as_tensor(probs, dtype=torch.float64).clamp_min(1e-12))
        y = torch.as_tensor(targets, dtype=torch.long)
        log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(logp / log_t.exp(), y)
            loss.backward()
            return loss

        opt.step(closure)
        return float(log_t.detach().exp())


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    logp = np.log(np.clip(probs, 1e-12, 1.0)) / temperature
    logp -= logp.max(1, keepdims=True)
    e = np.exp(logp)
    return e / e.sum(1, keepdims=True)


def nll(probs: np.ndarray, targets: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, 1.0))))
