"""``cmpc georef``: where is this SAR scene on the map?

:class:`Georeferencer` holds what a scene query needs once (the embedder, the reference
index, the refiner's dense descriptor and the map's descriptors, the decision rule) and
answers one scene at a time (:meth:`Georeferencer.locate`):

1. the scene is tiled under each heading hypothesis and all tiles are searched at once
   (:mod:`cmpc.localize.scene`);
2. methods:
   - ``independent``: the most confident tile (highest top-1 cosine) alone; the scene
     placed by that tile's known offset in the scene (north-up at its heading hypothesis,
     nominal GSD). Always claims a position (the baseline that verification must beat).
   - ``verify``: RANSAC over all candidates (:func:`cmpc.localize.verify.estimate_scene_transform`),
     the offset vote and the whole-map dense search (:mod:`cmpc.localize.dense_search`: the
     scene's dense descriptor correlated against the whole map's, per heading) propose
     placements; the dense alignment ranks them, then fine alignment and a per-tile similarity refit
     (:func:`cmpc.localize.verify.fine_align_scene`); "found" only when the decision rule
     holds (inlier tiles >= ``min_inliers`` and inlier fraction >= ``min_inlier_frac``,
     calibrated by ``cmpc train scene`` into ``runs/<name>/scene_decision.json``); with
     ``refine.scene_polish`` the decided placement is then re-measured with the CFOG
     descriptor (:func:`cmpc.localize.verify.polish_translation`; ``cfog_refit`` also refits
     heading and scale from every tile);
   - ``gnn+verify``: verify after the scene-graph GNN (``runs/<name>/scene_graph.pt``,
     :mod:`cmpc.localize.scene_graph`) reordered every tile's candidates, with its own
     calibrated rule (``methods["gnn+verify"]`` of the decision file). ``cmpc georef``
     answers with ``default_method`` of the decision file (verify when absent);
3. :func:`write_answer` writes, atomically, ``result.json``, ``footprint.geojson``,
   ``tiles.csv``, ``scene_on_map.tif`` (the SAR warped north-up onto the map grid with
   ``rasterio.warp.reproject``) and ``overlay.png``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cmpc.errors import ConfigError, DataError
from cmpc.localize.decision import ConfidenceModel
from cmpc.localize.dense_search import DensePeak, MapSpectra, peak_margin, search_map
from cmpc.localize.prior import prior_rows
from cmpc.localize.scene import (
    GSD_RATIO_RANGE,
    CandidateRescorer,
    SceneCandidates,
    SceneImage,
    SceneSettings,
    SceneTiles,
    rescored,
    scene_candidates,
    scene_grid_centres,
    tile_scene,
)
from cmpc.localize.verify import (
    RansacSettings,
    SceneTransform,
    distinct_transforms,
    estimate_scene_transform,
    fine_align_scene,
    polish_translation,
    score_transform,
    screen_placements,
    vote_placements,
)
from cmpc.utils.io import atomic_dir, atomic_write_json

DECISION_FILE = "scene_decision.json"
METHODS = ("independent", "verify", "gnn+verify")
#: the scene-graph model file in runs/<name>/ (``cmpc train scene``)
SCENE_GRAPH_FILE = "scene_graph.pt"


def _round_or_none(v: float, nd: int = 4) -> float | None:
    return round(float(v), nd) if math.isfinite(v) else None


def _rule_of(d: dict[str, Any], settings: SceneSettings) -> dict[str, Any]:
    """The decision fields of one method's record: the thresholds, and the confidence model
    when the calibration chose it (``decider``)."""
    rule: dict[str, Any] = {"min_inliers": int(d["min_inliers"]), "min_inlier_frac": float(d["min_inlier_frac"]),
                            "min_fine_peak": float(d.get("min_fine_peak", settings.min_fine_peak))}
    if d.get("decider") == "confidence":
        rule["confidence"] = ConfidenceModel.from_json(d["confidence"])
    return rule


#: relative difference between a map's reference spacing and the one a scene decision was
#: calibrated on beyond which the decision is refused (:func:`load_decision`)
STRIDE_TOLERANCE = 0.1


def calibrated_stride_m(run_dir: str | os.PathLike[str]) -> float | None:
    """The reference spacing (metres) the scene decision in ``run_dir`` was calibrated on, or
    None (no decision file, an unreadable one, or one from before the record)."""
    p = Path(run_dir) / DECISION_FILE
    try:
        v = json.loads(p.read_text(encoding="utf-8")).get("ref_stride_m") if p.is_file() else None
        return float(v) if v else None
    except (ValueError, TypeError, AttributeError, OSError):
        return None  # load_decision says what is wrong with it


def decision_lattice(
    positions_m: np.ndarray, source: np.ndarray | None, spacing_m: float, calibrated_m: float,
) -> tuple[np.ndarray, float] | None:
    """The references of a map indexed ``k`` times denser than a scene decision's calibration
    (``k`` = 2..4; e.g. a Sentinel-2 map at 32 px for patch queries, decision calibrated at
    64 px) that form the calibrated lattice: every ``k``-th column and row of each source
    map's grid, counted from its west column and north row. Scene georeferencing then
    searches only these, so its evidence is what the decision was calibrated on.

    ``positions_m``: (N, 2) reference centres (x east, y north; metres); ``source``: (N,)
    source map of each row (None = one map); ``spacing_m``: the map's reference spacing;
    ``calibrated_m``: the decision's. Returns (sorted rows, the lattice's spacing in metres),
    or None when the ratio is not an integer 2..4 within :data:`STRIDE_TOLERANCE`, when fewer
    than 90 % of a source's references sit on a regular grid, or when the lattice's measured
    spacing misses ``calibrated_m`` by more than the tolerance."""
    from cmpc.models.graph import grid_spacing_m

    if not spacing_m or not calibrated_m or spacing_m <= 0:
        return None
    k = int(round(calibrated_m / spacing_m))
    if not 2 <= k <= 4 or abs(spacing_m * k / calibrated_m - 1.0) > STRIDE_TOLERANCE:
        return None
    pos = np.asarray(positions_m, dtype=np.float64)
    src = np.zeros(len(pos), dtype=np.int64) if source is None else np.asarray(source)
    keep = np.zeros(len(pos), dtype=bool)
    for s in np.unique(src):
        rows = np.flatnonzero(src == s)
        fx = (pos[rows, 0] - pos[rows, 0].min()) / spacing_m
        fy = (pos[rows, 1].max() - pos[rows, 1]) / spacing_m
        i, j = np.rint(fx).astype(np.int64), np.rint(fy).astype(np.int64)
        on_grid = (np.abs(fx - i) < 0.25) & (np.abs(fy - j) < 0.25)
        if on_grid.mean() < 0.9:
            return None
        keep[rows[on_grid & (i % k == 0) & (j % k == 0)]] = True
    rows = np.flatnonzero(keep)
    if len(rows) < 2:
        return None
    sub = float(grid_spacing_m(pos[rows]))
    if abs(sub / calibrated_m - 1.0) > STRIDE_TOLERANCE:
        return None
    return rows, sub


def load_decision(
    run_dir: str | os.PathLike[str], settings: SceneSettings, method: str = "verify", use_top_k: bool = True,
    embedder_sha256: str | None = None, use_dense: bool = True, ref_stride_m: float | None = None,
) -> tuple[SceneSettings, dict[str, Any]]:
    """``settings`` with the calibrated decision of ``run_dir/scene_decision.json`` when
    present (else the defaults), and a record of where it came from. The decision is the
    three thresholds or, when the calibration chose it (``"decider": "confidence"``), the
    logistic confidence model (:mod:`cmpc.localize.decision`). ``method`` ``gnn+verify``
    reads the file's ``methods["gnn+verify"]`` record (the top-level one when absent).
    The candidates per tile the rule was calibrated with (``top_k``) come along unless
    ``use_top_k`` is false (the user chose ``--top-k``), and so does the tiling
    (``min_scene_tiles``, ``max_dense_tiles``; 0 for files that do not record them), and
    the whole-map dense search (``dense_search``; 0, off, for files from before it) unless
    ``use_dense`` is false (the user chose ``--dense-search``).

    A decision is calibrated on one embedder's answers: when the file records the embedder it
    was calibrated with (``embedder_sha256``) and ``embedder_sha256`` names another, it is not
    used (one line on stderr; the uncalibrated defaults, and the record says why).

    The decision's evidence (inlier counts, fractions) depends on how densely the map is
    indexed: when the file records the reference spacing it was calibrated on
    (file key ``ref_stride_m``) and the map's spacing (argument ``ref_stride_m``) differs by more than
    :data:`STRIDE_TOLERANCE`, the decision is refused (``DataError``) naming the stride to build
    the index at; files from before the record are used as they are."""
    p = Path(run_dir) / DECISION_FILE
    if p.is_file():
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
            calibrated_with = d.get("embedder_sha256")
            if embedder_sha256 and calibrated_with and calibrated_with != embedder_sha256:
                why = (f"{p} was calibrated with embedder {str(calibrated_with)[:12]}, not this one ({embedder_sha256[:12]}): "
                       f"the uncalibrated decision is used; recalibrate with `cmpc train scene`")
                print(f"warning: {why}", file=sys.stderr)
                return settings, {"source": f"default (uncalibrated): {why}", "min_inliers": settings.min_inliers,
                                  "min_inlier_frac": settings.min_inlier_frac, "min_fine_peak": settings.min_fine_peak}
            calibrated_stride = d.get("ref_stride_m")
            if ref_stride_m and calibrated_stride and abs(float(ref_stride_m) / float(calibrated_stride) - 1.0) > STRIDE_TOLERANCE:
                raise DataError(
                    f"this map's references are {float(ref_stride_m):.0f} m apart but the scene decision {p} was calibrated on a map "
                    f"with references every {float(calibrated_stride):.0f} m: index the map for scenes at that spacing or 2, 3 or 4 times finer "
                    f"(--stride-px = {float(calibrated_stride):.0f} m / the map's GSD, or that over 2-4; a model card's default fits)")
            top = d.get("top_k")  # candidates per tile the rules were calibrated with (file level)
            # the tiling the rules were calibrated with (files from before dense tiling: none)
            min_tiles = int(d.get("min_scene_tiles", 0))
            max_dense = int(d.get("max_dense_tiles", 0))
            dense = int(d.get("dense_search", 0))
            default_method = (d.get("default_method") or {}).get("method") if isinstance(d.get("default_method"), dict) else None
            if method != "verify" and isinstance(d.get("methods"), dict) and method in d["methods"]:
                d = d["methods"][method]
            rule = _rule_of(d, settings)
            rule["min_scene_tiles"] = min_tiles
            rule["max_dense_tiles"] = max_dense
            if use_dense:
                rule["dense_search"] = dense
            if use_top_k and top is not None:
                rule["top_k"] = int(top)
            shown = {k: (v.to_json() if isinstance(v, ConfidenceModel) else v) for k, v in rule.items()}
            return replace(settings, **rule), {"source": str(p), **shown, **({"default_method": default_method} if default_method else {})}
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            raise DataError(f"{p} is not a scene decision file (min_inliers, min_inlier_frac); rerun `cmpc train scene EXPERIMENT.json`") from None
    return settings, {"source": "default (uncalibrated)", "min_inliers": settings.min_inliers, "min_inlier_frac": settings.min_inlier_frac,
                      "min_fine_peak": settings.min_fine_peak}


@dataclass
class SceneAnswer:
    """One method's answer for one scene (``transform`` None only when nothing was found at
    all). ``tiles``: per-tile rows for tiles.csv; ``stats``: numbers for result.json."""

    method: str
    status: str
    reason: str | None
    transform: SceneTransform | None
    inlier_tiles: int
    n_tiles: int
    confidence: float
    seconds: float
    tiles: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def found(self) -> bool:
        return self.status == "found"


class Georeferencer:
    """Scene georeferencing against one reference map (see the module doc)."""

    def __init__(self, localizer, settings: SceneSettings, decision_source: dict[str, Any] | None = None, rescorer: CandidateRescorer | None = None,
                 gnn: CandidateRescorer | None = None, gnn_settings: SceneSettings | None = None,
                 stride_m: float | None = None, base_rows: np.ndarray | None = None) -> None:  # noqa: ANN001
        """``stride_m``: the map's reference spacing when already measured; ``base_rows``: the
        only index rows scenes are searched over (:func:`decision_lattice`; None = all)."""
        settings.check()
        #: the index rows every scene search is limited to (None = the whole index)
        self.base_rows = None if base_rows is None else np.asarray(base_rows, dtype=np.int64)
        #: the scene-graph rescorer of method ``gnn+verify`` and its decision rule (default: ``settings``)
        self.gnn = gnn
        self.gnn_settings = gnn_settings
        self.localizer = localizer
        self.settings = settings
        self.decision_source = decision_source or {"source": "given", "min_inliers": settings.min_inliers, "min_inlier_frac": settings.min_inlier_frac}
        self.rescorer = rescorer
        #: the method ``cmpc georef`` answers with by default (``cmpc train scene`` chooses it)
        self.default_method = str(self.decision_source.get("default_method") or "verify")
        if self.default_method == "gnn+verify" and gnn is None:
            self.default_method = "verify"
        index = localizer.index
        if index.bounds is None or not len(index.bounds):
            raise DataError(f"index {index.directory} has no reference footprints; scene georeferencing needs them (rebuild the index)")
        self.tile_m = float(np.median(index.bounds[:, 2] - index.bounds[:, 0]))
        from cmpc.models.graph import grid_spacing_m

        self.stride_m = float(stride_m) if stride_m else (float(grid_spacing_m(index.positions)) if index.ntotal > 1 else self.tile_m / 2.0)
        self.img_size = int(localizer.img_size or 0)
        if not self.img_size:
            raise DataError(f"index {index.directory} does not record the model input size (img_size); rebuild it")
        self.work_gsd_m = self.tile_m / self.img_size
        self.map_gsd_m = self._map_gsd()
        self._fm = None
        self._map = None
        self._spectra: MapSpectra | None = None
        #: the input conventions of a shipped model (``cmpc georef --model``): scenes are checked against them
        self.conventions = None
        self._dense_scene: SceneImage | None = None  # the scene the cached peaks are of (held, so never another one at its address)
        self._dense_key: tuple[Any, ...] | None = None
        self._dense: list[DensePeak] = []
        #: ``refine.scene_polish``: its mode (none, cfog, cfog_refit), a refiner holding the
        #: second (CFOG) descriptor that re-measures each placed scene, its search radius
        #: (metres) and the correlation it needs
        self.polish_mode = "none"
        self.polisher = None
        self.polish_m = 50.0
        self.polish_min_peak = 0.1

    def _map_gsd(self) -> float:
        """Metres per pixel of the reference images (the map's own GSD)."""
        m = self.localizer.index.manifest
        for key in ("gsd_m", "gsd"):
            if m.get(key):
                return float(m[key])
        patch_px = m.get("patch_px")
        return self.tile_m / float(patch_px) if patch_px else self.work_gsd_m

    # ------------------------------------------------------------------ map side

    @property
    def aligner(self):  # noqa: ANN201
        ref = self.localizer.refiner
        return getattr(ref, "aligner", None) if ref is not None else None

    def feature_mosaic(self):  # noqa: ANN201 - FeatureMosaic
        """The map's optical descriptors at the working GSD (the refiner's cache)."""
        if self._fm is None:
            self._fm = self.localizer.refiner.feature_mosaic(self.localizer.index, self.work_gsd_m)
        return self._fm

    def map_image(self):  # noqa: ANN201 - ImageMosaic
        """The optical map (stitched references), for the overlay picture."""
        if self._map is None:
            from cmpc.localize.mosaic import mosaic_from_index

            self._map = mosaic_from_index(self.localizer.index)
        return self._map

    # ------------------------------------------------------------------ query side

    def allowed_rows(self, scene: SceneImage, center: list[float] | None, radius_m: float | None) -> tuple[np.ndarray | None, dict[str, Any] | None]:
        """Rows within the prior: ``center``/``radius_m`` when given, else the scene's own
        georeferenced centre with ``own_prior_radius_m`` (a prior, never the answer)."""
        if center is None and scene.georef and scene.georef.get("centre_xy") is not None and self.settings.own_prior_radius_m > 0:
            center, radius_m = scene.georef["centre_xy"], self.settings.own_prior_radius_m
        if center is None and radius_m is None:
            return self.base_rows, None
        cfg = replace(self.localizer_cfg(), prior=None, prior_center=[float(v) for v in center] if center is not None else None, prior_radius_m=radius_m)
        rows = prior_rows(cfg, self.localizer.index)
        if self.base_rows is not None:
            rows = self.base_rows if rows is None else np.intersect1d(rows, self.base_rows)
        return rows, {"center": cfg.prior_center, "radius_m": radius_m}

    def localizer_cfg(self):  # noqa: ANN201 - LocalizeConfig
        from cmpc.config import LocalizeConfig

        return LocalizeConfig()

    def check_gsd(self, scene: SceneImage) -> None:
        """One-line :class:`DataError` when the scene's GSD is far from the map's."""
        ratio = scene.gsd_m / self.map_gsd_m
        lo, hi = GSD_RATIO_RANGE
        if not (lo <= ratio <= hi):
            raise DataError(
                f"the scene's GSD {scene.gsd_m:g} m/px is {ratio:.2g}x the map's {self.map_gsd_m:g} m/px; "
                f"scenes between {lo:g}x and {hi:g}x the map's GSD are handled (check --gsd)"
            )

    def tiles(self, scene: SceneImage) -> SceneTiles:
        st = self.settings.tile_stride_m(scene.width * scene.gsd_m, scene.height * scene.gsd_m, self.tile_m, self.stride_m)
        return tile_scene(scene, self.tile_m, st, self.work_gsd_m, self.img_size, self.settings.headings(), self.settings.min_tile_valid)

    def locate(
        self,
        scene: SceneImage,
        center: list[float] | None = None,
        radius_m: float | None = None,
        methods: tuple[str, ...] = ("verify",),
    ) -> dict[str, SceneAnswer]:
        """Answers of ``methods`` (see the module doc) for ``scene``; both share one tiling
        and one search."""
        for m in methods:
            if m not in METHODS:
                raise ValueError(f"unknown method {m!r}; known: {METHODS}")
        self.check_gsd(scene)
        t0 = time.perf_counter()
        allowed, prior = self.allowed_rows(scene, center, radius_m)
        tiles = self.tiles(scene)
        cand = scene_candidates(self.localizer, tiles, self.settings.top_k, allowed, self.rescorer, self.settings.batch_size)
        t_common = time.perf_counter() - t0
        out: dict[str, SceneAnswer] = {}
        if "gnn+verify" in methods and self.gnn is None:
            if getattr(self, "gnn_error", None):
                raise DataError(f"method gnn+verify: {self.gnn_error}")
            raise DataError("method gnn+verify needs the scene-graph model (runs/<name>/scene_graph.pt); train it with `cmpc train scene EXPERIMENT.json`")
        for m in methods:
            t1 = time.perf_counter()
            if m == "independent":
                ans = self._independent(scene, tiles, cand)
            elif m == "verify":
                ans = self._verify(scene, tiles, cand, prior=prior)
            else:  # the GNN reorders every tile's candidates; RANSAC's rank stages follow its order
                ans = self._verify(scene, tiles, rescored(self.localizer, tiles, cand, self.gnn), self.gnn_settings or self.settings, m, prior=prior)
            ans.seconds = t_common + time.perf_counter() - t1
            ans.stats.update({"prior": prior, "timings_s": {**{k: round(v, 3) for k, v in cand.timings.items()}, "total": round(ans.seconds, 3)}})
            out[m] = ans
        return out

    def _tile_rows(self, tiles: SceneTiles, cand: SceneCandidates, inlier_tiles: set[int] | None, transform: SceneTransform | None) -> list[dict[str, Any]]:
        rows = []
        for t in range(len(tiles)):
            pred = transform.apply(tiles.centre_px[t][None])[0] if transform is not None else (np.nan, np.nan)
            rows.append(
                {
                    "tile": t,
                    "heading_hyp_deg": float(tiles.heading_deg[t]),
                    "grid_row": int(tiles.grid_rc[t, 0]),
                    "grid_col": int(tiles.grid_rc[t, 1]),
                    "col_px": round(float(tiles.centre_px[t, 0]), 2),
                    "row_px": round(float(tiles.centre_px[t, 1]), 2),
                    "x_m": round(float(pred[0]), 2),
                    "y_m": round(float(pred[1]), 2),
                    "top1_x_m": round(float(cand.positions_m[t, 0, 0]), 2),
                    "top1_y_m": round(float(cand.positions_m[t, 0, 1]), 2),
                    "top1_score": round(float(cand.scores[t, 0]), 4),
                    "inlier": bool(inlier_tiles is not None and t in inlier_tiles),
                }
            )
        return rows

    def _polish(self, scene: SceneImage, transform: SceneTransform, centres: np.ndarray) -> tuple[SceneTransform, dict[str, Any]]:
        """``refine.scene_polish``: the placement's translation re-measured by the second
        descriptor (:func:`~cmpc.localize.verify.polish_translation`), after the decision;
        with ``cfog_refit`` also each tile (``centres``, scene pixels) and a similarity refit."""
        t0 = time.perf_counter()
        fm = self.polisher.feature_mosaic(self.localizer.index, self.work_gsd_m)
        pr = polish_translation(self.polisher.aligner, fm, scene.image, scene.valid, transform, self.polish_m, self.polish_min_peak,
                                device=self.localizer.device)
        rec: dict[str, Any] = {"descriptor": "cfog", "used": pr.used, "shift_m": [round(v, 2) for v in pr.shift_m], "peak": round(pr.peak, 4),
                               "radius_m": self.polish_m, "min_peak": self.polish_min_peak}
        if pr.why:
            rec["why"] = pr.why
        out = pr.transform
        if self.polish_mode == "cfog_refit" and pr.used:
            # each tile's own offset, searched around the polished placement, then a bounded
            # similarity fit: the learned descriptor's 4-pixel cells leave heading and scale
            # loose; CFOG describes every pixel
            s = self.settings
            fr = fine_align_scene(self.polisher.aligner, fm, scene.image, scene.valid, pr.transform, centres, self.tile_m,
                                  max_shift_m=2.0 * self.work_gsd_m,
                                  tile_shift_m=self.polish_m, min_tile_peak=self.polish_min_peak, scale_tol=s.scale_tol,
                                  nominal_gsd_m=scene.gsd_m, device=self.localizer.device, score="zncc")
            rec["refit"] = {"used": fr.refit, "tiles_aligned": int(fr.tile_inlier.sum()), "tiles": int(len(fr.tile_px))}
            if fr.refit:
                out = fr.transform
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        return out, rec

    def _independent(self, scene: SceneImage, tiles: SceneTiles, cand: SceneCandidates) -> SceneAnswer:
        t = int(np.argmax(cand.scores[:, 0]))
        tf = SceneTransform.from_params(scene.gsd_m, float(tiles.heading_deg[t]), 0.0, 0.0)
        off = cand.positions_m[t, 0] - tf.apply(tiles.centre_px[t][None])[0]
        tf = tf.shifted(float(off[0]), float(off[1]))
        n = len(tiles.per_heading.get(float(tiles.heading_deg[t]), []))
        return SceneAnswer(
            "independent", "found", None, tf, 1, n, float(cand.scores[t, 0]), 0.0,
            self._tile_rows(tiles, cand, {t}, tf), {"best_tile": t, "top1_score": float(cand.scores[t, 0])},
        )

    def dense_peaks(self, scene: SceneImage, prior: dict[str, Any] | None, s: SceneSettings | None = None) -> list[DensePeak]:
        """The scene's best placements by whole-map dense correlation (``dense_search`` of
        them; :mod:`cmpc.localize.dense_search`), within the prior disc when there is one;
        cached per scene (verify and gnn+verify share it)."""
        s = s or self.settings
        key = (s.dense_search, tuple(s.headings()), repr(prior))
        if self._dense_scene is not scene or self._dense_key != key:
            if self._spectra is None:
                self._spectra = MapSpectra(self.feature_mosaic())
            disc = None
            if prior and prior.get("center") is not None and prior.get("radius_m"):
                disc = (float(prior["center"][0]), float(prior["center"][1]), float(prior["radius_m"]))
            peaks = search_map(self.aligner, self._spectra, scene.image, scene.valid, scene.gsd_m, s.headings(), top_n=s.dense_search,
                               min_sep_m=self.stride_m, prior=disc, device=self.localizer.device)
            self._dense_scene, self._dense_key, self._dense = scene, key, peaks
        return self._dense

    def _verify(self, scene: SceneImage, tiles: SceneTiles, cand: SceneCandidates, s: SceneSettings | None = None, method: str = "verify",
                prior: dict[str, Any] | None = None) -> SceneAnswer:
        s = s or self.settings
        residual = s.residual_frac * self.stride_m
        slack = s.rotation_step_deg / 2.0 + 1.0 if s.rotation_range_deg > 0 else 3.0
        rs = RansacSettings(
            gsd_m=scene.gsd_m, scale_tol=s.scale_tol, heading_deg=0.0, heading_range_deg=min(180.0, s.rotation_range_deg + slack),
            residual_m=residual, min_pair_m=0.9 * self.stride_m, max_trials=s.max_trials, seed=s.seed,
        )
        t0 = time.perf_counter()
        res = estimate_scene_transform(cand.corr, rs, tiles.per_heading)
        t_ransac = time.perf_counter() - t0
        stats: dict[str, Any] = {"ransac_trials": res.trials, "ransac_s": round(t_ransac, 3), "support": round(res.support, 3),
                                 "tile_spacing_m": round(tiles.stride_m, 3)}
        can_fine = s.fine and self.aligner is not None and getattr(self.localizer.refiner, "feature_mosaic", None) is not None
        if res.transform is None and not can_fine:
            best = self._independent(scene, tiles, cand)
            return SceneAnswer(
                method, "not_found", "no two tiles agree on a placement within the scale/heading bounds (best guess: the most confident tile alone)",
                best.transform, 0, len(tiles.per_heading.get(0.0, tiles.per_heading[next(iter(tiles.per_heading))])), 0.0, 0.0,
                best.tiles, stats,
            )
        transform = res.transform
        fine_stats: dict[str, Any] = {"used": False}
        if not can_fine:
            fine_stats["why"] = (
                "no dense alignment (no refiner loaded, or fine alignment off): the placement is RANSAC's fit of reference "
                f"centres, expect errors up to about half a reference stride ({self.stride_m / 2:.0f} m)"
            )
        if can_fine:
            # look-alike places can gather several agreeing tiles; the dense alignment tells
            # them apart: every RANSAC stage's placement and the few most confident tiles
            # alone are aligned, the highest correlation wins
            t0 = time.perf_counter()
            order = np.argsort(-cand.scores[:, 0], kind="stable")[: s.tile_hypotheses]
            alone = []
            for t in order:
                tf = SceneTransform.from_params(scene.gsd_m, float(tiles.heading_deg[t]), 0.0, 0.0)
                off = cand.positions_m[t, 0] - tf.apply(tiles.centre_px[t][None])[0]
                alone.append(tf.shifted(float(off[0]), float(off[1])))
            voted = [t for _, _, t in vote_placements(cand.corr, scene.gsd_m, self.stride_m, top_n=s.vote_placements)] if s.vote_placements else []
            t_dense = time.perf_counter()
            dense = self.dense_peaks(scene, prior, s) if s.dense_search else []
            t_dense = time.perf_counter() - t_dense
            probe = (scene.width / 2.0, scene.height / 2.0)
            hyps = distinct_transforms([*res.hypotheses, *voted, *alone, *(p.transform for p in dense)], 0.5 * residual, probe=probe)
            n_hyps = len(hyps)
            if s.fine_top and len(hyps) > s.fine_top:
                # rank every placement by one cheap dense correlation, refine the best few exactly
                peaks = screen_placements(self.aligner, self.feature_mosaic(), scene.image, scene.valid, hyps, residual, device=self.localizer.device)
                hyps = [hyps[i] for i in np.argsort(-peaks, kind="stable")[: s.fine_top]]
            centres = scene_grid_centres(scene, self.tile_m, self.stride_m)
            best_fr = None
            for h in hyps:
                fr = fine_align_scene(
                    self.aligner, self.feature_mosaic(), scene.image, scene.valid, h, centres, self.tile_m, max_shift_m=residual,
                    tile_shift_m=s.tile_shift_frac * self.stride_m, scale_tol=s.scale_tol, nominal_gsd_m=scene.gsd_m,
                    device=self.localizer.device,
                )
                if best_fr is None or fr.peak > best_fr.peak:
                    best_fr = fr
            assert best_fr is not None
            transform = best_fr.transform
            res = score_transform(cand.corr, transform, rs, tiles.per_heading)
            fine_stats = {
                "used": True, "seconds": round(time.perf_counter() - t0, 3), "hypotheses": n_hyps, "voted": len(voted), "refined": len(hyps), "shift_m": [round(v, 2) for v in best_fr.shift_m],
                "dense": {"peaks": len(dense), "seconds": round(t_dense, 3), "best": round(dense[0].peak, 4) if dense else None,
                          "margin": _round_or_none(peak_margin(transform, best_fr.peak, dense, 2.0 * self.stride_m, probe)) if dense else None},
                "peak": round(best_fr.peak, 4), "tiles_aligned": int(best_fr.tile_inlier.sum()), "tiles": int(len(best_fr.tile_px)), "refit": best_fr.refit,
            }
        stats["fine"] = fine_stats
        margin = (fine_stats.get("dense") or {}).get("margin")
        ok, reason, confidence = decide(s, res.inlier_tiles, res.n_tiles, fine_stats["peak"] if fine_stats["used"] else None, margin)
        if self.polisher is not None and fine_stats["used"]:
            transform, stats["polish"] = self._polish(scene, transform, centres)
        heading_tiles = {int(t) for t in res.tile_ids}
        return SceneAnswer(
            method, "found" if ok else "not_found", reason, transform, res.inlier_tiles, res.n_tiles,
            confidence, 0.0,
            self._tile_rows(tiles, cand, heading_tiles, transform), stats,
        )


def describe_decision(src: dict[str, Any]) -> str:
    """One readable line for a decision record of :func:`load_decision` (reports)."""
    where = src.get("source", "given")
    c = src.get("confidence")
    if isinstance(c, dict):
        feats = ", ".join(c.get("features", []))
        return f"calibrated confidence P(within {c.get('good_m', 25):g} m) >= {c['threshold']:.3f} (logistic on {feats}; {where})"
    return (f"found when >= {src.get('min_inliers')} tiles agree, >= {float(src.get('min_inlier_frac', 0)):.0%} of them, "
            f"dense peak >= {src.get('min_fine_peak')} ({where})")


def decide(s: SceneSettings, inliers: int, tiles: int, peak: float | None, margin: float | None = None) -> tuple[bool, str | None, float]:
    """(found, reason when not, confidence) of one verified placement: the calibrated
    confidence model when ``s`` has one (and the evidence it needs: the fine peak),
    else the three thresholds. ``margin``: the whole-map dense search's peak margin (None:
    no search). Confidence: the model's P(centre within its good_m); for the
    thresholds the inlier fraction scaled down by a peak below the threshold (a score, not a
    probability)."""
    frac = inliers / tiles if tiles else 0.0
    m = s.confidence
    if m is not None and (peak is not None or not m.needs_peak):
        p = float(m.probability(inliers, tiles, peak, float(s.rotation_range_deg > 0), float("nan") if margin is None else margin)[0])
        if inliers >= m.min_inliers and p >= m.threshold:
            return True, None, round(p, 4)
        if inliers < m.min_inliers:
            return False, f"weak evidence: {inliers} of {tiles} tiles agree (at least {m.min_inliers} needed)", round(p, 4)
        why = (f"weak evidence: calibrated confidence {p:.3f} < {m.threshold:.3f} ({inliers} of {tiles} tiles agree"
               + (f", alignment peak {peak:.3f}" if peak is not None else "")
               + (f", dense search margin {margin:.3f}" if m.uses_margin and margin is not None and math.isfinite(margin) else "") + ")")
        return False, why, round(p, 4)
    conf = round(frac * min(1.0, max(0.0, peak) / max(s.min_fine_peak, 1e-6)) if peak is not None else frac, 4)
    if not (inliers >= s.min_inliers and frac >= s.min_inlier_frac):
        return False, (f"weak evidence: {inliers} of {tiles} tiles agree (the rule needs >= {s.min_inliers} "
                       f"and >= {s.min_inlier_frac:.0%})"), conf
    if peak is not None and peak < s.min_fine_peak:
        return False, f"weak evidence: the dense alignment does not confirm the placement (peak {peak:.3f} < {s.min_fine_peak:.3f})", conf
    return True, None, conf


# --------------------------------------------------------------------------- outputs


def answer_record(ans: SceneAnswer, scene: SceneImage, crs: str | None, decision: dict[str, Any]) -> dict[str, Any]:
    """The result.json content of one answer."""
    rec: dict[str, Any] = {
        "scene": str(scene.path),
        "method": ans.method,
        "status": ans.status,
        "reason": ans.reason,
        "crs": crs,
        "scene_size_px": [scene.width, scene.height],
        "scene_gsd_m": scene.gsd_m,
        "inliers": ans.inlier_tiles,
        "tiles": ans.n_tiles,
        "confidence": ans.confidence,
        "decision_rule": decision,
        "seconds": round(ans.seconds, 3),
        **ans.stats,
    }
    if ans.transform is not None:
        t = ans.transform
        c = t.centre(scene.width, scene.height)
        rec.update(
            {
                "transform": [float(v) for v in t.affine],
                "transform_doc": "scene pixel (col, row) -> map (x, y): x = a col + b row + c, y = d col + e row + f (rasterio order a, b, c, d, e, f)",
                "center_x": float(c[0]),
                "center_y": float(c[1]),
                "heading_deg": round(t.heading_deg, 3),
                "scale": round(t.scale, 5),
                "corners_xy": [[float(x), float(y)] for x, y in t.corners(scene.width, scene.height)],
            }
        )
    if scene.georef is not None:
        rec["own_georeferencing"] = {k: v for k, v in scene.georef.items()}
    return rec


def write_answer(
    out: str | os.PathLike[str],
    ans: SceneAnswer,
    scene: SceneImage,
    geo: Georeferencer,
    truth: SceneTransform | None = None,
    picture: bool = True,
) -> Path:
    """Write one answer into ``out`` atomically (see the module doc); returns ``out``."""
    crs = geo.localizer.index.crs
    rec = answer_record(ans, scene, crs, geo.decision_source)
    with atomic_dir(out) as tmp:
        atomic_write_json(tmp / "result.json", rec)
        if ans.tiles:
            with open(tmp / "tiles.csv", "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=list(ans.tiles[0]))
                w.writeheader()
                w.writerows(ans.tiles)
        if ans.transform is not None:
            _write_footprint(tmp / "footprint.geojson", ans, scene, crs)
            _write_warped(tmp / "scene_on_map.tif", ans.transform, scene, geo.map_gsd_m, crs)
            if picture:
                write_overlay(tmp / "overlay.png", geo, scene, ans.transform, truth, title=f"{scene.path.name}: {ans.status} ({ans.method})")
    return Path(out)


def _write_footprint(path: Path, ans: SceneAnswer, scene: SceneImage, crs: str | None) -> None:
    ring = [[float(x), float(y)] for x, y in ans.transform.corners(scene.width, scene.height)]  # type: ignore[union-attr]
    ring.append(ring[0])
    fc = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "properties": {"scene": scene.path.name, "status": ans.status, "method": ans.method, "inliers": ans.inlier_tiles, "tiles": ans.n_tiles},
                "geometry": {"type": "Polygon", "coordinates": [ring]},
            }
        ],
    }
    if crs:
        fc["crs"] = {"type": "name", "properties": {"name": crs}}
    path.write_text(json.dumps(fc, indent=1), encoding="utf-8")


def _write_warped(path: Path, transform: SceneTransform, scene: SceneImage, gsd_m: float, crs: str | None) -> None:
    """The scene warped north-up onto the map's CRS and pixel size (a GeoTIFF that opens on
    top of the map in QGIS): ``rasterio.warp.reproject`` with the estimate as the source
    transform; NaN outside the scene."""
    import rasterio
    from affine import Affine
    from rasterio.enums import Resampling
    from rasterio.warp import reproject

    corners = transform.corners(scene.width, scene.height)
    x0 = math.floor(corners[:, 0].min() / gsd_m) * gsd_m
    y1 = math.ceil(corners[:, 1].max() / gsd_m) * gsd_m
    W = int(math.ceil((corners[:, 0].max() - x0) / gsd_m))
    H = int(math.ceil((y1 - corners[:, 1].min()) / gsd_m))
    dst_t = Affine(gsd_m, 0.0, x0, 0.0, -gsd_m, y1)
    src = np.where(scene.valid[None], scene.image, np.nan).astype(np.float32)
    dst = np.full((src.shape[0], H, W), np.nan, dtype=np.float32)
    work_crs = crs or "EPSG:32631"  # without a map CRS the warp is a plain affine resampling
    reproject(
        source=src, destination=dst, src_transform=transform.to_rasterio(), src_crs=work_crs, dst_transform=dst_t,
        dst_crs=work_crs, resampling=Resampling.bilinear, src_nodata=np.nan, dst_nodata=np.nan,
    )
    profile = {"driver": "GTiff", "width": W, "height": H, "count": src.shape[0], "dtype": "float32", "transform": dst_t, "nodata": np.nan, "compress": "deflate"}
    if crs:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as f:
        f.write(dst)


def write_overlay(
    path: Path,
    geo: Georeferencer,
    scene: SceneImage,
    transform: SceneTransform,
    truth: SceneTransform | None = None,
    title: str = "",
    ax=None,  # noqa: ANN001 - a matplotlib Axes to draw into instead of a file
) -> None:
    """The SAR scene over the optical map at the found position (footprint in red; the true
    footprint, when known, in green)."""
    from matplotlib.figure import Figure

    from cmpc.localize.verify import warp_to_grid

    mp = geo.map_image()
    corners = transform.corners(scene.width, scene.height)
    pts = corners if truth is None else np.vstack([corners, truth.corners(scene.width, scene.height)])
    pad = 0.25 * float(max(np.ptp(pts[:, 0]), np.ptp(pts[:, 1]), geo.tile_m))
    g = mp.gsd_m
    c0 = int(math.floor((pts[:, 0].min() - pad - mp.origin_x) / g))
    c1 = int(math.ceil((pts[:, 0].max() + pad - mp.origin_x) / g))
    r0 = int(math.floor((mp.origin_y - pts[:, 1].max() - pad) / g))
    r1 = int(math.ceil((mp.origin_y - pts[:, 1].min() + pad) / g))
    H, W = r1 - r0, c1 - c0
    if H <= 0 or W <= 0 or H * W > 4e7:
        return
    opt = np.zeros((H, W, 3), dtype=np.float32)
    rr0, cc0 = max(r0, 0), max(c0, 0)
    rr1, cc1 = min(r1, mp.image.shape[1]), min(c1, mp.image.shape[2])
    if rr1 > rr0 and cc1 > cc0:
        crop = mp.image[:, rr0:rr1, cc0:cc1]
        rgb = crop[:3] if crop.shape[0] >= 3 else np.repeat(crop[:1], 3, axis=0)
        lo, hi = np.percentile(rgb, [2, 98]) if rgb.size else (0.0, 1.0)
        opt[rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0] = np.clip((np.moveaxis(rgb, 0, -1) - lo) / max(hi - lo, 1e-6), 0, 1)
    sar, valid = warp_to_grid(scene.image[:1], scene.valid, transform, mp.origin_x, mp.origin_y, g, r0, c0, H, W)
    v = sar[0][valid]
    s = np.zeros((H, W), np.float32)
    if v.size:
        lo, hi = np.percentile(v, [2, 98])
        s = np.clip((sar[0] - lo) / max(hi - lo, 1e-6), 0, 1)
    alpha = 0.65 * valid[..., None]
    img = (1 - alpha) * opt + alpha * s[..., None]
    own = ax is None
    if own:
        fig = Figure(figsize=(6, 6 * H / max(W, 1)), dpi=110)
        ax = fig.add_subplot(1, 1, 1)
    extent = (mp.origin_x + c0 * g, mp.origin_x + c1 * g, mp.origin_y - r1 * g, mp.origin_y - r0 * g)
    ax.imshow(img, extent=extent, interpolation="nearest")
    ring = np.vstack([corners, corners[:1]])
    ax.plot(ring[:, 0], ring[:, 1], "-", color="red", lw=1.5, label="found")
    if truth is not None:
        tr = truth.corners(scene.width, scene.height)
        tr = np.vstack([tr, tr[:1]])
        ax.plot(tr[:, 0], tr[:, 1], "--", color="lime", lw=1.5, label="true")
    ax.set_title(title, fontsize=8)
    ax.ticklabel_format(useOffset=False, style="plain")  # map metres as they are
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=6, loc="lower right")
    if own:
        fig.tight_layout()
        fig.savefig(path)


def georeferencer_from_experiment(
    exp,  # noqa: ANN001 - cmpc.config.Experiment
    settings: SceneSettings | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    index_dir: str | os.PathLike[str] | None = None,
    rescorer: CandidateRescorer | None = None,
    refiner_path: str | os.PathLike[str] | None = None,
    use_refiner: bool = True,
    scene_dir: str | os.PathLike[str] | None = None,
    use_scene_top_k: bool = True,
    use_scene_dense: bool = True,
    use_scene_graph: bool = True,
) -> Georeferencer:
    """A :class:`Georeferencer` on the experiment's embedder, index (default the serving
    one, or ``index_dir``) and refiner, with the calibrated decision rule and scene-graph
    GNN of ``scene_dir`` (default ``runs/<name>``: ``scene_decision.json``,
    ``scene_graph.pt``) when present (the GNN only with ``use_scene_graph``: a model card's
    folder lends its GNN only when the card lists it, hash-checked)."""
    from cmpc.localize.localizer import Localizer

    if exp.refine.enabled and exp.refine.aligner == "cfog":
        raise ConfigError("refine.aligner=cfog is for patch queries (cmpc localize / test); scene georeferencing searches, screens and fits with the learned dense descriptor its decision was calibrated with: set refine.aligner=learned")
    settings = settings or SceneSettings()
    settings.check()
    base = settings
    scene_dir = Path(scene_dir) if scene_dir is not None else Path(exp.run_dir)
    loc = Localizer.from_experiment(exp, checkpoint=checkpoint, index_dir=index_dir, refiner_path=refiner_path, use_refiner=use_refiner)
    from cmpc.models.graph import grid_spacing_m

    stride_m = float(grid_spacing_m(loc.index.positions)) if loc.index.ntotal > 1 else None
    # a map indexed densely for patch queries (e.g. the Sentinel card's maps at 32 px) is
    # searched, for scenes, on the lattice the decision was calibrated on
    base_rows, lattice = None, None
    cal = calibrated_stride_m(scene_dir)
    if stride_m and cal and abs(stride_m / cal - 1.0) > STRIDE_TOLERANCE:
        found = decision_lattice(loc.index.positions, loc.index.source, stride_m, cal)
        if found is not None:
            base_rows, sub = found
            lattice = {"map_spacing_m": round(stride_m, 2), "spacing_m": round(sub, 2), "references": int(len(base_rows)),
                       "of": int(loc.index.ntotal)}
            stride_m = sub
    settings, source = load_decision(scene_dir, settings, use_top_k=use_scene_top_k, embedder_sha256=loc.checkpoint_sha256, use_dense=use_scene_dense,
                                     ref_stride_m=stride_m)
    gnn, gnn_settings, gnn_error = None, None, None
    gpath = scene_dir / SCENE_GRAPH_FILE
    if use_scene_graph and gpath.is_file():
        from cmpc.localize.scene_graph import SceneGraphRescorer
        from cmpc.models.checkpoint import default_checkpoint

        from cmpc.errors import CheckpointError

        try:
            gnn = SceneGraphRescorer.load(gpath, default_checkpoint(exp.run_dir, checkpoint))
        except CheckpointError as e:  # e.g. trained with another embedder: verify still works, gnn+verify says why not
            gnn_error = str(e)
        gnn_settings, gsrc = load_decision(scene_dir, base, method="gnn+verify", use_top_k=use_scene_top_k, embedder_sha256=loc.checkpoint_sha256,
                                           use_dense=use_scene_dense, ref_stride_m=stride_m)
        source = {**source, "gnn+verify": gsrc}
    if lattice is not None:
        source = {**source, "lattice": lattice}
    geo = Georeferencer(loc, settings, source, rescorer, gnn=gnn, gnn_settings=gnn_settings, stride_m=stride_m, base_rows=base_rows)
    geo.gnn_error = gnn_error
    if exp.refine.scene_polish != "none":
        from cmpc.localize.refine import cfog_refiner

        geo.polish_mode = exp.refine.scene_polish
        geo.polisher = cfog_refiner(replace(exp.refine, aligner="cfog", gate="config", align_min_peak=None), device=loc.device)
        geo.polish_m = float(exp.refine.scene_polish_m)
        geo.polish_min_peak = float(exp.refine.scene_polish_min_peak)
    return geo
