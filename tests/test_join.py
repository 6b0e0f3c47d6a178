"""`cmpc data join`: several map rasters as one GeoTIFF, windowed, checked, written atomically."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from affine import Affine

from cmpc.cli import main
from cmpc.data.join import join_rasters
from cmpc.errors import DataError
from tests.tiny_rasters import X0, Y0, write_tif


def _tile(path, value_offset: int, x0: float, y0: float, h: int = 40, w: int = 60, crs: str = "EPSG:32631", res: float = 1.0, bands: int = 3):
    rows, cols = np.mgrid[0:h, 0:w]
    data = np.stack([(cols + value_offset) % 250 + 1, (rows + value_offset) % 250 + 1, np.full((h, w), value_offset % 250 + 1)][:bands]).astype(np.uint8)
    return write_tif(path, data, crs=crs, transform=Affine(res, 0.0, x0, 0.0, -res, y0))


def test_two_touching_tiles_and_an_overlapping_one_join_pixel_exactly(tmp_path):
    a = _tile(tmp_path / "a.tif", 0, X0, Y0)
    b = _tile(tmp_path / "b.tif", 100, X0 + 60, Y0)  # east of a, touching
    c = _tile(tmp_path / "c.tif", 200, X0 + 30, Y0 - 20)  # overlaps both, listed last: a and b win where they have data
    with rasterio.open(a, "r+") as dst:
        dst.set_band_description(1, "B04")
    facts = join_rasters([a, b, c], tmp_path / "map.tif")
    assert (facts["width"], facts["height"], facts["bands"], facts["dtype"]) == (120, 60, 3, "uint8")
    assert facts["bounds"] == [X0, Y0 - 60, X0 + 120, Y0]
    with rasterio.open(tmp_path / "map.tif") as m, rasterio.open(a) as sa, rasterio.open(b) as sb, rasterio.open(c) as sc:
        out = m.read()
        assert m.crs.to_epsg() == 32631 and m.res == (1.0, 1.0) and m.descriptions[0] == "B04"
        assert (out[:, :40, :60] == sa.read()).all() and (out[:, :40, 60:] == sb.read()).all()
        assert (out[:, 40:, 30:90] == sc.read()[:, 20:, :]).all()  # c fills only what a and b lack
        assert (out[:, 40:, :30] == 0).all() and (out[:, 40:, 90:] == 0).all()  # nothing there: nodata
        assert m.nodata == 0
    assert facts["empty_fraction"] == pytest.approx(1 - (2 * 40 * 60 + 60 * 20) / (120 * 60), abs=1e-4)


def test_a_tile_in_another_crs_is_warped_onto_the_first(tmp_path):
    a = _tile(tmp_path / "a.tif", 0, X0, Y0, h=200, w=200, res=10.0)
    # the same place one UTM zone west (EPSG:32630): read in zone 31's grid by warping
    from rasterio.warp import transform as warp

    (x,), (y,) = warp("EPSG:32631", "EPSG:32630", [X0 + 2000], [Y0])
    b = _tile(tmp_path / "b.tif", 50, round(x), round(y), h=200, w=200, res=10.0, crs="EPSG:32630")
    facts = join_rasters([a, b], tmp_path / "map.tif")
    assert facts["crs"] == "EPSG:32631" and facts["res"] == [10.0, 10.0]
    assert facts["bounds"][0] == X0 and facts["bounds"][2] > X0 + 3900  # b reaches about 4 km east of a's corner
    with rasterio.open(tmp_path / "map.tif") as m:
        east = m.read(3, window=((20, 180), (220, 380)))
    assert np.median(east[east > 0]) == 51  # b's constant band, resampled in place


@pytest.mark.parametrize("case, words", [
    ("one", "at least two"),
    ("bands", r"1 band\(s\)"),
    ("dtype", "one data type"),
    ("apart", "far apart"),
    ("self", "one of the inputs"),
    ("corrupt", "not a readable raster"),
])
def test_bad_joins_are_refused_and_write_nothing(tmp_path, case, words):
    a = _tile(tmp_path / "a.tif", 0, X0, Y0)
    b = _tile(tmp_path / "b.tif", 9, X0 + 60, Y0)
    inputs = [a, b]
    out = tmp_path / "map.tif"
    if case == "one":
        inputs = [a]
    elif case == "bands":
        inputs = [a, _tile(tmp_path / "g.tif", 9, X0 + 60, Y0, bands=1)]
    elif case == "dtype":
        inputs = [a, write_tif(tmp_path / "f.tif", np.ones((3, 40, 60), np.float32), transform=Affine(1.0, 0.0, X0 + 60, 0.0, -1.0, Y0))]
    elif case == "apart":
        inputs = [a, _tile(tmp_path / "far.tif", 9, X0 + 1000, Y0 - 1000)]
    elif case == "self":
        out = a
    elif case == "corrupt":
        (tmp_path / "bad.tif").write_bytes(b"II*\x00not a tiff")
        inputs = [a, tmp_path / "bad.tif"]
    before = a.read_bytes()
    with pytest.raises(DataError, match=words):
        join_rasters(inputs, out)
    assert a.read_bytes() == before and (case == "self" or not out.exists())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_the_cli_joins_and_refuses_in_one_line(tmp_path, capsys):
    a = _tile(tmp_path / "a.tif", 0, X0, Y0)
    b = _tile(tmp_path / "b.tif", 100, X0 + 60, Y0)
    rc = main(["data", "join", str(tmp_path / "map.tif"), str(a), str(b)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out)["width"] == 120
    rc = main(["data", "join", str(tmp_path / "map2.tif"), str(a)])
    out, err = capsys.readouterr()
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "at least two" in lines[0]
