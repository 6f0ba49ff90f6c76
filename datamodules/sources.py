"""Turn what a user has on disk into one table: `path, label, patient_id, split`.

Two layouts are supported: a folder with one sub-folder per class, or a CSV/parquet manifest. The class
list always comes from the config; folders or labels that are not in it are reported, never promoted to
classes, and every row that cannot be used is collected as a `Problem` so the user sees all of them at once.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from datamodules.images import IMAGE_EXTENSIONS
from errors import DataError

MANIFEST_SUFFIXES = (".csv", ".tsv", ".parquet")
DEFAULT_COLUMNS = {"path": "path", "label": "label", "patient_id": "patient_id", "split": "split"}
SCHEMA = {"path": pl.String, "label": pl.String, "patient_id": pl.String, "split": pl.String}


@dataclass(frozen=True)
class Problem:
    """One unusable input: the file (or manifest row) and what is wrong with it."""

    path: str
    reason: str


@dataclass
class SourceTable:
    """The scanned dataset before images are decoded.

    Attributes:
        frame: one row per usable file: absolute `path`, `label`, `patient_id` (null when unknown), and the
            manifest's own `split` (null when none).
        problems: rows that cannot be used (missing file, unknown label, duplicate).
        notes: things that were deliberately left out (folders not in the class list, excluded masks,
            non-image files) — printed so nothing is dropped silently.
    """

    frame: pl.DataFrame
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _summarise(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _excluded_dir(rel: Path, exclude: list[str]) -> str | None:
    """The first folder (below the class folder, at any depth) whose name matches an exclude pattern."""
    parts = rel.parts[:-1]
    for depth, name in enumerate(parts):
        if any(fnmatch.fnmatch(name, pat) for pat in exclude):
            return "/".join(parts[: depth + 1])
    return None


def scan_folder(root: Path, classes: list[str] | None, exclude: list[str]) -> SourceTable:
    """Scan `root/<class>/**/<image>`; only sub-folders named in `classes` become labels.

    `exclude` patterns are matched against file names and against every folder name below a class
    folder, so `normal/masks/seg_000.png` or `covid/p1/annotations/x.png` never train as the class.
    """
    if not root.is_dir():
        raise DataError(
            f"data.source: folder '{root}' does not exist. Point it at a folder with one sub-folder per "
            "class, or at a CSV/parquet manifest with path,label columns."
        )
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(
            f"data.classes is not set. The class list must be given explicitly; sub-folders of '{root}' are: "
            f"{_summarise(subdirs, 20) or '(none)'}."
        )
    table = SourceTable(frame=pl.DataFrame(schema=SCHEMA))
    ignored = [d for d in subdirs if d not in classes]
    if ignored:
        table.notes.append(f"ignored sub-folders of '{root}' that are not in data.classes: {_summarise(ignored, 20)}")
    loose = sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    if loose:
        table.notes.append(f"ignored {len(loose)} files directly in '{root}' (not in a class folder): {_summarise(loose)}")
    rows: list[tuple[str, str]] = []
    excluded: list[str] = []
    excluded_dirs: dict[str, int] = {}
    non_images: list[str] = []
    for label in classes:
        folder = root / label
        if not folder.is_dir():
            continue  # reported as an empty class by empty_classes
        for f in sorted(folder.rglob("*")):
            if not f.is_file():
                continue
            rel = str(f.relative_to(root))
            skip_dir = _excluded_dir(f.relative_to(folder), exclude)
            if skip_dir is not None:  # e.g. normal/masks/seg_000.png: not an image of the class
                key = f"{label}/{skip_dir}/"
                excluded_dirs[key] = excluded_dirs.get(key, 0) + 1
            elif f.suffix.lower() not in IMAGE_EXTENSIONS:
                non_images.append(rel)
            elif any(fnmatch.fnmatch(f.name, pat) for pat in exclude):
                excluded.append(rel)
            else:
                rows.append((str(f.resolve()), label))
    if excluded_dirs:
        listing = _summarise([f"{d} ({n} files)" for d, n in excluded_dirs.items()], 10)
        table.notes.append(f"excluded {sum(excluded_dirs.values())} files in folders matching data.exclude {exclude}: "
                           f"{listing}")
    if excluded:
        table.notes.append(
            f"excluded {len(excluded)} files matching data.exclude {exclude}: {_summarise(excluded)}"
        )
    if non_images:
        table.notes.append(f"skipped {len(non_images)} files without an image extension: {_summarise(non_images)}")
    table.frame = pl.DataFrame(
        {"path": [r[0] for r in rows], "label": [r[1] for r in rows]}, schema={"path": pl.String, "label": pl.String}
    ).with_columns(patient_id=pl.lit(None, pl.String), split=pl.lit(None, pl.String))
    return table


def read_manifest(path: Path) -> pl.DataFrame:
    try:
        if path.suffix.lower() == ".parquet":
            frame = pl.read_parquet(path)
            return frame.with_columns(pl.all().cast(pl.String))
        sep = "\t" if path.suffix.lower() == ".tsv" else ","
        # All columns as strings: a numeric label "0" must stay the label "0", not the integer 0.
        return pl.read_csv(path, separator=sep, infer_schema=False)
    except Exception as e:  # polars raises several error types for malformed files
        raise DataError(f"data.source: cannot read manifest '{path}': {e}") from None


def scan_manifest(
    manifest: Path, classes: list[str] | None, columns: dict[str, str], root: Path | None
) -> SourceTable:
    """Read a `path,label[,patient_id][,split]` manifest; relative paths resolve against `root`."""
    if not manifest.is_file():
        raise DataError(
            f"data.source: manifest '{manifest}' does not exist (resolved from {Path.cwd()}). "
            "Check the path, or point data.source at a folder with one sub-folder per class."
        )
    frame = read_manifest(manifest)
    cols = {**DEFAULT_COLUMNS, **columns}
    for key in ("path", "label"):
        if cols[key] not in frame.columns:
            raise DataError(
                f"manifest '{manifest}' has no column '{cols[key]}' for the image {key}; its columns are "
                f"{frame.columns}. Rename the column or set data.columns.{key}."
            )
    if not classes:
        found = sorted(frame[cols["label"]].drop_nulls().unique().to_list())
        raise DataError(
            f"data.classes is not set. The class list must be given explicitly; labels in '{manifest}' are: "
            f"{_summarise(found, 20)}."
        )
    picked = {k: pl.col(cols[k]) if cols[k] in frame.columns else pl.lit(None, pl.String) for k in SCHEMA}
    frame = frame.select(**picked).with_columns(pl.col("path").str.strip_chars(), pl.col("label").str.strip_chars())
    base = root if root is not None else manifest.parent
    table = SourceTable(frame=frame)
    problems: list[Problem] = []
    keep: list[bool] = []
    seen: dict[str, int] = {}
    resolved: list[str | None] = []
    for i, (p, label) in enumerate(zip(frame["path"].to_list(), frame["label"].to_list(), strict=True)):
        where = f"{manifest.name} row {i + 2}"  # +2: header line and 1-based rows
        if not p:
            problems.append(Problem(where, "empty path"))
            keep.append(False)
            resolved.append(None)
            continue
        full = Path(p) if Path(p).is_absolute() else base / p
        full_s = str(full.resolve())
        resolved.append(full_s)
        if label is None or label == "":
            problems.append(Problem(full_s, f"{where}: empty label"))
        elif label not in classes:
            problems.append(Problem(full_s, f"{where}: label '{label}' is not in data.classes {classes}"))
        elif full_s in seen:
            problems.append(Problem(full_s, f"{where}: listed again (first at row {seen[full_s] + 2}); a file "
                                            "listed twice could land in two splits"))
        elif not full.is_file():
            problems.append(Problem(full_s, f"{where}: file does not exist"))
        else:
            seen[full_s] = i
            keep.append(True)
            continue
        keep.append(False)
    table.frame = frame.with_columns(path=pl.Series(resolved, dtype=pl.String)).filter(pl.Series(keep))
    table.problems = problems
    return table


def empty_classes(frame: pl.DataFrame, classes: list[str]) -> list[str]:
    """Classes of `data.classes` without a usable image: reported with every other problem in one message."""
    counts = dict(frame.group_by("label").len().iter_rows())
    return [c for c in classes if counts.get(c, 0) == 0]


def is_manifest(source: Path) -> bool:
    return source.suffix.lower() in MANIFEST_SUFFIXES
