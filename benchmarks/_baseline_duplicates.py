"""Today's (before issue 18) near-duplicate clustering, kept verbatim as the baseline `bench_audit.py` measures
the new audit against: recall per transform and throughput ratio in one run. Not used by the package.
"""
from __future__ import annotations

import hashlib

import cv2
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

HASH_BITS = 64
_N = 32  # side of the thumbnail the DCT is taken on


def _dct_matrix(n: int) -> np.ndarray:
    """DCT-II basis (n, n), unnormalised like scipy.fftpack.dct, which imagehash applies along both axes."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    return (2.0 * np.cos(np.pi * k * (2 * i + 1) / (2 * n))).astype(np.float64)


_DCT = _dct_matrix(_N)
_BIT_WEIGHTS = (np.uint64(1) << np.arange(HASH_BITS - 1, -1, -1, dtype=np.uint64))  # first bit = MSB


def _gray(image: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 -> (H, W) float32 luminance with PIL's "L" weights (as imagehash converts)."""
    if image.ndim == 2 or image.shape[2] == 1:
        return image.reshape(image.shape[0], image.shape[1]).astype(np.float32)
    return image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def phash_batch(images: np.ndarray) -> np.ndarray:
    """64-bit perceptual hashes of a batch of images.

    Args:
        images: (N, H, W, C) uint8, e.g. a slice of the decode cache.

    Returns:
        (N,) uint64: bit 63 is DCT coefficient (0, 0), row-major over the 8x8 low frequencies.
    """
    thumbs = np.stack([cv2.resize(_gray(im), (_N, _N), interpolation=cv2.INTER_AREA) for im in images])  # (N, 32, 32)
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


def near_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs (i < j) whose hashes differ in at most `max_distance` bits.

    Multi-index hashing (Norouzi et al., 2012): split the 64 bits into 4 blocks of 16; by pigeonhole two
    hashes within `d` bits differ by at most floor(d / 4) bits in at least one block. For each block, the
    hashes are sorted by the block's value and every value within that radius is looked up at once
    (a bucket table of all 65,536 block values, probed for all hashes per XOR mask); the candidates are checked with a vectorised popcount.
    No library offers this for 64-bit Hamming space on the CPU, hence the hand-written search.

    Args:
        hashes: (N,) uint64 (repeats allowed; `cluster` removes them first).
        max_distance: largest Hamming distance that still links two images (0..63).

    Returns:
        (i, j): int64 arrays of pair indices into `hashes`.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    n = len(hashes)
    masks = _masks(max_distance // _BLOCKS)
    found: list[np.ndarray] = []
    for b in range(_BLOCKS):
        key = ((hashes >> np.uint64(16 * b)) & np.uint64(0xFFFF)).astype(np.int64)
        order = np.argsort(key, kind="stable")
        starts = np.concatenate([[0], np.cumsum(np.bincount(key, minlength=1 << 16))])  # bucket v: order[starts[v]:starts[v+1]]
        for mask in masks.astype(np.int64):
            probe = key ^ mask
            left = starts[probe]
            count = starts[probe + 1] - left
            total = int(count.sum())
            if not total:
                continue
            i = np.repeat(np.arange(n), count)
            within = np.arange(total) - np.repeat(np.cumsum(count) - count, count)
            j = order[np.repeat(left, count) + within]
            keep = (i < j) & (popcount(hashes[i] ^ hashes[j]) <= max_distance)
            if keep.any():
                found.append(np.stack([i[keep], j[keep]], axis=1))
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pairs = np.unique(np.concatenate(found), axis=0)  # a pair found through several blocks counts once
    return pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)


def cluster(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Connected components of the "within `max_distance` bits" graph.

    Args:
        hashes: (N,) uint64 perceptual hashes (repeats allowed).
        max_distance: Hamming threshold; 0 links identical hashes only.

    Returns:
        (N,) int64 component label per hash; a label shared by two or more images is a cluster.
    """
    uniq, inverse = np.unique(np.asarray(hashes, dtype=np.uint64), return_inverse=True)
    i, j = near_pairs(uniq, max_distance) if max_distance > 0 else (np.zeros(0, np.int64),) * 2
    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(len(uniq), len(uniq)))
    _, labels = connected_components(graph, directed=False)
    return labels[inverse.reshape(-1)].astype(np.int64)


def _highpass(gray: np.ndarray) -> np.ndarray:
    return gray - cv2.GaussianBlur(gray, (0, 0), 1.5)


def _correlation(ga: np.ndarray, gb: np.ndarray) -> float:
    """Pearson correlation of the high-pass images inside a margin (borders are where crops and warps differ)."""
    m = max(2, min(ga.shape) // 12)
    x = _highpass(ga)[m:-m, m:-m].ravel()
    y = _highpass(gb)[m:-m, m:-m].ravel()
    x, y = x - x.mean(), y - y.mean()
    denom = float(np.sqrt((x @ x) * (y @ y)))
    return float(x @ y / denom) if denom > 0 else float(np.array_equal(ga, gb))


def similarity(a: np.ndarray, b: np.ndarray, floor: float = -1.0) -> float:
    """Correlation of fine detail (noise, edges) after aligning `b` onto `a`.

    Why: images of the same anatomy (the embedded phantoms, CT slices of one protocol) share their coarse
    layout, so a 64-bit hash cannot tell them apart; a re-encoded, rescaled, cropped or brightened copy
    keeps the fine detail of its source, at the place a registration finds. A translation (phase
    correlation, cheap) comes first; an affine ECC registration (crops change the scale after the squash
    resize) only runs when that score is above `floor`.

    Args:
        a, b: (H, W, C) uint8 images of the same shape (two slots of the decode cache).
        floor: skip the affine registration when the translation-aligned score is below this.

    Returns:
        Pearson correlation in [-1, 1] of the aligned high-pass images.
    """
    ga, gb = _gray(a), _gray(b)
    h, w = ga.shape
    (dx, dy), _ = cv2.phaseCorrelate(ga, gb, cv2.createHanningWindow((w, h), cv2.CV_32F))
    shift = np.float32([[1, 0, dx], [0, 1, dy]])
    best = _correlation(ga, cv2.warpAffine(gb, shift, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP))
    if best < floor:
        return best
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 50, 1e-4)
    try:
        _, warp = cv2.findTransformECC(cv2.GaussianBlur(ga, (0, 0), 1), cv2.GaussianBlur(gb, (0, 0), 1), shift,
                                       cv2.MOTION_AFFINE, criteria, None, 1)
    except cv2.error:
        return best  # no convergence (e.g. a flat image): keep the translation score
    return max(best, _correlation(ga, cv2.warpAffine(gb, warp, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)))


def _detail(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, H, W) float32 high-pass images, zero outside a margin, unit norm."""
    out = np.stack([_highpass(_gray(im)) for im in images]).astype(np.float32)
    m = max(2, min(out.shape[1:]) // 12)
    mask = np.zeros(out.shape[1:], np.float32)
    mask[m:-m, m:-m] = 1
    out = (out - (out * mask).sum((1, 2), keepdims=True) / mask.sum()) * mask
    return out / np.maximum(np.linalg.norm(out.reshape(len(out), -1), axis=1), 1e-6)[:, None, None]


def shifted_scores(detail: np.ndarray, i: np.ndarray, j: np.ndarray, max_shift: int = 4, chunk: int = 512) -> np.ndarray:
    """Best correlation of the detail images of pairs (i, j) over integer shifts up to `max_shift` pixels.

    The first, cheap stage of the pair check, batched: circular cross-correlation through numpy's FFT of
    many pairs at once (the margin of zeros in `_detail` keeps the wrap-around from mixing opposite borders).
    """
    spectra = np.fft.rfft2(detail)  # (N, H, W//2+1)
    h, w = detail.shape[1:]
    near = np.zeros((h, w), bool)
    near[np.r_[0 : max_shift + 1, h - max_shift : h][:, None], np.r_[0 : max_shift + 1, w - max_shift : w]] = True
    out = np.empty(len(i), np.float32)
    for s in range(0, len(i), chunk):
        a, b = i[s : s + chunk], j[s : s + chunk]
        xcorr = np.fft.irfft2(spectra[a] * np.conj(spectra[b]), s=(h, w))  # (B, H, W)
        out[s : s + chunk] = xcorr[:, near].max(axis=1)
    return out


def cluster_images(
    images: np.ndarray, hashes: np.ndarray, max_distance: int, min_similarity: float | None
) -> tuple[np.ndarray, int]:
    """Near-duplicate clusters: hash pairs within `max_distance`, confirmed on the pixels.

    A candidate pair is linked when the correlation of its fine detail reaches `min_similarity`: first
    under integer shifts for all pairs at once (`shifted_scores`), then, only for pairs that come close
    (within 0.1), after an affine registration (`similarity`), which a crop or rescale needs.

    Args:
        images: (N, H, W, C) uint8 at `duplicate_audit.AUDIT_GEOMETRY`.
        hashes: (N,) uint64 `phash_batch` of `images`.
        max_distance: Hamming threshold of the candidate stage.
        min_similarity: None links every candidate (hash only).

    Returns:
        (labels, rejected): component label per image, and how many candidate pairs the check refused.
    """
    i, j = near_pairs(hashes, max_distance)
    rejected = 0
    if min_similarity is not None and len(i):
        # Equal hashes are checked too: distinct look-alikes (the phantoms) can share all 64 bits.
        scores = shifted_scores(_detail(images), i, j)
        keep = scores >= min_similarity
        for k in np.flatnonzero(~keep & (scores >= min_similarity - 0.1)):
            keep[k] = similarity(images[i[k]], images[j[k]], min_similarity - 0.1) >= min_similarity
        rejected = int((~keep).sum())
        i, j = i[keep], j[keep]
    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(len(hashes), len(hashes)))
    _, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64), rejected
