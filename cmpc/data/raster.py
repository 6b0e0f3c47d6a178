"""Opening, validating and streaming GeoTIFF rasters (SAR strips, optical mosaics).

Everything here reads *windows*: a mosaic larger than memory works, because no function
ever asks rasterio for the whole raster. Positions are ground metres (:func:`working_crs`): a
raster's own CRS is used as is only when its unit is the metre and its point scale factor at
the data's centre is within 0.002 of 1 (UTM passes); anything else (geographic degrees, US
feet, World Mercator at 34 N where a unit is 0.83 m) is viewed through a ``WarpedVRT`` in the
local UTM zone (picked at the raster centre), so every patch centre, footprint and ground
sampling distance (GSD) is in metres. A south-up or otherwise flipped raster is viewed on
the equivalent north-up grid (same pixels, no resampling offset).

Validity: a pixel is *nodata* when every selected band equals the raster's nodata value,
when any band is NaN/inf, when the raster's mask (internal mask or, after warping, the alpha
band) says so, or when it lies outside the raster. Reads return float32 arrays with NaN at
nodata pixels plus a boolean ``valid`` mask.

Public entry points:
    working_crs(src_crs, bounds)                        -> (CRS, reason)
    parse_crs(value, what)                              -> CRS (ConfigError when unknown)
    open_raster(path, bands=None, crs=None, grid=None)  -> RasterSource
    iter_raster_patches(path, patch_px, stride_px, bands) -> Iterator[RasterPatch]
    read_patch_at(src_or_path, bounds, out_px, bands)   -> float32 (C, out_px, out_px)
    check_same_crs(sar, optical), overlap_bounds(a, b)
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform as warp_transform
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from cmpc.errors import ConfigError, DataError

Bounds = tuple[float, float, float, float]  # (minx, miny, maxx, maxy), metres in the working CRS

_EPS = 1e-6  # pixels: snapping tolerance for windows that are integral up to float noise


# --------------------------------------------------------------------------- CRS helpers


def crs_name(crs: CRS | None) -> str:
    """``EPSG:xxxx`` when the CRS has an EPSG code, else its WKT (short enough for messages)."""
    if crs is None:
        return "none"
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_string()


def utm_crs_for(lon_deg: float, lat_deg: float) -> CRS:
    """The WGS 84 / UTM zone CRS containing (lon, lat) in degrees (EPSG 326zz north, 327zz south)."""
    zone = int(math.floor((lon_deg + 180.0) / 6.0)) % 60 + 1
    return CRS.from_epsg((32600 if lat_deg >= 0 else 32700) + zone)


def local_utm_crs(crs: CRS, bounds: Bounds) -> CRS:
    """UTM zone of the centre of ``bounds`` given in ``crs`` (any CRS)."""
    cx, cy = (bounds[0] + bounds[2]) / 2.0, (bounds[1] + bounds[3]) / 2.0
    lon, lat = warp_transform(crs, CRS.from_epsg(4326), [cx], [cy])
    return utm_crs_for(lon[0], lat[0])


SCALE_TOLERANCE = 0.002  # a CRS is "metres" when its point scale factor is within this of 1


def parse_crs(value: str | CRS, what: str = "CRS") -> CRS:
    """``value`` (``EPSG:xxxx``, WKT, PROJ string or a CRS) as a CRS; :class:`ConfigError`
    naming ``what`` (e.g. ``tile.crs``) when it is not a CRS GDAL/PROJ knows."""
    if isinstance(value, CRS):
        return value
    try:
        return CRS.from_user_input(value)
    except (RasterioError, ValueError, TypeError) as e:
        raise ConfigError(
            f"{what} {value!r} is not a known CRS ({_first_line(e)}); give e.g. EPSG:32631, a WKT or a PROJ string"
        ) from None


def _horizontal(crs: CRS) -> Any:
    """The horizontal part of ``crs`` as a pyproj CRS (the first sub-CRS of a compound one)."""
    import pyproj

    pc = pyproj.CRS.from_wkt(crs.to_wkt())
    if pc.is_compound and pc.sub_crs_list:
        pc = pc.sub_crs_list[0]
    return pc


def crs_metric_facts(crs: CRS, bounds: Bounds) -> tuple[str, float, float | None]:
    """(unit name, metres per unit, point scale factor at the centre of ``bounds``) of a
    projected CRS; the scale factor is None when it cannot be computed (no geodetic datum,
    or the centre outside the projection's domain).

    The point scale factor is the larger deviation from 1 of pyproj's meridional and parallel
    scales (equal for a conformal projection): a CRS unit covers ``1 / factor`` ground units.
    """
    import pyproj

    pc = _horizontal(crs)
    axes = pc.axis_info[:2]
    unit = axes[0].unit_name if axes else "unknown"
    to_m = float(axes[0].unit_conversion_factor) if axes else float("nan")
    cx, cy = (bounds[0] + bounds[2]) / 2.0, (bounds[1] + bounds[3]) / 2.0
    try:
        geod = pc.geodetic_crs
        if geod is None:
            return unit, to_m, None
        lon, lat = pyproj.Transformer.from_crs(pc, geod, always_xy=True).transform(cx, cy)
        f = pyproj.Proj(pc).get_factors(lon, lat)
        h, k = float(f.meridional_scale), float(f.parallel_scale)
    except Exception:  # pyproj raises several types outside a projection's domain
        return unit, to_m, None
    if not (math.isfinite(h) and math.isfinite(k)):
        return unit, to_m, None
    return unit, to_m, h if abs(h - 1.0) >= abs(k - 1.0) else k


def _metric_problem(crs: CRS, bounds: Bounds) -> tuple[str | None, str]:
    """(why ``crs`` cannot be taken as ground metres at ``bounds``, or None; a short fact
    line for when it can)."""
    if crs.is_geographic:
        return "it is geographic (degrees)", ""
    unit, to_m, k = crs_metric_facts(crs, bounds)
    if not (math.isfinite(to_m) and abs(to_m - 1.0) < 1e-12):
        return f"its unit is the {unit} ({to_m:.6g} m), not the metre", ""
    if k is None:
        return None, "unit metre, scale factor unknown (no geodetic datum)"
    if abs(k - 1.0) > SCALE_TOLERANCE:
        return (
            f"its point scale factor at the data centre is {k:.4f} (one CRS unit is {1.0 / k:.3f} m on the ground; "
            f"allowed 1 +/- {SCALE_TOLERANCE})"
        ), ""
    return None, f"unit metre, scale factor {k:.4f} at the data centre"


def working_crs(src_crs: CRS, bounds: Bounds) -> tuple[CRS, str]:
    """The CRS positions are computed in for data in ``src_crs`` covering ``bounds``
    (given in ``src_crs``), and a one-line reason.

    The rule: ``src_crs`` is used as is only when its unit is the metre and its point scale
    factor at the centre of ``bounds`` is within :data:`SCALE_TOLERANCE` of 1 (any UTM zone
    passes, World Mercator at 34 N with factor 1.21 does not); otherwise (geographic degrees,
    feet, a distorting projection) the data are viewed in the local UTM zone of that centre.
    Used by the tiler, the raster index builder and the SAR-GeoTIFF query reader (all through
    :func:`open_raster`), so a map and its queries land in the same metres.
    """
    problem, fact = _metric_problem(src_crs, bounds)
    if problem is None:
        return src_crs, f"{crs_name(src_crs)} used as is ({fact})"
    utm = local_utm_crs(src_crs, bounds)
    return utm, f"{crs_name(src_crs)} viewed in the local UTM zone {crs_name(utm)}: {problem}"


def ground_gsd(crs: CRS, transform: Affine, width: int, height: int) -> float:
    """Ground metres per pixel of a raster of ``width`` x ``height`` px on ``transform`` in
    ``crs``: the mean of its two pixel-edge lengths measured in its working CRS
    (:func:`working_crs`: the CRS itself when metric and true to scale at the data, else the
    local UTM zone; e.g. World Mercator at 34 N: 10.0 CRS units are 8.3 m)."""
    from rasterio.warp import transform as warp_transform

    corners = [transform * (0, 0), transform * (width, 0), transform * (0, height), transform * (width, height)]
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    wc, _ = working_crs(crs, (min(xs), min(ys), max(xs), max(ys)))
    if wc != crs:
        xs, ys = warp_transform(crs, wc, xs, ys)
    (x0, y0), (x1, y1), (x2, y2) = zip(xs[:3], ys[:3])
    return float((math.hypot(x1 - x0, y1 - y0) / width + math.hypot(x2 - x0, y2 - y0) / height) / 2.0)


# --------------------------------------------------------------------------- grids


@dataclass(frozen=True)
class Grid:
    """A north-up pixel grid: CRS, affine transform, width and height in pixels.

    Pixel (row, col) covers x in [x0 + col*res_x, x0 + (col+1)*res_x] and y in
    [y0 - (row+1)*res_y, y0 - row*res_y] (metres in ``crs``).
    """

    crs: CRS
    transform: Affine
    width: int
    height: int

    @property
    def res_x(self) -> float:
        """Pixel width, metres."""
        return float(self.transform.a)

    @property
    def res_y(self) -> float:
        """Pixel height, metres (positive)."""
        return float(-self.transform.e)

    @property
    def gsd_m(self) -> float:
        """Ground sampling distance, metres/pixel (mean of x and y)."""
        return (self.res_x + self.res_y) / 2.0

    @property
    def bounds(self) -> Bounds:
        return self.window_bounds(0, 0, self.height, self.width)

    def window_bounds(self, row: float, col: float, height: float, width: float) -> Bounds:
        """Footprint (minx, miny, maxx, maxy) in metres of the pixel window."""
        x0, y0 = self.transform.c, self.transform.f
        return (
            x0 + col * self.res_x,
            y0 - (row + height) * self.res_y,
            x0 + (col + width) * self.res_x,
            y0 - row * self.res_y,
        )

    def window_centre(self, row: float, col: float, size: float) -> tuple[float, float]:
        """Centre (x, y) in metres of the square window with top-left (row, col) and side ``size`` px."""
        return (
            self.transform.c + (col + size / 2.0) * self.res_x,
            self.transform.f - (row + size / 2.0) * self.res_y,
        )

    def same_as(self, other: Grid) -> bool:
        """Identical grids (same CRS, same pixels): reads need no resampling."""
        if self.width != other.width or self.height != other.height or self.crs != other.crs:
            return False
        a, b = self.transform, other.transform
        res = max(abs(a.a), abs(a.e))
        # Relative tolerance on the pixel size (drift over the raster << 1e-3 px), absolute
        # on the origin (a millionth of a pixel).
        scale_ok = all(abs(u - v) <= 1e-9 * res for u, v in ((a.a, b.a), (a.b, b.b), (a.d, b.d), (a.e, b.e)))
        return scale_ok and abs(a.c - b.c) <= 1e-6 * res and abs(a.f - b.f) <= 1e-6 * res


def _is_north_up(t: Affine) -> bool:
    return t.b == 0 and t.d == 0 and t.a > 0 and t.e < 0


# --------------------------------------------------------------------------- sources


@dataclass
class RasterSource:
    """An opened, validated raster viewed in its working CRS (metres).

    ``dataset`` is the rasterio dataset or the ``WarpedVRT`` over it; ``bands`` the selected
    1-based band indexes of the *source* file; ``grid`` the working pixel grid (north-up; a
    south-up or east-to-west file is read through flipped windows, pixel for pixel);
    ``crs_reason`` why the working CRS is what it is (:func:`working_crs`). Close it (or use
    it as a context manager) when done.
    """

    path: Path
    role: str
    dataset: Any
    bands: list[int]
    grid: Grid
    source_crs: CRS
    source_dtype: str
    nodata: float | None
    warped: bool
    descriptions: list[str | None]
    crs_reason: str = ""
    _file: Any = None
    _alpha: int | None = None
    _dataset_mask: bool = False
    _flip_y: bool = False  # the file's rows run south to north: read the mirrored window, flip back
    _flip_x: bool = False  # the file's columns run east to west
    shift_m: tuple[float, float] = (0.0, 0.0)  # open_raster(shift_m=...): (east, north) metres of the working CRS
    _shift: tuple[float, float] = (0.0, 0.0)  # the same in the file's own CRS units

    @property
    def source_bounds(self) -> Bounds:
        """Bounds (minx, miny, maxx, maxy) of the file's data in its own CRS (min <= max even
        for a south-up file, whose rasterio ``bounds`` has bottom > top)."""
        if self._file is None:
            return normalized_bounds(self.grid.bounds)
        b, (dx, dy) = normalized_bounds(self._file.bounds), self._shift
        return (b[0] + dx, b[1] + dy, b[2] + dx, b[3] + dy)

    def __enter__(self) -> RasterSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.warped:
            self.dataset.close()
        if self._file is not None:
            self._file.close()

    @property
    def count(self) -> int:
        """Number of selected bands (channels C of every patch)."""
        return len(self.bands)

    @property
    def crs(self) -> CRS:
        return self.grid.crs

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts: path, CRS before/after, size, bands, dtype, GSD (m/px), nodata."""
        return {
            "path": str(self.path),
            "source_crs": crs_name(self.source_crs),
            "crs": crs_name(self.crs),
            "warped": self.warped,
            "crs_reason": self.crs_reason,
            "width": self.grid.width,
            "height": self.grid.height,
            "bands": list(self.bands),
            "band_descriptions": list(self.descriptions),
            "dtype": self.source_dtype,
            "gsd_m": self.grid.gsd_m,
            "nodata": None if self.nodata is None or not math.isfinite(self.nodata) else self.nodata,
            "bounds": list(self.grid.bounds),
        }

    # ---- reading -------------------------------------------------------------------

    def _read(self, window: Window, out_shape: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
        """Read the selected bands in ``window`` (inside the raster) -> (float32 (C,h,w), valid (h,w))."""
        h, w = out_shape if out_shape is not None else (int(window.height), int(window.width))
        indexes = list(self.bands)  # a WarpedVRT mirrors the source bands (plus alpha last)
        if self._alpha is not None:
            indexes = indexes + [self._alpha]
        if self._flip_y or self._flip_x:
            # The working grid is the file's grid mirrored: read the mirrored window, flip back.
            row_off, col_off = float(window.row_off), float(window.col_off)
            if self._flip_y:
                row_off = self.grid.height - row_off - float(window.height)
            if self._flip_x:
                col_off = self.grid.width - col_off - float(window.width)
            window = Window(_snap(col_off), _snap(row_off), window.width, window.height)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr = self.dataset.read(
                    indexes,
                    window=window,
                    out_shape=(len(indexes), h, w),
                    resampling=Resampling.bilinear,
                    out_dtype="float32",
                )
                mask = None
                if self._dataset_mask:
                    mask = self.dataset.read_masks(
                        self.bands[0], window=window, out_shape=(h, w), resampling=Resampling.nearest
                    )
        except RasterioError as e:
            raise DataError(
                f"cannot read the {self.role} raster {self.path}: {_first_line(e)} (corrupt or truncated file?)"
            ) from None
        if self._flip_y or self._flip_x:
            axes = tuple(a for a, f in ((-2, self._flip_y), (-1, self._flip_x)) if f)
            arr = np.ascontiguousarray(np.flip(arr, axis=axes))
            if mask is not None:
                mask = np.flip(mask, axis=axes)
        if self._alpha is not None:
            valid = arr[-1] > 127.0  # resampled alpha: keep pixels at least half covered
            arr = arr[:-1]
        else:
            valid = np.ones((h, w), dtype=bool)
        if mask is not None:
            valid &= mask > 0
        if self.nodata is not None and math.isfinite(self.nodata):
            valid &= ~np.all(arr == np.float32(self.nodata), axis=0)
        valid &= np.all(np.isfinite(arr), axis=0)
        arr[:, ~valid] = np.nan
        return arr, valid

    def read_on(self, grid: Grid, row: int, col: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Read the pixel window (row, col, height, width) of ``grid`` from this raster.

        ``grid`` is this raster's own grid or another grid in the same CRS (e.g. the optical
        map's grid when reading SAR): the footprint is then resampled (bilinear) onto it.
        Parts outside this raster come back as NaN / invalid.

        Returns ``(array float32 (C, height, width) with NaN at nodata, valid bool (height, width))``.
        """
        if grid.crs != self.grid.crs:
            raise ValueError(f"grid CRS {crs_name(grid.crs)} != raster CRS {crs_name(self.crs)}; open it with crs=")
        out = np.full((self.count, height, width), np.nan, dtype=np.float32)
        valid = np.zeros((height, width), dtype=bool)
        if grid.same_as(self.grid):
            r0, r1 = max(row, 0), min(row + height, self.grid.height)
            c0, c1 = max(col, 0), min(col + width, self.grid.width)
            if r1 <= r0 or c1 <= c0:
                return out, valid
            a, v = self._read(Window(c0, r0, c1 - c0, r1 - r0), None)
            out[:, r0 - row : r1 - row, c0 - col : c1 - col] = a
            valid[r0 - row : r1 - row, c0 - col : c1 - col] = v
            return out, valid
        # Different grid, same CRS: map the target pixels that fall inside this raster.
        minx, miny, maxx, maxy = grid.window_bounds(row, col, height, width)
        sminx, sminy, smaxx, smaxy = self.grid.bounds
        dx, dy = grid.res_x, grid.res_y
        j0 = max(0, math.ceil((max(minx, sminx) - minx) / dx - _EPS))
        j1 = min(width, math.floor((min(maxx, smaxx) - minx) / dx + _EPS))
        i0 = max(0, math.ceil((maxy - min(maxy, smaxy)) / dy - _EPS))
        i1 = min(height, math.floor((maxy - max(miny, sminy)) / dy + _EPS))
        if j1 <= j0 or i1 <= i0:
            return out, valid
        sx0, sy0 = self.grid.transform.c, self.grid.transform.f
        col_off = (minx + j0 * dx - sx0) / self.grid.res_x
        row_off = (sy0 - (maxy - i0 * dy)) / self.grid.res_y
        win_w = (j1 - j0) * dx / self.grid.res_x
        win_h = (i1 - i0) * dy / self.grid.res_y
        col_off, row_off, win_w, win_h = (_snap(v) for v in (col_off, row_off, win_w, win_h))
        col_off, row_off = max(0.0, col_off), max(0.0, row_off)
        win_w = min(win_w, self.grid.width - col_off)
        win_h = min(win_h, self.grid.height - row_off)
        a, v = self._read(Window(col_off, row_off, win_w, win_h), (i1 - i0, j1 - j0))
        out[:, i0:i1, j0:j1] = a
        valid[i0:i1, j0:j1] = v
        return out, valid

    def read_bounds(self, bounds: Bounds, out_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Read the footprint ``bounds`` (metres, working CRS) resampled to ``out_shape`` (h, w) pixels."""
        return self.read_on(footprint_grid(self.crs, bounds, out_shape), 0, 0, *out_shape)


def footprint_grid(crs: CRS, bounds: Bounds, out_shape: tuple[int, int]) -> Grid:
    """The north-up grid of ``out_shape`` (h, w) pixels exactly covering ``bounds`` (minx,
    miny, maxx, maxy metres in ``crs``); ValueError for an empty footprint or shape."""
    minx, miny, maxx, maxy = bounds
    h, w = out_shape
    if not (maxx > minx and maxy > miny and h > 0 and w > 0):
        raise ValueError(f"empty footprint {bounds} or output shape {out_shape}")
    return Grid(crs, Affine((maxx - minx) / w, 0.0, minx, 0.0, -(maxy - miny) / h, maxy), w, h)


def normalized_bounds(b: Sequence[float]) -> Bounds:
    """(minx, miny, maxx, maxy) of a box given by two corners in any order (a south-up
    raster's rasterio ``bounds`` has bottom > top)."""
    x0, y0, x1, y1 = (float(v) for v in b)
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def _snap(v: float) -> float:
    r = round(v)
    return float(r) if abs(v - r) < _EPS else v


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_not_truncated(src: Any, path: Path, role: str) -> None:
    """Fail early on a truncated GeoTIFF: its last block must end inside the file.

    GDAL opens a truncated TIFF happily (the header is at the start) and only fails when the
    missing blocks are read, possibly after minutes of work; this looks at two tags instead.
    """
    if src.driver != "GTiff":
        return
    try:
        size = os.path.getsize(path)
        bh, bw = src.block_shapes[0]
        nbx, nby = -(-src.width // bw), -(-src.height // bh)
        for bidx in sorted({1, src.count}):
            for bx, by in ((0, 0), (nbx - 1, nby - 1)):
                off = src.get_tag_item(f"BLOCK_OFFSET_{bx}_{by}", "TIFF", bidx=bidx)
                nbytes = src.get_tag_item(f"BLOCK_SIZE_{bx}_{by}", "TIFF", bidx=bidx)
                if off and nbytes and int(off) + int(nbytes) > size:
                    raise DataError(
                        f"the {role} raster {path} is truncated: block ({bx}, {by}) ends at byte "
                        f"{int(off) + int(nbytes)} but the file has {size} bytes; re-copy or re-export it"
                    )
    except (RasterioError, ValueError, OSError):
        return  # the tags are a shortcut only; a bad block is still caught when read


def open_raster(
    path: str | os.PathLike[str],
    bands: Sequence[int] | None = None,
    crs: str | CRS | None = None,
    grid: Grid | None = None,
    role: str = "input",
    shift_m: tuple[float, float] | None = None,
) -> RasterSource:
    """Open and validate a raster; view it in a metric CRS.

    - ``bands``: 1-based band indexes to use (default all); an index beyond the raster is a
      :class:`DataError`.
    - ``crs``: working CRS; default :func:`working_crs` (the raster's own CRS when it is
      metric and true to scale at the data, else the local UTM zone of the raster centre).
      An explicit CRS must pass the same test (:class:`DataError` naming the scale factor or
      unit otherwise); one PROJ does not know is a :class:`ConfigError`.
    - ``grid``: warp onto exactly this grid (e.g. SAR onto the optical map's grid); implies
      its CRS.
    - ``shift_m``: move the file's georeferencing by (east, north) metres of the working CRS
      before anything is read: a measured misregistration (``cmpc data coregistration``;
      ``tile.register``). The translation is carried into the file's own CRS at its centre,
      and the file is then always read through a ``WarpedVRT`` (sub-pixel shifts resample).
    A geographic, rotated or differently projected raster is viewed through a lazy
    ``WarpedVRT`` (bilinear; an alpha band marks the warped footprint), so reads stay windowed.
    A south-up (or east-to-west) raster in its working CRS is read through mirrored windows
    on the equivalent north-up grid, without resampling.

    Raises :class:`DataError` (one line) for a missing, corrupt or truncated file, a raster
    without CRS or geotransform, or a bad band index.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{role} raster not found: {p}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NotGeoreferencedWarning is turned into a DataError below
            src = rasterio.open(p)
    except RasterioError as e:
        raise DataError(f"cannot open the {role} raster {p}: {_first_line(e)} (corrupt, truncated or not a GeoTIFF?)") from None
    try:
        if src.crs is None:
            raise DataError(f"the {role} raster {p} has no CRS; assign one (e.g. gdal_edit.py -a_srs EPSG:32631 {p.name})")
        if src.transform == Affine.identity() and not src.gcps[0]:
            raise DataError(f"the {role} raster {p} has no geotransform; georeference it first")
        if src.count < 1 or src.width < 1 or src.height < 1:
            raise DataError(f"the {role} raster {p} is empty ({src.count} bands, {src.width}x{src.height} px)")
        sel = list(range(1, src.count + 1)) if bands is None else [int(b) for b in bands]
        if not sel:
            raise DataError(f"no bands selected for the {role} raster {p}")
        bad = [b for b in sel if b < 1 or b > src.count]
        if bad:
            raise DataError(
                f"band index {bad[0]} is beyond the {role} raster {p.name}, which has {src.count} band(s) "
                f"(1-based indexes 1..{src.count})"
            )
        _check_not_truncated(src, p, role)
        dtypes = {src.dtypes[b - 1] for b in sel}
        dtype = np.result_type(*sorted(dtypes)).name if len(dtypes) > 1 else dtypes.pop()
        nodata = src.nodatavals[sel[0] - 1]
        descriptions = [src.descriptions[b - 1] for b in sel]

        src_bounds = normalized_bounds(src.bounds)
        if grid is not None:
            target_crs, reason = grid.crs, f"warped onto a given grid in {crs_name(grid.crs)}"
        elif crs is not None:
            target_crs = parse_crs(crs, "the working CRS")
            reason = f"{crs_name(target_crs)} as requested"
            _check_requested_crs(target_crs, src.crs, src_bounds, p, role)
        else:
            try:
                target_crs, reason = working_crs(src.crs, src_bounds)
            except (RasterioError, ValueError) as e:
                raise DataError(
                    f"cannot place the {role} raster {p} ({crs_name(src.crs)}) in a metric CRS: {_first_line(e)}; "
                    f"reproject it to its UTM zone first"
                ) from None
        if target_crs.is_geographic:
            raise DataError(f"working CRS {crs_name(target_crs)} is geographic (degrees); positions must be metres: use a projected CRS")
        src_transform = src.transform
        if shift_m is not None and (shift_m[0] or shift_m[1]):
            src_transform = Affine.translation(*_native_translation(src.crs, src_bounds, target_crs, shift_m)) * src.transform
        own_grid = Grid(src.crs, src_transform, src.width, src.height)
        t = src_transform
        flip_y = flip_x = False
        if target_crs == src.crs and t.b == 0 and t.d == 0 and t.a != 0 and t.e != 0 and not _is_north_up(t):
            # Axis-aligned but south-up and/or east-to-west: the same pixels on a north-up grid.
            flip_x, flip_y = t.a < 0, t.e > 0
            own_grid = Grid(
                src.crs,
                Affine(abs(t.a), 0.0, min(t.c, t.c + t.a * src.width), 0.0, -abs(t.e), max(t.f, t.f + t.e * src.height)),
                src.width, src.height,
            )
        need_warp = (target_crs != src.crs or not _is_north_up(own_grid.transform) or (grid is not None and not grid.same_as(own_grid))
                     or src_transform != src.transform)
        if not need_warp:
            flags = src.mask_flag_enums[sel[0] - 1]
            per_dataset = MaskFlags.per_dataset in flags or MaskFlags.alpha in flags
            return RasterSource(
                path=p, role=role, dataset=src, bands=sel, grid=own_grid, source_crs=src.crs,
                source_dtype=dtype, nodata=nodata, warped=False, descriptions=descriptions, crs_reason=reason,
                _file=src, _alpha=None, _dataset_mask=per_dataset, _flip_y=flip_y, _flip_x=flip_x,
            )
        kwargs: dict[str, Any] = {"crs": target_crs, "resampling": Resampling.bilinear, "add_alpha": True}
        if src_transform != src.transform:
            kwargs["src_transform"] = src_transform
        if grid is not None:
            kwargs.update(transform=grid.transform, width=grid.width, height=grid.height)
        if nodata is not None:
            kwargs.update(src_nodata=nodata, nodata=nodata)
        try:
            vrt = WarpedVRT(src, **kwargs)
        except RasterioError as e:
            raise DataError(f"cannot reproject the {role} raster {p} to {crs_name(target_crs)}: {_first_line(e)}") from None
        if not _is_north_up(vrt.transform):
            vrt.close()
            raise DataError(f"the {role} raster {p} cannot be warped to a north-up grid in {crs_name(target_crs)}")
        return RasterSource(
            path=p, role=role, dataset=vrt, bands=sel,
            grid=Grid(target_crs, vrt.transform, vrt.width, vrt.height), source_crs=src.crs,
            source_dtype=dtype, nodata=nodata, warped=True, descriptions=descriptions, crs_reason=reason,
            _file=src, _alpha=vrt.count, _dataset_mask=False, shift_m=(float(shift_m[0]), float(shift_m[1])) if shift_m else (0.0, 0.0),
            _shift=(src_transform.c - src.transform.c, src_transform.f - src.transform.f),
        )
    except BaseException:
        src.close()
        raise


def _native_translation(src_crs: CRS, src_bounds: Bounds, crs: CRS, shift_m: tuple[float, float]) -> tuple[float, float]:
    """The translation, in ``src_crs`` units, that moves the point at the centre of
    ``src_bounds`` by ``shift_m`` (east, north) metres of ``crs`` (the same numbers when the
    CRSs agree; 1.2x in World Mercator at 34 N)."""
    if src_crs == crs:
        return float(shift_m[0]), float(shift_m[1])
    from rasterio.warp import transform

    cx, cy = (src_bounds[0] + src_bounds[2]) / 2.0, (src_bounds[1] + src_bounds[3]) / 2.0
    (x,), (y,) = transform(src_crs, crs, [cx], [cy])
    (bx,), (by,) = transform(crs, src_crs, [x + float(shift_m[0])], [y + float(shift_m[1])])
    return float(bx - cx), float(by - cy)


def scale_problem(target: CRS, src_crs: CRS, src_bounds: Bounds) -> str | None:
    """Why ``target`` cannot hold data of ``src_crs`` covering ``src_bounds`` (given in
    ``src_crs``) in ground metres (geographic, another unit, or a point scale factor beyond
    :data:`SCALE_TOLERANCE` there, e.g. a UTM zone far from its own), or None when it can.
    Raises RasterioError / ValueError when the bounds cannot be expressed in ``target``."""
    if target.is_geographic:
        return "it is geographic (degrees)"
    b = src_bounds if target == src_crs else normalized_bounds(transform_bounds(src_crs, target, *src_bounds, densify_pts=21))
    return _metric_problem(target, b)[0]


def _check_requested_crs(target: CRS, src_crs: CRS, src_bounds: Bounds, path: Path, role: str) -> None:
    """An explicitly requested working CRS must be metric and true to scale at the data."""
    if target.is_geographic:
        return  # refused by the caller with its own message
    try:
        problem = scale_problem(target, src_crs, src_bounds)
    except (RasterioError, ValueError) as e:
        raise DataError(f"cannot express the {role} raster {path} in the working CRS {crs_name(target)}: {_first_line(e)}") from None
    if problem is not None:
        raise DataError(
            f"the working CRS {crs_name(target)} cannot hold positions in metres for the {role} raster {path}: {problem}; "
            f"leave the CRS unset (the local UTM zone is used) or give a metric CRS such as the raster's UTM zone"
        )


# --------------------------------------------------------------------------- checks


def check_same_crs(sar: RasterSource | CRS, optical: RasterSource | CRS, sar_name: str = "SAR", optical_name: str = "optical") -> None:
    """Raise :class:`DataError` naming both CRSs when the SAR and optical source CRSs differ."""
    a = sar.source_crs if isinstance(sar, RasterSource) else sar
    b = optical.source_crs if isinstance(optical, RasterSource) else optical
    if a != b:
        raise DataError(
            f"CRS mismatch: the {sar_name} raster is in {crs_name(a)} but the {optical_name} raster is in "
            f"{crs_name(b)}; reproject one of them or set tile.reproject=true (--reproject)"
        )


def overlap_bounds(a: Bounds, b: Bounds) -> Bounds | None:
    """Intersection of two (minx, miny, maxx, maxy) boxes, or None when they do not overlap."""
    minx, miny = max(a[0], b[0]), max(a[1], b[1])
    maxx, maxy = min(a[2], b[2]), min(a[3], b[3])
    if maxx <= minx or maxy <= miny:
        return None
    return (minx, miny, maxx, maxy)


def source_bounds_in(src: RasterSource, crs: CRS) -> Bounds:
    """Bounds of ``src``'s data in ``crs`` (metres)."""
    if src.crs == crs:
        return src.grid.bounds
    return tuple(transform_bounds(src.crs, crs, *src.grid.bounds, densify_pts=21))  # type: ignore[return-value]


# --------------------------------------------------------------------------- streaming


@dataclass
class RasterPatch:
    """One square patch cut from a raster.

    ``array``: float32 (C, p, p), NaN at nodata. ``x``, ``y``: footprint centre, metres in
    ``crs``. ``bounds``: (minx, miny, maxx, maxy) metres. ``window``: pixel window in the
    working grid. ``valid_frac``: share of valid (not nodata) pixels in [0, 1].
    """

    array: np.ndarray
    x: float
    y: float
    bounds: Bounds
    window: Window
    valid_frac: float
    crs: str


def block_groups(
    tops: np.ndarray, lefts: np.ndarray, block_px: int, origin: tuple[int, int] = (0, 0)
) -> list[np.ndarray]:
    """Group patch top-left pixels (rows ``tops``, cols ``lefts``) into square read blocks.

    Patches whose top-left falls in the same ``block_px`` x ``block_px`` cell are cut from one
    read covering them all, so a raster is read in ~block-sized windows (plus one patch of
    overlap), never whole. Returns index arrays, one per non-empty block, in row-major block
    order; within a block the input order is kept.
    """
    if len(tops) == 0:
        return []
    by = (np.asarray(tops) - origin[0]) // block_px
    bx = (np.asarray(lefts) - origin[1]) // block_px
    key = by.astype(np.int64) * (int(bx.max()) + 1) + bx.astype(np.int64)
    order = np.argsort(key, kind="stable")
    ks = key[order]
    cuts = np.flatnonzero(np.diff(ks)) + 1
    return [g for g in np.split(order, cuts)]


def grid_positions(height: int, width: int, patch_px: int, stride_px: int, row0: int = 0, col0: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top-left pixels (rows, cols) of a regular grid of ``patch_px`` windows fully inside
    rows [row0, row0+height) and cols [col0, col0+width), row-major."""
    if height < patch_px or width < patch_px:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    rows = np.arange(row0, row0 + height - patch_px + 1, stride_px, dtype=np.int64)
    cols = np.arange(col0, col0 + width - patch_px + 1, stride_px, dtype=np.int64)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    return rr.ravel(), cc.ravel()


def iter_raster_patches(
    path: str | os.PathLike[str] | RasterSource,
    patch_px: int,
    stride_px: int | None = None,
    bands: Sequence[int] | None = None,
    *,
    crs: str | CRS | None = None,
    block_px: int = 1024,
    nodata_max_frac: float = 1.0,
    on_read: Callable[[Window], None] | None = None,
) -> Iterator[RasterPatch]:
    """Stream square patches on a regular grid over a raster, block by block.

    ``patch_px``/``stride_px`` are pixels of the working grid (stride default ``patch_px//2``,
    50 % overlap); a raster whose CRS is not metric at the data is warped to its local UTM
    zone (or to ``crs``; see :func:`working_crs`), so ``x``, ``y`` and ``bounds`` are
    metres. Reads are windows of at most
    ``block_px + patch_px`` pixels a side (``on_read`` sees each read window), so memory does
    not grow with the raster. Patches with more than ``nodata_max_frac`` nodata are skipped.
    Patches come in block order (row-major over blocks, row-major inside a block).
    """
    if patch_px < 1:
        raise ValueError("patch_px must be >= 1")
    stride = stride_px or max(1, patch_px // 2)
    own = not isinstance(path, RasterSource)
    src = open_raster(path, bands=bands, crs=crs) if own else path  # type: ignore[arg-type]
    try:
        g = src.grid
        tops, lefts = grid_positions(g.height, g.width, patch_px, stride)
        block = max(block_px, stride)
        crs_s = crs_name(g.crs)
        for idx in block_groups(tops, lefts, block):
            r0, c0 = int(tops[idx].min()), int(lefts[idx].min())
            h, w = int(tops[idx].max()) + patch_px - r0, int(lefts[idx].max()) + patch_px - c0
            if on_read is not None:
                on_read(Window(c0, r0, w, h))
            arr, valid = src.read_on(g, r0, c0, h, w)
            for i in idx:
                r, c = int(tops[i]) - r0, int(lefts[i]) - c0
                v = float(valid[r : r + patch_px, c : c + patch_px].mean())
                if 1.0 - v > nodata_max_frac:
                    continue
                x, y = g.window_centre(int(tops[i]), int(lefts[i]), patch_px)
                yield RasterPatch(
                    array=arr[:, r : r + patch_px, c : c + patch_px].copy(),
                    x=x,
                    y=y,
                    bounds=g.window_bounds(int(tops[i]), int(lefts[i]), patch_px, patch_px),
                    window=Window(int(lefts[i]), int(tops[i]), patch_px, patch_px),
                    valid_frac=v,
                    crs=crs_s,
                )
    finally:
        if own:
            src.close()


def read_patch_at(
    src_or_path: RasterSource | str | os.PathLike[str],
    bounds: Bounds,
    out_px: int,
    bands: Sequence[int] | None = None,
    *,
    crs: str | CRS | None = None,
) -> np.ndarray:
    """Read the footprint ``bounds`` (minx, miny, maxx, maxy; metres in the source's working
    CRS) as float32 (C, out_px, out_px), resampled (bilinear) when the raster's GSD differs.

    Nodata and pixels outside the raster are NaN. With a path, the raster is opened (a
    non-metric one in its local UTM zone, or ``crs``) and closed again. With an open
    :class:`RasterSource`, ``bands`` (source band indexes) picks among its selected bands.
    """
    if isinstance(src_or_path, RasterSource):
        arr, _ = src_or_path.read_bounds(bounds, (out_px, out_px))
        if bands is None:
            return arr
        missing = [b for b in bands if b not in src_or_path.bands]
        if missing:
            raise DataError(f"band {missing[0]} is not among the opened bands {src_or_path.bands} of {src_or_path.path}")
        return arr[[src_or_path.bands.index(b) for b in bands]]
    with open_raster(src_or_path, bands=bands, crs=crs) as src:
        arr, _ = src.read_bounds(bounds, (out_px, out_px))
        return arr
