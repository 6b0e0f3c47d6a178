"""``cmpc data join OUT.tif A.tif B.tif ...``: several map rasters (e.g. Sentinel-2 tiles) as one GeoTIFF.

An index is built from one raster (``cmpc index build --raster``), and fine alignment and
scene georeferencing read the map back from it; a map that comes as several files is joined
first. rasterio's :func:`rasterio.merge.merge` does the work window by window straight into
the output file (``mem_limit`` MB of memory, never the whole mosaic), where files overlap the
first one listed wins. Files in another CRS than the target (the first file's, or ``crs``) are
viewed through a ``WarpedVRT`` onto it (bilinear, as the tiler does). The output takes the
first file's pixel size, band count, band descriptions and nodata (0 when it has none), tiled
and deflate-compressed, written to a temporary name and renamed when complete.

Refused in one line (:class:`~cmpc.errors.DataError`), before anything is written: fewer than
two files, unreadable files, band counts or data types that differ, an output that is one of
the inputs, and files so far apart that most of their joint extent would be empty
(``max_empty``, default 0.5 of the union's bounding box: index them as separate maps).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError
from rasterio.merge import merge
from rasterio.vrt import WarpedVRT
from shapely.geometry import box
from shapely.ops import unary_union

from cmpc.data.raster import crs_name
from cmpc.errors import DataError
from cmpc.utils.io import atomic_path


def join_rasters(
    inputs: list[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    crs: str | None = None,
    max_empty: float = 0.5,
    mem_limit_mb: int = 256,
) -> dict[str, Any]:
    """Join ``inputs`` into one GeoTIFF at ``output`` (module doc). Returns what was written:
    size in pixels, CRS, pixel size (CRS units), bounds and the empty fraction of the extent."""
    paths = [Path(p) for p in inputs]
    out = Path(output)
    if len(paths) < 2:
        raise DataError(f"cmpc data join needs at least two rasters, got {len(paths)}")
    if any(out.resolve() == p.resolve() for p in paths if p.exists()):
        raise DataError(f"the output {out} is one of the inputs: choose another name")
    with contextlib.ExitStack() as stack:
        srcs = []
        for p in paths:
            if not p.is_file():
                raise DataError(f"raster not found: {p}")
            try:
                srcs.append(stack.enter_context(rasterio.open(p)))
            except RasterioIOError as e:
                raise DataError(f"{p} is not a readable raster: {str(e).splitlines()[0]}") from None
        first = srcs[0]
        if first.crs is None:
            raise DataError(f"{paths[0]} has no CRS: a map must be georeferenced")
        for p, s in zip(paths[1:], srcs[1:]):
            if s.crs is None:
                raise DataError(f"{p} has no CRS: a map must be georeferenced")
            if s.count != first.count:
                raise DataError(f"{p} has {s.count} band(s), {paths[0]} {first.count}: join rasters of the same bands")
            if s.dtypes[0] != first.dtypes[0]:
                raise DataError(f"{p} is {s.dtypes[0]}, {paths[0]} {first.dtypes[0]}: join rasters of one data type (cmpc data convert-s2 first)")
        target = CRS.from_user_input(crs) if crs else first.crs
        nodata = first.nodata if first.nodata is not None else 0
        views = [s if s.crs == target else stack.enter_context(WarpedVRT(s, crs=target, resampling=Resampling.bilinear, src_nodata=s.nodata if s.nodata is not None else 0, nodata=nodata))
                 for s in srcs]
        res = views[0].res
        boxes = [box(*v.bounds) for v in views]
        union = unary_union(boxes)
        minx, miny, maxx, maxy = union.bounds
        empty = 1.0 - union.area / ((maxx - minx) * (maxy - miny))
        if empty > max_empty:
            raise DataError(f"the rasters are far apart: {100 * empty:.0f} % of their joint extent would be empty "
                            f"(over {100 * max_empty:.0f} %): index them as separate maps")
        out.parent.mkdir(parents=True, exist_ok=True)
        kw = {"driver": "GTiff", "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate", "BIGTIFF": "IF_SAFER"}
        with atomic_path(out) as tmp:
            merge(views, res=res, nodata=nodata, resampling=Resampling.nearest, method="first", mem_limit=mem_limit_mb,
                  dst_path=tmp, dst_kwds=kw)
            names = list(first.descriptions)
            if any(names):
                with rasterio.open(tmp, "r+") as dst:
                    for i, d in enumerate(names, start=1):
                        if d:
                            dst.set_band_description(i, d)
        with rasterio.open(out) as dst:
            return {"output": str(out), "inputs": [str(p) for p in paths], "width": dst.width, "height": dst.height,
                    "bands": dst.count, "dtype": dst.dtypes[0], "crs": crs_name(dst.crs), "res": [float(dst.res[0]), float(dst.res[1])],
                    "bounds": [float(v) for v in dst.bounds], "empty_fraction": round(empty, 4), "nodata": dst.nodata}
