"""The shipped sentinel model against the registered truth: docs/sentinel_registered.json.

`make sentinel` tiles the test blocks a second (and third) time with each SAR file moved by its
measured co-registration (`tile.register`: CFOG, the primary record, and MI, which shares nothing
with the card's CFOG aligner), `make sentinel-registered` answers them (and the grid tiling) with
the shipped model, and `make scenes` cuts the 8x8-tile test scenes from each. This gathers what
those runs measured, for the shipped card and the grid-trained card before it, plus the median
signed offset (east, north) of the answers from the truth: an answer that follows the SAR content
sits at 0 / 0 against the registered truth.

    .venv/bin/python experiments/sentinel/registered.py   # -> docs/sentinel_registered.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cmpc.utils.io import atomic_write_json  # noqa: E402

#: the shipped card since 2026-12-01 (make sentinel-registered): seeds 0+1+2 trained on CFOG-registered pairs,
#: fused, with its own gate; its 32 px rows on the registered blocks were run from runs/sentinel_reg_fused before
#: the files were copied into weights/sentinel (the same bytes: embedder sha256 d17f33c8...)
SHIPPED = "weights/sentinel (card as shipped: embedder d17f33c8..., trained on CFOG-registered pairs)"
#: the card shipped before it (make sentinel): the same recipe trained on the pairs as published
GRID_CARD = "weights/sentinel until 2026-12-01 (embedder 865e0aa0..., trained on the published grid)"
#: (truth, embedder, report under reports/); reg_on_reg32 is the exploratory seed trained on CFOG-registered
#: pairs (docs/RESULTS.md, "One seed trained on registered pairs"), tested with the card's refine settings
PATCH_RUNS = [("grid", GRID_CARD, "sentinel_card32"), ("registered (CFOG)", GRID_CARD, "sentinel_card32reg"),
              ("registered (MI)", GRID_CARD, "sentinel_card32reg_mi"),
              ("registered (CFOG)", "runs/sentinel_reg/emb_best.pt (seed 0 trained on CFOG-registered pairs; not shipped)", "reg_on_reg32"),
              ("grid", SHIPPED, "sentinel_regfused32"), ("registered (CFOG)", SHIPPED, "sentinel_regfused32reg"),
              ("registered (MI)", SHIPPED, "sentinel_regfused32reg_mi")]
#: (truth, embedder, report under reports/) of the 8x8-tile test scenes: scenes/ the shipped card's answers;
#: scenes_gridmodel/ the previous card's, and scenes_nopolish/ the previous card's before its scene polish
#: (refine.scene_polish), kept as the baseline that polish was measured against
SCENE_RUNS = [("grid", SHIPPED, "scenes/sentinel_8x8_h0"), ("registered (CFOG)", SHIPPED, "scenes/sentinel_8x8_h0_reg"),
              ("registered (MI)", SHIPPED, "scenes/sentinel_8x8_h0_reg_mi"),
              ("grid", GRID_CARD, "scenes_gridmodel/sentinel_8x8_h0"), ("registered (CFOG)", GRID_CARD, "scenes_gridmodel/sentinel_8x8_h0_reg"),
              ("registered (MI)", GRID_CARD, "scenes_gridmodel/sentinel_8x8_h0_reg_mi"),
              ("registered (CFOG)", GRID_CARD, "scenes_nopolish/sentinel_8x8_h0_reg"), ("registered (MI)", GRID_CARD, "scenes_nopolish/sentinel_8x8_h0_reg_mi")]

def patch_rows(reports: Path) -> list[dict]:
    """One row per (truth, queries, stage) of the 32 px test-block reports present."""
    rows = []
    for truth, model, run in PATCH_RUNS:
        m = reports / run / "metrics.json"
        if not m.is_file():
            continue
        met = json.loads(m.read_text())
        pred = pd.read_csv(reports / run / "predictions.csv")
        for q in ("aligned", "non_aligned"):
            sel = pred[pred.aligned == (q == "aligned")]
            for stage in ("coarse", "refined"):
                d = met[q].get(stage)
                if not d:
                    continue
                x, y = sel[f"{stage}_x"] - sel.true_x, sel[f"{stage}_y"] - sel.true_y
                near = np.hypot(x, y) < 100.0
                e = d["error_m"]
                rows.append({"truth": truth, "embedder": model, "report": f"reports/{run}", "queries": q, "stage": stage, "n_queries": d.get("n_queries", met[q]["n_queries"]),
                             "r1": round(d["recall"]["1"], 4), "r10": round(d["recall"]["10"], 4), "median_m": round(e["median"], 1),
                             "within_25m": round(e["within"]["25"], 4), "within_100m": round(e["within"]["100"], 4),
                             "offset_within_100m_m": [round(float(np.median(x[near])), 1), round(float(np.median(y[near])), 1)] if near.any() else None})
    return rows


def scene_rows(reports: Path) -> list[dict]:
    """One row per (truth, method) of the 8x8-tile sentinel-la test scenes present."""
    rows = []
    for truth, model, run in SCENE_RUNS:
        f = reports / run / "rows.json"
        if not f.is_file():
            continue
        per = pd.read_csv(reports / run / "scenes.csv")
        rec = json.loads(f.read_text())
        polish = (rec.get("meta") or {}).get("scene_polish") or {}
        for r in rec["rows"]:
            s = per[(per.method == r["method"]) & (per.centre_m < 100.0)]
            rows.append({"truth": truth, "embedder": model, "report": f"reports/{run}", "scene_polish": polish.get("mode", "none"),
                         **{k: r[k] for k in ("method", "n_scenes", "success_5m", "success_25m", "not_found", "false_claims", "median_m")},
                         "offset_within_100m_m": [round(float(s.dx_m.median()), 1), round(float(s.dy_m.median()), 1)] if len(s) else None})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reports", default="reports")
    ap.add_argument("--out", default="docs/sentinel_registered.json")
    a = ap.parse_args()
    rec = {"note": "the shipped card was trained on the pairs moved by their CFOG co-registration (make sentinel-registered), the card "
                   "before it against the files' own georeferencing (make sentinel); nothing was chosen from these test rows (the gate "
                   "and the scene decisions on the validation block; the scene polish, scene_polish, on the validation block's scenes: "
                   "experiments/sentinel/scene_polish_val.sh)",
           "patches": patch_rows(Path(a.reports)), "scenes": scene_rows(Path(a.reports))}
    if not rec["patches"] and not rec["scenes"]:
        raise SystemExit(f"no sentinel test-block reports under {a.reports}/ (make sentinel, make scenes)")
    atomic_write_json(Path(a.out), rec)
    for r in rec["patches"] + rec["scenes"]:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
