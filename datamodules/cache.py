"""Decode every image once: a content-addressed, memory-mapped uint8 store shared by all processes.

Layout under `artifacts/cache/`:

    hashes.parquet                 path, size, mtime_ns -> blake2b of the file's bytes (skips re-hashing)
    <H>x<W>x<C>-<resize>/images.u8 raw (N, H, W, C) uint8 array, one slot per distinct file content
    <H>x<W>x<C>-<resize>/index.parquet   content hash -> slot, or the decode error for a bad file

Entries are keyed by file content, so renaming or copying a dataset reuses them and editing a file makes
a new entry. DataLoader workers map the same file read-only: the OS page cache holds one copy, however
many workers, trials or reruns read it. Bad files are remembered too, so validation is also done once.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from datamodules.decode_limits import DECODE_TIME_LIMIT_S
from datamodules.dicom import DicomConfig
from datamodules.images import ImageDecodeError, ResizeMode, decode_within_time, resize

_HASH_SCHEMA = {"path": pl.String, "size": pl.Int64, "mtime_ns": pl.Int64, "hash": pl.String}
_INDEX_SCHEMA = {"hash": pl.String, "slot": pl.Int64, "error": pl.String}


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@contextmanager
def file_lock(path: Path):
    """Exclusive advisory lock; serialises cache writers across processes (sweep workers, DDP ranks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_atomic(frame: pl.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    frame.write_parquet(tmp)
    os.replace(tmp, path)


def _read(path: Path, schema: dict) -> pl.DataFrame:
    return pl.read_parquet(path) if path.exists() else pl.DataFrame(schema=schema)


@dataclass(frozen=True)
class CachedImages:
    """A read-only view of the cache for one dataset: the file to map and the slot of each image."""

    file: str
    shape: tuple[int, int, int, int]  # (N_slots, H, W, C)

    def open(self) -> np.memmap:
        return np.memmap(self.file, dtype=np.uint8, mode="r", shape=self.shape)


class ImageCache:
    """Decoded, resized images of one geometry, addressed by file content.

    Args:
        root: cache folder (`artifacts/cache`).
        size: (height, width) the images are resized to.
        channels: 3 (RGB) or 1 (grayscale).
        resize_mode: how the aspect ratio is handled, see `datamodules.images.resize`.
        workers: decoding threads (PIL and OpenCV release the GIL while decoding/resizing).
        dicom: window and frame for DICOM files; non-default settings get their own cache folder.
        time_limit_s: wall-clock limit per decode; a file past it is a bad image (see
            `datamodules.images.decode_within_time`).
    """

    def __init__(
        self,
        root: str | Path,
        size: tuple[int, int],
        channels: int = 3,
        resize_mode: ResizeMode = "squash",
        workers: int | None = None,
        dicom: DicomConfig | None = None,
        time_limit_s: float = DECODE_TIME_LIMIT_S,
    ):
        self.root = Path(root)
        self.size = size
        self.channels = channels
        self.resize_mode = resize_mode
        self.workers = workers or min(8, os.cpu_count() or 1)
        self.dicom = dicom or DicomConfig()
        self.time_limit_s = time_limit_s
        tag = self.dicom.tag()
        self.dir = self.root / (f"{size[0]}x{size[1]}x{channels}-{resize_mode}" + (f"-dcm{tag}" if tag else ""))
        self.data_file = self.dir / "images.u8"
        self.index_file = self.dir / "index.parquet"
        self.hash_file = self.root / "hashes.parquet"
        self.lock_file = self.root / ".lock"
        self.slot_bytes = size[0] * size[1] * channels

    def _hashes(self, paths: list[str], known: dict[str, tuple[int, int, str]]):
        """Hash files whose (size, mtime) changed; returns hash per path (None if missing) and fresh rows."""
        out: dict[str, str | None] = {}
        fresh: dict[str, tuple[int, int, str]] = {}
        errors: dict[str, str] = {}
        payload: dict[str, bytes] = {}
        for p in paths:
            try:
                st = os.stat(p)
            except FileNotFoundError:
                out[p], errors[p] = None, "file does not exist"
                continue
            prev = known.get(p)
            if prev is not None and prev[0] == st.st_size and prev[1] == st.st_mtime_ns:
                out[p] = prev[2]
                continue
            try:
                data = Path(p).read_bytes()
            except OSError as e:
                out[p], errors[p] = None, f"cannot read file: {e.strerror or e}"
                continue
            h = content_hash(data)
            out[p] = h
            fresh[p] = (st.st_size, st.st_mtime_ns, h)
            payload[h] = data
        return out, fresh, errors, payload

    @staticmethod
    def _stale(paths: list[str], known: dict[str, tuple[int, int, str]], entries: dict) -> bool:
        """True when some existing file is new, changed since it was hashed, or not decoded yet (stat only)."""
        for p in paths:
            prev = known.get(p)
            try:
                st = os.stat(p)
            except OSError:
                continue  # reported as missing by `_hashes`
            if prev is None or prev[0] != st.st_size or prev[1] != st.st_mtime_ns or prev[2] not in entries:
                return True
        return False

    def _decode_one(self, data: bytes) -> np.ndarray | str:
        try:
            return resize(decode_within_time(data, self.channels, self.dicom, self.time_limit_s), self.size, self.resize_mode)
        except ImageDecodeError as e:
            return str(e)

    def _load_state(self):
        hashes = _read(self.hash_file, _HASH_SCHEMA)
        known = {p: (s, m, h) for p, s, m, h in hashes.iter_rows()}
        index = _read(self.index_file, _INDEX_SCHEMA)
        return hashes, known, index, {h: (s, e) for h, s, e in index.iter_rows()}

    def resolve(self, paths: list[str]) -> tuple[CachedImages, np.ndarray, dict[str, str]]:
        """Make sure every file is decoded into the cache; returns the view, slot per path and bad files.

        Args:
            paths: absolute file paths.

        Returns:
            (view, slots, bad): `slots[i]` is the cache slot of `paths[i]` or -1 when the file is bad;
            `bad` maps each bad path to the reason (missing, empty, truncated, not an image, ...).
        """
        _, known, _, entries = self._load_state()
        if self._stale(paths, known, entries):
            with file_lock(self.lock_file):
                self._fill(paths)
            _, known, _, entries = self._load_state()
        hashes, _, errors, _ = self._hashes(paths, known)  # only stats now: every file is known
        slots = np.full(len(paths), -1, dtype=np.int64)
        bad: dict[str, str] = dict(errors)
        for i, p in enumerate(paths):
            h = hashes.get(p)
            if h is None:
                continue
            slot, err = entries[h]
            if err is not None:
                bad[p] = err
            else:
                slots[i] = slot
        n_slots = int(max((s for s, e in entries.values() if e is None), default=-1)) + 1
        view = CachedImages(str(self.data_file), (n_slots, *self.size, self.channels))
        return view, slots, bad

    def _fill(self, paths: list[str], chunk: int = 256) -> None:
        """Under the lock: hash what changed, decode what is new, append it, publish the indexes.

        Works in chunks so that memory holds at most `chunk` encoded files, whatever the dataset size.
        """
        t0 = time.perf_counter()
        hashes_df, known, index, entries = self._load_state()
        good_slots = index.filter(pl.col("error").is_null())["slot"]
        next_slot = int(good_slots.max()) + 1 if len(good_slots) else 0
        fresh_all: dict[str, tuple[int, int, str]] = {}
        new_rows: list[tuple[str, int, str | None]] = []
        for start in range(0, len(paths), chunk):
            part = paths[start : start + chunk]
            hashes, fresh, _, payload = self._hashes(part, known)
            fresh_all.update(fresh)
            todo = [h for h in dict.fromkeys(v for v in hashes.values() if v is not None) if h not in entries]
            for h in todo:
                if h not in payload:  # hashed on an earlier run, but never decoded at this geometry
                    payload[h] = Path(next(p for p, v in hashes.items() if v == h)).read_bytes()
            if not todo:
                continue
            with ThreadPoolExecutor(self.workers) as pool:
                decoded = list(pool.map(self._decode_one, (payload[h] for h in todo)))
            good = [a for a in decoded if isinstance(a, np.ndarray)]
            if good:
                self._append(next_slot, good)
            for h, a in zip(todo, decoded, strict=True):
                if isinstance(a, np.ndarray):
                    entries[h] = (next_slot, None)
                    new_rows.append((h, next_slot, None))
                    next_slot += 1
                else:
                    entries[h] = (-1, a)
                    new_rows.append((h, -1, a))
        if new_rows:
            self.dir.mkdir(parents=True, exist_ok=True)
            index = pl.concat([index, pl.DataFrame(new_rows, schema=_INDEX_SCHEMA, orient="row")])
            _write_atomic(index, self.index_file)
            n_bad = sum(r[2] is not None for r in new_rows)
            print(
                f"[cache] decoded {len(new_rows) - n_bad} new images ({n_bad} unreadable) into {self.dir} "
                f"in {time.perf_counter() - t0:.1f}s",
                flush=True,
            )
        if fresh_all:
            upd = pl.DataFrame([(p, *v) for p, v in fresh_all.items()], schema=_HASH_SCHEMA, orient="row")
            merged = pl.concat([hashes_df.filter(~pl.col("path").is_in(list(fresh_all))), upd])
            _write_atomic(merged, self.hash_file)

    def _append(self, first_slot: int, arrays: list[np.ndarray]) -> None:
        """Write decoded images into slots first_slot.. of the memory-mapped file, growing it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_file, "a+b") as fh:
            fh.truncate((first_slot + len(arrays)) * self.slot_bytes)
        mm = np.memmap(
            self.data_file, dtype=np.uint8, mode="r+", offset=first_slot * self.slot_bytes,
            shape=(len(arrays), *self.size, self.channels),
        )
        for k, arr in enumerate(arrays):
            mm[k] = arr
        mm.flush()
        del mm
