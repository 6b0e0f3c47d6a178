"""Screen a denser reference grid for non-aligned Sentinel-1 queries (validation files only).

A query cut anywhere on the SAR image lies up to half a reference stride off the nearest
reference window (stride 64 px = 531 m at 8.3 m/px: up to 32 px each way), and the shipped
embedder ranks such queries far worse than aligned ones (test blocks: coarse R@1 0.32 against
0.90). A user can index the map at a finer stride (``cmpc index build --stride-px 32``): every
query is then within 16 px of a reference, at four times the references. This measures what
that buys through the user commands (``cmpc index build --model sentinel --raster`` for each
validation file's optical, ``cmpc localize --model sentinel`` with the card's CFOG refinement,
gate open so the calibrated threshold can be applied afterwards from ``align_peak``; the map
is the validation files' optical and three training neighbours' as distractors), on SAR
crops of the validation files (``tile.val_blocks``: files 100 and 101; never the test block)
at random offsets off both grids. Truth: the query window's centre on the SAR file's own grid.

Other query-time settings are screened the same way with ``--set`` (e.g. ``--set
refine.align_score=zncc --tag _zncc``). Prints, per stride, within 25 / 50 / 100 / 640 m for
the coarse answer, the alignment always taken and the alignment gated at the card's threshold
(or ``--threshold``), and the threshold these queries alone would choose
(``calibrate_min_peak``). Run on the test block's files only to report a choice made here.

    .venv/bin/python experiments/sentinel/screen_stride.py --strides 64 32 --offsets 3
    .venv/bin/python experiments/sentinel/screen_stride.py --aligned --set refine.align_score=zncc --tag _zncc
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.merge import merge
from rasterio.windows import Window

from cmpc.data.raster import open_raster
from cmpc.train.refine import calibrate_min_peak

LA = Path("../shared/data/real/sentinel-la")
CMPC = [sys.executable, "-m", "cmpc"]


def run(*args: str) -> dict:
    """One cmpc command; its JSON answer (stdout). Exits with its stderr on failure."""
    p = subprocess.run([*CMPC, *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"cmpc {' '.join(args)} failed: {p.stderr.strip()[-400:]}")
    return json.loads(p.stdout)


def crop(src_path: Path, out: Path, top: int, left: int, size: int) -> None:
    """Write ``size`` px of ``src_path`` from (top, left), georeferencing kept."""
    with rasterio.open(src_path) as src:
        win = Window(left, top, size, size)
        prof = {**src.profile, "width": size, "height": size, "transform": src.window_transform(win)}
        for k in ("blockxsize", "blockysize", "tiled"):
            prof.pop(k, None)
        with rasterio.open(out, "w", **prof) as dst:
            dst.write(src.read(window=win))


def errors(pred_dir: Path, query: Path, thr: float) -> dict[str, np.ndarray]:
    """Per query: coarse, CFOG-always and gated errors (m) against the window centre."""
    with open_raster(query) as q:
        g = q.grid
    out: dict[str, list[float]] = {"coarse": [], "cfog": [], "gated": [], "peak": []}
    with open(pred_dir / "predictions.csv", newline="") as f:
        for r in csv.DictReader(f):
            top, left = (int(t[1:]) for t in r["query"].rsplit("_", 2)[-2:])
            cx, cy = g.window_centre(top, left, 128)
            c = float(np.hypot(float(r["coarse_x"]) - cx, float(r["coarse_y"]) - cy))
            a = float(np.hypot(float(r["refined_x"]) - cx, float(r["refined_y"]) - cy))
            peak = float(r["align_peak"])
            out["coarse"].append(c)
            out["cfog"].append(a)
            out["gated"].append(a if peak >= thr else c)
            out["peak"].append(peak)
    return {k: np.array(v) for k, v in out.items()}


def summary(e: np.ndarray) -> dict[str, float]:
    return {"median_m": round(float(np.median(e)), 1), **{f"within_{t}m": round(float(np.mean(e <= t)), 3) for t in (25, 50, 100, 640)}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", nargs="+", default=["100", "101"], help="sentinel-la files the queries come from (default: the validation block's)")
    ap.add_argument("--map-files", nargs="+", default=["088", "089", "100", "101", "102"],
                    help="files whose optical forms the map (default: the validation files and three training neighbours as distractors)")
    ap.add_argument("--strides", nargs="+", type=int, default=[64, 32])
    ap.add_argument("--offsets", type=int, default=3, help="random query-grid offsets per file")
    ap.add_argument("--aligned", action="store_true", help="queries on the stride-64 grid instead (crop offsets multiples of 64 px)")
    ap.add_argument("--size", type=int, default=896, help="query crop side, px (tiled at the card's stride 64)")
    ap.add_argument("--set", action="append", default=[], help="extra --set for cmpc localize (e.g. refine.align_score=zncc)")
    ap.add_argument("--threshold", type=float, default=None, help="peak threshold of the gated answers (default the card's align_min_peak)")
    ap.add_argument("--tag", default="", help="suffix of the prediction folders (runs with other --set)")
    ap.add_argument("--work", default="runs/screen_stride")
    ap.add_argument("--out", default="runs/screen_stride/result.json")
    a = ap.parse_args()
    card = json.loads(Path("weights/sentinel/card.json").read_text())
    thr = float(card["experiment"]["refine"]["align_min_peak"]) if a.threshold is None else a.threshold
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    queries = []
    for f in a.files:
        for k in range(a.offsets):
            top, left = (int(v) for v in rng.integers(0, 1024 - a.size, size=2))
            if a.aligned:
                top, left = 64 * (top // 64), 64 * (left // 64)
            q = work / f"q{'a' if a.aligned else ''}{f}_{k}.tif"
            if not q.exists():
                crop(LA / f"{f}_sar.tif", q, top, left, a.size)
            queries.append(q)
    map_tif = work / "map.tif"
    if not map_tif.exists():  # five 1024 px files: small enough to merge in memory for a probe
        srcs = [rasterio.open(LA / f"{f}_optical.tif") for f in a.map_files]
        arr, transform = merge(srcs)
        prof = {**srcs[0].profile, "width": arr.shape[2], "height": arr.shape[1], "transform": transform}
        for k in ("blockxsize", "blockysize", "tiled"):
            prof.pop(k, None)
        with rasterio.open(map_tif, "w", **prof) as dst:
            dst.write(arr)
        for s_ in srcs:
            s_.close()
    result: dict = {"files": a.files, "map_files": a.map_files, "aligned": a.aligned, "set": a.set, "threshold": thr, "queries": [q.name for q in queries], "strides": {}}
    for s in a.strides:
        name = f"{work.name}_{s}"
        t0 = time.time()
        if not (Path("index") / name / "manifest.json").exists():
            run("index", "build", "--model", "sentinel", "--raster", str(map_tif), "--name", name, "--stride-px", str(s))
        t_index = time.time() - t0
        per: dict[str, list[np.ndarray]] = {"coarse": [], "cfog": [], "gated": [], "peak": []}
        t0 = time.time()
        for q in queries:
            pred = work / f"pred_{s}{a.tag}_{q.stem}"
            if not (pred / "predictions.csv").exists():
                sets = [v for kv in ["refine.align_min_peak=-1", *a.set] for v in ("--set", kv)]
                run("localize", "--model", "sentinel", "--index", name, "--queries", str(q), *sets, "--out", str(pred))
            for k, v in errors(pred, q, thr).items():
                per[k].append(v)
        e = {k: np.concatenate(v) for k, v in per.items()}
        n_refs = json.loads((Path("index") / name / "manifest.json").read_text()).get("count")
        result["strides"][str(s)] = {"n_refs": n_refs, "n_queries": int(len(e["coarse"])), "index_s": round(t_index, 1),
                                     "localize_s": round(time.time() - t0, 1), "pass_gate": round(float(np.mean(e["peak"] >= thr)), 3),
                                     **{k: summary(e[k]) for k in ("coarse", "cfog", "gated")},
                                     # the threshold these queries alone would choose (calibrate_min_peak: capped mean error)
                                     "own_threshold": round(calibrate_min_peak(e["cfog"], e["peak"], e["coarse"])[0], 4)}
        print(json.dumps({s: result["strides"][str(s)]}), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
