"""The audit report: `audit.html` (self-contained, thumbnails embedded, the evaluation report's style),
`audit.md` with `audit_files/*.png`, and parquet tables for machines.

    <out>/audit.{html,md,json}    counts per category, every cluster side by side, suspected label issues
    <out>/audit_clusters.parquet  one row per duplicate cluster (categories, files, classes, splits, patients)
    <out>/audit_images.parquet    one row per image (cluster, exact-duplicate id, perceptual hash)
    <out>/label_issues.parquet    suspected mislabelled images, ranked (with `--label_issues true`)
    <out>/audit_summary.json      the counts
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import polars as pl

from datamodules.duplicate_audit import CATEGORIES
from datamodules.images import ImageDecodeError, load_image
from evaluation.document import Document

HTML = "audit.html"
SUMMARY = "audit_summary.json"
CLUSTERS = "audit_clusters.parquet"
IMAGES = "audit_images.parquet"
LABEL_ISSUES = "label_issues.parquet"
THUMB = 160
MEANING = {
    "label_conflict": "copies carry different classes: at least one label is wrong, or the classes overlap",
    "leakage": "copies sit in different splits: the test score is inflated by images the model trained on",
    "cross_patient": "copies carry different patient ids: an id is probably wrong, so patient grouping fails",
    "redundant": "copies within one class, split and patient: harmless for validity, they only re-weight",
}


def thumbnail(path: str, out: Path) -> Path | None:
    """A letterboxed PNG thumbnail of an original file (None when it no longer decodes)."""
    try:
        image = load_image(path, (THUMB, THUMB), channels=3, mode="letterbox")
    except ImageDecodeError:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return out


def _counts_table(counts: dict) -> pl.DataFrame:
    rows = [("exact-duplicate clusters", counts["exact_clusters"], f"{counts['exact_images']} images, identical pixels"),
            ("near-duplicate clusters", counts["near_clusters"], f"{counts['near_images']} images, perceptually equal")]
    rows += [(c.replace("_", " "), counts[c], MEANING[c]) for c in CATEGORIES]
    if counts.get("low_detail_images"):
        rows.append(("audited for exact copies only", counts["low_detail_images"],
                     "images, not clusters: too little detail for the pixel check (stored tiny and upsampled, "
                     "or nearly uniform), so linked to another image only when the pixels are identical"))
    return pl.DataFrame(rows, schema=["category", "clusters", "meaning"], orient="row")


def _cluster_section(doc: Document, clusters: pl.DataFrame, files: Path, limit: int) -> None:
    doc.h2("Duplicate clusters")
    if clusters.is_empty():
        doc.p("No exact or near-duplicate images.")
        return
    shown = clusters.head(limit)
    if clusters.height > limit:
        doc.p(f"The first {limit} of {clusters.height} clusters (conflicts and leakage first); all are in `{CLUSTERS}`.")
    for row in shown.iter_rows(named=True):
        tags = [c.replace("_", " ") for c in CATEGORIES if row[c]]
        doc.h3(f"{row['cluster_id']}: {row['size']} {'identical' if row['exact'] else 'near-identical'} images — "
               + ", ".join(tags))
        items = []
        for k, (path, rel) in enumerate(zip(row["paths"], row["files"], strict=True)):
            thumb = thumbnail(path, files / f"{row['cluster_id']}_{k}.png")
            if thumb is not None:
                items.append((thumb, f"{row['labels'][k]} · {row['split_of'][k] or '—'} · "
                                     f"patient {row['patient_of'][k] or '—'} · {rel}"))
        doc.gallery(items)


def _issues_section(doc: Document, issues: pl.DataFrame, files: Path, limit: int) -> None:
    doc.h2("Suspected label issues")
    doc.p("Found with cleanlab (`find_label_issues`) from out-of-fold predicted probabilities, ranked by how "
          "little probability the model gives the given label (self-confidence). Look at each one: a flag is a "
          "suggestion to re-read the image, not a verdict.")
    if issues.is_empty():
        doc.p("No suspected label issues.")
        return
    doc.table(issues.head(limit).select("rank", "relpath", "label", "suggested", "label_probability"))
    items = []
    for row in issues.head(limit).iter_rows(named=True):
        thumb = thumbnail(row["path"], files / f"issue_{row['rank']}.png")
        if thumb is not None:
            items.append((thumb, f"#{row['rank']} given {row['label']}, model says {row['suggested']} "
                                 f"(p(given) = {row['label_probability']:.2f}) · {row['relpath']}"))
    doc.gallery(items)


def write_audit_report(
    out: Path, counts: dict, clusters: pl.DataFrame, images: pl.DataFrame | None = None,
    issues: pl.DataFrame | None = None, title: str = "Data audit", limit: int = 60,
) -> Path:
    """Write the HTML/Markdown report and the parquet tables into `out`; returns the HTML path.

    Args:
        out: output folder (created).
        counts: `datamodules.duplicate_audit.summary` (plus what the conflict policy did).
        clusters: `datamodules.duplicate_audit.classify`.
        images: per-image table (written as parquet when given).
        issues: `audit.label_issues.find_issues` (section left out when None).
        title: the page title.
        limit: most clusters / label issues shown with thumbnails.
    """
    out.mkdir(parents=True, exist_ok=True)
    files = out / "audit_files"
    (out / SUMMARY).write_text(json.dumps(counts, indent=2))
    clusters.write_parquet(out / CLUSTERS)
    if images is not None:
        images.write_parquet(out / IMAGES)
    if issues is not None:
        issues.write_parquet(out / LABEL_ISSUES)
    doc = Document(out)
    doc.h1(title)
    doc.p(f"{counts['images']} images. Near-duplicates: perceptual hashes of the image and of centred crops "
          "within the configured Hamming distance are candidates; a candidate pair is linked when its fine detail "
          "correlates after registration (scale and shift, burnt-in marks masked), and a cluster holds only images "
          "confirmed against one representative, so look-alikes cannot chain (`data.audit`, docs/duplicates.md). "
          "Policies: clusters are a split grouping key "
          "(`data.split.group_by`), label conflicts stop training unless `data.on_conflict` is `drop` or `keep`.")
    if counts.get("conflict_action"):
        doc.p(f"Label-conflict policy applied: **{counts['conflict_action']}**.")
    doc.table(_counts_table(counts))
    _cluster_section(doc, clusters, files, limit)
    if issues is not None:
        _issues_section(doc, issues, files, limit)
    _, page = doc.write(out / "audit", title)
    return page


def add_audit_section(doc: Document, run_dir: Path, out: Path) -> Path | None:
    """Append a run's audit (the one-screen summary and a link) to another report, e.g. a sweep's, and write
    the full audit report into `out`. Nothing happens for runs without an audit (audit disabled).

    Args:
        doc: the report being built.
        run_dir: a run directory holding `runs.files.AUDIT` and `runs.files.AUDIT_CLUSTERS`.
        out: folder for the full audit report (e.g. `<sweep>/audit`).

    Returns:
        The audit HTML, or None.
    """
    from datamodules.duplicate_audit import summary_text
    from runs import files

    counts_file, clusters_file = Path(run_dir) / files.AUDIT, Path(run_dir) / files.AUDIT_CLUSTERS
    if not counts_file.exists() or not clusters_file.exists():
        return None
    counts = json.loads(counts_file.read_text())
    page = write_audit_report(out, counts, pl.read_parquet(clusters_file), title="Data audit")
    doc.h2("Data audit")
    for line in summary_text(counts).splitlines():
        doc.p(line.removeprefix("[audit] "))
    doc.table(_counts_table(counts))
    doc.p(f"Every cluster with thumbnails: `{page.relative_to(doc.base) if page.is_relative_to(doc.base) else page}`.")
    return page
