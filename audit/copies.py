"""The copies real datasets hold, and the look-alikes they also hold: generators for the audit's benchmark
(`benchmarks/bench_audit.py`) and tests.

A copy is its source re-exported: cropped (the device frame or UI trimmed differently, up to 5% per side,
each side independently), rescaled (0.8-1.25x, aspect changed by up to 3%), annotated (calipers, text,
arrows burnt in over up to 2% of the pixels) and/or re-encoded as JPEG q=70. Look-alikes are distinct
images of the same anatomy: `smooth_discs` makes the hardest kind, tiny fundus-like photographs stored at
28 px that differ only in colour and vessels; `deformed` the same scan moved a little, like the next slice.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def crop(image: np.ndarray, rng: np.random.Generator, most: float = 0.05) -> np.ndarray:
    """Trim each side by its own random share in [0, `most`] of the image's height/width."""
    h, w = image.shape[:2]
    top, bottom, left, right = (rng.uniform(0, most, 4) * [h, h, w, w]).astype(int)
    return image[top : h - bottom, left : w - right]


def trim(image: np.ndarray, px: int) -> np.ndarray:
    """Trim `px` pixels from every side (the issue's 4-12 px trims of 500-800 px images)."""
    return image[px:-px, px:-px]


def rescale(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Resize by a random factor in [0.8, 1.25], the width by up to 3% more or less than the height."""
    s = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
    fx = s * (1 + rng.uniform(-0.03, 0.03))
    size = (max(1, round(image.shape[1] * fx)), max(1, round(image.shape[0] * s)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)


def marks(image: np.ndarray, rng: np.random.Generator, share: float = 0.02) -> np.ndarray:
    """Burn in white caliper crosses, measurement text and arrows until `share` of the pixels are covered."""
    out = image.copy()
    h, w = image.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    scale = max(h, w) / 500  # stroke and glyph size grow with the image, as a device's overlay does
    thick = max(1, round(2 * scale))
    while np.count_nonzero(mask) < share * h * w:
        x, y = int(rng.uniform(0.05, 0.8) * w), int(rng.uniform(0.1, 0.95) * h)
        kind = rng.integers(3)
        if kind == 0:
            cv2.putText(mask, f"D{rng.integers(1, 9)} {rng.uniform(0.5, 9):.2f}cm", (x, y),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.8 * scale, 255, thick)
        elif kind == 1:
            cv2.drawMarker(mask, (x, y), 255, cv2.MARKER_CROSS, max(3, int(18 * scale)), thick)
        else:
            cv2.arrowedLine(mask, (x, y), (x + int(40 * scale), y + int(25 * scale)), 255, thick)
    out[mask > 0] = 255
    return out


def jpeg(image: np.ndarray, rng: np.random.Generator | None = None, quality: int = 70) -> np.ndarray:
    """Re-encode as JPEG at `quality`."""
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)


def combine(*steps: Transform) -> Transform:
    """The transforms applied in order (a cropped, rescaled, annotated, re-encoded re-export)."""
    def apply(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        for step in steps:
            image = step(image, rng)
        return image
    return apply


TRANSFORMS: dict[str, Transform] = {
    "crop": crop,
    "rescale": rescale,
    "marks": marks,
    "jpeg_q70": jpeg,
    "crop+rescale": combine(crop, rescale),
    "crop+marks": combine(crop, marks),
    "rescale+jpeg": combine(rescale, jpeg),
    "crop+rescale+marks+jpeg": combine(crop, rescale, marks, jpeg),
}


def textured(seed: int, height: int = 256, width: int | None = None) -> np.ndarray:
    """A grayscale image like a scan (distinct per seed): sharp-edged structures of many sizes (organs,
    vessels, bone) over smooth shading, with texture and noise."""
    rng = np.random.default_rng(seed)
    width = width or height
    field = np.zeros((height, width), np.float32)
    for cells, weight in ((5, 1.0), (24, 0.35)):  # shading, then texture
        small = rng.normal(0, 1, (cells, cells)).astype(np.float32)
        field += weight * cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    side = min(height, width)
    for _ in range(40):  # structures from a tenth of the image down to a few pixels
        centre = (int(rng.uniform(0, width)), int(rng.uniform(0, height)))
        axes = tuple(int(side * rng.uniform(0.01, 0.1)) + 1 for _ in range(2))
        cv2.ellipse(field, centre, axes, rng.uniform(0, 180), 0, 360, float(rng.normal(0, 0.8)), -1)
    field = (field - field.min()) / (field.max() - field.min())
    return np.clip(field * 170 + 40 + rng.normal(0, 6, (height, width)), 0, 255).astype(np.uint8)


def deformed(image: np.ndarray, seed: int, amplitude: float = 4.0) -> np.ndarray:
    """A look-alike of `image`: the same anatomy moved smoothly by up to about `amplitude` px (a random
    displacement field on a 6x6 grid, cubic-interpolated), as the next slice of a series moves it. Squashed to
    64 px it agrees with `image` almost everywhere; its fine detail is displaced."""
    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    dx, dy = (cv2.resize(rng.normal(0, amplitude, (6, 6)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
              for _ in range(2))
    x, y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(image, x + dx, y + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def smooth_discs(n: int, seed: int = 0, size: int = 28) -> list[np.ndarray]:
    """`n` distinct fundus-like colour photographs at `size` px: an orange disc on black, a bright optic
    disc and dark vessels, each with its own colour, vessels and spots (drawn at 8x, then shrunk)."""
    rng = np.random.default_rng(seed)
    big = size * 8
    out = []
    for _ in range(n):
        img = np.zeros((big, big, 3), np.uint8)
        colour = (rng.uniform(20, 60), rng.uniform(70, 130), rng.uniform(170, 240))  # BGR orange-red
        cv2.circle(img, (big // 2, big // 2), int(big * rng.uniform(0.44, 0.49)), colour, -1)
        disc = (int(big * rng.uniform(0.3, 0.7)), int(big * rng.uniform(0.35, 0.65)))
        for _ in range(rng.integers(6, 12)):
            end = (int(disc[0] + rng.normal(0, big / 3)), int(disc[1] + rng.normal(0, big / 3)))
            cv2.line(img, disc, end, tuple(c * 0.55 for c in colour), int(rng.integers(3, 9)))
        cv2.circle(img, disc, int(big * 0.07), (150, 220, 250), -1)
        for _ in range(rng.integers(0, 6)):  # lesions
            spot = (int(rng.uniform(0.2, 0.8) * big), int(rng.uniform(0.2, 0.8) * big))
            cv2.circle(img, spot, int(rng.integers(3, 10)), (90, 200, 240), -1)
        out.append(cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA))
    return out
