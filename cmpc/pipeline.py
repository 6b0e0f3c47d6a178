"""The main job end to end (``cmpc demo`` / ``make demo``).

synthetic world -> CMPC dataset -> embedder -> refiner -> index -> evaluation -> report.

Each step is skipped when its output already exists for the same configuration, so a second
``make demo`` only re-evaluates, and an interrupted demo resumes where it stopped (training
resumes from its last checkpoint). ``--fresh`` redoes everything.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from cmpc.config import Experiment
from cmpc.utils.io import atomic_path, atomic_write_json, atomic_write_text


def _log(msg: str) -> None:
    print(f"[cmpc demo] {msg}", file=sys.stderr, flush=True)


def _same(path: Path, key: str, want: dict[str, Any]) -> bool:
    """True when the JSON file at ``path`` records ``want`` under ``key``."""
    if not path.is_file():
        return False
    try:
        got = json.loads(path.read_text(encoding="utf-8")).get(key)
    except (json.JSONDecodeError, AttributeError):
        return False
    return got == want


class _Steps:
    """Runs named steps, recording wall-clock seconds (what the report shows)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, func: Callable[[], Any], skip: bool = False, why: str = "") -> Any:
        if skip:
            _log(f"{name}: up to date ({why})")
            self.seconds[name] = 0.0
            return None
        _log(f"{name} ...")
        t0 = time.perf_counter()
        out = func()
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        _log(f"{name}: {self.seconds[name]:.1f} s")
        return out


def run_demo(exp: Experiment, fresh: bool = False) -> dict[str, Any]:
    """Run every step of the pipeline for ``exp``; returns the metrics dict."""
    from cmpc.data.synth import generate_world
    from cmpc.data.tiler import tile_dataset
    from cmpc.evaluate.run import evaluate
    from cmpc.index.build import ensure_index, ensure_train_index
    from cmpc.train.emb import train_embedder
    from cmpc.translate.augment import training_views
    from cmpc.utils.runtime import configure_embedder_training, set_torch_threads

    t_start = time.perf_counter()
    if fresh:
        for p in (Path(exp.synth.out), Path(exp.data.root), exp.run_dir, exp.index_dir, exp.report_dir):
            if p.exists():
                shutil.rmtree(p)
    steps = _Steps()
    world_json = Path(exp.synth.out) / "world.json"
    synth_cfg = dataclasses.asdict(exp.synth)
    world_ok = _same(world_json, "config", synth_cfg)
    steps.run("synthetic world", lambda: generate_world(exp.synth), skip=world_ok, why=str(world_json))

    tile_cfg = dataclasses.asdict(exp.tile)
    ds_ok = world_ok and _same(Path(exp.data.root) / "dataset.json", "tile_config", tile_cfg)
    steps.run("tile dataset", lambda: tile_dataset(exp), skip=ds_ok, why=exp.data.root)
    if not ds_ok and exp.run_dir.exists():
        # A new dataset invalidates the models trained on the old one.
        shutil.rmtree(exp.run_dir)

    exp.run_dir.mkdir(parents=True, exist_ok=True)
    exp.save(exp.run_dir / "config.json")
    configure_embedder_training(exp.train.threads, exp.train.device)  # threads (and allocator) for training and the steps after
    ckpt = steps.run("train embedder", lambda: train_embedder(exp, views=training_views(exp)))
    if exp.refine.enabled:
        from cmpc.train.refine import train_refiner

        set_torch_threads(exp.train.threads)
        # the refiner trains on the training map: the index step builds it first (when missing or stale)
        steps.run("train refiner", lambda: train_refiner(exp, ensure_train_index(exp).directory))
    checkpoint = str(ckpt) if ckpt else None
    index = steps.run("build index", lambda: ensure_index(exp, checkpoint))
    metrics = steps.run("evaluate", lambda: evaluate(exp, index.directory, checkpoint=checkpoint))
    scenes = steps.run("georef scenes", lambda: _scene_step(exp, index.directory, checkpoint)) if exp.refine.enabled else None
    total = round(time.perf_counter() - t_start, 1)
    _write_report(exp, metrics, steps.seconds, total, scenes)
    _log(f"done in {total:.0f} s; report: {exp.report_dir}/README.md")
    return metrics


def _scene_step(exp: Experiment, index_dir: Path, checkpoint: str | None) -> dict[str, Any] | None:
    """A few 3x3-tile scenes cut from the test area, georeferenced (``cmpc georef``'s verify
    method) and drawn over the map into reports/<name>/scenes.png; None (logged) when the
    test area is too small for them."""
    from cmpc.errors import CmpcError
    from cmpc.evaluate.scenes import scene_demo

    try:
        return scene_demo(exp, exp.report_dir, tiles=3, count=3, seed=0, index_dir=index_dir, checkpoint=checkpoint)
    except CmpcError as e:
        _log(f"georef scenes: skipped ({e})")
        return None


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _write_report(exp: Experiment, metrics: dict[str, Any], seconds: dict[str, float], total: float, scenes: dict[str, Any] | None = None) -> None:
    """reports/<name>/README.md: what ran, how long each step took, the headline numbers.

    Beside the evaluation's files, in ``exp.report_dir``: the folder follows the experiment
    name (``--set name=X`` writes reports/X) unless ``eval.out`` is set explicitly.
    """
    from cmpc.localize.georef import describe_decision
    out = exp.report_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "timings.json", {"steps_s": seconds, "total_s": total, "machine": _machine()})
    preview = Path(exp.synth.out) / "preview.png"
    if preview.is_file():
        with atomic_path(out / "world_preview.png") as tmp:
            shutil.copyfile(preview, tmp)
    lines = [
        f"# cmpc demo report: {exp.name}",
        "",
        f"Data: synthetic world seed {exp.synth.seed}, {exp.synth.size_m:.0f} m at {exp.synth.gsd_m} m/px; "
        f"dataset {exp.data.root} ({exp.tile.split}, {exp.tile.patch_px} px patches); "
        f"test split queries against the test reference map.",
        f"Model: {exp.model.backbone}, D={exp.model.embed_dim}, input {exp.data.img_size} px; "
        f"checkpoint {metrics.get('meta', {}).get('checkpoint', '?')}.",
        f"Machine: {_machine()}. Total {total:.0f} s.",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in seconds.items()],
        "",
        "| query set | n | stage | R@1 | R@5 | R@10 | mAP | median err (m) | within 5 m | within 25 m |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for qset, block in metrics.items():
        if qset == "meta" or not isinstance(block, dict) or "coarse" not in block:
            continue
        for stage in ("coarse", "refined"):
            m = block.get(stage)
            if not m:
                continue
            r = m["recall"]
            e = m["error_m"]
            lines.append(
                f"| {qset} | {block['n_queries']} | {stage} | {_fmt(r.get('1'))} | {_fmt(r.get('5'))} | "
                f"{_fmt(r.get('10'))} | {_fmt(m['mAP'])} | {_fmt(e['median'])} | {_fmt(e['within'].get('5'))} | "
                f"{_fmt(e['within'].get('25'))} |"
            )
    lines += ["", "Plots: cmc.png, error_cdf.png, retrieval_grid.png, error_map.png; numbers: metrics.json.", ""]
    if scenes:
        per = scenes["per_scene"]
        lines += [
            f"## Scene georeferencing ({scenes['tiles']}x{scenes['tiles']}-tile scenes cut from the test area, no georeferencing given)",
            "",
            "| scene | status | tiles agreeing | centre error (m) | heading error (deg) | seconds |",
            "|---|---|---|---|---|---|",
            *[f"| {r['scene']} | {r['status']} | {r['inliers']}/{r['tiles']} | {_fmt(r['centre_m'])} | {_fmt(r['heading_err_deg'])} | {_fmt(r['seconds'])} |" for r in per],
            "",
            f"Decision: {describe_decision(scenes['decision_rule'])}. Picture: scenes.png (SAR over the optical map at the found position, "
            "found footprint red, true footprint green); `cmpc georef EXP --scene SCENE.tif --gsd M` does one scene.",
            "",
            "<img src=\"scenes.png\" width=\"900\">",
            "",
        ]
    atomic_write_text(out / "README.md", "\n".join(lines))


def _machine() -> str:
    import os

    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()} {os.cpu_count()} cores, {dev}, Python {platform.python_version()}, torch {torch.__version__}"
