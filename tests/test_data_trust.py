"""Trust at the seams of data input: CRS units and scale (World Mercator, US feet), south-up
rasters, strict annotation ids, and one-line errors instead of tracebacks."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from affine import Affine
from pyproj import Transformer
from tiny_rasters import X0, Y0, coord_bands, make_pair, optical_u8, write_tif

from cmpc.cli import main
from cmpc.config import LocalizeConfig, TileConfig
from cmpc.data.info import dataset_summary, format_summary
from cmpc.data.layout import read_annotations, safe_image_path
from cmpc.data.patches import read_patch_array
from cmpc.data.raster import iter_raster_patches, open_raster, working_crs
from cmpc.data.tiler import tile
from cmpc.errors import ConfigError, DataError
from cmpc.localize.queries import RasterQueries

LON, LAT = -118.2, 34.05  # Los Angeles: UTM 11N, World Mercator scale factor ~1.209


def _merc_origin() -> tuple[float, float]:
    return Transformer.from_crs("EPSG:4326", "EPSG:3395", always_xy=True).transform(LON, LAT)


def _merc_pair(tmp: Path, h: int = 64, w: int = 96, res: float = 10.0) -> tuple[Path, Path]:
    """A co-registered pair in EPSG:3395 at 34 N, ``res`` Mercator units per pixel."""
    x0, y0 = _merc_origin()
    t = Affine(res, 0.0, x0, 0.0, -res, y0)
    opt = write_tif(tmp / "merc_opt.tif", optical_u8(h, w), crs="EPSG:3395", transform=t)
    sar = write_tif(tmp / "merc_sar.tif", coord_bands(h, w), crs="EPSG:3395", transform=t)
    return sar, opt


# --------------------------------------------------------------------------- CRS units and scale


def test_mercator_raster_is_viewed_in_utm_with_ground_gsd(tmp_path):
    _, opt = _merc_pair(tmp_path)
    with open_raster(opt) as src:
        d = src.describe()
        assert d["source_crs"] == "EPSG:3395" and d["crs"] == "EPSG:32611" and d["warped"]
        # one Mercator unit is 1 / 1.209 = 0.827 m on the ground at 34 N
        assert d["gsd_m"] / 10.0 == pytest.approx(0.827, abs=0.005)
        assert "EPSG:32611" in d["crs_reason"] and "scale factor at the data centre is 1.20" in d["crs_reason"]
        ex, ny = Transformer.from_crs("EPSG:4326", "EPSG:32611", always_xy=True).transform(LON, LAT)
        minx, miny, maxx, maxy = src.grid.bounds
        assert abs(minx - ex) < 20 and abs(maxy - ny) < 20  # the north-west corner, in UTM metres
        assert (maxx - minx) == pytest.approx(96 * 8.27, rel=0.02)
    patches = list(iter_raster_patches(opt, 16, nodata_max_frac=0.5))
    assert patches and {p.crs for p in patches} == {"EPSG:32611"}
    assert all(abs(p.bounds[2] - p.bounds[0] - 16 * d["gsd_m"]) < 1e-6 for p in patches)


def test_a_mercator_scene_is_read_at_ground_gsd_in_the_map_crs(tmp_path):
    """`cmpc georef --scene` on a World Mercator GeoTIFF (as sentinel-la ships): its GSD is
    ground metres (8.27 m, not 10 CRS units) and, given the map's UTM CRS, its pixels are
    viewed on a north-up UTM grid, as the tiler and the query reader do."""
    from cmpc.localize.scene import read_scene

    _, opt = _merc_pair(tmp_path)
    s = read_scene(opt)  # no map CRS: the pixels as stored, the GSD in ground metres
    assert s.gsd_m / 10.0 == pytest.approx(0.827, abs=0.005) and (s.width, s.height) == (96, 64)
    assert s.georef["crs"] == "EPSG:3395"
    u = read_scene(opt, map_crs="EPSG:32611")
    assert u.georef["crs"] == "EPSG:32611" and u.gsd_m == pytest.approx(s.gsd_m, rel=0.01)
    ex, ny = Transformer.from_crs("EPSG:4326", "EPSG:32611", always_xy=True).transform(LON, LAT)
    t = u.georef["transform"]
    assert t[1] == 0 and t[3] == 0 and abs(t[2] - ex) < 20 and abs(t[5] - ny) < 20  # north-up, same north-west corner
    assert u.width * u.gsd_m == pytest.approx(96 * 8.27, rel=0.03) and u.valid.mean() > 0.9
    # a scene already in the map CRS is read as stored
    assert read_scene(opt, map_crs="EPSG:3395").georef["transform"] == s.georef["transform"]


def test_a_scene_far_from_the_maps_utm_zone_is_read_as_stored_with_a_warning(tmp_path, capsys):
    """A scene whose own georeferencing puts it two UTM zones east of the map's (where the
    map's CRS is 1.5 % off scale): no refusal (its position is only a prior), one warning
    line, its pixels as stored at their ground GSD."""
    from cmpc.localize.scene import read_scene

    path = write_tif(tmp_path / "far.tif", optical_u8(40, 50)[:1], crs="EPSG:32613", transform=Affine(10.0, 0, 500000.0, 0, -10.0, 3750000.0))
    s = read_scene(path, map_crs="EPSG:32611")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: the scene far.tif") and "1.01" in err[0]
    assert s.georef["crs"] == "EPSG:32613" and (s.width, s.height) == (50, 40) and s.gsd_m == pytest.approx(10.0, rel=0.002)


def test_utm_is_used_as_is_and_us_feet_are_not_metres(tmp_path):
    crs, why = working_crs(open_raster(make_pair(tmp_path)[1]).source_crs, (X0, Y0 - 64, X0 + 96, Y0))
    assert crs.to_epsg() == 32631 and "used as is" in why
    ft = 0.3048006096  # US survey foot, metres
    x0, y0 = Transformer.from_crs("EPSG:4326", "EPSG:2229", always_xy=True).transform(LON, LAT)
    path = write_tif(tmp_path / "feet.tif", optical_u8(32, 32), crs="EPSG:2229", transform=Affine(10.0, 0, x0, 0, -10.0, y0))
    with open_raster(path) as src:
        assert src.crs.to_epsg() == 32611 and src.source_crs.to_epsg() == 2229
        assert src.grid.gsd_m == pytest.approx(10 * ft, rel=0.003)  # not 10 "metres"
        assert "US survey foot" in src.crs_reason


def test_a_requested_crs_must_be_metric_at_the_data(tmp_path):
    _, opt = make_pair(tmp_path)
    with pytest.raises(DataError, match=r"EPSG:3395 cannot hold positions in metres.*scale factor at the data centre is 1\.4"):
        open_raster(opt, crs="EPSG:3395")
    with pytest.raises(DataError, match="US survey foot"):
        open_raster(opt, crs="EPSG:2229")
    with pytest.raises(ConfigError, match="'EPSG:999999' is not a known CRS"):
        open_raster(opt, crs="EPSG:999999")
    with pytest.raises(DataError, match=r"EPSG:32632 .*scale factor at the data centre is 1\.002"):
        open_raster(opt, crs="EPSG:32632")  # 6 degrees off its central meridian
    with open_raster(opt, crs="EPSG:2154") as src:  # Lambert-93 is metric and true to 0.1 % in France
        assert src.crs.to_epsg() == 2154 and src.grid.gsd_m == pytest.approx(1.0, abs=0.01)


def test_mercator_map_and_mercator_queries_land_in_the_same_utm_metres(tmp_path, capsys):
    sar, opt = _merc_pair(tmp_path)
    root = tmp_path / "ds"
    meta = tile(sar, opt, root, TileConfig(patch_px=16, test_fraction=0.3), progress=False)
    assert meta["crs"] == "EPSG:32611" and meta["gsd_m"] == pytest.approx(8.27, abs=0.05)
    assert meta["sources"]["optical"]["source_crs"] == "EPSG:3395"
    refs = read_annotations(root, "train", "opt")
    assert all(a.crs == "EPSG:32611" and a.gsd == pytest.approx(meta["gsd_m"]) for a in refs)
    # the aligned SAR patch shows the same footprint as its reference (coordinate bands)
    a = next(q for q in read_annotations(root, "train", "sar") if q.aligned)
    ref = next(r for r in refs if r.id == a.id)
    assert a.bounds == ref.bounds
    # data info says the Mercator source was viewed in UTM, with the ground gsd
    assert main(["data", "info", str(root)]) == 0
    out = capsys.readouterr().out
    assert "gsd 8.2" in out and "EPSG:3395 viewed in the local UTM zone EPSG:32611" in out
    # queries cut from a Mercator SAR GeoTIFF: accepted by an index in UTM 11N, positions there
    xs = [r.bounds[0] for r in refs] + [r.bounds[2] for r in refs]
    ys = [r.bounds[1] for r in refs] + [r.bounds[3] for r in refs]
    index = SimpleNamespace(crs="EPSG:32611", extent=(min(xs), min(ys), max(xs), max(ys)),
                            manifest={"patch_m": meta["patch_m"]}, directory=tmp_path / "index")
    rq = RasterQueries(sar, index, LocalizeConfig(), img_size=16)
    assert rq.crs == "EPSG:32611" and rq.patch_px == 16 and rq.gsd_m == pytest.approx(meta["gsd_m"], rel=1e-6)
    q = next(iter(rq.batches(4)))
    assert len(q) == 4 and tuple(q.x.shape[1:]) == (2, 16, 16)
    with open_raster(sar) as src:
        g = src.grid
    assert g.crs.to_epsg() == 32611 and g.bounds[0] < index.extent[2] and index.extent[0] < g.bounds[2]


def test_info_reports_ground_gsd_of_mercator_geotiff_patches(tmp_path, capsys):
    """An SN6-style dataset whose GeoTIFF patches are in World Mercator (as an older tiler wrote)."""
    x0, y0 = _merc_origin()
    root = tmp_path / "sn6"
    for mode in ("opt", "sar"):
        (root / "train" / "annotations" / mode).mkdir(parents=True)
        (root / "train" / "imgs" / mode).mkdir(parents=True)
        for i in range(2):
            t = Affine(10.0, 0, x0 + 160 * i, 0, -10.0, y0)
            write_tif(root / "train" / "imgs" / mode / f"{i}.tif", coord_bands(16, 16), crs="EPSG:3395", transform=t)
            ann = {"id": i, "pos": {"x": x0 + 160 * i + 80, "y": y0 - 80}, "file_path": f"{i}.tif", "near_id": [i]}
            (root / "train" / "annotations" / mode / f"{i}.json").write_text(json.dumps(ann))
    s = dataset_summary(root)
    assert s["crs"] == "EPSG:3395" and s["gsd_m"] == pytest.approx(8.27, abs=0.05)
    assert "not ground metres" in s["crs_note"] and "scale factor" in s["crs_note"]
    assert "not ground metres" in format_summary(s)


# --------------------------------------------------------------------------- south-up


def _south_up(path: Path, data: np.ndarray, h: int) -> Path:
    """The same pixels as the north-up tiny raster, stored bottom row first (positive pixel height)."""
    return write_tif(path, np.ascontiguousarray(data[:, ::-1, :]), transform=Affine(1.0, 0.0, X0, 0.0, 1.0, Y0 - h))


def test_south_up_raster_reads_like_the_north_up_one(tmp_path):
    h, w = 64, 96
    north = write_tif(tmp_path / "north.tif", coord_bands(h, w))
    south = _south_up(tmp_path / "south.tif", coord_bands(h, w), h)
    with open_raster(north) as a, open_raster(south) as b:
        assert b.grid.same_as(a.grid) and not b.warped
        for win in ((0, 0, h, w), (5, 7, 16, 16), (40, 80, 30, 30)):
            np.testing.assert_array_equal(a.read_on(a.grid, *win)[0], b.read_on(a.grid, *win)[0])
        box = (X0 + 10.5, Y0 - 50.25, X0 + 42.5, Y0 - 18.25)
        np.testing.assert_allclose(a.read_bounds(box, (8, 8))[0], b.read_bounds(box, (8, 8))[0], atol=1e-4)


@pytest.mark.parametrize("which", ["both", "sar"])
def test_south_up_rasters_tile_to_the_same_patches(tmp_path, which):
    h, w = 64, 96
    sar_n, opt_n = make_pair(tmp_path)
    sar_s = _south_up(tmp_path / "sar_s.tif", coord_bands(h, w), h)
    opt_s = _south_up(tmp_path / "opt_s.tif", optical_u8(h, w), h) if which == "both" else opt_n
    cfg = TileConfig(patch_px=16)
    tile(sar_n, opt_n, tmp_path / "north", cfg, progress=False)
    tile(sar_s, opt_s, tmp_path / "south", cfg, progress=False)
    for split in ("train", "test"):
        for mode in ("opt", "sar"):
            an = read_annotations(tmp_path / "north", split, mode)
            as_ = read_annotations(tmp_path / "south", split, mode)
            assert [a.to_json() for a in an] == [a.to_json() for a in as_]
            for a in an:
                pn = read_patch_array(safe_image_path(tmp_path / "north", split, mode, a.file_path))
                ps = read_patch_array(safe_image_path(tmp_path / "south", split, mode, a.file_path))
                np.testing.assert_array_equal(pn, ps)


# --------------------------------------------------------------------------- annotation ids


def _ds(root: Path, opt: list[dict], sar: list[dict] | None = None, split: str = "train") -> Path:
    sar = sar if sar is not None else [{"id": 0, "pos": {"x": 0, "y": 0}, "file_path": "0.png", "near_id": [0]}]
    for mode, lst in (("opt", opt), ("sar", sar)):
        d = root / split / "annotations" / mode
        d.mkdir(parents=True, exist_ok=True)
        (root / split / "imgs" / mode).mkdir(parents=True, exist_ok=True)
        for n, a in enumerate(lst):
            (d / f"{n}.json").write_text(json.dumps(a))
    return root


def _ref(i, **kw) -> dict:
    return {"id": i, "pos": {"x": 1.0, "y": 2.0}, "file_path": "0.png", "near_id": [], **kw}


@pytest.mark.parametrize("bad", ['"55"', "55.5", "55.0", "true", str(2**63), "-1"])
def test_non_integer_or_out_of_range_ids_are_refused(tmp_path, bad):
    root = _ds(tmp_path / "ds", [_ref(0)])
    f = root / "train" / "annotations" / "opt" / "0.json"
    f.write_text('{"id": %s, "pos": {"x": 1, "y": 2}, "file_path": "0.png"}' % bad)
    with pytest.raises(DataError, match=r"opt/0\.json: 'id' (must be an integer|.*outside 0 \.\. 2\*\*63-1)"):
        read_annotations(root, "train", "opt")


@pytest.mark.parametrize("bad", ['["3"]', "[1.5]", "[true]", f"[{2**64}]"])
def test_non_integer_near_id_is_refused(tmp_path, bad):
    root = _ds(tmp_path / "ds", [_ref(0)])
    f = root / "train" / "annotations" / "sar" / "0.json"
    f.write_text('{"id": 0, "pos": {"x": 1, "y": 2}, "file_path": "0.png", "near_id": %s}' % bad)
    with pytest.raises(DataError, match=r"sar/0\.json: 'near_id\[0\]'"):
        read_annotations(root, "train", "sar")


def test_string_aligned_flag_is_refused(tmp_path):
    root = _ds(tmp_path / "ds", [_ref(0)], [_ref(0, aligned="false")])
    with pytest.raises(DataError, match=r"sar/0\.json: 'aligned' must be true or false"):
        read_annotations(root, "train", "sar")


def test_nul_byte_in_file_path_is_refused(tmp_path):
    root = _ds(tmp_path / "ds", [_ref(0, file_path="0\x00.png")])
    with pytest.raises(DataError, match=r"opt/0\.json: 'file_path' .* NUL byte"):
        read_annotations(root, "train", "opt")
    with pytest.raises(DataError, match="NUL byte"):
        safe_image_path(root, "train", "opt", "a\x00b.png")


def test_duplicate_reference_ids_are_refused(tmp_path):
    root = _ds(tmp_path / "ds", [_ref(0), _ref(1), _ref(1, file_path="2.png")])
    with pytest.raises(DataError, match=r"duplicate optical reference id 1 in .*train/annotations/opt: 1\.json and 2\.json"):
        read_annotations(root, "train", "opt")
    # the same id in the two splits (same-area maps) is fine
    _ds(root, [_ref(0), _ref(1)], split="test")
    assert len(read_annotations(root, "test", "opt")) == 2


def test_dangling_near_id_warns_once_per_split(tmp_path, capsys):
    sar = [{"id": 0, "pos": {"x": 0, "y": 0}, "file_path": "0.png", "near_id": [0, 1, 7]},
           {"id": 1, "pos": {"x": 0, "y": 0}, "file_path": "1.png", "near_id": [1, 9]}]
    root = _ds(tmp_path / "ds", [_ref(0, near_id=[0, 1]), _ref(1, near_id=[1, 0])], sar)
    assert len(read_annotations(root, "train", "opt")) == 2
    assert capsys.readouterr().err == ""  # the references' own near_id are all fine
    for _ in range(3):
        assert len(read_annotations(root, "train", "sar")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: 2 of 5 near_id entries") and "train split" in err[0]


def test_cli_bad_annotation_is_one_line(tmp_path, capsys):
    root = _ds(tmp_path / "ds", [_ref(0)])
    (root / "train" / "annotations" / "opt" / "0.json").write_text('{"id": 0, "pos": {"x": 1, "y": 2}, "file_path": "0.png", "near_id": ["x"]}')
    assert main(["data", "info", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "opt/0.json" in err[0] and "near_id[0]" in err[0]


# --------------------------------------------------------------------------- CLI: unknown CRS


def test_cli_unknown_crs_is_one_line(tmp_path, capsys):
    sar, opt = make_pair(tmp_path)
    root = tmp_path / "ds"
    rc = main(["data", "tile", "--sar", str(sar), "--optical", str(opt), "--out", str(root), "--patch-px", "16", "--crs", "EPSG:999999"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("error: tile.crs (--crs) 'EPSG:999999' is not a known CRS")
    assert not root.exists()


# --------------------------------------------------------------------------- real data


@pytest.mark.real
def test_sentinel_la_ground_gsd_is_8_3_m(real_data):
    folder = real_data / "sentinel-la"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    for name in ("003_optical.tif", "003_sar.tif"):
        with open_raster(folder / name) as src:
            d = src.describe()
            assert d["source_crs"] == "EPSG:3395" and d["crs"] == "EPSG:32611"
            assert d["gsd_m"] == pytest.approx(8.3, abs=0.1)  # not the 10 Mercator units per pixel
            lon_lat = Transformer.from_crs("EPSG:32611", "EPSG:4326", always_xy=True).transform(
                (src.grid.bounds[0] + src.grid.bounds[2]) / 2, (src.grid.bounds[1] + src.grid.bounds[3]) / 2
            )
            assert -119.1 < lon_lat[0] < -116.9 and 33.5 < lon_lat[1] < 34.4
