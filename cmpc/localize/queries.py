"""Where SAR queries come from: a patch folder, a CMPC dataset, or a SAR GeoTIFF.

:func:`open_queries` looks at the ``--queries`` path and returns a :class:`QuerySource`
whose :meth:`~QuerySource.batches` streams :class:`QueryBatch` es of model-ready tensors:

(a) a folder of SAR patch files (``.png``/``.tif``/...): no ground truth;
(b) a CMPC dataset root (``ROOT/<split>/annotations/sar``) or one split folder: with truth;
(c) a CMPC annotation folder (``ROOT/<split>/annotations/sar``): with truth;
(d) a SAR GeoTIFF, tiled on the fly (:func:`cmpc.data.raster.iter_raster_patches`) into
    patches covering the references' footprint size; no ground truth.

Batches are read lazily (a DataLoader over files, or the raster block by block), so memory
is bounded by the batch size whatever the number of queries.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cmpc.config import LocalizeConfig
from cmpc.data.crs import crs_equal, dataset_crs, normalize_crs
from cmpc.data.layout import Annotation, read_annotations, read_dataset_meta, safe_image_path
from cmpc.data.patches import read_patch_array, to_model_input
from cmpc.errors import DataError, IndexMismatchError
from cmpc.index.store import ReferenceIndex

QUERY_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


@dataclass
class QueryBatch:
    """B queries: ``x`` (B, C, S, S) standardised tensors; ``names``; ground truth where known:
    ``true_ids`` (B,) int64 (-1 unknown), ``true_xy`` (B, 2) float64 metres (NaN unknown),
    ``aligned`` (B,) bool (queries without the flag count as aligned)."""

    x: torch.Tensor
    names: list[str]
    true_ids: np.ndarray
    true_xy: np.ndarray
    aligned: np.ndarray

    def __len__(self) -> int:
        return len(self.names)


class QuerySource:
    """A stream of SAR queries. ``kind``: folder | dataset | raster; ``crs``: their CRS or None."""

    kind: str = ""
    description: str = ""
    crs: str | None = None
    has_truth: bool = False
    count: int | None = None  # None when not known before streaming (rasters)

    def batches(self, batch_size: int) -> Iterator[QueryBatch]:  # pragma: no cover - interface
        raise NotImplementedError


# --------------------------------------------------------------------------- file-based


class _PatchFiles(Dataset):
    """Patch files -> (tensor (C, S, S), i)."""

    def __init__(self, paths: list[Path], img_size: int) -> None:
        self.paths = paths
        self.img_size = img_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return to_model_input(read_patch_array(self.paths[i]), self.img_size), i


class _Collate:
    """Stack a batch; patches with different band counts are a one-line DataError."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __call__(self, items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        c0 = items[0][0].shape[0]
        for t, i in items:
            if t.shape[0] != c0:
                raise DataError(
                    f"query patches have different band counts: {self.paths[items[0][1]].name} has {c0}, "
                    f"{self.paths[i].name} has {t.shape[0]}"
                )
        return torch.stack([t for t, _ in items]), torch.tensor([i for _, i in items], dtype=torch.int64)


def _stem_key(p: Path) -> tuple[int, Any]:
    try:
        return (0, int(p.stem))
    except ValueError:
        return (1, p.name)


class _FileQueries(QuerySource):
    """Queries read from files, with optional per-file ground truth."""

    def __init__(
        self,
        paths: list[Path],
        names: list[str],
        img_size: int,
        num_workers: int,
        truth: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    ) -> None:
        self.paths = paths
        self.names = names
        self.img_size = img_size
        self.num_workers = num_workers
        self.truth = truth
        self.has_truth = truth is not None
        self.count = len(paths)

    def batches(self, batch_size: int) -> Iterator[QueryBatch]:
        loader = DataLoader(
            _PatchFiles(self.paths, self.img_size),
            batch_size=batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_Collate(self.paths),
        )
        for x, idx in loader:
            i = idx.numpy()
            if self.truth is not None:
                ids, xy, aligned = (a[i] for a in self.truth)
            else:
                ids = np.full(len(i), -1, dtype=np.int64)
                xy = np.full((len(i), 2), np.nan)
                aligned = np.ones(len(i), dtype=bool)
            yield QueryBatch(x=x, names=[self.names[j] for j in i], true_ids=ids, true_xy=xy, aligned=aligned)


class PatchFolderQueries(_FileQueries):
    """(a) every image file directly inside a folder, in name order; no ground truth."""

    kind = "folder"

    def __init__(self, folder: Path, img_size: int, num_workers: int = 0) -> None:
        paths = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in QUERY_SUFFIXES), key=_stem_key)
        if not paths:
            raise DataError(f"no SAR patches ({', '.join(QUERY_SUFFIXES)}) in {folder}; nothing to localize")
        super().__init__(paths, [p.stem for p in paths], img_size, num_workers, None)
        self.description = f"SAR patches in {folder}"
        self.crs = self._geotiff_crs(paths)

    @staticmethod
    def _geotiff_crs(paths: list[Path]) -> str | None:
        """CRS of the first georeferenced GeoTIFF patch, if any (checked against the map)."""
        import warnings

        import rasterio

        for p in paths:
            if p.suffix.lower() in (".tif", ".tiff"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        with rasterio.open(p) as src:
                            return normalize_crs(src.crs.to_string()) if src.crs else None
                    except Exception:
                        return None  # read_patch_array reports unreadable files with their name
        return None


class AnnotationQueries(_FileQueries):
    """(b)/(c) SAR queries of a CMPC dataset split, with ground truth (id, position, aligned)."""

    kind = "dataset"

    def __init__(self, root: Path, split: str, img_size: int, num_workers: int = 0, annotations: list[Annotation] | None = None) -> None:
        anns = annotations if annotations is not None else read_annotations(root, split, "sar")
        self.root, self.split, self.annotations = root, split, anns
        paths = [safe_image_path(root, split, "sar", a.file_path) for a in anns]
        truth = (
            np.array([a.id for a in anns], dtype=np.int64),
            np.array([[a.x, a.y] for a in anns], dtype=np.float64).reshape(-1, 2),
            np.array([a.aligned is not False for a in anns], dtype=bool),
        )
        super().__init__(paths, [a.name for a in anns], img_size, num_workers, truth)
        self.description = f"SAR queries of {root}/{split}"
        self.crs = dataset_crs(read_dataset_meta(root), anns)


# --------------------------------------------------------------------------- raster


class RasterQueries(QuerySource):
    """(d) a SAR GeoTIFF cut into patches of the references' footprint size, on the fly.

    The raster's working CRS follows :func:`cmpc.data.raster.working_crs`, as the map's did
    (a World Mercator or US-feet raster is viewed in its local UTM zone), so a map and its
    queries cut from rasters in the same CRS land in the same metres. A raster that must be
    resampled anyway (geographic or not metric at the data) is warped straight into the map
    CRS; one in another metric CRS is refused unless ``reproject`` (warping resamples the
    SAR). A raster that does not overlap the map extent is refused.
    """

    kind = "raster"

    def __init__(self, path: Path, index: ReferenceIndex, cfg: LocalizeConfig, img_size: int, nodata_max_frac: float = 0.2) -> None:
        from cmpc.data.raster import open_raster, overlap_bounds

        self.path, self.img_size, self.nodata_max_frac = path, img_size, nodata_max_frac
        self.bands = cfg.raster_bands
        self.truth = bool(cfg.raster_truth)
        self.description = f"SAR GeoTIFF {path}"
        with open_raster(path, bands=self.bands, role="query SAR") as probe:
            source_crs = probe.source_crs
            working = probe.crs  # working_crs(): its own when metric at the data, else local UTM
        resampled_anyway = working != source_crs
        target = None
        if index.crs is not None and not crs_equal(working.to_string(), index.crs):
            if resampled_anyway or cfg.reproject or crs_equal(source_crs.to_string(), index.crs):
                target = index.crs
            else:
                raise IndexMismatchError(
                    f"the query GeoTIFF {path} is in {normalize_crs(source_crs.to_string())} but index {index.directory} is in "
                    f"{index.crs}; reproject it (gdalwarp -t_srs {index.crs}) or set localize.reproject=true"
                )
        self.target_crs = target
        with open_raster(path, bands=self.bands, crs=target, role="query SAR") as src:
            self.crs = normalize_crs(src.crs.to_string())
            self.gsd_m = src.grid.gsd_m
            bounds = src.grid.bounds
        if overlap_bounds(bounds, index.extent) is None:
            fmt = lambda b: "(" + ", ".join(f"{v:.0f}" for v in b) + ")"  # noqa: E731
            raise DataError(
                f"the query GeoTIFF {path} (bounds {fmt(bounds)} in {self.crs}) does not overlap the map of index "
                f"{index.directory} (extent {fmt(index.extent)}); nothing to localize there"
            )
        patch_m = float(index.manifest.get("patch_m") or 0.0)
        self.patch_px = int(cfg.raster_patch_px or max(8, round(patch_m / self.gsd_m)))
        self.stride_px = int(cfg.raster_stride_px or max(1, self.patch_px // 2))
        self.has_truth = self.truth
        if self.truth:
            self._ref_xy = np.asarray(index.positions, dtype=np.float64)
            self._ref_ids = np.asarray(index.ids, dtype=np.int64)

    def batches(self, batch_size: int) -> Iterator[QueryBatch]:
        from cmpc.data.raster import iter_raster_patches

        buf: list[Any] = []
        n = 0
        for patch in iter_raster_patches(
            self.path, self.patch_px, self.stride_px, self.bands, crs=self.target_crs, nodata_max_frac=self.nodata_max_frac
        ):
            buf.append(patch)
            if len(buf) == batch_size:
                yield self._batch(buf)
                n += len(buf)
                buf = []
        if buf:
            n += len(buf)
            yield self._batch(buf)
        self.count = n

    def _batch(self, patches: list[Any]) -> QueryBatch:
        xs = []
        for p in patches:
            a = np.asarray(p.array, dtype=np.float32)
            if not np.isfinite(a).all():
                # nodata -> the band mean, so it neither dominates nor breaks standardisation
                fill = np.nan_to_num(np.nanmean(np.where(np.isfinite(a), a, np.nan), axis=(1, 2)), nan=0.0)
                a = np.where(np.isfinite(a), a, fill[:, None, None]).astype(np.float32)
            xs.append(to_model_input(a, self.img_size))
        names = [f"{self.path.stem}_r{int(p.window.row_off)}_c{int(p.window.col_off)}" for p in patches]
        # localize.raster_truth: the GeoTIFF is co-registered with the map, so each tile's own
        # footprint centre is its true position (evaluation on co-registered pairs)
        true_xy = np.array([[p.x, p.y] for p in patches], dtype=np.float64) if self.truth else np.full((len(patches), 2), np.nan)
        true_ids = np.full(len(patches), -1, dtype=np.int64)
        if self.truth:
            # the correct reference: the nearest centre, when within half a query stride
            d = np.linalg.norm(true_xy[:, None, :] - self._ref_xy[None, :, :], axis=2)
            j = d.argmin(axis=1)
            near = d[np.arange(len(j)), j] <= 0.5 * self.stride_px * self.gsd_m + 1e-6
            true_ids[near] = self._ref_ids[j[near]]
        return QueryBatch(
            x=torch.stack(xs),
            names=names,
            true_ids=true_ids,
            true_xy=true_xy,
            aligned=np.ones(len(patches), dtype=bool),
        )


# --------------------------------------------------------------------------- dispatch


def open_queries(
    queries: str | os.PathLike[str],
    split: str,
    img_size: int,
    index: ReferenceIndex,
    cfg: LocalizeConfig,
    num_workers: int = 0,
    nodata_max_frac: float = 0.2,
) -> QuerySource:
    """Recognise what ``queries`` is (see the module doc) and open it; one-line errors otherwise."""
    p = Path(queries)
    if not p.exists():
        raise DataError(f"queries not found: {p}")
    if p.is_file():
        if p.suffix.lower() in (".tif", ".tiff"):
            return RasterQueries(p, index, cfg, img_size, nodata_max_frac)
        raise DataError(f"--queries {p} is a file; give a SAR GeoTIFF, a folder of SAR patches, a CMPC dataset root or a CMPC annotation folder")
    if (p / split / "annotations" / "sar").is_dir():
        return AnnotationQueries(p, split, img_size, num_workers)
    if (p / "annotations" / "sar").is_dir():
        return AnnotationQueries(p.parent, p.name, img_size, num_workers)
    if any((p / s / "annotations").is_dir() for s in ("train", "test")):
        raise DataError(f"{p} has no {split}/annotations/sar; pass --split with a split that has SAR queries")
    if any(p.glob("*.json")):
        if p.name != "sar" or p.parent.name != "annotations":
            raise DataError(f"{p} holds JSON files but is not a CMPC annotation folder ROOT/<split>/annotations/sar")
        return AnnotationQueries(p.parents[2], p.parents[1].name, img_size, num_workers)
    return PatchFolderQueries(p, img_size, num_workers)
