"""How well are a SAR and an optical raster registered to each other? (``cmpc data coregistration``)

Every position number cmpc reports takes the SAR raster's pixel grid as the truth: a SAR patch
belongs where its pixels lie on the optical map. Pairs published as co-registered can be off
by more than the accuracy a user hopes for (sentinel-la: a median 23 m per file at 8.3 m/px,
docs/RESULTS.md), which limits both what a model learns and what "within 25 m" can mean. This
measures it, independently of every cmpc model, before anything is trained:

- the SAR is read on the optical raster's grid (:func:`cmpc.data.raster.open_raster` with
  ``grid=``: another CRS or resolution is warped onto it), the optical as its band mean;
- the shift ``s`` (columns, rows, optical pixels) that maximises the mutual information of
  ``sar[p + s]`` and ``optical[p]`` over every integer shift within ``+-search`` px, refined to
  sub-pixel by a parabola through the peak (MI, not correlation: SAR and optical brightness are
  related, not proportional; OpenCV's ECC and scikit-image's phase correlation assume a linear
  or identical intensity relation, which does not hold across sensors);
- the same on ``cells x cells`` blocks: their spread says how far the whole-pair number can be
  trusted and whether the offset varies across the pair (terrain-corrected Sentinel-1 does
  with relief).

The SAR content that the optical raster shows at pixel ``p`` lies at ``p + s`` in the SAR, so
the content sits ``(-s_col * gsd, +s_row * gsd)`` metres (east, north) from where the SAR grid
puts it. Cost: about 3 s for a 1024 x 1024 px pair on one core (169 shifts x one joint
histogram each, every ``step``-th valid pixel); it grows with the pixel count.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cmpc.errors import DataError

#: joint-histogram bins of the MI estimate
MI_BINS = 48


def mutual_information(a: np.ndarray, b: np.ndarray, bins: int = MI_BINS) -> float:
    """MI (nats) of two equally long value arrays, from their joint histogram."""
    h, _, _ = np.histogram2d(a, b, bins=bins)
    p = h / h.sum()
    pxy = p.sum(1, keepdims=True) @ p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / pxy[nz])).sum())


def _subpixel(c: float, lo: float, hi: float) -> float:
    d = lo - 2.0 * c + hi
    return 0.0 if d >= 0 else float(np.clip(0.5 * (lo - hi) / d, -0.5, 0.5))


def mi_shift(sar: np.ndarray, opt: np.ndarray, search: int = 6, step: int = 3) -> dict[str, float]:
    """The (col, row) shift s in pixels maximising MI(sar[p + s], opt[p]) of two equally shaped
    single-band arrays (0 = nodata in either): SAR content that the optical shows at pixel p
    lies at p + s in the SAR. Also ``mi`` (at the peak), ``contrast`` (peak minus the median
    over all shifts) and ``at_edge`` (the peak is on the search border: the shift may be larger)."""
    m = int(search)
    h, w = opt.shape
    if sar.shape != opt.shape:
        raise ValueError(f"sar {sar.shape} and optical {opt.shape} must have one shape")
    if h <= 2 * m + 2 or w <= 2 * m + 2:
        raise DataError(f"a {w}x{h} px block is too small to search shifts of +-{m} px")
    ob = opt[m:h - m, m:w - m]
    grid = np.full((2 * m + 1, 2 * m + 1), np.nan)
    for dy in range(-m, m + 1):
        for dx in range(-m, m + 1):
            sb = sar[m + dy:h - m + dy, m + dx:w - m + dx]
            v = (sb > 0) & (ob > 0)
            if v.sum() >= 64:
                grid[dy + m, dx + m] = mutual_information(sb[v][::step], ob[v][::step])
    if not np.isfinite(grid).any():
        raise DataError("the SAR and the optical share no valid pixels")
    iy, ix = np.unravel_index(int(np.nanargmax(grid)), grid.shape)
    g = np.where(np.isfinite(grid), grid, np.nanmin(grid))
    fy = iy - m + (_subpixel(g[iy, ix], g[iy - 1, ix], g[iy + 1, ix]) if 0 < iy < 2 * m else 0.0)
    fx = ix - m + (_subpixel(g[iy, ix], g[iy, ix - 1], g[iy, ix + 1]) if 0 < ix < 2 * m else 0.0)
    return {"col": float(fx), "row": float(fy), "mi": float(np.nanmax(grid)), "contrast": float(np.nanmax(grid) - np.nanmedian(grid)),
            "at_edge": bool(iy in (0, 2 * m) or ix in (0, 2 * m))}


def read_pair(sar: str | os.PathLike[str], optical: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, float, str]:
    """``(sar_amplitude, optical_grey, gsd_m, crs)``: the SAR's first band read on the optical
    raster's grid (warped when its CRS or resolution differs) and the optical band mean, both
    (H, W) float32 with 0 = nodata (valid zeros lifted to 1e-6), the grid's metres per pixel
    and its CRS name. One-line :class:`DataError` for unreadable rasters or rasters that do
    not overlap."""
    from cmpc.data.raster import crs_name, open_raster

    with open_raster(optical, role="optical") as o:
        g = o.grid
        opt, ov = o.read_on(g, 0, 0, g.height, g.width)
    with open_raster(sar, grid=g, role="SAR") as s:
        sr, sv = s.read_on(g, 0, 0, g.height, g.width)
    grey = np.where(ov, np.nan_to_num(opt.mean(axis=0)), 0.0).astype(np.float32)
    amp = np.where(sv, np.nan_to_num(sr[0]), 0.0).astype(np.float32)
    grey[ov & (grey <= 0)] = 1e-6
    amp[sv & (amp <= 0)] = 1e-6
    if not (ov & sv).any():
        raise DataError(f"the SAR {sar} and the optical {optical} do not overlap")
    return amp, grey, float(g.gsd_m), crs_name(g.crs)


ShiftFn = Callable[[np.ndarray, np.ndarray, int], dict[str, Any]]


def measure_pair(sar: str | os.PathLike[str], optical: str | os.PathLike[str], search: int = 6, cells: int = 2, name: str = "",
                 shift: ShiftFn | None = None) -> dict[str, Any]:
    """The SAR raster's shift against the optical one (module doc), whole and per cell.

    ``shift``: the estimator, ``shift(sar_amp, optical_grey, search) -> {"col", "row",
    "at_edge", ...}`` on (H, W) arrays with 0 = nodata; None = :func:`mi_shift` (another, e.g.
    :func:`cmpc.localize.register.cfog_shift`, is passed in by the caller). Its other numbers
    are kept (``mi`` / ``mi_contrast`` for MI).

    Returns ``{"name", "gsd_m", "shift_px": [col, row], "content_offset_m": [east, north],
    "offset_m", "mi", "mi_contrast", "at_search_edge", "cells": [{"cell": [i, j], "shift_px",
    "offset_m"} ...], "cell_spread_px"}`` (``cell_spread_px``: median distance of the cells'
    shifts from the whole pair's; None with fewer than two measurable cells). One-line
    :class:`DataError` for unreadable rasters or rasters that do not overlap.
    """
    shift = shift or mi_shift
    amp, grey, gsd, crs = read_pair(sar, optical)
    whole = shift(amp, grey, search)

    def offset(r: dict[str, float]) -> list[float]:
        return [round(-r["col"] * gsd, 2), round(r["row"] * gsd, 2)]

    out_cells = []
    n = max(1, int(cells))
    hs, ws = amp.shape[0] // n, amp.shape[1] // n
    for i in range(n):
        for j in range(n):
            a, b = amp[i * hs:(i + 1) * hs, j * ws:(j + 1) * ws], grey[i * hs:(i + 1) * hs, j * ws:(j + 1) * ws]
            if min(a.shape) <= 4 * search or ((a > 0) & (b > 0)).mean() < 0.5:
                continue  # too small or mostly outside the overlap
            try:
                r = shift(a, b, search)
            except DataError:
                continue
            out_cells.append({"cell": [i, j], "shift_px": [round(r["col"], 2), round(r["row"], 2)], "offset_m": offset(r),
                              "at_search_edge": r["at_edge"]})
    spread = None
    if len(out_cells) >= 2:
        d = [np.hypot(c["shift_px"][0] - whole["col"], c["shift_px"][1] - whole["row"]) for c in out_cells]
        spread = round(float(np.median(d)), 2)
    east, north = offset(whole)
    return {
        "name": name or Path(sar).stem, "sar": str(sar), "optical": str(optical), "gsd_m": round(gsd, 3), "crs": crs,
        "shift_px": [round(whole["col"], 2), round(whole["row"], 2)], "content_offset_m": [east, north],
        "offset_m": round(float(np.hypot(east, north)), 2),
        **{("mi_contrast" if k == "contrast" else k): (round(v, 4) if isinstance(v, float) else v) for k, v in whole.items() if k not in ("col", "row", "at_edge")},
        "at_search_edge": whole["at_edge"], "cells": out_cells, "cell_spread_px": spread,
    }


def summarise(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median / 90th percentile / maximum offset over pairs, and how many exceed 1 px and 25 m."""
    off = np.array([p["offset_m"] for p in pairs], dtype=np.float64)
    px = np.array([np.hypot(*p["shift_px"]) for p in pairs])
    spread = [p["cell_spread_px"] for p in pairs if p["cell_spread_px"] is not None]
    return {
        "pairs": len(pairs), "median_offset_m": round(float(np.median(off)), 1), "p90_offset_m": round(float(np.quantile(off, 0.9)), 1),
        "max_offset_m": round(float(off.max()), 1), "pairs_over_1px": int((px > 1.0).sum()), "pairs_over_25m": int((off > 25.0).sum()),
        "pairs_at_search_edge": int(sum(p["at_search_edge"] for p in pairs)),
        "cell_spread_px_median": round(float(np.median(spread)), 2) if spread else None,
    }


def load_registration(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A measured co-registration file, as ``tile.register`` applies it: ``{"path", "method",
    "offsets_m": {pair name: [east, north]}}``, the SAR content's offset from its grid place in
    metres of the working CRS (``content_offset_m``).

    Reads what ``cmpc data coregistration --out`` writes (``pairs[*].name``) and the
    per-file records of experiments/sentinel/coregistration.py (``per_file[*].file``).
    One-line :class:`DataError` for a missing, unreadable or malformed file or an offset that
    is not two finite numbers."""
    import json
    import math

    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"registration file not found: {p} (measure it with cmpc data coregistration PAIRS --out {p})") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the registration file {p}: {str(e).splitlines()[0]}") from None
    rows = doc.get("pairs", doc.get("per_file")) if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not rows:
        raise DataError(f"{p} is not a co-registration record: expected a list under 'pairs' (cmpc data coregistration --out)")
    offsets: dict[str, list[float]] = {}
    for r in rows:
        name = r.get("name", r.get("file")) if isinstance(r, dict) else None
        off = r.get("content_offset_m") if isinstance(r, dict) else None
        ok = isinstance(off, list) and len(off) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in off)
        if not isinstance(name, str) or not ok:
            raise DataError(f"{p}: a row without a name and a content_offset_m of two finite numbers (metres east, north): {str(r)[:120]}")
        offsets[name] = [float(off[0]), float(off[1])]
    return {"path": str(p), "method": str(doc.get("method", "")), "offsets_m": offsets}


def pair_offset(registration: dict[str, Any], name: str) -> tuple[float, float]:
    """The measured ``(east, north)`` offset of pair ``name`` (metres); a one-line
    :class:`DataError` when the record has none (every tiled pair must be measured)."""
    off = registration["offsets_m"].get(name)
    if off is None:
        raise DataError(f"the registration file {registration['path']} has no entry for pair '{name}'; "
                        f"measure every pair (cmpc data coregistration) or drop tile.register")
    return float(off[0]), float(off[1])


def single_pair_offset(register: str | os.PathLike[str], sar_path: str | os.PathLike[str]) -> tuple[float, float]:
    """``tile.register`` for a single pair: the record's row named after the SAR file's stem
    (as ``cmpc data coregistration SAR --optical OPT`` names it), else its only row."""
    reg = load_registration(register)
    stem, offsets = Path(sar_path).stem, reg["offsets_m"]
    for name in (stem, re.sub(r"_sar$", "", stem, flags=re.IGNORECASE)):  # 063_sar.tif is pair 063 of a folder's record
        if name in offsets:
            return pair_offset(reg, name)
    if len(offsets) == 1:
        return pair_offset(reg, next(iter(offsets)))
    return pair_offset(reg, stem)
