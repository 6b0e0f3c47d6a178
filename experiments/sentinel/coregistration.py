"""How well are sentinel-la's Sentinel-1 and Sentinel-2 files registered to each other?

The dataset says its pairs are co-registered; its ground truth (a SAR patch belongs where its
pixels lie) is only as good as that. This measures, independently of every cmpc model, the
shift of each SAR file against its optical file by mutual information (MI of the SAR
amplitude and the optical grey level over all valid pixels; integer shifts within +-S px,
sub-pixel by a parabola through the peak). MI is weak across sensors, so each file is also
measured on its northern and southern halves separately: their agreement tells how far the
shift can be trusted.

When the scene study's sentinel-la scenes are present (reports/scenes/sentinel_8x8_h0), the
scene answers' signed errors (east, north) are compared with the shift the files under each
scene predict (overlap-weighted): if the localizer finds where the SAR content truly lies,
its "errors" against the pixel-grid truth follow the files' misregistration.

    .venv/bin/python experiments/sentinel/coregistration.py   # -> docs/sentinel_coregistration.json

Numbers in docs/RESULTS.md ("Sentinel-1 / Sentinel-2", co-registration). Needs
../shared/data/real/sentinel-la; about 3 minutes on one core.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import rasterio
from rasterio.warp import transform as warp_points

from cmpc.data.coregister import mi_shift  # the measurement itself lives in the package (cmpc data coregistration)

ROOT = Path(__file__).resolve().parents[2]
UTM = "EPSG:32611"  # how cmpc views sentinel-la (docs/SENTINEL.md)


def file_shift(folder: Path, fid: str, search: int) -> dict:
    with rasterio.open(folder / f"{fid}_sar.tif") as s:
        sar = s.read(1).astype(np.float32)
        t, crs = s.transform, s.crs
    with rasterio.open(folder / f"{fid}_optical.tif") as o:
        opt = o.read().astype(np.float32).mean(0)
        opt[(o.read_masks(1) == 0)] = 0
    h, w = opt.shape
    whole = mi_shift(sar, opt, search)
    north = mi_shift(sar[: h // 2], opt[: h // 2], search)
    south = mi_shift(sar[h // 2:], opt[h // 2:], search)
    xs, ys = warp_points(crs, UTM, [t.c, t.c + t.a * w], [t.f, t.f + t.e * h])
    gsd = float(abs(xs[1] - xs[0]) / w)  # ground metres per pixel in UTM
    return {
        "file": fid, "gsd_m": round(gsd, 3),
        "shift_px": [round(whole["col"], 2), round(whole["row"], 2)],
        # where the SAR content truly lies relative to its grid position, ground metres (east, north)
        "content_offset_m": [round(-whole["col"] * gsd, 1), round(whole["row"] * gsd, 1)],
        "mi": round(whole["mi"], 4), "mi_contrast": round(whole["contrast"], 4), "at_search_edge": whole["at_edge"],
        "halves_px": [[round(north["col"], 2), round(north["row"], 2)], [round(south["col"], 2), round(south["row"], 2)]],
        "bounds_utm": [round(min(xs), 1), round(min(ys), 1), round(max(xs), 1), round(max(ys), 1)],
    }


def compare_scenes(files: list[dict], scenes_csv: Path, scenes_dir: Path) -> dict | None:
    """Scene answers' signed errors vs the overlap-weighted content offset of their files."""
    if not scenes_csv.is_file():
        return None
    obs, pred = [], []
    for r in csv.DictReader(open(scenes_csv, newline="", encoding="utf-8")):
        if r["method"] != "verify" or r["status"] != "found" or not float(r["centre_m"]) < 100:
            continue
        truth = json.loads((scenes_dir / r["scene"].replace(".tif", ".truth.json")).read_text(encoding="utf-8"))
        c = np.array(truth["corners_xy"])
        x0, y0, x1, y1 = c[:, 0].min(), c[:, 1].min(), c[:, 0].max(), c[:, 1].max()
        wsum, acc = 0.0, np.zeros(2)
        for f in files:
            b = f["bounds_utm"]
            ov = max(0.0, min(x1, b[2]) - max(x0, b[0])) * max(0.0, min(y1, b[3]) - max(y0, b[1]))
            if ov > 0:
                wsum += ov
                acc += ov * np.array(f["content_offset_m"])
        if wsum > 0:
            obs.append([float(r["dx_m"]), float(r["dy_m"])])
            pred.append(acc / wsum)
    if len(obs) < 10:
        return None
    o, p = np.array(obs), np.array(pred)
    err_grid = np.linalg.norm(o, axis=1)
    err_content = np.linalg.norm(o - p, axis=1)
    return {
        "n_scenes": len(o),
        "corr_east": round(float(np.corrcoef(o[:, 0], p[:, 0])[0, 1]), 3),
        "corr_north": round(float(np.corrcoef(o[:, 1], p[:, 1])[0, 1]), 3),
        "median_error_vs_grid_m": round(float(np.median(err_grid)), 1),
        "median_error_vs_mi_content_m": round(float(np.median(err_content)), 1),
        "within_25m_vs_grid": round(float((err_grid <= 25).mean()), 3),
        "within_25m_vs_mi_content": round(float((err_content <= 25).mean()), 3),
        "note": "found scenes within 100 m of the grid truth only; fractions of those, not of all scenes",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default=str(ROOT.parent / "shared/data/real/sentinel-la"))
    ap.add_argument("--search", type=int, default=6, help="search +-S pixels")
    ap.add_argument("--out", default=str(ROOT / "docs/sentinel_coregistration.json"))
    a = ap.parse_args(argv)
    folder = Path(a.pairs)
    if not folder.is_dir():
        print(f"skipped: {folder} is absent", file=sys.stderr)
        return 0
    fids = sorted(p.name.split("_")[0] for p in folder.glob("*_sar.tif"))
    files = []
    for fid in fids:
        files.append(file_shift(folder, fid, a.search))
        f = files[-1]
        print(f"{fid}: shift {f['shift_px']} px, halves {f['halves_px']}, MI {f['mi']} (contrast {f['mi_contrast']})", file=sys.stderr)
    sh = np.array([f["shift_px"] for f in files])
    halves = np.array([f["halves_px"] for f in files])
    gsd = np.array([f["gsd_m"] for f in files])
    mag = np.linalg.norm(sh, axis=1) * gsd
    agree = np.linalg.norm(halves[:, 0] - halves[:, 1], axis=1)
    summary = {
        "files": len(files),
        "median_shift_m": round(float(np.median(mag)), 1),
        "p90_shift_m": round(float(np.quantile(mag, 0.9)), 1),
        "max_shift_m": round(float(mag.max()), 1),
        "files_over_1px": int((np.linalg.norm(sh, axis=1) > 1.0).sum()),
        "files_over_25m": int((mag > 25).sum()),
        "halves_disagreement_px_median": round(float(np.median(agree)), 2),
        "files_at_search_edge": int(sum(f["at_search_edge"] for f in files)),
        "test_block_scenes": compare_scenes(files, ROOT / "reports/scenes/sentinel_8x8_h0/scenes.csv", ROOT / "data/scenes/sentinel_8x8_h0"),
    }
    rec = {"method": "mutual information (48 bins) of SAR amplitude vs optical grey, integer shifts within +-%d px, parabolic sub-pixel" % a.search,
           "summary": summary, "per_file": files}
    out = Path(a.out)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rec, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
