"""Near-duplicate detection: every kind of copy the issue names is linked, distinct look-alikes are not."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from datamodules import phantoms
from datamodules.duplicate_audit import AUDIT_GEOMETRY
from datamodules.duplicates import cluster, cluster_images, near_pairs, phash_batch, popcount
from datamodules.images import resize

SIZE = AUDIT_GEOMETRY[0]


def textured(seed: int, n: int = 256) -> np.ndarray:
    """A grayscale image with smooth structure and fine noise, like a scan (distinct per seed)."""
    rng = np.random.default_rng(seed)
    field = cv2.GaussianBlur(rng.normal(0, 1, (n, n)).astype(np.float32), (0, 0), 6)
    field = (field - field.min()) / (field.max() - field.min())
    return np.clip(field * 180 + 30 + rng.normal(0, 6, (n, n)), 0, 255).astype(np.uint8)


def jpeg(a: np.ndarray, quality: int = 70) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", a, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)


def brightness(a: np.ndarray, factor: float) -> np.ndarray:
    return np.clip(a.astype(np.float32) * factor, 0, 255).astype(np.uint8)


COPIES = {
    "jpeg_q70": jpeg,
    "rescale_0.9x": lambda a: cv2.resize(a, None, fx=0.9, fy=0.9, interpolation=cv2.INTER_AREA),
    "crop_2px_corner": lambda a: a[2:, 2:],
    "crop_4px_corner": lambda a: a[4:, 4:],
    "crop_4px_side": lambda a: a[:, :-4],
    "crop_2px_all_sides": lambda a: a[2:-2, 2:-2],
    "brightness_+5%": lambda a: brightness(a, 1.05),
    "brightness_-5%": lambda a: brightness(a, 0.95),
}


def cached(a: np.ndarray) -> np.ndarray:
    return resize(a[..., None], SIZE)  # what the decode cache holds at the audit geometry


@pytest.fixture(scope="module")
def originals() -> list[np.ndarray]:
    return [textured(s) for s in range(12)]


@pytest.mark.parametrize("kind", list(COPIES))
def test_each_kind_of_copy_is_linked_to_its_source_only(originals, kind):
    copies = [COPIES[kind](a) for a in originals]
    images = np.stack([cached(a) for a in originals + copies])
    labels, _ = cluster_images(images, phash_batch(images), max_distance=10, min_similarity=0.9)
    n = len(originals)
    assert (labels[:n] == labels[n:]).all(), f"{kind}: a copy was not linked to its source"
    assert len(set(labels[:n].tolist())) == n, f"{kind}: two distinct images were linked"


def test_distinct_phantoms_are_never_linked():
    """The embedded phantoms share their anatomy (many have equal 64-bit hashes): 0 links expected."""
    images = np.stack([cached(phantoms.render(c, i, 128)[0]) for c in phantoms.CLASSES for i in range(60)])
    hashes = phash_batch(images)
    assert len(near_pairs(hashes, 10)[0]) > 1000  # the hash alone would link many: the pixel check matters
    labels, rejected = cluster_images(images, hashes, max_distance=10, min_similarity=0.9)
    assert len(set(labels.tolist())) == len(images)
    assert rejected > 1000


def test_multi_index_search_equals_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 300, dtype=np.uint64)
    flips = np.uint64(1) << rng.integers(0, 64, (300, 3)).astype(np.uint64)
    hashes = np.concatenate([base, base ^ flips[:, 0] ^ flips[:, 1], base[:50] ^ flips[:50, 0] ^ flips[:50, 1] ^ flips[:50, 2]])
    hashes = np.unique(hashes)
    for d in (0, 2, 4, 7):
        i, j = near_pairs(hashes, d)
        dist = popcount(hashes[:, None] ^ hashes[None, :])
        bi, bj = np.nonzero(np.triu(dist <= d, 1))
        assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == sorted(zip(bi.tolist(), bj.tolist(), strict=True)), d


def test_hash_clusters_are_transitive_components():
    hashes = np.array([0b0, 0b1, 0b11, 0b111, 0xFFFF0000], dtype=np.uint64)  # a chain 0-1-3-7 and a stranger
    labels = cluster(hashes, max_distance=1)
    assert len(set(labels[:4].tolist())) == 1 and labels[4] != labels[0]
