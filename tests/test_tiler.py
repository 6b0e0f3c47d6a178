"""The GeoTIFF tiler on tiny generated rasters with known content (positions, ids, near_id,
splits, nodata skipping, PNG vs GeoTIFF, footprints.gpkg, atomic output, bad input)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
from affine import Affine
from pyproj import Transformer
from rasterio.warp import transform_bounds
from tiny_rasters import CRS, X0, Y0, coord_bands, make_pair, optical_u8, write_tif

from cmpc.cli import main
from cmpc.config import TileConfig
from cmpc.data.layout import read_annotations, read_dataset_meta, safe_image_path
from cmpc.data.patches import read_patch_array
from cmpc.data.tiler import tile
from cmpc.errors import DataError


def _tile(tmp_path: Path, sar: Path, opt: Path, name: str = "ds", **kw) -> tuple[Path, dict]:
    root = tmp_path / name
    cfg = TileConfig(**{"patch_px": 16, **kw})
    return root, tile(sar, opt, root, cfg, progress=False)


def _anns(root: Path) -> dict[tuple[str, str], list]:
    return {(s, m): read_annotations(root, s, m) for s in ("train", "test") for m in ("opt", "sar")}


def _dist(a, b) -> float:
    return float(np.hypot(a.x - b.x, a.y - b.y))


# --------------------------------------------------------------------------- cross-area


@pytest.fixture(scope="module")
def cross(tmp_path_factory):
    """64 x 96 px at 1 m, 16 px patches, stride 8, east 24 px test strip, 16 px buffer."""
    tmp = tmp_path_factory.mktemp("cross")
    sar, opt = make_pair(tmp)
    root, summary = _tile(tmp, sar, opt)
    return root, summary, _anns(root)


def test_cross_area_counts_ids_positions(cross):
    root, summary, anns = cross
    # train area: cols [0, 56) -> grid cols 0..40 (6) x rows 0..48 (7); test: cols [72, 96) -> 72, 80 (2) x 7
    assert summary["counts"] == {
        "train": {"opt": 42, "sar": 84, "sar_aligned": 42, "sar_non_aligned": 42},
        "test": {"opt": 14, "sar": 28, "sar_aligned": 14, "sar_non_aligned": 14},
    }
    tr, te = anns["train", "opt"], anns["test", "opt"]
    assert [a.id for a in tr] == list(range(42)) and [a.id for a in te] == list(range(42, 56))
    assert [a.name for a in tr] == [str(i) for i in range(42)]
    assert [a.file_path for a in te[:2]] == ["0.png", "1.png"]
    assert (tr[0].x, tr[0].y) == (X0 + 8, Y0 - 8)
    assert (tr[7].x, tr[7].y) == (X0 + 16, Y0 - 16)  # grid row 1, col 1
    assert (te[0].x, te[0].y) == (X0 + 80, Y0 - 8)
    assert (te[13].x, te[13].y) == (X0 + 88, Y0 - 56)
    assert tr[0].bounds == (X0, Y0 - 16, X0 + 16, Y0)
    assert tr[0].crs == "EPSG:32631" and tr[0].gsd == 1.0 and tr[0].aligned is None
    # near_id: nearest first, ties by lower id, own id first
    assert tr[0].near_id == [0, 1, 6, 7, 2, 12, 8, 13]
    assert te[0].near_id == [42, 43, 44, 45, 46, 47, 48, 49]


def test_cross_area_patch_content_matches_positions(cross):
    root, _, anns = cross
    for split in ("train", "test"):
        for a in anns[split, "opt"]:
            c, r = int(a.bounds[0] - X0), int(Y0 - a.bounds[3])
            arr = read_patch_array(safe_image_path(root, split, "opt", a.file_path))
            assert arr.shape == (3, 16, 16)
            np.testing.assert_array_equal(arr[0, 0], np.arange(c, c + 16))
            np.testing.assert_array_equal(arr[1, :, 0], np.arange(r, r + 16))
        for a in anns[split, "sar"]:
            path = safe_image_path(root, split, "sar", a.file_path)
            assert path.suffix == ".tif"
            with rasterio.open(path) as src:
                assert src.crs.to_epsg() == 32631 and src.dtypes == ("float32", "float32")
                assert tuple(src.bounds) == a.bounds
                arr = src.read()
            # the SAR bands are coordinates: the patch content says where it was cut
            assert arr[0].mean() == pytest.approx(a.x - X0, abs=1e-4)
            assert arr[1].mean() == pytest.approx(Y0 - a.y, abs=1e-4)


def test_cross_area_queries_and_split_buffer(cross):
    root, _, anns = cross
    for split in ("train", "test"):
        refs = anns[split, "opt"]
        by_id = {a.id: a for a in refs}
        sar = anns[split, "sar"]
        aligned = [a for a in sar if a.aligned]
        assert sorted(a.id for a in aligned) == sorted(by_id)
        for a in aligned:
            assert (a.x, a.y) == (by_id[a.id].x, by_id[a.id].y) and a.near_id == by_id[a.id].near_id
        for q in (a for a in sar if not a.aligned):
            d = np.array([_dist(q, r) for r in refs])
            best = min(r.id for r, dd in zip(refs, d) if dd == d.min())  # brute force, ties -> lower id
            assert q.id == best == q.near_id[0]
            dq = [_dist(q, by_id[i]) for i in q.near_id]
            assert dq == sorted(dq) and len(q.near_id) == 8
    # spatially disjoint, with the buffer: every test footprint >= 16 m east of every train one
    train_maxx = max(a.bounds[2] for m in ("opt", "sar") for a in anns["train", m])
    test_minx = min(a.bounds[0] for m in ("opt", "sar") for a in anns["test", m])
    assert train_maxx <= X0 + 56 and test_minx >= X0 + 72 and test_minx - train_maxx >= 16


def test_cross_area_meta_and_footprints(cross):
    root, summary, anns = cross
    meta = read_dataset_meta(root)
    assert meta["crs"] == "EPSG:32631" and meta["gsd_m"] == 1.0
    assert (meta["patch_px"], meta["patch_m"], meta["stride_px"], meta["buffer_px"]) == (16, 16.0, 8, 16)
    assert meta["split"] == "cross-area"
    assert meta["areas"]["train"]["bounds"] == [X0, Y0 - 64, X0 + 56, Y0]
    assert meta["areas"]["test"]["bounds"] == [X0 + 72, Y0 - 64, X0 + 96, Y0]
    assert meta["modalities"]["opt"] == {
        "bands": [1, 2, 3], "band_descriptions": [None, None, None], "channels": 3,
        "dtype": "uint8", "source_dtype": "uint8", "format": "png",
    }
    assert meta["modalities"]["sar"]["format"] == "tif" and meta["modalities"]["sar"]["channels"] == 2
    assert meta["tile_config"] == {**TileConfig(patch_px=16).__dict__}
    layers = {name for name, _ in pyogrio.list_layers(root / "footprints.gpkg")}
    assert layers == {"train_opt", "train_sar", "test_opt", "test_sar"}
    import geopandas as gpd

    for (split, mode), lst in anns.items():
        gdf = gpd.read_file(root / "footprints.gpkg", layer=f"{split}_{mode}")
        assert gdf.crs.to_epsg() == 32631
        assert list(gdf["id"]) == [a.id for a in lst] and list(gdf["name"]) == [a.name for a in lst]
        np.testing.assert_allclose(gdf.geometry.bounds.to_numpy(), np.array([a.bounds for a in lst]))
        if mode == "sar":
            assert list(gdf["aligned"]) == [a.aligned for a in lst]


def test_block_size_does_not_change_the_dataset(tmp_path, cross):
    """Reading in 16 px blocks gives exactly the dataset read in one block."""
    root, _, anns = cross
    sar, opt = make_pair(tmp_path)
    small, _ = _tile(tmp_path, sar, opt, name="small", block_px=16)
    anns2 = _anns(small)
    for key, lst in anns.items():
        assert [a.to_json() for a in anns2[key]] == [a.to_json() for a in lst]
        for a in lst[::5]:
            np.testing.assert_array_equal(
                read_patch_array(safe_image_path(small, key[0], key[1], a.file_path)),
                read_patch_array(safe_image_path(root, key[0], key[1], a.file_path)),
            )


# --------------------------------------------------------------------------- other protocols


def test_same_area_shares_references(tmp_path):
    sar, opt = make_pair(tmp_path)
    root, summary = _tile(tmp_path, sar, opt, split="same-area", test_fraction=0.3, seed=3)
    anns = _anns(root)
    tr, te = anns["train", "opt"], anns["test", "opt"]
    assert len(tr) == 7 * 11  # grid over the whole 96 px width: cols 0..80
    assert [a.to_json() for a in tr] == [a.to_json() for a in te]
    assert (root / "train/imgs/opt/5.png").read_bytes() == (root / "test/imgs/opt/5.png").read_bytes()
    al_tr = [a.id for a in anns["train", "sar"] if a.aligned]
    al_te = [a.id for a in anns["test", "sar"] if a.aligned]
    assert sorted(al_tr + al_te) == list(range(77))  # every reference's aligned query, in one split
    n_non = sum(1 for s in ("train", "test") for a in anns[s, "sar"] if not a.aligned)
    assert n_non == 77
    n_test = len(anns["test", "sar"])
    assert 0.15 * 154 < n_test < 0.45 * 154
    assert summary["buffer_px"] is None and summary["areas"]["train"] == summary["areas"]["test"]


def test_only_non_aligned_queries_and_no_near_ids(tmp_path):
    sar, opt = make_pair(tmp_path)
    root, summary = _tile(tmp_path, sar, opt, aligned=False, non_aligned_per_ref=0.5, near_k=0)
    # half a query per reference: round(0.5 * 42) train, round(0.5 * 14) test
    assert summary["counts"]["train"] == {"opt": 42, "sar": 21, "sar_aligned": 0, "sar_non_aligned": 21}
    assert summary["counts"]["test"] == {"opt": 14, "sar": 7, "sar_aligned": 0, "sar_non_aligned": 7}
    refs = read_annotations(root, "test", "opt")
    for q in read_annotations(root, "test", "sar"):
        assert q.near_id == [] and q.aligned is False
        d = {r.id: _dist(q, r) for r in refs}
        assert d[q.id] == min(d.values())  # the id is still the nearest reference


def test_cross_area_blocks_keep_the_buffer(tmp_path):
    h, w = 96, 128
    opt = write_tif(tmp_path / "o.tif", optical_u8(h, w))
    sar = write_tif(tmp_path / "s.tif", coord_bands(h, w))
    root, summary = _tile(tmp_path, sar, opt, block_m=32.0, test_fraction=0.3, seed=1)
    assert summary["block_px"] == 32
    test_boxes = np.array(summary["areas"]["test"]["boxes"])
    area = ((test_boxes[:, 2] - test_boxes[:, 0]) * (test_boxes[:, 3] - test_boxes[:, 1])).sum()
    assert 0.3 * h * w <= area < 0.3 * h * w + 32 * 32  # blocks added until the fraction is reached
    anns = _anns(root)
    train = np.array([a.bounds for m in ("opt", "sar") for a in anns["train", m]])
    test = np.array([a.bounds for m in ("opt", "sar") for a in anns["test", m]])
    assert len(train) and len(test)
    # gap between every train and every test footprint (Chebyshev box distance) >= 16 m
    gx = np.maximum(test[:, None, 0] - train[None, :, 2], train[None, :, 0] - test[:, None, 2])
    gy = np.maximum(test[:, None, 1] - train[None, :, 3], train[None, :, 1] - test[:, None, 3])
    assert np.maximum(gx, gy).min() >= 16
    # test footprints lie inside the union of test blocks: each corner is in some test block
    for b in test:
        for x, y in ((b[0], b[1]), (b[0], b[3]), (b[2], b[1]), (b[2], b[3])):
            assert ((test_boxes[:, 0] <= x) & (x <= test_boxes[:, 2]) & (test_boxes[:, 1] <= y) & (y <= test_boxes[:, 3])).any()


# --------------------------------------------------------------------------- nodata, formats


def test_nodata_in_sar_skips_reference_and_its_query(tmp_path):
    data = coord_bands(64, 96)
    data[:, :16, :16] = np.nan
    data[0, 20, 20] = np.inf
    sar = write_tif(tmp_path / "s.tif", data)
    opt = write_tif(tmp_path / "o.tif", optical_u8(64, 96))
    root, summary = _tile(tmp_path, sar, opt)
    anns = _anns(root)
    tr = anns["train", "opt"]
    # refs at (0,0), (0,8), (8,0), (8,8) have 100, 50, 50, 25 % NaN > 20 %: skipped
    assert len(tr) == 38 and [a.id for a in tr] == list(range(38))
    assert summary["skipped_nodata"]["references"] == 4
    assert (tr[0].x, tr[0].y) == (X0 + 24, Y0 - 8)  # first kept: row 0, col 16
    corners = {(a.bounds[0] - X0, Y0 - a.bounds[3]) for a in tr}
    assert not corners & {(0, 0), (8, 0), (0, 8), (8, 8)}
    assert len([a for a in anns["train", "sar"] if a.aligned]) == 38
    for q in anns["train", "sar"]:  # no kept query has more than 20 % of the NaN square
        c, r = q.bounds[0] - X0, Y0 - q.bounds[3]
        overlap = max(0, 16 - c) * max(0, 16 - r) + (1 if (r <= 20 < r + 16 and c <= 20 < c + 16) else 0)
        assert overlap <= 0.2 * 256


def test_declared_optical_nodata_is_skipped(tmp_path):
    o = optical_u8(64, 96)
    o[:, 48:, 80:] = 255
    opt = write_tif(tmp_path / "o.tif", o, nodata=255)
    sar = write_tif(tmp_path / "s.tif", coord_bands(64, 96))
    root, summary = _tile(tmp_path, sar, opt)
    te = read_annotations(root, "test", "opt")
    assert len(te) == 10 and summary["skipped_nodata"]["references"] == 4
    assert (X0 + 80, Y0 - 64) not in {(a.bounds[0], a.bounds[1]) for a in te}


def test_uint16_optical_and_uint8_sar_formats(tmp_path):
    opt = write_tif(tmp_path / "o.tif", (optical_u8(64, 96).astype(np.uint16) * 100), nodata=0)
    sar = write_tif(tmp_path / "s.tif", coord_bands(64, 96).astype(np.uint8)[:1])
    root, summary = _tile(tmp_path, sar, opt)
    assert summary["modalities"]["opt"]["format"] == "tif" and summary["modalities"]["opt"]["dtype"] == "uint16"
    assert summary["modalities"]["sar"]["format"] == "png" and summary["modalities"]["sar"]["channels"] == 1
    a = read_annotations(root, "train", "opt")[9]  # grid row 1, col 3: x 24..40, y rows 8..24
    with rasterio.open(safe_image_path(root, "train", "opt", a.file_path)) as src:
        assert src.dtypes[0] == "uint16" and src.nodata == 0
        np.testing.assert_array_equal(src.read(1)[0], np.arange(24, 40) * 100)
    q = read_annotations(root, "train", "sar")[9]
    assert q.file_path == "9.png"
    arr = read_patch_array(safe_image_path(root, "train", "sar", q.file_path))
    assert arr.shape == (1, 16, 16)
    np.testing.assert_array_equal(arr[0, 0], np.arange(24, 40))  # uint8(col + 0.5) == col


def test_coarser_sar_is_resampled_onto_the_optical_grid(tmp_path):
    opt = write_tif(tmp_path / "o.tif", optical_u8(64, 96))
    sar = write_tif(tmp_path / "s.tif", coord_bands(32, 48, scale=2.0), transform=Affine(2.0, 0, X0, 0, -2.0, Y0))
    root, _ = _tile(tmp_path, sar, opt)
    checked = 0
    for q in read_annotations(root, "train", "sar"):
        if q.bounds[0] < X0 + 1 or q.bounds[3] > Y0 - 1 or q.bounds[2] > X0 + 95 or q.bounds[1] < Y0 - 63:
            continue  # the outer half metre is extrapolated by clamping at the raster edge
        with rasterio.open(safe_image_path(root, "train", "sar", q.file_path)) as src:
            arr = src.read()
            assert src.res == (1.0, 1.0)
        assert arr[0].mean() == pytest.approx(q.x - X0, abs=1e-3)
        assert arr[1].mean() == pytest.approx(Y0 - q.y, abs=1e-3)
        checked += 1
    assert checked > 25


def test_geographic_pair_is_tiled_in_utm(tmp_path):
    """Both rasters in EPSG:4326 on slightly different grids (like the UAVSAR sample)."""
    lon0, lat0, res = 3.0, 45.0, 0.0001
    for name, off, n in (("o", 0.0, 100), ("s", 0.00003, 96)):
        rows, cols = np.mgrid[0:n, 0:n].astype(np.float64)
        lon = lon0 + off + (cols + 0.5) * res
        lat = lat0 - off - (rows + 0.5) * res
        data = np.stack([(lon - lon0) * 1e4, (lat0 - lat) * 1e4]).astype(np.float32)
        if name == "o":
            data = np.clip(data * 2.5, 0, 250).astype(np.uint8)
        write_tif(tmp_path / f"{name}.tif", data, crs="EPSG:4326", transform=Affine(res, 0, lon0 + off, 0, -res, lat0 - off))
    root, summary = _tile(tmp_path, tmp_path / "s.tif", tmp_path / "o.tif")
    # GDAL picks square pixels between the 7.9 m (lon) and 11.1 m (lat) sizes of 0.0001 degree
    assert summary["crs"] == "EPSG:32631" and 7.8 < summary["gsd_m"] < 11.2
    to_ll = Transformer.from_crs("EPSG:32631", "EPSG:4326", always_xy=True)
    minx, miny, maxx, maxy = transform_bounds("EPSG:4326", "EPSG:32631", lon0, lat0 - 100 * res, lon0 + 100 * res, lat0)
    assert minx == pytest.approx(500_000, abs=1e-3)  # 3 E is the central meridian of zone 31
    assert 4_981_839 < miny < 4_981_840 and 4_982_950 < maxy < 4_982_951
    for split in ("train", "test"):
        for q in read_annotations(root, split, "sar"):
            assert minx < q.bounds[0] and q.bounds[2] < maxx and miny < q.bounds[1] and q.bounds[3] < maxy
            lon, lat = to_ll.transform(q.x, q.y)
            arr = read_patch_array(safe_image_path(root, split, "sar", q.file_path))
            assert abs(lon0 + arr[0].mean() / 1e4 - lon) < 0.1 * res
            assert abs(lat0 - arr[1].mean() / 1e4 - lat) < 0.1 * res


# --------------------------------------------------------------------------- bad input, via the CLI


def _cli(capsys, *args: str) -> tuple[int, str]:
    rc = main(["data", "tile", *args])
    err = capsys.readouterr().err.strip()
    return rc, err


def _assert_failed(rc: int, err: str, root: Path, *needles: str) -> None:
    assert rc == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    for n in needles:
        assert n in err, err
    assert not root.exists()
    assert not list(root.parent.glob(f".{root.name}*"))  # no temporary folder left behind


def _args(sar: Path, opt: Path, root: Path, *extra: str) -> list[str]:
    return ["--sar", str(sar), "--optical", str(opt), "--out", str(root), "--patch-px", "16", *extra]


def test_cli_tiles_and_reports(tmp_path, capsys):
    sar, opt = make_pair(tmp_path)
    root = tmp_path / "ds"
    rc, _ = _cli(capsys, *_args(sar, opt, root))
    assert rc == 0 and read_dataset_meta(root)["counts"]["train"]["opt"] == 42


def test_cli_corrupt_sar(tmp_path, capsys):
    _, opt = make_pair(tmp_path)
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00garbage" * 50)
    rc, err = _cli(capsys, *_args(bad, opt, tmp_path / "ds"))
    _assert_failed(rc, err, tmp_path / "ds", "cannot open the SAR raster", "bad.tif")


def test_cli_truncated_optical(tmp_path, capsys):
    sar, _ = make_pair(tmp_path)
    full = write_tif(tmp_path / "full.tif", optical_u8(64, 96), block=16)
    cut = tmp_path / "cut.tif"
    cut.write_bytes(full.read_bytes()[:-5000])
    rc, err = _cli(capsys, *_args(sar, cut, tmp_path / "ds"))
    _assert_failed(rc, err, tmp_path / "ds", "optical raster", "cut.tif is truncated")


def test_cli_no_overlap(tmp_path, capsys):
    opt = write_tif(tmp_path / "o.tif", optical_u8(64, 96))
    sar = write_tif(tmp_path / "s.tif", coord_bands(64, 96), transform=Affine(1.0, 0, X0 + 10_000, 0, -1.0, Y0))
    rc, err = _cli(capsys, *_args(sar, opt, tmp_path / "ds"))
    _assert_failed(rc, err, tmp_path / "ds", "do not overlap", "510000.0", "500000.0", "EPSG:32631")


def test_cli_crs_mismatch_then_reproject(tmp_path, capsys):
    opt = write_tif(tmp_path / "o.tif", optical_u8(64, 96))
    # the same place in EPSG:4326, a little larger than the optical footprint
    w, s, e, n = transform_bounds(CRS, "EPSG:4326", X0 - 10, Y0 - 74, X0 + 106, Y0 + 10)
    res = (e - w) / 100
    sar = write_tif(tmp_path / "s.tif", coord_bands(int((n - s) / res) + 1, 100), crs="EPSG:4326", transform=Affine(res, 0, w, 0, -res, n))
    rc, err = _cli(capsys, *_args(sar, opt, tmp_path / "ds"))
    _assert_failed(rc, err, tmp_path / "ds", "CRS mismatch", "EPSG:4326", "EPSG:32631", "reproject")
    rc, err = _cli(capsys, *_args(sar, opt, tmp_path / "ds", "--reproject"))
    assert rc == 0, err
    meta = read_dataset_meta(tmp_path / "ds")
    assert meta["crs"] == "EPSG:32631" and meta["sources"]["sar"]["source_crs"] == "EPSG:4326"
    assert meta["counts"]["train"]["opt"] == 42  # the whole optical raster is covered


def test_cli_band_index_beyond_raster(tmp_path, capsys):
    sar, opt = make_pair(tmp_path)
    rc, err = _cli(capsys, *_args(sar, opt, tmp_path / "ds", "--sar-bands", "1", "3"))
    _assert_failed(rc, err, tmp_path / "ds", "band index 3 is beyond the SAR raster sar.tif", "2 band(s)")


def test_cli_band_count_differs_from_model(tmp_path, capsys):
    sar, opt = make_pair(tmp_path)
    rc, err = _cli(capsys, *_args(sar, opt, tmp_path / "ds", "--set", "model.sar_channels=4"))
    _assert_failed(rc, err, tmp_path / "ds", "SAR raster gives 2 band(s)", "model.sar_channels = 4")
    rc, err = _cli(capsys, *_args(sar, opt, tmp_path / "ds", "--sar-bands", "2", "--set", "model.sar_channels=1"))
    assert rc == 0, err
    assert read_dataset_meta(tmp_path / "ds")["modalities"]["sar"]["bands"] == [2]


def test_cli_all_nan_sar(tmp_path, capsys):
    opt = write_tif(tmp_path / "o.tif", optical_u8(64, 96))
    sar = write_tif(tmp_path / "s.tif", np.full((1, 64, 96), np.nan, dtype=np.float32))
    rc, err = _cli(capsys, *_args(sar, opt, tmp_path / "out" / "ds"))
    _assert_failed(rc, err, tmp_path / "out" / "ds", "no valid patches", "all 56 reference footprints")
    assert not (tmp_path / "out").exists()  # the parent it created is gone too


def test_failed_run_keeps_the_existing_dataset(tmp_path, capsys):
    sar, opt = make_pair(tmp_path)
    root = tmp_path / "ds"
    assert _cli(capsys, *_args(sar, opt, root))[0] == 0
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"\x00" * 100)
    rc, err = _cli(capsys, *_args(bad, opt, root))
    assert rc == 2 and "cannot open the SAR raster" in err
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    assert [p.name for p in tmp_path.glob(".ds*")] == [".ds.lock"]  # no partial folder; the build lock stays beside


def test_refuses_to_replace_a_folder_that_is_not_a_dataset(tmp_path):
    sar, opt = make_pair(tmp_path)
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    with pytest.raises(DataError, match="refusing to replace"):
        tile(sar, opt, keep, TileConfig(patch_px=16), progress=False)
    with pytest.raises(DataError, match="contains the input"):
        tile(sar, opt, tmp_path, TileConfig(patch_px=16), progress=False)
    assert (keep / "notes.txt").read_text() == "precious"


def test_areas_too_small_are_one_line_errors(tmp_path):
    sar, opt = make_pair(tmp_path)
    with pytest.raises(DataError, match="east test strip is 10 px wide"):
        tile(sar, opt, tmp_path / "a", TileConfig(patch_px=16, test_fraction=0.1), progress=False)
    with pytest.raises(DataError, match="smaller than one patch"):
        tile(sar, opt, tmp_path / "a", TileConfig(patch_px=128), progress=False)
    assert not (tmp_path / "a").exists()
