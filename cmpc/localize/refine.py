"""Query-time refinement: top-k coarse candidates -> reranked candidates + metre-level position.

:class:`GraphRefiner` is what :class:`~cmpc.localize.localizer.Localizer` calls (its
``refine`` contract). For a batch of queries it

1. builds the candidate graphs of the first ``k`` candidates (:mod:`cmpc.models.graph`),
2. runs the GNN (:mod:`cmpc.models.refiner`): new order of those ``k`` and a regressed
   position (candidates beyond ``k`` keep their coarse order after them),
3. fine alignment (:mod:`cmpc.localize.align`, network :mod:`cmpc.models.descriptor`):
   correlates the query's dense SAR descriptors against the cached optical descriptors of
   the map around the best ``fine_top`` candidates; the strongest peak gives the position
   (falling back to the GNN position, or the coarse one, when no peak reaches
   ``align_min_peak``: :func:`gated_settings`), and the candidate nearest to that position
   is moved to the front (when reranking).

Fewer than ``k`` candidates (a small map or a tight prior): the missing graph nodes are
masked out (padding), so the refiner works with any number >= 1. Non-finite embeddings are a
one-line :class:`~cmpc.errors.DataError`; a refiner trained for another ``k`` or embedding
size is a :class:`~cmpc.errors.CheckpointError` / :class:`~cmpc.errors.IndexMismatchError`,
and so is one trained on another embedder: a refiner checkpoint records the SHA-256 of the
embedder checkpoint it was trained on (``inputs.embedder``, :mod:`cmpc.utils.provenance`),
and :func:`refiner_from_checkpoint` compares it with the embedder in use before anything runs.

The optical descriptors of a map are computed once per index (at the queries' pixel size)
and cached in ``index/<name>/align_features_<gsd>m.pt`` (keyed by the aligner weights, the
gsd and the index manifest), so a query only pays for its own descriptors and a few FFT
correlations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmpc.config import RefineConfig
from cmpc.errors import CheckpointError, ConfigError, DataError, IndexMismatchError
from cmpc.localize.align import FeatureMosaic, LazyFeatureMosaic, align_to_mosaic, build_feature_mosaic
from cmpc.localize.mosaic import mosaic_from_index, resample
from cmpc.models.cfog import CfogDescriptor
from cmpc.models.checkpoint import load_checkpoint, save_checkpoint
from cmpc.models.descriptor import STRIDE, DenseDescriptor
from cmpc.models.graph import build_graphs, grid_spacing_m
from cmpc.models.refiner import SceneGraphRefiner
from cmpc.utils import provenance
from cmpc.utils.io import atomic_path

REFINER_FILE = "refiner.pt"


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state_dict's tensors (names, shapes, bytes): the identity of weights."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


class GraphRefiner:
    """GNN reranking + position regression + dense fine alignment (see the module doc).

    Args:
        gnn: the trained :class:`SceneGraphRefiner`, or None (coarse order and top-1 centre).
        aligner: the trained :class:`DenseDescriptor` (or a :class:`CfogDescriptor`: the same
            contract, nothing trained), or None (no fine alignment).
        cfg: the refine section in use (k, kNN sizes, switches, fine_top, fine_max_shift_px).
        k: candidates per graph the GNN was trained with.
        embed_dim: D of the embeddings the GNN was trained on.
        align_min_peak: alignment peaks below this are ignored (GNN position kept).
    """

    def __init__(
        self,
        gnn: SceneGraphRefiner | None,
        aligner: DenseDescriptor | None,
        cfg: RefineConfig,
        k: int,
        embed_dim: int,
        align_min_peak: float = 0.0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.gnn = gnn.eval().to(device) if gnn is not None else None
        self.aligner = aligner.eval().to(device) if aligner is not None else None
        self.cfg = cfg
        self.k = int(k)
        self.embed_dim = int(embed_dim)
        self.align_min_peak = float(align_min_peak)
        self.device = torch.device(device)
        self._spacing: dict[str, float] = {}
        self._mosaics: dict[str, FeatureMosaic] = {}
        self._footprint: dict[str, float] = {}
        self._aligner_hash = state_hash(aligner.state_dict()) if aligner is not None else ""
        #: accumulated seconds per step and number of queries (for benchmarks)
        self.timings: dict[str, float] = defaultdict(float)
        #: (B,) best alignment peak of each query of the last batch (None without alignment)
        self.last_peaks: np.ndarray | None = None
        #: {"path", "sha256"} of the checkpoint it was loaded from (None when built in memory)
        self.source: dict[str, str] | None = None
        #: the checkpoint's ``inputs`` record (embedder, index, ...; see cmpc.utils.provenance)
        self.inputs: dict[str, Any] = {}

    # ------------------------------------------------------------------ map-level caches

    def spacing_m(self, index: Any) -> float:
        """Reference spacing of ``index`` (median nearest-neighbour distance, metres)."""
        key = str(getattr(index, "directory", id(index)))
        if key not in self._spacing:
            self._spacing[key] = grid_spacing_m(index.positions)
        return self._spacing[key]

    def footprint_m(self, index: Any) -> float:
        """Side of a reference footprint of ``index``, metres (queries share it in the CMPC protocol)."""
        key = str(getattr(index, "directory", id(index)))
        if key not in self._footprint:
            bounds = getattr(index, "bounds", None)
            if bounds is None or not len(bounds):
                raise DataError(f"index {key} has no reference footprints; fine alignment needs them (set refine.fine_align=false)")
            self._footprint[key] = float(np.median(bounds[:, 2] - bounds[:, 0]))
        return self._footprint[key]

    def feature_mosaic(self, index: Any, gsd_m: float | None = None, progress: bool = False) -> FeatureMosaic:
        """Optical descriptors of the map of ``index`` at ``gsd_m`` metres per pixel (None =
        the references' own): from memory, the index folder's cache, or computed from the
        reference images (then cached there when the folder is writable)."""
        assert self.aligner is not None
        key = f"{getattr(index, 'directory', id(index))}|{gsd_m}"
        if key in self._mosaics:
            return self._mosaics[key]
        t0 = time.perf_counter()
        directory = getattr(index, "directory", None)
        manifest = json.dumps(getattr(index, "manifest", {}), sort_keys=True, default=str)
        phases = bool(self.cfg.fine_phases)
        ident = hashlib.sha256(f"{self._aligner_hash}|phases={phases}|gsd={gsd_m}|{manifest}".encode()).hexdigest()
        tag = getattr(self.aligner, "cache_tag", "")  # another descriptor, another file: they never evict each other
        cache = Path(directory) / (f"align_features{tag}.pt" if gsd_m is None else f"align_features{tag}_{gsd_m:.4g}m.pt") if directory is not None else None
        fm = None
        if cache is not None and cache.is_file():
            try:
                obj = torch.load(cache, map_location="cpu", weights_only=True)
                if obj.get("ident") == ident:
                    ph = obj.get("phases")
                    fm = FeatureMosaic(
                        desc=obj["desc"].float(),
                        origin_x=float(obj["origin_x"]),
                        origin_y=float(obj["origin_y"]),
                        gsd_m=float(obj["gsd_m"]),
                        stride=int(obj.get("stride", STRIDE)),
                        phases=ph.float() if ph is not None else None,
                    )
            except Exception:  # a stale or torn cache is rebuilt, never trusted
                fm = None
        if fm is None:
            img = mosaic_from_index(index, progress=progress)
            if gsd_m is not None:
                img = resample(img, gsd_m)
            fm = build_feature_mosaic(
                self.aligner, img.standardized(), img.valid, img.origin_x, img.origin_y, img.gsd_m, phases=phases, device=self.device
            )
            if cache is not None and not isinstance(fm, LazyFeatureMosaic):  # a lazy one holds the map, not descriptors
                try:
                    with atomic_path(cache) as tmp:
                        torch.save(
                            {
                                "ident": ident,
                                "desc": fm.desc.half(),
                                "phases": fm.phases.half() if fm.phases is not None else None,
                                "origin_x": fm.origin_x,
                                "origin_y": fm.origin_y,
                                "gsd_m": fm.gsd_m,
                                "stride": fm.stride,
                            },
                            tmp,
                        )
                except OSError:
                    pass  # read-only index folder: keep the mosaic in memory only
        self._mosaics[key] = fm
        self.timings["mosaic_s"] += time.perf_counter() - t0
        return fm

    # ------------------------------------------------------------------ the contract

    @torch.no_grad()
    def refine(
        self,
        query_emb: np.ndarray,
        topk_rows: np.ndarray,
        topk_scores: np.ndarray,
        index: Any,
        query_images: torch.Tensor | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rerank and localize a batch.

        Args:
            query_emb: (B, D) float32 query embeddings.
            topk_rows: (B, kq) int64 index rows, coarse order (any kq >= 1).
            topk_scores: (B, kq) float32 coarse cosine scores.
            index: the :class:`~cmpc.index.store.ReferenceIndex` searched.
            query_images: (B, C, S, S) standardised SAR patches (model input), or None
                (then no fine alignment).

        Returns ``(refined_rows (B, kq) int64, positions (B, 2) float64 metres)``. Afterwards
        ``last_peaks`` (B,) holds the best alignment peak per query (None without fine
        alignment) and ``last_source`` (B,) where each position came from: ``"aligned"`` (the
        peak reached ``align_min_peak``), else ``"gnn"`` (the GNN's position or order) or
        ``"coarse"`` (the coarse top-1, kept: the refiner's evidence was too weak).
        """
        t_all = time.perf_counter()
        self.last_peaks = None
        self.last_source = None
        q = np.asarray(query_emb, dtype=np.float32)
        rows = np.asarray(topk_rows, dtype=np.int64)
        B, kq = rows.shape
        if B == 0:
            return rows.copy(), np.zeros((0, 2))
        if self.gnn is not None and q.shape != (B, self.embed_dim):  # an aligner alone takes any embedder's answers
            raise IndexMismatchError(f"the refiner was trained on {self.embed_dim}-dimensional embeddings but got {q.shape[1]}-dimensional ones; retrain it with `cmpc train refine EXPERIMENT.json`")
        if not np.isfinite(q).all():
            raise DataError("query embeddings contain NaN or inf (a corrupt query patch or a diverged embedder); check the inputs")
        if kq == 0:
            raise DataError("no candidates to refine (the prior excludes every reference)")
        kg = min(self.k, kq)
        pos_m = np.asarray(index.positions, dtype=np.float64)[rows]  # (B, kq, 2)
        order = np.broadcast_to(np.arange(kq), (B, kq)).copy()
        position = pos_m[:, 0].copy()
        fallback = "coarse"  # where the position comes from when fine alignment does not take it
        if self.gnn is not None:
            t0 = time.perf_counter()
            feats = index.gather_features(rows[:, :kg].reshape(-1)).reshape(B, kg, -1)
            if not np.isfinite(feats).all():
                raise DataError(f"reference features of index {getattr(index, 'directory', '')} contain NaN or inf; rebuild the index")
            spacing = self.spacing_m(index)
            valid = torch.ones((B, self.k), dtype=torch.bool)
            cand = torch.zeros((B, self.k, feats.shape[2]))
            cpos = torch.zeros((B, self.k, 2), dtype=torch.float64)
            csim = torch.zeros((B, self.k))
            cand[:, :kg] = torch.from_numpy(feats)
            cpos[:, :kg] = torch.from_numpy(pos_m[:, :kg])
            csim[:, :kg] = torch.from_numpy(np.asarray(topk_scores, dtype=np.float32)[:, :kg])
            valid[:, kg:] = False  # fewer than k candidates: mask the missing nodes
            g = build_graphs(torch.from_numpy(q), cand, cpos, csim, spacing, self.cfg.spatial_knn, self.cfg.feature_knn, valid, rank_den=max(self.k - 1, 1))
            self.timings["graph_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            g.batch = g.batch.to(self.device)
            out = self.gnn(g)
            scores = out.scores.float().cpu().numpy()[:, :kg]
            if self.cfg.rerank:
                # stable: equal scores keep the coarse order
                order[:, :kg] = np.argsort(-scores, axis=1, kind="stable")
            if self.cfg.gnn_position:
                position = pos_m[:, 0] + out.position.double().cpu().numpy() * spacing
                fallback = "gnn"
            else:
                position = np.take_along_axis(pos_m, order[:, :1, None], axis=1)[:, 0]
                fallback = "gnn" if self.cfg.rerank else "coarse"
            self.timings["gnn_s"] += time.perf_counter() - t0
        self.last_source = np.full(B, fallback, dtype=object)
        if self.aligner is not None and self.cfg.fine_align and query_images is not None:
            position, order = self._fine_align(query_images, pos_m, order, position, index)
            self.last_source[self.last_aligned] = "aligned"
        refined = np.take_along_axis(rows, order, axis=1)
        self.timings["refine_s"] += time.perf_counter() - t_all
        self.timings["queries"] += B
        return refined, position

    def _fine_align(self, x: torch.Tensor, pos_m: np.ndarray, order: np.ndarray, position: np.ndarray, index: Any) -> tuple[np.ndarray, np.ndarray]:
        """Dense alignment around the first ``fine_top`` candidates of ``order``."""
        assert self.aligner is not None
        S = int(x.shape[-1])
        if x.shape[-2] != S:
            raise DataError(f"fine alignment needs square query patches, got {tuple(x.shape[-2:])}")
        # the map is brought to the queries' pixel size (footprint / query pixels)
        fm = self.feature_mosaic(index, self.footprint_m(index) / S)
        t0 = time.perf_counter()
        B, kq = order.shape
        x = x.float()
        if self.aligner.sar_channels is not None and x.shape[1] != self.aligner.sar_channels:
            raise DataError(f"queries have {x.shape[1]} band(s) but the fine aligner was trained on {self.aligner.sar_channels}")
        dq = self.aligner(x.to(self.device), "sar").float().cpu()
        self.timings["align_desc_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        m = min(self.cfg.fine_top, kq)
        cols = spread_candidates(np.take_along_axis(pos_m, order[..., None], axis=1), m, self.cfg.fine_spread_px * self.footprint_m(index) / S)
        cand = np.take_along_axis(pos_m, np.take_along_axis(order, cols, axis=1)[..., None], axis=1)  # (B, m, 2)
        max_shift = self.cfg.fine_max_shift_px if self.cfg.fine_max_shift_px is not None else S // 2
        res = align_to_mosaic(dq, fm, torch.from_numpy(cand), S, int(max_shift), score=self.cfg.align_score)
        peak = res.peak.numpy()
        best = peak.argmax(axis=1)
        found = res.position_m.numpy()[np.arange(B), best]
        self.last_peaks = peak[np.arange(B), best]
        ok = self.last_aligned = self.last_peaks >= self.align_min_peak
        position = np.where(ok[:, None], found, position)
        if self.cfg.rerank:
            # the reference nearest the aligned position is the best answer to "which reference"
            d = np.linalg.norm(np.take_along_axis(pos_m, order[..., None], axis=1) - position[:, None], axis=2)
            first = d.argmin(axis=1)
            new = order.copy()
            for b in np.nonzero(ok & (first > 0))[0]:
                j = first[b]
                new[b] = np.concatenate([order[b, j : j + 1], order[b, :j], order[b, j + 1 :]])
            order = new
        self.timings["align_corr_s"] += time.perf_counter() - t0
        return position, order


def spread_candidates(ranked_m: np.ndarray, m: int, min_dist_m: float) -> np.ndarray:
    """Which ``m`` of each query's ranked candidates to align around.

    Args:
        ranked_m: (B, K, 2) candidate centres in rank order, metres.
        m: how many to take (<= K).
        min_dist_m: a candidate within this distance of one already taken is skipped; the
            skipped ones fill the remaining places in rank order. 0 = the first ``m``.

    Returns (B, m) column indexes into the ranked lists, taken ones first, each row in rank
    order within its two groups.
    """
    B, K = ranked_m.shape[:2]
    if min_dist_m <= 0 or m >= K:  # plain rank order; all K taken anyway
        return np.broadcast_to(np.arange(m), (B, m)).copy()
    out = np.empty((B, m), dtype=np.int64)
    for b in range(B):
        taken: list[int] = []
        skipped: list[int] = []
        for j in range(K):
            if len(taken) == m:
                break
            if taken and np.min(np.linalg.norm(ranked_m[b, taken] - ranked_m[b, j], axis=1)) < min_dist_m:
                skipped.append(j)
            else:
                taken.append(j)
        out[b] = (taken + skipped)[:m]
    return out


# --------------------------------------------------------------------------- checkpoint


def refiner_payload(
    gnn: SceneGraphRefiner | None,
    aligner: DenseDescriptor | None,
    cfg: RefineConfig,
    k: int,
    embed_dim: int,
    stats: dict[str, Any],
    inputs: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Plain data (``weights_only=True`` loadable) describing a trained refiner.

    ``inputs``: what it was trained from, ``{"embedder": {"path", "sha256"}, "index": ...}``
    (:mod:`cmpc.utils.provenance`); :func:`refiner_from_checkpoint` refuses a refiner without
    ``inputs.embedder``.
    """
    return {
        "kind": "refiner",
        provenance.INPUTS: dict(inputs or {}),
        "k": int(k),
        "embed_dim": int(embed_dim),
        "refine_cfg": dataclasses.asdict(cfg),
        "gnn": {k_: v.detach().cpu() for k_, v in gnn.state_dict().items()} if gnn is not None else None,
        "gnn_arch": {"hidden": cfg.hidden, "layers": cfg.layers, "heads": cfg.heads},
        "aligner": {k_: v.detach().cpu() for k_, v in aligner.state_dict().items()} if aligner is not None else None,
        "aligner_arch": (
            {"sar_channels": aligner.sar_channels, "optical_channels": aligner.optical_channels, "dim": aligner.dim, "width": aligner.width}
            if aligner is not None
            else None
        ),
        "stats": stats,
        **extra,
    }


def aligner_payload(refiner_path: str | Path, k: int = RefineConfig.k) -> dict[str, Any]:
    """A refiner checkpoint that keeps only the dense descriptor of ``refiner_path`` (no GNN,
    no calibrated gate): what scene georeferencing needs for its fine alignment. The
    descriptor learned SAR/optical patterns, not the embedder's space, so the result loads
    beside any embedder of the same bands (``cmpc model aligner``; a model card's
    ``aligner``). ``k`` is the graph size recorded for the config check (unused without a GNN)."""
    ck = load_checkpoint(refiner_path)
    if ck.get("kind") != "refiner" or ck.get("aligner") is None:
        raise CheckpointError(f"{refiner_path} is not a refiner checkpoint with a dense descriptor (trained with refine.fine_align)")
    stats = {"aligner_from": provenance.record(refiner_path), "align_min_peak": 0.0,
             **{key: v for key, v in (ck.get("stats") or {}).items() if key.startswith("align") and key != "align_min_peak"}}
    return {
        "kind": "refiner", provenance.INPUTS: {"aligner_from": provenance.record(refiner_path)}, "k": int(k), "embed_dim": int(ck["embed_dim"]),
        "refine_cfg": ck.get("refine_cfg") or {}, "gnn": None, "gnn_arch": None, "aligner": ck["aligner"], "aligner_arch": ck["aligner_arch"],
        "stats": stats,
    }


def save_refiner(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write a refiner checkpoint atomically."""
    return save_checkpoint(path, payload)


def refiner_embedder_record(ck: dict[str, Any]) -> dict[str, Any] | None:
    """The embedder a refiner checkpoint was trained on: ``inputs.embedder``, else the older
    ``stats.embedder`` ({path, hash}: the same file SHA-256), else None."""
    rec = provenance.recorded(ck, "embedder")
    if rec is None:
        old = (ck.get("stats") or {}).get("embedder")
        if isinstance(old, dict) and old.get("hash"):
            rec = {"path": old.get("path"), "sha256": old["hash"]}
    return rec


#: The refiner's policies when the alignment peak is too weak, as (rerank, gnn_position):
#: keep the coarse order and top-1 centre; take the GNN's order (its top-1 centre); take
#: the GNN's order and regressed position; keep the coarse order but the GNN's position.
POLICIES: dict[str, tuple[bool, bool]] = {
    "coarse": (False, False),
    "gnn_order": (True, False),
    "gnn_position": (True, True),
    "coarse_order_gnn_position": (False, True),
}


def policy_name(rerank: bool, gnn_position: bool) -> str:
    """The :data:`POLICIES` key of a (rerank, gnn_position) pair."""
    return next(k for k, v in POLICIES.items() if v == (bool(rerank), bool(gnn_position)))


def gated_settings(ck: dict[str, Any], cfg: RefineConfig, path: str | Path) -> tuple[RefineConfig, float]:
    """The query-time switches and peak threshold of a refiner checkpoint ``ck``.

    ``refine.gate = "config"``: ``cfg``'s rerank / gnn_position, the threshold calibrated for
    that policy (older checkpoints: their single ``align_min_peak``). ``"calibrated"``: the
    policy chosen on validation in training (``stats.calibration.policy``) and its threshold;
    a checkpoint without one is a one-line :class:`CheckpointError`. ``refine.align_min_peak``
    set by hand wins over the calibrated threshold.
    """
    stats = ck.get("stats") or {}
    cal = stats.get("calibration") or {}
    policies = cal.get("policies") or {}
    if cfg.gate == "calibrated":
        name = cal.get("policy")
        if name not in POLICIES or name not in policies:
            raise CheckpointError(f"{path} holds no calibrated policy (trained without fine alignment or before refine.gate existed); retrain it or set refine.gate=config")
        rerank, gnn_position = POLICIES[name]
        cfg = dataclasses.replace(cfg, rerank=rerank, gnn_position=gnn_position)
    else:
        name = policy_name(cfg.rerank, cfg.gnn_position)
    t = (policies.get(name) or {}).get("align_min_peak", stats.get("align_min_peak", 0.0))
    return cfg, float(cfg.align_min_peak if cfg.align_min_peak is not None else t)


def cfog_aligner(cfg: RefineConfig) -> CfogDescriptor:
    """The CFOG descriptor of ``cfg`` (``refine.cfog_sigma`` / ``cfog_sar_sigma``; any band count)."""
    return CfogDescriptor(None, None, sigma=cfg.cfog_sigma, sar_sigma=cfg.cfog_sar_sigma)


def cfog_refiner(cfg: RefineConfig, device: torch.device | str = "cpu") -> GraphRefiner:
    """A refiner without a checkpoint: no GNN (coarse order and position as the fallback), fine
    alignment with the CFOG descriptor around the first ``refine.fine_top`` candidates, a
    position taken when its peak reaches ``refine.align_min_peak`` (null: always). With
    ``refine.rerank`` the candidate nearest the aligned position moves to the front."""
    if cfg.gate == "calibrated":
        raise CheckpointError("refine.gate=calibrated needs a trained refiner.pt; with refine.aligner=cfog and no refiner set refine.gate=config and refine.align_min_peak")
    t = cfg.align_min_peak if cfg.align_min_peak is not None else -1.0
    return GraphRefiner(None, cfog_aligner(cfg), cfg, cfg.k, 0, align_min_peak=t, device=device)


def refiner_from_checkpoint(
    path: str | Path,
    cfg: RefineConfig,
    device: torch.device | str = "cpu",
    embedder: dict[str, Any] | str | Path | None = None,
) -> GraphRefiner:
    """Rebuild a :class:`GraphRefiner` from ``path`` with the query-time switches of ``cfg``.

    The graph size ``k`` must match the checkpoint's (one-line :class:`CheckpointError`
    otherwise); the switches (rerank, gnn_position, fine_align, fine_top, ...) are free.
    ``embedder``: the embedder checkpoint the queries are embedded with (a path or a
    ``{"path", "sha256"}`` record); given, the refiner must have been trained on exactly that
    file (same SHA-256), else a one-line :class:`CheckpointError` naming both hashes. None
    skips the check (tools that use only the aligner, which does not depend on the embedder),
    and so does a checkpoint without a GNN (:func:`aligner_payload`: a dense descriptor alone).
    """
    ck = load_checkpoint(path)
    if ck.get("kind") != "refiner":
        raise CheckpointError(f"{path} is not a refiner checkpoint (kind={ck.get('kind')!r})")
    if embedder is not None and ck.get("gnn") is not None:
        provenance.check(
            refiner_embedder_record(ck),
            embedder,
            artefact=f"refiner {path}",
            role="embedder",
            fix="retrain the refiner on this embedder with `cmpc train refine EXPERIMENT.json` (or set refine.enabled=false)",
        )
    k = int(ck["k"]) if ck.get("gnn") is not None else cfg.k  # the graph size matters only to a GNN
    if cfg.k != k:
        raise CheckpointError(f"{path} was trained for k={k} candidates but refine.k is {cfg.k}; set refine.k={k} or retrain with `cmpc train refine EXPERIMENT.json`")
    D = int(ck["embed_dim"])
    gnn = None
    if ck.get("gnn") is not None:
        arch = ck["gnn_arch"]
        gnn = SceneGraphRefiner(D, int(arch["hidden"]), int(arch["layers"]), int(arch["heads"]))
        try:
            gnn.load_state_dict(ck["gnn"])
        except RuntimeError as e:
            raise CheckpointError(f"{path}: GNN weights do not fit their stored architecture: {str(e).splitlines()[0]}") from None
    aligner = None
    if ck.get("aligner") is not None:
        a = ck["aligner_arch"]
        aligner = DenseDescriptor(int(a["sar_channels"]), int(a["optical_channels"]), int(a["dim"]), int(a["width"]))
        try:
            aligner.load_state_dict(ck["aligner"])
        except RuntimeError as e:
            raise CheckpointError(f"{path}: aligner weights do not fit their stored architecture: {str(e).splitlines()[0]}") from None
    if cfg.align_score == "zncc" and cfg.aligner != "cfog":
        raise ConfigError("refine.align_score=zncc is for refine.aligner=cfog: the learned aligner's peaks, phase maps and calibrated gate are on the corr score")
    if cfg.aligner == "cfog":
        if cfg.gate == "calibrated":
            raise CheckpointError(f"{path}'s calibrated gate was calibrated for its learned aligner, not for refine.aligner=cfog; set refine.gate=config and refine.align_min_peak")
        aligner = cfog_aligner(cfg)
    cfg, min_peak = gated_settings(ck, cfg, path)
    if cfg.aligner == "cfog":
        min_peak = cfg.align_min_peak if cfg.align_min_peak is not None else -1.0
    gr = GraphRefiner(gnn, aligner, cfg, k, D, align_min_peak=min_peak, device=device)
    gr.source = provenance.record(path)
    gr.inputs = dict(ck.get(provenance.INPUTS) or {})
    return gr

