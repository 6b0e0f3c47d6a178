"""Calibrate CFOG fine alignment for the shipped Sentinel model on validation (never the test split).

The validation block's queries (aligned and non-aligned; places neither the embedder nor
anything else trained on) are localized through the product path (:class:`Localizer` with
``refine.aligner=cfog``, no GNN) against the whole training map (``index/<name>-train``:
harder than a test map, as the refiner's own calibration in ``cmpc train refine``). For every
query: the coarse answer (top-1 reference centre), the CFOG answer (best peak over the first
``refine.fine_top`` candidates) and that peak. The peak threshold under which the coarse
answer is kept is chosen by :func:`cmpc.train.refine.calibrate_min_peak` (lowest mean error
capped at 100 m) against the grid truth (the SAR file's pixel grid: the truth every reported
row uses). Printed beside: the same numbers against the MI content truth (the grid moved by
the file's content offset measured by mutual information, docs/sentinel_coregistration.json:
43-47 m for the validation files 100 and 101), and the median offset of the CFOG answers from
the grid, to compare with it. Writes ``docs/sentinel_cfog_calibration.json``.

    .venv/bin/python experiments/sentinel/calibrate_cfog.py --set refine.fine_top=5
    .venv/bin/python experiments/sentinel/calibrate_cfog.py --set refine.fine_top=20 --set refine.cfog_sigma=1.5 --set refine.align_score=zncc  # shipped
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from cmpc.config import load_experiment
from cmpc.data.patches import PatchDataset
from cmpc.index.build import ensure_train_index
from cmpc.localize.localizer import Localizer
from cmpc.train.refine import calibrate_min_peak
from cmpc.utils.io import atomic_write_text

from screen_offsets import validation_block  # this folder: the one definition of the validation block


def content_truth(xy: np.ndarray, coregistration: str | Path) -> np.ndarray:
    """Positions ``xy`` (N, 2) moved by the content offset of the file holding each (the one
    whose centre is nearest among those containing it; unchanged outside every file)."""
    files = json.loads(Path(coregistration).read_text())["per_file"]
    out = np.asarray(xy, dtype=float).copy()
    for i, (x, y) in enumerate(out.copy()):
        inside = [f for f in files if f["bounds_utm"][0] <= x <= f["bounds_utm"][2] and f["bounds_utm"][1] <= y <= f["bounds_utm"][3]]
        if inside:
            f = min(inside, key=lambda f: np.hypot(x - (f["bounds_utm"][0] + f["bounds_utm"][2]) / 2, y - (f["bounds_utm"][1] + f["bounds_utm"][3]) / 2))
            out[i] += np.asarray(f["content_offset_m"], dtype=float)
    return out


def summary(e: np.ndarray) -> dict[str, float]:
    return {"n": int(len(e)), "median_m": round(float(np.median(e)), 1), "within_25m": round(float(np.mean(e <= 25)), 3),
            "within_50m": round(float(np.mean(e <= 50)), 3), "within_100m": round(float(np.mean(e <= 100)), 3),
            "within_640m": round(float(np.mean(e <= 640)), 3)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experiment", default="experiments/sentinel.json")
    ap.add_argument("--checkpoint", default="weights/sentinel/embedder.pt")
    ap.add_argument("--index", default=None, help="default: the training map's index of the checkpoint (index/sentinel_fused-train, built when missing)")
    ap.add_argument("--coregistration", default="docs/sentinel_coregistration.json",
                    help="MI record for the second reading; 'none' when the dataset was tiled registered (tile.register): its truth already follows the content")
    ap.add_argument("--set", action="append", default=[], help="experiment overrides (refine.fine_top=..., refine.cfog_sigma=...)")
    ap.add_argument("--out", default="docs/sentinel_cfog_calibration.json")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--every", type=int, default=1, help="every N-th validation query (screening)")
    a = ap.parse_args()
    t0 = time.time()
    exp = load_experiment(a.experiment, ["name=sentinel_fused", "refine.enabled=true", "refine.aligner=cfog", "refine.gate=config", "refine.align_min_peak=-1", *a.set])
    index_dir = a.index or ensure_train_index(exp, a.checkpoint).directory
    loc = Localizer.load(a.checkpoint, index_dir, exp.localize, exp.index, exp.refine, None)
    root = exp.data.root
    _, _, queries, _, q_idx = validation_block(root)
    q_idx = q_idx[:: a.every]
    if a.limit:
        q_idx = q_idx[: a.limit]
    anns = [queries[i] for i in q_idx]
    ds = PatchDataset(root, "train", "sar", loc.img_size, annotations=anns)
    coarse, refined, peak, top1, rtop1 = [], [], [], [], []
    for s in range(0, len(anns), 32):
        x = torch.stack([ds.load(i) for i in range(s, min(s + 32, len(anns)))])
        r = loc.localize_batch(x)
        coarse.append(r.coarse_xy)
        refined.append(r.refined_xy)
        peak.append(r.align_peak)
        top1.append(r.ids[:, 0])
        rtop1.append(loc.index.ids[r.refined_rows[:, 0]])
        print(f"{s + len(x)}/{len(anns)} {time.time() - t0:.0f} s", flush=True)
    coarse, refined, peak = np.concatenate(coarse), np.concatenate(refined), np.concatenate(peak)
    top1, rtop1 = np.concatenate(top1), np.concatenate(rtop1)
    qid = np.array([q.id for q in anns])
    aligned = np.array([bool(q.aligned) for q in anns])
    grid = np.array([[q.x, q.y] for q in anns], dtype=float)
    registered = a.coregistration == "none"  # the dataset's truth already follows the content
    content = grid if registered else content_truth(grid, a.coregistration)
    out: dict = {"experiment": a.experiment, "checkpoint": a.checkpoint, "index": str(index_dir), "n_refs": int(loc.index.ntotal),
                 "overrides": a.set, "every": a.every, "refine": {k: getattr(exp.refine, k) for k in ("fine_top", "fine_max_shift_px", "cfog_sigma", "cfog_sar_sigma", "rerank")}}
    e_c = np.linalg.norm(coarse - grid, axis=1)
    e_r = np.linalg.norm(refined - grid, axis=1)
    t, cal = calibrate_min_peak(e_r, peak, e_c)
    take = peak >= t
    final = np.where(take[:, None], refined, coarse)
    final_id = np.where(take, rtop1, top1)
    out["align_min_peak"] = round(float(t), 4)
    out["calibration"] = {k: round(float(v), 4) for k, v in cal.items()}
    for name, truth in (("grid_truth", grid),) + ((("mi_content_truth", content),) if not registered else ()):
        rows = {}
        for qs, m in (("aligned", aligned), ("non_aligned", ~aligned)):
            rows[qs] = {
                "coarse": {**summary(np.linalg.norm(coarse[m] - truth[m], axis=1)), "r1": round(float(np.mean(top1[m] == qid[m])), 3)},
                "cfog_always": {**summary(np.linalg.norm(refined[m] - truth[m], axis=1)), "r1": round(float(np.mean(rtop1[m] == qid[m])), 3)},
                "cfog_gated": {**summary(np.linalg.norm(final[m] - truth[m], axis=1)), "r1": round(float(np.mean(final_id[m] == qid[m])), 3),
                               "share_aligned": round(float(np.mean(take[m])), 3)},
            }
        out[name] = rows
    # where the aligned answers sit relative to the grid truth (median east, north, m), by
    # file: compare with the files' measured content offsets
    near = np.linalg.norm(refined - grid, axis=1) <= 100
    out["cfog_minus_grid_median_m"] = [round(float(v), 1) for v in np.median((refined - grid)[near], axis=0)] if near.any() else None
    out["content_minus_grid_median_m"] = [round(float(v), 1) for v in np.median(content - grid, axis=0)]
    out["seconds"] = round(time.time() - t0, 1)
    out["s_per_query"] = round((time.time() - t0) / max(1, len(anns)), 3)
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        atomic_write_text(a.out, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
