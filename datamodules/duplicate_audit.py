"""The duplicate audit run inside `ImageDataModule.resolve`: clusters, their categories and the conflict policy.

Per image: a digest of the decoded pixels (exact duplicates, whatever the file format), perceptual hashes
of the cached array and its centred crops, and the stored size (tiny images are linked on identical pixels
only); near-duplicates are clustered with `datamodules.duplicates`. The per-image
hashes are stored in `artifacts/audit/hashes-<geometry>.parquet` keyed by cache slot content, and the
clustering of a whole dataset in `artifacts/audit/<dataset key>.parquet`, so a rerun costs a file read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from datamodules.cache import CachedImages
from datamodules.duplicate_check import FINE_SIZE
from datamodules.duplicates import LOW_DETAIL_SIDE, cluster_images, pixel_digest, variant_hashes
from datamodules.images import ImageDecodeError, load_image

CATEGORIES = ("label_conflict", "leakage", "cross_patient", "redundant")
AUDIT_VERSION = 5  # 2: hashes of centred crops, registration check, star clusters, low-detail images; 3: fine
# check at 256 px; 4: 16 one-sided crops, each image's whole-image hash looked up among the others' crops;
# 5: fine check from 100 px, stranded copies rejoin a star, non-rigid and widely differing pairs refused
# The audit decodes its own 64x64 grayscale copy of every image (one more entry of the decode cache, shared
# by every training size): `duplicates.similarity` compares detail at a fixed fraction of the image, and at
# 32 px distinct phantoms become indistinguishable while at 128 px JPEG and resampling wash the detail out.
AUDIT_GEOMETRY = ((64, 64), 1, "squash")


@dataclass(frozen=True)
class AuditConfig:
    """Duplicate detection settings (`data.audit`).

    Attributes:
        enabled: run the audit when the data is resolved (fit, sweep, audit).
        max_distance: Hamming distance (of 64 bits) within which two hashes are candidates.
        min_similarity: fine-detail correlation under integer shifts that links a candidate pair at once
            (None: link all candidates, hash only).
        min_confirmed: fine-detail correlation after registration, burnt-in marks masked, that links the
            other candidates (crops, rescales, annotations).
    """

    enabled: bool = True
    max_distance: int = 10
    min_similarity: float | None = 0.9
    min_confirmed: float = 0.9


def _key(frame: pl.DataFrame, cfg: AuditConfig, geometry: str) -> str:
    h = hashlib.sha256(json.dumps([AUDIT_VERSION, cfg.max_distance, cfg.min_similarity, cfg.min_confirmed, geometry]).encode())
    for digest in sorted(frame["digest"].to_list()):
        h.update(digest.encode())
    return h.hexdigest()[:16]


def _write(frame: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    frame.write_parquet(tmp)
    os.replace(tmp, path)


def slot_hashes(view: CachedImages, slots: np.ndarray, store: Path, batch: int = 512) -> pl.DataFrame:
    """(slot, digest, phash, variants) for the given cache slots, computing only slots not in `store` yet.

    `phash` is the whole image's hash, `variants` the hashes of it and its crops (`TRIMS`)."""
    known = pl.read_parquet(store) if store.exists() else pl.DataFrame(
        schema={"slot": pl.Int64, "digest": pl.String, "phash": pl.UInt64, "variants": pl.List(pl.UInt64)})
    todo = np.setdiff1d(np.unique(slots), known["slot"].to_numpy())
    if len(todo):
        images = view.open()
        rows = []
        for start in range(0, len(todo), batch):
            part = todo[start : start + batch]
            arrays = np.asarray(images[part])  # (B, H, W, C)
            variants = variant_hashes(arrays)  # (B, len(TRIMS))
            rows.append(pl.DataFrame({"slot": part.astype(np.int64), "digest": [pixel_digest(a) for a in arrays],
                                      "phash": variants[:, 0], "variants": list(variants)},
                                     schema=known.schema))
        known = pl.concat([known, *rows])
        _write(known, store)
    return known.filter(pl.col("slot").is_in(slots.tolist()))


def stored_sides(paths: list[str]) -> np.ndarray:
    """Smaller side in pixels of each file as stored, from its header (0 where the header does not say,
    e.g. DICOM: such images are judged on their pixels only)."""
    out = np.zeros(len(paths), np.int64)
    for k, path in enumerate(paths):
        try:
            with Image.open(path) as img:  # reads the header only
                out[k] = min(img.size)
        except (OSError, ValueError, Image.DecompressionBombError):
            pass
    return out


def fine_loader(paths: list[str]):
    """k -> the file `paths[k]` as the fine check reads it ((FINE_SIZE, FINE_SIZE) float32 grayscale, squashed
    like the audit's 64 px copy), or None if it cannot be read (DICOM without its settings, a moved file)."""
    def load(k: int) -> np.ndarray | None:
        try:
            return load_image(paths[k], (FINE_SIZE, FINE_SIZE), channels=1)[..., 0].astype(np.float32)
        except (ImageDecodeError, OSError, ValueError):
            return None
    return load


def find_clusters(
    frame: pl.DataFrame, view: CachedImages, slots: np.ndarray, cfg: AuditConfig, audit_dir: Path
) -> pl.DataFrame:
    """Add `digest`, `phash`, `exact_id`, `cluster_id` (null for an image with no duplicate) and `low_detail`
    (too little detail to judge: linked on identical pixels only) to `frame`.

    Args:
        frame: one row per image.
        view: the decode cache at `AUDIT_GEOMETRY`.
        slots: the cache slot of each row of `frame` in `view`.
        cfg: thresholds.
        audit_dir: `artifacts/audit`, where hashes and clusterings are kept.
    """
    geometry = "x".join(map(str, view.shape[1:]))
    hashes = slot_hashes(view, slots, audit_dir / f"hashes-{geometry}-v{AUDIT_VERSION}.parquet")
    frame = frame.with_columns(audit_slot=pl.Series(slots, dtype=pl.Int64)).join(
        hashes.rename({"slot": "audit_slot"}), on="audit_slot", how="left")
    key = _key(frame, cfg, geometry)
    stored = audit_dir / f"clusters-{key}.parquet"
    if stored.exists():
        by_digest = pl.read_parquet(stored)
    else:
        uniq = frame.unique("digest", keep="first").sort("digest")
        images = view.open()
        hashes = np.stack(uniq["variants"].to_list()) if uniq.height else np.zeros((0, 1), np.uint64)
        labels, stats = cluster_images(images[uniq["audit_slot"].to_numpy()], hashes, cfg.max_distance,
                                       cfg.min_similarity, cfg.min_confirmed, stored_sides(uniq["path"].to_list()),
                                       fine=fine_loader(uniq["path"].to_list()))
        by_digest = pl.DataFrame({"digest": uniq["digest"], "component": labels, "low_detail": stats["flat"]})
        _write(by_digest, stored)
    frame = frame.join(by_digest, on="digest", how="left")
    exact_n = pl.len().over("digest")
    near_n = pl.len().over("component")
    return frame.with_columns(
        exact_id=pl.when(exact_n > 1).then(pl.col("digest")),
        cluster_id=pl.when(near_n > 1).then(pl.format("c{}", pl.col("component"))),
    ).drop("component", "variants")


def classify(frame: pl.DataFrame) -> pl.DataFrame:
    """One row per cluster: size, whether all copies are pixel-identical, and its categories.

    Categories: `label_conflict` (more than one class), `leakage` (more than one split), `cross_patient`
    (more than one known patient id: one id may be wrong), `redundant` (one class, one split, one patient).

    Args:
        frame: images with `cluster_id`, `label`, `split`, `patient_id`, `relpath`, `path`, `digest`.
    """
    part = frame.filter(pl.col("cluster_id").is_not_null())
    clusters = part.group_by("cluster_id").agg(
        size=pl.len(),
        exact=pl.col("digest").n_unique() == 1,
        classes=pl.col("label").unique().sort(),
        splits=pl.col("split").drop_nulls().unique().sort(),
        patients=pl.col("patient_id").drop_nulls().unique().sort(),
        files=pl.col("relpath").sort_by("relpath"),
        paths=pl.col("path").sort_by("relpath"),
        labels=pl.col("label").sort_by("relpath"),
        split_of=pl.col("split").sort_by("relpath"),
        patient_of=pl.col("patient_id").sort_by("relpath"),
    )
    clusters = clusters.with_columns(
        label_conflict=pl.col("classes").list.len() > 1,
        leakage=pl.col("splits").list.len() > 1,
        cross_patient=pl.col("patients").list.len() > 1,
    ).with_columns(redundant=~(pl.col("label_conflict") | pl.col("leakage") | pl.col("cross_patient")))
    return clusters.sort(["label_conflict", "leakage", "size", "cluster_id"], descending=[True, True, True, False])


def summary(frame: pl.DataFrame, clusters: pl.DataFrame) -> dict:
    """Counts for the one-screen summary and the report."""
    exact = clusters.filter(pl.col("exact"))
    out = {
        "images": frame.height,
        "exact_clusters": exact.height,
        "exact_images": int(exact["size"].sum() or 0),
        "near_clusters": clusters.height - exact.height,
        "near_images": int(clusters.filter(~pl.col("exact"))["size"].sum() or 0),
        "low_detail_images": int(frame["low_detail"].sum() or 0) if "low_detail" in frame.columns else 0,
    }
    for c in CATEGORIES:
        out[c] = int(clusters[c].sum() or 0)
    return out


def summary_text(counts: dict, where: str | None = None, clusters: pl.DataFrame | None = None,
                 manifest_split: bool = False) -> str:
    """The one-screen summary printed at the start of a run; with `clusters`, the files of every
    label-conflict (and, for a manifest's split, leakage) cluster too (see `cluster_lines`)."""
    lines = [
        f"[audit] {counts['images']} images: {counts['exact_clusters']} exact-duplicate clusters "
        f"({counts['exact_images']} images), {counts['near_clusters']} near-duplicate clusters ({counts['near_images']} images)",
        f"[audit] label conflicts {counts['label_conflict']}, leakage across splits {counts['leakage']}, "
        f"across patients {counts['cross_patient']}, redundant {counts['redundant']}",
    ]
    if counts.get("low_detail_images"):
        lines.append(f"[audit] {counts['low_detail_images']} image(s) audited for exact copies only: too little detail "
                     f"for the pixel check to tell a copy from a look-alike (stored under {LOW_DETAIL_SIDE} px a side, "
                     "so upsampled for the audit, or nearly uniform)")
    if counts.get("conflict_action"):
        lines.append(f"[audit] label-conflict policy: {counts['conflict_action']}")
    lines += cluster_lines(clusters, where, manifest_split)
    if where:
        lines.append(f"[audit] details: {where}")
    return "\n".join(lines)


def cluster_lines(clusters: pl.DataFrame | None, where: str | None = None, manifest_split: bool = False,
                  limit: int = 20) -> list[str]:
    """The clusters a user must act on, by file: every label-conflict cluster (and, when the split comes from
    a manifest, every leakage cluster), the first `limit` of each kind, then how many more and where.

    Args:
        clusters: `classify`'s table (None or empty: no lines).
        where: the report or table that lists them all.
        manifest_split: the split is the manifest's own, so leakage is the data's, not the tool's.
        limit: clusters named per kind.
    """
    if clusters is None or clusters.is_empty():
        return []
    kinds = [("label_conflict", "label conflict", "labels")] + ([("leakage", "leakage", "split_of")] if manifest_split else [])
    lines = []
    for column, title, per_file in kinds:
        part = clusters.filter(pl.col(column))
        for row in part.head(limit).iter_rows(named=True):
            files = ", ".join(f"{f} ({v or '-'})" for f, v in zip(row["files"], row[per_file], strict=True))
            lines.append(f"[audit] {title} {row['cluster_id']}: {files}")
        if part.height > limit:
            lines.append(f"[audit] ... and {part.height - limit} more {title} cluster(s)"
                         + (f", all in {where}" if where else ""))
    return lines
