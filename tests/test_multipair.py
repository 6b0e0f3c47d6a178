"""Many scene pairs as maps (cmpc.data.mosaic + the tiler), area-block splits with a buffer
(cmpc.data.splits.BoxPlan), the trainer's validation hold-out from those blocks, and the
Sentinel-1 / Sentinel-2 conversions to the sentinel-la conventions (cmpc.data.sentinel).

Generated pairs (1 m grid, EPSG:32631, 64 x 64 px each; x, y relative to X0, Y0):
001 at x 0..64, y 0..-64; 002 touches it east (x 64..128); 003 overlaps both (x 32..96,
y -32..-96); 004 lies apart (x 500..564). Optical bands: x offset of the pixel centre,
row offset, file number; SAR: the file number. So a patch tells where it was cut and which
file it came from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from tiny_rasters import CRS, X0, Y0, write_tif

from cmpc.config import TileConfig
from cmpc.data.layout import read_annotations, read_dataset_meta, safe_image_path
from cmpc.data.mosaic import MosaicSource, find_pairs, group_pairs, working_crs_of
from cmpc.data.pairs import validation_holdout
from cmpc.data.patches import read_patch_array
from cmpc.data.raster import Grid
from cmpc.data.sentinel import convert_s1, convert_s2, detect_sar_scale
from cmpc.data.splits import TEST, TRAIN, VAL, plan_boxes
from cmpc.data.tiler import tile_pairs
from cmpc.errors import DataError

REPO = Path(__file__).resolve().parents[1]
FILES = {"001": (0, 0), "002": (64, 0), "003": (32, 32), "004": (500, 0)}  # (col, row) offsets, 1 m px
TEST_BOX = [X0 + 64, Y0 - 64, X0 + 128, Y0]  # the file 002
VAL_BOX = [X0 + 500, Y0 - 64, X0 + 564, Y0]  # the separate file 004
BUFFER = 8.0


def _write_pairs(folder: Path, size: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (c0, r0) in FILES.items():
        rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
        t = Affine(1.0, 0.0, X0 + c0, 0.0, -1.0, Y0 - r0)
        opt = np.stack([cols + c0 + 0.5, rows + r0 + 0.5, np.full_like(cols, float(name))])
        write_tif(folder / f"{name}_optical.tif", opt, transform=t)
        write_tif(folder / f"{name}_sar.tif", np.full((1, size, size), float(name), np.float32), transform=t)
    return folder


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multi")
    src = _write_pairs(tmp / "pairs")
    cfg = TileConfig(patch_px=16, stride_px=8, test_blocks=[TEST_BOX], val_blocks=[VAL_BOX], buffer_m=BUFFER, non_aligned_per_ref=1.0)
    root = tmp / "ds"
    return root, tile_pairs(src, root, cfg, progress=False)


# --------------------------------------------------------------------------- pairs and maps


def test_find_pairs_folder_json_csv_and_refusals(tmp_path):
    src = _write_pairs(tmp_path / "p")
    assert [p.name for p in find_pairs(src)] == ["001", "002", "003", "004"]
    (tmp_path / "l.json").write_text(json.dumps([["p/002_sar.tif", "p/002_optical.tif"], {"name": "x", "sar": "p/001_sar.tif", "optical": "p/001_optical.tif"}]))
    assert [(p.name, p.optical.name) for p in find_pairs(tmp_path / "l.json")] == [("002", "002_optical.tif"), ("x", "001_optical.tif")]
    (tmp_path / "l.csv").write_text("sar,optical\np/004_sar.tif,p/004_optical.tif\n")
    assert [p.name for p in find_pairs(tmp_path / "l.csv")] == ["004"]
    (src / "009_sar.tif").write_bytes(b"")
    with pytest.raises(DataError, match="009_sar has no 009_optical.tif partner"):
        find_pairs(src)
    (tmp_path / "bad.json").write_text(json.dumps([["p/001_sar.tif", "p/nope.tif"]]))
    with pytest.raises(DataError, match="missing"):
        find_pairs(tmp_path / "bad.json")


def test_touching_and_overlapping_pairs_form_one_map(tmp_path):
    pairs = find_pairs(_write_pairs(tmp_path / "p"))
    crs, _ = working_crs_of(pairs)
    maps = group_pairs(pairs, crs)
    assert [m.names for m in maps] == [["001", "002", "003"], ["004"]]
    g = maps[0].grid
    assert (g.width, g.height, g.transform.c, g.transform.f, g.res_x) == (128, 96, X0, Y0, 1.0)


def test_overlap_lowest_number_wins_and_reads_are_windowed(tmp_path):
    pairs = find_pairs(_write_pairs(tmp_path / "p"))
    m = group_pairs(pairs, rasterio.crs.CRS.from_user_input(CRS))[0]
    with MosaicSource([p.sar for p in m.pairs], m.names, m.sar_footprints, m.grid, None, "SAR") as src:
        a, v = src.read_on(m.grid, 0, 0, 96, 128)
        assert v[:64, :].all() and v[64:, 32:96].all() and not v[64:, :32].any() and not v[64:, 96:].any()
        assert np.all(a[0, 32:64, 32:64] == 1)  # 001 over 003
        assert np.all(a[0, 32:64, 64:96] == 2)  # 002 over 003
        assert np.all(a[0, 64:96, 32:96] == 3)  # only 003
        # A window away from 001 reads neither 001 nor 002 at all.
        calls = []
        for mem in src.members:
            orig = mem.read_on
            mem.read_on = lambda *a_, _o=orig, _n=mem.path.name, **k: (calls.append(_n), _o(*a_, **k))[1]
        src.read_on(m.grid, 70, 40, 20, 20)
        assert calls == ["003_sar.tif"]


# --------------------------------------------------------------------------- tiling with blocks


def _inside(b, box, eps=1e-6):
    return b[0] >= box[0] - eps and b[1] >= box[1] - eps and b[2] <= box[2] + eps and b[3] <= box[3] + eps


def _meets(b, box, gap):
    return b[0] - gap < box[2] and box[0] < b[2] + gap and b[1] - gap < box[3] and box[1] < b[3] + gap


def test_multi_pair_tiling_blocks_buffer_and_counts(tiled):
    root, s = tiled
    meta = read_dataset_meta(root)
    assert [m["pairs"] for m in meta["maps"]] == [["001", "002", "003"], ["004"]]
    assert meta["areas"]["test"]["boxes"] == [TEST_BOX] and meta["areas"]["val"]["boxes"] == [VAL_BOX]
    tr_opt, te_opt = read_annotations(root, "train", "opt"), read_annotations(root, "test", "opt")
    tr_sar, te_sar = read_annotations(root, "train", "sar"), read_annotations(root, "test", "sar")
    # Test block = file 002 (64 x 64 m): a 7 x 7 grid of 16 m patches at stride 8 m.
    assert len(te_opt) == 49 and all(_inside(a.bounds, TEST_BOX) for a in te_opt + te_sar)
    val = [a for a in tr_opt if _inside(a.bounds, VAL_BOX)]
    assert len(val) == 49 == s["counts"]["val"]["opt"]
    train = [a for a in tr_opt + tr_sar if not _inside(a.bounds, VAL_BOX)]
    # Nothing of training comes within the buffer of a test or validation block.
    assert train and not any(_meets(a.bounds, box, BUFFER - 1e-6) for a in train for box in (TEST_BOX, VAL_BOX))
    # Map 1 (001..003 minus the test block, the buffer and straddlers): train grid cols x 0..40 (6) x rows 0..80 ...
    # counted directly: footprints inside the map data and >= 8 m from x=64 (the test block's west edge).
    assert s["counts"]["train"]["opt"] == len(tr_opt) == 49 + len([a for a in tr_opt if not _inside(a.bounds, VAL_BOX)])
    # Unique ids: train/ first, then test/.
    assert [a.id for a in tr_opt] == list(range(len(tr_opt)))
    assert [a.id for a in te_opt] == list(range(len(tr_opt), len(tr_opt) + 49))
    # Positions: optical band 1 / 2 are the pixel-centre offsets from X0 / Y0.
    for a in (tr_opt[0], te_opt[0], val[0]):
        arr = read_patch_array(safe_image_path(root, "train" if a in tr_opt else "test", "opt", a.file_path))
        assert arr[0].mean() == pytest.approx(a.x - X0) and arr[1].mean() == pytest.approx(Y0 - a.y)


def test_file_crossing_a_block_is_cut_and_overlaps_follow_the_rule(tiled):
    root, _ = tiled
    # File 003 crosses the test block's west and south edges (x = 64, y = -64): its patches
    # inside are test, those straddling an edge or within the 8 m buffer are dropped, the
    # rest (west of x = 56 or south of y = -72) train.
    te = read_annotations(root, "test", "sar")
    tr = [a for a in read_annotations(root, "train", "sar") if not _inside(a.bounds, VAL_BOX)]
    assert all(a.bounds[0] >= X0 + 64 and a.bounds[1] >= Y0 - 64 for a in te)
    assert all(a.bounds[2] <= X0 + 64 - BUFFER or a.bounds[3] <= Y0 - 64 - BUFFER for a in tr)
    assert any(a.bounds[0] >= X0 + 64 for a in tr)  # 003 south of the block trains
    for split, anns in (("test", te), ("train", tr)):
        for a in anns:
            if not a.aligned:
                continue
            v = read_patch_array(safe_image_path(root, split, "sar", a.file_path))[0]
            x0, y1 = a.bounds[0] - X0, Y0 - a.bounds[3]  # footprint's west x, north row offset
            want = 1 if (x0 < 64 and y1 < 64) else (2 if y1 < 64 else 3)
            if x0 + 16 <= 64 or x0 >= 64:  # wholly inside one file's columns
                if y1 + 16 <= 64 or y1 >= 64:
                    assert np.all(v == want), (split, a.bounds)


def test_trainer_validation_comes_from_the_val_block(tiled):
    root, _ = tiled
    refs = read_annotations(root, "train", "opt")
    split = validation_holdout(read_dataset_meta(root), refs, 0.1)
    assert sorted(split.val.tolist()) == [i for i, a in enumerate(refs) if _inside(a.bounds, VAL_BOX)]
    assert len(split.buffer) == 0 and len(split.train) + len(split.val) == len(refs)
    # Without named blocks: the west-end hold-out as before.
    assert len(validation_holdout({}, refs, 0.25).val) == round(0.25 * len(refs))


def test_box_plan_by_hand():
    g = Grid(rasterio.crs.CRS.from_user_input(CRS), Affine(1.0, 0, 0.0, 0, -1.0, 100.0), 100, 100)
    plan = plan_boxes((0, 0, 100, 100), 10, 10, g, [[50, 0, 100, 100]], [[0, 0, 20, 20]], 10.0)
    tops, lefts, codes = plan.reference_grid()
    # 10 x 10 grid of 10 m patches: test = cols 50..90 (5 x 10); val = x 0..20, y 0..20 (2 x 2);
    # train: x <= 40 - 10 = 30 (cols 0..30: 4 x 10) minus those within 10 m of the val box (cols 0..20 / rows y < 30: 3 x 3).
    assert (codes == TEST).sum() == 50 and (codes == VAL).sum() == 4 and (codes == TRAIN).sum() == 40 - 9
    with pytest.raises(DataError, match="within tile.buffer_m"):
        plan_boxes((0, 0, 100, 100), 10, 10, g, [[50, 0, 100, 100]], [[0, 0, 45, 20]], 10.0)
    with pytest.raises(DataError, match="not a box"):
        plan_boxes((0, 0, 100, 100), 10, 10, g, [[50, 0, 40, 100]], None, 10.0)


def test_cli_tiles_a_folder_of_pairs(tmp_path):
    src = _write_pairs(tmp_path / "pairs")
    exp = tmp_path / "e.json"
    exp.write_text(json.dumps({"tile": {"patch_px": 16, "test_blocks": [TEST_BOX], "buffer_m": 8}}))
    r = subprocess.run([sys.executable, "-m", "cmpc", "data", "tile", str(exp), "--pairs", str(src), "--out", str(tmp_path / "ds")],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["counts"]["test"]["opt"] == 49
    bad = subprocess.run([sys.executable, "-m", "cmpc", "data", "tile", str(exp), "--pairs", str(tmp_path / "none"), "--out", str(tmp_path / "d2")],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "scene pairs not found" in bad.stderr


# --------------------------------------------------------------------------- conversions


def _s1(tmp: Path, name: str, data: np.ndarray, gsd: float = 10.0) -> Path:
    t = Affine(gsd, 0, X0, 0, -gsd, Y0)
    return write_tif(tmp / name, data[None], transform=t)


def _amplitude(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sqrt(rng.gamma(4.0, 0.01 / 4.0, size=(64, 64)) * rng.lognormal(0, 0.8, size=(64, 64))).astype(np.float64)


def test_s1_amplitude_intensity_and_db_give_the_same_bytes(tmp_path):
    amp = _amplitude()
    outs = []
    for name, data, scale in (
        ("a_vh.tif", (amp * 1000).astype(np.uint16), "amplitude"),  # GRD digital numbers
        ("i_vh.tif", (amp * 1000).astype(np.uint16).astype(np.float64) ** 2 / 1e6, "intensity"),
        ("d_vh.tif", 20 * np.log10((amp * 1000).astype(np.uint16).astype(np.float64) / 1000), "db"),
    ):
        p = _s1(tmp_path, name, data.astype(np.float32) if data.dtype != np.uint16 else data)
        facts = convert_s1(p, tmp_path / f"out_{name}")
        assert facts["scale"] == scale and facts["polarisation"] == "VH"
        outs.append(rasterio.open(tmp_path / f"out_{name}").read(1))
    a = (amp * 1000).astype(np.uint16).astype(np.float64)
    a = a[a > 0]
    want = np.clip(np.rint(255 * (amp * 1000).astype(np.uint16).astype(np.float64) / np.percentile(a, 99)), 1, 255)
    for o in outs:
        assert np.abs(o.astype(int) - want).max() <= 1  # float32 rounding of the inputs
    assert 0.005 < np.mean(outs[0] == 255) < 0.02  # ~1 % clipped, as in sentinel-la


def test_s1_refusals_are_one_line(tmp_path, capsys):
    db = _s1(tmp_path, "s_vh.tif", (20 * np.log10(_amplitude())).astype(np.float32))
    with pytest.raises(DataError, match="looks like dB"):
        convert_s1(db, tmp_path / "o.tif", scale="amplitude")
    vv = _s1(tmp_path, "s1a-iw-grd-vv-x.tif", (_amplitude() * 1000).astype(np.uint16))
    with pytest.raises(DataError, match="is VV but VH was asked"):
        convert_s1(vv, tmp_path / "o.tif")
    coarse = _s1(tmp_path, "c_vh.tif", (_amplitude() * 1000).astype(np.uint16), gsd=30.0)
    with pytest.raises(DataError, match="30.0 m/px"):
        convert_s1(coarse, tmp_path / "o.tif")
    convert_s1(coarse, tmp_path / "o.tif", force=True)
    assert "warning:" in capsys.readouterr().err
    r = subprocess.run([sys.executable, "-m", "cmpc", "data", "convert-s1", str(vv), str(tmp_path / "o2.tif")],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error:")
    assert detect_sar_scale(np.array([-20.0, -15.0, -5.0]), "float32")[0] == "db"
    assert detect_sar_scale(np.array([0.01, 0.02, 0.5]), "float32")[0] == "intensity"


def test_s2_any_band_order_to_rgb_uint8(tmp_path, capsys):
    rng = np.random.default_rng(1)
    dn = rng.integers(200, 3000, size=(4, 32, 32)).astype(np.uint16)  # B02, B03, B04, B08
    p = write_tif(tmp_path / "s2.tif", dn, transform=Affine(10, 0, X0, 0, -10, Y0))
    convert_s2(p, tmp_path / "rgb.tif", bands="B2,B03,B04,B8")
    with rasterio.open(tmp_path / "rgb.tif") as o:
        out = o.read()
        assert o.descriptions == ("B04", "B03", "B02") and o.nodata == 0
    want = np.clip(np.rint(255 * (dn[[2, 1, 0]] / 10000) / 0.2), 1, 255)
    assert np.abs(out.astype(int) - want).max() <= 1 and np.mean(out == want) > 0.99  # ties at .5 may round either way
    convert_s2(p, tmp_path / "rgb2.tif", bands="B02,B03,B04,B08", level="L2A", dn_offset=1000)
    assert "L2A" in capsys.readouterr().err
    with pytest.raises(DataError, match="lacks B04"):
        convert_s2(p, tmp_path / "x.tif", bands="B02,B03,B05,B08")
    with pytest.raises(DataError, match="without names"):
        convert_s2(p, tmp_path / "x.tif")


# --------------------------------------------------------------------------- real data


def test_real_sentinel_la_overlaps_and_histogram(real_data):
    folder = real_data / "sentinel-la"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    pairs = [p for p in find_pairs(folder) if p.name in ("063", "076", "163", "161")]
    crs, reason = working_crs_of(pairs)
    assert crs.to_epsg() == 32611 and "EPSG:3395" in reason
    maps = group_pairs(pairs, crs)
    assert [m.names for m in maps] == [["063", "076", "163"], ["161"]]  # 063/076 overlap 163; 161 is apart
    m = maps[0]
    assert m.grid.res_x == pytest.approx(8.3, abs=0.05)
    # In the 063 / 163 overlap the lower number (063) wins: equal to 063 read alone.
    both = MosaicSource([p.sar for p in m.pairs], m.names, m.sar_footprints, m.grid, None, "SAR")
    alone = MosaicSource([m.pairs[0].sar], ["063"], m.sar_footprints[:1], m.grid, None, "SAR")
    with both, alone:
        inter = m.footprints[0].intersection(m.footprints[2]).bounds
        g = m.grid
        col, row = int((inter[0] - g.transform.c) / g.res_x) + 2, int((g.transform.f - inter[3]) / g.res_y) + 2
        a, va = both.read_on(g, row, col, 64, 64)
        b, vb = alone.read_on(g, row, col, 64, 64)
        assert vb.mean() > 0.9 and np.array_equal(a[:, vb], b[:, vb])
    # Histogram evidence (docs/SENTINEL.md): no zeros (not a min-max scaled dB image),
    # right-skewed values, near-Gaussian log (linear amplitude before scaling).
    with rasterio.open(folder / "063_sar.tif") as src:
        v = src.read(1).astype(np.float64).ravel()
    assert v.min() > 0
    skew = lambda x: float(np.mean((x - x.mean()) ** 3) / x.std() ** 3)  # noqa: E731
    core = v[v < 255]
    assert skew(core) > 0.3 and skew(20 * np.log10(core)) < 0.0


def test_maps_source_composites_pairs_by_footprint(tmp_path, tiled):
    # the scene cutter reads a multi-pair dataset's SAR by footprint, across files and maps
    from cmpc.data.mosaic import open_maps
    from cmpc.data.scenes import cut_scenes

    src_dir = _write_pairs(tmp_path / "pairs")
    with open_maps(src_dir, "sar", crs=CRS) as maps:
        assert len(maps.sources) == 2  # 001-003 touch; 004 stands apart
        a, v = maps.read_bounds((X0 + 48, Y0 - 16, X0 + 80, Y0), (16, 32))
        assert v.all()
        assert np.allclose(a[0, :, :16], 1.0) and np.allclose(a[0, :, 16:], 2.0)  # 001 | 002
        a, v = maps.read_bounds((X0 + 500, Y0 - 8, X0 + 508, Y0), (8, 8))
        assert v.all() and np.allclose(a, 4.0)  # the separate map
        a, v = maps.read_bounds((X0 + 300, Y0 - 8, X0 + 308, Y0), (8, 8))
        assert not v.any()  # between the maps: nothing
    root, _ = tiled
    rec = cut_scenes(src_dir, root, tmp_path / "scenes", "test", 1, 3, 0.0, seed=0, boxes=[[X0 + 64, Y0 - 64, X0 + 128, Y0]])
    import rasterio as rio

    for s in rec["scenes"]:
        with rio.open(tmp_path / "scenes" / f"{s['name']}.tif") as f:
            assert np.allclose(f.read(), 2.0) and f.dtypes[0] == maps.source_dtype  # inside file 002, in the files' type
