"""Score the test-block patch answers against the files' measured co-registration as well.

The test blocks' truth is each SAR patch's place on its own file's grid. The pairs are not
perfectly co-registered (experiments/sentinel/coregistration.py: mutual information of the
raw SAR amplitude and optical grey level per file, independent of every cmpc model;
docs/sentinel_coregistration.json), and fine alignment finds where the SAR content lies on the
optical, so its answers' "errors" against the grid carry each file's misregistration.

This reads one ``cmpc test`` report (predictions.csv) and, per test file:

- the median signed offset (east, north) of the answers taken from the alignment that lie
  within 100 m of the grid truth, and their median distance to it (the alignment's own spread
  within a file), beside the file's MI content offset: two independent readings of the same
  misregistration;
- within 25 / 50 / 100 m and the median error of every stage and query set against the grid
  truth and against the "MI content truth" (grid truth moved by the MI offset of the file the
  query lies in; the lowest file number wins where files overlap, as in the tiler; a query in
  no file's box takes the nearest file's).

The grid truth stays the one the issue names; this is a second, independent reading, not a
substitute. Nothing is re-run or changed.

    .venv/bin/python experiments/sentinel/patch_truth.py reports/sentinel_card32 \\
        --out docs/sentinel_patch_truth.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from cmpc.utils.io import atomic_write_text

TEST_FILES = ["175", "176", "177", "187", "188", "189"]  # tile.test_blocks of experiments/sentinel.json


def file_of(x: np.ndarray, y: np.ndarray, per_file: dict[str, dict]) -> np.ndarray:
    """The test file each (x, y) (UTM 11N metres) lies in: lowest number first, else nearest box centre."""
    fid = np.full(len(x), "", dtype=object)
    for f in TEST_FILES:
        b = per_file[f]["bounds_utm"]
        fid[(fid == "") & (x >= b[0]) & (x < b[2]) & (y >= b[1]) & (y < b[3])] = f
    left = np.nonzero(fid == "")[0]
    if len(left):
        c = np.array([[(per_file[f]["bounds_utm"][0] + per_file[f]["bounds_utm"][2]) / 2, (per_file[f]["bounds_utm"][1] + per_file[f]["bounds_utm"][3]) / 2] for f in TEST_FILES])
        d = np.hypot(x[left, None] - c[None, :, 0], y[left, None] - c[None, :, 1])
        fid[left] = np.array(TEST_FILES, dtype=object)[d.argmin(1)]
    return fid


def scores(err: np.ndarray) -> dict[str, float]:
    return {"median_m": round(float(np.median(err)), 1), **{f"within_{t}m": round(float(np.mean(err <= t)), 3) for t in (25, 50, 100)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", help="a cmpc test report folder of the sentinel-la test blocks (predictions.csv)")
    ap.add_argument("--coregistration", default="docs/sentinel_coregistration.json")
    ap.add_argument("--out", default=None, help="JSON file for the numbers (printed anyway)")
    a = ap.parse_args()
    df = pd.read_csv(Path(a.report) / "predictions.csv")
    per_file = {r["file"]: r for r in json.loads(Path(a.coregistration).read_text())["per_file"]}
    tx, ty = df.true_x.to_numpy(), df.true_y.to_numpy()
    fid = file_of(tx, ty, per_file)
    off = np.array([per_file[f]["content_offset_m"] for f in fid], dtype=np.float64)
    cx, cy = tx + off[:, 0], ty + off[:, 1]
    dx, dy = df.x.to_numpy() - tx, df.y.to_numpy() - ty
    took = (df.position_from == "aligned").to_numpy() & (np.hypot(dx, dy) <= 100)
    files = []
    for f in TEST_FILES:
        m = took & (fid == f)
        med = np.median(np.stack([dx[m], dy[m]], 1), 0)
        files.append({"file": f, "n": int(m.sum()), "answers_minus_grid_m": [round(float(v), 1) for v in med],
                      "answers_spread_m": round(float(np.median(np.hypot(dx[m] - med[0], dy[m] - med[1]))), 1),
                      "mi_content_offset_m": per_file[f]["content_offset_m"],
                      "readings_apart_m": round(float(np.hypot(*(med - np.array(per_file[f]["content_offset_m"])))), 1),
                      "mi_halves_px": per_file[f]["halves_px"]})
    table = []
    for queries, sel in (("aligned", df.aligned.to_numpy()), ("non_aligned", ~df.aligned.to_numpy())):
        for stage, (x, y) in {"coarse": (df.coarse_x.to_numpy(), df.coarse_y.to_numpy()), "refined": (df.x.to_numpy(), df.y.to_numpy())}.items():
            table.append({"queries": queries, "stage": stage, "n": int(sel.sum()),
                          "grid_truth": scores(np.hypot(x - tx, y - ty)[sel]), "mi_content_truth": scores(np.hypot(x - cx, y - cy)[sel])})
    out = {"report": str(a.report), "coregistration": a.coregistration, "files": files, "scores": table,
           "note": "answers_minus_grid_m: median signed (east, north) offset of the answers taken from the alignment within 100 m of the grid truth; "
                   "mi_content_truth: the grid truth moved by the MI content offset of the query's file (independent of cmpc models)"}
    text = json.dumps(out, indent=1) + "\n"
    if a.out:
        atomic_write_text(Path(a.out), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
