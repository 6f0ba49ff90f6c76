"""Near-duplicate detection: every kind of copy issue 18 names is linked to its source, at several image
sizes and in combination; distinct look-alikes are not, and clusters never chain."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from audit import copies
from datamodules import phantoms
from datamodules.duplicate_audit import AUDIT_GEOMETRY
from datamodules.duplicates import (
    candidate_pairs, cluster_images, low_detail, near_pairs, popcount, star_clusters, variant_hashes,
)
from datamodules.images import resize

SIZE = AUDIT_GEOMETRY[0]
SHAPES = [(120, 150), (470, 560), (900, 700)]  # (height, width): small, the issue's ultrasound, large


def cached(a: np.ndarray) -> np.ndarray:
    """What the decode cache holds at the audit geometry (grayscale squash to 64x64)."""
    if a.ndim == 3:
        a = cv2.cvtColor(a, cv2.COLOR_BGR2GRAY)
    return resize(a[..., None], SIZE)


def audit(arrays: list[np.ndarray]) -> tuple[np.ndarray, dict]:
    images = np.stack([cached(a) for a in arrays])
    return cluster_images(images, variant_hashes(images), max_distance=10, min_similarity=0.9)


def assert_pairs_linked(originals: list[np.ndarray], copies_: list[np.ndarray], what: str) -> None:
    labels, _ = audit(originals + copies_)
    n = len(originals)
    assert (labels[:n] == labels[n:]).all(), f"{what}: copies {np.flatnonzero(labels[:n] != labels[n:])} not linked"
    assert len(set(labels[:n].tolist())) == n, f"{what}: two distinct images were linked"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", list(copies.TRANSFORMS))
def test_each_transform_and_combination_is_linked_to_its_source_only(kind, shape):
    rng = np.random.default_rng(hash((kind, shape)) % 2**32)
    originals = [copies.textured(1000 * shape[0] + s, *shape) for s in range(4)]
    assert_pairs_linked(originals, [copies.TRANSFORMS[kind](a, rng) for a in originals], kind)


@pytest.mark.parametrize("px", [4, 8, 12])
def test_ultrasound_sized_images_with_trims_of_4_to_12_px(px):
    """The issue's misses: 560x470 vs 552x462 (4 px per side), and the like up to 12 px on 500-800 px."""
    originals = [copies.textured(50 + s, 470 + 60 * s, 560 + 80 * s) for s in range(4)]
    assert_pairs_linked(originals, [copies.trim(a, px) for a in originals], f"{px} px trim")


def test_the_issues_three_missed_copies():
    a, b, c = (copies.textured(s, h, w) for s, (h, w) in enumerate([(470, 560), (569, 777), (463, 563)]))
    rescaled = cv2.resize(b, (825, 604), interpolation=cv2.INTER_LINEAR)[8:-9, 12:-12]  # ~3% larger, re-trimmed
    rows_off = np.concatenate([c[6:-5], c[6:-5, -1:]], axis=1)  # 11 rows trimmed, one column added
    assert_pairs_linked([a, b, c], [copies.trim(a, 4), rescaled, rows_off], "issue 18's table")


def test_burnt_in_marks_on_one_copy_only():
    rng = np.random.default_rng(3)
    originals = [copies.textured(70 + s, 480, 640) for s in range(4)]
    marked = [copies.marks(copies.crop(a, rng), rng) for a in originals]
    assert_pairs_linked(originals, marked, "marks on one copy")


def test_distinct_phantoms_are_never_linked():
    """The embedded phantoms share their anatomy (many have near-equal hashes): 0 links expected."""
    images = np.stack([cached(phantoms.render(c, i, 128)[0]) for c in phantoms.CLASSES for i in range(15)])
    hashes = variant_hashes(images)
    labels, stats = cluster_images(images, hashes, max_distance=10, min_similarity=0.9)
    assert stats["candidates"] > 200  # the hashes alone would link many: the pixel check matters
    assert len(set(labels.tolist())) == len(images) and stats["rejected"] == stats["candidates"]


def test_smooth_28px_discs_are_low_detail_and_only_exact_copies_link():
    discs = copies.smooth_discs(40)
    images = np.stack([resize(cv2.cvtColor(d, cv2.COLOR_BGR2GRAY)[..., None], SIZE) for d in discs])
    assert low_detail(images).all()
    labels, stats = cluster_images(images, variant_hashes(images), max_distance=10, min_similarity=0.9)
    assert len(set(labels.tolist())) == len(images) and stats["low_detail"] == len(images)
    scans = np.stack([cached(copies.textured(s, 300)) for s in range(5)])
    assert not low_detail(scans).any()


def test_star_clusters_do_not_chain_look_alikes():
    # 0-1, 1-2, 2-3, 3-4 confirmed: a chain. Components would make one cluster of 5; stars never put two
    # images together unless both are confirmed against the cluster's representative.
    labels = star_clusters(6, np.array([0, 1, 2, 3]), np.array([1, 2, 3, 4]))
    for label in set(labels.tolist()):
        members = np.flatnonzero(labels == label)
        assert len(members) <= 3
    pairs = {(0, 1), (1, 2), (2, 3), (3, 4)}
    for label in set(labels.tolist()):
        members = np.flatnonzero(labels == label).tolist()
        if len(members) > 1:
            rep = label
            assert all(tuple(sorted((rep, m))) in pairs for m in members if m != rep)
    assert labels[5] == 5  # alone


def test_star_cluster_takes_every_copy_of_the_most_copied_image():
    labels = star_clusters(5, np.array([0, 0, 0, 3]), np.array([1, 2, 3, 4]))
    assert labels[0] == labels[1] == labels[2] == labels[3] and labels[4] != labels[0]


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


def test_candidate_pairs_match_any_variant_against_any_variant():
    rng = np.random.default_rng(1)
    hashes = rng.integers(0, 2**63, (200, 3), dtype=np.int64).astype(np.uint64)
    hashes[7, 2] = hashes[3, 0] ^ np.uint64(0b1011)  # 3 bits from image 3's first variant
    hashes[9, 1] = hashes[8, 1]  # an equal hash
    i, j = candidate_pairs(hashes, 4)
    dist = popcount(hashes[:, None, :, None] ^ hashes[None, :, None, :]).reshape(200, 200, -1).min(-1)
    bi, bj = np.nonzero(np.triu(dist <= 4, 1))
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == sorted(zip(bi.tolist(), bj.tolist(), strict=True))
    assert {(3, 7), (8, 9)} <= set(zip(i.tolist(), j.tolist(), strict=True))
