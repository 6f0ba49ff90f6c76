"""`--smoke`, shared by the benchmark scripts: tiny generated data, so each script's code path runs on a CPU in
seconds and prints its ratio lines (whose figures mean nothing at that size). `tests/benchmarks/` runs them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("normal", "covid")


def tiny_folder(root: Path, per_class: int = 24, size: int = 48) -> str:
    """A folder with one sub-folder per class of `CLASSES`: stripes (horizontal vs vertical) under noise, so the
    classes are learnable and no two images are duplicates. Returns its path."""
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            stripes = np.tile((np.arange(size) // rng.integers(2, 6) % 2 * 150 + 50)[:, None], (1, size))
            image = (stripes if c == CLASSES[0] else stripes.T) + rng.normal(0, 25, (size, size))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).convert("RGB").save(root / c / f"{i:03d}.png")
    return str(root)


def tiny_manifest(root: Path, classes: tuple[str, str] = ("NonCOVID", "COVID"), test_share: int = 5) -> str:
    """A CSV manifest (`path,label,official_split`) over `tiny_folder`'s images relabelled as `classes` (COVID-CT's
    by default, so its config applies unchanged), every `test_share`-th image in the official test split."""
    import polars as pl

    folder = Path(tiny_folder(root))
    rows = [(str(p), classes[CLASSES.index(p.parent.name)], "test" if i % test_share == 0 else "train")
            for c in CLASSES for i, p in enumerate(sorted((folder / c).glob("*.png")))]
    manifest = root / "manifest.csv"
    pl.DataFrame(rows, schema=["path", "label", "official_split"], orient="row").write_csv(manifest)
    return str(manifest)
