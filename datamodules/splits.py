"""Train/val/test splits as data: computed once from a seed, written to parquet, read back by every process.

A split file is named by a hash of everything it depends on (the file list with labels and patient ids,
the ratios, the seed, the method), so the same inputs always map to the same file, a rerun or another
DDP rank reads exactly the rows the first one wrote, and changed inputs can never reuse a stale split.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from errors import DataError

SPLITS = ("train", "val", "test")
PRESETS = {"70/20/10": (0.7, 0.2, 0.1), "80/10/10": (0.8, 0.1, 0.1)}
_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test", "holdout": "test",
}
SPLIT_FORMAT_VERSION = 2  # 2: grouped splits spread patient sizes (older split files are not reused)


@dataclass
class SplitConfig:
    """How the images are divided.

    Attributes:
        ratios: train/val/test fractions: a preset ("70/20/10", "80/10/10"), any "a/b/c" string, or a list.
        seed: the split's random seed; the same seed and inputs always give the same split file.
        group_by_patient: keep all images of a patient in one split when `patient_id` is known.
        use_manifest_split: take the manifest's own `split` column (train/val/test) instead of computing one.
        group_by: what keeps images together in one split: `patient_id` and/or `near_duplicates` (the
            audit's clusters, so a duplicate never sits in two splits). Images linked by either key form
            one group.
        folds: k-fold cross-validation when >= 2: the test split is held out once (by `ratios`' test share,
            or the manifest's own test rows), and every other image goes to one of `folds` stratified,
            grouped folds (the train/val shares of `ratios` are then unused). The folds are a column of
            the split file, so every fold of every run sees the same assignment.
        fold: with `folds`: the fold validated on (0 .. folds-1; the others train), or "all" to train on
            every non-test image with no validation split (a cross-validated winner's final refit).
    """

    ratios: str | list[float] = "70/20/10"
    seed: int = 42
    group_by_patient: bool = True
    use_manifest_split: bool = False
    group_by: list[str] = field(default_factory=lambda: ["patient_id", "near_duplicates"])
    folds: int = 0
    fold: int | Literal["all"] | None = None

    def check(self) -> None:
        """Raise DataError naming the key when `folds`/`fold` cannot work together."""
        if self.folds == 1 or self.folds < 0:
            raise DataError(f"data.split.folds must be 0 (no cross-validation) or at least 2, got {self.folds}")
        if self.folds >= 2:
            if self.fold is None:
                raise DataError(f"data.split.folds is {self.folds} but data.split.fold is not set: choose the "
                                f"validation fold (0..{self.folds - 1}), or 'all' to train on every non-test image")
            if self.fold != "all" and not (isinstance(self.fold, int) and not isinstance(self.fold, bool)
                                           and 0 <= self.fold < self.folds):
                raise DataError(f"data.split.fold must be 0..{self.folds - 1} or 'all', got {self.fold!r}")
        elif self.fold is not None:
            raise DataError(f"data.split.fold is {self.fold!r} but data.split.folds is {self.folds}: set "
                            "data.split.folds (e.g. 5) for cross-validation, or leave fold unset")


GROUP_KEYS = {"patient_id": "patient_id", "near_duplicates": "cluster_id"}


def group_by_keys(frame: pl.DataFrame, cfg: SplitConfig) -> np.ndarray | None:
    """Group label per row joining every image that shares a patient id or a duplicate cluster (per
    `cfg.group_by`); None when no row shares a key, so a plain stratified split applies."""
    unknown = sorted(set(cfg.group_by) - set(GROUP_KEYS))
    if unknown:
        raise DataError(f"data.split.group_by: unknown key(s) {unknown}; allowed: {sorted(GROUP_KEYS)}")
    cols = [GROUP_KEYS[k] for k in cfg.group_by if GROUP_KEYS[k] in frame.columns
            and (k != "patient_id" or cfg.group_by_patient)]
    n = frame.height
    rows, cols_idx, offset = [], [], n
    for c in cols:  # bipartite graph rows <-> key values; its components are the groups
        known = np.flatnonzero(~frame[c].is_null().to_numpy())
        values, codes = np.unique(frame[c].cast(pl.String).to_numpy()[known].astype(str), return_inverse=True)
        rows.append(known)
        cols_idx.append(offset + codes.reshape(-1))
        offset += len(values)
    if not rows or not sum(len(r) for r in rows):
        return None
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    r, k = np.concatenate(rows), np.concatenate(cols_idx).astype(np.int64)
    size = int(max(n, k.max() + 1))
    _, labels = connected_components(coo_matrix((np.ones(len(r)), (r, k)), shape=(size, size)), directed=False)
    return np.array([f"g{v}" for v in labels[:n]], dtype=object)


def parse_ratios(ratios: str | list[float] | tuple[float, ...]) -> tuple[float, float, float]:
    """'70/20/10', '0.8/0.1/0.1' or [0.7, 0.2, 0.1] -> (0.7, 0.2, 0.1); refuses what cannot be a split."""
    if isinstance(ratios, str):
        if ratios in PRESETS:
            return PRESETS[ratios]
        try:
            values = [float(x) for x in ratios.split("/")]
        except ValueError:
            raise DataError(f"data.split.ratios: cannot read {ratios!r}; use e.g. '70/20/10' or [0.7, 0.2, 0.1]") from None
        if sum(values) > 1.5:  # given as percentages
            values = [v / 100 for v in values]
    else:
        values = [float(x) for x in ratios]
    if len(values) != 3:
        raise DataError(f"data.split.ratios needs three numbers (train/val/test), got {ratios!r}")
    if any(v < 0 for v in values) or values[0] <= 0:
        raise DataError(f"data.split.ratios: {ratios!r} must be non-negative with a positive train share")
    if abs(sum(values) - 1.0) > 1e-6:
        raise DataError(
            f"data.split.ratios {ratios!r} sum to {sum(values):.4g}, not 1. Use e.g. '70/20/10' or '80/10/10'."
        )
    return values[0], values[1], values[2]


def _targets(n: int, ratios: tuple[float, float, float]) -> np.ndarray:
    """Largest-remainder allocation of n items to the splits: each within one item of n * ratio."""
    raw = np.array(ratios) * n
    out = np.floor(raw).astype(int)
    for k in np.argsort(-(raw - out), kind="stable")[: n - out.sum()]:
        out[k] += 1
    return out


def _ratio_text(ratios: tuple[float, float, float]) -> str:
    return "/".join(f"{100 * r:g}" for r in ratios)


def _what(names: tuple[str, ...], ratios) -> str:
    if names != SPLITS:
        return f"{len(names)}-fold cross-validation (of the images outside the test split)"
    if ratios[1] == 0:
        return f"{100 * ratios[2]:g}% test hold-out before cross-validation"
    return f"{_ratio_text(ratios)} split"


def _part(names: tuple[str, ...], k: int) -> str:
    return names[k] if names == SPLITS else f"fold {names[k]}"


def _stratified(labels: np.ndarray, classes: list[str], ratios, rng: np.random.Generator,
                names: tuple[str, ...] = SPLITS) -> np.ndarray:
    """Each class shuffled and cut into `names` parts in proportion to `ratios`."""
    out = np.empty(len(labels), dtype=object)
    for c in classes:
        idx = np.flatnonzero(labels == c)
        t = _targets(len(idx), ratios)
        if any(t[k] == 0 for k in range(len(ratios)) if ratios[k] > 0):
            need = int(np.ceil(1 / min(r for r in ratios if r > 0)))
            raise DataError(
                f"class '{c}' has {len(idx)} images: too few to stratify a {_what(names, ratios)} "
                f"(every part needs at least one; that takes about {need}). Add images, merge the class, "
                "or change data.split.ratios / data.split.folds (a sweep's cv.folds)."
            )
        perm = rng.permutation(idx)
        ends = np.cumsum(t)
        for k, name in enumerate(names):
            out[perm[ends[k] - t[k] : ends[k]]] = name
    return out


def _place(g: int, counts: np.ndarray, targets: np.ndarray, current: np.ndarray, allowed: np.ndarray) -> int:
    """The split for group `g`: least overflow of the per-class image targets, then least relative fill.

    Filling every split in proportion to its target (rather than the one missing the most images, which
    is always train) is what spreads big and small patients alike: taken largest first, the k-th largest
    group goes to whichever split is proportionally emptiest.
    """
    vec = counts[g]
    overflow = np.maximum(current + vec - targets, 0).sum(1)
    mask = vec > 0
    fill = current[:, mask].sum(1) / np.maximum(targets[:, mask].sum(1), 1)
    score = np.where(allowed, overflow * 1_000_000.0 + fill, np.inf)
    return int(np.argmin(score))


def _grouped(labels: np.ndarray, groups: np.ndarray, classes: list[str], ratios, rng,
             names: tuple[str, ...] = SPLITS) -> np.ndarray:
    """Stratified split where no group (patient) spans two splits, with alike patients in every split.

    First, for every class, each split with a positive ratio is seeded with one group of that class (the
    smallest groups go to the smallest splits), so any feasible assignment is found: a class of 3 patients
    under 70/20/10 splits one patient per split. Then the other groups, largest first (random order among
    equal sizes), go where they overflow the per-class image targets least, ties to the proportionally
    emptiest split (`_place`); single-image groups come last and fill the targets exactly. Each split thus
    gets its share of big and small patients, so images per patient are alike across splits (a split of
    mostly single-image patients would be easier than deployment).
    """
    cidx = {c: i for i, c in enumerate(classes)}
    uniq, inverse = np.unique(groups, return_inverse=True)
    counts = np.zeros((len(uniq), len(classes)), dtype=int)
    np.add.at(counts, (inverse, np.array([cidx[x] for x in labels])), 1)
    targets = np.stack([_targets(int(counts[:, k].sum()), ratios) for k in range(len(classes))], axis=1)
    allowed = np.array([r > 0 for r in ratios])
    current = np.zeros_like(targets)
    where = np.full(len(uniq), -1)
    order = rng.permutation(len(uniq))
    order = order[np.argsort(-counts[order].sum(1), kind="stable")]  # largest first, random among equals
    for k in np.argsort(counts.sum(0), kind="stable"):  # rarest class first: it has the fewest groups to spare
        for s in sorted(np.flatnonzero(allowed), key=lambda s: ratios[s]):
            if current[s, k] > 0:
                continue
            free = [g for g in order[::-1] if where[g] < 0 and counts[g, k] > 0]  # smallest first
            if free:
                where[free[0]] = s
                current[s] += counts[free[0]]
    for g in order:
        if where[g] < 0:
            where[g] = _place(g, counts, targets, current, allowed)
            current[where[g]] += counts[g]
    for k, c in enumerate(classes):
        empty = [_part(names, s) for s in range(len(names)) if ratios[s] > 0 and current[s, k] == 0]
        if empty:
            n_groups = int((counts[:, k] > 0).sum())
            raise DataError(
                f"class '{c}' has {int(counts[:, k].sum())} images from {n_groups} patients: too few to give "
                f"every part of a patient-grouped {_what(names, ratios)} one ({', '.join(empty)} would be "
                "empty). Add patients, set data.split.group_by_patient: false (accepting leakage), or change "
                "data.split.ratios / data.split.folds (a sweep's cv.folds)."
            )
    return np.array(names, dtype=object)[where[inverse]]


def split_key(frame: pl.DataFrame, cfg: SplitConfig, classes: list[str]) -> str:
    """Hash of everything the split depends on; names the split file."""
    h = hashlib.sha256()
    h.update(json.dumps({
        "v": SPLIT_FORMAT_VERSION, "ratios": parse_ratios(cfg.ratios), "seed": cfg.seed,
        "group": cfg.group_by_patient, "manifest": cfg.use_manifest_split, "classes": classes,
        **({"group_by": sorted(cfg.group_by)} if "cluster_id" in frame.columns else {}),
        **({"folds": cfg.folds} if cfg.folds >= 2 else {}),
    }, sort_keys=True).encode())
    keys = [c for c in ("relpath", "label", "patient_id", "split", "cluster_id") if c in frame.columns]
    for row in frame.select(keys).sort("relpath").iter_rows():
        h.update(("\x1f".join("" if v is None else v for v in row) + "\x1e").encode())
    return h.hexdigest()[:16]


def compute_split(frame: pl.DataFrame, cfg: SplitConfig, classes: list[str]) -> pl.DataFrame:
    """Assign every row of `frame` (relpath, label, patient_id, split) to train/val/test.

    Rows are sorted by relative path first, so the result depends on the files and the seed only, not on
    the order a manifest or the file system lists them in.
    """
    frame = frame.sort("relpath")
    if cfg.use_manifest_split:
        raw = frame["split"].to_list()
        bad = sorted({str(v) for v in raw if v is None or str(v).strip().lower() not in _ALIASES})
        if bad:
            raise DataError(
                f"data.split.use_manifest_split is on but the manifest's split column has values {bad[:10]}; "
                "each row needs one of train/val/test (aliases: training, valid, validation, testing)."
            )
        assigned = [_ALIASES[str(v).strip().lower()] for v in raw]
    else:
        ratios = parse_ratios(cfg.ratios)
        if cfg.folds >= 2:  # only the test share matters: the rest is cut into folds below
            ratios = (1.0 - ratios[2], 0.0, ratios[2])
        assigned = _assign(frame, cfg, classes, ratios, SPLITS)
    out = frame.select("relpath", "label", "patient_id").with_columns(split=pl.Series(list(assigned), dtype=pl.String))
    if cfg.folds >= 2:
        held = np.array([a == "test" for a in assigned])
        rest = frame.filter(pl.Series(~held))
        names = tuple(str(k) for k in range(cfg.folds))
        folds = np.full(frame.height, None, dtype=object)
        folds[~held] = _assign(rest, cfg, classes, (1.0 / cfg.folds,) * cfg.folds, names, seed_offset=1)
        out = out.with_columns(fold=pl.Series([None if f is None else int(f) for f in folds], dtype=pl.Int32))
    return out


def _assign(frame: pl.DataFrame, cfg: SplitConfig, classes: list[str], ratios, names: tuple[str, ...],
            seed_offset: int = 0) -> np.ndarray:
    """Stratified (and, where rows share a patient or duplicate cluster, grouped) assignment to `names`."""
    rng = np.random.default_rng([cfg.seed, seed_offset] if seed_offset else cfg.seed)
    labels = frame["label"].to_numpy().astype(object)
    groups = group_by_keys(frame, cfg)  # an image with no shared key is its own group: it cannot leak
    if groups is not None:
        return _grouped(labels, groups, classes, ratios, rng, names)
    return _stratified(labels, classes, ratios, rng, names)


def apply_fold(split: pl.DataFrame, cfg: SplitConfig) -> pl.DataFrame:
    """The split file's rows as one run sees them: under cross-validation the chosen fold is `val` and the
    other folds `train` (fold "all": every non-test row trains; there is no `val`). Without folds, as is."""
    if cfg.folds < 2:
        return split
    if "fold" not in split.columns:
        raise DataError("data.split.folds is set but the split file has no fold column; delete it to recompute")
    if cfg.fold == "all":
        role = pl.when(pl.col("split") == "test").then(pl.lit("test")).otherwise(pl.lit("train"))
    else:
        role = (pl.when(pl.col("split") == "test").then(pl.lit("test"))
                .when(pl.col("fold") == cfg.fold).then(pl.lit("val")).otherwise(pl.lit("train")))
    return split.with_columns(split=role)


def write_split(split: pl.DataFrame, path: Path, meta: dict) -> None:
    """Atomic write with the seed, ratios and key in the parquet metadata (identical bytes for identical input)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    split.write_parquet(tmp, metadata={k: json.dumps(v) for k, v in sorted(meta.items())}, statistics=False)
    os.replace(tmp, path)


def read_split_metadata(path: Path) -> dict:
    return {k: json.loads(v) for k, v in pl.read_parquet_metadata(path).items() if k in {
        "key", "seed", "ratios", "group_by_patient", "use_manifest_split", "classes", "source", "assignment_hash",
        "folds",
    }}


def load_or_create(
    frame: pl.DataFrame, cfg: SplitConfig, classes: list[str], splits_dir: Path, name: str, source: str
) -> tuple[Path, pl.DataFrame]:
    """Return the split file for these inputs, computing and writing it only if it does not exist yet."""
    key = split_key(frame, cfg, classes)
    path = splits_dir / f"{name}-{key}.parquet"
    if not path.exists():
        split = compute_split(frame, cfg, classes)
        cols = ["relpath", "split", *(["fold"] if "fold" in split.columns else [])]
        assignment = hashlib.sha256(
            "".join("\x1f".join(map(str, row)) + "\x1e" for row in split.select(cols).iter_rows()).encode()
        ).hexdigest()[:16]
        write_split(split, path, {
            "key": key, "seed": cfg.seed, "ratios": list(parse_ratios(cfg.ratios)),
            "group_by_patient": cfg.group_by_patient, "use_manifest_split": cfg.use_manifest_split,
            "classes": classes, "source": source, "assignment_hash": assignment,
            **({"folds": cfg.folds} if cfg.folds >= 2 else {}),
        })
    return path, pl.read_parquet(path)


def count_table(split: pl.DataFrame, classes: list[str]) -> pl.DataFrame:
    """Per-split class counts: one row per class, a column per split, plus totals."""
    counts = split.group_by("label", "split").len()
    rows = []
    for c in [*classes, "total"]:
        sub = counts if c == "total" else counts.filter(pl.col("label") == c)
        row = {"class": c}
        for s in SPLITS:
            row[s] = int(sub.filter(pl.col("split") == s)["len"].sum())
        row["all"] = sum(row[s] for s in SPLITS)
        rows.append(row)
    return pl.DataFrame(rows)
