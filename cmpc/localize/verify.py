"""Geometric verification of a SAR scene: from tile candidates to one similarity transform.

A scene's tiles each bring top-k candidate references (a *correspondence*: tile centre in
scene pixels -> candidate reference centre in map metres). Tiles are right only part of
the time, but the right candidates of different tiles agree on one transform of the whole
scene, the wrong ones do not. This module finds that transform:

1. :func:`estimate_scene_transform`: RANSAC (``skimage.measure.ransac`` with
   ``SimilarityTransform``) over the correspondences; ``is_data_valid`` rejects minimal
   samples that cannot be right before any fit (two candidates of one tile, a pair whose map
   distance is not the scene distance times the nominal GSD, a pair whose direction needs a
   heading outside the searched range) and ``is_model_valid`` bounds scale and heading.
2. :func:`fine_align_scene` (the dense descriptor of the refiner): the scene is warped onto
   the map's grid at the estimate, its descriptors correlated against the map's around it
   (a translation), then tile by tile (per-tile offsets), and a least-squares similarity is
   refitted on the tiles that agree.

Geometry (metres, pixels, degrees): scene pixel ``(col, row)`` with the rasterio convention
(pixel ``(0, 0)`` covers ``[0, 1) x [0, 1)``); the transform maps it to map metres
``x = a col + b row + c``, ``y = d col + e row + f`` (rasterio ``Affine`` order). For a
scene of GSD ``g`` whose "up" (decreasing row) points at ``heading`` degrees clockwise from
north: ``a = g cos h, b = -g sin h, d = -g sin h, e = -g cos h``. skimage's similarity has
no reflection, so it is fitted on ``(col, -row)`` (then its rotation is ``-heading``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

# --------------------------------------------------------------------------- transform


@dataclass(frozen=True)
class SceneTransform:
    """Scene pixel -> map metres, a similarity (see the module doc for the convention)."""

    a: float
    b: float
    c: float
    d: float
    e: float
    f: float

    @classmethod
    def from_params(cls, gsd_m: float, heading_deg: float, x0: float, y0: float) -> SceneTransform:
        """The transform of a scene with GSD ``gsd_m`` (m/px) and ``heading_deg`` whose pixel
        corner ``(0, 0)`` lies at map ``(x0, y0)``."""
        h = math.radians(heading_deg)
        g = float(gsd_m)
        return cls(g * math.cos(h), -g * math.sin(h), float(x0), -g * math.sin(h), -g * math.cos(h), float(y0))

    @classmethod
    def from_affine(cls, coeffs: tuple[float, ...] | list[float]) -> SceneTransform:
        """From the 6 rasterio-order numbers ``(a, b, c, d, e, f)``."""
        a, b, c, d, e, f = (float(v) for v in list(coeffs)[:6])
        return cls(a, b, c, d, e, f)

    @classmethod
    def from_skimage(cls, model) -> SceneTransform:  # noqa: ANN001 - skimage transform on (col, -row)
        """From a skimage 2-D transform fitted on ``(col, -row) -> (x, y)``."""
        m = np.asarray(model.params, dtype=np.float64)
        return cls(m[0, 0], -m[0, 1], m[0, 2], m[1, 0], -m[1, 1], m[1, 2])

    @property
    def affine(self) -> tuple[float, float, float, float, float, float]:
        """The 6 numbers in rasterio order ``(a, b, c, d, e, f)``."""
        return (self.a, self.b, self.c, self.d, self.e, self.f)

    def to_rasterio(self):  # noqa: ANN201 - affine.Affine
        """As an ``affine.Affine`` (rasterio's transform type)."""
        from affine import Affine

        return Affine(*self.affine)

    @property
    def scale(self) -> float:
        """Metres per scene pixel (the similarity's scale)."""
        return float(math.sqrt(abs(self.a * self.e - self.b * self.d)))

    @property
    def heading_deg(self) -> float:
        """Direction of the scene's "up" (decreasing row), degrees clockwise from north, in (-180, 180]."""
        # up = -(b, e) in map coordinates; heading = atan2(east, north)
        return float(math.degrees(math.atan2(-self.b, -self.e)))

    def apply(self, colrow: np.ndarray) -> np.ndarray:
        """(N, 2) scene pixel ``(col, row)`` -> (N, 2) map ``(x, y)`` metres."""
        p = np.asarray(colrow, dtype=np.float64).reshape(-1, 2)
        return np.stack([self.a * p[:, 0] + self.b * p[:, 1] + self.c, self.d * p[:, 0] + self.e * p[:, 1] + self.f], axis=1)

    def inverse(self, xy: np.ndarray) -> np.ndarray:
        """(N, 2) map ``(x, y)`` metres -> (N, 2) scene ``(col, row)``."""
        p = np.asarray(xy, dtype=np.float64).reshape(-1, 2) - np.array([self.c, self.f])
        det = self.a * self.e - self.b * self.d
        col = (self.e * p[:, 0] - self.b * p[:, 1]) / det
        row = (-self.d * p[:, 0] + self.a * p[:, 1]) / det
        return np.stack([col, row], axis=1)

    def shifted(self, dx: float, dy: float) -> SceneTransform:
        """The same transform moved by ``(dx, dy)`` metres."""
        return SceneTransform(self.a, self.b, self.c + dx, self.d, self.e, self.f + dy)

    def corners(self, width: int, height: int) -> np.ndarray:
        """(4, 2) map positions of the scene's outer corners NW, NE, SE, SW (pixel edges)."""
        return self.apply(np.array([[0.0, 0.0], [width, 0.0], [width, height], [0.0, height]]))

    def centre(self, width: int, height: int) -> np.ndarray:
        """(2,) map position of the scene's centre."""
        return self.apply(np.array([[width / 2.0, height / 2.0]]))[0]


def _flip(colrow: np.ndarray) -> np.ndarray:
    """(col, row) -> (col, -row): skimage's similarity has no reflection."""
    p = np.asarray(colrow, dtype=np.float64).reshape(-1, 2)
    return np.stack([p[:, 0], -p[:, 1]], axis=1)


def angle_diff_deg(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    """Signed difference ``a - b`` of angles in degrees, wrapped to (-180, 180]."""
    d = (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64) + 180.0) % 360.0 - 180.0
    return np.where(d == -180.0, 180.0, d)


# --------------------------------------------------------------------------- correspondences


@dataclass
class Correspondences:
    """N tile -> candidate pairs of one scene.

    ``scene_px`` (N, 2) tile centres, scene pixels ``(col, row)``; ``map_xy`` (N, 2) candidate
    reference centres, map metres; ``tile`` (N,) int: which tile (a tile of one heading
    hypothesis; two candidates of one tile cannot both be right); ``rank`` (N,) int: the
    candidate's rank in its tile's top-k (0 best); ``score`` (N,) float32 cosine;
    ``heading_deg`` (N,) the heading hypothesis the tile was cut under.
    """

    scene_px: np.ndarray
    map_xy: np.ndarray
    tile: np.ndarray
    rank: np.ndarray
    score: np.ndarray
    heading_deg: np.ndarray

    def __len__(self) -> int:
        return len(self.tile)

    @property
    def weight(self) -> np.ndarray:
        """(N,) rank weight ``1 / (1 + rank)``: how much a candidate counts in a tile's support."""
        return 1.0 / (1.0 + np.asarray(self.rank, dtype=np.float64))

    def subset(self, keep: np.ndarray) -> Correspondences:
        """The correspondences selected by a boolean mask or index array."""
        return Correspondences(self.scene_px[keep], self.map_xy[keep], self.tile[keep], self.rank[keep], self.score[keep], self.heading_deg[keep])


@dataclass
class RansacSettings:
    """Bounds and budget of :func:`estimate_scene_transform`.

    ``gsd_m``: nominal scene metres per pixel; ``scale_tol``: the scale may differ from it by
    this fraction (0.05 = +-5 %); ``heading_deg`` +- ``heading_range_deg``: the headings
    allowed; ``residual_m``: inlier distance, metres (a tile's right candidate is up to
    ``stride * sqrt(2) / 2`` from the tile's true centre on a grid of ``stride``);
    ``min_pair_m``: the two points of a sample at least this far apart in the scene, metres
    (closer pairs fix the heading badly); ``max_trials`` per stage; ``rank_stages``: RANSAC
    runs on the candidates of rank < r for each r, then on all (rank-weighted sampling, as in
    PROSAC: the top candidates are right most often); ``seed``.
    """

    gsd_m: float
    scale_tol: float = 0.05
    heading_deg: float = 0.0
    heading_range_deg: float = 3.0
    residual_m: float = 48.0
    min_pair_m: float = 60.0
    max_trials: int = 3000
    rank_stages: tuple[int, ...] = (1, 3, 10)
    seed: int = 0


@dataclass
class RansacResult:
    """``transform``: the estimate (None when no valid model was found); ``inliers`` (N,)
    bool over the correspondences; ``inlier_tiles``: distinct tiles with an inlier, among
    ``n_tiles`` tiles of the heading hypothesis nearest the estimate; ``support``: sum over
    those tiles of their best inlier's rank weight; ``trials``: valid minimal samples fitted;
    ``hypotheses``: every stage's model, best first (``transform`` is the first), for a
    dense check to arbitrate between look-alike placements."""

    transform: SceneTransform | None
    inliers: np.ndarray
    inlier_tiles: int = 0
    n_tiles: int = 0
    support: float = 0.0
    trials: int = 0
    tile_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    hypotheses: list[SceneTransform] = field(default_factory=list)

    @property
    def inlier_frac(self) -> float:
        """``inlier_tiles / n_tiles`` (0 without tiles)."""
        return float(self.inlier_tiles / self.n_tiles) if self.n_tiles else 0.0


def _model_ok(model, s: RansacSettings) -> bool:  # noqa: ANN001 - skimage transform
    scale = float(model.scale)
    if not (abs(scale / s.gsd_m - 1.0) <= s.scale_tol):
        return False
    heading = -math.degrees(float(model.rotation))
    return abs(float(angle_diff_deg(heading, s.heading_deg))) <= s.heading_range_deg


def estimate_scene_transform(
    corr: Correspondences,
    settings: RansacSettings,
    tiles_per_heading: dict[float, np.ndarray] | None = None,
) -> RansacResult:
    """The scene's similarity transform from tile candidates, by RANSAC (module doc).

    ``tiles_per_heading``: heading hypothesis (degrees) -> the tile ids cut under it (for
    counting inlier tiles at the estimated heading); default: every tile in ``corr``.
    Returns a :class:`RansacResult` (``transform`` None when no sample gave a valid model).
    """
    from skimage.measure import ransac

    n = len(corr)
    empty = RansacResult(None, np.zeros(n, dtype=bool))
    if n < 2:
        return empty
    src = _flip(corr.scene_px)
    dst = np.asarray(corr.map_xy, dtype=np.float64)
    s = settings
    min_pair_px = s.min_pair_m / s.gsd_m
    trials = [0]

    def pair_ok(a: np.ndarray, b: np.ndarray, rot_deg: float | None = None, scale: float | None = None) -> bool:
        # a, b: two (col, -row) and (x, y) points. A model fitted exactly on two points
        # carries their position errors (up to residual_m each) into its scale and heading:
        # the bounds get that slack, which shrinks as the points lie farther apart
        ds = a[1] - a[0]
        dm = b[1] - b[0]
        ls = math.hypot(ds[0], ds[1])
        if ls < min_pair_px:
            return False
        slack = 2.0 * s.residual_m / (ls * s.gsd_m)
        if scale is None:
            scale = math.hypot(dm[0], dm[1]) / ls
        if abs(scale / s.gsd_m - 1.0) > s.scale_tol + slack:
            return False
        if rot_deg is None:
            rot_deg = math.degrees(math.atan2(dm[1], dm[0]) - math.atan2(ds[1], ds[0]))
        tol = s.heading_range_deg + math.degrees(math.asin(min(1.0, slack)))
        return abs(float(angle_diff_deg(-rot_deg, s.heading_deg))) <= tol

    # the tile ids ride along as a third "data" array: two candidates of one tile are no sample
    tiles = np.asarray(corr.tile, dtype=np.float64)

    def data_ok(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> bool:
        ok = t[0] != t[1] and pair_ok(a, b)
        trials[0] += int(ok)
        return ok

    def model_ok(model, a: np.ndarray, b: np.ndarray, _t: np.ndarray) -> bool:  # noqa: ANN001
        if len(a) == 2:
            return pair_ok(a, b, math.degrees(float(model.rotation)), float(model.scale))
        return _model_ok(model, s)

    best: tuple[int, float, float] | None = None  # (inlier tiles, support, -residuals) of the best model
    best_model = None
    stage_models: list[tuple[tuple[int, float, float], object]] = []
    ranks = np.asarray(corr.rank)
    top = int(ranks.max()) + 1
    for r in sorted({int(v) for v in s.rank_stages if 0 < int(v) < top}) + [top]:
        sel = np.flatnonzero(ranks < r)
        if len(sel) < 2:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # skimage warns when no model is found
            model, stage_inl = ransac(
                (src[sel], dst[sel], tiles[sel]),
                _SimilarityOn2,
                min_samples=2,
                residual_threshold=s.residual_m,
                is_data_valid=data_ok,
                is_model_valid=model_ok,
                max_trials=int(s.max_trials),
                rng=int(s.seed),
            )
        if stage_inl is None or not np.any(stage_inl):
            continue
        inl_all = np.zeros(n, dtype=bool)
        inl_all[sel[np.asarray(stage_inl, dtype=bool)]] = True
        model = _bounded_fit(corr, inl_all, s)
        if model is None:
            continue
        # every stage's model is judged on all correspondences: distinct inlier tiles first
        key, _ = _consensus(corr, model, s)
        stage_models.append((key, model))
        if best is None or key > best:
            best, best_model = key, model
    if best_model is None:
        return RansacResult(None, np.zeros(n, dtype=bool), trials=trials[0])
    # one more least-squares round on the consensus of the chosen model
    _, inliers = _consensus(corr, best_model, s)
    model = _bounded_fit(corr, inliers, s) or best_model
    key, inl2 = _consensus(corr, model, s)
    if key >= (best or key):
        inliers = inl2
    else:
        model = best_model
    st = SceneTransform.from_skimage(model)
    out = _summarise(corr, st, inliers, s, tiles_per_heading, trials[0])
    others = [SceneTransform.from_skimage(m) for _, m in sorted(stage_models, key=lambda km: km[0], reverse=True)]
    out.hypotheses = distinct_transforms([st, *others], 0.5 * s.residual_m)
    return out


def vote_placements(
    corr: Correspondences,
    gsd_m: float,
    stride_m: float,
    top_n: int = 8,
    min_tiles: int = 2,
) -> list[tuple[int, float, SceneTransform]]:
    """Scene placements by offset voting (a Hough transform over translation), per heading
    hypothesis, at the nominal GSD.

    Every correspondence implies where the scene's pixel ``(0, 0)`` lies on the map
    (``map_xy - T_h(scene_px)``, ``T_h`` the nominal similarity of the tile's heading
    hypothesis). A tile's right candidate is the reference nearest its centre, so right
    correspondences imply origins within a ``stride_m`` square around the true one; wrong
    ones scatter. The origins are binned at half a stride and every 3 x 3 block of bins (1.5
    strides, which holds any stride square) counts the distinct tiles voting in it. The
    ``top_n`` blocks with the most tiles (at least ``min_tiles``; ties by summed rank weight
    ``1 / (1 + rank)``) give placements: the weighted mean origin of their tiles' best
    votes, skipped within a stride of a better placement. RANSAC samples pairs and can miss a
    consensus of a few tiles among hundreds of wrong candidates; the vote counts all of
    them at once (O(N)). Returns ``[(tiles, weight, transform), ...]``, best first.
    """
    n = len(corr)
    if n == 0:
        return []
    cell = stride_m / 2.0
    found: list[tuple[int, float, SceneTransform]] = []
    for h in np.unique(np.asarray(corr.heading_deg, dtype=np.float64)):
        sel = np.flatnonzero(np.asarray(corr.heading_deg) == h)
        t0 = SceneTransform.from_params(gsd_m, float(h), 0.0, 0.0)
        origin = np.asarray(corr.map_xy, dtype=np.float64)[sel] - t0.apply(corr.scene_px[sel])
        b = np.floor(origin / cell).astype(np.int64)
        tile = np.asarray(corr.tile, dtype=np.int64)[sel]
        w = corr.weight[sel]
        # every vote falls in the 9 blocks whose 3 x 3 bins hold its bin (block key = its NW-most bin)
        dx, dy = np.meshgrid(np.arange(-2, 1), np.arange(-2, 1))
        bx = (b[:, 0][:, None] + dx.ravel()[None]).ravel()
        by = (b[:, 1][:, None] + dy.ravel()[None]).ravel()
        vi = np.repeat(np.arange(len(sel)), 9)
        # one vote per (block, tile): the tile's best-weighted candidate in that block
        order = np.lexsort((-w[vi], tile[vi], by, bx))
        bx, by, vi = bx[order], by[order], vi[order]
        first = np.ones(len(vi), dtype=bool)
        first[1:] = (bx[1:] != bx[:-1]) | (by[1:] != by[:-1]) | (tile[vi][1:] != tile[vi][:-1])
        bx, by, vi = bx[first], by[first], vi[first]
        keys, inv, counts = np.unique(np.stack([bx, by], axis=1), axis=0, return_inverse=True, return_counts=True)
        inv = inv.ravel()
        wsum = np.bincount(inv, weights=w[vi], minlength=len(keys))
        rank = np.lexsort((-wsum, -counts))
        taken: list[np.ndarray] = []
        for k in rank:
            if counts[k] < min_tiles or len(taken) >= top_n:
                break
            m = vi[inv == k]
            o = np.average(origin[m], axis=0, weights=w[m])
            if any(np.abs(o - c).max() < stride_m for c in taken):
                continue  # the same cluster seen from an overlapping block
            taken.append(o)
            found.append((int(counts[k]), float(wsum[k]), SceneTransform.from_params(gsd_m, float(h), float(o[0]), float(o[1]))))
    found.sort(key=lambda r: (r[0], r[1]), reverse=True)
    return found[:top_n]


def distinct_transforms(transforms: list[SceneTransform], min_dist_m: float, probe: tuple[float, float] = (0.0, 0.0)) -> list[SceneTransform]:
    """``transforms`` without near-duplicates (a later one whose translation is within
    ``min_dist_m`` of a kept one and heading within 2 degrees), order kept."""
    kept: list[SceneTransform] = []
    for t in transforms:
        p = t.apply(np.array([probe]))[0]
        if all(np.hypot(*(p - k.apply(np.array([probe]))[0])) > min_dist_m or abs(float(angle_diff_deg(t.heading_deg, k.heading_deg))) > 2.0 for k in kept):
            kept.append(t)
    return kept


def score_transform(
    corr: Correspondences,
    transform: SceneTransform,
    settings: RansacSettings,
    tiles_per_heading: dict[float, np.ndarray] | None = None,
) -> RansacResult:
    """The consensus of any placement (e.g. one found by dense alignment) over the
    correspondences: inliers within ``settings.residual_m``, inlier tiles at its heading."""
    from skimage.transform import SimilarityTransform

    m = np.array([[transform.a, -transform.b, transform.c], [transform.d, -transform.e, transform.f], [0.0, 0.0, 1.0]])
    _, inl = _consensus(corr, SimilarityTransform(matrix=m), settings)
    return _summarise(corr, transform, inl, settings, tiles_per_heading, 0)


class _SimilarityOn2:
    """skimage's ``SimilarityTransform`` fitted on the first two data arrays only (the
    third carries tile ids for ``is_data_valid``); residuals likewise."""

    def __init__(self) -> None:
        from skimage.transform import SimilarityTransform

        self._t = SimilarityTransform()

    @classmethod
    def from_estimate(cls, src: np.ndarray, dst: np.ndarray, _tiles: np.ndarray | None = None):  # noqa: ANN206
        from skimage.transform import SimilarityTransform

        est = SimilarityTransform.from_estimate(src, dst)
        if not est:  # a FailedEstimation is falsy
            return est
        out = cls()
        out._t = est
        return out

    def estimate(self, src: np.ndarray, dst: np.ndarray, _tiles: np.ndarray | None = None) -> bool:
        return bool(self._t.estimate(src, dst))

    def residuals(self, src: np.ndarray, dst: np.ndarray, _tiles: np.ndarray | None = None) -> np.ndarray:
        return self._t.residuals(src, dst)

    @property
    def params(self) -> np.ndarray:
        return self._t.params

    @property
    def scale(self) -> float:
        return float(self._t.scale)

    @property
    def rotation(self) -> float:
        return float(self._t.rotation)

    def __bool__(self) -> bool:
        return True


def _consensus(corr: Correspondences, model, s: RansacSettings) -> tuple[tuple[int, float, float], np.ndarray]:  # noqa: ANN001
    """(distinct inlier tiles, their summed best rank weight, -sum of clipped squared
    residuals) of ``model`` over all correspondences, and the inlier mask."""
    res = model.residuals(_flip(corr.scene_px), np.asarray(corr.map_xy, dtype=np.float64))
    inl = res < s.residual_m
    tile_w: dict[int, float] = {}
    for t, wi in zip(corr.tile[inl], corr.weight[inl]):
        tile_w[int(t)] = max(tile_w.get(int(t), 0.0), float(wi))
    return (len(tile_w), float(sum(tile_w.values())), -float(np.sum(np.minimum(res, s.residual_m) ** 2))), inl


def _bounded_fit(corr: Correspondences, inliers: np.ndarray, s: RansacSettings):  # noqa: ANN202 - skimage transform | None
    """Least-squares similarity on the inliers (each tile's best-ranked inlier only), kept
    inside the bounds: a scale outside them is pinned to the nominal GSD, a heading outside
    them clamped to the nearest allowed one (then only the translation is fitted)."""
    from skimage.transform import SimilarityTransform

    one = _best_per_tile(corr, inliers)
    if one.sum() < 2:
        return None
    px, xy = corr.scene_px[one], np.asarray(corr.map_xy, dtype=np.float64)[one]
    model = fit_similarity(px, xy)
    if model and _model_ok(model, s):
        return model
    model = fit_similarity(px, xy, s.gsd_m, fixed_scale=True)
    if model and _model_ok(model, s):
        return model
    heading = -math.degrees(float(model.rotation)) if model else s.heading_deg
    d = float(angle_diff_deg(heading, s.heading_deg))
    heading = s.heading_deg + float(np.clip(d, -s.heading_range_deg, s.heading_range_deg))
    st = SceneTransform.from_params(s.gsd_m, heading, 0.0, 0.0)
    off = (xy - st.apply(px)).mean(axis=0)
    m = np.array([[st.a, -st.b, off[0]], [st.d, -st.e, off[1]], [0.0, 0.0, 1.0]])
    return SimilarityTransform(matrix=m)


def _best_per_tile(corr: Correspondences, inliers: np.ndarray) -> np.ndarray:
    """Mask keeping, per tile, only its best-ranked inlier (a tile has one true position)."""
    keep = np.zeros(len(corr), dtype=bool)
    seen: set[int] = set()
    for i in np.lexsort((corr.rank, corr.tile)):
        if inliers[i] and int(corr.tile[i]) not in seen:
            seen.add(int(corr.tile[i]))
            keep[i] = True
    return keep


def fit_similarity(scene_px: np.ndarray, map_xy: np.ndarray, gsd_m: float | None = None, fixed_scale: bool = False):  # noqa: ANN201
    """Least-squares similarity ``(col, -row) -> (x, y)`` (skimage transform); with
    ``fixed_scale`` the scale is pinned to ``gsd_m`` (a rigid fit of the scaled points)."""
    from skimage.transform import EuclideanTransform, SimilarityTransform

    src = _flip(scene_px)
    dst = np.asarray(map_xy, dtype=np.float64).reshape(-1, 2)
    if not fixed_scale:
        return SimilarityTransform.from_estimate(src, dst)
    assert gsd_m is not None
    rigid = EuclideanTransform.from_estimate(src * gsd_m, dst)
    if not rigid:  # a FailedEstimation (e.g. poorly conditioned: all points on one tile) is falsy
        return rigid
    m = np.asarray(rigid.params, dtype=np.float64).copy()
    m[:2, :2] *= gsd_m
    return SimilarityTransform(matrix=m)


def _summarise(
    corr: Correspondences,
    st: SceneTransform,
    inliers: np.ndarray,
    s: RansacSettings,
    tiles_per_heading: dict[float, np.ndarray] | None,
    trials: int,
) -> RansacResult:
    """Inlier tiles at the heading hypothesis nearest the estimate, and their support."""
    if tiles_per_heading:
        hyps = np.array(sorted(tiles_per_heading), dtype=np.float64)
        h = float(hyps[np.argmin(np.abs(angle_diff_deg(hyps, st.heading_deg)))])
        tiles = np.asarray(tiles_per_heading[h], dtype=np.int64)
    else:
        tiles = np.unique(corr.tile)
    w = corr.weight
    best: dict[int, float] = {}
    for t, wi in zip(corr.tile[inliers], w[inliers]):
        best[int(t)] = max(best.get(int(t), 0.0), float(wi))
    in_tiles = [t for t in tiles.tolist() if t in best]
    return RansacResult(
        transform=st,
        inliers=inliers,
        inlier_tiles=len(in_tiles),
        n_tiles=len(tiles),
        support=float(sum(best[t] for t in in_tiles)),
        trials=trials,
        tile_ids=np.array(sorted(in_tiles), dtype=np.int64),
    )


# --------------------------------------------------------------------------- fine alignment


@dataclass
class FineResult:
    """Dense fine alignment of a scene: ``transform`` the refined estimate; ``shift_m`` the
    whole-scene translation found (dx, dy); ``peak`` its correlation (mean cosine over the
    scene's valid cells); ``tile_px`` (M, 2) tile centres (scene pixels), ``tile_xy`` (M, 2)
    their aligned map positions, ``tile_peak`` (M,), ``tile_inlier`` (M,) bool (used in the
    refit); ``refit``: whether the per-tile similarity refit replaced the translation-only one."""

    transform: SceneTransform
    shift_m: tuple[float, float]
    peak: float
    tile_px: np.ndarray
    tile_xy: np.ndarray
    tile_peak: np.ndarray
    tile_inlier: np.ndarray
    refit: bool


def warp_to_grid(
    image: np.ndarray,
    valid: np.ndarray,
    transform: SceneTransform,
    origin_x: float,
    origin_y: float,
    gsd_m: float,
    row0: int,
    col0: int,
    height: int,
    width: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The scene ``image`` (C, H, W) resampled (bilinear) onto the north-up grid window
    ``[row0:row0+height, col0:col0+width]`` of a map grid (``origin_x/y`` of its NW corner,
    ``gsd_m``), placing scene pixels with ``transform``. Returns ``(image (C, h, w) float32
    with 0 outside the scene, valid (h, w) bool)``."""
    from skimage.transform import AffineTransform, warp

    # output (col j, row i) centre -> map (x, y) -> scene (col, row) continuous -> skimage
    # coordinates (pixel centres at integers)
    m_out = np.array([[gsd_m, 0.0, origin_x + (col0 + 0.5) * gsd_m], [0.0, -gsd_m, origin_y - (row0 + 0.5) * gsd_m], [0.0, 0.0, 1.0]])
    det = transform.a * transform.e - transform.b * transform.d
    inv = np.array(
        [
            [transform.e / det, -transform.b / det, 0.0],
            [-transform.d / det, transform.a / det, 0.0],
            [0.0, 0.0, 1.0],
        ]
    )
    inv[:2, 2] = -inv[:2, :2] @ np.array([transform.c, transform.f])
    to_sk = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])
    mat = to_sk @ inv @ m_out
    tf = AffineTransform(matrix=mat)
    out = np.stack(
        [warp(np.asarray(ch, dtype=np.float32), tf, output_shape=(height, width), order=1, mode="constant", cval=0.0, preserve_range=True) for ch in image]
    ).astype(np.float32)
    v = warp(np.asarray(valid, dtype=np.float32), tf, output_shape=(height, width), order=1, mode="constant", cval=0.0, preserve_range=True)
    return out, v > 0.999


def _standardise(img: np.ndarray, valid: np.ndarray) -> np.ndarray:
    out = np.zeros_like(img, dtype=np.float32)
    for ch in range(img.shape[0]):
        vals = img[ch][valid]
        mu = float(vals.mean()) if vals.size else 0.0
        sd = float(vals.std()) if vals.size else 1.0
        out[ch][valid] = (img[ch][valid] - mu) / (sd + 1e-6)
    return out


def _scene_window(mosaic, transform: SceneTransform, W: int, H: int) -> tuple[int, int, int, int]:  # noqa: ANN001 - FeatureMosaic
    """(row0, col0, height, width) of the cell-aligned map-grid window holding the placed scene."""
    s, w = mosaic.stride, float(mosaic.gsd_m)
    corners = transform.corners(W, H)
    cmin = math.floor(((corners[:, 0].min() - mosaic.origin_x) / w) / s) * s
    cmax = math.ceil(((corners[:, 0].max() - mosaic.origin_x) / w) / s) * s
    rmin = math.floor(((mosaic.origin_y - corners[:, 1].max()) / w) / s) * s
    rmax = math.ceil(((mosaic.origin_y - corners[:, 1].min()) / w) / s) * s
    return int(rmin), int(cmin), int(rmax - rmin), int(cmax - cmin)


def _scene_descriptors(aligner, mosaic, image: np.ndarray, valid: np.ndarray, transform: SceneTransform, device):  # noqa: ANN001, ANN202
    """The scene warped onto the map grid by ``transform`` and described: ``(desc (C, hc, wc)
    zeroed outside the valid cells, cell_valid (hc, wc) bool, (row0, col0) of the window)``."""
    s, w = mosaic.stride, float(mosaic.gsd_m)
    H, W = image.shape[-2:]
    rmin, cmin, h, wd = _scene_window(mosaic, transform, W, H)
    warped, wvalid = warp_to_grid(image, valid, transform, mosaic.origin_x, mosaic.origin_y, w, rmin, cmin, h, wd)
    x = torch.from_numpy(_standardise(warped, wvalid))[None]
    aligner.eval()
    desc = aligner(x.to(device), "sar").float().cpu()[0]  # (C, h/4, w/4)
    cell_valid = torch.from_numpy(wvalid[s // 2 :: s, s // 2 :: s][: desc.shape[1], : desc.shape[2]].copy())
    # drop one ring of cells at the scene's edge (zero padding makes them unreliable)
    cv = cell_valid.float()[None, None]
    cell_valid = (torch.nn.functional.max_pool2d(1.0 - cv, 3, stride=1, padding=1)[0, 0] < 0.5) & cell_valid
    return desc * cell_valid[None].float(), cell_valid, (rmin, cmin)


@torch.no_grad()
def screen_placements(
    aligner,  # noqa: ANN001 - cmpc.models.descriptor.DenseDescriptor
    mosaic,  # noqa: ANN001 - cmpc.localize.align.FeatureMosaic
    image: np.ndarray,
    valid: np.ndarray,
    transforms: list[SceneTransform],
    max_shift_m: float,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Whole-scene dense correlation peak (mean cosine over the valid cells, as
    :func:`fine_align_scene`'s ``peak``) of every placement in ``transforms``, searched
    within ``max_shift_m`` of each.

    Placements that share their linear part (heading and scale) differ by a translation
    only: the scene is warped and described once per linear part and correlated at each
    placement's window (the translation rounded to the descriptor cell, a few pixels:
    within the search). So ranking many placements costs one descriptor pass per heading
    plus one FFT correlation each; :func:`fine_align_scene` then refines the winner exactly.
    Returns (K,) float peaks.
    """
    from cmpc.localize.align import correlate

    s, w = mosaic.stride, float(mosaic.gsd_m)
    n = int(math.ceil(max_shift_m / w / s))
    peaks = np.full(len(transforms), -np.inf)
    groups: dict[tuple[float, ...], list[int]] = {}
    for i, t in enumerate(transforms):
        groups.setdefault(tuple(round(v / max(t.scale, 1e-12), 5) for v in (t.a, t.b, t.d, t.e)), []).append(i)
    for members in groups.values():
        ref = transforms[members[0]]
        desc, cell_valid, (r0, c0) = _scene_descriptors(aligner, mosaic, image, valid, ref, device)
        frac = float(cell_valid.float().mean()) or 1.0
        hc, wc = desc.shape[-2:]
        tops, lefts = [], []
        for i in members:
            t = transforms[i]
            tops.append(r0 // s + int(round(-(t.f - ref.f) / w / s)) - n)
            lefts.append(c0 // s + int(round((t.c - ref.c) / w / s)) - n)
        ctx = mosaic.crops(torch.tensor([tops]), torch.tensor([lefts]), hc + 2 * n, wc + 2 * n)  # (1, K, C, ., .)
        score = correlate(desc[None], ctx)[0]  # (K, 2n+1, 2n+1)
        peaks[members] = score.flatten(1).max(dim=1).values.numpy() / frac
    return peaks


def _scene_shift(mosaic, desc: torch.Tensor, rmin: int, cmin: int, max_shift_m: float, zncc: bool = False) -> tuple[torch.Tensor, float, tuple[float, float]]:  # noqa: ANN001 - FeatureMosaic
    """Whole-scene search of :func:`fine_align_scene` and :func:`polish_translation`: the
    scene's descriptors ``desc`` (C, hc, wc), warped into the map-grid window whose first
    pixel is (``rmin``, ``cmin``), correlated with the map's at every offset within
    ``max_shift_m`` (plain correlation, or ZNCC). Returns ``(score (2n+1, 2n+1), sub-pixel
    peak, (rows, cols) map pixels of the peak's offset)``; offset (n, n) is no shift."""
    from cmpc.localize.align import correlate, correlate_zncc, subpixel_peak

    s, w = mosaic.stride, float(mosaic.gsd_m)
    hc, wc = desc.shape[-2:]
    n = int(math.ceil(max_shift_m / w / s))
    top = torch.tensor([[int(rmin) // s - n]])
    left = torch.tensor([[int(cmin) // s - n]])
    ctx = mosaic.crops(top, left, hc + 2 * n, wc + 2 * n)  # (1, 1, C, ., .)
    if zncc:
        score = correlate_zncc(desc[None], ctx, mosaic.window_norms(top, left, hc, wc, 2 * n + 1, 2 * n + 1))[0, 0]
    else:
        score = correlate(desc[None], ctx)[0, 0]
    pk, du, dv = subpixel_peak(score[None])
    return score, float(pk[0]), ((float(du[0]) - n) * s, (float(dv[0]) - n) * s)


@torch.no_grad()
def fine_align_scene(
    aligner,  # noqa: ANN001 - cmpc.models.descriptor.DenseDescriptor
    mosaic,  # noqa: ANN001 - cmpc.localize.align.FeatureMosaic (optical descriptors at the work GSD)
    image: np.ndarray,
    valid: np.ndarray,
    transform: SceneTransform,
    tile_px: np.ndarray,
    tile_side_m: float,
    max_shift_m: float,
    tile_shift_m: float = 16.0,
    min_tile_peak: float = 0.1,
    tile_residual_m: float | None = None,
    scale_tol: float = 0.05,
    nominal_gsd_m: float | None = None,
    device: str | torch.device = "cpu",
    score: str = "corr",
) -> FineResult:
    """Refine ``transform`` with the dense descriptor (module doc, step 2).

    ``image`` (C, H, W) / ``valid`` (H, W): the scene in its own pixels; ``tile_px`` (M, 2)
    tile centres, scene pixels; ``tile_side_m``: a tile's side, metres; ``max_shift_m``: the
    whole scene is searched within this of the estimate; ``tile_shift_m``: each tile within
    this of the scene's aligned position. A tile counts in the refit when its peak is at
    least ``min_tile_peak``; the refit is a RANSAC similarity (inliers within
    ``tile_residual_m``, default 3 map pixels: 3 m on a 1 m map, 25 m on Sentinel-2) with
    the scale within ``scale_tol`` of ``nominal_gsd_m`` (default:
    the estimate's), else the translation-only estimate is kept. ``score``: ``corr`` (mean
    dot product: the learned descriptor's unit vectors, peaks are mean cosines) or ``zncc``
    (zero-mean normalised cross-correlation: a stride-1 descriptor such as CFOG, whose
    ``min_tile_peak`` is then on that scale).
    """
    from cmpc.localize.align import correlate, correlate_zncc, subpixel_peak

    if score not in ("corr", "zncc"):
        raise ValueError(f"score must be 'corr' or 'zncc', got {score!r}")
    corr_fn = correlate_zncc if score == "zncc" else correlate

    s = mosaic.stride
    w = float(mosaic.gsd_m)
    # window of the map grid holding the warped scene, cell-aligned
    desc, cell_valid, (rmin, cmin) = _scene_descriptors(aligner, mosaic, image, valid, transform, device)
    top0, left0 = int(rmin) // s, int(cmin) // s
    _, pk, (dr_px, dc_px) = _scene_shift(mosaic, desc, rmin, cmin, max_shift_m, zncc=score == "zncc")
    frac = (float(cell_valid.float().mean()) or 1.0) if score == "corr" else 1.0  # zncc is normalised already
    shift = (dc_px * w, -dr_px * w)
    moved = transform.shifted(*shift)
    peak = pk / frac

    # per-tile offsets: each tile's template (from the same warped window) searched around
    # the scene's aligned position
    tile_px = np.asarray(tile_px, dtype=np.float64).reshape(-1, 2)
    M = len(tile_px)
    side_c = max(2, int(round(tile_side_m / w / s)))
    R = max(1, int(math.ceil(tile_shift_m / w / s)))
    p0 = transform.apply(tile_px)  # where the warped window holds each tile centre
    rows_c = (mosaic.origin_y - p0[:, 1]) / w / s - top0  # window cell coordinates
    cols_c = (p0[:, 0] - mosaic.origin_x) / w / s - left0
    t_top = np.round(rows_c - side_c / 2.0).astype(np.int64)
    t_left = np.round(cols_c - side_c / 2.0).astype(np.int64)
    pad = torch.nn.functional.pad(desc, (side_c, side_c, side_c, side_c))
    vpad = torch.nn.functional.pad(cell_valid.float(), (side_c, side_c, side_c, side_c))
    tmpls, fracs = [], []
    for i in range(M):
        r, c = int(t_top[i]) + side_c, int(t_left[i]) + side_c
        r = min(max(r, 0), pad.shape[1] - side_c)
        c = min(max(c, 0), pad.shape[2] - side_c)
        tmpls.append(pad[:, r : r + side_c, c : c + side_c])
        fracs.append(float(vpad[r : r + side_c, c : c + side_c].mean()))
    tile_xy = p0.copy()
    tile_peak = np.zeros(M)
    if M:
        sh_r, sh_c = int(round(dr_px / s)), int(round(dc_px / s))
        tops = torch.from_numpy(top0 + t_top + sh_r - R)
        lefts = torch.from_numpy(left0 + t_left + sh_c - R)
        ctx_t = mosaic.crops(tops[:, None], lefts[:, None], side_c + 2 * R, side_c + 2 * R)  # (M, 1, C, ., .)
        sc = corr_fn(torch.stack(tmpls), ctx_t)[:, 0]  # (M, 2R+1, 2R+1)
        tpk, tu, tv = subpixel_peak(sc)
        f = np.maximum(np.array(fracs), 1e-6) if score == "corr" else np.ones(M)
        tile_peak = tpk.numpy() / f
        d_r = ((tu.numpy() - R) + sh_r) * s  # pixels, relative to the unshifted warp
        d_c = ((tv.numpy() - R) + sh_c) * s
        tile_xy = p0 + np.stack([d_c * w, -d_r * w], axis=1)
        tile_peak[np.array(fracs) < 0.5] = 0.0  # mostly outside the scene
    good = tile_peak >= min_tile_peak
    inl = np.zeros(M, dtype=bool)
    final, refit = moved, False
    g = float(nominal_gsd_m or transform.scale)
    if good.sum() >= 3:
        corr = Correspondences(
            tile_px[good], tile_xy[good], np.arange(int(good.sum())), np.zeros(int(good.sum()), dtype=np.int64),
            tile_peak[good].astype(np.float32), np.zeros(int(good.sum())),
        )
        sub = estimate_scene_transform(
            corr,
            RansacSettings(gsd_m=g, scale_tol=scale_tol, heading_deg=moved.heading_deg, heading_range_deg=5.0,
                           residual_m=tile_residual_m if tile_residual_m is not None else 3.0 * w, min_pair_m=tile_side_m * 0.4, max_trials=300, seed=0),
        )
        if sub.transform is not None and sub.inliers.sum() >= 3:
            final, refit = sub.transform, True
            inl[np.flatnonzero(good)[sub.inliers]] = True
    return FineResult(final, shift, peak, tile_px, tile_xy, tile_peak, inl, refit)


@dataclass
class PolishResult:
    """The scene's translation re-measured by a second descriptor (:func:`polish_translation`):
    ``transform`` the polished placement (the input one when ``used`` is false); ``shift_m``
    (east, north) metres moved; ``peak`` the zero-mean normalised correlation at the
    optimum, in [-1, 1]; ``why`` the reason it was not used (None when used)."""

    transform: SceneTransform
    shift_m: tuple[float, float]
    peak: float
    used: bool
    why: str | None = None


@torch.no_grad()
def polish_translation(
    descriptor,  # noqa: ANN001 - a stride-1 descriptor such as cmpc.models.cfog.CfogDescriptor
    mosaic,  # noqa: ANN001 - cmpc.localize.align.FeatureMosaic of that descriptor (the map at the work GSD)
    image: np.ndarray,
    valid: np.ndarray,
    transform: SceneTransform,
    max_shift_m: float,
    min_peak: float = 0.1,
    device: str | torch.device = "cpu",
) -> PolishResult:
    """Re-measure the translation of a placed scene with ``descriptor`` (heading and scale kept).

    The scene ``image`` (C, H, W) / ``valid`` (H, W) is warped onto the map grid by
    ``transform``, described, and its zero-mean normalised cross-correlation with the map's
    descriptors is searched over every offset within ``max_shift_m`` metres (east and
    north); the best one, refined to the sub-pixel, moves the placement. The learned dense
    descriptor finds and fits placements across the whole map; a hand-made one (CFOG: the
    layout of edges) measures where the content lies without the offsets a learned one
    absorbed from its training pairs' misregistration (docs/RESULTS.md, Scene localization).
    Not used (the input placement returned) when the optimum's correlation is under
    ``min_peak`` (nothing in the search matches the scene's layout: a chance optimum) or the
    optimum lies on the search border (the content is further off than the search reaches)."""
    w = float(mosaic.gsd_m)
    desc, _, (rmin, cmin) = _scene_descriptors(descriptor, mosaic, image, valid, transform, device)
    score, pk, (dr_px, dc_px) = _scene_shift(mosaic, desc, rmin, cmin, max_shift_m, zncc=True)
    r, c = divmod(int(score.argmax()), score.shape[1])
    best = float(score[r, c])
    if best < min_peak:
        return PolishResult(transform, (0.0, 0.0), best, False, f"the best correlation {best:.3f} is under {min_peak:g}")
    if r in (0, score.shape[0] - 1) or c in (0, score.shape[1] - 1):
        return PolishResult(transform, (0.0, 0.0), best, False, f"the optimum lies on the search border ({max_shift_m:g} m)")
    shift = (dc_px * w, -dr_px * w)
    return PolishResult(transform.shifted(*shift), shift, pk, True)
