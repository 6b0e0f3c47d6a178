"""``cmpc train scene``: calibrate the scene decision rule on the TRAINING area.

The verify method claims "found" when at least ``min_inliers`` tiles agree, they are at
least ``min_inlier_frac`` of the scene's tiles, and the dense alignment's peak is at least
``min_fine_peak``. The thresholds are chosen here, never on the
test area: scenes are cut from the training split's area (``cmpc data scenes --split
train``), georeferenced against the training map (``index/<name>-train``, the index the
refiner was trained on) with the rule switched off, and the thresholds picked that find the
most scenes (centre within ``good_m``) while false claims (centre error > ``bad_m``) stay at
most ``max_false`` of the scenes; ties go to the stricter rule. Written to
``runs/<name>/scene_decision.json`` (read by :func:`cmpc.localize.georef.load_decision`).

:func:`train_and_calibrate` (what ``cmpc train scene`` runs unless ``--no-gnn``) first trains
the scene-graph GNN (:mod:`cmpc.train.scene_graph`), calibrates the rules of verify and
gnn+verify on the same scenes, and records the better method on the GNN's validation
scenes as ``default_method``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from cmpc.data.scenes import SceneSource
from cmpc.evaluate.scenes import evaluate_scenes
from cmpc.localize.georef import DECISION_FILE, Georeferencer
from cmpc.localize.localizer import Localizer
from cmpc.localize.scene import SceneSettings
from cmpc.utils.io import atomic_write_json


def choose_rule(per_scene: list[dict[str, Any]], good_m: float = 25.0, bad_m: float = 100.0, max_false: float = 0.02, method: str = "verify") -> dict[str, Any]:
    """Thresholds (min_inliers, min_inlier_frac, min_fine_peak) from ``method``'s answers made with the rule off."""
    rows = [r for r in per_scene if r["method"] == method]
    n = len(rows)
    inl = np.array([r["inliers"] for r in rows], dtype=np.float64)
    frac = np.array([r["inliers"] / r["tiles"] if r["tiles"] else 0.0 for r in rows])
    err = np.array([r["centre_m"] if np.isfinite(r["centre_m"]) else 1e9 for r in rows])
    peak = np.array([r.get("fine_peak", np.nan) for r in rows], dtype=np.float64)
    peak = np.where(np.isfinite(peak), peak, np.inf)  # no fine alignment: the peak does not decide
    best: tuple[float, ...] | None = None
    rule: dict[str, Any] = {}
    for m in range(2, 11):
        for f in np.round(np.arange(0.0, 0.85, 0.05), 2):
            for p in np.round(np.arange(0.0, 0.61, 0.025), 3):
                claim = (inl >= m) & (frac >= f) & (peak >= p)
                good = int((claim & (err <= good_m)).sum())
                false = int((claim & (err > bad_m)).sum())
                if n and false / n > max_false:
                    continue
                key = (good, -false, p, m, f)  # most found, fewest false, then the stricter rule
                if best is None or key > best:
                    best = key
                    rule = {"min_inliers": int(m), "min_inlier_frac": float(f), "min_fine_peak": float(p), "found_good": good, "false_claims": false}
    return {**rule, "n_scenes": n}


def calibrate(
    exp,  # noqa: ANN001 - cmpc.config.Experiment
    train_index_dir: str | Path,
    tiles: tuple[int, ...] = (2, 3),
    count: int = 30,
    heading_ranges: tuple[float, ...] = (0.0, 15.0),
    seed: int = 1000,
    checkpoint: str | None = None,
    methods: tuple[str, ...] = ("verify",),
    gnn=None,  # noqa: ANN001 - a CandidateRescorer for method gnn+verify
    source: SceneSource | None = None,
    out_dir: str | Path | None = None,
    top_k: int = SceneSettings.top_k,
) -> dict[str, Any]:
    """Cut validation scenes from the training area (each size in ``tiles``, each heading
    range in ``heading_ranges``; rotated ones answered with that rotation range), answer
    them against the training map, choose the rule (module doc) and write
    ``runs/<name>/scene_decision.json``. With ``gnn+verify`` in ``methods`` (and ``gnn``) its
    rule is chosen the same way and written under ``methods["gnn+verify"]``; the top-level
    rule stays the verify one. ``source``: where the scenes are cut (default the experiment's
    training area); ``out_dir``: where scene_decision.json goes (default ``runs/<name>``);
    ``top_k``: candidates per tile, recorded with the rule (georef uses it unless told otherwise)."""
    out_dir = Path(out_dir) if out_dir is not None else Path(exp.run_dir)
    work = out_dir / "scene_val"
    loc = Localizer.from_experiment(exp, checkpoint=checkpoint, index_dir=train_index_dir)
    source = source or SceneSource.of_experiment(exp)
    per_scene: list[dict[str, Any]] = []
    off = {"source": "calibration (rule off)", "min_inliers": 0, "min_inlier_frac": 0.0, "min_fine_peak": -1.0}
    try:
        i = 0
        for hr in heading_ranges:
            settings = SceneSettings(rotation_range_deg=float(hr), min_inliers=0, min_inlier_frac=0.0, min_fine_peak=-1.0, top_k=top_k)
            geo = Georeferencer(loc, settings, off, gnn=gnn)
            for n in tiles:
                folder = work / f"train_{n}x{n}_h{hr:g}"
                source.cut(exp.data.root, folder, "train", n, count, float(hr), seed + i)
                per_scene += evaluate_scenes(geo, folder, None, methods=methods)["per_scene"]
                i += 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rule = choose_rule(per_scene)
    others = {m: choose_rule(per_scene, method=m) for m in methods if m != "verify"}
    record = {
        **{k: rule[k] for k in ("min_inliers", "min_inlier_frac", "min_fine_peak")},
        "top_k": int(top_k),
        "chosen_on": {
            "split": "train", "source": source.label, "index": str(train_index_dir), "tiles": list(tiles), "scenes_per_size": count,
            "heading_ranges_deg": list(heading_ranges), "seed": seed, "n_scenes": rule["n_scenes"],
            "found_within_25m": rule.get("found_good"), "false_claims_over_100m": rule.get("false_claims"),
            "criterion": "most scenes found within 25 m with false claims (> 100 m) at most 2 % of the scenes",
        },
        "default_when_uncalibrated": {"min_inliers": SceneSettings.min_inliers, "min_inlier_frac": SceneSettings.min_inlier_frac,
                                      "min_fine_peak": SceneSettings.min_fine_peak},
    }
    if others:
        record["methods"] = {m: {**{k: r[k] for k in ("min_inliers", "min_inlier_frac", "min_fine_peak")},
                                 "found_within_25m": r.get("found_good"), "false_claims_over_100m": r.get("false_claims")}
                             for m, r in others.items()}
    atomic_write_json(out_dir / DECISION_FILE, record)
    return record


def choose_method(rows: dict[str, dict[str, Any]], max_false: float = 0.02) -> str:
    """The method with the most scenes found within 25 m among those whose false claims stay
    at most ``max_false`` (else the fewest false claims); ties go to ``verify`` (no GNN)."""
    def key(m: str) -> tuple:
        r = rows[m]
        return (r["false_claims"] <= max_false, r["success_25m"] if r["false_claims"] <= max_false else -r["false_claims"], m == "verify")
    return max(rows, key=key)


def train_and_calibrate(
    exp,  # noqa: ANN001 - cmpc.config.Experiment
    train_index_dir: str | Path,
    tiles: tuple[int, ...] = (2, 3),
    count: int = 30,
    heading_ranges: tuple[float, ...] = (0.0, 15.0),
    checkpoint: str | None = None,
    gnn_count: int = 40,
    gnn_epochs: int = 40,
    source: SceneSource | None = None,
    out_dir: str | Path | None = None,
    top_k: int = SceneSettings.top_k,
) -> dict[str, Any]:
    """``cmpc train scene``: train the scene-graph GNN (:func:`cmpc.train.scene_graph.train_scene_graph`,
    its validation scenes = the southern part of the training area), calibrate the decision
    rules of verify and gnn+verify (:func:`calibrate`), then answer the GNN's validation
    scenes with both calibrated rules and record the better method (:func:`choose_method`)
    as ``default_method`` of ``scene_decision.json`` (the default of ``cmpc georef``)."""
    from cmpc.evaluate.scenes import summarise
    from cmpc.localize.georef import SCENE_GRAPH_FILE, load_decision
    from cmpc.localize.scene_graph import SceneGraphRescorer
    from cmpc.models.checkpoint import default_checkpoint
    from cmpc.train.scene_graph import train_scene_graph

    out_dir = Path(out_dir) if out_dir is not None else Path(exp.run_dir)
    val_dir = out_dir / "scene_graph_val"
    shutil.rmtree(val_dir, ignore_errors=True)
    try:
        log = train_scene_graph(exp, train_index_dir, count=gnn_count, heading_ranges=heading_ranges, epochs=gnn_epochs,
                                checkpoint=checkpoint, keep_val=val_dir, source=source, out_dir=out_dir, top_k=top_k)
        gnn = SceneGraphRescorer.load(out_dir / SCENE_GRAPH_FILE, default_checkpoint(exp.run_dir, checkpoint))
        record = calibrate(exp, train_index_dir, tiles, count, heading_ranges, checkpoint=checkpoint, methods=("verify", "gnn+verify"), gnn=gnn,
                           source=source, out_dir=out_dir, top_k=top_k)
        loc = Localizer.from_experiment(exp, checkpoint=checkpoint, index_dir=train_index_dir)
        per_scene: list[dict[str, Any]] = []
        for hr in heading_ranges:
            base = SceneSettings(rotation_range_deg=float(hr), top_k=top_k)
            s_v, src = load_decision(out_dir, base)
            s_g, _ = load_decision(out_dir, base, method="gnn+verify")
            geo = Georeferencer(loc, s_v, src, gnn=gnn, gnn_settings=s_g)
            for folder in sorted(val_dir.glob(f"*_h{hr:g}")):
                per_scene += evaluate_scenes(geo, folder, None, methods=("verify", "gnn+verify"))["per_scene"]
    finally:
        shutil.rmtree(val_dir, ignore_errors=True)
    rows = {m: summarise(per_scene, m) for m in ("verify", "gnn+verify")}
    chosen = choose_method(rows)
    record["default_method"] = {
        "method": chosen,
        "chosen_on": "the scene-graph GNN's validation scenes (southern part of the training area, training map, calibrated rules)",
        "criterion": "most found within 25 m with false claims at most 2 %; ties: verify",
        "validation": rows,
    }
    record["scene_graph"] = {k: v for k, v in log.items() if k != "history"}
    atomic_write_json(out_dir / DECISION_FILE, record)
    return record
