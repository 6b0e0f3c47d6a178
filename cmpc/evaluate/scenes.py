"""``cmpc eval scenes``: georeference every scene of a cut folder and score the answers.

Scenes come from ``cmpc data scenes`` (plain GeoTIFFs + ``<stem>.truth.json``). Models and
index are loaded once (one :class:`~cmpc.localize.georef.Georeferencer`); each scene is
tiled and searched once and every method answers from the same candidates. Per method:

- ``success_5m`` / ``success_25m``: fraction of scenes found with the centre within 5 / 25 m;
- ``not_found``: fraction answered "not_found"; ``false_claims``: found with centre error > 100 m;
- ``median_m`` / ``corner_m``: median centre / mean-corner error over ALL scenes (a
  not-found scene counts with its best guess);
- ``heading_err_deg``: median |heading error| over all scenes, likewise;
- ``s_per_scene``: median seconds per scene, models, index and map descriptors loaded
  before the first scene (the map's dense descriptors are computed once, before timing).

Writes ``rows.json`` (the table rows), ``scenes.csv`` (one line per scene and method) and
``table.md`` into ``out`` (atomically).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cmpc.errors import DataError
from cmpc.localize.georef import Georeferencer, SceneAnswer
from cmpc.localize.scene import read_scene
from cmpc.localize.verify import SceneTransform, angle_diff_deg
from cmpc.utils.io import atomic_dir, atomic_write_json, atomic_write_text


def list_scenes(folder: str | os.PathLike[str]) -> list[tuple[Path, dict[str, Any]]]:
    """(scene file, truth) pairs of a folder cut by ``cmpc data scenes``, in name order."""
    d = Path(folder)
    if not d.is_dir():
        raise DataError(f"scene folder not found: {d}")
    out = []
    for t in sorted(d.glob("*.truth.json")):
        truth = json.loads(t.read_text(encoding="utf-8"))
        p = d / truth.get("scene", t.name.replace(".truth.json", ".tif"))
        if p.is_file():
            out.append((p, truth))
    if not out:
        raise DataError(f"no scenes with truth files (<stem>.truth.json) in {d}; cut some with `cmpc data scenes`")
    return out


def _nan_if_none(v: Any) -> float:
    return float("nan") if v is None else float(v)


def score_answer(ans: SceneAnswer, truth: dict[str, Any], width: int, height: int) -> dict[str, Any]:
    """Errors of one answer against a truth record (metres, degrees)."""
    t = SceneTransform.from_affine(truth["transform"])
    row: dict[str, Any] = {"method": ans.method, "status": ans.status, "inliers": ans.inlier_tiles, "tiles": ans.n_tiles,
                           "confidence": ans.confidence, "seconds": round(ans.seconds, 3),
                           "fine_peak": float((ans.stats.get("fine") or {}).get("peak", float("nan"))),
                           "peak_margin": _nan_if_none(((ans.stats.get("fine") or {}).get("dense") or {}).get("margin"))}
    if ans.transform is None:
        row.update({"centre_m": float("nan"), "dx_m": float("nan"), "dy_m": float("nan"), "corner_m": float("nan"), "heading_err_deg": float("nan"),
                    "scale": float("nan")})
        return row
    e = ans.transform
    d = e.centre(width, height) - t.centre(width, height)
    row["centre_m"] = float(np.linalg.norm(d))
    row["dx_m"], row["dy_m"] = float(d[0]), float(d[1])  # signed (east, north): a systematic offset shows here
    row["corner_m"] = float(np.linalg.norm(e.corners(width, height) - t.corners(width, height), axis=1).mean())
    row["heading_err_deg"] = float(abs(angle_diff_deg(e.heading_deg, t.heading_deg)))
    row["scale"] = float(e.scale)
    return row


def summarise(per_scene: list[dict[str, Any]], method: str) -> dict[str, Any]:
    """The table row of one method (module doc)."""
    rows = [r for r in per_scene if r["method"] == method]
    n = len(rows)
    found = [r for r in rows if r["status"] == "found"]

    def med(key: str) -> float:
        # over ALL scenes: a not-found scene counts with its best guess, one without any
        # placement as infinitely wrong
        a = np.array([r[key] for r in rows], dtype=np.float64)
        return float(np.median(np.where(np.isfinite(a), a, np.inf))) if len(a) else float("nan")

    return {
        "method": method,
        "n_scenes": n,
        "success_5m": round(sum(1 for r in found if r["centre_m"] <= 5.0) / n, 4) if n else 0.0,
        "success_25m": round(sum(1 for r in found if r["centre_m"] <= 25.0) / n, 4) if n else 0.0,
        "not_found": round((n - len(found)) / n, 4) if n else 0.0,
        "false_claims": round(sum(1 for r in found if r["centre_m"] > 100.0) / n, 4) if n else 0.0,
        "median_m": round(med("centre_m"), 2),
        "corner_m": round(med("corner_m"), 2),
        "heading_err_deg": round(med("heading_err_deg"), 2),
        "s_per_scene": round(float(np.median([r["seconds"] for r in rows])), 3) if n else 0.0,
    }


def evaluate_scenes(
    geo: Georeferencer,
    scenes_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None,
    methods: tuple[str, ...] = ("independent", "verify"),
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    gsd_factor: float = 1.0,
) -> dict[str, Any]:
    """Run every method on every scene of ``scenes_dir``; write the table into ``out`` (when
    given); returns ``{"rows": [...], "per_scene": [...], "meta": ...}``. ``gsd_factor``:
    the GSD handed to georef is the true one times this (a user's pixel size that is a few
    percent off; the truth is unchanged)."""
    scenes = list_scenes(scenes_dir)
    per_scene: list[dict[str, Any]] = []
    crs = geo.localizer.index.crs
    if geo.aligner is not None and getattr(geo.localizer.refiner, "feature_mosaic", None) is not None:
        geo.feature_mosaic()  # the map's dense descriptors: loading, not per-scene work
    for path, truth in tqdm(scenes, desc="georef scenes", unit="scene", disable=not progress, file=sys.stderr):
        scene = read_scene(path, gsd_m=float(truth["gsd_m"]) * gsd_factor, map_crs=crs)
        answers = geo.locate(scene, methods=methods)
        for m in methods:
            r = score_answer(answers[m], truth, scene.width, scene.height)
            r.update({"scene": path.name, "true_heading_deg": float(truth.get("heading_deg", 0.0))})
            per_scene.append(r)
    rows = [summarise(per_scene, m) for m in methods]
    record = {"meta": {**(meta or {}), "scenes": str(scenes_dir), "n_refs": int(geo.localizer.index.ntotal),
                       "embedder_sha256": geo.localizer.checkpoint_sha256,
                       "decision_rule": geo.decision_source, "rotation_range_deg": geo.settings.rotation_range_deg,
                       "answering": _answering(geo),
                       # the placement's last step (refine.scene_polish): positions depend on it, decisions do not
                       "scene_polish": ({"mode": geo.polish_mode, "radius_m": geo.polish_m, "min_peak": geo.polish_min_peak}
                                        if geo.polisher is not None else None),
                       "gsd_factor": gsd_factor,
                       # s_per_scene depends on these; whether another job shared the cores is not known here
                       "torch_threads": torch.get_num_threads()},
              "rows": rows, "per_scene": per_scene}
    if out is not None:
        _write_report(Path(out), record)
    return record


def _answering(geo: Georeferencer) -> dict[str, Any]:
    """The settings that shape a report's answers (not the decision): candidates per tile and tiling."""
    s = geo.settings
    return {"top_k": s.top_k, "min_scene_tiles": s.min_scene_tiles, "max_dense_tiles": s.max_dense_tiles, "tile_stride_frac": s.tile_stride_frac,
            "gnn_top_k": (geo.gnn_settings or s).top_k, "dense_search": s.dense_search}


def _report_answering(meta: dict[str, Any]) -> dict[str, Any]:
    """:func:`_answering` of a report; reports from before it was recorded: from the
    decision rule they were made with (tiling then had no dense mode)."""
    if "answering" in meta:
        return meta["answering"]
    rule = meta.get("decision_rule") or {}
    top = int(rule.get("top_k", 20))
    return {"top_k": top, "min_scene_tiles": int(rule.get("min_scene_tiles", 0)), "max_dense_tiles": int(rule.get("max_dense_tiles", 0)), "tile_stride_frac": 1.0,
            "gnn_top_k": int((rule.get("gnn+verify") or {}).get("top_k", top)), "dense_search": 0}


def redecide_scenes(geo: Georeferencer, report: str | os.PathLike[str], out: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Apply ``geo``'s decision (its verify / gnn+verify settings) to the answers of an
    earlier ``cmpc eval scenes`` report without answering the scenes again, and write the
    table like :func:`evaluate_scenes`. Exact: the placement and its evidence (agreeing tiles,
    dense peak) do not depend on the decision, only the status and confidence do. Refused
    (:class:`DataError`) when the report was answered with other candidates per tile or
    another tiling of its scenes, whose evidence would differ. ``s_per_scene`` stays the
    report's (deciding takes microseconds)."""
    from cmpc.localize.georef import decide
    from cmpc.localize.scene import SceneSettings

    rep = Path(report)
    p = rep / "rows.json"
    if not p.is_file():
        raise DataError(f"{p} not found: --redecide takes a folder written by `cmpc eval scenes`")
    old = json.loads(p.read_text(encoding="utf-8"))
    meta, per_old = old["meta"], old["per_scene"]
    rule_old = meta.get("decision_rule") or {}
    if abs(float(meta.get("rotation_range_deg", 0.0)) - geo.settings.rotation_range_deg) > 1e-9:
        raise DataError(f"{rep} searched headings within +-{float(meta.get('rotation_range_deg', 0.0)):g} deg, this run +-{geo.settings.rotation_range_deg:g}: "
                        "give the same --rotation-range")
    was, now = _report_answering(meta), _answering(geo)
    for key in ("top_k", "gnn_top_k"):
        if int(was[key]) != int(now[key]):
            raise DataError(f"{rep} was answered with top-{was[key]} candidates per tile, this decision uses {now[key]}: run `cmpc eval scenes` again")
    tiling_was = SceneSettings(tile_stride_frac=float(was["tile_stride_frac"]), min_scene_tiles=int(was["min_scene_tiles"]),
                               max_dense_tiles=int(was.get("max_dense_tiles", 0)), rotation_range_deg=float(meta.get("rotation_range_deg", 0.0)),
                               rotation_step_deg=geo.settings.rotation_step_deg)
    scenes = {path.name: truth for path, truth in list_scenes(meta["scenes"])}
    for name, truth in scenes.items():
        c = np.asarray(truth["corners_xy"], dtype=np.float64)
        w_m, h_m = float(np.linalg.norm(c[1] - c[0])), float(np.linalg.norm(c[3] - c[0]))
        if abs(tiling_was.tile_stride_m(w_m, h_m, geo.tile_m, geo.stride_m) - geo.settings.tile_stride_m(w_m, h_m, geo.tile_m, geo.stride_m)) > 1e-6:
            raise DataError(f"{rep} tiled {name} at another spacing than this decision's tiling (min_scene_tiles): run `cmpc eval scenes` again")
    if int(was.get("dense_search", 0)) != int(now["dense_search"]):
        raise DataError(f"{rep} was answered with dense_search {was.get('dense_search', 0)}, this decision uses {now['dense_search']}: run `cmpc eval scenes` again")
    per_scene = []
    for r in per_old:
        r = dict(r)
        s = geo.settings if r["method"] == "verify" else (geo.gnn_settings or geo.settings) if r["method"] == "gnn+verify" else None
        if s is not None and np.isfinite(float(r["centre_m"])) and r.get("tiles"):
            peak = float(r.get("fine_peak", float("nan")))
            margin = float(r.get("peak_margin", float("nan")))
            ok, _, conf = decide(s, int(r["inliers"]), int(r["tiles"]), peak if np.isfinite(peak) else None, margin if np.isfinite(margin) else None)
            r["status"], r["confidence"] = ("found" if ok else "not_found"), conf
        per_scene.append(r)
    methods = list(dict.fromkeys(r["method"] for r in per_scene))
    rows = []
    for m in methods:
        row = summarise(per_scene, m)
        row["s_per_scene"] = next((x["s_per_scene"] for x in old["rows"] if x["method"] == m), row["s_per_scene"])
        rows.append(row)
    record = {"meta": {**meta, "decision_rule": geo.decision_source, "answering": now, "redecided_from": {"report": str(rep), "decision_rule": rule_old}},
              "rows": rows, "per_scene": per_scene}
    if out is not None:
        _write_report(Path(out), record)
    return record


def _write_report(out: Path, record: dict[str, Any]) -> None:
    per_scene = record["per_scene"]
    with atomic_dir(out) as tmp:
        atomic_write_json(tmp / "rows.json", record)
        with open(tmp / "scenes.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(per_scene[0]))
            w.writeheader()
            w.writerows(per_scene)
        atomic_write_text(tmp / "table.md", table_markdown(record["rows"]))


def table_markdown(rows: list[dict[str, Any]], extra_cols: tuple[str, ...] = ()) -> str:
    """A markdown table of summary rows."""
    cols = [*extra_cols, "method", "n_scenes", "success_5m", "success_25m", "not_found", "false_claims", "median_m", "corner_m", "heading_err_deg", "s_per_scene"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def scene_demo(
    exp,  # noqa: ANN001 - cmpc.config.Experiment
    out_dir: str | os.PathLike[str],
    tiles: int = 3,
    count: int = 3,
    seed: int = 0,
    index_dir: str | os.PathLike[str] | None = None,
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """The demo's scene step: cut ``count`` scenes of ``tiles`` x ``tiles`` from the test
    area, georeference them (verify) and draw ``scenes.png`` (each SAR scene over the optical
    map at the found position, the true footprint outlined) plus ``scenes.json`` into
    ``out_dir``. Returns the summary row and per-scene results."""
    import tempfile

    from matplotlib.figure import Figure

    from cmpc.data.scenes import cut_scenes, world_sar
    from cmpc.localize.georef import georeferencer_from_experiment, write_overlay

    with tempfile.TemporaryDirectory(prefix="cmpc-scenes-") as td:
        folder = Path(td) / "cut"
        # cut first: a test area too small for the scenes stops here, before models load
        cut_scenes(world_sar(exp.synth.out, exp.data.root), exp.data.root, folder, "test", tiles, count, 0.0, seed, bands=exp.localize.raster_bands)
        geo = georeferencer_from_experiment(exp, checkpoint=checkpoint, index_dir=index_dir)
        scenes = list_scenes(folder)
        fig = Figure(figsize=(4.2 * count, 4.4), dpi=100)
        per_scene = []
        for i, (path, truth) in enumerate(scenes):
            scene = read_scene(path, gsd_m=float(truth["gsd_m"]), map_crs=geo.localizer.index.crs)
            ans = geo.locate(scene, methods=("verify",))["verify"]
            r = score_answer(ans, truth, scene.width, scene.height)
            r["scene"] = path.name
            per_scene.append(r)
            ax = fig.add_subplot(1, count, i + 1)
            if ans.transform is not None:
                err = f"{r['centre_m']:.1f} m" if np.isfinite(r["centre_m"]) else "?"
                write_overlay(Path(td) / "x.png", geo, scene, ans.transform, SceneTransform.from_affine(truth["transform"]),
                              title=f"{path.stem}: {ans.status}, {ans.inlier_tiles}/{ans.n_tiles} tiles agree, centre error {err}", ax=ax)
        fig.tight_layout()
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        from cmpc.utils.io import atomic_path

        with atomic_path(Path(out_dir) / "scenes.png") as tmp:
            fig.savefig(tmp, format="png")
    row = summarise(per_scene, "verify")
    rec = {"tiles": tiles, "rows": [row], "per_scene": per_scene, "decision_rule": geo.decision_source}
    atomic_write_json(Path(out_dir) / "scenes.json", rec)
    return rec
