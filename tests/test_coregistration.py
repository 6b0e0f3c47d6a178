"""Mutual-information registration of SAR against optical (cmpc.data.coregister, `cmpc data
coregistration`): a hand-made pair with a known shift and a non-linear intensity relation,
through the function and the CLI; and experiments/sentinel/scene_truth.py built on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, shift as nd_shift

from cmpc.data import coregister as co
from experiment_scripts import load_script


@pytest.mark.parametrize("dx,dy", [(2.0, -1.0), (-3.5, 2.5)])
def test_mi_shift_recovers_a_known_shift(dx: float, dy: float) -> None:
    rng = np.random.default_rng(0)
    opt = gaussian_filter(rng.normal(size=(256, 256)), 3.0)
    opt = (opt - opt.min()) / (opt.max() - opt.min()) * 250 + 1
    # SAR content that the optical shows at p lies at p + (dx, dy); a non-monotone response
    sar = nd_shift(opt, (dy, dx), order=3, mode="nearest")
    sar = np.abs(np.sin(sar / 40.0)) * 254 + 1 + rng.normal(0, 5, sar.shape)
    sar = np.clip(sar, 1, 255)
    s = co.mi_shift(sar.astype(np.float32), opt.astype(np.float32), search=5, step=1)
    assert s["col"] == pytest.approx(dx, abs=0.35) and s["row"] == pytest.approx(dy, abs=0.35)
    assert not s["at_edge"] and s["contrast"] > 0.05
    # mutual information itself: independent values share (almost) none
    a, b = rng.integers(0, 255, 20000), rng.integers(0, 255, 20000)
    assert co.mutual_information(a, b) < 0.1 < co.mutual_information(a, a)


def test_scene_truth_finds_a_scenes_content_offset_and_scores_against_it(tmp_path: Path) -> None:
    """experiments/sentinel/scene_truth.py: an optical file in UTM, a scene whose SAR content
    lies 3 px east and 2 px north of its grid place; the content offset comes back in metres
    with the right signs, and an answer placed on the content scores within 25 m of it (and
    not of the grid)."""
    import csv

    import rasterio
    from rasterio.transform import from_origin

    st = load_script("experiments/sentinel/scene_truth.py")
    rng = np.random.default_rng(1)
    gsd, x0, y0, n = 10.0, 400000.0, 3750000.0, 200
    opt = gaussian_filter(rng.normal(size=(n, n)), 2.5)
    opt = (opt - opt.min()) / (opt.max() - opt.min()) * 250 + 1
    path = tmp_path / "001_optical.tif"
    with rasterio.open(path, "w", driver="GTiff", width=n, height=n, count=3, dtype="uint8", crs="EPSG:32611",
                       transform=from_origin(x0, y0, gsd, gsd), nodata=0) as f:
        f.write(np.repeat(np.round(opt)[None].astype(np.uint8), 3, axis=0))
    # the scene's grid starts 40 px in; its SAR shows what lies 3 px west / 2 px south of each
    # pixel, i.e. the content sits 3 px east and 2 px north of where the grid puts it
    r0 = c0 = 40
    side = 96
    src = nd_shift(opt, (2.0, -3.0), order=3, mode="nearest")  # src[p] = opt[p - (2, -3)] (row, col)
    sar = np.abs(np.sin(src[r0:r0 + side, c0:c0 + side] / 40.0)) * 254 + 1
    scene = tmp_path / "scene_0000.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=side, height=side, count=1, dtype="uint8") as f:
        f.write(np.clip(np.round(sar), 1, 255).astype(np.uint8)[None])
    truth = {"scene": scene.name, "gsd_m": gsd, "heading_deg": 0.0, "crs": "EPSG:32611",
             "transform": [gsd, 0.0, x0 + c0 * gsd, 0.0, -gsd, y0 - r0 * gsd]}
    pairs = [(path, (x0, y0 - n * gsd, x0 + n * gsd, y0))]
    rec = st.scene_shift(scene, truth, pairs, search=5)
    assert rec["content_dx_m"] == pytest.approx(30.0, abs=4.0) and rec["content_dy_m"] == pytest.approx(20.0, abs=4.0)
    # scoring: one answer on the content (36 m from the grid truth), one on the grid
    report = tmp_path / "report"
    report.mkdir()
    with open(report / "scenes.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["method", "status", "dx_m", "dy_m", "scene"])
        w.writeheader()
        w.writerow({"method": "on_content", "status": "found", "dx_m": 30.0, "dy_m": 20.0, "scene": scene.name})
        w.writerow({"method": "on_grid", "status": "found", "dx_m": 0.0, "dy_m": 0.0, "scene": scene.name})
    rows = {r["method"]: r for r in st.score(report, {scene.name: rec})}
    assert rows["on_content"]["within_25m_vs_content"] == 1.0 and rows["on_content"]["within_25m_vs_grid"] == 0.0
    assert rows["on_grid"]["within_25m_vs_content"] == 0.0 and rows["on_grid"]["within_25m_vs_grid"] == 1.0
    json.dumps(rows)  # plain values, as the summary file holds


def _pair(tmp: Path, name: str, dx: float, dy: float, crs: str = "EPSG:32611", x0: float = 400000.0) -> None:
    """NAME_sar.tif / NAME_optical.tif at 10 m whose SAR content lies dx px east, dy px north
    of where its grid puts it (the SAR pixel p shows the optical content at p + (dx, -dy))."""
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(abs(hash(name)) % 1000)
    opt = gaussian_filter(rng.normal(size=(160, 160)), 2.5)
    opt = (opt - opt.min()) / (opt.max() - opt.min()) * 250 + 1
    sar = nd_shift(opt, (dy, -dx), order=3, mode="nearest")  # sar[r, c] = opt[r - dy, c + dx]
    sar = np.abs(np.sin(sar / 40.0)) * 254 + 1
    t = from_origin(x0, 3750000.0, 10.0, 10.0)
    for suffix, arr, bands in (("optical", opt, 3), ("sar", sar, 1)):
        with rasterio.open(tmp / f"{name}_{suffix}.tif", "w", driver="GTiff", width=160, height=160, count=bands, dtype="uint8",
                           crs=crs, transform=t) as f:
            f.write(np.repeat(np.clip(np.round(arr), 1, 255)[None].astype(np.uint8), bands, axis=0))


def test_cmpc_data_coregistration_measures_each_pair(tmp_path, capsys):
    """A folder of two pairs, content 3 px east / 2 px north and 0 px: the right offsets in
    metres with their signs, one line per pair, the JSON summary; bad input is one line."""
    from cmpc.cli import main

    _pair(tmp_path, "001", 3.0, 2.0)
    _pair(tmp_path, "002", 0.0, 0.0)
    rc = main(["data", "coregistration", str(tmp_path), "--search", "5", "--out", str(tmp_path / "co.json")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    rec = json.loads((tmp_path / "co.json").read_text())
    by = {p["name"]: p for p in rec["pairs"]}
    assert by["001"]["content_offset_m"] == [pytest.approx(30.0, abs=4.0), pytest.approx(20.0, abs=4.0)]
    assert by["002"]["offset_m"] < 4.0 and by["001"]["cell_spread_px"] < 0.5 and len(by["001"]["cells"]) == 4
    assert json.loads(out) == rec["summary"] and rec["summary"]["pairs"] == 2 and rec["summary"]["pairs_over_25m"] == 1
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("001: SAR content 3") and "east +3" in lines[0]
    # one SAR raster with its optical raster, content 2 px west
    _pair(tmp_path, "003", -2.0, 0.0)
    rc = main(["data", "coregistration", str(tmp_path / "003_sar.tif"), str(tmp_path / "003_optical.tif"), "--cells", "1"])
    out, err = capsys.readouterr()
    assert rc == 0 and json.loads(out)["median_offset_m"] == pytest.approx(20.0, abs=4.0)
    # bad input: a pair without its partner, rasters that do not overlap, a silly search
    (tmp_path / "lone").mkdir()
    (tmp_path / "lone" / "009_sar.tif").write_bytes((tmp_path / "001_sar.tif").read_bytes())
    _pair(tmp_path, "far", 0.0, 0.0, x0=500000.0)
    for argv, words in ((["data", "coregistration", str(tmp_path / "lone")], "no 009_optical.tif partner"),
                        (["data", "coregistration", str(tmp_path / "001_sar.tif"), str(tmp_path / "far_optical.tif")], "do not overlap"),
                        (["data", "coregistration", str(tmp_path), "--search", "0"], "--search")):
        rc = main(argv)
        _, err = capsys.readouterr()
        lines = [x for x in err.splitlines() if x.strip()]
        assert rc == 2 and len(lines) == 1 and words in lines[0], (argv, err)


@pytest.mark.parametrize("dx,dy", [(2.0, -1.0), (-3.5, 2.5)])
def test_cfog_shift_recovers_a_known_shift_through_speckle(dx: float, dy: float) -> None:
    """The CFOG estimator on a non-monotone, 4-look speckled SAR of a shifted optical: the
    shift to 0.15 px with MI's sign convention, every window agreeing; a window-less block and
    a structure-less pair are one-line errors."""
    from cmpc.errors import DataError
    from cmpc.localize.register import cfog_shift

    rng = np.random.default_rng(1)
    opt = gaussian_filter(rng.normal(size=(400, 400)), 3.0)
    opt = (opt - opt.min()) / (opt.max() - opt.min()) * 250 + 1
    sar = nd_shift(opt, (dy, dx), order=3, mode="nearest")  # content the optical shows at p lies at p + (dx, dy)
    sar = np.clip((np.abs(np.sin(sar / 40.0)) * 254 + 1) * rng.gamma(4.0, 0.25, sar.shape), 1, 255).astype(np.float32)
    s = cfog_shift(sar, opt.astype(np.float32), search=5, window=96)
    assert s["col"] == pytest.approx(dx, abs=0.15) and s["row"] == pytest.approx(dy, abs=0.15)
    assert s["windows"] == "16 of 16" and s["window_spread_px"] < 0.2 and not s["at_edge"] and s["peak"] > 0.5
    m = co.mi_shift(sar, opt.astype(np.float32), search=5)
    assert abs(m["col"] - s["col"]) < 0.5 and abs(m["row"] - s["row"]) < 0.5  # the two estimators agree here
    with pytest.raises(DataError, match="no fully valid"):
        cfog_shift(sar[:90, :90], opt[:90, :90].astype(np.float32), search=5, window=96)
    flat = np.full_like(sar, 100.0)
    with pytest.raises(DataError, match="clear CFOG peak"):
        cfog_shift(flat, flat, search=5, window=96)


def test_cmpc_data_coregistration_by_cfog(tmp_path, capsys):
    """`--method cfog`: the same offsets as MI on the hand-made pairs, with the windows used
    recorded; a window smaller than 4x the search is refused in one line."""
    from cmpc.cli import main

    _pair(tmp_path, "001", 3.0, 2.0)
    _pair(tmp_path, "002", 0.0, 0.0)
    rc = main(["data", "coregistration", str(tmp_path), "--search", "5", "--method", "cfog", "--window", "64", "--out", str(tmp_path / "co.json")])
    _, err = capsys.readouterr()
    assert rc == 0, err
    rec = json.loads((tmp_path / "co.json").read_text())
    by = {p["name"]: p for p in rec["pairs"]}
    assert by["001"]["content_offset_m"] == [pytest.approx(30.0, abs=3.0), pytest.approx(20.0, abs=3.0)]
    assert by["002"]["offset_m"] < 3.0 and by["001"]["windows"] == "4 of 4" and len(by["001"]["cells"]) == 4
    assert "mi" not in by["001"] and rec["method"].startswith("CFOG")
    rc = main(["data", "coregistration", str(tmp_path), "--method", "cfog", "--window", "16"])
    _, err = capsys.readouterr()
    assert rc == 2 and "--window" in err and len(err.strip().splitlines()) == 1


def test_patch_truth_reads_each_files_offset_and_scores_against_both_truths(tmp_path: Path, capsys) -> None:
    """experiments/sentinel/patch_truth.py on a hand-made report: two test files whose SAR
    content lies 20 m east / 10 m west of their grids, answers that found the content (plus
    one coarse answer on the grid and one far miss): the per-file answer offsets come back,
    and the content truth counts the found answers within 25 m where the grid truth does not."""
    import pandas as pd

    pt = load_script("experiments/sentinel/patch_truth.py")
    per_file = [{"file": f, "content_offset_m": off, "halves_px": [[0, 0], [0, 0]], "bounds_utm": [x0, 0.0, x0 + 1000.0, 1000.0]}
                for f, off, x0 in zip(pt.TEST_FILES, ([20.0, 0.0], [-10.0, 0.0], [0, 0], [0, 0], [0, 0], [0, 0]),
                                      (0.0, 1000.0, 5e5, 6e5, 7e5, 8e5))]
    (tmp_path / "co.json").write_text(json.dumps({"per_file": per_file}))
    rows = []
    for i, (tx, dx, src, al) in enumerate([(100.0, 20.0, "aligned", True), (300.0, 20.0, "aligned", True), (1200.0, -10.0, "aligned", True),
                                           (1500.0, -10.0, "aligned", False), (400.0, 0.0, "coarse", True), (600.0, 900.0, "aligned", False)]):
        rows.append({"query": i, "x": tx + dx, "y": 500.0, "coarse_x": tx, "coarse_y": 500.0, "position_from": src,
                     "true_x": tx, "true_y": 500.0, "aligned": al})
    rep = tmp_path / "rep"
    rep.mkdir()
    pd.DataFrame(rows).to_csv(rep / "predictions.csv", index=False)
    import sys

    argv, sys.argv = sys.argv, ["patch_truth.py", str(rep), "--coregistration", str(tmp_path / "co.json"), "--out", str(tmp_path / "pt.json")]
    try:
        assert pt.main() == 0
    finally:
        sys.argv = argv
    capsys.readouterr()
    out = json.loads((tmp_path / "pt.json").read_text())
    files = {f["file"]: f for f in out["files"]}
    assert files["175"]["answers_minus_grid_m"] == [20.0, 0.0] and files["175"]["readings_apart_m"] == 0.0 and files["175"]["n"] == 2
    assert files["176"]["answers_minus_grid_m"] == [-10.0, 0.0] and files["176"]["n"] == 2
    by = {(s["queries"], s["stage"]): s for s in out["scores"]}
    # aligned queries: 3 found on the content (20 / 20 / 10 m from the grid) and 1 coarse on the grid
    assert by[("aligned", "refined")]["grid_truth"]["within_25m"] == 1.0
    assert by[("aligned", "refined")]["mi_content_truth"]["within_25m"] == 1.0 and by[("aligned", "refined")]["mi_content_truth"]["median_m"] == 0.0
    assert by[("aligned", "coarse")]["mi_content_truth"]["median_m"] == 20.0  # grid centres lie 20 / 20 / 10 / 20 m from the content
    # non-aligned: one found (10 m west on a file 10 m west: 0 m from the content), one 900 m off
    assert by[("non_aligned", "refined")]["mi_content_truth"]["within_25m"] == 0.5 and by[("non_aligned", "refined")]["n"] == 2


def _response(opt: np.ndarray) -> np.ndarray:
    """The hand-made pairs' SAR response to the optical grey level (see :func:`_pair`)."""
    return np.abs(np.sin(opt / 40.0)) * 254 + 1


def test_tile_register_moves_each_sar_file_by_its_measured_offset(tmp_path: Path, capsys) -> None:
    """`tile.register`: two separate pairs whose SAR content lies 3 px east / 2 px north and
    2 px west of their grids, measured by `cmpc data coregistration`, then read and tiled with
    that record: the SAR read on the map grid matches the optical to within 0.3 px (3.6 and
    2 px without), each aligned SAR patch follows its optical reference's content (correlation
    with the known response > 0.95, against < 0.6 unregistered), dataset.json records the
    offsets; a record without an entry for a pair, or malformed, is one line before any write."""
    from cmpc.cli import main
    from cmpc.config import TileConfig
    from cmpc.data.layout import read_annotations, safe_image_path
    from cmpc.data.mosaic import open_maps
    from cmpc.data.patches import read_patch_array
    from cmpc.data.tiler import tile_pairs
    from cmpc.errors import DataError

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    _pair(pairs, "001", 3.0, 2.0)
    _pair(pairs, "002", -2.0, 0.0, x0=420000.0)
    rec = tmp_path / "co.json"
    assert main(["data", "coregistration", str(pairs), "--search", "5", "--cells", "1", "--out", str(rec)]) == 0
    capsys.readouterr()
    assert json.loads(rec.read_text())["pairs"][0]["crs"] == "EPSG:32611"

    def residual(register: Path | None) -> list[float]:
        out = []
        with open_maps(pairs, "sar", register=register) as sar, open_maps(pairs, "optical") as opt:
            for s, o in zip(sar.sources, opt.sources):
                g = o.grid
                a, av = s.read_on(g, 0, 0, g.height, g.width)
                b, bv = o.read_on(g, 0, 0, g.height, g.width)
                keep = av & bv
                amp = np.where(keep, np.nan_to_num(a[0]), 0.0).astype(np.float32)
                grey = np.where(keep, np.nan_to_num(b.mean(axis=0)), 0.0).astype(np.float32)
                r = co.mi_shift(amp[8:-8, 8:-8], grey[8:-8, 8:-8], search=5, step=1)
                out.append(float(np.hypot(r["col"], r["row"])))
        return out

    before, after = residual(None), residual(rec)
    assert before == [pytest.approx(np.hypot(3, 2), abs=0.4), pytest.approx(2.0, abs=0.4)]
    assert max(after) < 0.3, after

    def patch_corr(root: Path) -> float:
        refs = {a.id: a for a in read_annotations(root, "train", "opt")}
        cs = []
        for q in read_annotations(root, "train", "sar"):
            if q.id not in refs or q.bounds != refs[q.id].bounds:
                continue  # aligned queries only
            s = read_patch_array(safe_image_path(root, "train", "sar", q.file_path))[0]
            o = read_patch_array(safe_image_path(root, "train", "opt", refs[q.id].file_path)).mean(axis=0)
            m = np.isfinite(s) & np.isfinite(o)
            cs.append(np.corrcoef(s[m], _response(o[m]))[0, 1])
        assert len(cs) >= 4
        return float(np.median(cs))

    cfg = dict(patch_px=64, stride_px=32, split="same-area", test_fraction=0.3, non_aligned_per_ref=0.0, nodata_max_frac=0.3)
    plain = tile_pairs(pairs, tmp_path / "plain", TileConfig(**cfg), progress=False)
    reg = tile_pairs(pairs, tmp_path / "reg", TileConfig(**cfg, register=str(rec)), progress=False)
    assert patch_corr(tmp_path / "plain") < 0.6 < 0.95 < patch_corr(tmp_path / "reg")
    shifts = reg["registration"]["sar_shift_m"]
    assert shifts["001"] == [pytest.approx(30.0, abs=3.0), pytest.approx(20.0, abs=3.0)] and shifts["002"][0] == pytest.approx(-20.0, abs=3.0)
    assert json.loads((tmp_path / "reg" / "dataset.json").read_text())["registration"]["record"] == str(rec) and "registration" not in plain
    # scenes cut from the registered dataset read the SAR as the tiler did: the scene's truth
    # footprint on the optical map shows the scene's content
    import rasterio

    from cmpc.data.scenes import cut_scenes

    for root, want in ((tmp_path / "reg", lambda c: c > 0.95), (tmp_path / "plain", lambda c: c < 0.8)):
        scenes = cut_scenes(pairs, root, tmp_path / f"scenes_{root.name}", "train", 1, 3, seed=1)
        assert ("register" in scenes) == (root.name == "reg")
        for sc in scenes["scenes"]:
            truth = json.loads((tmp_path / f"scenes_{root.name}" / f"{sc['name']}.truth.json").read_text())
            with rasterio.open(tmp_path / f"scenes_{root.name}" / truth["scene"]) as f:
                img = f.read(1).astype(np.float64)
            t = truth["transform"]
            box = (t[2], t[5] + t[4] * img.shape[0], t[2] + t[0] * img.shape[1], t[5])
            with open_maps(pairs, "optical") as o:
                grey, ok = o.read_bounds(box, img.shape)
            m = ok & (img > 0)
            assert want(np.corrcoef(img[m], _response(grey.mean(axis=0)[m]))[0, 1]), (root.name, sc["name"])
    # a single pair takes its row of the folder's record (SAR stem 001_sar -> pair 001)
    from cmpc.data.tiler import tile

    one = tile(pairs / "001_sar.tif", pairs / "001_optical.tif", tmp_path / "one", TileConfig(**cfg, register=str(rec)), progress=False)
    assert one["registration"]["sar_shift_m"]["001_sar"] == shifts["001"] and patch_corr(tmp_path / "one") > 0.95
    # refusals: a pair the record does not know, a malformed record; nothing is written
    (tmp_path / "one.json").write_text(json.dumps({"pairs": [{"name": "001", "content_offset_m": [1.0, 2.0]}]}))
    (tmp_path / "bad.json").write_text(json.dumps({"pairs": [{"name": "001", "content_offset_m": [1.0]}]}))
    for path, words in ((tmp_path / "one.json", "no entry for pair '002'"), (tmp_path / "bad.json", "two finite numbers"),
                        (tmp_path / "none.json", "registration file not found")):
        with pytest.raises(DataError, match=words):
            tile_pairs(pairs, tmp_path / "refused", TileConfig(**cfg, register=str(path)), progress=False)
        assert not (tmp_path / "refused").exists()
    capsys.readouterr()
    rc = main(["data", "tile", "--pairs", str(pairs), "--out", str(tmp_path / "cli"), "--patch-px", "64", "--split", "same-area",
               "--register", str(tmp_path / "one.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no entry for pair '002'" in err[0] and not (tmp_path / "cli").exists()


def test_registered_summary_reads_patch_and_scene_reports(tmp_path: Path) -> None:
    """experiments/sentinel/registered.py on hand-made reports: the metrics are copied, and the
    median signed offset of the answers within 100 m of the truth is computed per stage (an
    answer 10 m east of the truth and one 300 m away: the offset is +10 / 0 m)."""
    import pandas as pd

    rg = load_script("experiments/sentinel/registered.py")
    run = tmp_path / "sentinel_card32reg"
    run.mkdir()
    stage = {"recall": {"1": 0.5, "10": 1.0}, "error_m": {"median": 155.0, "within": {"25": 0.5, "100": 0.5}}}
    (run / "metrics.json").write_text(json.dumps({"aligned": {"n_queries": 2, "coarse": stage, "refined": stage}, "non_aligned": {"n_queries": 0}}))
    pd.DataFrame({"aligned": [True, True], "true_x": [0.0, 0.0], "true_y": [0.0, 0.0], "coarse_x": [0.0, 300.0], "coarse_y": [0.0, 0.0],
                  "refined_x": [10.0, 300.0], "refined_y": [0.0, 0.0]}).to_csv(run / "predictions.csv", index=False)
    sc = tmp_path / "scenes" / "sentinel_8x8_h0_reg"
    sc.mkdir(parents=True)
    (sc / "rows.json").write_text(json.dumps({"rows": [{"method": "verify", "n_scenes": 2, "success_5m": 0.0, "success_25m": 0.5, "not_found": 0.0,
                                                        "false_claims": 0.5, "median_m": 70.0}]}))
    pd.DataFrame({"method": ["verify", "verify"], "centre_m": [12.0, 400.0], "dx_m": [-12.0, 400.0], "dy_m": [0.0, 0.0]}).to_csv(sc / "scenes.csv", index=False)
    rows = rg.patch_rows(tmp_path)
    assert [(r["truth"], r["stage"], r["offset_within_100m_m"]) for r in rows] == [("registered (CFOG)", "coarse", [0.0, 0.0]),
                                                                                    ("registered (CFOG)", "refined", [10.0, 0.0])]
    assert rows[0]["r1"] == 0.5 and rows[0]["median_m"] == 155.0 and rows[0]["n_queries"] == 2
    scenes = rg.scene_rows(tmp_path)
    assert len(scenes) == 1 and scenes[0]["success_25m"] == 0.5 and scenes[0]["offset_within_100m_m"] == [-12.0, 0.0]
    assert scenes[0]["scene_polish"] == "none"  # a report without the record: answered before the polish existed
    # the MI-registered scenes answered with the polish: their own row, the mode read from the report
    mi = tmp_path / "scenes" / "sentinel_8x8_h0_reg_mi"
    mi.mkdir()
    (mi / "rows.json").write_text(json.dumps({"meta": {"scene_polish": {"mode": "cfog_refit", "radius_m": 50.0}},
                                              "rows": [{"method": "verify", "n_scenes": 2, "success_5m": 0.5, "success_25m": 1.0, "not_found": 0.0,
                                                        "false_claims": 0.0, "median_m": 4.0}]}))
    pd.DataFrame({"method": ["verify", "verify"], "centre_m": [3.0, 5.0], "dx_m": [1.0, 3.0], "dy_m": [-2.0, 0.0]}).to_csv(mi / "scenes.csv", index=False)
    scenes = rg.scene_rows(tmp_path)
    assert [(r["truth"], r["scene_polish"], r["success_25m"]) for r in scenes] == [("registered (CFOG)", "none", 0.5), ("registered (MI)", "cfog_refit", 1.0)]
    assert scenes[1]["offset_within_100m_m"] == [2.0, -1.0]


def test_register_carries_metres_into_a_mercator_files_own_units(tmp_path: Path, capsys) -> None:
    """A World Mercator pair (1 unit = 0.85 m at 32 N; the working CRS is UTM): the offset
    measured in UTM metres moves the file by the right number of Mercator units (residual under
    0.3 px, from 3.6 px)."""
    from cmpc.cli import main
    from cmpc.data.mosaic import open_maps

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    _pair(pairs, "001", 3.0, 2.0, crs="EPSG:3395", x0=-13_100_000.0)
    rec = tmp_path / "co.json"
    assert main(["data", "coregistration", str(pairs), "--search", "5", "--cells", "1", "--out", str(rec)]) == 0
    capsys.readouterr()
    r = json.loads(rec.read_text())["pairs"][0]
    assert r["crs"].startswith("EPSG:326") and r["gsd_m"] == pytest.approx(10.0 * np.cos(np.radians(32.2)), abs=0.3)
    for register, want in ((None, np.hypot(3, 2)), (rec, 0.0)):
        with open_maps(pairs, "sar", register=register) as sar, open_maps(pairs, "optical") as opt:
            g = opt.sources[0].grid
            a, av = sar.sources[0].read_on(g, 0, 0, g.height, g.width)
            b, bv = opt.sources[0].read_on(g, 0, 0, g.height, g.width)
        keep = av & bv
        amp = np.where(keep, np.nan_to_num(a[0]), 0.0).astype(np.float32)
        grey = np.where(keep, np.nan_to_num(b.mean(axis=0)), 0.0).astype(np.float32)
        s = co.mi_shift(amp[8:-8, 8:-8], grey[8:-8, 8:-8], search=5, step=1)
        assert np.hypot(s["col"], s["row"]) == pytest.approx(want, abs=0.35), (register, s)
