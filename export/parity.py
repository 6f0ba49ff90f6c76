"""Parity at export: the original model and the exported file on the same images, compared.

The exported file is refused (deleted, `ParityError`) when any probability differs by more than `TOLERANCE`
or any predicted class differs, so a file that exists has passed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from errors import MedselError

TOLERANCE = 1e-4  # fp32: a correct export differs by ~1e-7; anything near 1e-4 is a different computation


class ParityError(MedselError):
    """The exported model's answers differ from the original's."""


@dataclass
class Parity:
    """What the check measured.

    Attributes:
        images: how many images were compared.
        source: where they came from ("test split" or "random uint8 images, seed 0").
        batch_sizes: the batch sizes run (the batch axis is dynamic: more than one proves it).
        max_abs_diff: largest |p_original - p_exported| over every image and class.
        argmax_mismatches: images whose predicted class differs.
        tolerance: the limit on max_abs_diff.
    """

    images: int
    source: str
    batch_sizes: list[int]
    max_abs_diff: float
    argmax_mismatches: int
    tolerance: float = TOLERANCE

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.argmax_mismatches == 0

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def compare(reference: torch.nn.Module, exported: Callable[[np.ndarray], np.ndarray],
            batches: Iterable[torch.Tensor], source: str) -> Parity:
    """Run every uint8 (B, H, W, C) batch through both; the figures of the comparison."""
    worst, mismatches, n, sizes = 0.0, 0, 0, []
    with torch.inference_mode():
        for images in batches:
            expected = reference(images).float().numpy()  # (B, K)
            got = exported(np.ascontiguousarray(images.numpy()))
            worst = max(worst, float(np.abs(expected - got).max()))
            mismatches += int((expected.argmax(1) != got.argmax(1)).sum())
            n += len(images)
            sizes.append(len(images))
    if n == 0:
        raise ParityError(f"no images to compare on ({source}): pass --parity random")
    return Parity(n, source, sorted(set(sizes)), worst, mismatches)


def require(parity: Parity, what: str) -> None:
    """Raise ParityError naming the figures unless the check passed."""
    if not parity.passed:
        raise ParityError(
            f"{what} does not reproduce the model on {parity.images} images ({parity.source}): max probability "
            f"difference {parity.max_abs_diff:.2e} (limit {parity.tolerance:.0e}), {parity.argmax_mismatches} "
            "predicted classes differ. Nothing was written; report this network and format as a bug."
        )
