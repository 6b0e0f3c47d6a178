"""``cmpc train scene``: calibrate the scene decision on the TRAINING area.

The verify method claims "found" from its evidence: how many tiles agree and the dense
alignment's peak. The decision is chosen here, never on the test area: scenes are cut from
the training split's area (``cmpc data scenes --split train``, or a calibration map),
georeferenced against the training map with the decision switched off, and either three
thresholds (inlier tiles, inlier fraction, peak) or a logistic confidence model fit
(:mod:`cmpc.localize.decision`), whichever finds more scenes (centre within ``good_m``) in
cross-validation while false claims (centre error > ``bad_m``) stay at most ``max_false``
of the scenes. The scenes include **off-map scenes** (negatives): mirrored copies of some of
the cut scenes, content that lies nowhere on the map with the statistics of the real thing;
any placement claimed for one is a false claim. Without them a calibration whose placements
are all right has nothing to learn "wrong" from. Written to ``runs/<name>/scene_decision.json`` (read by
:func:`cmpc.localize.georef.load_decision`), the answers beside it in
``scene_calibration.csv`` (``cmpc train scene --rechoose`` chooses again from them).

:func:`train_and_calibrate` (what ``cmpc train scene`` runs unless ``--no-gnn``) first trains
the scene-graph GNN (:mod:`cmpc.train.scene_graph`), calibrates the rules of verify and
gnn+verify on the same scenes, and records the better method on the GNN's validation
scenes as ``default_method``.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from cmpc.data.scenes import SceneSource
from cmpc.errors import DataError
from cmpc.evaluate.scenes import evaluate_scenes
from cmpc.localize.decision import Evidence, choose_decider, confidence_claims, rule_claims
from cmpc.localize.georef import DECISION_FILE, Georeferencer
from cmpc.localize.localizer import Localizer
from cmpc.models.graph import grid_spacing_m
from cmpc.localize.scene import SceneSettings
from cmpc.utils.io import atomic_write_json, atomic_write_text


#: the calibration scenes' answers (rule off), one row per scene and method, beside the decision file
CALIBRATION_FILE = "scene_calibration.csv"
_CAL_COLUMNS = ("method", "tiles_per_side", "heading_range_deg", "scene", "inliers", "tiles", "fine_peak", "centre_m", "peak_margin", "off_map")
#: columns a calibration file must have (files from before the dense search lack peak_margin and off_map)
_CAL_REQUIRED = _CAL_COLUMNS[:-2]


def mirror_scenes(src: Path, dst: Path, k: int) -> int:
    """Off-map scenes: the first ``k`` scenes of the cut folder ``src`` mirrored left-right
    (values, mask and type kept) into ``dst`` with their truth files (the truth is not used:
    an off-map scene has no right place). Returns how many were written."""
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    from cmpc.evaluate.scenes import list_scenes

    dst.mkdir(parents=True, exist_ok=True)
    n = 0
    for path, truth in list_scenes(src)[: max(0, k)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as f:
                data, mask, profile = f.read()[:, :, ::-1], f.dataset_mask()[:, ::-1], f.profile
            with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(dst / path.name, "w", **profile) as f:
                f.write(data)
                if profile.get("nodata") is None:
                    f.write_mask(mask)
        (dst / path.name.replace(".tif", ".truth.json")).write_text(json.dumps({**truth, "off_map": True}), encoding="utf-8")
        n += 1
    return n


def decision_record(per_scene: list[dict[str, Any]], method: str, max_false: float = 0.02) -> dict[str, Any]:
    """One method's decision (:func:`cmpc.localize.decision.choose_decider`) from its
    calibration answers, as stored in scene_decision.json."""
    ev = Evidence.of_rows([r for r in per_scene if r["method"] == method])
    if not len(ev):
        raise DataError(f"no calibration answers of method {method}")
    d = choose_decider(ev, max_false=max_false)
    rule, model = d["rule"], d["confidence"]
    claims = confidence_claims(model, ev) if d["decider"] == "confidence" else rule_claims(rule, ev)
    return {
        **{k: rule[k] for k in ("min_inliers", "min_inlier_frac", "min_fine_peak")},
        "decider": d["decider"],
        "chosen": d["chosen"],
        "confidence": model.to_json() if model is not None else None,
        "cv": d["cv"],
        "found_within_25m": int((claims & (ev.err <= 25.0)).sum()),
        "false_claims_over_100m": int((claims & (ev.err > 100.0)).sum()),
        "n_scenes": len(ev),
    }


def write_calibration_rows(path: Path, per_scene: list[dict[str, Any]]) -> None:
    """The calibration answers as CSV (atomically), so the decision can be re-chosen
    without answering the scenes again (``cmpc train scene --rechoose``)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_CAL_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in per_scene:
        w.writerow(r)
    atomic_write_text(path, buf.getvalue())


def read_calibration_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"{path} not found: the calibration answers are saved by `cmpc train scene` (run it without --rechoose first)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or any(c not in rows[0] for c in _CAL_REQUIRED):
        raise DataError(f"{path} is not a scene calibration file (columns {', '.join(_CAL_REQUIRED)})")
    return [{**r, "inliers": int(r["inliers"]), "tiles": int(r["tiles"]), "fine_peak": float(r["fine_peak"] or "nan"),
             "centre_m": float(r["centre_m"] or "nan"), "peak_margin": float(r.get("peak_margin") or "nan")} for r in rows]


def rechoose(out_dir: str | Path, methods: tuple[str, ...] = ("verify", "gnn+verify")) -> dict[str, Any]:
    """Choose the decision again from ``out_dir``'s saved calibration answers (no scene is
    answered again) and update scene_decision.json in place (its other records kept)."""
    out_dir = Path(out_dir)
    per_scene = read_calibration_rows(out_dir / CALIBRATION_FILE)
    p = out_dir / DECISION_FILE
    record = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
    present = [m for m in methods if any(r["method"] == m for r in per_scene)]
    for m in present:
        rec = decision_record(per_scene, m)
        if m == "verify":
            record.update({k: v for k, v in rec.items() if k not in ("found_within_25m", "false_claims_over_100m", "n_scenes")})
            record.setdefault("chosen_on", {}).update({"found_within_25m": rec["found_within_25m"], "false_claims_over_100m": rec["false_claims_over_100m"]})
        else:
            record.setdefault("methods", {})[m] = {k: v for k, v in rec.items() if k != "n_scenes"}
    atomic_write_json(p, record)
    return record


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
    min_scene_tiles: int = SceneSettings.min_scene_tiles,
    max_dense_tiles: int = SceneSettings.max_dense_tiles,
    dense_search: int = SceneSettings.dense_search,
    negatives: int | None = None,
) -> dict[str, Any]:
    """Cut validation scenes from the training area (each size in ``tiles``, each heading
    range in ``heading_ranges``; rotated ones answered with that rotation range), answer
    them against the training map, choose the rule (module doc) and write
    ``runs/<name>/scene_decision.json``. With ``gnn+verify`` in ``methods`` (and ``gnn``) its
    rule is chosen the same way and written under ``methods["gnn+verify"]``; the top-level
    rule stays the verify one. ``source``: where the scenes are cut (default the experiment's
    training area); ``out_dir``: where scene_decision.json goes (default ``runs/<name>``);
    ``top_k``: candidates per tile, recorded with the rule (georef uses it unless told otherwise);
    ``negatives``: off-map scenes per size and heading range (:func:`mirror_scenes`; default
    half of ``count``), answered like the others, every claim of one counted false."""
    out_dir = Path(out_dir) if out_dir is not None else Path(exp.run_dir)
    work = out_dir / "scene_val"
    loc = Localizer.from_experiment(exp, checkpoint=checkpoint, index_dir=train_index_dir)
    source = source or SceneSource.of_experiment(exp)
    per_scene: list[dict[str, Any]] = []
    n_neg = count // 2 if negatives is None else int(negatives)
    off = {"source": "calibration (rule off)", "min_inliers": 0, "min_inlier_frac": 0.0, "min_fine_peak": -1.0}
    try:
        i = 0
        for hr in heading_ranges:
            settings = SceneSettings(rotation_range_deg=float(hr), min_inliers=0, min_inlier_frac=0.0, min_fine_peak=-1.0, top_k=top_k,
                                     min_scene_tiles=min_scene_tiles, max_dense_tiles=max_dense_tiles, dense_search=dense_search)
            geo = Georeferencer(loc, settings, off, gnn=gnn)
            for n in tiles:
                folder = work / f"train_{n}x{n}_h{hr:g}"
                source.cut(exp.data.root, folder, "train", n, count, float(hr), seed + i)
                rows = evaluate_scenes(geo, folder, None, methods=methods)["per_scene"]
                per_scene += [{**r, "tiles_per_side": n, "heading_range_deg": float(hr), "off_map": 0} for r in rows]
                if n_neg > 0 and mirror_scenes(folder, work / f"off_{n}x{n}_h{hr:g}", n_neg):
                    rows = evaluate_scenes(geo, work / f"off_{n}x{n}_h{hr:g}", None, methods=methods)["per_scene"]
                    per_scene += [{**r, "tiles_per_side": n, "heading_range_deg": float(hr), "off_map": 1, "centre_m": float("inf")} for r in rows]
                i += 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_calibration_rows(out_dir / CALIBRATION_FILE, per_scene)
    rule = decision_record(per_scene, "verify")
    others = {m: decision_record(per_scene, m) for m in methods if m != "verify"}
    record = {
        **{k: rule[k] for k in ("min_inliers", "min_inlier_frac", "min_fine_peak", "decider", "chosen", "confidence", "cv")},
        "top_k": int(top_k),
        "embedder_sha256": loc.checkpoint_sha256,  # the answers (and so the decision) are this embedder's
        "min_scene_tiles": int(min_scene_tiles),
        "max_dense_tiles": int(max_dense_tiles),
        "dense_search": int(dense_search),  # the whole-map dense search the evidence came with
        # the reference spacing of the map the evidence came from: inlier counts scale with it
        "ref_stride_m": round(float(grid_spacing_m(loc.index.positions)), 2),
        "chosen_on": {
            "split": "train", "source": source.label, "index": str(train_index_dir), "tiles": list(tiles), "scenes_per_size": count,
            "heading_ranges_deg": list(heading_ranges), "seed": seed, "n_scenes": rule["n_scenes"],
            "off_map_scenes": sum(1 for r in per_scene if r.get("off_map") and r["method"] == "verify"),
            "found_within_25m": rule["found_within_25m"], "false_claims_over_100m": rule["false_claims_over_100m"],
            "criterion": ("most scenes found within 25 m with false claims (> 100 m, or any claim for an off-map scene) at most 2 % "
                          "of the scenes; thresholds or the logistic confidence models, whichever finds more in 5-fold "
                          "cross-validation (cmpc.localize.decision)"),
        },
        "default_when_uncalibrated": {"min_inliers": SceneSettings.min_inliers, "min_inlier_frac": SceneSettings.min_inlier_frac,
                                      "min_fine_peak": SceneSettings.min_fine_peak},
    }
    if others:
        record["methods"] = {m: {k: v for k, v in r.items() if k != "n_scenes"} for m, r in others.items()}
    atomic_write_json(out_dir / DECISION_FILE, record)
    return record


def calibrate_keeping_gnn(
    exp,  # noqa: ANN001 - cmpc.config.Experiment
    train_index_dir: str | Path,
    tiles: tuple[int, ...] = (2, 3),
    count: int = 30,
    heading_ranges: tuple[float, ...] = (0.0, 15.0),
    checkpoint: str | None = None,
    source: SceneSource | None = None,
    out_dir: str | Path | None = None,
    top_k: int = SceneSettings.top_k,
    min_scene_tiles: int = SceneSettings.min_scene_tiles,
    max_dense_tiles: int = SceneSettings.max_dense_tiles,
    negatives: int | None = None,
) -> dict[str, Any]:
    """``cmpc train scene --keep-gnn``: :func:`calibrate` verify and gnn+verify with the
    scene-graph GNN already in ``out_dir`` (not retrained); the earlier file's
    ``default_method`` and ``scene_graph`` records are kept (the default method was chosen
    with the decision of that time: said in the record)."""
    from cmpc.localize.georef import SCENE_GRAPH_FILE
    from cmpc.localize.scene_graph import SceneGraphRescorer
    from cmpc.models.checkpoint import default_checkpoint

    out_dir = Path(out_dir) if out_dir is not None else Path(exp.run_dir)
    gpath = out_dir / SCENE_GRAPH_FILE
    if not gpath.is_file():
        raise DataError(f"--keep-gnn: no scene-graph GNN at {gpath}; run `cmpc train scene` without it first")
    dpath = out_dir / DECISION_FILE
    old = json.loads(dpath.read_text(encoding="utf-8")) if dpath.is_file() else {}
    gnn = SceneGraphRescorer.load(gpath, default_checkpoint(exp.run_dir, checkpoint))
    record = calibrate(exp, train_index_dir, tiles, count, heading_ranges, checkpoint=checkpoint, methods=("verify", "gnn+verify"), gnn=gnn,
                       source=source, out_dir=out_dir, top_k=top_k, min_scene_tiles=min_scene_tiles, max_dense_tiles=max_dense_tiles,
                       negatives=negatives)
    for k in ("default_method", "scene_graph"):
        if k in old:
            record[k] = old[k]
    if "default_method" in record:
        record["default_method"]["note"] = "kept from the earlier calibration (chosen with the decision of that time); `cmpc train scene` without --keep-gnn chooses it again"
    atomic_write_json(dpath, record)
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
    negatives: int | None = None,
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
                           source=source, out_dir=out_dir, top_k=top_k, negatives=negatives)
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
