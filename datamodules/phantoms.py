"""The embedded default dataset: synthetic chest-X-ray-like phantoms in the four classes of the CHD study.

It exists so that the main job and the tests run on a fresh machine with no data and no download. The
classes differ the way the study describes them, with overlap so that it is not trivial:

- normal: small heart, few pulmonary vessel markings;
- ASD: heart enlarged towards the patient's right (image left), many vessel markings;
- VSD: heart enlarged and elongated towards the patient's left (image right), many vessel markings;
- PDA: near-normal heart with a prominent aortic knob above it, moderately increased vessel markings.

`render` also returns the heart/knob mask: the class-defining region a heat map should point at.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from datamodules.cache import file_lock

CLASSES = ("normal", "ASD", "VSD", "PDA")
GENERATOR_VERSION = 3
# (heart centre x, heart half-width, heart half-height, vessel count, knob radius); x grows to image right
_CLASS_SHAPE = {
    "normal": (0.05, 0.26, 0.20, 6, 0.0),
    "ASD": (-0.03, 0.31, 0.21, 9, 0.0),
    "VSD": (0.10, 0.32, 0.24, 9, 0.0),
    "PDA": (0.05, 0.27, 0.20, 8, 0.075),
}


def _ellipse(xx, yy, cx, cy, rx, ry):
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def render(label: str, index: int, size: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Render one phantom.

    Args:
        label: one of `CLASSES`.
        index: image number within the class; with `seed` it fixes every random choice.
        size: output height and width in pixels.
        seed: dataset seed.

    Returns:
        (image, mask): (size, size) uint8 radiograph and (size, size) bool mask of the heart and aortic knob.
    """
    rng = np.random.default_rng([seed, CLASSES.index(label), index])
    hx, hw, hh, n_vessels, knob = _CLASS_SHAPE[label]
    jitter = lambda s: 1.0 + rng.normal(0, s)  # noqa: E731
    yy, xx = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    xx = xx + rng.normal(0, 0.03)  # patient position
    yy = yy + rng.normal(0, 0.03)
    img = np.full((size, size), 0.04)
    img[_ellipse(xx, yy, 0, 0.05, 0.86 * jitter(0.03), 0.97)] = 0.36
    lungs = _ellipse(xx, yy, -0.38, -0.08, 0.3, 0.55) | _ellipse(xx, yy, 0.38, -0.08, 0.3, 0.55)
    img[lungs] = 0.13
    img[(np.abs(xx) < 0.08) & (yy < 0.75)] = 0.5  # spine and mediastinum
    for k in range(6):  # ribs: faint arcs over the lungs
        y0 = -0.55 + 0.2 * k
        arc = np.abs(yy - (y0 + 0.12 * xx**2)) < 0.018
        img[arc & lungs] += 0.06
    heart = _ellipse(xx, yy, hx + rng.normal(0, 0.04), 0.33 * jitter(0.05), hw * jitter(0.1), hh * jitter(0.1))
    if knob > 0:
        heart |= _ellipse(xx, yy, 0.17 * jitter(0.1), -0.14 * jitter(0.1), knob * jitter(0.1), knob * jitter(0.1))
    img[heart] = 0.62
    vessels = np.zeros((size, size), np.float32)
    for side in (-1, 1):
        hilum = np.array([side * 0.16, -0.05])
        for _ in range(int(round(n_vessels * jitter(0.3)))):
            angle = rng.uniform(-0.6 * np.pi, 0.6 * np.pi) + (np.pi if side < 0 else 0)
            length = rng.uniform(0.25, 0.5)
            end = hilum + length * np.array([np.cos(angle), np.sin(angle)])
            p0, p1 = ((hilum + 1) * (size - 1) / 2).astype(int), ((end + 1) * (size - 1) / 2).astype(int)
            cv2.line(vessels, tuple(int(v) for v in p0), tuple(int(v) for v in p1), 0.14, max(1, size // 96))
    img = img + vessels * lungs
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), size / 110)
    img = img * rng.uniform(0.8, 1.2) + rng.normal(0, 0.04, img.shape)  # exposure and quantum noise
    img = np.clip(img, 0, 1) ** rng.uniform(0.85, 1.15)
    return (img * 255).round().astype(np.uint8), heart


def ensure_dataset(root: str | Path, per_class: int = 60, size: int = 128, seed: int = 0) -> Path:
    """Generate the phantom dataset once into `root/<class>/*.png` (deterministic; safe to call concurrently).

    Returns:
        The dataset folder.
    """
    root = Path(root)
    marker = root / ".complete"
    stamp = f"v{GENERATOR_VERSION} n={per_class} size={size} seed={seed}\n"
    if marker.exists() and marker.read_text() == stamp:
        return root
    with file_lock(root.parent / f".{root.name}.lock"):
        if marker.exists() and marker.read_text() == stamp:
            return root
        print(f"[data] generating the embedded demo dataset ({len(CLASSES)} x {per_class} phantoms) in {root}")
        for label in CLASSES:
            folder = root / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                image, _ = render(label, i, size, seed)
                cv2.imwrite(str(folder / f"{label}_{i:03d}.png"), image)
        marker.write_text(stamp)
    return root
