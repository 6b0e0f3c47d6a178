"""A whole SAR scene as a query: reading it, tiling it, and its tiles' candidates.

A scene (a SAR strip or image whose georeferencing is missing or kilometres off) holds many
query tiles whose relative geometry is known from its own pixel grid. This module turns it
into what :mod:`cmpc.localize.verify` needs:

1. :func:`read_scene`: the image (C, H, W), its valid mask and ground sampling distance
   (``--gsd`` for a plain image; the file's transform otherwise, whose position is only a
   prior, see :func:`own_prior`). Bad input is a one-line :class:`DataError`.
2. :func:`tile_scene`: for each heading hypothesis (north-up alone by default; every
   ``rotation_step_deg`` within +-``rotation_range_deg`` otherwise) the scene is resampled
   north-up at the map's working GSD and cut into reference-sized tiles at the reference
   stride (half a tile); each tile keeps its centre in scene pixels.
3. :func:`scene_candidates`: all tiles embedded and searched at once (coarse top-k), then an
   optional :class:`CandidateRescorer` (a scene-graph rescoring plugs in here: nodes = (tile,
   candidate) pairs, edges between candidates of neighbouring tiles whose implied offset
   matches the tiles' offset in the scene) before the correspondences go to RANSAC.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from cmpc.data.patches import to_model_input
from cmpc.data.raster import ground_gsd
from cmpc.errors import ConfigError, DataError
from cmpc.localize.decision import ConfidenceModel
from cmpc.localize.verify import Correspondences, SceneTransform, warp_to_grid

#: Scene GSD / map GSD accepted: finer scenes are smoothed down; much coarser ones lack the
#: detail the map's references were embedded with.
GSD_RATIO_RANGE = (0.2, 2.5)
#: Largest --rotation-range, degrees (a full turn of hypotheses).
MAX_ROTATION_RANGE = 180.0


@dataclass
class SceneSettings:
    """Settings of scene georeferencing (``cmpc georef``; defaults for the demo world).

    ``tile_hypotheses``: besides RANSAC's placements, the most confident tiles alone are
    placements the dense alignment checks; ``vote_placements``: so are the best blocks of
    the offset vote (:func:`cmpc.localize.verify.vote_placements`; 0 = off); ``fine_top``:
    all placements are ranked by one cheap whole-scene correlation and only the best
    ``fine_top`` are aligned exactly (0 = align every placement). Units: degrees, metres, fractions. ``residual_frac`` / ``tile_shift_frac`` are fractions
    of the reference stride. ``min_inliers`` / ``min_inlier_frac`` / ``min_fine_peak``: the
    decision rule (found when all hold; the last one only when fine alignment ran: the
    whole-scene correlation peak, a mean cosine): neighbouring tiles lie one stride apart
    while a right coarse candidate may be 0.7 stride off, so agreement of a few adjacent
    tiles alone is weak evidence and the dense alignment must confirm it.
    :func:`cmpc.localize.georef.load_decision` replaces them by the calibrated ones of
    ``runs/<name>/scene_decision.json`` when present.
    """

    top_k: int = 20
    #: tile spacing as a fraction of the reference stride (1 = the reference stride; 0.5 =
    #: twice as many tiles per side: the nearest tile lies closer to a reference position)
    tile_stride_frac: float = 1.0
    #: scenes with fewer tiles than this are tiled at half the spacing (:meth:`tile_stride_m`):
    #: a scene's tiles lie off the reference grid by up to half a stride, where a tile's
    #: coarse recall is lowest; tiles every half stride put one within a quarter stride of a
    #: reference position, at about 4x the tiles. 0 = off. Chosen on the calibration map
    #: (docs/RESULTS.md, Scene localization): 2x2- to 4x4-tile scenes are tiled densely, 8x8 not
    min_scene_tiles: int = 64
    #: ... and any scene is tiled at half the spacing while its dense tiles over all heading
    #: hypotheses stay within this many (a time budget: an 8x8-tile north-up scene, 225 dense
    #: tiles, is; with 7 headings, 1,575, it is not). 0 = off
    max_dense_tiles: int = 1000
    rotation_range_deg: float = 0.0
    rotation_step_deg: float = 5.0
    scale_tol: float = 0.05
    residual_frac: float = 0.75
    tile_shift_frac: float = 0.25
    max_trials: int = 3000
    min_tile_valid: float = 0.8
    own_prior_radius_m: float = 2000.0
    fine: bool = True
    tile_hypotheses: int = 3
    vote_placements: int = 8
    fine_top: int = 2
    #: best placements of the whole-map dense search (:mod:`cmpc.localize.dense_search`) per
    #: heading that join RANSAC's and the vote's as placements to align; 0 = off (the coarse
    #: candidates alone). Needs the dense descriptor (a refiner or aligner)
    dense_search: int = 3
    min_inliers: int = 3
    min_inlier_frac: float = 0.3
    min_fine_peak: float = 0.15
    #: the calibrated confidence model (:class:`cmpc.localize.decision.ConfidenceModel`); when
    #: set it decides instead of the three thresholds (which stay the fallback when no fine
    #: alignment ran but the model needs its peak)
    confidence: ConfidenceModel | None = None
    batch_size: int = 64
    seed: int = 0

    def check(self) -> None:
        """One-line :class:`ConfigError` for values out of range."""
        if not (0.0 <= self.rotation_range_deg <= MAX_ROTATION_RANGE):
            raise ConfigError(f"--rotation-range must be within 0..{MAX_ROTATION_RANGE:g} degrees, got {self.rotation_range_deg:g}")
        if not (0.5 <= self.rotation_step_deg <= 45.0):
            raise ConfigError(f"the rotation step must be within 0.5..45 degrees, got {self.rotation_step_deg:g}")
        if not (0.0 <= self.scale_tol <= 0.2):
            raise ConfigError(f"the scale tolerance must be within 0..0.2 (a fraction), got {self.scale_tol:g}")
        if not (0.25 <= self.tile_stride_frac <= 1.0):
            raise ConfigError(f"--tile-stride must be within 0.25..1 (a fraction of the reference stride), got {self.tile_stride_frac:g}")
        if self.min_scene_tiles < 0 or self.max_dense_tiles < 0:
            raise ConfigError(f"min_scene_tiles / max_dense_tiles must be >= 0, got {self.min_scene_tiles} / {self.max_dense_tiles}")
        if self.dense_search < 0:
            raise ConfigError(f"dense_search must be >= 0 (placements per heading; 0 = off), got {self.dense_search}")
        if self.top_k < 1:
            raise ConfigError(f"--top-k must be at least 1, got {self.top_k}")

    def tile_stride_m(self, width_m: float, height_m: float, tile_m: float, stride_m: float) -> float:
        """Tile spacing (metres) for a scene of ``width_m`` x ``height_m``: ``tile_stride_frac``
        of the reference ``stride_m``, halved once when the scene then holds fewer than
        ``min_scene_tiles`` tiles (north-up count) or when its half-spacing tiles over all
        heading hypotheses stay within ``max_dense_tiles``. A quarter stride found no more than
        half a stride on calibration scenes (docs/RESULTS.md), so the spacing is halved only once."""
        st = stride_m * self.tile_stride_frac

        def count(spacing: float) -> int:
            return math.prod(max(0, int(math.floor((side - tile_m) / spacing + 1e-6)) + 1) for side in (width_m, height_m))

        small = bool(self.min_scene_tiles) and count(st) < self.min_scene_tiles
        affordable = bool(self.max_dense_tiles) and count(st / 2.0) * len(self.headings()) <= self.max_dense_tiles
        return st / 2.0 if small or affordable else st

    def headings(self) -> list[float]:
        """Heading hypotheses, degrees: 0, +-step, +-2 step, ... within the range."""
        if self.rotation_range_deg <= 0:
            return [0.0]
        n = int(math.floor(self.rotation_range_deg / self.rotation_step_deg + 1e-9))
        hs = [0.0] + [s * i * self.rotation_step_deg for i in range(1, n + 1) for s in (1, -1)]
        if self.rotation_range_deg - n * self.rotation_step_deg > 1e-6:
            hs += [self.rotation_range_deg, -self.rotation_range_deg]
        hs = sorted({round(((h + 180.0) % 360.0) - 180.0, 6) for h in hs})
        return hs


# --------------------------------------------------------------------------- reading


@dataclass
class SceneImage:
    """A SAR scene: ``image`` (C, H, W) float32 (0 at invalid pixels), ``valid`` (H, W)
    bool, ``gsd_m`` metres per pixel, ``path``; ``georef`` when the file carries a CRS and
    transform: ``{"crs", "transform" (6 numbers), "centre_xy" (in the map CRS or None)}``."""

    image: np.ndarray
    valid: np.ndarray
    gsd_m: float
    path: Path
    georef: dict[str, Any] | None = None

    @property
    def height(self) -> int:
        return int(self.image.shape[1])

    @property
    def width(self) -> int:
        return int(self.image.shape[2])


def read_scene(
    path: str | os.PathLike[str],
    gsd_m: float | None = None,
    bands: list[int] | None = None,
    map_crs: str | None = None,
) -> SceneImage:
    """Read a scene image (GeoTIFF, plain TIFF or PNG) with rasterio.

    ``gsd_m``: metres per pixel; required for an image without georeferencing, overrides the
    file's otherwise. ``bands``: 1-based bands (default all). ``map_crs``: to place the file's
    own centre (a prior only) in the map CRS. One-line :class:`DataError` for a missing or
    unreadable file, a bad band, no valid pixel, or a constant image.
    """
    import rasterio
    from affine import Affine
    from rasterio.errors import RasterioError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"scene not found: {p}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NotGeoreferencedWarning: a plain image is allowed
            with rasterio.open(p) as src:
                sel = list(range(1, src.count + 1)) if bands is None else [int(b) for b in bands]
                bad = [b for b in sel if b < 1 or b > src.count]
                if bad:
                    raise DataError(f"band {bad[0]} is beyond the scene {p.name}, which has {src.count} band(s)")
                crs, transform = src.crs, src.transform
                has_georef = crs is not None and transform is not None and transform != Affine.identity()
                # another CRS than the map's (e.g. World Mercator, whose unit is 0.83 m on the
                # ground at 34 N, rotated against UTM grid north): viewed in the map CRS, as the
                # tiler and the query reader view rasters, so the scene's GSD is ground metres
                # and its rows run along the map's grid; only the CRS's geometry is used, the
                # position stays a prior
                view = has_georef and _needs_view(crs, map_crs, (src.height, src.width), transform, p.name)
                if not view:
                    arr = src.read(sel, masked=True)
    except RasterioError as e:
        raise DataError(f"cannot read the scene {p}: {str(e).splitlines()[0] if str(e) else type(e).__name__} (corrupt or not an image?)") from None
    if view:
        from cmpc.data.raster import open_raster

        with open_raster(p, bands=sel, crs=map_crs, role="scene") as v:
            data, valid = v.read_on(v.grid, 0, 0, v.grid.height, v.grid.width)  # NaN at nodata and outside the warped footprint
            crs, transform = v.grid.crs, v.grid.transform
    else:
        data = np.asarray(arr.astype(np.float32).filled(np.nan))  # integer scenes with nodata / a mask: NaN there
        valid = ~np.ma.getmaskarray(arr).any(axis=0)
    valid &= np.isfinite(data).all(axis=0)
    if not valid.any():
        raise DataError(f"the scene {p} has no valid pixel (all nodata)")
    vals = data[:, valid]
    if float(np.nanstd(vals)) == 0.0:
        raise DataError(f"the scene {p} is constant (every valid pixel is {float(vals.flat[0]):g}); nothing to match")
    data[:, ~valid] = 0.0
    georef = None
    if has_georef:
        own_gsd = _own_gsd(crs, transform, data.shape[1:])
        centre = _centre_in(crs, transform, data.shape[1:], map_crs)
        georef = {"crs": crs.to_string(), "transform": list(transform)[:6], "centre_xy": centre, "gsd_m": own_gsd}
        if gsd_m is None:
            gsd_m = own_gsd
    if gsd_m is None:
        raise DataError(f"the scene {p} has no georeferencing; give its pixel size with --gsd M/PX")
    if not (math.isfinite(float(gsd_m)) and float(gsd_m) > 0):
        raise DataError(f"the scene's GSD must be a positive number of metres per pixel, got {gsd_m}")
    return SceneImage(image=data, valid=valid, gsd_m=float(gsd_m), path=p, georef=georef)


def _needs_view(crs: Any, map_crs: str | None, shape: tuple[int, int], transform: Any, name: str = "") -> bool:
    """Whether a georeferenced scene is viewed in the map CRS: it has another CRS, and the map
    CRS is true to scale where the scene says it lies. A scene whose own georeferencing puts
    it where the map CRS is not (e.g. two UTM zones away, far off any map in it) is read as
    stored, with one warning line: its position is only a prior, and its GSD is still ground
    metres (:func:`_own_gsd`)."""
    if map_crs is None:
        return False
    from rasterio.crs import CRS

    from cmpc.data.crs import crs_equal
    from cmpc.data.raster import scale_problem

    try:
        if crs_equal(crs, map_crs):
            return False
        h, w = shape
        xs, ys = zip(*(transform * c for c in ((0, 0), (w, 0), (0, h), (w, h))))
        problem = scale_problem(CRS.from_user_input(map_crs), crs, (min(xs), min(ys), max(xs), max(ys)))
    except Exception:  # an exotic CRS: read as stored, the user gives --gsd
        return False
    if problem is not None:
        print(f"warning: the scene {name} lies, by its own georeferencing, where the map's CRS {map_crs} is not true to scale "
              f"({problem}): far from the map; read as stored", file=sys.stderr)
        return False
    return True


def _own_gsd(crs: Any, transform: Any, shape: tuple[int, int]) -> float | None:
    """Ground metres per pixel of a georeferenced scene (None when it cannot be told): measured
    in its working CRS (:func:`cmpc.data.raster.working_crs`: its own when metric and true to
    scale, else the local UTM zone), so a World Mercator scene at 34 N gives 8.3 m, not 10.0."""
    try:
        return ground_gsd(crs, transform, shape[1], shape[0])
    except Exception:  # an exotic CRS: the user gives --gsd
        return None


def _centre_in(crs: Any, transform: Any, shape: tuple[int, int], map_crs: str | None) -> list[float] | None:
    """The scene centre by its own georeferencing, in the map CRS (None when not placeable)."""
    h, w = shape
    x, y = transform * (w / 2.0, h / 2.0)
    if map_crs is None:
        return [float(x), float(y)]
    try:
        from rasterio.warp import transform as warp_transform

        xs, ys = warp_transform(crs, map_crs, [x], [y])
        return [float(xs[0]), float(ys[0])]
    except Exception:
        return None


# --------------------------------------------------------------------------- tiling


@dataclass
class SceneTiles:
    """Query tiles of a scene under every heading hypothesis.

    ``x`` (T, C, S, S) standardised model inputs; ``centre_px`` (T, 2) tile centres in scene
    pixels ``(col, row)``; ``heading_deg`` (T,) the hypothesis each was cut under;
    ``grid_rc`` (T, 2) its (row, col) in that hypothesis' tile grid; ``per_heading``: heading
    -> tile indexes; ``tile_m``: tile side, metres; ``stride_m``: tile spacing, metres.
    """

    x: torch.Tensor
    centre_px: np.ndarray
    heading_deg: np.ndarray
    grid_rc: np.ndarray
    per_heading: dict[float, np.ndarray]
    tile_m: float
    stride_m: float

    def __len__(self) -> int:
        return int(len(self.centre_px))


def tile_scene(
    scene: SceneImage,
    tile_m: float,
    stride_m: float,
    work_gsd_m: float,
    img_size: int,
    headings: list[float],
    min_valid: float = 0.8,
) -> SceneTiles:
    """Cut ``scene`` into tiles of ``tile_m`` metres every ``stride_m`` metres, north-up
    under each heading hypothesis, at ``work_gsd_m`` metres per pixel (see the module doc).
    Tiles with less than ``min_valid`` valid pixels are dropped. :class:`DataError` when the
    scene is smaller than one tile or no tile is valid."""
    side_m = min(scene.width, scene.height) * scene.gsd_m
    if side_m < tile_m * 0.999:
        raise DataError(
            f"the scene {scene.path.name} is {scene.width}x{scene.height} px at {scene.gsd_m:g} m/px "
            f"({side_m:.0f} m on its short side), smaller than one reference tile ({tile_m:.0f} m)"
        )
    image = scene.image
    if scene.gsd_m < 0.8 * work_gsd_m:
        from scipy.ndimage import gaussian_filter

        sigma = 0.5 * (work_gsd_m / scene.gsd_m - 1.0)  # anti-aliasing before downsampling
        image = np.stack([gaussian_filter(ch, sigma) for ch in image]).astype(np.float32)
    t_px = int(round(tile_m / work_gsd_m))
    s_px = max(1, int(round(stride_m / work_gsd_m)))
    xs, centres, heads, grid = [], [], [], []
    per: dict[float, list[int]] = {}
    for h in headings:
        tf = SceneTransform.from_params(scene.gsd_m, h, 0.0, 0.0)
        corners = tf.corners(scene.width, scene.height)
        minx, maxy = float(corners[:, 0].min()), float(corners[:, 1].max())
        W = int(math.ceil((corners[:, 0].max() - minx) / work_gsd_m - 1e-6))
        H = int(math.ceil((maxy - corners[:, 1].min()) / work_gsd_m - 1e-6))
        if min(W, H) < t_px:
            continue
        img, val = warp_to_grid(image, scene.valid, tf, minx, maxy, work_gsd_m, 0, 0, H, W)
        ny, nx = (H - t_px) // s_px + 1, (W - t_px) // s_px + 1
        oy = (H - t_px - (ny - 1) * s_px) // 2
        ox = (W - t_px - (nx - 1) * s_px) // 2
        for i in range(ny):
            for j in range(nx):
                r0, c0 = oy + i * s_px, ox + j * s_px
                v = val[r0 : r0 + t_px, c0 : c0 + t_px]
                if v.mean() < min_valid:
                    continue
                a = img[:, r0 : r0 + t_px, c0 : c0 + t_px].copy()
                fill = np.array([a[ch][v].mean() for ch in range(a.shape[0])], dtype=np.float32)
                a[:, ~v] = fill[:, None]
                xs.append(to_model_input(a, img_size))
                cx = minx + (c0 + t_px / 2.0) * work_gsd_m
                cy = maxy - (r0 + t_px / 2.0) * work_gsd_m
                centres.append(tf.inverse(np.array([[cx, cy]]))[0])
                heads.append(h)
                grid.append((i, j))
                per.setdefault(float(h), []).append(len(xs) - 1)
    if not xs:
        raise DataError(f"the scene {scene.path.name} has no tile with at least {min_valid:.0%} valid pixels")
    return SceneTiles(
        x=torch.stack(xs),
        centre_px=np.array(centres, dtype=np.float64),
        heading_deg=np.array(heads, dtype=np.float64),
        grid_rc=np.array(grid, dtype=np.int64),
        per_heading={k: np.array(v, dtype=np.int64) for k, v in per.items()},
        tile_m=float(tile_m),
        stride_m=float(stride_m),
    )


def scene_grid_centres(scene: SceneImage, tile_m: float, stride_m: float) -> np.ndarray:
    """(M, 2) centres (scene pixels) of the scene's own tile grid (north-up in the scene)."""
    t = tile_m / scene.gsd_m
    s = stride_m / scene.gsd_m
    out = []
    for size, n_axis in ((scene.width, 0), (scene.height, 1)):
        n = max(1, int(math.floor((size - t) / s + 1e-6)) + 1)
        off = (size - t - (n - 1) * s) / 2.0
        out.append(off + t / 2.0 + s * np.arange(n))
    cc, rr = np.meshgrid(out[0], out[1])
    return np.stack([cc.ravel(), rr.ravel()], axis=1)


# --------------------------------------------------------------------------- candidates


class CandidateRescorer(Protocol):
    """Reorders / rescores the tiles' candidates before RANSAC (e.g. a scene-graph GNN:
    nodes (tile, candidate), edges between candidates of neighbouring tiles carrying the
    offset their positions imply vs the tiles' offset in the scene)."""

    def rescore(self, tiles: SceneTiles, rows: np.ndarray, scores: np.ndarray, positions_m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(T, k) rows and scores -> (T, k) rows and scores, best first."""
        ...


@dataclass
class SceneCandidates:
    """Coarse top-k of every tile: ``rows`` (T, k) index rows, ``scores`` (T, k) cosines,
    ``positions_m`` (T, k, 2) reference centres; ``corr``: the correspondences for RANSAC."""

    rows: np.ndarray
    scores: np.ndarray
    positions_m: np.ndarray
    corr: Correspondences
    timings: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def scene_candidates(
    localizer,  # noqa: ANN001 - cmpc.localize.localizer.Localizer
    tiles: SceneTiles,
    top_k: int,
    allowed_rows: np.ndarray | None = None,
    rescorer: CandidateRescorer | None = None,
    batch_size: int = 64,
) -> SceneCandidates:
    """Embed every tile, search the map once for all of them (top ``top_k`` within
    ``allowed_rows``), optionally rescore, and return the correspondences."""
    import time

    t0 = time.perf_counter()
    localizer.check_channels(tiles.x.shape[1], "the scene")
    emb = np.concatenate([localizer.embed(tiles.x[i : i + batch_size]) for i in range(0, len(tiles), batch_size)])
    t1 = time.perf_counter()
    scores, rows = localizer.index.search(emb, top_k, allowed_rows)
    t2 = time.perf_counter()
    positions = np.asarray(localizer.index.positions, dtype=np.float64)[rows]
    if rescorer is not None:
        rows, scores = rescorer.rescore(tiles, rows, scores, positions)
        positions = np.asarray(localizer.index.positions, dtype=np.float64)[rows]
    return SceneCandidates(rows, np.asarray(scores, dtype=np.float32), positions, _correspondences(tiles, rows, scores, positions),
                           {"embed_s": t1 - t0, "search_s": t2 - t1})


def _correspondences(tiles: SceneTiles, rows: np.ndarray, scores: np.ndarray, positions: np.ndarray) -> Correspondences:
    T, k = rows.shape
    return Correspondences(
        scene_px=np.repeat(tiles.centre_px, k, axis=0),
        map_xy=positions.reshape(-1, 2),
        tile=np.repeat(np.arange(T), k),
        rank=np.tile(np.arange(k), T),
        score=np.asarray(scores, dtype=np.float32).reshape(-1),
        heading_deg=np.repeat(tiles.heading_deg, k),
    )


def rescored(localizer, tiles: SceneTiles, cand: SceneCandidates, rescorer: CandidateRescorer) -> SceneCandidates:  # noqa: ANN001
    """``cand`` reordered / rescored by ``rescorer`` (the search is not repeated)."""
    import time

    t0 = time.perf_counter()
    rows, scores = rescorer.rescore(tiles, cand.rows, cand.scores, cand.positions_m)
    positions = np.asarray(localizer.index.positions, dtype=np.float64)[rows]
    scores = np.asarray(scores, dtype=np.float32)
    return SceneCandidates(rows, scores, positions, _correspondences(tiles, rows, scores, positions),
                           {**cand.timings, "rescore_s": time.perf_counter() - t0})
