"""Seeded smooth random fields (the texture and layout noise of the synthetic world).

Large-scale fields are drawn on a coarse grid and interpolated bilinearly, so a field with a
correlation length of hundreds of pixels costs about as much as one full-resolution array
operation, whatever the scale.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def upsample_bilinear(coarse: np.ndarray, shape: tuple[int, int], step: float) -> np.ndarray:
    """Bilinear interpolation of a coarse grid onto ``shape`` pixels.

    ``coarse[i, j]`` sits at full-resolution pixel ``(i * step, j * step)``; the coarse grid
    must cover ``shape`` (``coarse.shape[k] >= shape[k] / step + 2``). Returns float32 (H, W).
    """
    h, w = shape
    out = coarse.astype(np.float32, copy=False)
    # Separable: columns first on the small array, then rows, whose gathers copy whole
    # contiguous rows (much cheaper than a column gather at full size).
    c = np.arange(w, dtype=np.float64) / step
    c0 = np.floor(c).astype(np.intp)
    fc = (c - c0).astype(np.float32)[None, :]
    out = out[:, c0] * (1.0 - fc) + out[:, c0 + 1] * fc
    r = np.arange(h, dtype=np.float64) / step
    r0 = np.floor(r).astype(np.intp)
    fr = (r - r0).astype(np.float32)[:, None]
    out = out[r0] * (1.0 - fr) + out[r0 + 1] * fr
    return np.ascontiguousarray(out, dtype=np.float32)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Gaussian random field, zero mean and unit standard deviation, float32 (H, W).

    ``scale_px`` is the correlation length in pixels (the Gaussian filter sigma). Scales of
    a few pixels are filtered at full resolution; larger ones on a grid of step ``scale/3``.
    """
    h, w = shape
    scale_px = max(float(scale_px), 0.3)
    if scale_px < 6.0:
        white = rng.standard_normal((h, w), dtype=np.float32)
        field = ndi.gaussian_filter(white, scale_px, mode="wrap")
    else:
        step = scale_px / 3.0
        ch, cw = int(np.ceil(h / step)) + 3, int(np.ceil(w / step)) + 3
        white = rng.standard_normal((ch, cw), dtype=np.float32)
        field = upsample_bilinear(ndi.gaussian_filter(white, 3.0, mode="reflect"), shape, step)
    field -= field.mean()
    field /= field.std() + 1e-12
    return field.astype(np.float32, copy=False)


def approx_distance(mask: np.ndarray) -> np.ndarray:
    """Approximate Euclidean distance (pixels, float32) from each pixel to the nearest True
    pixel of ``mask`` (0 on it), from two chamfer transforms: ``0.59 * chessboard + 0.41 *
    taxicab`` is exact along axes and diagonals and within ~8 % elsewhere, at a fraction of
    the cost of an exact EDT (used for setbacks and banks, where metres matter, not cm).
    """
    if not mask.any():
        return np.full(mask.shape, np.float32(1e6))
    cb = ndi.distance_transform_cdt(~mask, metric="chessboard").astype(np.float32)
    tc = ndi.distance_transform_cdt(~mask, metric="taxicab").astype(np.float32)
    return 0.59 * cb + 0.41 * tc


def fractal_noise(
    rng: np.random.Generator, shape: tuple[int, int], scales_px: tuple[float, ...], weights: tuple[float, ...] | None = None
) -> np.ndarray:
    """Weighted sum of :func:`smooth_noise` at several scales, renormalised to unit std."""
    weights = weights or tuple(1.0 for _ in scales_px)
    out = np.zeros(shape, dtype=np.float32)
    for s, wgt in zip(scales_px, weights):
        out += np.float32(wgt) * smooth_noise(rng, shape, s)
    out /= out.std() + 1e-12
    return out


def poisson_disc(rng: np.random.Generator, candidates: np.ndarray, min_dist: np.ndarray) -> np.ndarray:
    """Greedy dart throwing: visit candidates (N, 2) in random order and keep each one that is
    at least its ``min_dist`` (N,) away from every point kept so far. Returns kept indices.

    A hash grid of cell size ``max(min_dist)`` limits each test to the 3 x 3 neighbouring
    cells, so the cost is linear in N (a loop over seeds, not pixels).
    """
    n = len(candidates)
    if n == 0:
        return np.zeros(0, np.intp)
    cell = float(np.max(min_dist))
    keys = np.floor(candidates / cell).astype(np.int64)
    grid: dict[tuple[int, int], list[int]] = {}
    kept: list[int] = []
    pts = candidates.tolist()
    md = min_dist.tolist()
    for i in rng.permutation(n).tolist():
        ky, kx = int(keys[i, 0]), int(keys[i, 1])
        y, x = pts[i]
        r2 = md[i] * md[i]
        ok = True
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                for j in grid.get((ky + dy, kx + dx), ()):
                    yj, xj = pts[j]
                    if (y - yj) ** 2 + (x - xj) ** 2 < r2:
                        ok = False
                        break
                if not ok:
                    break
            if not ok:
                break
        if ok:
            kept.append(i)
            grid.setdefault((ky, kx), []).append(i)
    return np.asarray(kept, dtype=np.intp)
