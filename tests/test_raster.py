"""Raster opening, validation and windowed reading (cmpc.data.raster) on tiny GeoTIFFs."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from pyproj import Transformer
from affine import Affine
from tiny_rasters import X0, Y0, coord_bands, optical_u8, write_tif

from cmpc.data.raster import (
    iter_raster_patches,
    open_raster,
    overlap_bounds,
    read_patch_at,
    utm_crs_for,
)
from cmpc.errors import DataError


def test_utm_zone_from_lon_lat():
    assert utm_crs_for(3.0, 45.0).to_epsg() == 32631
    assert utm_crs_for(-78.33, 34.9).to_epsg() == 32617  # the UAVSAR sample
    assert utm_crs_for(-70.6, -33.4).to_epsg() == 32719  # southern hemisphere
    assert utm_crs_for(179.9, 10.0).to_epsg() == 32660
    assert utm_crs_for(-180.0, 10.0).to_epsg() == 32601


def test_overlap_bounds():
    assert overlap_bounds((0, 0, 10, 10), (5, -5, 20, 6)) == (5, 0, 10, 6)
    assert overlap_bounds((0, 0, 10, 10), (10, 0, 20, 10)) is None  # touching is not overlapping


def test_open_errors(tmp_path):
    with pytest.raises(DataError, match="SAR raster not found"):
        open_raster(tmp_path / "nope.tif", role="SAR")
    bad = tmp_path / "garbage.tif"
    bad.write_bytes(b"not a tiff" * 20)
    with pytest.raises(DataError, match="cannot open the SAR raster .*garbage.tif"):
        open_raster(bad, role="SAR")
    nocrs = write_tif(tmp_path / "nocrs.tif", optical_u8(16, 16), crs=None)
    with pytest.raises(DataError, match="has no CRS"):
        open_raster(nocrs)
    ok = write_tif(tmp_path / "two.tif", coord_bands(16, 16))
    with pytest.raises(DataError, match=r"band index 3 is beyond the SAR raster two.tif, which has 2 band\(s\)"):
        open_raster(ok, bands=[1, 3], role="SAR")
    with pytest.raises(DataError, match="band index 0"):
        open_raster(ok, bands=[0])


def test_truncated_tiff_fails_at_open(tmp_path):
    full = write_tif(tmp_path / "full.tif", optical_u8(256, 256), block=64)
    data = full.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    # GDAL itself opens it and even reads the first block; we refuse it up front.
    with rasterio.open(cut) as src:
        assert src.width == 256
    with pytest.raises(DataError, match=r"is truncated: block \(3, 3\) ends at byte \d+ but the file has \d+ bytes"):
        open_raster(cut, role="optical")


def test_read_on_clips_outside_and_marks_nodata(tmp_path):
    data = coord_bands(32, 48)
    data[:, 4, 5] = np.nan  # NaN in both bands
    data[1, 6, 7] = np.inf  # inf in one band is enough
    data[:, 8, 9] = -9999.0  # the declared nodata value in every band
    data[0, 10, 11] = -9999.0  # nodata in one band only: still valid
    path = write_tif(tmp_path / "a.tif", data, nodata=-9999.0)
    with open_raster(path) as src:
        assert src.grid.bounds == (X0, Y0 - 32, X0 + 48, Y0)
        arr, valid = src.read_on(src.grid, -2, -3, 16, 16)  # 2 rows above, 3 cols left of the raster
    assert arr.shape == (2, 16, 16) and valid.shape == (16, 16)
    assert not valid[:2].any() and not valid[:, :3].any()
    assert np.isnan(arr[:, :2]).all()
    # pixel (row r, col c) of the raster is at (r + 2, c + 3) of the window
    assert arr[0, 2 + 0, 3 + 0] == 0.5 and arr[1, 2 + 7, 3 + 4] == 7.5
    for r, c in ((4, 5), (6, 7), (8, 9)):
        assert not valid[r + 2, c + 3] and np.isnan(arr[:, r + 2, c + 3]).all()
    assert valid[10 + 2, 11 + 3]
    assert valid.sum() == 14 * 13 - 3


def test_windowed_iteration_matches_whole_read(tmp_path):
    """Small read blocks: every read is a window far smaller than the raster, and the
    patches equal those cut from a whole-raster read."""
    h, w, p, s = 80, 112, 16, 8
    rng = np.random.default_rng(0)
    data = rng.normal(size=(3, h, w)).astype(np.float32)
    path = write_tif(tmp_path / "r.tif", data, block=16)
    reads = []
    patches = list(iter_raster_patches(path, p, s, block_px=16, on_read=reads.append))
    rows, cols = (h - p) // s + 1, (w - p) // s + 1
    assert len(patches) == rows * cols == 9 * 13
    assert len(reads) == 5 * 7  # ceil(65/16) x ceil(97/16) top-left cells
    assert max(r.height for r in reads) <= 16 + p and max(r.width for r in reads) <= 16 + p
    assert sum(r.height * r.width for r in reads) < 4 * h * w  # no whole-raster read
    seen = set()
    for pt in patches:
        r, c = int(pt.window.row_off), int(pt.window.col_off)
        seen.add((r, c))
        np.testing.assert_array_equal(pt.array, data[:, r : r + p, c : c + p])
        assert pt.x == X0 + c + p / 2 and pt.y == Y0 - r - p / 2
        assert pt.bounds == (X0 + c, Y0 - r - p, X0 + c + p, Y0 - r)
        assert pt.valid_frac == 1.0 and pt.crs == "EPSG:32631"
    assert seen == {(r * s, c * s) for r in range(rows) for c in range(cols)}


def test_iteration_skips_nodata_patches(tmp_path):
    data = coord_bands(32, 32)
    data[:, :16, :16] = np.nan
    path = write_tif(tmp_path / "n.tif", data)
    kept = list(iter_raster_patches(path, 16, 8, nodata_max_frac=0.2))
    every = list(iter_raster_patches(path, 16, 8))
    assert len(every) == 9
    fr = {(int(p.window.row_off), int(p.window.col_off)): p.valid_frac for p in every}
    assert fr[(0, 0)] == 0.0 and fr[(0, 8)] == 0.5 and fr[(8, 8)] == 0.75 and fr[(16, 16)] == 1.0
    assert {(int(p.window.row_off), int(p.window.col_off)) for p in kept} == {(16, 0), (0, 16), (16, 8), (8, 16), (16, 16)}


def test_read_patch_at_resamples_coarser_raster(tmp_path):
    """A 2 m raster read onto a 1 m footprint: a linear ramp is interpolated exactly."""
    data = coord_bands(40, 40, scale=2.0)  # band 1 = x offset of the pixel centre in metres
    path = write_tif(tmp_path / "c.tif", data, transform=Affine(2.0, 0.0, X0, 0.0, -2.0, Y0))
    arr = read_patch_at(path, (X0 + 20, Y0 - 36, X0 + 36, Y0 - 20), 16)
    assert arr.shape == (2, 16, 16)
    x_expected = np.arange(16) + 20.5
    np.testing.assert_allclose(arr[0], np.broadcast_to(x_expected, (16, 16)), atol=1e-4)
    np.testing.assert_allclose(arr[1], np.broadcast_to((np.arange(16) + 20.5)[:, None], (16, 16)), atol=1e-4)
    one = read_patch_at(path, (X0 + 20, Y0 - 36, X0 + 36, Y0 - 20), 8, bands=[2])
    assert one.shape == (1, 8, 8)
    # a footprint hanging over the east edge: the outside half is NaN
    edge = read_patch_at(path, (X0 + 72, Y0 - 16, X0 + 88, Y0), 16)
    assert np.isnan(edge[:, :, 8:]).all() and np.isfinite(edge[:, :, :8]).all()


def test_geographic_raster_is_read_in_local_utm(tmp_path):
    """An EPSG:4326 raster whose bands hold its own lon/lat: patches come out in UTM 31N
    metres, and a patch's content (lon/lat) matches its centre transformed back."""
    lon0, lat0, res, h, w = 3.0, 45.0, 0.0002, 60, 80  # about 16 m x 22 m pixels
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    lon = lon0 + (cols + 0.5) * res
    lat = lat0 - (rows + 0.5) * res
    data = np.stack([(lon - lon0) * 1e4, (lat0 - lat) * 1e4]).astype(np.float32)
    path = write_tif(tmp_path / "geo.tif", data, crs="EPSG:4326", transform=Affine(res, 0.0, lon0, 0.0, -res, lat0))
    with open_raster(path) as src:
        assert src.crs.to_epsg() == 32631 and src.warped
        assert src.describe()["source_crs"] == "EPSG:4326"
        gsd = src.grid.gsd_m
    assert 12 < gsd < 25
    to_ll = Transformer.from_crs("EPSG:32631", "EPSG:4326", always_xy=True)
    patches = list(iter_raster_patches(path, 16, 16, nodata_max_frac=0.0))
    assert len(patches) >= 4
    for pt in patches:
        assert 500_000 < pt.x < 503_000 and 4_980_000 < pt.y < 4_985_000  # UTM 31N near (3 E, 45 N)
        plon, plat = to_ll.transform(pt.x, pt.y)
        # mean of the warped lon/lat bands at the patch = lon/lat of its centre (to ~0.1 px)
        assert abs(lon0 + pt.array[0].mean() / 1e4 - plon) < 0.1 * res
        assert abs(lat0 - pt.array[1].mean() / 1e4 - plat) < 0.1 * res
