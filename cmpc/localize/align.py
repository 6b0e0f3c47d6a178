"""Fine alignment: the sub-patch offset of a SAR query by dense cross-modal correlation.

Retrieval picks a reference; references sit every ``stride`` metres (64 m in the demo), so a
query that falls between them is tens of metres from the best reference centre. Fine
alignment measures where the query lies inside the optical map around a candidate:

1. A small fully-convolutional network (:class:`~cmpc.models.descriptor.DenseDescriptor`,
   one branch per modality, output stride 4, L2-normalised per cell) maps the SAR query and
   the optical map to dense descriptors that agree at corresponding places.
2. The optical descriptors of the whole reference map are computed once
   (:func:`build_feature_mosaic`, from the stitched references) and cached: at query time
   only the query goes through the network.
3. For each candidate, the query descriptors (template) are correlated against the map
   descriptors within ``max_shift_px`` of the candidate (FFT, :func:`correlate`); the peak
   (sub-cell by a quadratic fit, :func:`subpixel_peak`) gives the query's position and its
   height (mean cosine over the template, in [-1, 1]) how sure the match is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cmpc.models.descriptor import STRIDE, DenseDescriptor


# --------------------------------------------------------------------------- correlation


def correlate(template: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Valid-mode cross-correlation of descriptor maps, averaged over template cells.

    ``template``: (B, C, h, w); ``context``: (B, M, C, H, W) with H >= h, W >= w. Returns
    (B, M, H - h + 1, W - w + 1): entry ``(u, v)`` is the mean over template cells of the dot
    product with the context placed at offset ``(u, v)`` (for unit descriptors a mean cosine
    in [-1, 1]). Computed with FFTs of the context size (no wrap-around reaches valid
    offsets).
    """
    B, C, h, w = template.shape
    H, W = context.shape[-2:]
    if H < h or W < w:
        raise ValueError(f"context {H}x{W} is smaller than the template {h}x{w}")
    # zero-padding both to a fast FFT size >= the context keeps valid offsets wrap-free
    s = (fft_size(H), fft_size(W))
    ft = torch.fft.rfft2(template.float(), s=s)  # (B, C, N, N/2+1)
    fc = torch.fft.rfft2(context.float(), s=s)  # (B, M, C, N, N/2+1)
    corr = torch.fft.irfft2(torch.einsum("bmcuv,bcuv->bmuv", fc, ft.conj()), s=s)
    return corr[..., : H - h + 1, : W - w + 1] / float(h * w)


def box_sums(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Sum of every ``h`` x ``w`` window of ``x`` (..., H, W) -> (..., H - h + 1, W - w + 1).

    Running sums along each axis in turn, columns first, so the second pass runs on the
    already narrowed windows (about 1.7x faster than a padded 2-D integral image)."""
    s = x.cumsum(-1)
    r = s[..., w - 1:].clone()
    r[..., 1:] -= s[..., :-w]
    s = r.cumsum(-2)
    out = s[..., h - 1:, :].clone()
    out[..., 1:, :] -= s[..., :-h, :]
    return out


def map_window_deviation(desc: torch.Tensor, h: int, w: int, pad_h: int, pad_w: int) -> torch.Tensor:
    """:func:`window_deviation` of every ``h`` x ``w`` window of a whole descriptor map
    (C, H, W) bordered by ``pad_h`` rows / ``pad_w`` columns of zeros: (H + 2 pad_h - h + 1,
    W + 2 pad_w - w + 1), float32; entry (r, c) is the window whose first cell is map cell
    (r - pad_h, c - pad_w). Channel by channel in float64 (a map's running sums are far larger
    than a window's), so it holds a few copies of one channel at a time."""
    n = float(h * w)
    acc: torch.Tensor | None = None
    for ch in range(desc.shape[0]):
        x = F.pad(desc[ch].double(), (pad_w, pad_w, pad_h, pad_h))
        x = x - x.mean()
        v = box_sums(x * x, h, w) - box_sums(x, h, w) ** 2 / n
        acc = v if acc is None else acc.add_(v)
    assert acc is not None
    return acc.clamp_min_(0.0).sqrt_().float()


def window_deviation(context: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Norm of each ``h`` x ``w`` window's descriptors minus the window's mean per channel,
    over every window of ``context`` (B, M, C, H, W) -> (B, M, H - h + 1, W - w + 1).

    Box sums (:func:`box_sums`) in float32 on the context centred by its own mean (measured
    against float64: 2.5e-5 absolute on norms of about 100, 3x faster)."""
    c = context.float()
    c = c - c.mean(dim=(-2, -1), keepdim=True)
    n = float(h * w)
    energy = box_sums((c * c).sum(dim=-3), h, w)
    return (energy - (box_sums(c, h, w) ** 2).sum(dim=-3) / n).clamp_min(0.0).sqrt()


def correlate_zncc(template: torch.Tensor, context: torch.Tensor, dev: torch.Tensor | None = None) -> torch.Tensor:
    """Zero-mean normalised cross-correlation of descriptor maps, in [-1, 1]: like
    :func:`correlate` (same shapes, same offsets) with the template made zero-mean per
    channel and each window's score divided by the norms of both zero-mean descriptor blocks.
    Raw correlation favours windows full of strong structure wherever they are; this does not
    (a window with no structure, RMS deviation under 0.01 per cell, scores 0). ``dev``: the
    windows' norms when already known (:meth:`FeatureMosaic.window_norms`), else computed
    from ``context`` (:func:`window_deviation`)."""
    t = template.float() - template.float().mean(dim=(-2, -1), keepdim=True)
    h, w = t.shape[-2:]
    num = correlate(t, context) * float(h * w)  # sum of t . w = sum of t . (w - window mean)
    if dev is None:
        dev = window_deviation(context, h, w)
    den = t.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * dev
    z = (num / den.clamp_min(1e-12)).clamp(-1.0, 1.0)
    # windows without structure (RMS deviation under 0.01 per cell: flat land, nodata, round-off)
    # and empty templates score 0
    return torch.where((dev > 0.01 * math.sqrt(h * w)) & (den > 1e-9), z, torch.zeros_like(z))


def fft_size(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (sizes the FFT handles fastest)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p = p35
            while p < n:
                p *= 2
            best = min(best, p)
            p35 *= 3
        p5 *= 5
    return best


def subpixel_peak(score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Peak of score maps with a 1-D quadratic fit per axis around the maximum.

    ``score``: (..., H, W). Returns ``(value (...), row (...), col (...))``, rows/cols as
    float offsets in cells; at a border the fit falls back to the integer peak.
    """
    *lead, H, W = score.shape
    s = score.reshape(-1, H, W)
    n = s.shape[0]
    flat = s.reshape(n, -1).argmax(dim=1)
    r, c = flat // W, flat % W
    idx = torch.arange(n, device=s.device)
    val = s[idx, r, c]

    def fit(lo: torch.Tensor, mid: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        den = lo - 2.0 * mid + hi
        d = torch.where(den < -1e-12, 0.5 * (lo - hi) / den.clamp(max=-1e-12), torch.zeros_like(den))
        return d.clamp(-0.5, 0.5)

    rin = (r > 0) & (r < H - 1)
    cin = (c > 0) & (c < W - 1)
    up = s[idx, (r - 1).clamp(min=0), c]
    dn = s[idx, (r + 1).clamp(max=H - 1), c]
    lf = s[idx, r, (c - 1).clamp(min=0)]
    rt = s[idx, r, (c + 1).clamp(max=W - 1)]
    dr = torch.where(rin, fit(up, val, dn), torch.zeros_like(val))
    dc = torch.where(cin, fit(lf, val, rt), torch.zeros_like(val))
    rows = r.to(s.dtype) + dr
    cols = c.to(s.dtype) + dc
    return val.reshape(lead), rows.reshape(lead), cols.reshape(lead)


# --------------------------------------------------------------------------- feature mosaic


@dataclass
class FeatureMosaic:
    """Optical descriptors of a whole reference map.

    ``desc``: (C, Hc, Wc) float32 unit vectors (0 outside the covered area); cell ``(r, c)``
    sits at mosaic pixel ``(4 r, 4 c)``. ``origin_x``/``origin_y``: metres of the mosaic's
    north-west corner; ``gsd_m``: metres per mosaic pixel. ``phases``: optional
    (4, 4, C, Hc, Wc): ``phases[p, q]`` holds the descriptors of pixels ``(4 r + p, 4 c + q)``
    (``phases[0, 0] == desc``), for pixel-level peak refinement.
    """

    desc: torch.Tensor
    origin_x: float
    origin_y: float
    gsd_m: float
    stride: int = STRIDE
    phases: torch.Tensor | None = None
    #: :meth:`window_norms` computes the whole map's norms once the contexts asked for cover
    #: this many times the (padded) map: per cell the map's float64 pass costs about 9x a
    #: context's, so a few queries never pay for it and many pay it once (at most ~2x the best)
    norms_after: float = 8.0

    def _pad(self, which: str, h: int, w: int) -> tuple[int, int, torch.Tensor]:
        """Zero-bordered, channels-last copy of ``desc`` or the stacked phase maps, with a
        border of at least ``h`` rows / ``w`` columns: ``(rows, cols, padded)``. Made once
        and kept while windows fit its border (rounded up to 32 cells, and grown to the
        largest window asked so far: scenes at several headings ask for windows of several
        sizes, and re-padding a large map costs far more than a query)."""
        cache = self.__dict__.setdefault("_pad_cache", {})
        cur = cache.get(which)
        if cur is None or cur[0] < h or cur[1] < w:
            ph, pw = _grown_border(cur, h, w)
            src = self.desc if which == "desc" else self.phases.reshape(-1, *self.desc.shape[1:])  # type: ignore[union-attr]
            cache.pop(which, None)  # free the old copy before making the new one
            cache[which] = (ph, pw, _pad_channels_last(src, ph, pw))
        return cache[which]

    def crops(self, top: torch.Tensor, left: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Windows of the descriptor map, zero outside it.

        ``top``, ``left``: (...,) long cell coordinates of the windows' first cell. Returns
        (..., C, h, w).
        """
        _, Hc, Wc = self.desc.shape
        return _crops_padded(*self._pad("desc", h, w), Hc, Wc, top, left, h, w)

    def window_norms(self, top: torch.Tensor, left: torch.Tensor, h: int, w: int, n_rows: int, n_cols: int) -> torch.Tensor | None:
        """:func:`window_deviation` of the ``h`` x ``w`` windows at the ``n_rows`` x ``n_cols``
        offsets of each context ``crops(top, left, h + n_rows - 1, w + n_cols - 1)`` would cut:
        (...,) cell coordinates -> (..., n_rows, n_cols), read from norms of the whole map
        computed once per window size (:func:`map_window_deviation`: 5 s for a 2048 x 2048 map
        at 1 thread, against about 0.1 s per query of 20 candidates) instead of once per
        candidate. None (the caller computes each context's) for a map not held whole, and
        until the contexts asked for cover ``norms_after`` times the map."""
        _, Hc, Wc = self.desc.shape
        ch, cw = h + n_rows - 1, w + n_cols - 1  # the context crops() would cut (clamped as it clamps)
        cache = self.__dict__.setdefault("_norm_cache", {})
        key = (h, w)
        cur = cache.get(key)
        if cur is None or cur[0] < ch or cur[1] < cw:
            ph, pw = _grown_border(cur, ch, cw)
            asked = self.__dict__.get("_norm_asked", 0.0) + float(top.numel()) * ch * cw
            self.__dict__["_norm_asked"] = asked
            if cur is None and asked < self.norms_after * (Hc + 2 * ph) * (Wc + 2 * pw):
                return None  # (once computed, a larger context only grows the border)
            cache.pop(key, None)
            cache[key] = (ph, pw, map_window_deviation(self.desc, h, w, ph, pw))
        ph, pw, dev = cache[key]
        lead = top.shape
        t = top.reshape(-1).clamp(-ch, Hc) + ph
        lf = left.reshape(-1).clamp(-cw, Wc) + pw
        rows = t[:, None] + torch.arange(n_rows)[None, :]
        cols = lf[:, None] + torch.arange(n_cols)[None, :]
        return dev[rows[:, :, None], cols[:, None, :]].reshape(*lead, n_rows, n_cols)

    def phase_crops(self, top: torch.Tensor, left: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Windows of all 16 phase maps: (...,) cell coordinates -> (..., 16, C, h, w)."""
        if self.phases is None:
            raise ValueError("this feature mosaic has no phase maps")
        P, Q, C, Hc, Wc = self.phases.shape
        out = _crops_padded(*self._pad("phases", h, w), Hc, Wc, top, left, h, w)
        return out.reshape(*top.shape, P * Q, C, h, w)


#: largest whole-map descriptor array (float32 bytes) a lazy-capable descriptor stores; above
#: it the map is described window by window (:class:`LazyFeatureMosaic`)
LAZY_BYTES = 512 * 2**20


@dataclass
class LazyFeatureMosaic(FeatureMosaic):
    """A feature mosaic whose descriptors are computed window by window when asked for.

    For a descriptor with a cell per pixel (stride 1: :class:`~cmpc.models.cfog.CfogDescriptor`),
    a whole-map descriptor array would hold ``dim`` floats per map pixel (9 x 4 bytes: 8.6 GB
    for the 238-megapixel sentinel-la training map), so only the map itself is kept:
    ``desc`` is (2, H, W) float16, the band-mean image and its valid mask. :meth:`crops` cuts
    each window with ``margin`` extra pixels, runs ``model`` on it and returns the
    descriptors of the window (zero outside the valid area), so alignment code sees the same
    (..., C, h, w) windows as from a stored mosaic. ``dim``: the descriptor's channels."""

    model: torch.nn.Module | None = None
    margin: int = 8
    dim: int = 0

    @torch.no_grad()
    def crops(self, top: torch.Tensor, left: torch.Tensor, h: int, w: int) -> torch.Tensor:
        assert self.model is not None
        m = self.margin
        _, H, W = self.desc.shape
        win = _crops_padded(*self._pad("desc", h + 2 * m, w + 2 * m), H, W, top - m, left - m, h + 2 * m, w + 2 * m)
        lead = top.shape
        win = win.reshape(-1, 2, h + 2 * m, w + 2 * m).float()
        out = []
        for i in range(0, win.shape[0], 64):  # bounded memory: (64, dim, h, w) at a time
            d = self.model(win[i : i + 64, :1], "opt")[..., m : m + h, m : m + w]
            out.append(d * win[i : i + 64, 1:2, m : m + h, m : m + w])
        return torch.cat(out).reshape(*lead, -1, h, w)

    def phase_crops(self, top: torch.Tensor, left: torch.Tensor, h: int, w: int) -> torch.Tensor:
        raise ValueError("a lazy (stride-1) feature mosaic has no phase maps")

    def window_norms(self, top: torch.Tensor, left: torch.Tensor, h: int, w: int, n_rows: int, n_cols: int) -> torch.Tensor | None:
        return None  # the map is not held whole: each context's norms are computed from it


def _crops_padded(ph: int, pw: int, pad: torch.Tensor, Hc: int, Wc: int, top: torch.Tensor, left: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Windows of a map (C, Hc, Wc) given as ``pad``: the map with ``ph`` >= ``h`` rows /
    ``pw`` >= ``w`` columns of zeros around it, channels last (Hc + 2ph, Wc + 2pw, C). (...,)
    corners -> (..., C, h, w); a window reaching past the map reads zeros, one entirely
    outside is clamped to an all-zero place."""
    C = pad.shape[-1]
    lead = top.shape
    t = top.reshape(-1).clamp(-h, Hc) + ph
    lf = left.reshape(-1).clamp(-w, Wc) + pw
    rows = t[:, None] + torch.arange(h)[None, :]  # (M, h)
    cols = lf[:, None] + torch.arange(w)[None, :]  # (M, w)
    out = pad[rows[:, :, None], cols[:, None, :]]  # (M, h, w, C): one gather of whole cells
    return out.permute(0, 3, 1, 2).reshape(*lead, C, h, w)


def _grown_border(cur: tuple[int, int, Any] | None, h: int, w: int) -> tuple[int, int]:
    """Border (rows, cols) of a padded map cache that fits ``h`` x ``w`` windows and every
    window the cache ``cur`` fitted, rounded up to 32 cells (re-padding a large map costs far
    more than a query, so it grows in steps)."""
    return -(-max(h, cur[0] if cur else 0) // 32) * 32, -(-max(w, cur[1] if cur else 0) // 32) * 32


def _pad_channels_last(desc: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return F.pad(desc, (w, w, h, h)).permute(1, 2, 0).contiguous()


def descriptor_stride(model: torch.nn.Module) -> int:
    """Pixels per descriptor cell of a dense descriptor (its ``stride``; 4 for the learned one)."""
    return int(getattr(model, "stride", STRIDE))


@torch.no_grad()
def _descriptor_map(model: DenseDescriptor, img: torch.Tensor, tile_px: int, margin_px: int, device: torch.device | str) -> torch.Tensor:
    """Optical descriptors (dim, ceil(H/s), ceil(W/s)) of an image (C, H, W), in overlapping
    tiles (``s``: the descriptor's output stride)."""
    s = descriptor_stride(model)
    C, H, W = img.shape
    Hc, Wc = -(-H // s), -(-W // s)
    out = torch.zeros((model.dim, Hc, Wc), dtype=torch.float32)
    for r0 in range(0, H, tile_px):
        for c0 in range(0, W, tile_px):
            ra, ca = max(0, r0 - margin_px), max(0, c0 - margin_px)
            rb, cb = min(H, r0 + tile_px + margin_px), min(W, c0 + tile_px + margin_px)
            d = model(img[None, :, ra:rb, ca:cb].to(device), "opt")[0].float().cpu()
            cr0, cc0 = (r0 - ra) // s, (c0 - ca) // s
            nr = min(tile_px // s, Hc - r0 // s)
            nc = min(tile_px // s, Wc - c0 // s)
            out[:, r0 // s : r0 // s + nr, c0 // s : c0 // s + nc] = d[:, cr0 : cr0 + nr, cc0 : cc0 + nc]
    return out


@torch.no_grad()
def build_feature_mosaic(
    model: DenseDescriptor,
    image: np.ndarray,
    valid: np.ndarray,
    origin_x: float,
    origin_y: float,
    gsd_m: float,
    tile_px: int = 512,
    margin_px: int = 64,
    phases: bool = False,
    device: torch.device | str = "cpu",
    lazy_bytes: int = LAZY_BYTES,
) -> FeatureMosaic:
    """Optical descriptors of a standardised map image (C, H, W), computed in overlapping
    tiles (``tile_px`` core, ``margin_px`` context on each side, both multiples of 4) so
    memory stays bounded and tile seams do not show. Cells outside ``valid`` are zeroed.
    ``phases``: also compute the 16 pixel-phase maps (16x the work and memory) that make
    pixel-level peak refinement possible (a stride-1 descriptor such as CFOG has none to add).
    Any descriptor with the :class:`~cmpc.models.descriptor.DenseDescriptor` contract works;
    its ``stride`` attribute (default 4) sets the mosaic's cell size. A descriptor marked
    ``lazy`` (CFOG: one cell per pixel) is computed on the band mean; when its whole-map array
    would exceed ``lazy_bytes`` (float32) a :class:`LazyFeatureMosaic` is returned instead,
    which describes windows on request (measured on sentinel-la: describing 20 windows per
    query costs about 1.2 s per query on one core; a stored map's crops cost a few ms)."""
    s = descriptor_stride(model)
    if getattr(model, "lazy", False):
        # a band-mean descriptor (CFOG): nodata filled as flat ground (no edges at its border)
        g = np.nan_to_num(np.asarray(image, dtype=np.float32).mean(axis=0))
        v = np.asarray(valid, dtype=bool)
        g = np.where(v, g, float(g[v].mean()) if v.any() else 0.0).astype(np.float32)
        if g.size * int(model.dim) * 4 > lazy_bytes:
            # too large to hold as descriptors: keep the image and its mask, describe on request
            stack = torch.from_numpy(np.stack([g, v.astype(np.float32)])).half()
            return LazyFeatureMosaic(desc=stack, origin_x=float(origin_x), origin_y=float(origin_y), gsd_m=float(gsd_m), stride=s,
                                     model=model.eval(), margin=int(getattr(model, "context_px", 8)), dim=int(model.dim))
        image = g[None]
    if tile_px % s or margin_px % s:
        raise ValueError(f"tile_px and margin_px must be multiples of the descriptor stride ({s})")
    model.eval()
    C, H, W = image.shape
    Hc, Wc = -(-H // s), -(-W // s)
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    vmask = torch.from_numpy(np.ascontiguousarray(valid))
    desc = _descriptor_map(model, img, tile_px, margin_px, device) * vmask[::s, ::s][None].float()
    ph = None
    if phases and s > 1:
        ph = torch.zeros((s, s, model.dim, Hc, Wc), dtype=torch.float32)
        for p in range(s):
            for q in range(s):
                if p == 0 and q == 0:
                    ph[0, 0] = desc
                    continue
                # cell (r, c) of the map of the image cropped by (p, q) sits at pixel (4r+p, 4c+q)
                d = _descriptor_map(model, img[:, p:, q:], tile_px, margin_px, device)
                d = d * vmask[p::s, q::s][None].float()
                ph[p, q, :, : d.shape[1], : d.shape[2]] = d
    return FeatureMosaic(desc=desc, origin_x=float(origin_x), origin_y=float(origin_y), gsd_m=float(gsd_m), stride=s, phases=ph)


# --------------------------------------------------------------------------- alignment


@dataclass
class AlignResult:
    """Per query and aligned candidate: ``position_m`` (B, M, 2) the query centre found,
    metres; ``peak`` (B, M) the correlation peak (mean cosine, higher = surer)."""

    position_m: torch.Tensor
    peak: torch.Tensor


def align_to_mosaic(
    query_desc: torch.Tensor,
    mosaic: FeatureMosaic,
    centres_m: torch.Tensor,
    query_px: int,
    max_shift_px: int,
    border: int = 1,
    score: str = "corr",
) -> AlignResult:
    """Find each query in the map around each of its candidates.

    Args:
        query_desc: (B, C, h, w) SAR descriptors of queries of ``query_px`` pixels (at the
            mosaic's gsd).
        mosaic: optical descriptors of the reference map.
        centres_m: (B, M, 2) candidate centres (x, y metres): the search windows' centres.
        query_px: query side, pixels.
        max_shift_px: the query centre is searched within +-``max_shift_px`` of each centre.
        border: template cells dropped at each edge (zero padding makes them unreliable).
        score: ``corr`` (:func:`correlate`, the mean dot product) or ``zncc``
            (:func:`correlate_zncc`; not with phase maps).

    Returns an :class:`AlignResult`.
    """
    if score not in ("corr", "zncc"):
        raise ValueError(f"score must be corr or zncc, got {score!r}")
    if score == "zncc" and mosaic.phases is not None:
        raise ValueError("zncc scoring has no phase-map refinement: use it with a stride-1 descriptor (CFOG)")
    s = mosaic.stride
    B, C, h, w = query_desc.shape
    tmpl = query_desc[:, :, border : h - border, border : w - border]
    ht, wt = tmpl.shape[-2:]
    cen = centres_m.double()
    # query top-left pixel if it sat exactly on the candidate
    row_tl = (mosaic.origin_y - cen[..., 1]) / mosaic.gsd_m - query_px / 2.0
    col_tl = (cen[..., 0] - mosaic.origin_x) / mosaic.gsd_m - query_px / 2.0
    top = torch.floor((row_tl - max_shift_px) / s).long() + border
    left = torch.floor((col_tl - max_shift_px) / s).long() + border
    n_shift = int(np.ceil(2.0 * max_shift_px / s)) + 2
    # a few queries at a time: the windows' spectra of a whole batch do not fit in cache
    # (measured: 64 queries x 20 windows at once was 2x slower per query than 1 query)
    step = max(1, 32 // max(1, top.shape[1]))
    def scores(i: int) -> torch.Tensor:
        ctx = mosaic.crops(top[i : i + step], left[i : i + step], ht + n_shift - 1, wt + n_shift - 1)
        if score != "zncc":
            return correlate(tmpl[i : i + step], ctx)
        norms = mosaic.window_norms(top[i : i + step], left[i : i + step], ht, wt, n_shift, n_shift)
        return correlate_zncc(tmpl[i : i + step], ctx, norms)

    surface = torch.cat([scores(i) for i in range(0, B, step)])  # (B, M, n_shift, n_shift)
    peak, du, dv = subpixel_peak(surface)
    # template's top-left pixel in the mosaic (the template starts at query cell `border`)
    t_row = (top.double() + du.double()) * s
    t_col = (left.double() + dv.double()) * s
    if mosaic.phases is not None:
        # pixel-level refinement of each query's best candidate: correlate against the 16
        # phase maps around the cell peak -> a correlation surface sampled every pixel
        best = peak.argmax(dim=1)
        bi = torch.arange(B)
        u0 = top[bi, best] + du[bi, best].round().long()  # template top-left cell at the peak
        v0 = left[bi, best] + dv[bi, best].round().long()
        R = 2  # cells searched each side
        win = mosaic.phase_crops(u0 - R, v0 - R, ht + 2 * R, wt + 2 * R)  # (B, 16, C, ., .)
        ps = correlate(tmpl, win)  # (B, 16, 2R+1, 2R+1): phase (p, q) at cell shift (a, b)
        n = 2 * R + 1
        surf = ps.reshape(B, s, s, n, n).permute(0, 3, 1, 4, 2).reshape(B, n * s, n * s)  # [a*4+p, b*4+q]
        pk, pr, pc = subpixel_peak(surf)
        t_row = t_row.clone()
        t_col = t_col.clone()
        t_row[bi, best] = (u0 - R).double() * s + pr.double()
        t_col[bi, best] = (v0 - R).double() * s + pc.double()
        peak = peak.clone()
        peak[bi, best] = torch.maximum(peak[bi, best], pk)
    q_row = t_row - border * s
    q_col = t_col - border * s
    x = mosaic.origin_x + (q_col + query_px / 2.0) * mosaic.gsd_m
    y = mosaic.origin_y - (q_row + query_px / 2.0) * mosaic.gsd_m
    return AlignResult(position_m=torch.stack([x, y], dim=-1), peak=peak)
