"""The CFOG gate a validation screen's queries choose when pooled: non-aligned and aligned.

``screen_stride.py`` reports, per query set, the peak threshold those queries alone would
choose (``calibrate_min_peak``: lowest mean error capped at 100 m). Queries cut anywhere never
have a right coarse answer at 25 m, so alone they always choose "always align"; the gate
exists for the queries whose coarse answer is already right. This pools the two sets of one
stride (equal numbers, as the shipped calibration's 420 + 420) and prints the pooled
threshold with what each set gets under it and under the card's threshold.

    .venv/bin/python experiments/sentinel/gate_union.py --stride 32 --tag _card
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cmpc.train.refine import calibrate_min_peak
from screen_stride import errors, summary  # this folder


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stride", type=int, default=32)
    ap.add_argument("--tag", default="_card")
    ap.add_argument("--work", default="runs/screen_stride")
    a = ap.parse_args()
    card = json.loads(Path("weights/sentinel/card.json").read_text())
    card_thr = float(card["experiment"]["refine"]["align_min_peak"])
    work = Path(a.work)
    sets: dict[str, dict[str, np.ndarray]] = {}
    for kind, prefix in (("non_aligned", "q1"), ("aligned", "qa1")):
        per: dict[str, list[np.ndarray]] = {}
        for q in sorted(work.glob(f"{prefix}*.tif")):
            pred = work / f"pred_{a.stride}{a.tag}_{q.stem}"
            if not (pred / "predictions.csv").is_file():
                raise SystemExit(f"{pred} is missing: run screen_stride.py --strides {a.stride} --tag {a.tag}" + (" --aligned" if kind == "aligned" else ""))
            for k, v in errors(pred, q, card_thr).items():
                per.setdefault(k, []).append(v)
        sets[kind] = {k: np.concatenate(v) for k, v in per.items()}
    pooled = {k: np.concatenate([sets["non_aligned"][k], sets["aligned"][k]]) for k in ("cfog", "peak", "coarse")}
    thr, stats = calibrate_min_peak(pooled["cfog"], pooled["peak"], pooled["coarse"])
    out = {"stride_px": a.stride, "n": {k: int(len(v["peak"])) for k, v in sets.items()}, "pooled_threshold": round(thr, 4),
           "pooled": {k: round(v, 4) for k, v in stats.items()}, "card_threshold": card_thr}
    for t_name, t in (("pooled", thr), ("card", card_thr)):
        for kind, e in sets.items():
            gated = np.where(e["peak"] >= t, e["cfog"], e["coarse"])
            out[f"{kind}_at_{t_name}_threshold"] = {**summary(gated), "capped_mean_m": round(float(np.minimum(gated, 100).mean()), 2),
                                                   "kept_aligned": round(float(np.mean(e["peak"] >= t)), 3)}
    for t_name, t in (("pooled", thr), ("card", card_thr)):
        both = np.where(pooled["peak"] >= t, pooled["cfog"], pooled["coarse"])
        out[f"pooled_capped_mean_at_{t_name}"] = round(float(np.minimum(both, 100).mean()), 2)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
