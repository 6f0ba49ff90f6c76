"""Exact and near-duplicate images: pixel digests, 64-bit perceptual hashes, the candidate search and clusters.

This lives in the data layer (not in `audit/`) because `ImageDataModule.resolve` needs the clusters as a
split grouping key, and datamodules may not import upward; `audit/` builds its report on top of it.

The perceptual hash is the DCT hash of `imagehash.phash` (32x32 grayscale, top-left 8x8 DCT coefficients
compared to their median), computed here on whole batches of the decode cache's arrays at once: imagehash
works one PIL image at a time and would re-decode every file. (The thumbnail is resized with OpenCV's area
filter instead of PIL's Lanczos, so single bits can differ from imagehash's.)

Candidates come from hashes of the image and of its crops (`variant_hashes`, `candidate_pairs`), are
confirmed on the pixels by `datamodules.duplicate_check`, and grouped into star clusters (`star_clusters`)
so that look-alikes cannot chain; what and how well is in docs/duplicates.md.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable

import cv2
import numpy as np
from scipy import sparse
from threadpoolctl import threadpool_limits

from datamodules.duplicate_check import (
    FINE_MIN_SIDE,
    FINE_SIZE,
    confirm,
    confirm_fine,
    detail,
    gray,
    highpass,
    scaled_scores,
    shifted_scores,
)

HASH_BITS = 64
_N = 32  # side of the thumbnail the DCT is taken on


def _dct_matrix(n: int) -> np.ndarray:
    """DCT-II basis (n, n), unnormalised like scipy.fftpack.dct, which imagehash applies along both axes."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    return (2.0 * np.cos(np.pi * k * (2 * i + 1) / (2 * n))).astype(np.float64)


_DCT = _dct_matrix(_N)
_BIT_WEIGHTS = (np.uint64(1) << np.arange(HASH_BITS - 1, -1, -1, dtype=np.uint64))  # first bit = MSB


def phash_batch(images: np.ndarray) -> np.ndarray:
    """64-bit perceptual hashes of a batch of images.

    Args:
        images: (N, H, W, C) uint8, e.g. a slice of the decode cache.

    Returns:
        (N,) uint64: bit 63 is DCT coefficient (0, 0), row-major over the 8x8 low frequencies.
    """
    thumbs = np.stack([cv2.resize(gray(im), (_N, _N), interpolation=cv2.INTER_AREA) for im in images])  # (N, 32, 32)
    coeffs = _DCT @ thumbs.astype(np.float64) @ _DCT.T  # (N, 32, 32), 2-D DCT-II of each thumbnail
    low = coeffs[:, :8, :8].reshape(len(images), HASH_BITS)  # (N, 64)
    bits = low > np.median(low, axis=1, keepdims=True)
    return (bits.astype(np.uint64) * _BIT_WEIGHTS).sum(axis=1, dtype=np.uint64)


def pixel_digest(image: np.ndarray) -> str:
    """Digest of decoded pixels (shape included): equal digests mean identical images, whatever the file format."""
    h = hashlib.blake2b(digest_size=12)
    h.update(str(image.shape).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits per uint64 (numpy >= 2 has a vectorised instruction for it)."""
    return np.bitwise_count(x) if hasattr(np, "bitwise_count") else np.unpackbits(x.view(np.uint8)).reshape(-1, 64).sum(1)


_BLOCKS = 4  # 16-bit blocks: with 100,000 hashes a block value holds ~1.5 of them


def _masks(radius: int) -> np.ndarray:
    """Every 16-bit XOR mask with at most `radius` bits set (the block values to probe)."""
    all_masks = np.arange(1 << 16, dtype=np.uint64)
    return all_masks[popcount(all_masks) <= radius]


def near_pairs(hashes: np.ndarray, max_distance: int, queries: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs whose hashes differ in at most `max_distance` bits: (i < j) within `hashes`, or, with
    `queries`, (query index, hash index) of every query against every hash.

    Multi-index hashing (Norouzi et al., 2012): split the 64 bits into 4 blocks of 16; by pigeonhole two
    hashes within `d` bits differ by at most floor(d / 4) bits in at least one block. For each block, the
    hashes are sorted by the block's value and every value within that radius is looked up at once
    (a bucket table of all 65,536 block values, probed for all queries per XOR mask); the candidates are
    checked with a vectorised popcount.
    No library offers this for 64-bit Hamming space on the CPU, hence the hand-written search.

    Args:
        hashes: (N,) uint64 (repeats allowed; `candidate_pairs` removes them first).
        max_distance: largest Hamming distance that still links two images (0..63).
        queries: (Q,) uint64 looked up against `hashes`; None: `hashes` against themselves.

    Returns:
        (i, j): int64 arrays of pair indices (into `hashes`, or into `queries` and `hashes`).
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    self_join = queries is None
    queries = hashes if self_join else np.asarray(queries, dtype=np.uint64)
    masks = _masks(max_distance // _BLOCKS)
    found: list[np.ndarray] = []
    for b in range(_BLOCKS):
        key = ((hashes >> np.uint64(16 * b)) & np.uint64(0xFFFF)).astype(np.int64)
        query_key = ((queries >> np.uint64(16 * b)) & np.uint64(0xFFFF)).astype(np.int64)
        order = np.argsort(key, kind="stable")
        by_key = hashes[order]
        starts = np.concatenate([[0], np.cumsum(np.bincount(key, minlength=1 << 16))])  # bucket v: order[starts[v]:starts[v+1]]
        for mask in masks.astype(np.int64):
            probe = query_key ^ mask
            left = starts[probe]
            count = starts[probe + 1] - left
            total = int(count.sum())
            if not total:
                continue
            i = np.repeat(np.arange(len(queries)), count)
            at = np.repeat(left - (np.cumsum(count) - count), count) + np.arange(total)  # positions in by_key
            keep = popcount(queries[i] ^ by_key[at]) <= max_distance
            j = order[at[keep]]
            i = i[keep]
            if self_join:
                i, j = i[i < j], j[i < j]
            if len(i):
                found.append(np.stack([i, j], axis=1))
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pairs = np.unique(np.concatenate(found), axis=0)  # a pair found through several blocks counts once
    return pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)


# Crops hashed besides the whole image: each side trimmed by 0 or 3 px of the 64 px audit image (~0 or ~5%),
# all 16 combinations. A copy cropped by up to 5% per side, each side independently, is its source's crop on
# one of these within the Hamming threshold: the search looks up each image's whole-image hash among the
# crops of every other (either way round), which finds 98.5-100% of COVID-CT's cropped, marked, rescaled and
# re-encoded copies at the candidate stage, against 96.5-99% for centred crops matched all against all
# (docs/duplicates.md). The 5x5 median first takes thin burnt-in strokes out of the hash.
TRIMS = tuple(itertools.product((0, 3), repeat=4))  # (top, bottom, left, right); the first is the whole image


def variant_hashes(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, len(TRIMS)) uint64 perceptual hashes of the whole image and its crops."""
    smooth = np.stack([cv2.medianBlur(np.ascontiguousarray(gray(im).astype(np.uint8)), 5) for im in images])[..., None]
    h, w = smooth.shape[1:3]
    return np.stack([phash_batch(smooth[:, top : h - bottom, left : w - right]) for top, bottom, left, right in TRIMS],
                    axis=1)


def candidate_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Image pairs (i < j) where the first hash (the whole image) of one is within `max_distance` bits of any
    hash of the other.

    Args:
        hashes: (N, V) uint64, e.g. `variant_hashes`.
        max_distance: Hamming threshold (0..63).
    """
    n, v = hashes.shape
    uniq, inverse = np.unique(hashes.reshape(-1), return_inverse=True)
    owner = sparse.csr_matrix((np.ones(n * v, np.float32), (inverse.reshape(-1), np.repeat(np.arange(n), v))),
                              shape=(len(uniq), n))  # (unique hash, image owning it)
    whole, whole_inverse = np.unique(hashes[:, 0], return_inverse=True)
    whole_owner = sparse.csr_matrix((np.ones(n, np.float32), (whole_inverse.reshape(-1), np.arange(n))),
                                    shape=(len(whole), n))  # (unique whole-image hash, image)
    q, h = near_pairs(uniq, max_distance, queries=whole)
    near = sparse.coo_matrix((np.ones(len(q), np.float32), (q, h)), shape=(len(whole), len(uniq))).tocsr()
    linked = whole_owner.T @ near @ owner  # (image, image): a's whole-image hash near a hash of b
    linked = sparse.triu(linked + linked.T, k=1).tocoo()
    return linked.row.astype(np.int64), linked.col.astype(np.int64)


# Images the pixel check cannot judge: stored smaller than LOW_DETAIL_SIDE px on a side (upsampled at least
# 1.3x into the 64 px audit image: 28 px fundus photographs are smooth discs that differ only in what the
# upsampling blurred away), or nearly uniform (finest band below LOW_DETAIL_STD grey levels).
LOW_DETAIL_SIDE = 48
LOW_DETAIL_STD = 1.0


def low_detail(images: np.ndarray, sides: np.ndarray | None = None) -> np.ndarray:
    """(N,) bool: images with too little detail to be linked on anything but identical pixels.

    Args:
        images: (N, 64, 64, C) uint8 audit images.
        sides: (N,) smaller side of each stored image in pixels (0: unknown, judged on the pixels only).
    """
    flat = np.array([highpass(gray(im), 0.7)[4:-4, 4:-4].std() < LOW_DETAIL_STD for im in images], bool)
    if sides is None:
        return flat
    sides = np.asarray(sides)
    return flat | ((sides > 0) & (sides < LOW_DETAIL_SIDE))


def star_clusters(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Clusters in which every member is a confirmed copy of one representative: no chains.

    Linking transitively (connected components) lets look-alikes chain: A~B and B~C put A and C together
    however different they are. Here the image with the most confirmed copies becomes a representative and
    takes its not yet clustered copies; then the next, until every confirmed pair is used or its images
    are taken (greedy, like the "star" clustering of Aslam et al., 2004).

    Args:
        n: number of images.
        i, j: confirmed pairs.

    Returns:
        (n,) int64 cluster label; an image with no confirmed copy has a label of its own.
    """
    adj = sparse.coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    adj = (adj + adj.T).tocsr()
    labels = np.full(n, -1, np.int64)
    for rep in np.argsort(-np.diff(adj.indptr), kind="stable"):
        if labels[rep] >= 0 or adj.indptr[rep] == adj.indptr[rep + 1]:
            continue
        members = adj.indices[adj.indptr[rep] : adj.indptr[rep + 1]]
        members = members[labels[members] < 0]
        labels[rep] = rep
        labels[members] = rep
    alone = labels < 0
    labels[alone] = np.flatnonzero(alone)
    return labels


# Registration (a few ms a pair) is tried on each image's best-scoring unconfirmed candidates only. A copy scores
# high under the shift check even when cropped or marked, while a look-alike set (phantoms: every image within
# the hash distance of every other) would otherwise cost O(N^2) registrations (240 phantoms: ~9,000, 28 s).
REGISTER_PER_IMAGE = 4


def hash_distances(hashes: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """(P,) smallest Hamming distance between the whole-image hash of one image of each pair and any hash of
    the other (either way round): what made the pair a candidate."""
    one = popcount(hashes[i, :1] ^ hashes[j]).min(axis=1)
    other = popcount(hashes[j, :1] ^ hashes[i]).min(axis=1)
    return np.minimum(one, other)


def _worth_registering(i: np.ndarray, j: np.ndarray, scores: np.ndarray, linked: np.ndarray,
                       distances: np.ndarray) -> list[int]:
    """Indices of the unlinked candidate pairs to register: for each image, its `REGISTER_PER_IMAGE` // 2
    best pairs by shift-check score (the best over the scale hypotheses, `scaled_scores`) and as many by hash
    distance. Each ranking finds copies the other misses:
    a marked copy of a phantom scores high but its hash is no closer than its look-alikes' (by distance
    alone: 48% of them found), a cropped copy of a CT slice has the closer hash but scores no higher than the
    neighbouring slices (by score alone: 98.5% of COVID-CT's crops found; by both: 100%)."""
    chosen: set[int] = set()
    open_pairs = np.flatnonzero(~linked)
    for order in (np.argsort(-scores[open_pairs], kind="stable"), np.lexsort((-scores[open_pairs], distances[open_pairs]))):
        tried: dict[int, int] = {}
        for k in open_pairs[order]:
            a, b = int(i[k]), int(j[k])
            if tried.get(a, 0) < REGISTER_PER_IMAGE // 2 or tried.get(b, 0) < REGISTER_PER_IMAGE // 2:
                chosen.add(int(k))
                tried[a], tried[b] = tried.get(a, 0) + 1, tried.get(b, 0) + 1
    return sorted(chosen)


# With the stored files at hand (`fine`), registered pairs of images stored at >= FINE_MIN_SIDE px are checked
# again at 256 px (`duplicate_check.confirm_fine`, whose rule is stated there):
# - a near miss at 64 px (FINE_GATE up to `min_confirmed`: cropped and marked copies score down to ~0.83 there,
#   and so do adjacent CT slices, up to 0.90) is linked when the fine check finds a copy (detail >= FINE_MIN,
#   rigid, few pixels differing);
# - a pair at or above `min_confirmed` at 64 px is linked unless it moves non-rigidly and differs widely at
#   once (`FineCheck.is_other_image`: adjacent slices that a re-encode lifts to 0.90-0.91 at 64 px, stored
#   at 146-512 px), and, for images stored at >= FINE_SIZE px (not upsampled for the check), unless its 256 px
#   detail falls below FINE_FLOOR: a look-alike can agree at 64 px and
#   not at 256 px (a generated scan deformed smoothly by ~4 px: up to 0.92 at 64 px, 0.39-0.65 at 256 px),
#   while copies keep >= 0.75 (COVID-CT, all four transforms combined) and >= 0.63 on generated
#   noise-textured scans, whose detail resampling decorrelates most (so the floor cannot be higher).
FINE_GATE = 0.8
FINE_MIN = 0.78
FINE_FLOOR = 0.6


def _register_pairs(images: np.ndarray, i: np.ndarray, j: np.ndarray, chosen: list[int], min_confirmed: float,
                    fine: Callable[[int], np.ndarray | None] | None, sides: np.ndarray | None,
                    linked: np.ndarray) -> dict[int, bool]:
    """Registration check of the chosen candidate pairs: {pair index: linked}: at 64 px (`min_confirmed`; a pair
    the shift check `linked` already passes), and for images stored large enough (and a 64 px score >=
    FINE_GATE) by the fine check too."""
    loaded: dict[int, np.ndarray | None] = {}

    def load(k: int) -> np.ndarray | None:
        if k not in loaded:
            loaded[k] = fine(k)
        return loaded[k]

    out = {}
    for k in chosen:
        a, b = int(i[k]), int(j[k])
        score, warp = confirm(images[a], images[b])
        side = min(sides[a], sides[b]) if fine is not None and sides is not None else 0
        out[k] = bool(linked[k]) or score >= min_confirmed
        if side >= FINE_MIN_SIDE and (out[k] or score >= FINE_GATE) and warp is not None:
            pair = load(a), load(b)
            if pair[0] is not None and pair[1] is not None:  # else a file that cannot be read: the 64 px decision
                found = confirm_fine(*pair, warp)
                if out[k]:
                    out[k] = not found.is_other_image() and (side < FINE_SIZE or found.score >= FINE_FLOOR)
                else:
                    out[k] = found.is_copy(FINE_MIN)
    return out


def cluster_images(
    images: np.ndarray, hashes: np.ndarray, max_distance: int, min_similarity: float | None,
    min_confirmed: float = 0.9, sides: np.ndarray | None = None, fine: Callable[[int], np.ndarray | None] | None = None,
) -> tuple[np.ndarray, dict]:
    """Near-duplicate clusters: candidate pairs from the hashes, confirmed on the pixels, star-clustered.

    Args:
        images: (N, H, W, C) uint8 at `duplicate_audit.AUDIT_GEOMETRY`, one per distinct pixel content.
        hashes: (N, V) uint64 `variant_hashes` of `images` (or (N,) whole-image hashes).
        max_distance: Hamming threshold of the candidate stage.
        min_similarity: fine-detail correlation under integer shifts that links a pair at once (copies with
            the source's geometry); None links every candidate (hash only, no pixel check).
        min_confirmed: masked correlation after registration (`duplicate_check.confirm`) that links the
            remaining candidates (crops, rescales, marks) where the fine check does not decide.
        sides: (N,) smaller side of each stored image (for `low_detail` and the fine check; None: judged on
            the 64 px pixels only).
        fine: k -> image k's stored file as (FINE_SIZE, FINE_SIZE) float32 grayscale (squashed like
            `images`; None if unreadable), for the fine check of registered pairs; None: every pair is
            decided at 64 px.

    Returns:
        (labels, stats): cluster label per image; stats counts `candidates`, `rejected` pairs and the
        `low_detail` images, which are left out of near-duplicate linking (exact copies only), and holds
        the (N,) bool mask of them as `flat`.
    """
    hashes = hashes.reshape(len(images), -1)
    i, j = candidate_pairs(hashes, max_distance)
    flat = low_detail(images, sides) if len(images) else np.zeros(0, bool)
    stats = {"candidates": len(i), "low_detail": int(flat.sum()), "flat": flat}
    i, j = i[~(flat[i] | flat[j])], j[~(flat[i] | flat[j])]  # a low-detail image: identical pixels only
    if min_similarity is None or not len(i):
        stats["rejected"] = stats["candidates"] - len(i)
        return star_clusters(len(images), i, j), stats
    check = _PairCheck(images, hashes, min_similarity, min_confirmed, sides, fine)
    # One BLAS thread: the checks' dot products and fits are a few thousand values each, and OpenBLAS's
    # thread pool costs more than it saves there (a 256 px line fit: 0.3 ms on one thread, 24 ms with
    # the pool while other processes load the cores, as training beside the audit does).
    with threadpool_limits(limits=1, user_api="blas"):
        keep = check.candidates(i, j)
        i, j = i[keep], j[keep]
        stats["rejected"] = stats["candidates"] - len(i)
        return rejoin_stranded(star_clusters(len(images), i, j), i, j, check.pair), stats


class _PairCheck:
    """The pixel check of `cluster_images`: all candidate pairs at once (`candidates`), or one pair (`pair`)."""

    def __init__(self, images: np.ndarray, hashes: np.ndarray, min_similarity: float, min_confirmed: float,
                 sides: np.ndarray | None, fine: Callable[[int], np.ndarray | None] | None):
        self.images, self.hashes, self.details = images, hashes, detail(images)
        self.min_similarity, self.min_confirmed = min_similarity, min_confirmed
        self.sides, self.fine = sides, fine

    def candidates(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """(P,) bool: the candidate pairs (i, j) confirmed as copies."""
        # Equal hashes are checked too: distinct look-alikes (the phantoms) can share all 64 bits.
        scores = shifted_scores(self.details, i, j)
        keep = scores >= self.min_similarity
        ranking = scores.copy()  # a cropped copy ranks high at its scale (`scaled_scores`)
        ranking[~keep] = np.maximum(scores[~keep], scaled_scores(self.images, self.details, i[~keep], j[~keep]))
        chosen = _worth_registering(i, j, ranking, keep, hash_distances(self.hashes, i, j))
        if self.fine is not None and self.sides is not None:  # the shift check's links: the fine check's veto too
            chosen += np.flatnonzero(keep & (np.minimum(self.sides[i], self.sides[j]) >= FINE_MIN_SIDE)).tolist()
        decided = _register_pairs(self.images, i, j, chosen, self.min_confirmed, self.fine, self.sides, keep)
        for k, linked in decided.items():
            keep[k] = linked
        return keep

    def pair(self, a: int, b: int) -> bool:
        """Whether images a and b are confirmed copies: `candidates` for the one pair."""
        return bool(self.candidates(np.array([min(a, b)]), np.array([max(a, b)]))[0])


def rejoin_stranded(labels: np.ndarray, i: np.ndarray, j: np.ndarray, decide: Callable[[int, int], bool]) -> np.ndarray:
    """Give a star to the images `star_clusters` left alone although they have confirmed copies: each such copy
    went to another star (the source of a copy, taken by a third copy of it, as in a series of re-exports).
    The image joins the star of one of them when `decide` confirms it a copy of that star's representative
    too, so every member is still confirmed against the common image (the rule that keeps look-alikes from
    chaining); otherwise it stays alone and its link is not counted."""
    n = len(labels)
    adj = sparse.coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    adj = (adj + adj.T).tocsr()
    sizes = np.bincount(labels, minlength=n)
    for s in np.flatnonzero((sizes[labels] == 1) & (np.diff(adj.indptr) > 0)):
        reps, counts = np.unique(labels[adj.indices[adj.indptr[s] : adj.indptr[s + 1]]], return_counts=True)
        for rep in reps[np.argsort(-counts, kind="stable")]:
            if rep != s and decide(int(s), int(rep)):
                labels[s] = rep
                break
    return labels
