"""Training the dense cross-modal descriptor used by fine alignment.

Data: the training split's optical references stitched into a map
(:func:`~cmpc.localize.mosaic.mosaic_from_annotations`) and its SAR queries (aligned and
non-aligned), whose footprints in that map are known from their annotations: co-registered
pairs at every offset the references do not cover.

Each step takes a random ``crop_px`` window of a few SAR queries and an optical window of the
map around its true place, shifted at random by up to ``shift_px`` in each direction (so the
answer is anywhere in the window, not in its centre), and minimises two losses:

- **matching**: the correlation map of the SAR descriptors over the optical window
  (what fine alignment computes at query time), as logits over offsets, cross-entropy
  against the true offset (soft: bilinear weights on the 4 cells around the sub-cell truth);
- **dense**: per SAR cell, InfoNCE over every optical cell of the window (the corresponding
  cell positive, again bilinear-soft, all others negative).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cmpc.data.layout import read_annotations, read_dataset_meta, safe_image_path
from cmpc.data.patches import read_patch_array, standardize
from cmpc.errors import DataError
from cmpc.localize.align import FeatureMosaic, align_to_mosaic, build_feature_mosaic, correlate
from cmpc.localize.mosaic import ImageMosaic, annotation_bounds, mosaic_from_annotations, resample
from cmpc.models.descriptor import STRIDE, DenseDescriptor
from cmpc.utils.io import append_jsonl


@dataclass
class AlignData:
    """Training material: ``mosaic`` (the stitched optical map), ``map_image`` its
    standardised image as a tensor (C, H, W), ``queries`` (N, C_sar, S, S) standardised SAR
    patches at the map's gsd, ``top_left`` (N, 2) float64 their top-left pixel (row, col) in
    the map, ``query_px`` S."""

    mosaic: ImageMosaic
    map_image: torch.Tensor
    queries: torch.Tensor
    top_left: np.ndarray
    query_px: int


def load_align_data(
    root: str | Path,
    split: str = "train",
    query_px: int | None = None,
    max_queries: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> AlignData:
    """Stitch the optical references of ``root/split`` and read its SAR queries with their
    place in the stitched map. ``query_px``: the side the queries will have at query time
    (the embedder's input size); the map is resampled to match (``None`` = native
    resolution). Queries less than 90 % inside the map are left out (they cannot be matched
    entirely); ``max_queries`` keeps a seeded random subset."""
    refs = read_annotations(root, split, "opt")
    mosaic = mosaic_from_annotations(root, split, refs, progress=progress)
    anns = read_annotations(root, split, "sar")
    rng = np.random.default_rng(seed)
    if max_queries is not None and len(anns) > max_queries:
        anns = [anns[i] for i in sorted(rng.choice(len(anns), max_queries, replace=False))]
    first = read_patch_array(safe_image_path(root, split, "sar", anns[0].file_path))
    S_file = first.shape[-1]
    bounds = annotation_bounds(anns, S_file, read_dataset_meta(root))
    if query_px is not None:
        mosaic = resample(mosaic, float(bounds[0, 2] - bounds[0, 0]) / query_px)
    S = int(round((bounds[0, 2] - bounds[0, 0]) / mosaic.gsd_m))  # query side at the map's gsd
    H, W = mosaic.valid.shape
    qs, tl = [], []
    for a, b in tqdm(list(zip(anns, bounds)), desc="read SAR queries", unit="patch", disable=not progress, leave=False):
        r0 = (mosaic.origin_y - b[3]) / mosaic.gsd_m
        c0 = (b[0] - mosaic.origin_x) / mosaic.gsd_m
        ri, ci = int(round(r0)), int(round(c0))
        win = mosaic.valid[max(ri, 0) : max(ri + S, 0), max(ci, 0) : max(ci + S, 0)]
        if win.size < 0.9 * S * S or win.mean() < 0.9:
            continue
        arr = read_patch_array(safe_image_path(root, split, "sar", a.file_path))
        t = torch.from_numpy(arr)
        if t.shape[-1] != S or t.shape[-2] != S:
            t = F.interpolate(t[None], size=(S, S), mode="bilinear", align_corners=False, antialias=True)[0]
        qs.append(standardize(t))
        tl.append((r0, c0))
    if not qs:
        raise DataError(f"no SAR query of {root}/{split} lies inside the stitched optical map; cannot train fine alignment")
    return AlignData(
        mosaic=mosaic,
        map_image=torch.from_numpy(mosaic.standardized()),
        queries=torch.stack(qs),
        top_left=np.array(tl, dtype=np.float64),
        query_px=S,
    )


def _window(img: torch.Tensor, r: int, c: int, h: int, w: int) -> torch.Tensor:
    """``img[:, r:r+h, c:c+w]`` with zeros outside the image."""
    C, H, W = img.shape
    out = img.new_zeros((C, h, w))
    ra, ca, rb, cb = max(r, 0), max(c, 0), min(r + h, H), min(c + w, W)
    if ra < rb and ca < cb:
        out[:, ra - r : rb - r, ca - c : cb - c] = img[:, ra:rb, ca:cb]
    return out


def _soft_target(u: torch.Tensor, v: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    """Bilinear one-hot: (M,) continuous cell coordinates -> (M, n_rows * n_cols) weights."""
    u = u.clamp(0, n_rows - 1 - 1e-4)
    v = v.clamp(0, n_cols - 1 - 1e-4)
    u0, v0 = u.floor().long(), v.floor().long()
    fu, fv = u - u0, v - v0
    t = torch.zeros((len(u), n_rows * n_cols), dtype=torch.float32)
    idx = torch.arange(len(u))
    for du, dv, wgt in ((0, 0, (1 - fu) * (1 - fv)), (1, 0, fu * (1 - fv)), (0, 1, (1 - fu) * fv), (1, 1, fu * fv)):
        rr = (u0 + du).clamp(max=n_rows - 1)
        cc = (v0 + dv).clamp(max=n_cols - 1)
        t.index_put_((idx, rr * n_cols + cc), wgt.float(), accumulate=True)
    return t


def aligner_losses(model: DenseDescriptor, sar: torch.Tensor, ctx: torch.Tensor, shift_cells: torch.Tensor, log_tau: torch.Tensor, border: int = 1) -> tuple[torch.Tensor, dict[str, float]]:
    """Matching + dense losses for a batch.

    ``sar``: (B, C_sar, h, h) SAR crops; ``ctx``: (B, C_opt, h + 2s, h + 2s) optical windows;
    ``shift_cells``: (B, 2) float position of the SAR crop's top-left in the window, cells.
    ``log_tau``: log temperature (scalar tensor, learned).
    """
    dq = model(sar, "sar")
    dc = model(ctx, "opt")
    tmpl = dq[:, :, border:-border, border:-border] if border else dq
    B, D, ht, wt = tmpl.shape
    Hc, Wc = dc.shape[-2:]
    tau = log_tau.exp()
    # matching: correlation map over offsets
    corr = correlate(tmpl, dc[:, None])[:, 0]  # (B, n, n)
    n_r, n_c = corr.shape[-2:]
    tgt = _soft_target(shift_cells[:, 0] + border, shift_cells[:, 1] + border, n_r, n_c)
    match = -(tgt * F.log_softmax(corr.reshape(B, -1) / tau, dim=1)).sum(1).mean()
    # dense: every template cell against every window cell
    logits = torch.einsum("bdt,bdc->btc", tmpl.reshape(B, D, -1), dc.reshape(B, D, -1)) / tau
    ii = torch.arange(ht, dtype=torch.float32)[:, None].expand(ht, wt).reshape(-1)
    jj = torch.arange(wt, dtype=torch.float32)[None, :].expand(ht, wt).reshape(-1)
    u = (shift_cells[:, 0:1] + border + ii[None]).reshape(-1)
    v = (shift_cells[:, 1:2] + border + jj[None]).reshape(-1)
    dt = _soft_target(u, v, Hc, Wc).reshape(B, ht * wt, Hc * Wc)
    dense = -(dt * F.log_softmax(logits, dim=2)).sum(2).mean()
    return match + dense, {"match": float(match.detach()), "dense": float(dense.detach()), "tau": float(tau.detach())}


@torch.no_grad()
def evaluate_aligner(
    model: DenseDescriptor, data: AlignData, rows: np.ndarray, max_shift_px: int, seed: int = 0, batch: int = 32, phases: bool = False
) -> dict[str, float]:
    """Alignment error (pixels) of whole queries ``rows``, each searched within
    +-``max_shift_px`` of a seeded random point near its true centre (like a candidate
    reference would be): median, mean, share within 1 / 2 / 4 px. ``phases``: with
    pixel-level refinement (16x the map descriptor work)."""
    model.eval()
    m = data.mosaic
    fm = build_feature_mosaic(model, data.map_image.numpy(), m.valid, m.origin_x, m.origin_y, m.gsd_m, phases=phases)
    rng = np.random.default_rng(seed)
    S = data.query_px
    errs = []
    for s in range(0, len(rows), batch):
        r = rows[s : s + batch]
        dq = model(data.queries[r], "sar")
        tl = data.top_left[r]
        true_x = m.origin_x + (tl[:, 1] + S / 2) * m.gsd_m
        true_y = m.origin_y - (tl[:, 0] + S / 2) * m.gsd_m
        off = rng.uniform(-0.7, 0.7, size=(len(r), 2)) * max_shift_px * m.gsd_m
        centres = torch.from_numpy(np.stack([true_x + off[:, 0], true_y + off[:, 1]], 1))[:, None]
        res = align_to_mosaic(dq, fm, centres, S, max_shift_px)
        p = res.position_m[:, 0].numpy()
        errs.append(np.hypot(p[:, 0] - true_x, p[:, 1] - true_y) / m.gsd_m)
    e = np.concatenate(errs) if errs else np.zeros(0)
    return {
        "median_px": float(np.median(e)) if len(e) else float("nan"),
        "mean_px": float(np.mean(e)) if len(e) else float("nan"),
        "within_1px": float(np.mean(e <= 1)) if len(e) else float("nan"),
        "within_2px": float(np.mean(e <= 2)) if len(e) else float("nan"),
        "within_4px": float(np.mean(e <= 4)) if len(e) else float("nan"),
        "n": int(len(e)),
    }


def train_aligner(
    data: AlignData,
    sar_channels: int,
    optical_channels: int,
    steps: int,
    batch_size: int = 16,
    lr: float = 2e-3,
    dim: int = 16,
    width: int = 32,
    crop_px: int = 64,
    shift_px: int = 32,
    val_fraction: float = 0.1,
    eval_shift_px: int = 32,
    seed: int = 0,
    log_path: Path | None = None,
    progress: bool = True,
) -> tuple[DenseDescriptor, dict]:
    """Train a :class:`DenseDescriptor` on ``data``; returns (model in eval mode, stats).

    ``crop_px`` SAR crop side and ``shift_px`` maximum offset, pixels (multiples of 4 are
    kept; other values are rounded down). Stats: training seconds, last losses, validation
    alignment errors on held-out queries before and after training.
    """
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    S = data.query_px
    crop = max(STRIDE * 4, min(crop_px, S) // STRIDE * STRIDE)
    shift = max(STRIDE, shift_px // STRIDE * STRIDE)
    n = len(data.queries)
    perm = rng.permutation(n)
    n_val = int(round(val_fraction * n)) if n >= 10 else 0
    val_rows, train_rows = perm[:n_val], perm[n_val:]
    model = DenseDescriptor(sar_channels, optical_channels, dim=dim, width=width)
    log_tau = torch.nn.Parameter(torch.tensor(math.log(0.1)))
    opt = torch.optim.AdamW(list(model.parameters()) + [log_tau], lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    stats: dict = {"steps": steps, "crop_px": crop, "shift_px": shift, "n_train": int(len(train_rows)), "n_val": int(len(val_rows))}
    if len(val_rows):
        stats["val_before"] = evaluate_aligner(model, data, val_rows, eval_shift_px, seed)
    t0 = time.perf_counter()
    model.train()
    bar = tqdm(range(steps), desc="train fine alignment", unit="step", disable=not progress)
    parts: dict[str, float] = {}
    for step in bar:
        rows = train_rows[torch.randint(len(train_rows), (batch_size,), generator=g).numpy()]
        sar, ctx, shifts = [], [], []
        for r in rows:
            oy, ox = (int(v) for v in torch.randint(0, S - crop + 1, (2,), generator=g))
            a, b = (int(v) for v in torch.randint(0, 2 * shift + 1, (2,), generator=g))
            tr, tc = data.top_left[r]
            R, C = int(round(tr)) + oy, int(round(tc)) + ox
            sar.append(data.queries[r, :, oy : oy + crop, ox : ox + crop])
            ctx.append(_window(data.map_image, R - a, C - b, crop + 2 * shift, crop + 2 * shift))
            shifts.append((a / STRIDE, b / STRIDE))
        loss, parts = aligner_losses(model, torch.stack(sar), torch.stack(ctx), torch.tensor(shifts, dtype=torch.float32), log_tau)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(match=f"{parts['match']:.2f}", dense=f"{parts['dense']:.2f}")
            if log_path is not None:
                append_jsonl(log_path, {"stage": "align", "step": step, "loss": float(loss.detach()), **parts, "lr": sched.get_last_lr()[0]})
    model.eval()
    stats["seconds"] = round(time.perf_counter() - t0, 1)
    stats["last"] = parts
    if len(val_rows):
        stats["val_after"] = evaluate_aligner(model, data, val_rows, eval_shift_px, seed)
    return model, stats
