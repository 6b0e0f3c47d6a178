"""Stitching optical reference patches back into a map image.

Fine alignment correlates a SAR query against the optical map *around* a candidate, not just
inside the candidate's own footprint (a query 40 m off a reference centre only half overlaps
it). The references of an index tile the map (on a grid with 50 % overlap in the CMPC
protocol), so pasting every reference patch at its footprint rebuilds the map.

Geometry: north-up rasters. Pixel ``(row, col)`` of the mosaic covers
``x in [origin_x + col * gsd, origin_x + (col + 1) * gsd)`` and
``y in (origin_y - (row + 1) * gsd, origin_y - row * gsd]`` (metres).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cmpc.data.layout import Annotation, read_dataset_meta, safe_image_path
from cmpc.data.patches import read_patch_array
from cmpc.errors import DataError


@dataclass
class ImageMosaic:
    """A stitched map: ``image`` (C, H, W) float32, ``valid`` (H, W) bool (covered by a
    reference), ``origin_x``/``origin_y`` metres of the mosaic's north-west corner, ``gsd_m``
    metres per pixel."""

    image: np.ndarray
    valid: np.ndarray
    origin_x: float
    origin_y: float
    gsd_m: float

    def pixel_of(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Continuous (row, col) pixel coordinates (pixel edges at integers) of map points (metres)."""
        col = (np.asarray(x, dtype=np.float64) - self.origin_x) / self.gsd_m
        row = (self.origin_y - np.asarray(y, dtype=np.float64)) / self.gsd_m
        return row, col

    def standardized(self) -> np.ndarray:
        """The image with each channel at zero mean / unit variance over the covered pixels
        (float32; uncovered pixels 0). One normalisation for the whole map, so a place
        looks the same whichever window it is cut from."""
        out = np.zeros_like(self.image, dtype=np.float32)
        v = self.valid
        for ch in range(self.image.shape[0]):
            vals = self.image[ch][v]
            mu = float(vals.mean()) if vals.size else 0.0
            sd = float(vals.std()) if vals.size else 1.0
            out[ch][v] = (self.image[ch][v] - mu) / (sd + 1e-6)
        return out


def resample(mosaic: ImageMosaic, gsd_m: float) -> ImageMosaic:
    """The mosaic at another ground sampling distance (same north-west corner): bilinear with
    antialiasing for the image; a pixel stays valid only where all it covers was valid.

    Fine alignment works at the resolution of the query tensors it receives (the embedder's
    input size), so a map is brought to ``footprint / query pixels`` metres per pixel.
    """
    if abs(gsd_m - mosaic.gsd_m) <= 1e-9 * mosaic.gsd_m:
        return mosaic
    import torch
    import torch.nn.functional as F

    C, H, W = mosaic.image.shape
    h = max(1, int(round(H * mosaic.gsd_m / gsd_m)))
    w = max(1, int(round(W * mosaic.gsd_m / gsd_m)))
    img = F.interpolate(torch.from_numpy(mosaic.image)[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
    v = F.interpolate(torch.from_numpy(mosaic.valid.astype(np.float32))[None, None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0, 0]
    return ImageMosaic(image=img.numpy(), valid=(v > 0.999).numpy(), origin_x=mosaic.origin_x, origin_y=mosaic.origin_y, gsd_m=float(gsd_m))


def stitch_patches(paths: list[Path], bounds_m: np.ndarray, progress: bool = False) -> ImageMosaic:
    """Paste patches at their footprints into one north-up map image.

    ``paths``: optical patch files (all the same shape); ``bounds_m``: (N, 4) footprints
    (minx, miny, maxx, maxy) metres. The gsd is the footprint width over the patch width.
    Patches are placed at the nearest whole pixel; later patches overwrite earlier ones
    where they overlap (CMPC references are cut from one raster, so overlaps agree).
    """
    if not paths:
        raise DataError("no references to stitch into a map")
    bounds_m = np.asarray(bounds_m, dtype=np.float64).reshape(-1, 4)
    if len(bounds_m) != len(paths):
        raise ValueError("one footprint per patch expected")
    first = read_patch_array(paths[0])
    C, S, S2 = first.shape
    gsd = float(bounds_m[0, 2] - bounds_m[0, 0]) / S2
    if not gsd > 0:
        raise DataError(f"reference footprint {bounds_m[0].tolist()} has no width; cannot stitch a map")
    origin_x = float(bounds_m[:, 0].min())
    origin_y = float(bounds_m[:, 3].max())
    W = int(round((bounds_m[:, 2].max() - origin_x) / gsd))
    H = int(round((origin_y - bounds_m[:, 1].min()) / gsd))
    if H * W > 40_000 * 40_000:
        raise DataError(f"the reference map is too large to stitch in memory ({H} x {W} px); set refine.fine_align=false")
    image = np.zeros((C, H, W), dtype=np.float32)
    valid = np.zeros((H, W), dtype=bool)
    it = tqdm(range(len(paths)), desc="stitch references", unit="patch", disable=not progress, leave=False)
    for i in it:
        arr = first if i == 0 else read_patch_array(paths[i])
        if arr.shape != (C, S, S2):
            raise DataError(f"reference {paths[i]} is {arr.shape}, the others {(C, S, S2)}: cannot stitch a map")
        r0 = int(round((origin_y - bounds_m[i, 3]) / gsd))
        c0 = int(round((bounds_m[i, 0] - origin_x) / gsd))
        r1, c1 = min(r0 + S, H), min(c0 + S2, W)
        image[:, r0:r1, c0:c1] = arr[:, : r1 - r0, : c1 - c0]
        valid[r0:r1, c0:c1] = True
    return ImageMosaic(image=image, valid=valid, origin_x=origin_x, origin_y=origin_y, gsd_m=gsd)


def annotation_bounds(anns: list[Annotation], patch_px: int, meta: dict | None = None) -> np.ndarray:
    """(N, 4) footprints, metres: the annotations' ``bounds``, else centre +- half the patch
    (``patch_px`` times the ``gsd`` of the annotation or of dataset.json)."""
    out = np.zeros((len(anns), 4), dtype=np.float64)
    for i, a in enumerate(anns):
        if a.bounds is not None:
            out[i] = a.bounds
            continue
        gsd = a.gsd or (meta or {}).get("gsd") or (meta or {}).get("gsd_m")
        if not gsd:
            raise DataError(
                f"annotation {a.name or a.id} has no 'bounds' or 'gsd' and dataset.json no 'gsd': "
                "the footprint in metres is unknown (set refine.fine_align=false or add gsd)"
            )
        h = patch_px * float(gsd) / 2.0
        out[i] = (a.x - h, a.y - h, a.x + h, a.y + h)
    return out


def mosaic_from_annotations(root: str | os.PathLike[str], split: str, anns: list[Annotation], progress: bool = False) -> ImageMosaic:
    """Stitch the optical references ``anns`` of ``root/split``."""
    paths = [safe_image_path(root, split, "opt", a.file_path) for a in anns]
    if not paths:
        raise DataError(f"no optical references in {root}/{split}")
    patch_px = int(read_patch_array(paths[0]).shape[-1])
    return stitch_patches(paths, annotation_bounds(anns, patch_px, read_dataset_meta(root)), progress)


def mosaic_from_raster(path: str | os.PathLike[str], bounds_m: np.ndarray, bands: list[int] | None = None, crs: str | None = None) -> ImageMosaic:
    """Read the map straight from the optical raster an index was cut from, over the union of
    the reference footprints ``bounds_m`` (N, 4) metres, at the raster's own pixel size
    (windowed read of that extent only; pixels outside the raster are invalid)."""
    from cmpc.data.raster import open_raster

    bounds_m = np.asarray(bounds_m, dtype=np.float64).reshape(-1, 4)
    if not len(bounds_m):
        raise DataError("no references to read a map for")
    src = open_raster(path, bands=bands, crs=crs, role="map raster")
    gsd = float(src.grid.res_x)
    minx, maxy = float(bounds_m[:, 0].min()), float(bounds_m[:, 3].max())
    W = int(round((bounds_m[:, 2].max() - minx) / gsd))
    H = int(round((maxy - bounds_m[:, 1].min()) / gsd))
    if H * W > 40_000 * 40_000:
        raise DataError(f"the reference map is too large to hold in memory ({H} x {W} px); set refine.fine_align=false")
    image, valid = src.read_bounds((minx, maxy - H * gsd, minx + W * gsd, maxy), (H, W))
    image = np.nan_to_num(image.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
    return ImageMosaic(image=image, valid=np.asarray(valid, dtype=bool), origin_x=minx, origin_y=maxy, gsd_m=gsd)


def mosaic_from_index(index, progress: bool = False) -> ImageMosaic:  # noqa: ANN001 - ReferenceIndex
    """The map behind a :class:`~cmpc.index.store.ReferenceIndex`: its reference patches
    stitched at their footprints, or, for an index built from a raster mosaic
    (``cmpc index build --raster``), that raster read over the references' extent.
    :class:`DataError` when the reference images (or the raster) are gone."""
    sources = index.manifest.get("sources", [])
    if sources and all("raster" in s and "root" not in s for s in sources):
        rasters = {s["raster"] for s in sources}
        if len(rasters) != 1:
            raise DataError(f"index {index.directory} was built from {len(rasters)} rasters; fine alignment reads one map (set refine.fine_align=false)")
        path = rasters.pop()
        if not Path(path).is_file():
            raise DataError(f"map raster {path} of index {index.directory} is missing (fine alignment reads it; restore it or set refine.fine_align=false)")
        return mosaic_from_raster(path, index.bounds, sources[0].get("bands"), index.manifest.get("crs"))
    paths = []
    for row in range(index.ntotal):
        p = index.reference_path(row)
        if p is None:
            raise DataError(
                f"reference image of row {row} of index {index.directory} is missing "
                "(fine alignment needs the reference images; set refine.fine_align=false or restore the dataset)"
            )
        paths.append(p)
    return stitch_patches(paths, index.bounds, progress)
