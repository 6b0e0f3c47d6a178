"""Whole-map dense search: where on the map does a scene's dense descriptor correlate best?

The coarse step finds a scene through its tiles' global embeddings, one 128 px tile at a
time; a small scene (2 x 2 tiles, 192 m in the demo) brings few tiles, and when none of them
ranks its true reference high, RANSAC and the vote have nothing to agree on. The dense
descriptor of the refiner (``cmpc.models.descriptor``, 16 dimensions per 4 map pixels) is
far more specific: on the demo world the whole-scene correlation peak is 0.46-0.74 at the
true place and at most about 0.4 anywhere else on an 8 km map. So the scene's descriptor
map is correlated against the *whole* map's (one FFT product per heading hypothesis; the
map's spectra are computed once per map and kept), and the best distinct peaks become
placements for :func:`cmpc.localize.verify.fine_align_scene`, beside RANSAC's.

The search runs on descriptors averaged over 2 x 2 cells (8 map pixels; ``pool``): a
quarter of the frequencies, and the cost is one complex product over 16 channels per
frequency, block and heading. Its placements are then ranked and refined at full resolution
(:func:`cmpc.localize.verify.screen_placements`, :func:`~cmpc.localize.verify.fine_align_scene`).
The map is cut into equal blocks of at most ``block_cells`` cells a side (contexts
overlapping by the template), so memory stays bounded on large maps: a block's spectrum is
``C x n x (n/2+1)`` complex64 (16 x 1125 x 563 x 8 B = 81 MB for the 1,024-cell blocks of an
8 km map at 1 m); spectra are kept while they fit ``cache_bytes`` and recomputed otherwise.

Cost on the 2-core machine (8 km x 8 km map at 1 m, 2,048 x 2,048 cells): about 0.6 s per
heading hypothesis for a 2 x 2-tile scene (docs/RESULTS.md, Scene localization).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cmpc.localize.align import fft_size
from cmpc.localize.verify import SceneTransform, _scene_descriptors


@dataclass(frozen=True)
class DensePeak:
    """One placement found by the whole-map search: ``peak`` is the whole-scene mean cosine
    (as :func:`cmpc.localize.verify.fine_align_scene`'s), at the cell resolution (4 map px)."""

    transform: SceneTransform
    peak: float
    heading_deg: float


class MapSpectra:
    """The optical descriptor map of a :class:`~cmpc.localize.align.FeatureMosaic`, cut into
    blocks whose FFTs are cached (module doc). Templates up to ``room`` cells (grown by 64s
    when a larger one comes, which drops the cache) fit every block's context."""

    def __init__(self, mosaic, block_cells: int = 1024, cache_bytes: int = 1 << 30, pool: int = 2) -> None:  # noqa: ANN001 - FeatureMosaic
        if block_cells < 64:
            raise ValueError(f"block_cells must be at least 64, got {block_cells}")
        if pool < 1:
            raise ValueError(f"pool must be at least 1, got {pool}")
        self.mosaic = mosaic
        self.pool = int(pool)
        #: the map's descriptors at the search resolution (``pool`` x ``pool`` cells averaged, unit length)
        self.desc = pool_cells(mosaic.desc, self.pool)
        self.block_cells = int(block_cells)
        self.cache_bytes = int(cache_bytes)
        self.room = 0
        self._cache: dict[tuple[int, int], torch.Tensor] = {}
        self._layout: tuple[tuple[int, int], tuple[int, int], list[tuple[int, int]]] | None = None

    def _axis(self, length: int) -> tuple[int, int]:
        """(block size, FFT size) along an axis of ``length`` cells: template offsets run from
        ``-room`` (a scene hanging over the map's NW edge) to ``length - 1``, in equal blocks."""
        span = length + self.room
        nb = -(-span // self.block_cells)
        size = -(-span // nb)
        return size, fft_size(size + self.room)

    def layout(self, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int], list[tuple[int, int]]]:
        """((block rows, block cols), (FFT rows, FFT cols), block top-left offsets) for
        templates of ``h`` x ``w`` cells."""
        need = max(h, w)
        if need > self.room or self._layout is None:
            self.room = max(self.room, -(-need // 64) * 64)
            self._cache.clear()
            _, Hc, Wc = self.desc.shape
            (bh, nh), (bw, nw) = self._axis(Hc), self._axis(Wc)
            tops = range(-self.room, Hc, bh)
            lefts = range(-self.room, Wc, bw)
            self._layout = ((bh, bw), (nh, nw), [(r, c) for r in tops for c in lefts])
        return self._layout

    def _context(self, r: int, c: int, hh: int, ww: int) -> torch.Tensor:
        """Cells ``[r, r + hh) x [c, c + ww)`` of the descriptor map, zero outside it (not
        ``FeatureMosaic.crops``: its zero-bordered copy of the whole map would be padded by a
        whole block on every side)."""
        d = self.desc
        _, Hc, Wc = d.shape
        r0, r1, c0, c1 = max(r, 0), min(r + hh, Hc), max(c, 0), min(c + ww, Wc)
        out = torch.zeros((d.shape[0], hh, ww), dtype=d.dtype)
        if r1 > r0 and c1 > c0:
            out[:, r0 - r : r1 - r, c0 - c : c1 - c] = d[:, r0:r1, c0:c1]
        return out

    def spectrum(self, i: int) -> torch.Tensor:
        """The FFT of block ``i`` of the current layout (cached while it fits)."""
        (bh, bw), (nh, nw), blocks = self._layout  # type: ignore[misc]
        key = blocks[i]
        spec = self._cache.get(key)
        if spec is None:
            spec = torch.fft.rfft2(self._context(key[0], key[1], bh + self.room, bw + self.room), s=(nh, nw))
            if (len(self._cache) + 1) * spec.numel() * 8 <= self.cache_bytes:
                self._cache[key] = spec
        return spec


def pool_cells(desc: torch.Tensor, pool: int) -> torch.Tensor:
    """(C, H, W) unit descriptors averaged over ``pool`` x ``pool`` cells and made unit
    length again (all-zero cells, outside the data, stay zero): (C, ceil(H/pool), ceil(W/pool))."""
    if pool == 1:
        return desc
    return F.normalize(F.avg_pool2d(desc[None], pool, ceil_mode=True)[0], dim=0)


def _local_maxima(score: torch.Tensor, top_n: int, sep: int) -> list[tuple[float, int, int]]:
    """The ``top_n`` highest peaks of a 2-D score, at least ``sep`` cells apart: the maximum
    of every ``sep`` x ``sep`` block (one non-overlapping max-pool), then a greedy pass from
    the highest (a max-pool with a ``2 sep + 1`` window at stride 1 costs 30x more here)."""
    H, W = score.shape
    ph, pw = (-H) % sep, (-W) % sep
    x = F.pad(score, (0, pw, 0, ph), value=float("-inf"))[None, None]
    vals, idx = F.max_pool2d(x, sep, stride=sep, return_indices=True)
    vals, idx = vals.flatten(), idx.flatten()
    ok = torch.isfinite(vals)
    vals, idx = vals[ok], idx[ok]
    order = torch.argsort(vals, descending=True)[: 8 * top_n]
    return _separated([(float(vals[k]), *divmod(int(idx[k]), W + pw)) for k in order.tolist()], top_n, sep)


def _separated(peaks: list[tuple[float, int, int]], top_n: int, sep: int) -> list[tuple[float, int, int]]:
    """Greedily, from the highest: the first ``top_n`` of ``(value, row, col)`` peaks more
    than ``sep`` cells from every one kept."""
    out: list[tuple[float, int, int]] = []
    for val, u, v in sorted(peaks, reverse=True):
        if all(abs(u - a) > sep or abs(v - b) > sep for _, a, b in out):
            out.append((val, u, v))
            if len(out) >= top_n:
                break
    return out


@torch.no_grad()
def search_map(
    aligner,  # noqa: ANN001 - cmpc.models.descriptor.DenseDescriptor
    spectra: MapSpectra,
    image: np.ndarray,
    valid: np.ndarray,
    gsd_m: float,
    headings_deg: list[float],
    top_n: int = 3,
    min_sep_m: float = 64.0,
    prior: tuple[float, float, float] | None = None,
    device: str | torch.device = "cpu",
) -> list[DensePeak]:
    """The ``top_n`` best placements of the scene ``image`` (C, H, W; ``valid`` (H, W)) of
    GSD ``gsd_m`` (m/px) anywhere on the map, over the heading hypotheses (degrees), at
    least ``min_sep_m`` apart per heading. ``prior``: ``(x, y, radius_m)``: only placements
    whose scene centre lies within the disc. Best first.

    The search runs at ``spectra.pool`` cells (8 px for the default 2): placements are
    within about half that of the best one, which the fine alignment then finds."""
    mosaic = spectra.mosaic
    p = spectra.pool
    s, w = mosaic.stride, float(mosaic.gsd_m)
    H, W = image.shape[-2:]
    sep = max(1, int(round(min_sep_m / w / s / p)))
    # every heading's template first (the scene placed with its pixel (0, 0) at the map's NW
    # corner), then one pass over the map's blocks: a block's spectrum is read (or, on a map
    # too large for the cache, computed) once per scene, not once per heading
    temps = []
    for hd in headings_deg:
        t0 = SceneTransform.from_params(gsd_m, float(hd), mosaic.origin_x, mosaic.origin_y)
        desc, _, (rmin, cmin) = _scene_descriptors(aligner, mosaic, image, valid, t0, device)
        # start the template on the pooled grid: pad it to an even (for pool 2) map cell
        r0, c0 = rmin // s, cmin // s
        pr, pc = r0 % p, c0 % p
        desc = pool_cells(F.pad(desc, (pc, 0, pr, 0)), p)
        nvalid = float((desc.abs().sum(0) > 0).sum())
        if nvalid >= 4:
            temps.append((float(hd), t0, desc, nvalid, r0 - pr, c0 - pc))
    if not temps:
        return []
    (bh, bw), (nh, nw), blocks = spectra.layout(max(t[2].shape[1] for t in temps), max(t[2].shape[2] for t in temps))
    fts = [torch.fft.rfft2(t[2], s=(nh, nw)).conj() for t in temps]
    centres = [t[1].centre(W, H) for t in temps]  # each template's scene centre at offset 0
    cands: list[list[tuple[float, int, int]]] = [[] for _ in temps]
    for i, (r, c) in enumerate(blocks):
        spec = spectra.spectrum(i)
        for k, (_, _, _, nvalid, r0, c0) in enumerate(temps):
            score = torch.fft.irfft2((spec * fts[k]).sum(0), s=(nh, nw))[:bh, :bw] / nvalid
            if prior is not None:
                px, py, rad = prior
                cx0, cy0 = centres[k]
                u = torch.arange(bh, dtype=torch.float64)[:, None] + r
                v = torch.arange(bw, dtype=torch.float64)[None, :] + c
                # pooled cell (u, v) holds the template's first one: the shift is from the window's start
                dx = (p * v - c0) * s * w
                dy = -(p * u - r0) * s * w
                inside = (cx0 + dx - px) ** 2 + (cy0 + dy - py) ** 2 <= rad * rad
                score = score.masked_fill(~inside, float("-inf"))
            for val, u, v in _local_maxima(score, top_n, sep):
                cands[k].append((val, u + r, v + c))
    found: list[DensePeak] = []
    for k, (hd, t0, _, _, r0, c0) in enumerate(temps):
        for val, u, v in _separated(cands[k], top_n, sep):
            dr, dc = (p * u - r0) * s, (p * v - c0) * s
            found.append(DensePeak(t0.shifted(dc * w, -dr * w), val, hd))
    found.sort(key=lambda p: p.peak, reverse=True)
    return found[: max(top_n, 1) * max(1, min(len(headings_deg), 3))]


def peak_margin(chosen: SceneTransform, chosen_peak: float, peaks: list[DensePeak], min_dist_m: float, probe: tuple[float, float]) -> float:
    """How much the chosen placement (its alignment peak ``chosen_peak``) stands out: its peak
    minus the best whole-map peak over ``min_dist_m`` away from it (placements compared at
    the ``probe`` scene pixel); NaN when the search found nothing elsewhere."""
    p0 = chosen.apply(np.array([probe]))[0]
    far = [p.peak for p in peaks if math.hypot(*(p.transform.apply(np.array([probe]))[0] - p0)) > min_dist_m]
    return float(chosen_peak - max(far)) if far else float("nan")
