"""Cut a co-registered SAR raster and an optical raster into a CMPC dataset (``cmpc data tile``).

- References: a regular grid of ``patch_px`` windows on the optical raster (stride default
  ``patch_px // 2``, 50 % overlap); ``pos`` is the footprint centre in metres.
- Aligned queries: the SAR over exactly a reference's footprint (resampled onto the optical
  grid when the SAR GSD or grid differs).
- Non-aligned queries: SAR at random (seeded) positions, ``non_aligned_per_ref`` per
  reference; their ``id`` is the nearest reference (centre distance) of the same split's map.
- Splits (see :mod:`cmpc.data.splits`): ``cross-area`` (east test strip or random blocks,
  separated by a buffer; one reference map per split) or ``same-area`` (one map written to
  both splits with the same ids; queries go to test with probability ``test_fraction``).
- A footprint with more than ``nodata_max_frac`` nodata in EITHER modality is skipped (for a
  reference: the reference and its aligned query).
- 8-bit bands are written as PNG, anything else (float, uint16) as a GeoTIFF patch with its
  own CRS and transform. ``near_id`` lists the ``near_k`` nearest references (nearest first,
  ties by lower id; a patch's own reference comes first).
- Output: the CMPC layout plus ``dataset.json`` and ``footprints.gpkg`` (layers train_opt,
  train_sar, test_opt, test_sar). The whole dataset is built in a temporary folder and
  renamed into place: a failed run leaves nothing half-written and an older dataset intact.

Rasters are read in blocks of ``block_px`` (plus one patch) on both modalities at once, so
memory is bounded and a mosaic larger than memory works.

Many scene pairs (``tile.pairs``: a folder of ``NAME_sar.tif`` / ``NAME_optical.tif`` or a
JSON/CSV list; :mod:`cmpc.data.mosaic`): pairs whose footprints touch are tiled as one map
(read through per-file warped VRTs composited per block, the lowest pair name winning where
files overlap), separate ones as separate maps, all in one working CRS. Each map has its own
reference grid and splits; ids are unique over the dataset (train first, then test) and
``near_id`` looks across maps of the same split. With ``tile.test_blocks`` /
``tile.val_blocks`` (boxes in metres, :class:`cmpc.data.splits.BoxPlan`) the split is by
named area blocks with a ``tile.buffer_m`` buffer, never by file; validation patches go
into ``train/`` and ``dataset.json`` names the validation boxes (``areas.val``) and counts
them (``counts.val``, a subset of ``counts.train``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine

from cmpc.config import Experiment, TileConfig
from cmpc.data.layout import MODES, SPLITS, Annotation
from cmpc.data.raster import (
    Grid,
    RasterSource,
    block_groups,
    check_same_crs,
    crs_name,
    open_raster,
    overlap_bounds,
    parse_crs,
)
from cmpc.data.splits import BOTH, TEST, TRAIN, VAL, SplitPlan, plan_boxes, plan_split
from cmpc.errors import DataError
from cmpc.utils.io import atomic_dir
from cmpc.utils.locks import discard, exclusive, lock_path

_PNG_BANDS = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
_GDAL_CACHE_BYTES = 128 * 2**20


# --------------------------------------------------------------------------- entry points


def tile_dataset(exp: Experiment) -> dict[str, Any]:
    """``cmpc data tile``: tile ``exp.tile.sar`` / ``exp.tile.optical`` (default
    ``<synth.out>/sar.tif`` and ``optical.tif``) into ``exp.data.root``; returns the summary
    (also in ``ROOT/dataset.json``). ``model.sar_channels`` / ``model.optical_channels``,
    when set, must match the selected band counts."""
    if exp.tile.pairs:
        return tile_pairs(exp.tile.pairs, exp.data.root, exp.tile, sar_channels=exp.model.sar_channels, optical_channels=exp.model.optical_channels)
    world = Path(exp.synth.out)
    sar = Path(exp.tile.sar) if exp.tile.sar else world / "sar.tif"
    optical = Path(exp.tile.optical) if exp.tile.optical else world / "optical.tif"
    return tile(
        sar,
        optical,
        exp.data.root,
        exp.tile,
        sar_channels=exp.model.sar_channels,
        optical_channels=exp.model.optical_channels,
    )


def tile(
    sar_path: str | os.PathLike[str],
    optical_path: str | os.PathLike[str],
    out_root: str | os.PathLike[str],
    cfg: TileConfig,
    *,
    sar_channels: int | None = None,
    optical_channels: int | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Tile ``sar_path`` + ``optical_path`` into the CMPC dataset ``out_root`` (atomic).

    ``sar_channels`` / ``optical_channels``: band counts the caller requires (None = any).
    ``progress``: tqdm bar on stderr (None = only when stderr is a terminal).
    Returns the dataset summary written to ``ROOT/dataset.json``.
    Raises :class:`DataError` (one line) for unusable input; nothing is written then.
    """
    import rasterio

    t0 = time.perf_counter()
    out = Path(out_root)
    _check_out_root(out, [Path(sar_path), Path(optical_path)])
    # Each block is read about once, so GDAL's block cache (default 5 % of RAM) buys little;
    # capping it keeps the resident memory near one block of each raster.
    with rasterio.Env(GDAL_CACHEMAX=_GDAL_CACHE_BYTES), _open_pair(Path(sar_path), Path(optical_path), cfg) as (sar, opt, sar_extent):
        _check_channels(sar, opt, sar_channels, optical_channels)
        maps = [_Map(sar, opt, _plan(sar_extent, opt, cfg))]
        return _build(maps, out, cfg, progress, t0)


def tile_pairs(
    pairs: str | os.PathLike[str],
    out_root: str | os.PathLike[str],
    cfg: TileConfig,
    *,
    sar_channels: int | None = None,
    optical_channels: int | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Tile every scene pair of ``pairs`` (a folder or a JSON/CSV list, see
    :func:`cmpc.data.mosaic.find_pairs`) into the CMPC dataset ``out_root`` (atomic): touching
    pairs as one map, separate ones as separate maps, one working CRS. Same contract as
    :func:`tile`; ``dataset.json`` lists the maps and their pairs under ``maps``."""
    import rasterio

    from cmpc.data.mosaic import MosaicSource, find_pairs, group_pairs, register_shifts, working_crs_of

    t0 = time.perf_counter()
    out = Path(out_root)
    found = find_pairs(pairs)
    _check_out_root(out, [p.sar for p in found] + [p.optical for p in found])
    crs, reason = working_crs_of(found, cfg.crs)
    reg = None
    if cfg.register:
        from cmpc.data.coregister import load_registration

        reg = load_registration(cfg.register)
    maps: list[_Map] = []
    with rasterio.Env(GDAL_CACHEMAX=_GDAL_CACHE_BYTES):
        try:
            for k, m in enumerate(group_pairs(found, crs, reason)):
                opt = MosaicSource([p.optical for p in m.pairs], m.names, m.footprints, m.grid, cfg.optical_bands, "optical", reason)
                try:
                    sar = MosaicSource([p.sar for p in m.pairs], m.names, m.sar_footprints, m.grid, cfg.sar_bands, "SAR", reason,
                                       shifts=register_shifts(reg, m.names))
                except BaseException:
                    opt.close()
                    raise
                maps.append(_Map(sar, opt, None, tag=f"m{k}"))  # type: ignore[arg-type]
                if not cfg.reproject:
                    for p in m.pairs:
                        _check_pair_crs(p.sar, p.optical)
                _check_channels(sar, opt, sar_channels, optical_channels)
                maps[-1].job = _plan(sar.source_bounds, opt, cfg, strict=False)  # type: ignore[arg-type]
            return _build(maps, out, cfg, progress, t0)
        finally:
            for m in maps:
                m.sar.close()
                m.opt.close()


@dataclass
class _Map:
    """One map to tile: its SAR and optical sources (same grid) and its plan."""

    sar: Any  # RasterSource or MosaicSource
    opt: Any
    job: _Job
    tag: str = ""  # prefix of the map's temporary patch names


def _check_channels(sar: Any, opt: Any, sar_channels: int | None, optical_channels: int | None) -> None:
    for src, want, key in ((sar, sar_channels, "model.sar_channels"), (opt, optical_channels, "model.optical_channels")):
        if want is not None and src.count != want:
            sel = "tile.sar_bands" if src is sar else "tile.optical_bands"
            raise DataError(
                f"the {src.role} raster gives {src.count} band(s) {src.bands} but {key} = {want}; "
                f"select bands with {sel} or change {key}"
            )


def _check_pair_crs(sar_path: Path, optical_path: Path) -> None:
    import rasterio

    with rasterio.open(sar_path) as a, rasterio.open(optical_path) as b:
        check_same_crs(a.crs, b.crs, f"SAR ({sar_path.name})", f"optical ({optical_path.name})")


def _build(maps: list[_Map], out: Path, cfg: TileConfig, progress: bool | None, t0: float) -> dict[str, Any]:
    """Cut every map into the dataset ``out`` (built aside, renamed into place)."""
    _check_split_nonempty([m.job for m in maps], cfg)
    first = maps[0]
    for m in maps[1:]:
        for a, b in ((first.sar, m.sar), (first.opt, m.opt)):
            if a.count != b.count or a.source_dtype != b.source_dtype:
                raise DataError(f"the {a.role} rasters of two maps differ ({a.count} band(s) {a.source_dtype} vs {b.count} {b.source_dtype}); convert them to one format first")
    created_parent = not out.parent.exists()
    locked = False
    try:
        # One build per dataset root at a time: <parent>/.<root>.lock beside it (a second
        # `cmpc data tile` on the same root stops at once naming this one's process id).
        with exclusive(lock_path(out), what="dataset build", target=out):
            locked = True
            with atomic_dir(out) as tmp:
                done = [_run(m, cfg, tmp, progress) for m in maps]
                summary = _finish(maps, done, cfg, tmp)
                summary["seconds"] = round(time.perf_counter() - t0, 2)
                summary["root"] = str(out)
                _write_json(tmp / "dataset.json", summary)
    except BaseException:
        if created_parent and locked:
            discard(lock_path(out))  # the folder we made holds nothing else of ours
        if created_parent and out.parent.is_dir() and not any(out.parent.iterdir()):
            out.parent.rmdir()
        raise
    return summary


def _check_split_nonempty(jobs: list[_Job], cfg: TileConfig) -> None:
    if cfg.split != "cross-area":
        return
    p = cfg.patch_px
    for code, name in ((TRAIN, "train"), (TEST, "test")):
        if not any(np.any(j.ref_split == code) for j in jobs):
            raise DataError(
                f"no {name} reference fits: the {name} area holds no {p} px patch; "
                + ("move or grow tile.test_blocks / lower tile.buffer_m" if cfg.test_blocks else "change tile.test_fraction, tile.block_m, tile.buffer_px")
                + " or tile.patch_px"
            )


# --------------------------------------------------------------------------- validation


def _check_out_root(out: Path, inputs: list[Path]) -> None:
    """Refuse to replace a folder that is not a CMPC dataset (or that holds the inputs)."""
    for p in inputs:
        try:
            if p.resolve().is_relative_to(out.resolve()):
                raise DataError(f"the output folder {out} contains the input {p}; choose another --out")
        except OSError:
            pass
    if out.exists():
        if not out.is_dir():
            raise DataError(f"the output {out} exists and is not a folder; choose another --out")
        is_dataset = (out / "dataset.json").is_file() or any((out / s / "annotations").is_dir() for s in SPLITS)
        if any(out.iterdir()) and not is_dataset:
            raise DataError(f"refusing to replace {out}: it exists, is not empty and is not a CMPC dataset; choose another --out")


class _open_pair:
    """Open the optical raster (working CRS: tile.crs, else :func:`cmpc.data.raster.working_crs`:
    its own when metric and true to scale, or the local UTM zone) and the SAR
    raster viewed in the same CRS (warped onto the optical grid when it must be reprojected).

    Yields ``(sar, optical, sar_extent)``; ``sar_extent`` is the SAR file's data bounds in the
    working CRS (the warped view itself spans the whole optical grid).
    """

    def __init__(self, sar_path: Path, optical_path: Path, cfg: TileConfig) -> None:
        self.sar_path, self.optical_path, self.cfg = sar_path, optical_path, cfg
        self.opened: list[RasterSource] = []

    def __enter__(self) -> tuple[RasterSource, RasterSource, tuple[float, float, float, float]]:
        cfg = self.cfg
        try:
            crs = parse_crs(cfg.crs, "tile.crs (--crs)") if cfg.crs else None
            opt = open_raster(self.optical_path, bands=cfg.optical_bands, crs=crs, role="optical")
            self.opened.append(opt)
            from cmpc.data.coregister import single_pair_offset

            shift = single_pair_offset(cfg.register, self.sar_path) if cfg.register else None
            sar = open_raster(self.sar_path, bands=cfg.sar_bands, role="SAR", shift_m=shift)
            self.opened.append(sar)
            if not cfg.reproject:
                check_same_crs(sar, opt)
            extent = _source_extent(sar, opt.crs)
            if sar.crs != opt.crs or sar.warped:
                # Warp straight onto the optical grid: one resampling, and reads need none.
                sar = open_raster(self.sar_path, bands=cfg.sar_bands, grid=opt.grid, role="SAR", shift_m=shift)
                self.opened.append(sar)
        except BaseException:
            self.__exit__()
            raise
        return sar, opt, extent

    def __exit__(self, *exc: object) -> None:
        for src in self.opened:
            src.close()
        self.opened = []


def _source_extent(src: RasterSource, crs: Any) -> tuple[float, float, float, float]:
    """Bounds of the source file's data in ``crs`` (metres)."""
    from rasterio.warp import transform_bounds

    b = src.source_bounds  # min <= max also for a south-up file
    if src.source_crs == crs:
        return b  # type: ignore[return-value]
    return tuple(transform_bounds(src.source_crs, crs, *b, densify_pts=21))  # type: ignore[return-value]


# --------------------------------------------------------------------------- planning


@dataclass
class _Job:
    """Everything decided before any pixel is read (pixels of the optical grid)."""

    grid: Grid
    plan: SplitPlan
    stride_px: int
    ref_tops: np.ndarray
    ref_lefts: np.ndarray
    ref_split: np.ndarray  # TRAIN / TEST, or BOTH (same-area: one map for both splits)
    ref_query_split: np.ndarray  # split of each reference's aligned query
    q_tops: np.ndarray
    q_lefts: np.ndarray
    q_split: np.ndarray


def _plan(sar_extent: tuple[float, float, float, float], opt: Any, cfg: TileConfig, strict: bool = True) -> _Job:
    """Decide the map's references, queries and their splits (``strict``: refuse an empty
    train or test split here; several maps are checked together by the caller)."""
    g = opt.grid
    p = cfg.patch_px
    stride = cfg.stride_px or max(1, p // 2)
    if not cfg.aligned and cfg.non_aligned_per_ref <= 0:
        raise DataError("no SAR queries would be written: set tile.aligned=true or tile.non_aligned_per_ref > 0")
    opt_ext = _source_extent(opt, g.crs)
    ov = overlap_bounds(opt_ext, sar_extent)
    if ov is None:
        raise DataError(
            f"the SAR and optical rasters do not overlap: SAR covers {_fmt_box(sar_extent)} and optical "
            f"{_fmt_box(opt_ext)} (metres in {crs_name(g.crs)}); check that they show the same place"
        )
    area = _area_window(g, ov)
    plan: SplitPlan
    if cfg.test_blocks or cfg.val_blocks:
        if cfg.split != "cross-area":
            raise DataError("tile.test_blocks / tile.val_blocks need tile.split=cross-area")
        if area[2] < p or area[3] < p:
            raise DataError(f"the overlap of SAR and optical is {area[3]}x{area[2]} px, smaller than one patch ({p} px); lower tile.patch_px")
        buffer_m = cfg.buffer_m if cfg.buffer_m is not None else (cfg.buffer_px if cfg.buffer_px is not None else p) * g.res_x
        plan = plan_boxes(area, p, stride, g, cfg.test_blocks, cfg.val_blocks, buffer_m)
    else:
        plan = plan_split(
            cfg.split, area, p, stride, cfg.test_fraction, g.gsd_m,
            buffer_px=cfg.buffer_px, block_m=cfg.block_m, seed=cfg.seed,
        )
    tops, lefts, codes = plan.reference_grid()
    if cfg.split == "cross-area":
        if strict:
            _check_split_nonempty([_Job(g, plan, stride, tops, lefts, codes, codes, tops[:0], lefts[:0], codes[:0])], cfg)
    elif len(tops) == 0:
        raise DataError(f"no reference fits in the {area[3]}x{area[2]} px overlap with {p} px patches; lower tile.patch_px")
    # Independent seeded streams, so e.g. changing the query rate does not move the blocks.
    rng_pos = np.random.default_rng([cfg.seed, 2])
    rng_assign = np.random.default_rng([cfg.seed, 3])
    rate = cfg.non_aligned_per_ref
    if cfg.split == "same-area":
        ref_q = np.where(rng_assign.random(len(tops)) < cfg.test_fraction, TEST, TRAIN).astype(np.int8)
        qt, ql, _ = plan.sample_queries({BOTH: int(round(rate * len(tops)))}, rng_pos)
        qs = np.where(rng_assign.random(len(qt)) < cfg.test_fraction, TEST, TRAIN).astype(np.int8)
    else:
        ref_q = codes.copy()
        quota = {c: int(round(rate * np.sum(codes == c))) for c in (TRAIN, TEST, VAL)}
        qt, ql, qs = plan.sample_queries(quota, rng_pos)
    return _Job(g, plan, stride, tops, lefts, codes, ref_q, qt, ql, qs.astype(np.int8))


def _area_window(g: Grid, box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """Whole optical pixels inside ``box`` (metres): (row0, col0, height, width)."""
    x0, y0 = g.transform.c, g.transform.f
    c0 = max(0, math.ceil((box[0] - x0) / g.res_x - 1e-6))
    c1 = min(g.width, math.floor((box[2] - x0) / g.res_x + 1e-6))
    r0 = max(0, math.ceil((y0 - box[3]) / g.res_y - 1e-6))
    r1 = min(g.height, math.floor((y0 - box[1]) / g.res_y + 1e-6))
    return r0, c0, max(0, r1 - r0), max(0, c1 - c0)


def _fmt_box(b: tuple[float, float, float, float]) -> str:
    return "[" + ", ".join(f"{v:.1f}" for v in b) + "]"


# --------------------------------------------------------------------------- patch files


class _PatchWriter:
    """Writes one modality's patches: PNG for 8-bit data (1-4 bands), else GeoTIFF."""

    def __init__(self, src: RasterSource, grid: Grid) -> None:
        self.src = src
        self.grid = grid
        self.ext = "png" if src.source_dtype == "uint8" and src.count in _PNG_BANDS else "tif"
        dt = np.dtype(src.source_dtype)
        if self.ext == "png":
            self.dtype = "uint8"
        elif np.issubdtype(dt, np.integer):
            self.dtype = dt.name
        else:
            self.dtype = "float32"  # float64/complex sources are stored as float32 (what models read)
        self.nodata: float | None
        if self.dtype == "float32":
            self.nodata = float("nan")
        elif self.ext == "tif":
            info = np.iinfo(self.dtype)
            nd = src.nodata
            self.nodata = float(nd) if nd is not None and math.isfinite(nd) and info.min <= nd <= info.max else None
        else:
            self.nodata = None

    def write(self, path_stem: Path, arr: np.ndarray, row: int, col: int) -> None:
        """Write (C, p, p) float32 ``arr`` (NaN = nodata) cut at optical pixel (row, col)."""
        path = path_stem.with_suffix("." + self.ext)
        if self.ext == "png":
            from PIL import Image

            a = np.clip(np.rint(np.nan_to_num(arr, nan=0.0)), 0, 255).astype(np.uint8)
            Image.fromarray(a[0] if a.shape[0] == 1 else np.ascontiguousarray(np.moveaxis(a, 0, -1))).save(path, compress_level=1)
            return
        import rasterio

        p = arr.shape[-1]
        if self.dtype == "float32":
            data = arr.astype(np.float32, copy=False)
        else:
            info = np.iinfo(self.dtype)
            fill = self.nodata if self.nodata is not None else 0.0
            data = np.clip(np.rint(np.where(np.isnan(arr), fill, arr)), info.min, info.max).astype(self.dtype)
        minx, _, _, maxy = self.grid.window_bounds(row, col, p, p)
        transform = Affine(self.grid.res_x, 0.0, minx, 0.0, -self.grid.res_y, maxy)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with rasterio.open(
                path, "w", driver="GTiff", width=p, height=p, count=data.shape[0], dtype=self.dtype,
                crs=self.grid.crs, transform=transform, nodata=self.nodata,
            ) as dst:
                dst.write(data)


# --------------------------------------------------------------------------- the pass


def _nearest(map_xy: np.ndarray, map_ids: np.ndarray, xy: np.ndarray, k: int) -> np.ndarray:
    """Ids of the ``k`` references nearest to each point of ``xy`` (N, 2), metres.

    Nearest first; equal distances (grid neighbours) are ordered by lower id so the lists
    are deterministic. Returns (N, min(k, n_refs)) int64.
    """
    from scipy.spatial import cKDTree

    k = min(k, len(map_ids))
    if k <= 0 or len(xy) == 0:
        return np.zeros((len(xy), max(k, 0)), dtype=np.int64)
    kk = min(len(map_ids), k + 16)  # spare candidates for tie groups straddling the k-th place
    d, i = cKDTree(map_xy).query(xy, k=kk)
    d, i = d.reshape(len(xy), kk), i.reshape(len(xy), kk)
    cand = map_ids[i]
    order = np.lexsort((cand, np.round(d, 6)), axis=-1)
    return np.take_along_axis(cand, order, axis=-1)[:, :k]


def _run(m: _Map, cfg: TileConfig, root: Path, progress: bool | None) -> tuple[np.ndarray, np.ndarray, dict[str, _PatchWriter]]:
    """Cut one map's patches into temporary files ``_<tag>c<i>`` (references and their aligned
    queries) and ``_<tag>q<j>`` (non-aligned queries); returns which were kept (not nodata)
    and the writers."""
    from tqdm import tqdm

    job, sar, opt = m.job, m.sar, m.opt
    g, p = job.grid, cfg.patch_px
    writers = {"opt": _PatchWriter(opt, g), "sar": _PatchWriter(sar, g)}
    for s in SPLITS:
        for mode in MODES:
            (root / s / "imgs" / mode).mkdir(parents=True, exist_ok=True)
            (root / s / "annotations" / mode).mkdir(parents=True, exist_ok=True)
    tag = m.tag

    n_ref, n_q = len(job.ref_tops), len(job.q_tops)
    tops = np.concatenate([job.ref_tops, job.q_tops])
    lefts = np.concatenate([job.ref_lefts, job.q_lefts])
    ref_ok = np.zeros(n_ref, dtype=bool)
    q_ok = np.zeros(n_q, dtype=bool)
    max_bad = cfg.nodata_max_frac
    origin = (job.plan.row0, job.plan.col0)
    disable = None if progress is None else not progress
    # Encoding PNGs and creating GeoTIFFs dominates; PIL and GDAL release the GIL, so a few
    # threads help. Each block's writes finish before the next block is read (bounded memory).
    pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))
    desc = f"tiling {tag}" if tag else "tiling"
    with pool, tqdm(total=n_ref + n_q, unit="patch", desc=desc, file=sys.stderr, disable=disable, leave=False) as bar:
        for idx in block_groups(tops, lefts, max(cfg.block_px, job.stride_px), origin):
            jobs: list[Future[None]] = []
            r0, c0 = int(tops[idx].min()), int(lefts[idx].min())
            h, w = int(tops[idx].max()) + p - r0, int(lefts[idx].max()) + p - c0
            o_arr, o_val = opt.read_on(g, r0, c0, h, w)
            s_arr, s_val = sar.read_on(g, r0, c0, h, w)
            for i in idx.tolist():
                r, c = int(tops[i]) - r0, int(lefts[i]) - c0
                good = min(o_val[r : r + p, c : c + p].mean(), s_val[r : r + p, c : c + p].mean())
                if 1.0 - good > max_bad:
                    continue  # mostly nodata in either modality: skip the pair (or the query)
                t, l = int(tops[i]), int(lefts[i])
                if i < n_ref:
                    ref_ok[i] = True
                    jobs.append(pool.submit(writers["opt"].write, root / _FOLDER[int(job.ref_split[i])] / "imgs" / "opt" / f"_{tag}c{i}", o_arr[:, r : r + p, c : c + p], t, l))
                    if cfg.aligned:
                        qs = _FOLDER[int(job.ref_query_split[i])]
                        jobs.append(pool.submit(writers["sar"].write, root / qs / "imgs" / "sar" / f"_{tag}c{i}", s_arr[:, r : r + p, c : c + p], t, l))
                else:
                    j = i - n_ref
                    q_ok[j] = True
                    qs = _FOLDER[int(job.q_split[j])]
                    jobs.append(pool.submit(writers["sar"].write, root / qs / "imgs" / "sar" / f"_{tag}q{j}", s_arr[:, r : r + p, c : c + p], t, l))
            for f in jobs:
                f.result()  # re-raises a failed write here
            bar.update(len(idx))
    return ref_ok, q_ok, writers


#: The folder each split code is written to (same-area maps are written under train, then linked;
#: validation patches live in train/, named by dataset.json areas.val).
_FOLDER = {TRAIN: "train", TEST: "test", BOTH: "train", VAL: "train"}


def _centres(g: Grid, tops: np.ndarray, lefts: np.ndarray, p: int) -> np.ndarray:
    """(N, 2) footprint centres in metres."""
    x = g.transform.c + (lefts + p / 2.0) * g.res_x
    y = g.transform.f - (tops + p / 2.0) * g.res_y
    return np.stack([x, y], axis=1).astype(np.float64).reshape(-1, 2)


def _boxes(g: Grid, tops: np.ndarray, lefts: np.ndarray, p: int) -> np.ndarray:
    """(N, 4) footprint bounds (minx, miny, maxx, maxy) in metres."""
    return np.array([g.window_bounds(int(t), int(l), p, p) for t, l in zip(tops, lefts)], dtype=np.float64).reshape(-1, 4)


def _finish(maps: list[_Map], done: list[tuple[np.ndarray, np.ndarray, dict[str, _PatchWriter]]], cfg: TileConfig, root: Path) -> dict[str, Any]:
    """Number the kept patches of all maps, write annotations, footprints.gpkg; return the summary."""
    p = cfg.patch_px
    g0 = maps[0].job.grid
    crs_s = crs_name(g0.crs)
    same_area = cfg.split == "same-area"
    # Flatten the maps: one row per reference / non-aligned query, in map order then grid order.
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0)  # noqa: E731
    ref_xy = cat([_centres(m.job.grid, m.job.ref_tops, m.job.ref_lefts, p) for m in maps]).reshape(-1, 2)
    ref_box = cat([_boxes(m.job.grid, m.job.ref_tops, m.job.ref_lefts, p) for m in maps]).reshape(-1, 4)
    ref_split = cat([m.job.ref_split for m in maps]).astype(np.int8)
    ref_qsplit = cat([m.job.ref_query_split for m in maps]).astype(np.int8)
    ref_ok = cat([d[0] for d in done]).astype(bool)
    ref_tmp = [f"_{m.tag}c{i}" for m in maps for i in range(len(m.job.ref_tops))]
    q_xy = cat([_centres(m.job.grid, m.job.q_tops, m.job.q_lefts, p) for m in maps]).reshape(-1, 2)
    q_box = cat([_boxes(m.job.grid, m.job.q_tops, m.job.q_lefts, p) for m in maps]).reshape(-1, 4)
    q_split = cat([m.job.q_split for m in maps]).astype(np.int8)
    q_ok = cat([d[1] for d in done]).astype(bool)
    q_tmp = [f"_{m.tag}q{j}" for m in maps for j in range(len(m.job.q_tops))]
    gsd = float(np.mean([m.job.grid.gsd_m for m in maps]))
    if not ref_ok.any():
        raise DataError(
            f"no valid patches: all {len(ref_ok)} reference footprints have more than {cfg.nodata_max_frac:.0%} nodata (the nodata "
            f"value, NaN/inf, or outside the raster) in the SAR or optical raster; check the rasters or raise tile.nodata_max_frac"
        )
    folder = np.array([_FOLDER[int(c)] == "test" for c in ref_split], dtype=np.int8)  # 0 train/, 1 test/
    # Ids: train/ references first (map order, grid order), then test/; unique over the dataset.
    order = np.lexsort((np.arange(len(ref_ok)), folder))
    order = order[ref_ok[order]]
    ids = np.full(len(ref_ok), -1, dtype=np.int64)
    ids[order] = np.arange(len(order))
    k_near = max(1, cfg.near_k)
    counts: dict[str, dict[str, int]] = {}
    footprints: dict[str, list[tuple[int, str, bool | None, tuple[float, float, float, float]]]] = {}
    ext_opt, ext_sar = done[0][2]["opt"].ext, done[0][2]["sar"].ext

    def emit(split: str, mode: str, n: int, ident: int, xy: np.ndarray, near: np.ndarray, box: np.ndarray, aligned: bool | None) -> None:
        b = tuple(float(v) for v in box)
        ext = ext_opt if mode == "opt" else ext_sar
        ann = Annotation(
            id=int(ident), x=float(xy[0]), y=float(xy[1]), file_path=f"{n}.{ext}",
            near_id=[int(v) for v in near[: cfg.near_k]], crs=crs_s, bounds=b, gsd=gsd, aligned=aligned, name=str(n),  # type: ignore[arg-type]
        )
        (root / split / "annotations" / mode / f"{n}.json").write_text(json.dumps(ann.to_json()), encoding="utf-8")
        footprints.setdefault(f"{split}_{mode}", []).append((int(ident), str(n), aligned, b))  # type: ignore[arg-type]

    val_counts = {"opt": 0, "sar": 0, "sar_aligned": 0, "sar_non_aligned": 0}
    for split in ("train", "test"):
        want = (lambda c: c == BOTH) if same_area else (lambda c: _FOLDER[int(c)] == split)
        in_map = ref_ok & np.array([want(c) for c in ref_split], dtype=bool)
        map_idx = np.flatnonzero(in_map)
        map_idx = map_idx[np.argsort(ids[map_idx], kind="stable")]
        if len(map_idx) == 0:
            raise DataError(
                f"no valid patches in the {split} split: every {split} reference footprint has more than "
                f"{cfg.nodata_max_frac:.0%} nodata in the SAR or optical raster; check the rasters or raise tile.nodata_max_frac"
            )
        map_ids, map_xy = ids[map_idx], ref_xy[map_idx]
        near_ref = _nearest(map_xy, map_ids, map_xy, k_near)
        src_split = "train" if same_area else split
        for n, i in enumerate(map_idx.tolist()):
            dst = root / split / "imgs" / "opt" / f"{n}.{ext_opt}"
            if same_area and split == "test":
                _link_or_copy(root / "train" / "imgs" / "opt" / f"{n}.{ext_opt}", dst)
            else:
                os.replace(root / src_split / "imgs" / "opt" / f"{ref_tmp[i]}.{ext_opt}", dst)
            emit(split, "opt", n, ids[i], ref_xy[i], near_ref[n], ref_box[i], None)
            val_counts["opt"] += int(ref_split[i] == VAL)
        pos_in_map = {int(i): n for n, i in enumerate(map_idx.tolist())}
        n_sar = 0
        n_aligned = 0
        qwant = (lambda c: c == (TRAIN if split == "train" else TEST)) if same_area else want
        if cfg.aligned:
            for i in np.flatnonzero(ref_ok & np.array([qwant(c) for c in ref_qsplit], dtype=bool)).tolist():
                os.replace(root / split / "imgs" / "sar" / f"{ref_tmp[i]}.{ext_sar}", root / split / "imgs" / "sar" / f"{n_sar}.{ext_sar}")
                emit(split, "sar", n_sar, ids[i], ref_xy[i], near_ref[pos_in_map[i]], ref_box[i], True)
                n_sar += 1
                n_aligned += 1
                if ref_qsplit[i] == VAL:
                    val_counts["sar"] += 1
                    val_counts["sar_aligned"] += 1
        q_idx = np.flatnonzero(q_ok & np.array([qwant(c) for c in q_split], dtype=bool))
        near_q = _nearest(map_xy, map_ids, q_xy[q_idx], k_near)
        for mm, j in enumerate(q_idx.tolist()):
            os.replace(root / split / "imgs" / "sar" / f"{q_tmp[j]}.{ext_sar}", root / split / "imgs" / "sar" / f"{n_sar}.{ext_sar}")
            # The location id of a non-aligned query is its nearest reference.
            emit(split, "sar", n_sar, near_q[mm][0], q_xy[j], near_q[mm], q_box[j], False)
            n_sar += 1
            if q_split[j] == VAL:
                val_counts["sar"] += 1
                val_counts["sar_non_aligned"] += 1
        if n_sar == 0:
            raise DataError(
                f"no SAR queries in the {split} split (all skipped as nodata, or tile.test_fraction too small for "
                f"same-area); raise tile.non_aligned_per_ref or tile.test_fraction"
            )
        counts[split] = {"opt": len(map_idx), "sar": n_sar, "sar_aligned": n_aligned, "sar_non_aligned": n_sar - n_aligned}
    has_val = any(getattr(m.job.plan, "val_boxes", None) for m in maps)
    if has_val:
        counts["val"] = val_counts  # a subset of counts["train"]: these patches live in train/

    _write_footprints(root / "footprints.gpkg", footprints, g0)
    modal = {}
    for mode, src in (("opt", maps[0].opt), ("sar", maps[0].sar)):
        w = done[0][2][mode]
        modal[mode] = {
            "bands": list(src.bands), "band_descriptions": list(src.descriptions), "channels": src.count,
            "dtype": w.dtype, "source_dtype": src.source_dtype, "format": w.ext,
        }
    plan = maps[0].job.plan
    summary: dict[str, Any] = {
        "format": "cmpc-dataset",
        "version": 1,
        "crs": crs_s,
        "gsd_m": gsd,
        "patch_px": p,
        "patch_m": p * g0.res_x,
        "stride_px": maps[0].job.stride_px,
        "stride_m": maps[0].job.stride_px * g0.res_x,
        "split": cfg.split,
        "test_fraction": cfg.test_fraction,
        "buffer_px": None if same_area else plan.buffer_px,
        "buffer_m": None if same_area else (plan.buffer_m if hasattr(plan, "buffer_m") else plan.buffer_px * g0.res_x),
        "block_px": plan.block_px,
        "near_k": cfg.near_k,
        "modalities": modal,
        "counts": counts,
        "skipped_nodata": {"references": int((~ref_ok).sum()), "non_aligned": int((~q_ok).sum())},
    }
    if len(maps) == 1 and not maps[0].tag:
        summary["area_px"] = {"row0": plan.row0, "col0": plan.col0, "height": plan.height, "width": plan.width}
        summary["areas"] = plan.areas(maps[0].job.grid)
        summary["sources"] = {"sar": maps[0].sar.describe(), "optical": maps[0].opt.describe()}
    else:
        summary["areas"] = _merge_areas([m.job.plan.areas(m.job.grid) for m in maps])
        summary["sources"] = {
            "sar": {"path": str(maps[0].sar.paths[0].parent), "warped": True, "crs_reason": maps[0].sar.crs_reason},
            "optical": {"path": str(maps[0].opt.paths[0].parent), "warped": True, "crs_reason": maps[0].opt.crs_reason},
        }
        summary["overlap_rule"] = "where files overlap, the pair with the lowest name (file number) wins"
        summary["maps"] = [_map_summary(m, d, ids, cfg) for m, d in zip(maps, done)]
    if cfg.register:
        from cmpc.data.coregister import load_registration
        from cmpc.data.mosaic import MosaicSource

        shifts = {}
        for m in maps:
            if isinstance(m.sar, MosaicSource):
                shifts.update({n: [round(e, 2), round(no, 2)] for n, (e, no) in zip(m.sar.names, m.sar.shifts)})
            else:
                shifts[m.sar.path.stem] = [round(v, 2) for v in m.sar.shift_m]
        summary["registration"] = {"record": cfg.register, "method": load_registration(cfg.register)["method"],
                                   "sar_shift_m": shifts, "meaning": "each SAR file was moved by (east, north) metres before tiling: positions follow its content"}
    summary["tile_config"] = dataclasses.asdict(cfg)
    return summary


def _merge_areas(areas: list[dict[str, Any]]) -> dict[str, Any]:
    """One ``areas`` entry for several maps: per split the boxes of all maps and their bounds."""
    out: dict[str, Any] = {}
    for a in areas:
        for k, v in a.items():
            if not isinstance(v, dict):
                out[k] = v
                continue
            e = out.setdefault(k, {"bounds": None, "boxes": []})
            for b in v.get("boxes") or []:
                if list(b) not in e["boxes"]:
                    e["boxes"].append(list(b))
            for kk, vv in v.items():
                if kk not in ("bounds", "boxes"):
                    e[kk] = vv
    for k, e in out.items():
        if isinstance(e, dict) and e.get("boxes"):
            arr = np.array(e["boxes"], dtype=np.float64)
            e["bounds"] = [float(arr[:, 0].min()), float(arr[:, 1].min()), float(arr[:, 2].max()), float(arr[:, 3].max())]
    return out


def _map_summary(m: _Map, done: tuple[np.ndarray, np.ndarray, Any], ids: np.ndarray, cfg: TileConfig) -> dict[str, Any]:
    job = m.job
    ref_ok = done[0]
    n = {name: int(np.sum(ref_ok & (job.ref_split == code))) for code, name in ((TRAIN, "train"), (TEST, "test"), (VAL, "val"), (BOTH, "both"))}
    return {
        "pairs": list(m.opt.names),
        "bounds": [float(v) for v in job.grid.bounds],
        "grid_px": [job.grid.height, job.grid.width],
        "references": {k: v for k, v in n.items() if v},
        "skipped_nodata_references": int((~ref_ok).sum()),
    }



def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (same-area maps are identical in both splits), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _write_footprints(path: Path, layers: dict[str, list[tuple[int, str, bool | None, tuple[float, float, float, float]]]], g: Grid) -> None:
    """footprints.gpkg: one layer per split/modality with columns id, name, aligned + polygon."""
    import geopandas as gpd
    import shapely

    for s in SPLITS:
        for m in MODES:
            rows = layers.get(f"{s}_{m}", [])
            b = np.array([r[3] for r in rows], dtype=np.float64).reshape(-1, 4)
            gdf = gpd.GeoDataFrame(
                {
                    "id": np.array([r[0] for r in rows], dtype=np.int64),
                    "name": [r[1] for r in rows],
                    "aligned": [r[2] for r in rows],
                },
                geometry=shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3]),
                crs=g.crs.to_wkt(),
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gdf.to_file(path, layer=f"{s}_{m}", driver="GPKG")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
