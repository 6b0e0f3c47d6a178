"""Where does each sentinel-la test scene's SAR content truly lie? A per-scene content truth.

The scene study measures its answers against the SAR file's pixel grid, and sentinel-la's
Sentinel-1 and Sentinel-2 files are offset from each other by a median 23 m
(`coregistration.py`, per file; the offset also varies within a file). This measures, for
every scene of a scenes folder and independently of every cmpc model, the shift of the
scene's own SAR pixels against the optical files at the scene's true footprint (the optical
pairs reprojected onto the scene's grid, mutual information over integer shifts within +-S px
with a parabolic sub-pixel peak: `cmpc.data.coregister.mi_shift`), on the whole scene and on its
northern and southern halves (their disagreement is the estimate's own uncertainty).

With a report's scenes.csv it then scores each method's answers against both truths: the grid
(as in docs/scenes.json) and the content truth, and over the scenes whose two halves agree
within 1 px (where the content truth itself is trustworthy).

    .venv/bin/python experiments/sentinel/scene_truth.py --scenes data/scenes/sentinel_8x8_h0_u8 \
        --report reports/scenes/sentinel_8x8_h0 reports/scenes_gnn/sentinel_8x8_h0 \
        --out docs/sentinel_scene_truth.json

About 6 minutes on one core for 200 8x8-tile scenes. Needs ../shared/data/real/sentinel-la.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import rasterio
from rasterio.warp import Resampling, reproject, transform_bounds

from cmpc.data.coregister import mi_shift

ROOT = Path(__file__).resolve().parents[2]


def optical_on_grid(pairs: list[tuple[Path, tuple[float, float, float, float]]], transform: rasterio.Affine, shape: tuple[int, int], crs: str) -> np.ndarray:
    """Grey level (mean of the bands) of the optical files reprojected onto a grid; 0 = no data.
    Files are taken in name order, a pixel keeps the first file that covers it (as the tiler)."""
    h, w = shape
    x0, y0 = transform * (0, h)
    x1, y1 = transform * (w, 0)
    out = np.zeros(shape, np.float32)
    for path, b in pairs:
        if b[2] < x0 or b[0] > x1 or b[3] < y0 or b[1] > y1:
            continue
        with rasterio.open(path) as src:
            bands = np.zeros((src.count, h, w), np.float32)
            for i in range(src.count):
                reproject(rasterio.band(src, i + 1), bands[i], dst_transform=transform, dst_crs=crs, src_nodata=0, dst_nodata=0, resampling=Resampling.bilinear)
        grey = bands.mean(0)
        valid = (bands > 0).all(0) & (out == 0)
        out[valid] = grey[valid]
    return out


def scene_shift(scene_tif: Path, truth: dict, pairs: list, search: int) -> dict:
    """Content offset (east, north metres) of one scene's SAR against the optical at its truth."""
    with rasterio.open(scene_tif) as s:
        sar = s.read(1).astype(np.float32)
    t = rasterio.Affine(*truth["transform"])
    opt = optical_on_grid(pairs, t, sar.shape, truth["crs"])
    gsd = float(truth["gsd_m"])
    h = sar.shape[0]
    whole = mi_shift(sar, opt, search)
    north = mi_shift(sar[: h // 2], opt[: h // 2], search)
    south = mi_shift(sar[h // 2:], opt[h // 2:], search)
    return {
        "scene": scene_tif.name,
        "content_dx_m": -whole["col"] * gsd,  # the SAR content lies this far east of its grid place
        "content_dy_m": whole["row"] * gsd,  # ... and this far north
        "mi_contrast": whole["contrast"],
        "at_edge": whole["at_edge"],
        "halves_disagree_px": float(np.hypot(north["col"] - south["col"], north["row"] - south["row"])),
        "valid_frac": float((opt > 0).mean()),
    }


def score(report: Path, truths: dict[str, dict]) -> list[dict]:
    """Per method: fractions of all scenes within 25 m (not-found = failure) against both truths."""
    rows: dict[str, list] = {}
    for r in csv.DictReader(open(report / "scenes.csv", newline="", encoding="utf-8")):
        rows.setdefault(r["method"], []).append(r)
    out = []
    for method, rs in rows.items():
        g, c, trusted_g, trusted_c, eg_all, ec_all = [], [], [], [], [], []
        for r in rs:
            t = truths.get(r["scene"])
            if t is None:
                continue
            found = r["status"] == "found"
            dx, dy = float(r["dx_m"]), float(r["dy_m"])
            eg = float(np.hypot(dx, dy))
            ec = float(np.hypot(dx - t["content_dx_m"], dy - t["content_dy_m"]))
            eg_all.append(eg)
            ec_all.append(ec)
            g.append(found and eg <= 25)
            c.append(found and ec <= 25)
            if t["halves_disagree_px"] <= 1.0 and not t["at_edge"]:
                trusted_g.append(found and eg <= 25)
                trusted_c.append(found and ec <= 25)
        out.append({
            "report": str(report.relative_to(ROOT) if report.is_relative_to(ROOT) else report),
            "method": method, "n_scenes": len(g),
            "within_25m_vs_grid": round(float(np.mean(g)), 3),
            "within_25m_vs_content": round(float(np.mean(c)), 3),
            "median_m_vs_grid": round(float(np.nanmedian(eg_all)), 2),  # best guesses, as docs/scenes.json's median_m
            "median_m_vs_content": round(float(np.nanmedian(ec_all)), 2),
            "p95_m_vs_grid": round(float(np.nanquantile(eg_all, 0.95)), 1),
            "p95_m_vs_content": round(float(np.nanquantile(ec_all, 0.95)), 1),
            "n_trusted": len(trusted_g),
            "trusted_within_25m_vs_grid": round(float(np.mean(trusted_g)), 3) if trusted_g else None,
            "trusted_within_25m_vs_content": round(float(np.mean(trusted_c)), 3) if trusted_c else None,
        })
    return out


def plot(report: Path, truths: dict[str, dict], out: Path) -> None:
    """Signed errors (answer - grid truth) against the MI content offset, east and north, and
    the CDFs of the centre error against either truth (found scenes; method of the last row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = list(csv.DictReader(open(report / "scenes.csv", newline="", encoding="utf-8")))
    method = rs[-1]["method"]
    rs = [r for r in rs if r["method"] == method and r["status"] == "found" and r["scene"] in truths]
    ans = np.array([[float(r["dx_m"]), float(r["dy_m"])] for r in rs])
    con = np.array([[truths[r["scene"]]["content_dx_m"], truths[r["scene"]]["content_dy_m"]] for r in rs])
    trusted = np.array([truths[r["scene"]]["halves_disagree_px"] <= 1.0 and not truths[r["scene"]]["at_edge"] for r in rs])
    fig, ax = plt.subplots(1, 3, figsize=(13, 4.2))
    for k, name in enumerate(("east", "north")):
        a = ax[k]
        a.scatter(con[~trusted, k], ans[~trusted, k], s=9, c="0.6", label="halves disagree > 1 px")
        a.scatter(con[trusted, k], ans[trusted, k], s=11, c="C0", label="halves agree within 1 px")
        lim = float(np.nanmax(np.abs(np.r_[con[:, k], ans[:, k]]))) * 1.05
        a.plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
        r = np.corrcoef(con[:, k], ans[:, k])[0, 1]
        a.set(xlabel=f"MI content offset, {name} (m)", ylabel=f"answer - grid truth, {name} (m)", title=f"{name}: r = {r:.2f} (n = {len(rs)})",
              xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
        a.grid(alpha=0.3)
    ax[0].legend(fontsize=8, loc="upper left")
    eg = np.sort(np.linalg.norm(ans, axis=1))
    ec = np.sort(np.linalg.norm(ans - con, axis=1))
    n = np.arange(1, len(eg) + 1) / len(truths)
    ax[2].step(eg, n, where="post", label="against the grid truth")
    ax[2].step(ec, n, where="post", label="against the MI content truth")
    ax[2].axvline(25, c="k", lw=0.8, ls=":")
    ax[2].set(xlabel="centre error (m)", ylabel="fraction of all scenes", title=f"{method}, {len(truths)} scenes", xlim=(0, 60), ylim=(0, 1))
    ax[2].legend(fontsize=8, loc="lower right")
    ax[2].grid(alpha=0.3)
    fig.suptitle(f"sentinel-la test block, 8x8-tile scenes: answers follow the SAR content, not the file grid ({report.name})", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default=str(ROOT.parent / "shared/data/real/sentinel-la"))
    ap.add_argument("--scenes", required=True, help="a scenes folder (cmpc data scenes) cut from sentinel-la")
    ap.add_argument("--report", nargs="*", default=[], help="cmpc eval scenes report folders to score")
    ap.add_argument("--search", type=int, default=6, help="search +-S pixels")
    ap.add_argument("--out", default=None, help="JSON summary (default: print only)")
    ap.add_argument("--plot", default=None, help="PNG: the first report's last method's signed errors against the content offsets, and both error CDFs")
    a = ap.parse_args(argv)
    folder, scenes = Path(a.pairs), Path(a.scenes)
    if not folder.is_dir():
        print(f"skipped: {folder} is absent", file=sys.stderr)
        return 0
    cache = scenes / "content_truth.csv"
    truths: dict[str, dict] = {}
    if cache.is_file():
        for r in csv.DictReader(open(cache, newline="", encoding="utf-8")):
            truths[r["scene"]] = {k: (v if k == "scene" else (v == "True" if k == "at_edge" else float(v))) for k, v in r.items()}
    else:
        pairs = []
        for p in sorted(folder.glob("*_optical.tif")):
            with rasterio.open(p) as src:
                pairs.append((p, transform_bounds(src.crs, "EPSG:32611", *src.bounds)))
        for tj in sorted(scenes.glob("*.truth.json")):
            truth = json.loads(tj.read_text(encoding="utf-8"))
            if truth["crs"] != "EPSG:32611" or abs(float(truth["heading_deg"])) > 1e-9:
                raise SystemExit(f"error: {tj} is not a north-up scene in EPSG:32611; this script handles those only")
            rec = scene_shift(scenes / truth["scene"], truth, pairs, a.search)
            truths[rec["scene"]] = rec
            print(f"{rec['scene']}: content ({rec['content_dx_m']:.1f}, {rec['content_dy_m']:.1f}) m, halves {rec['halves_disagree_px']:.2f} px", file=sys.stderr)
        tmp = cache.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(next(iter(truths.values())).keys()))
            w.writeheader()
            w.writerows(truths.values())
        tmp.replace(cache)
    off = np.array([[t["content_dx_m"], t["content_dy_m"]] for t in truths.values()])
    dis = np.array([t["halves_disagree_px"] for t in truths.values()])
    summary = {
        "scenes": str(scenes), "n": len(truths),
        "content_offset_median_m": round(float(np.median(np.linalg.norm(off, axis=1))), 1),
        "content_offset_over_25m": round(float((np.linalg.norm(off, axis=1) > 25).mean()), 3),
        "halves_disagree_px_median": round(float(np.median(dis)), 2),
        "trusted_fraction": round(float(np.mean([(t["halves_disagree_px"] <= 1.0 and not t["at_edge"]) for t in truths.values()])), 3),
        "methods": [m for r in a.report for m in score(Path(r).resolve(), truths)],
    }
    print(json.dumps(summary, indent=1))
    if a.plot and a.report:
        plot(Path(a.report[-1]), truths, Path(a.plot))
    if a.out:
        out = Path(a.out)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
