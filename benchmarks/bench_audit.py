"""The duplicate audit's cost: hashing throughput on cached arrays and clustering time for many hashes.

    python benchmarks/bench_audit.py [--images 4000] [--hashes 100000] [--distance 10]

Prints, measured in this run (one thread: `OMP/OPENBLAS/MKL_NUM_THREADS=1` and `cv2.setNumThreads(1)`):
  1. perceptual hashes + pixel digests per second on one core, from (N, 64, 64, 1) uint8 arrays like the
     audit's decode-cache entries;
  2. seconds to cluster `--hashes` synthetic 64-bit hashes within `--distance` bits (the candidate search,
     multi-index hashing + union of components; target <= 60 s for 100,000 on one core), with 5% of them
     planted as near copies so that there is something to find; and the same with the pixel check on a
     dataset of `--images` images.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import cv2  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datamodules import phantoms  # noqa: E402
from datamodules.duplicates import cluster, cluster_images, near_pairs, phash_batch, pixel_digest  # noqa: E402
from datamodules.images import resize  # noqa: E402


def hashing(n: int) -> float:
    base = np.stack([resize(phantoms.render(c, i, 128)[0][..., None], (64, 64))
                     for c in phantoms.CLASSES for i in range(25)])
    images = base[np.arange(n) % len(base)]  # (N, 64, 64, 1)
    t0 = time.perf_counter()
    for s in range(0, n, 512):
        part = images[s : s + 512]
        phash_batch(part)
        [pixel_digest(a) for a in part]
    return n / (time.perf_counter() - t0)


def synthetic_hashes(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, np.iinfo(np.int64).max, n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + \
        rng.integers(0, 2, n).astype(np.uint64)
    copies = rng.choice(n, n // 20, replace=False)  # 5% become near copies (3 flipped bits) of another hash
    src = rng.choice(n, n // 20)
    flips = np.uint64(1) << rng.integers(0, 64, (len(copies), 3)).astype(np.uint64)
    hashes[copies] = hashes[src] ^ flips[:, 0] ^ flips[:, 1] ^ flips[:, 2]
    return hashes


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--hashes", type=int, default=100_000)
    p.add_argument("--distance", type=int, default=10)
    args = p.parse_args()
    cv2.setNumThreads(1)
    print(f"hashing (pHash + pixel digest, 64x64 cached arrays, 1 core): {hashing(args.images):,.0f} images/s")
    hashes = synthetic_hashes(args.hashes)
    t0 = time.perf_counter()
    i, _ = near_pairs(np.unique(hashes), args.distance)
    t_pairs = time.perf_counter() - t0
    t0 = time.perf_counter()
    labels = cluster(hashes, args.distance)
    t_cluster = time.perf_counter() - t0
    print(f"clustering {args.hashes:,} hashes within {args.distance} bits (1 core): {t_cluster:.1f} s "
          f"(pair search alone {t_pairs:.1f} s; {len(i):,} pairs, {args.hashes - len(np.unique(labels)):,} images "
          "joined to a cluster)")
    images = np.stack([resize(phantoms.render(c, k, 128)[0][..., None], (64, 64))
                       for c in phantoms.CLASSES for k in range(args.images // len(phantoms.CLASSES))])
    t0 = time.perf_counter()
    labels, rejected = cluster_images(images, phash_batch(images), args.distance, 0.9)
    print(f"near-duplicate clustering with the pixel check, {len(images):,} phantoms (look-alikes: the worst "
          f"case for candidates): {time.perf_counter() - t0:.1f} s, {rejected:,} candidate pairs refused, "
          f"{len(images) - len(np.unique(labels))} false links")


if __name__ == "__main__":
    main()
