"""The pixel check of candidate pairs: is image b a copy of image a (cropped, rescaled, re-encoded, marked)?

Both images are the audit's 64x64 grayscale squash (`duplicate_audit.AUDIT_GEOMETRY`). A copy keeps the
fine detail of its source (noise, texture) at the place a registration finds; a look-alike (another
phantom, the next CT slice) shares the coarse anatomy and its edges but not that detail. Two stages:

1. all candidate pairs at once: the correlation of fine detail under integer shifts (FFT, batched);
   copies with the source's geometry (re-encodes, small rescales) pass here;
2. the rest, one pair at a time: a scale search (crops change the scale of the squashed image, by up to
   ~11% per axis for 5% per side) by phase correlation, refined by an affine ECC registration; then the
   pixels where the two differ in brightness far beyond the noise (burnt-in marks on one copy, a border
   one copy lacks) are masked, and the fine detail of the remaining pixels must correlate.

OpenCV provides the registrations; the masking and the scale grid are written here because no library
offers a "copy or not" decision for a pair of small images.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

_SIZE = 64
_MARGIN = 4  # pixels at the border left out: the squash resize and the warps differ most there
_SCALES = (0.92, 1.0, 1.085)  # per-axis scale hypotheses: 5% crops per side squash by up to 1/0.9
_WINDOW = cv2.createHanningWindow((_SIZE, _SIZE), cv2.CV_32F)
MAX_MASKED = 0.4  # a pair differing over more than this share of pixels is not a marked copy


def gray(image: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 -> (H, W) float32 luminance with PIL's "L" weights (as imagehash converts)."""
    if image.ndim == 2 or image.shape[2] == 1:
        return image.reshape(image.shape[0], image.shape[1]).astype(np.float32)
    return image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def highpass(g: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    return g - cv2.GaussianBlur(g, (0, 0), sigma)


def detail(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, H, W) float32 high-pass images, zero outside a margin, unit norm."""
    out = np.stack([highpass(gray(im)) for im in images]).astype(np.float32)
    m = max(2, min(out.shape[1:]) // 12)
    mask = np.zeros(out.shape[1:], np.float32)
    mask[m:-m, m:-m] = 1
    out = (out - (out * mask).sum((1, 2), keepdims=True) / mask.sum()) * mask
    return out / np.maximum(np.linalg.norm(out.reshape(len(out), -1), axis=1), 1e-6)[:, None, None]


def shifted_scores(detail_images: np.ndarray, i: np.ndarray, j: np.ndarray, max_shift: int = 4,
                   chunk: int = 512) -> np.ndarray:
    """Best correlation of the detail images of pairs (i, j) over integer shifts up to `max_shift` pixels.

    Circular cross-correlation through numpy's FFT of many pairs at once (the margin of zeros in `detail`
    keeps the wrap-around from mixing opposite borders).
    """
    spectra = np.fft.rfft2(detail_images)  # (N, H, W//2+1)
    h, w = detail_images.shape[1:]
    near = _near_shifts(h, w, max_shift)
    out = np.empty(len(i), np.float32)
    for s in range(0, len(i), chunk):
        a, b = i[s : s + chunk], j[s : s + chunk]
        xcorr = np.fft.irfft2(spectra[a] * np.conj(spectra[b]), s=(h, w))  # (B, H, W)
        out[s : s + chunk] = xcorr[:, near].max(axis=1) if len(a) else 0
    return out


def _near_shifts(h: int, w: int, max_shift: int) -> np.ndarray:
    """(h, w) bool: the entries of a circular cross-correlation that are shifts of at most `max_shift` px."""
    near = np.zeros((h, w), bool)
    near[np.r_[0 : max_shift + 1, h - max_shift : h][:, None], np.r_[0 : max_shift + 1, w - max_shift : w]] = True
    return near


def scaled_scores(images: np.ndarray, detail_images: np.ndarray, i: np.ndarray, j: np.ndarray, max_shift: int = 4,
                  chunk: int = 1024) -> np.ndarray:
    """`shifted_scores` of pairs (i, j) with b rescaled per axis by each `_SCALES` hypothesis but the identity
    (the best of the 8): how a cropped copy ranks among its source's candidates before any registration.

    At scale 1 a copy cropped by a few % per side lines up with its source no better than the next CT slice
    does; at the right scale it does (COVID-CT's 746 images and a cropped copy of each, 19,896 candidate pairs:
    the copy is its source's best candidate for 93% of them by this score, 66% at scale 1). Pairs are taken
    `chunk` at a time, sorted by b, and only their images are warped, so memory stays bounded for any N.
    """
    h, w = detail_images.shape[1:]
    if h != w:
        raise ValueError(f"scaled_scores needs square audit images, got {h}x{w}")
    near = _near_shifts(h, w, max_shift)
    warps = [_scaled(sx, sy, size=h) for sx in _SCALES for sy in _SCALES if not sx == sy == 1.0]
    order = np.argsort(j, kind="stable")
    best = np.full(len(i), -1.0, np.float32)
    for s in range(0, len(i), chunk):
        pairs = order[s : s + chunk]
        spectra = np.fft.rfft2(detail_images[i[pairs]])
        images_b, which = np.unique(j[pairs], return_inverse=True)
        gray_b = [gray(images[k]) for k in images_b]
        for warp in warps:
            moved = np.stack([cv2.warpAffine(g, warp, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                             borderMode=cv2.BORDER_REFLECT) for g in gray_b])
            scaled = np.fft.rfft2(detail(moved[..., None]))
            xcorr = np.fft.irfft2(spectra * np.conj(scaled[which]), s=(h, w))
            best[pairs] = np.maximum(best[pairs], xcorr[:, near].max(axis=1))
    return best


def _scaled(sx: float, sy: float, dx: float = 0.0, dy: float = 0.0, size: int = _SIZE) -> np.ndarray:
    """2x3 map of a point of a onto b: scale about the centre, then shift (cv2's WARP_INVERSE_MAP form)."""
    c = (size - 1) / 2
    return np.float32([[sx, 0, c - sx * c + dx], [0, sy, c - sy * c + dy]])


def _ecc(ga: np.ndarray, gb: np.ndarray, warp: np.ndarray, mask: np.ndarray | None = None, iterations: int = 30,
         eps: float = 1e-3, blur: int = 3) -> np.ndarray:
    try:
        _, warp = cv2.findTransformECC(ga, gb, warp.copy(), cv2.MOTION_AFFINE,
                                       (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, iterations, eps), mask, blur)
    except cv2.error:
        pass  # no convergence (a flat image): keep the estimate
    return warp


def coarse_register(ga: np.ndarray, gb: np.ndarray, keep: int = 4) -> list[np.ndarray]:
    """Maps of a's pixels onto b's (2x3 float32) for two 64x64 median-filtered images, best first: for each
    per-axis scale of a grid, the shift phase correlation finds (within a few % of the true scale); the
    `keep` best, judged by the correlation they achieve (phase correlation's peak height is not comparable
    across scales), since ECC from the best one alone sometimes settles in a local optimum."""
    ba, bb = cv2.GaussianBlur(ga, (0, 0), 1.0), cv2.GaussianBlur(gb, (0, 0), 1.0)
    inside = _interior()
    target = highpass(ba, 2.0)[inside]
    found = []
    for sx in _SCALES:
        for sy in _SCALES:
            moved = cv2.warpAffine(bb, _scaled(sx, sy), (_SIZE, _SIZE), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                   borderMode=cv2.BORDER_REFLECT)
            # A copy of ba: OpenCV 5.0's phaseCorrelate windows its first input in place.
            (dx, dy), _ = cv2.phaseCorrelate(ba.copy(), moved, _WINDOW)
            candidate = _scaled(sx, sy, sx * dx, sy * dy)
            moved = cv2.warpAffine(bb, candidate, (_SIZE, _SIZE), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                   borderMode=cv2.BORDER_REFLECT)
            found.append((_corr(target, highpass(moved, 2.0)[inside]), len(found), candidate))
    return [warp for _, _, warp in sorted(found, key=lambda f: (-f[0], f[1]))[:keep]]


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denom = float(np.sqrt((x @ x) * (y @ y)))
    return float(x @ y / denom) if denom > 0 else 0.0


def masked_score(ga: np.ndarray, gb: np.ndarray, warp: np.ndarray, sigma: float | None = None,
                 grow: int = 3) -> tuple[float, np.ndarray]:
    """(fine-detail correlation outside the masked pixels, the unmasked pixels) of b aligned onto a.

    Masked: pixels whose brightness differs from a linear fit of b on a by far more than the spread of the
    differences (a burnt-in caliper, text or arrow on one copy), grown by `grow` // 2 pixels since the
    high-pass spreads them, plus the border and wherever the warp leaves b's frame.

    Args:
        ga, gb: square float32 grayscale images of one size (64 px, or `FINE_SIZE` for the fine check).
        warp: map of a's pixels onto b's.
        sigma: high-pass of the compared detail (default `DETAIL_SIGMA`).
        grow: side of the square the outliers are dilated with.
    """
    size = ga.shape[0]
    moved = cv2.warpAffine(gb, warp, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderValue=np.nan)
    valid = ~np.isnan(moved) & _interior(size)
    if valid.sum() < 0.3 * size * size:
        return 0.0, np.zeros_like(valid)
    moved = np.where(np.isnan(moved), ga, moved)  # outside b's frame: a's pixels, masked anyway
    slope, offset = _line_fit(ga[valid], moved[valid])
    residual = moved - (slope * ga + offset)
    spread = 1.4826 * np.median(np.abs(residual[valid] - np.median(residual[valid])))
    contrast = np.subtract(*np.percentile(ga[valid], [99, 1]))  # edges misplaced by interpolation stay below
    outliers = (np.abs(residual) > max(5 * spread, 0.25 * contrast, 8.0)).astype(np.uint8)
    keep = valid & ~cv2.dilate(outliers, np.ones((grow, grow), np.uint8)).astype(bool)
    if keep.sum() < 0.3 * size * size:
        return 0.0, keep
    sigma = DETAIL_SIGMA if sigma is None else sigma
    return _corr(highpass(ga, sigma)[keep], highpass(moved, sigma)[keep]), keep


# Detail compared by the final score: high-pass of this sigma (px of the 64 px image). At 64 px the nearest
# look-alikes, adjacent slices of one CT series, keep much of what a copy keeps (COVID-CT: up to 0.92, see
# docs/duplicates.md); 128 px did not separate them better (copies 0.90-0.98, slices up to 0.96).
DETAIL_SIGMA = 1.0


def _line_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares (slope, offset) of y on x (1, 0 for a constant x). `np.polyfit(x, y, 1)` gives the same
    line through an SVD of the Vandermonde matrix, ~20x slower on 256 px images (half the fine check's time)."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    xm, ym = x.mean(), y.mean()
    dx = x - xm
    var = float(dx @ dx)
    if var <= 0:
        return 1.0, 0.0
    slope = float(dx @ (y - ym)) / var
    return slope, float(ym - slope * xm)


def _plausible(warp: np.ndarray) -> bool:
    """Crops and rescales scale the axes (0.8-1.25) and shift; a rotation or shear is not a copy's."""
    (sx, shear_x), (shear_y, sy) = warp[:, :2]
    return 0.8 < sx < 1.25 and 0.8 < sy < 1.25 and max(abs(shear_x), abs(shear_y)) <= 0.03


def _refine(ga: np.ndarray, gb: np.ndarray, warp: np.ndarray, score: float, keep: np.ndarray):
    """ECC from `warp` on median-filtered images, then again without the masked pixels if there are any
    beyond the border (marks pull the registration); the best-scoring plausible map is kept."""
    ma, mb = cv2.medianBlur(ga, 3), cv2.medianBlur(gb, 3)
    for mask in (None, keep):
        if mask is not None and keep.mean() > 0.9 * _interior().mean():
            break
        again = _ecc(ma, mb, warp, None if mask is None else mask.astype(np.uint8))
        if _plausible(again):
            score2, keep2 = masked_score(ga, gb, again)
            if score2 > score:
                score, keep, warp = score2, keep2, again
    return score, keep, warp


def confirm(a: np.ndarray, b: np.ndarray, give_up: float = 0.4, sure: float = 0.95,
            near_miss: float = 0.8) -> tuple[float, np.ndarray | None]:
    """Stage 2 for one pair: the masked fine-detail correlation after registration, and the map found.

    The registration runs on median-filtered images (thin burnt-in strokes would pull it): a scale grid
    with phase correlation, then (unless the pair scores below `give_up` there, as distinct images do)
    ECC from the grid's best map, once more without the masked pixels, and from its next three when that
    ends in a near miss (ECC sometimes settles in a local optimum). A pair differing over more
    than `MAX_MASKED` of its pixels, or needing a rotation or shear, scores 0.

    Args:
        a, b: (64, 64, C) uint8 audit images.
        give_up: score at the grid's registration below which the pair is refused without refining.
        sure: score after which no further start is tried.
        near_miss: refined score of the best start below which no further start is tried.

    Returns:
        (score, warp): warp is the 2x3 map of a's pixels onto b's (`cv2.WARP_INVERSE_MAP` form) of the best
        score, None when no plausible map was found.
    """
    ga, gb = gray(a), gray(b)
    best, best_warp = 0.0, None
    for k, start in enumerate(coarse_register(cv2.medianBlur(ga, 3), cv2.medianBlur(gb, 3))):
        score, keep = masked_score(ga, gb, start)
        if score < give_up:
            if k == 0:
                break  # the grid's best start is already far off: a distinct image (most candidates)
            continue
        score, keep, warp = _refine(ga, gb, start, score, keep)
        if _plausible(warp) and 1 - keep.sum() / np.count_nonzero(_interior()) <= MAX_MASKED and score > best:
            best, best_warp = score, warp
        if best >= sure or (k == 0 and score < near_miss):
            break  # sure enough, or far from a copy even after refining: the other starts are for near misses
    return best, best_warp


# The fine check: at 64 px, copies cropped by a few % and burnt-in marks lose part of the detail the check
# compares, and the closest adjacent CT slices keep as much (COVID-CT: copies down to 0.83, slices up to 0.90
# at 64 px), so no threshold there separates them. At 256 px the vessels and texture that differ between two
# slices are resolved. The rule, from what a copy is: one affine map (crop, rescale) away from its source
# everywhere, differing only by resampling noise and where marks were burnt in. Under the 64 px map refined by
# ECC at 256 px, a copy
# - is rigid: 6x6 overlapping 64 px tiles, registered again on their own, stay put (median shift <=
#   FINE_MAX_SHIFT px; COVID-CT's copies found by eye: <= 0.18, generated copies of its images under every
#   transform: <= 0.47 but for one of 150 at 0.82), where adjacent slices move non-rigidly (the 50 closest
#   pairs of COVID-CT's 746 images that are not copies: 0.58-2.8 px; a scan deformed smoothly by ~4 px,
#   `audit.copies.deformed`: >= 0.74);
# - differs beyond the noise over <= FINE_MAX_MASKED of the pixels both images show (a crop's missing border
#   is not counted: it is no difference; marks over 2% of the pixels, grown by the mask: <= 12%, 18% for the
#   thickest strokes of a 1,400 px image; the closest slices: 11-32%);
# - keeps its detail (sigma 1.5 px): correlation >= `min_score` (COVID-CT copies: 1st percentile 0.78).
# On all 746 COVID-CT images, exactly the 14 copy pairs found by eye pass, of the 64 registered pairs >= 0.78.
# It reads the stored files again, so it runs only on pairs already registered at 64 px, and only for images
# stored at >= FINE_MIN_SIDE px (upsampled at most 2.56x into the 256 px image: the smallest images,
# 100 px; the embedded phantoms cropped to 116-125 px score 0.87-0.94 at 64 px, 0.99 here, and their
# look-alikes 0.08-0.12 here); docs/duplicates.md has the figures.
FINE_SIZE = 256
FINE_SIGMA = 1.5
FINE_MIN_SIDE = 100
FINE_GROW = 5  # side of the square the 256 px outliers are grown by (3 leaves the marks' halo: copies 0.81)
FINE_MAX_MASKED = 0.15
FINE_MAX_SHIFT = 0.5
_TILE = 64
_TILE_WINDOW = cv2.createHanningWindow((_TILE, _TILE), cv2.CV_32F)


@dataclass(frozen=True)
class FineCheck:
    """What the fine check measured for a pair: masked detail correlation, share of the pixels both show
    that is masked (differs beyond the noise), median shift (px at 256) of its tiles registered on their own."""

    score: float
    masked: float
    shift: float

    def is_copy(self, min_score: float) -> bool:
        return self.score >= min_score and self.masked <= FINE_MAX_MASKED and self.shift <= FINE_MAX_SHIFT

    def is_other_image(self) -> bool:
        """Moves non-rigidly and differs widely at once: an adjacent slice, whatever its 64 px score (COVID-CT's
        1099/1100 and 39%3/39%6 score 0.90-0.91 at 64 px once one is re-encoded; at 256 px their tiles move
        0.7-1.4 px and they differ over 16-19% of the pixels). Applied to pairs linked at 64 px, it removed the
        benchmark's false links between adjacent slices, and recall fell by one copy at most (all four
        transforms combined: 98.4% to 98.3%); heavily marked copies that fail both score under 0.9 at 64 px
        and are judged by `is_copy`."""
        return self.shift > FINE_MAX_SHIFT and self.masked > FINE_MAX_MASKED


def _upscaled(warp: np.ndarray, factor: float) -> np.ndarray:
    """The 2x3 map `warp` of 64 px images expressed for images `factor` times larger (pixel centres kept)."""
    to_big = np.array([[factor, 0, (factor - 1) / 2], [0, factor, (factor - 1) / 2], [0, 0, 1]])
    return (to_big @ np.vstack([warp, [0, 0, 1]]) @ np.linalg.inv(to_big))[:2].astype(np.float32)


def local_shift(a: np.ndarray, b: np.ndarray, warp: np.ndarray) -> float:
    """Median shift (px) that phase correlation finds between overlapping tiles of a and of b aligned onto a
    (median-filtered against marks); tiles without detail are left out, and 0 when none has any."""
    size = a.shape[0]
    moved = cv2.warpAffine(b, warp, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_REFLECT)
    ma, mb = cv2.medianBlur(a, 3), cv2.medianBlur(moved, 3)
    shifts = []
    for y in range(_TILE // 2, size - 3 * _TILE // 2 + 1, _TILE // 2):
        for x in range(_TILE // 2, size - 3 * _TILE // 2 + 1, _TILE // 2):
            ta, tb = ma[y : y + _TILE, x : x + _TILE].copy(), mb[y : y + _TILE, x : x + _TILE].copy()
            if ta.std() >= 3:
                (dx, dy), _ = cv2.phaseCorrelate(ta, tb, _TILE_WINDOW)
                shifts.append(np.hypot(dx, dy))
    return float(np.median(shifts)) if shifts else 0.0


def confirm_fine(a: np.ndarray, b: np.ndarray, warp: np.ndarray) -> FineCheck:
    """The fine check of a pair already registered at 64 px, at `FINE_SIZE` px (the rule is stated above).

    Args:
        a, b: (FINE_SIZE, FINE_SIZE) float32 grayscale images (the stored files squashed, as the audit's 64 px).
        warp: `confirm`'s map of a's 64 px image onto b's.
    """
    size = a.shape[0]
    warp = _upscaled(warp, size / _SIZE)
    smooth_a, smooth_b = (cv2.GaussianBlur(cv2.medianBlur(g, 3), (0, 0), 1.0) for g in (a, b))
    score, keep = masked_score(a, b, warp, sigma=FINE_SIGMA, grow=FINE_GROW)
    for _ in range(2):  # ECC without the masked pixels (marks pull it), then again with the new mask
        refined = _ecc(smooth_a, smooth_b, warp, keep.astype(np.uint8), iterations=50, eps=1e-4, blur=5)
        if not _plausible(refined):
            break
        score2, keep2 = masked_score(a, b, refined, sigma=FINE_SIGMA, grow=FINE_GROW)
        if score2 <= score:
            break
        score, keep, warp = score2, keep2, refined
    shown = np.count_nonzero(_in_frame(size, warp))  # a crop shows less than its source: that is not a difference
    return FineCheck(score, 1 - keep.sum() / max(shown, 1), local_shift(a, b, warp))


def _in_frame(size: int, warp: np.ndarray) -> np.ndarray:
    """The compared pixels of a that b shows under `warp` (as `masked_score` counts them valid)."""
    ones = np.ones((size, size), np.float32)
    moved = cv2.warpAffine(ones, warp, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderValue=np.nan)
    return ~np.isnan(moved) & _interior(size)


@functools.cache
def _interior(size: int = _SIZE) -> np.ndarray:
    """The pixels compared: all but a margin of `_MARGIN` px at 64 px (the same share at other sizes); read-only."""
    margin = _MARGIN * size // _SIZE
    inside = np.zeros((size, size), bool)
    inside[margin:-margin, margin:-margin] = True
    inside.flags.writeable = False
    return inside
