"""Position priors: restrict the candidate references to a polygon or a disc.

A prior comes from ``localize.prior`` (a GeoJSON/GeoPackage polygon file) and/or
``localize.prior_center`` + ``localize.prior_radius_m`` (metres, map CRS). A reference is
a candidate when its centre lies inside every prior given. The result is the sorted array
of allowed index rows passed to :meth:`ReferenceIndex.search`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cmpc.config import LocalizeConfig
from cmpc.data.crs import crs_equal
from cmpc.errors import ConfigError, DataError
from cmpc.index.store import ReferenceIndex


def read_prior_polygon(path: str | os.PathLike[str], map_crs: str | None):  # noqa: ANN201 - shapely geometry
    """The union of the polygons in ``path``, in the map CRS.

    A file whose CRS differs from the map's is reprojected. GeoJSON without a ``crs`` member
    is read as WGS 84 by GDAL; if its coordinates cannot be degrees (|x| > 180 or |y| > 90)
    they are taken as metres in the map CRS, which is what a hand-written prior usually is.
    """
    import geopandas as gpd

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"localize.prior: file not found: {p}")
    try:
        gdf = gpd.read_file(p)
    except Exception as e:  # pyogrio raises DataSourceError and friends for unreadable files
        raise DataError(f"localize.prior: cannot read {p} as GeoJSON/GeoPackage: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    gdf = gdf[gdf.geometry.notna()]
    polys = gdf[gdf.geometry.geom_type.isin(["Polygon", "MultiPolygon"])]
    if polys.empty:
        raise DataError(f"localize.prior: {p} holds no polygon")
    if polys.crs is not None and map_crs is not None and not crs_equal(polys.crs, map_crs):
        minx, miny, maxx, maxy = polys.total_bounds
        looks_metric = max(abs(minx), abs(maxx)) > 180 or max(abs(miny), abs(maxy)) > 90
        if not (polys.crs.is_geographic and looks_metric):
            polys = polys.to_crs(map_crs)
    return polys.geometry.union_all()


def prior_rows(cfg: LocalizeConfig, index: ReferenceIndex) -> np.ndarray | None:
    """Sorted index rows allowed by the prior(s) in ``cfg``; None when no prior is set.

    Raises :class:`ConfigError` for a half-given centre/radius and :class:`DataError` when
    the prior leaves no reference.
    """
    mask: np.ndarray | None = None
    described: list[str] = []
    x, y = index.positions[:, 0], index.positions[:, 1]
    if cfg.prior:
        import shapely

        geom = read_prior_polygon(cfg.prior, index.crs)
        mask = shapely.contains_xy(geom, x, y)
        described.append(f"polygon {cfg.prior}")
    if cfg.prior_center is not None or cfg.prior_radius_m is not None:
        if cfg.prior_center is None or cfg.prior_radius_m is None:
            raise ConfigError("localize.prior_center and localize.prior_radius_m go together (centre [x, y] metres and radius metres)")
        if len(cfg.prior_center) != 2:
            raise ConfigError(f"localize.prior_center must be [x, y] metres, got {cfg.prior_center}")
        cx, cy = (float(v) for v in cfg.prior_center)
        disc = np.hypot(x - cx, y - cy) <= float(cfg.prior_radius_m)
        mask = disc if mask is None else mask & disc
        described.append(f"disc of {cfg.prior_radius_m:g} m around ({cx:.1f}, {cy:.1f})")
    if mask is None:
        return None
    rows = np.flatnonzero(mask).astype(np.int64)
    if len(rows) == 0:
        ext = ", ".join(f"{v:.1f}" for v in index.extent)
        raise DataError(
            f"the prior ({' and '.join(described)}) contains no reference centre of index {index.directory} "
            f"(map extent {ext}, {index.crs}); widen it or check its coordinates"
        )
    return rows
