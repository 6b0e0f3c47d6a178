"""CRS names and comparisons for map and query metadata (pyproj, imported lazily).

A CRS is carried as a string: ``"EPSG:n"`` when it has an EPSG code, else WKT
(:func:`normalize_crs`). :func:`dataset_crs` is the map CRS of a CMPC dataset, read from
``dataset.json`` or the annotations' ``crs``; the index build records it in the index
manifest and localization compares queries against it (:func:`crs_equal`).
"""

from __future__ import annotations

from typing import Any

from cmpc.data.layout import Annotation
from cmpc.errors import DataError


def normalize_crs(crs: Any) -> str | None:
    """A CRS (EPSG string, WKT, rasterio/pyproj object) as ``"EPSG:n"`` when it has a code, else WKT."""
    if crs is None or crs == "":
        return None
    from pyproj import CRS

    try:
        c = CRS.from_user_input(crs if isinstance(crs, (str, int)) else str(crs))
    except Exception:
        return str(crs)
    code = c.to_epsg()
    return f"EPSG:{code}" if code is not None else c.to_wkt()


def crs_equal(a: Any, b: Any) -> bool:
    """True when two CRS descriptions denote the same CRS (axis order ignored)."""
    from pyproj import CRS

    try:
        return CRS.from_user_input(normalize_crs(a)).equals(CRS.from_user_input(normalize_crs(b)), ignore_axis_order=True)
    except Exception:
        return normalize_crs(a) == normalize_crs(b)


def dataset_crs(dataset_meta: dict[str, Any], refs: list[Annotation]) -> str | None:
    """The map CRS from ``dataset.json`` (``dataset_meta``) or the annotations' ``crs``; None when unknown.

    Several different CRSs among them are a one-line :class:`DataError` (one map, one CRS).
    """
    found = {normalize_crs(a.crs) for a in refs if a.crs}
    if dataset_meta.get("crs"):
        found.add(normalize_crs(dataset_meta["crs"]))
    if len(found) > 1:
        raise DataError(f"references mix several CRSs {sorted(found)}; one map must have one CRS")
    return found.pop() if found else None
