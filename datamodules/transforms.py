"""Training augmentations as albumentations pipelines, written in YAML or picked from the studies' presets.

A pipeline is a preset name or a list of `{name: <albumentations transform>, <its arguments>...}`:

    augmentation:
      - {name: Affine, rotate: [-15, 15], scale: [0.9, 1.1], p: 0.7}
      - {name: HorizontalFlip, p: 0.5}

Transforms run on the cached uint8 image at the final input size; normalisation happens on the device
inside the model, so pipelines must not contain `Normalize` or change the image size.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

import albumentations as A
import numpy as np

from errors import DataError

AugmentationSpec = str | list[dict[str, Any]] | None

PRESETS: dict[str, list[dict[str, Any]]] = {
    "none": [],
    # Study 000 (CHD X-rays): rotation, flipping, scaling and brightness adjustments.
    "chd": [
        {"name": "Affine", "rotate": [-10, 10], "scale": [0.9, 1.1], "p": 0.7},
        {"name": "HorizontalFlip", "p": 0.5},
        {"name": "RandomBrightnessContrast", "brightness_limit": 0.15, "contrast_limit": 0.1, "p": 0.5},
    ],
    # Study 001 (COVID CT): rotation, zoom and flips of the slices.
    "ct": [
        {"name": "Affine", "rotate": [-15, 15], "scale": [0.9, 1.15], "p": 0.7},
        {"name": "HorizontalFlip", "p": 0.5},
        {"name": "RandomBrightnessContrast", "brightness_limit": 0.1, "contrast_limit": 0.1, "p": 0.3},
    ],
    # Study 002 (fundus): orientations and zooms with constant fill, channel noise of +-2 grey levels.
    "fundus": [
        {"name": "Affine", "rotate": [-30, 30], "scale": [0.9, 1.2], "border_mode": 0, "fill": 0, "p": 0.8},
        {"name": "HorizontalFlip", "p": 0.5},
        {"name": "GaussNoise", "std_range": [0.0, 0.008], "p": 0.5},
    ],
    # Study 003 (breast ultrasound): mild geometry, speckle-like noise.
    "ultrasound": [
        {"name": "Affine", "rotate": [-10, 10], "scale": [0.95, 1.1], "translate_percent": [-0.05, 0.05], "p": 0.7},
        {"name": "HorizontalFlip", "p": 0.5},
        {"name": "RandomBrightnessContrast", "brightness_limit": 0.1, "contrast_limit": 0.15, "p": 0.5},
        {"name": "MultiplicativeNoise", "multiplier": [0.9, 1.1], "p": 0.3},
    ],
}
_FORBIDDEN = {"Normalize", "ToTensorV2", "ToFloat"}


def _transform_names() -> list[str]:
    return sorted(n for n in dir(A) if isinstance(getattr(A, n), type) and issubclass(getattr(A, n), A.BasicTransform))


def _argument_names(cls: type) -> set[str]:
    params = inspect.signature(cls).parameters
    names = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    schema = getattr(cls, "InitSchema", None)
    return names | set(getattr(schema, "model_fields", {}) or {})


def build_pipeline(spec: AugmentationSpec, size: tuple[int, int], channels: int = 3) -> A.Compose | None:
    """Build and check an augmentation pipeline.

    Args:
        spec: a preset name (see `PRESETS`), a list of transform dicts, or None for none.
        size: (height, width) the pipeline must keep.
        channels: channels of the images it will see.

    Returns:
        The pipeline, or None when there is nothing to do.

    Raises:
        DataError: unknown preset/transform, bad arguments, or a transform that changes the image size.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise DataError(f"data.augmentation: unknown preset '{spec}'. Presets: {sorted(PRESETS)}, or give a list of transforms.")
        steps = PRESETS[spec]
    else:
        steps = list(spec)
    transforms = []
    for i, step in enumerate(steps):
        where = f"data.augmentation[{i}]"
        if not isinstance(step, dict) or "name" not in step:
            raise DataError(f"{where}: each transform is a mapping with a 'name' key, e.g. {{name: HorizontalFlip, p: 0.5}}; got {step!r}")
        kwargs = dict(step)
        name = kwargs.pop("name")
        if name in _FORBIDDEN:
            raise DataError(f"{where}: {name} is applied by the model itself (from the backbone's config); remove it.")
        cls = getattr(A, name, None)
        if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
            close = difflib.get_close_matches(name, _transform_names(), n=3)
            raise DataError(f"{where}: '{name}' is not an albumentations transform." + (f" Did you mean {close}?" if close else ""))
        known = _argument_names(cls)
        unknown = sorted(set(kwargs) - known)
        if unknown:  # albumentations only warns about these; a misspelled key must not pass silently
            hints = {u: difflib.get_close_matches(u, sorted(known), n=1) for u in unknown}
            raise DataError(f"{where} ({name}): unknown argument(s) {unknown}" + "".join(
                f"; did you mean '{h[0]}' for '{u}'?" for u, h in hints.items() if h) + f". Valid: {sorted(known)}")
        try:
            transforms.append(cls(**kwargs))
        except Exception as e:  # albumentations validates with pydantic; its errors are readable
            raise DataError(f"{where} ({name}): invalid arguments {kwargs}: {e}") from None
    if not transforms:
        return None
    pipeline = A.Compose(transforms)
    probe = np.zeros((*size, channels), np.uint8)
    out = pipeline(image=probe)["image"]
    if out.shape[:2] != tuple(size):
        raise DataError(f"data.augmentation changes the image size from {tuple(size)} to {out.shape[:2]}; "
                        "crop/resize transforms must give back data.image_size.")
    return pipeline
