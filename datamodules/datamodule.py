"""`ImageDataModule`: from a folder or manifest of images to cached, split, augmented batches.

`prepare_data` does the disk work once (scan, decode into the cache, write the split); `setup` reads the
same files back on every process, so every DDP rank and every rerun trains on identical splits.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from datamodules import duplicate_audit, phantoms, run_record, splits
from datamodules.cache import CachedImages, ImageCache
from datamodules.dicom import DicomConfig, dicom_patient_id
from datamodules.duplicate_audit import AuditConfig
from datamodules.images import IMAGE_EXTENSIONS, ResizeMode
from datamodules.sources import (
    Problem,
    SourceTable,
    empty_classes,
    is_manifest,
    read_manifest,
    scan_folder,
    scan_manifest,
)
from datamodules.splits import SplitConfig
from datamodules.transforms import AugmentationSpec, build_pipeline
from errors import ConfigError, DataError

EMBEDDED = "embedded:chd"
# File names and folder names (at any depth below a class folder) that are never training images.
DEFAULT_EXCLUDE = ["*_mask.*", "*_mask_[0-9]*.*", "mask", "masks", "annotations", "segmentation*"]


class CachedImageDataset(Dataset):
    """Images from the memory-mapped cache: (H, W, C) uint8 tensors and integer labels.

    The map is opened lazily in each worker process (never pickled), so all workers read the same pages
    of the OS page cache instead of holding copies.
    """

    def __init__(self, view: CachedImages, slots: np.ndarray, labels: np.ndarray, transform=None):
        self.view = view
        self.slots = slots
        self.labels = labels
        self.transform = transform
        self._images: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.slots)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self._images is None:
            self._images = self.view.open()
        image = self._images[self.slots[i]]  # (H, W, C) read-only view into the map
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        if not (image.flags.writeable and image.flags.c_contiguous):
            image = np.array(image)  # copy out of the map (when no transform already made a new array)
        return torch.from_numpy(image), int(self.labels[i])


def _worker_context() -> mp.context.BaseContext | None:
    """Loader workers fork on Linux, whatever the process's default start method is. A sweep's trial runs in a
    child of the sweep's forkserver, where the default is forkserver (and Python 3.14 makes it the default on
    Linux): every loader, the eval-mode pass at fit end included, then started its workers through a new
    forkserver that imported torch, albumentations and the data modules again, 4 s per loader and 13 s per
    trial at 32 px on COVID-CT (`benchmarks/bench_trials.py`). Forked workers share the parent's imports and
    its memory-mapped cache. Elsewhere (macOS, Windows) the platform's default stays: fork is unsafe there."""
    return mp.get_context("fork") if sys.platform.startswith("linux") else None


def _seed_worker(worker_id: int) -> None:
    """Albumentations keeps its own RNG: give every worker (and every epoch's workers) a distinct stream."""
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if transform is not None:
        transform.set_random_seed(torch.initial_seed() % 2**32)


def _dicom_patient_ids(frame: pl.DataFrame) -> pl.DataFrame:
    """Fill a missing `patient_id` of `.dcm` rows from the file's PatientID header (header only, cheap)."""
    todo = frame.with_row_index("_i").filter(pl.col("patient_id").is_null() & pl.col("path").str.to_lowercase()
                                             .str.ends_with(".dcm"))
    if todo.is_empty():
        return frame
    ids = frame["patient_id"].to_list()
    for i, path in todo.select("_i", "path").iter_rows():
        try:
            with open(path, "rb") as fh:
                ids[i] = dicom_patient_id(fh.read())
        except (OSError, ValueError):
            continue  # unreadable: reported by the decode step
    return frame.with_columns(patient_id=pl.Series(ids, dtype=pl.String))


@dataclass
class ResolvedData:
    """The dataset after scanning, decoding and splitting: what `setup` builds loaders from."""

    frame: pl.DataFrame  # relpath, path, label, patient_id, split, slot, target
    view: CachedImages
    split_file: Path
    skipped: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    clusters: pl.DataFrame | None = None  # duplicate_audit.classify, after the split (None: audit off)
    audit: dict[str, Any] | None = None  # counts, the conflict action and where the tables are


class ImageDataModule(LightningDataModule):
    """Labelled medical images from a folder or manifest, split and cached.

    Args:
        source: a folder with one sub-folder per class, a CSV/TSV/parquet manifest (`path,label` and optional
            `patient_id`, `split`), or "embedded:chd" for the built-in phantom dataset.
        classes: the class names, in the order the model's outputs use. Required except for "embedded:chd".
        image_size: model input size, an int (square) or [height, width].
        channels: 3 for RGB backbones, 1 for grayscale ones.
        resize: "squash" (as the studies) or "letterbox" (keep aspect ratio, pad).
        split: ratios, seed and grouping of the train/val/test split.
        augmentation: preset name or list of albumentations transforms for training.
        batch_size: per-device batch size.
        num_workers: DataLoader worker processes.
        sampler: "shuffle", or "weighted" to draw classes equally often (class imbalance).
        on_bad_image: "error" stops before training listing every bad input; "skip" drops them and writes
            the list to the run directory.
        columns: manifest column names if they differ, e.g. {split: official_split}.
        root: folder that relative manifest paths are relative to (default: the manifest's folder).
        exclude: file- or folder-name patterns never used as images (segmentation masks, `masks/` and
            `annotations/` folders by default); reported.
        predict_source: folder or manifest of images for `predict` (default: the test split).
        source_hint: where to get the data, printed when `source` does not exist (study configs set it).
        artifacts_dir: where caches, splits and the embedded dataset go.
        pin_memory: pin host memory for GPU transfer (default: on when CUDA is available).
        persistent_workers: keep workers alive between epochs (default: on when num_workers > 0).
        audit: exact/near-duplicate detection run when the data is resolved (`datamodules.duplicate_audit`).
        on_conflict: a duplicate cluster spanning two classes "error"s before training (listing every
            cluster), or its images are all "drop"ped, or "keep" trains on them; recorded in the run dir.
        dicom: how `.dcm` files become 8-bit images: `window` (a preset such as lung/mediastinum/bone/brain
            or {center, width}; default the file's own VOI LUT/window) and `frame` for multi-frame files.
    """

    # long: the signature is the data config schema (LightningCLI reads it), one line per setting
    def __init__(
        self,
        source: str = EMBEDDED,
        classes: list[str] | None = None,
        image_size: int | list[int] = 224,
        channels: Literal[1, 3] = 3,
        resize: ResizeMode = "squash",
        split: SplitConfig = SplitConfig(),  # noqa: B008 -- a frozen default, never mutated
        augmentation: AugmentationSpec = "none",
        batch_size: int = 32,
        num_workers: int = 2,
        sampler: Literal["shuffle", "weighted"] = "shuffle",
        on_bad_image: Literal["error", "skip"] = "error",
        columns: dict[str, str] | None = None,
        root: str | None = None,
        exclude: list[str] | None = None,
        predict_source: str | None = None,
        artifacts_dir: str = "artifacts",
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        source_hint: str | None = None,
        audit: AuditConfig = AuditConfig(),  # noqa: B008 -- frozen
        on_conflict: Literal["error", "drop", "keep"] = "error",
        dicom: DicomConfig = DicomConfig(),  # noqa: B008 -- frozen
    ):
        super().__init__()
        if source == EMBEDDED and classes is None:
            classes = list(phantoms.CLASSES)
        self.save_hyperparameters()
        self.source = source
        self.classes = list(classes) if classes is not None else None
        size = [image_size, image_size] if isinstance(image_size, int) else list(image_size)
        if len(size) != 2 or min(size) < 8:
            raise DataError(f"data.image_size must be an int or [height, width] of at least 8 pixels, got {image_size!r}")
        self.image_size = (int(size[0]), int(size[1]))
        self.channels = channels
        self.resize = resize
        self.split_cfg = SplitConfig(**split) if isinstance(split, dict) else split
        self.split_cfg.check()
        self.augmentation = augmentation
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.sampler = sampler
        self.on_bad_image = on_bad_image
        self.columns = columns or {}
        self.root = root
        self.exclude = DEFAULT_EXCLUDE if exclude is None else exclude
        self.predict_source = predict_source
        self.source_hint = source_hint
        self.audit_cfg = AuditConfig(**audit) if isinstance(audit, dict) else audit
        self.on_conflict = on_conflict
        self.dicom = DicomConfig(**dicom) if isinstance(dicom, dict) else dicom
        try:
            self.dicom.center_width()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.artifacts = Path(artifacts_dir)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = num_workers > 0 if persistent_workers is None else persistent_workers
        self.data: ResolvedData | None = None
        self._announced = False
        self.datasets: dict[str, Dataset] = {}
        # Fail on a bad pipeline at config time, not in a worker process an epoch later.
        self.train_transform = build_pipeline(augmentation, self.image_size, channels)

    @property
    def num_classes(self) -> int:
        return len(self.classes or [])

    def _source_path(self) -> Path:
        if self.source == EMBEDDED:
            return phantoms.ensure_dataset(self.artifacts / "datasets" / "chd_phantom")
        return Path(self.source).expanduser()

    def _scan(self, source: Path) -> SourceTable:
        if is_manifest(source):
            root = Path(self.root).expanduser() if self.root else None
            table = scan_manifest(source, self.classes, self.columns, root)
            base = root if root is not None else source.parent
        else:
            table = scan_folder(source, self.classes, self.exclude)
            base = source
        base = base.resolve()
        table.frame = _dicom_patient_ids(table.frame)
        table.frame = table.frame.with_columns(
            relpath=pl.Series([os.path.relpath(p, base) for p in table.frame["path"]], dtype=pl.String)
        )
        return table

    def _cache(self) -> ImageCache:
        return ImageCache(self.artifacts / "cache", self.image_size, self.channels, self.resize, dicom=self.dicom)

    def resolve(self) -> ResolvedData:
        """Scan, decode (once, into the cache), handle bad inputs and load or create the split file."""
        if self.data is not None:
            return self.data
        source = self._source_path()
        if self.source_hint and not source.exists():
            raise DataError(f"data.source '{source}' does not exist. {self.source_hint}")
        table = self._scan(source)
        frame = table.frame
        view, slots, bad = self._cache().resolve(frame["path"].to_list())
        problems = table.problems + [Problem(p, r) for p, r in bad.items()]
        frame = frame.with_columns(slot=pl.Series(slots)).filter(pl.col("slot") >= 0)
        self._stop_on_problems(source, problems if self.on_bad_image == "error" else [],
                               empty_classes(frame, self.classes))
        audit: dict[str, Any] | None = None
        if self.audit_cfg.enabled:
            size, channels, mode = duplicate_audit.AUDIT_GEOMETRY
            audit_view, audit_slots, _ = ImageCache(self.artifacts / "cache", size, channels, mode,
                                                    dicom=self.dicom).resolve(frame["path"].to_list())
            frame = duplicate_audit.find_clusters(frame, audit_view, audit_slots, self.audit_cfg,
                                                  self.artifacts / "audit")
            frame, audit = self._apply_conflict_policy(frame, source)
        name = source.stem if source.is_file() else source.name
        keys = ["relpath", "label", "patient_id", "split"] + (["cluster_id"] if audit is not None else [])
        split_file, split = splits.load_or_create(
            frame.select(keys), self.split_cfg, self.classes, self.artifacts / "splits", name or "dataset", str(source),
        )
        extra = [c for c in ("cluster_id", "exact_id", "digest", "phash", "audit_slot", "low_detail") if c in frame.columns]
        split = splits.apply_fold(split, self.split_cfg)  # under cross-validation: this run's fold is val
        joined = split.join(frame.select("relpath", "path", "slot", *extra), on="relpath", how="left")
        target = {c: i for i, c in enumerate(self.classes)}
        joined = joined.with_columns(target=pl.col("label").replace_strict(target, return_dtype=pl.Int64))
        clusters = None
        if audit is not None:
            clusters = duplicate_audit.classify(joined)
            audit = {**duplicate_audit.summary(joined, clusters), **audit}
        self.data = ResolvedData(joined, view, split_file, problems, table.notes, clusters, audit)
        return self.data

    @staticmethod
    def _stop_on_problems(source: Path, problems: list[Problem], empty: list[str]) -> None:
        """One message with every unusable input and every class left without images."""
        if not problems and not empty:
            return
        lines = [f"  - {p.path}: {p.reason}" for p in problems]
        if empty:  # a model cannot learn, nor be evaluated on, a class it never sees
            lines.append(f"  - data.classes lists {empty} but '{source}' has no usable images for "
                         f"{'it' if len(empty) == 1 else 'them'}: add images, fix the folder/label names, or "
                         "remove the class")
        hint = ("Fix or remove these files, or set data.on_bad_image: skip to train without them "
                f"(the list is then written to the run directory as {run_record.SKIPPED})." if problems else "")
        what = [f"{len(problems)} unusable input(s)"] * bool(problems) + [f"{len(empty)} empty class(es)"] * bool(empty)
        raise DataError(f"{' and '.join(what)} in '{source}'; stopping before training:\n" + "\n".join(lines)
                        + ("\n" + hint if hint else ""))

    def _apply_conflict_policy(self, frame: pl.DataFrame, source: Path) -> tuple[pl.DataFrame, dict[str, Any]]:
        """Stop on, drop or keep duplicate clusters whose copies carry different classes (`data.on_conflict`)."""
        n_labels = pl.col("label").n_unique().over("cluster_id")
        conflicted = frame.filter(pl.col("cluster_id").is_not_null() & (n_labels > 1))
        record: dict[str, Any] = {"on_conflict": self.on_conflict, "conflict_clusters": 0, "dropped": []}
        if conflicted.is_empty():
            return frame, record
        groups = conflicted.sort("relpath").group_by("cluster_id", maintain_order=True).agg("relpath", "label")
        record["conflict_clusters"] = groups.height
        if self.on_conflict == "error":
            listing = "\n".join(
                f"  - cluster {cid}: " + ", ".join(f"{p} ({lab})" for p, lab in zip(paths, labels, strict=True))
                for cid, paths, labels in groups.iter_rows())
            raise DataError(
                f"{groups.height} duplicate cluster(s) in '{source}' carry different classes (the same image "
                f"under two labels):\n{listing}\nFix the labels, remove the copies, or set data.on_conflict: drop "
                "(train without these images) or keep (train on them as they are)."
            )
        if self.on_conflict == "drop":
            record["dropped"] = conflicted["relpath"].sort().to_list()
            frame = frame.filter(~pl.col("relpath").is_in(record["dropped"]))
            self._stop_on_problems(source, [], empty_classes(frame, self.classes))
        record["conflict_action"] = (f"{self.on_conflict}: {groups.height} cross-class cluster(s)"
                                     + (f", {len(record['dropped'])} images dropped" if record["dropped"] else ""))
        return frame, record

    def prepare_data(self) -> None:
        self.resolve()

    def setup(self, stage: str | None = None) -> None:
        data = self.resolve()
        if not self._announced:
            self._announced = True
            for note in data.notes:
                rank_zero_info(f"[data] note: {note}")
            if data.skipped:
                rank_zero_info(f"[data] skipped {len(data.skipped)} unusable inputs (data.on_bad_image: skip)")
            fold = self.split_cfg.fold
            which = ("" if self.split_cfg.folds < 2 else f" (cross-validation: fold {fold} of 0..{self.split_cfg.folds - 1} "
                     "validates)" if fold != "all" else " (cross-validation: every non-test image trains, no validation)")
            rank_zero_info(f"[data] split {data.split_file}{which}\n{splits.count_table(data.frame, self.classes)}")
            if data.audit is not None:
                trainer = getattr(self, "trainer", None)
                where = str(Path(trainer.default_root_dir) / run_record.AUDIT_CLUSTERS) if trainer is not None else None
                rank_zero_info(duplicate_audit.summary_text(data.audit, where, data.clusters,
                                                            self.split_cfg.use_manifest_split))
            self._record_in_run_dir(data)
            trainer = getattr(self, "trainer", None)
            if trainer is not None and trainer.world_size > 1:  # one line per rank: they must all agree
                meta = splits.read_split_metadata(data.split_file)
                print(f"[data] rank {trainer.global_rank}/{trainer.world_size} uses split {data.split_file.name} "
                      f"assignment {meta['assignment_hash']}", flush=True)
        for name in splits.SPLITS:
            if name not in self.datasets:
                part = data.frame.filter(pl.col("split") == name)
                transform = self.train_transform if name == "train" else None
                self.datasets[name] = CachedImageDataset(
                    data.view, part["slot"].to_numpy(), part["target"].to_numpy(), transform
                )
        if self.train_transform is not None:
            self.train_transform.set_random_seed(torch.initial_seed() % 2**32)

    def _record_in_run_dir(self, data: ResolvedData) -> None:
        """Write the split reference, class counts and skipped inputs next to the run's checkpoints."""
        trainer = getattr(self, "trainer", None)
        # default_root_dir is the run directory; trainer.log_dir would broadcast, and only rank 0 gets here.
        if trainer is None or trainer.global_rank != 0:
            return
        run_dir = Path(trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        meta = splits.read_split_metadata(data.split_file)
        fold = {"fold": self.split_cfg.fold} if self.split_cfg.folds >= 2 else {}
        (run_dir / run_record.SPLIT).write_text(
            json.dumps({"file": str(data.split_file.resolve()), **meta, **fold}, indent=2)
        )
        splits.count_table(data.frame, self.classes).write_csv(run_dir / run_record.SPLIT_COUNTS)
        if data.skipped:
            pl.DataFrame(
                {"path": [p.path for p in data.skipped], "reason": [p.reason for p in data.skipped]}
            ).write_csv(run_dir / run_record.SKIPPED)
        if data.audit is not None:
            (run_dir / run_record.AUDIT).write_text(json.dumps(data.audit, indent=2))
            data.clusters.write_parquet(run_dir / run_record.AUDIT_CLUSTERS)

    def class_counts(self, split: str = "train") -> list[int]:
        """Images per class in one split, in `classes` order (for class-weighted losses)."""
        frame = self.resolve().frame.filter(pl.col("split") == split)
        counts = dict(frame.group_by("target").len().iter_rows())
        return [int(counts.get(i, 0)) for i in range(self.num_classes)]

    def _loader(self, name: str, train: bool = False, dataset: Dataset | None = None) -> DataLoader:
        if dataset is None:
            if name not in self.datasets:
                self.setup()
            dataset = self.datasets[name]
        if len(dataset) == 0:
            raise DataError(f"the {name} split is empty; check data.split.ratios and the split table above.")
        kwargs: dict[str, Any] = dict(
            batch_size=self.batch_size, num_workers=self.num_workers, pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            worker_init_fn=_seed_worker if self.num_workers > 0 else None,
            multiprocessing_context=_worker_context() if self.num_workers > 0 else None,
        )
        if train:
            world = getattr(getattr(self, "trainer", None), "world_size", 1) or 1
            # A final batch of one image breaks BatchNorm in training; drop it only in that case.
            kwargs["drop_last"] = (len(dataset) // world) % self.batch_size == 1
            if self.sampler == "weighted":
                labels = torch.as_tensor(dataset.labels)
                weights = 1.0 / torch.bincount(labels, minlength=self.num_classes).clamp_min(1).double()
                kwargs["sampler"] = WeightedRandomSampler(weights[labels], len(labels), replacement=True)
            else:
                kwargs["shuffle"] = True
        return DataLoader(dataset, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        if self.predict_source is None:
            return self._loader("test")
        return self._loader("predict", dataset=self.predict_dataset())

    def predict_dataset(self) -> CachedImageDataset:
        """Unlabelled images from `predict_source` (a folder, searched recursively, or a manifest's path column)."""
        src = Path(self.predict_source).expanduser()
        if is_manifest(src):
            manifest = read_manifest(src)
            col = self.columns.get("path", "path")
            if col not in manifest.columns:
                raise DataError(f"data.predict_source: manifest '{src}' has no '{col}' column (columns: {manifest.columns})")
            paths = [str((src.parent / p).resolve()) if not Path(p).is_absolute() else p for p in manifest[col].to_list()]
        elif src.is_dir():
            paths = sorted(str(p.resolve()) for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            raise DataError(f"data.predict_source '{src}' is neither a folder nor a CSV/parquet manifest")
        if not paths:
            raise DataError(f"data.predict_source '{src}' contains no images")
        view, slots, bad = self._cache().resolve(paths)
        if bad and self.on_bad_image == "error":
            listing = "\n".join(f"  - {p}: {r}" for p, r in bad.items())
            raise DataError(f"{len(bad)} unusable image(s) in '{src}':\n{listing}\nFix them or set data.on_bad_image: skip.")
        keep = slots >= 0
        self.predict_paths = [p for p, k in zip(paths, keep, strict=True) if k]
        return CachedImageDataset(view, slots[keep], np.full(int(keep.sum()), -1), None)

    def has_split(self, split: str) -> bool:
        return bool((self.resolve().frame["split"] == split).any())

    def split_paths(self, split: str) -> list[str]:
        return self.resolve().frame.filter(pl.col("split") == split)["path"].to_list()
