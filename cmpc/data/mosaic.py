"""Many SAR / optical scene pairs as maps (``cmpc data tile --pairs FOLDER|LIST``).

- **Pairs** (:func:`find_pairs`): a folder of ``NAME_sar.tif`` / ``NAME_optical.tif`` files
  (matched by ``NAME``; an unmatched file is an error), or a JSON list
  (``[{"name": .., "sar": .., "optical": ..}, ...]`` or ``[[sar, optical], ...]``) or a CSV
  with a header ``sar,optical[,name]``; relative paths in a list are relative to the list.
  Pairs are ordered by name (numerically when the names are numbers).
- **Maps** (:func:`group_pairs`): pairs whose optical footprints touch or overlap in the
  working CRS (within half a pixel) form one map (connected components); separate ones are
  separate maps. Footprints are the real quadrilaterals (edges densified), not their boxes:
  a Mercator file viewed in UTM is slightly rotated, so the boxes of diagonal neighbours
  overlap while the files only share a corner.
- **Reading** (:class:`MosaicSource`): each file is viewed through its own lazy ``WarpedVRT``
  straight onto the map's grid (one resampling, bilinear, as for a single pair), and a read
  of a window composites only the files whose footprint meets it. Nothing is ever read
  whole: memory is one window per file touched. Where files overlap, **the pair that comes
  first (lowest file number) wins** at every pixel where it has data; the others fill only
  what it lacks. SAR and optical follow the same rule, so a pixel's SAR and optical come
  from the same pair wherever both files have data.
- **Working CRS**: one for all maps (``tile.crs``, else :func:`cmpc.data.raster.working_crs`
  of the union of the optical files: World Mercator at 34 N becomes UTM 11N), so every
  position of the dataset is in the same metres.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine
from rasterio.crs import CRS

from cmpc.data.raster import Bounds, Grid, RasterSource, crs_name, footprint_grid, normalized_bounds, open_raster, parse_crs, working_crs
from cmpc.errors import DataError

_SUFFIXES = (".tif", ".tiff")


# --------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class ScenePair:
    """One co-registered scene: ``name`` (e.g. ``"063"``), the SAR and optical GeoTIFF paths."""

    name: str
    sar: Path
    optical: Path


def _name_key(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def find_pairs(source: str | os.PathLike[str]) -> list[ScenePair]:
    """The scene pairs of a folder (``NAME_sar.tif`` + ``NAME_optical.tif``) or of a JSON / CSV
    list; ordered by name (numbers numerically). :class:`DataError` (one line) when the
    folder holds no pair, a file has no partner, or a listed file is missing."""
    src = Path(source)
    if src.is_dir():
        found: dict[str, dict[str, Path]] = {}
        for p in sorted(src.iterdir()):
            m = re.fullmatch(r"(.+)_(sar|optical)(\.tiff?)", p.name, flags=re.IGNORECASE)
            if m and p.is_file():
                found.setdefault(m.group(1), {})[m.group(2).lower()] = p
        if not found:
            raise DataError(f"no scene pairs in {src}: expected files named NAME_sar.tif and NAME_optical.tif")
        lone = sorted((n, next(iter(d))) for n, d in found.items() if len(d) != 2)
        if lone:
            n, have = lone[0]
            other = "optical" if have == "sar" else "sar"
            raise DataError(f"{src}: {n}_{have} has no {n}_{other}.tif partner ({len(lone)} unmatched file(s)); add it or move the file away")
        pairs = [ScenePair(n, d["sar"], d["optical"]) for n, d in found.items()]
    elif src.is_file():
        pairs = _pairs_from_list(src)
    else:
        raise DataError(f"scene pairs not found: {src} is neither a folder nor a JSON/CSV list of pairs")
    names = [p.name for p in pairs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"{src}: the pair name {dup[0]!r} appears more than once; names must be unique")
    for p in pairs:
        for role, path in (("SAR", p.sar), ("optical", p.optical)):
            if not path.is_file():
                raise DataError(f"{src}: the {role} file of pair {p.name!r} is missing: {path}")
    return sorted(pairs, key=lambda p: _name_key(p.name))


def _pairs_from_list(path: Path) -> list[ScenePair]:
    base = path.parent
    rows: list[dict[str, Any]] = []
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(raw, list):
                raise DataError(f"{path}: expected a JSON list of pairs ([{{\"sar\": .., \"optical\": ..}}, ...])")
            for i, r in enumerate(raw):
                if isinstance(r, list) and len(r) == 2:
                    rows.append({"sar": r[0], "optical": r[1]})
                elif isinstance(r, dict):
                    rows.append(r)
                else:
                    raise DataError(f"{path}: entry {i} is neither [sar, optical] nor {{\"sar\": .., \"optical\": ..}}")
        elif path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        else:
            raise DataError(f"{path}: a list of pairs must be .json or .csv (or give a folder)")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise DataError(f"cannot read the list of pairs {path}: {e}") from None
    if not rows:
        raise DataError(f"{path}: the list of pairs is empty")
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r.get("sar"), str) or not isinstance(r.get("optical"), str):
            raise DataError(f"{path}: pair {i} needs string 'sar' and 'optical' paths (CSV header: sar,optical[,name])")
        sar, opt = (Path(r[k]) if Path(r[k]).is_absolute() else base / r[k] for k in ("sar", "optical"))
        name = str(r.get("name") or "") or re.sub(r"_sar$", "", sar.stem, flags=re.IGNORECASE)
        out.append(ScenePair(name, sar, opt))
    return out


# --------------------------------------------------------------------------- footprints and maps


def _footprint(src: Any, crs: CRS) -> Any:
    """The raster's data outline in ``crs`` as a shapely polygon (edges densified)."""
    import shapely
    from rasterio.warp import transform as warp_transform

    minx, miny, maxx, maxy = normalized_bounds(src.bounds)
    n = 16
    t = np.linspace(0.0, 1.0, n, endpoint=False)
    xs = np.concatenate([minx + (maxx - minx) * t, np.full(n, maxx), maxx - (maxx - minx) * t, np.full(n, minx)])
    ys = np.concatenate([np.full(n, maxy), maxy - (maxy - miny) * t, np.full(n, miny), miny + (maxy - miny) * t])
    if src.crs != crs:
        xs, ys = warp_transform(src.crs, crs, xs.tolist(), ys.tolist())
    return shapely.Polygon(np.column_stack([xs, ys]))


@dataclass
class SceneMap:
    """Pairs tiled as one map: their footprints (working CRS) and the map's pixel grid."""

    pairs: list[ScenePair]
    footprints: list[Any]  # shapely polygons, one per pair (optical file)
    grid: Grid
    crs_reason: str = ""
    sar_footprints: list[Any] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.pairs]


def working_crs_of(pairs: list[ScenePair], crs: str | None = None) -> tuple[CRS, str]:
    """One working CRS for all ``pairs``: ``crs`` when given, else
    :func:`cmpc.data.raster.working_crs` of the union of the optical files' bounds."""
    import rasterio
    from rasterio.warp import transform_bounds

    if crs:
        c = parse_crs(crs, "tile.crs (--crs)")
        return c, f"{crs_name(c)} as requested"
    first_crs = None
    boxes = []
    for p in pairs:
        with rasterio.open(p.optical) as src:
            if src.crs is None:
                raise DataError(f"the optical raster {p.optical} has no CRS; assign one (gdal_edit.py -a_srs EPSG:xxxx)")
            first_crs = first_crs or src.crs
            b = normalized_bounds(src.bounds)
            boxes.append(b if src.crs == first_crs else transform_bounds(src.crs, first_crs, *b, densify_pts=21))
    arr = np.array(boxes, dtype=np.float64)
    union = (float(arr[:, 0].min()), float(arr[:, 1].min()), float(arr[:, 2].max()), float(arr[:, 3].max()))
    return working_crs(first_crs, union)


def group_pairs(pairs: list[ScenePair], crs: CRS, reason: str = "") -> list[SceneMap]:
    """Group ``pairs`` into maps: connected components of touching / overlapping optical
    footprints in ``crs`` (tolerance half a ground pixel). Each map gets a north-up grid over
    its union with square pixels of the mean ground pixel size of its files. Maps are
    ordered by their first pair."""
    import rasterio
    from rasterio.warp import calculate_default_transform

    polys, res = [], []
    sar_polys = []
    for p in pairs:
        try:
            with rasterio.open(p.optical) as src, rasterio.open(p.sar) as s_src:
                if src.crs is None or s_src.crs is None:
                    raise DataError(f"pair {p.name}: a raster without CRS; assign one first")
                polys.append(_footprint(src, crs))
                sar_polys.append(_footprint(s_src, crs))
                t, _, _ = calculate_default_transform(src.crs, crs, src.width, src.height, *src.bounds)
                res.append((abs(t.a) + abs(t.e)) / 2.0)
        except rasterio.errors.RasterioError as e:
            raise DataError(f"cannot open pair {p.name} ({p.optical}, {p.sar}): {str(e).splitlines()[0]}") from None
    n = len(pairs)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            tol = 0.5 * min(res[i], res[j])
            if polys[i].distance(polys[j]) <= tol:
                parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    maps = []
    for members in sorted(groups.values(), key=lambda g: g[0]):
        r = float(np.mean([res[i] for i in members]))
        b = np.array([polys[i].bounds for i in members])
        minx, miny, maxx, maxy = b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()
        w, h = int(math.ceil((maxx - minx) / r - 1e-6)), int(math.ceil((maxy - miny) / r - 1e-6))
        grid = Grid(crs, Affine(r, 0.0, float(minx), 0.0, -r, float(maxy)), w, h)
        maps.append(SceneMap([pairs[i] for i in members], [polys[i] for i in members], grid, reason, [sar_polys[i] for i in members]))
    return maps


# --------------------------------------------------------------------------- reading


class MosaicSource:
    """Several rasters of one modality read as one, on a map grid (see the module doc).

    Offers what the tiler reads from a :class:`~cmpc.data.raster.RasterSource`: ``grid``,
    ``count``, ``bands``, ``source_dtype``, ``nodata``, ``descriptions``, ``read_on``,
    ``describe``, ``close``; ``source_crs`` / ``source_bounds`` are the working CRS and the
    union of the files' footprints in it.
    """

    def __init__(self, paths: list[Path], names: list[str], footprints: list[Any], grid: Grid, bands: list[int] | None, role: str, crs_reason: str = "",
                 shifts: list[tuple[float, float]] | None = None) -> None:
        """``shifts``: per file, (east, north) metres to move its georeferencing by (a measured
        misregistration, ``tile.register``; see :func:`cmpc.data.raster.open_raster`)."""
        self.role = role
        self.grid = grid
        self.names = names
        self.paths = paths
        self.crs_reason = crs_reason
        self.members: list[RasterSource] = []
        self.shifts = list(shifts) if shifts is not None else [(0.0, 0.0)] * len(paths)
        if len(self.shifts) != len(paths):
            raise ValueError(f"{len(self.shifts)} shifts for {len(paths)} files")
        self.boxes: list[Bounds] = [(f.bounds[0] + dx, f.bounds[1] + dy, f.bounds[2] + dx, f.bounds[3] + dy) for f, (dx, dy) in zip(footprints, self.shifts)]
        try:
            for p, sh in zip(paths, self.shifts):
                self.members.append(open_raster(p, bands=bands, grid=grid, role=role, shift_m=sh))
        except BaseException:
            self.close()
            raise
        first = self.members[0]
        for m in self.members[1:]:
            if m.count != first.count or m.source_dtype != first.source_dtype:
                raise DataError(
                    f"the {role} rasters of one map differ: {first.path.name} has {first.count} band(s) {first.source_dtype}, "
                    f"{m.path.name} {m.count} band(s) {m.source_dtype}; convert them to one format first (cmpc data convert-s1/-s2)"
                )
        self.bands = first.bands
        self.source_dtype = first.source_dtype
        self.nodata = first.nodata
        self.descriptions = first.descriptions
        self.source_crs = grid.crs
        self.warped = True
        b = np.array(self.boxes, dtype=np.float64)
        self.source_bounds: Bounds = (float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max()))

    @property
    def count(self) -> int:
        return len(self.bands)

    @property
    def crs(self) -> CRS:
        return self.grid.crs

    def read_on(self, grid: Grid, row: int, col: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Window (row, col, height, width) of ``grid`` (the map grid): float32 (C, h, w) with NaN
        at nodata, and the valid mask; files in pair order, the first with data wins."""
        out = np.full((self.count, height, width), np.nan, dtype=np.float32)
        valid = np.zeros((height, width), dtype=bool)
        wb = grid.window_bounds(row, col, height, width)
        for m, box in zip(self.members, self.boxes):
            if box[0] >= wb[2] or box[2] <= wb[0] or box[1] >= wb[3] or box[3] <= wb[1]:
                continue  # this file does not reach the window: no read at all
            a, v = m.read_on(grid, row, col, height, width)
            take = v & ~valid
            if take.any():
                out[:, take] = a[:, take]
                valid |= take
            if valid.all():
                break
        return out, valid

    def read_bounds(self, bounds: Bounds, out_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Read the footprint ``bounds`` (metres, working CRS) resampled to ``out_shape`` (h, w)
        pixels, composited as :meth:`read_on` does."""
        return self.read_on(footprint_grid(self.crs, bounds, out_shape), 0, 0, *out_shape)

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.paths[0].parent),
            "files": [str(p) for p in self.paths],
            "pairs": list(self.names),
            "crs": crs_name(self.crs),
            "warped": True,
            "crs_reason": self.crs_reason,
            "width": self.grid.width,
            "height": self.grid.height,
            "bands": list(self.bands),
            "dtype": self.source_dtype,
            "gsd_m": self.grid.gsd_m,
            "bounds": list(self.grid.bounds),
            "overlap_rule": "lowest pair name wins",
            **({"shift_m": {n: [round(e, 2), round(no, 2)] for n, (e, no) in zip(self.names, self.shifts)}} if any(e or no for e, no in self.shifts) else {}),
        }

    def close(self) -> None:
        for m in self.members:
            m.close()
        self.members = []

    def __enter__(self) -> MosaicSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def register_shifts(registration: dict[str, Any] | None, names: list[str]) -> list[tuple[float, float]] | None:
    """Per pair name, the measured SAR offset of a loaded co-registration record
    (:func:`cmpc.data.coregister.load_registration`); None without one."""
    if registration is None:
        return None
    from cmpc.data.coregister import pair_offset

    return [pair_offset(registration, n) for n in names]


class MapsSource:
    """The SAR (or optical) of every map of a pair folder, read by footprint: what the scene
    cutter needs from a multi-pair dataset (``cmpc data scenes`` on sentinel-la). ``grid``
    is the first map's (its ``gsd_m`` is the cut GSD); :meth:`read_bounds` composites the
    maps in order, each read lazily through its :class:`MosaicSource`."""

    def __init__(self, sources: list[MosaicSource]) -> None:
        if not sources:
            raise DataError("no map to read")
        self.sources = sources
        self.grid = sources[0].grid
        self.crs = self.grid.crs
        self.count = sources[0].count
        self.source_dtype = sources[0].source_dtype

    def read_bounds(self, bounds: Bounds, out_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Footprint ``bounds`` (metres, working CRS) at ``out_shape`` (h, w): float32 (C, h, w)
        with NaN at nodata, and the valid mask; the first map with data wins."""
        out = np.full((self.count, *out_shape), np.nan, dtype=np.float32)
        valid = np.zeros(out_shape, dtype=bool)
        for s in self.sources:
            b = s.source_bounds
            if b[0] >= bounds[2] or b[2] <= bounds[0] or b[1] >= bounds[3] or b[3] <= bounds[1]:
                continue
            a, v = s.read_bounds(bounds, out_shape)
            take = v & ~valid
            out[:, take] = a[:, take]
            valid |= take
        return out, valid

    def close(self) -> None:
        for s in self.sources:
            s.close()

    def __enter__(self) -> MapsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_maps(source: str | os.PathLike[str], modality: str = "sar", crs: str | None = None, bands: list[int] | None = None,
              register: str | os.PathLike[str] | None = None) -> MapsSource:
    """Open one modality (``"sar"`` or ``"optical"``) of the pairs of ``source`` (folder or
    list, as :func:`find_pairs`) as one :class:`MapsSource` in ``crs`` (default: the working
    CRS the tiler would choose). ``register``: a co-registration record (``tile.register``)
    whose offsets move each SAR file, as the tiler does."""
    pairs = find_pairs(source)
    reg = None
    if register and modality == "sar":
        from cmpc.data.coregister import load_registration

        reg = load_registration(register)
    c, reason = working_crs_of(pairs, crs)
    out: list[MosaicSource] = []
    try:
        for m in group_pairs(pairs, c, reason):
            paths = [p.sar if modality == "sar" else p.optical for p in m.pairs]
            feet = m.sar_footprints if modality == "sar" else m.footprints
            out.append(MosaicSource(paths, m.names, feet, m.grid, bands, "SAR" if modality == "sar" else "optical", reason,
                                    shifts=register_shifts(reg, m.names)))
    except BaseException:
        for s in out:
            s.close()
        raise
    return MapsSource(out)
