"""A SAR / optical pair's shift measured by dense CFOG alignment (``cmpc data coregistration
--method cfog``).

Mutual information of raw pixels (:func:`cmpc.data.coregister.mi_shift`) is weak across
sensors: on sentinel-la a file's two halves disagree by a median 2.7 px. This estimator uses
the descriptor the localizer aligns with (:class:`cmpc.models.cfog.CfogDescriptor`:
orientated-gradient channels, blind to how SAR and optical brightness relate) and many
independent windows instead of one joint histogram:

- both rasters are described once on the optical grid;
- the SAR is cut into ``window`` px windows (every ``window`` px, fully valid with their
  ``+-search`` margin); each is found in the optical descriptors within ``+-search`` px by
  zero-mean normalised cross-correlation (:func:`cmpc.localize.align.correlate_zncc`), to
  sub-pixel by a parabola per axis;
- windows whose peak is weak (under ``min_peak``) or on the search border are dropped; the
  shift is the median of the others (robust to the few that lock onto the wrong structure),
  and their median distance from it (``window_spread_px``) says how consistent they are.

The shift follows :func:`cmpc.data.coregister.mi_shift`'s convention: SAR content that the
optical shows at pixel ``p`` lies at ``p + s`` in the SAR. Nothing is learned: this is as
independent of the embedder as MI is, but it is the fine aligner's own descriptor, so do not
use it alone to judge that aligner. Cost: about 3 s for a whole 1024 x 1024 px pair at 2
threads, and about as much again for its 2 x 2 cells in ``cmpc data coregistration`` (each
block is described anew, as MI reads each anew).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cmpc.errors import DataError
from cmpc.localize.align import correlate_zncc, subpixel_peak
from cmpc.models.cfog import CfogDescriptor


@torch.no_grad()
def cfog_shift(sar: np.ndarray, opt: np.ndarray, search: int = 6, window: int = 128, sigma: float = 1.5, sar_sigma: float = 1.0,
               min_peak: float = 0.1) -> dict[str, Any]:
    """The (col, row) shift, pixels, of ``sar`` against ``opt`` (two equally shaped (H, W)
    arrays, 0 = nodata), as in the module doc.

    Returns ``{"col", "row", "at_edge", "peak", "windows", "window_spread_px"}``: ``peak`` the
    median ZNCC peak of the windows used, ``windows`` how many were used (of those that fit),
    ``at_edge`` true when most windows peaked on the search border (the shift may be larger).
    One-line :class:`DataError` when no window fits or none has a clear peak.
    """
    m, w = int(search), int(window)
    if sar.shape != opt.shape:
        raise ValueError(f"sar {sar.shape} and optical {opt.shape} must have one shape")
    h, wd = opt.shape
    valid = (sar > 0) & (opt > 0)
    cfog = CfogDescriptor(1, 1, sigma=sigma, sar_sigma=sar_sigma)
    ds = cfog(torch.from_numpy(np.ascontiguousarray(sar, dtype=np.float32))[None, None], "sar")[0]
    do = cfog(torch.from_numpy(np.ascontiguousarray(opt, dtype=np.float32))[None, None], "opt")[0]
    tl = [(r, c) for r in range(m, h - w - m + 1, w) for c in range(m, wd - w - m + 1, w)
          if valid[r - m:r + w + m, c - m:c + w + m].all()]
    if not tl:
        raise DataError(f"no fully valid {w} px window (with its +-{m} px margin) in a {wd}x{h} px block")
    tmpl = torch.stack([ds[:, r:r + w, c:c + w] for r, c in tl])  # (B, C, w, w)
    ctx = torch.stack([do[:, r - m:r + w + m, c - m:c + w + m] for r, c in tl])[:, None]  # (B, 1, C, w + 2m, w + 2m)
    score = correlate_zncc(tmpl, ctx)[:, 0]  # (B, 2m + 1, 2m + 1): the window's top-left at (r - m + u, c - m + v) in the optical
    val, u, v = subpixel_peak(score)
    flat = score.flatten(1).argmax(1)
    iu, iv = flat // score.shape[-1], flat % score.shape[-1]
    edge = ((iu == 0) | (iu == 2 * m) | (iv == 0) | (iv == 2 * m)).numpy()
    # the SAR at p shows what the optical shows at p + d, d = (u - m, v - m): s = -d
    col, row = -(v.numpy() - m), -(u.numpy() - m)
    keep = (val.numpy() >= min_peak) & ~edge
    if not keep.any():
        raise DataError(f"none of {len(tl)} windows has a clear CFOG peak (>= {min_peak}) inside +-{m} px")
    c0, r0 = float(np.median(col[keep])), float(np.median(row[keep]))
    return {"col": c0, "row": r0, "at_edge": bool(edge.mean() > 0.5), "peak": float(np.median(val.numpy()[keep])),
            "windows": f"{int(keep.sum())} of {len(tl)}",
            "window_spread_px": round(float(np.median(np.hypot(col[keep] - c0, row[keep] - r0))), 2)}
