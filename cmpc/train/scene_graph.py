"""``cmpc train scene`` (first step): train the scene-graph GNN on TRAINING-area scenes.

Scenes are cut from the training split's area (:func:`cmpc.data.scenes.cut_scenes`,
``split="train"``; sizes ``tiles``, heading ranges 0 and +-15 deg), tiled and searched
against the training map (``index/<name>-train``) exactly as ``cmpc georef`` does; each
(tile, candidate) is labelled positive when the candidate's reference centre lies within one
reference stride of the tile's true centre. The area is split by northing: scenes lying
wholly in the southern ``val_frac`` of the training area are the validation scenes (epoch
choice and, in :mod:`cmpc.train.scene`, the method choice); scenes wholly north of it (plus a
one-stride buffer) train the GNN; straddling scenes are dropped.

The epoch kept is the one with the highest validation tile top-1 precision (fraction of
tiles whose first candidate after rescoring is a positive; ties: lower validation loss).
Writes ``runs/<name>/scene_graph.pt`` (weights-only plain data, ``inputs.embedder``,
``inputs.index``) and ``runs/<name>/scene_graph_log.json``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cmpc.data.scenes import SceneSource
from cmpc.evaluate.scenes import list_scenes
from cmpc.localize.georef import SCENE_GRAPH_FILE, Georeferencer
from cmpc.localize.localizer import Localizer
from cmpc.localize.scene import SceneSettings, read_scene, scene_candidates
from cmpc.localize.verify import SceneTransform
from cmpc.models.scene_graph import SceneGraph, SceneGraphNet, batch_graphs, build_scene_graph, save_scene_graph
from cmpc.utils import provenance
from cmpc.utils.io import atomic_write_json


def scene_graph_example(geo: Georeferencer, path: Path, truth: dict[str, Any], max_disc: float = 1.5) -> SceneGraph:
    """The labelled graph of one cut scene (its candidates as ``cmpc georef`` finds them)."""
    scene = read_scene(path, gsd_m=float(truth["gsd_m"]), map_crs=geo.localizer.index.crs)
    tiles = geo.tiles(scene)
    cand = scene_candidates(geo.localizer, tiles, geo.settings.top_k, None, None, geo.settings.batch_size)
    true_xy = SceneTransform.from_affine(truth["transform"]).apply(tiles.centre_px)
    labels = np.linalg.norm(cand.positions_m - true_xy[:, None, :], axis=-1) <= geo.stride_m
    return build_scene_graph(tiles.grid_rc, tiles.heading_deg, cand.scores, cand.positions_m, geo.stride_m, max_disc, labels)


def _ys(truth: dict[str, Any]) -> tuple[float, float]:
    ys = [c[1] for c in truth["corners_xy"]]
    return float(min(ys)), float(max(ys))


def _metrics(model: SceneGraphNet, graphs: list[SceneGraph], pos_weight: torch.Tensor) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        x, ei, ea, y = batch_graphs(graphs)
        logit = model(x, ei, ea)
        loss = float(F.binary_cross_entropy_with_logits(logit, y, pos_weight=pos_weight))
    hits, coarse, n = 0, 0, 0
    off = 0
    for g in graphs:
        T, k = g.shape
        lg = logit[off : off + T * k].reshape(T, k)
        yy = g.y.reshape(T, k)
        off += T * k
        hits += int(yy[torch.arange(T), lg.argmax(1)].sum())
        coarse += int(yy[:, 0].sum())
        n += T
    return {"loss": round(loss, 5), "top1": round(hits / max(n, 1), 4), "coarse_top1": round(coarse / max(n, 1), 4), "tiles": n}


def train_scene_graph(
    exp,  # noqa: ANN001 - cmpc.config.Experiment
    train_index_dir: str | Path,
    tiles: tuple[int, ...] = (2, 3, 4),
    count: int = 40,
    heading_ranges: tuple[float, ...] = (0.0, 15.0),
    seed: int = 2000,
    epochs: int = 40,
    hidden: int = 32,
    layers: int = 3,
    lr: float = 3e-3,
    batch: int = 8,
    val_frac: float = 0.25,
    max_disc: float = 1.5,
    checkpoint: str | None = None,
    keep_val: Path | None = None,
    source: SceneSource | None = None,
    out_dir: str | Path | None = None,
    top_k: int = SceneSettings.top_k,
) -> dict[str, Any]:
    """Cut, label, train, keep the best validation epoch (module doc). ``keep_val``: copy
    the validation scenes there (for the method choice); ``source``: where the scenes are
    cut (default the experiment's training area); ``out_dir``: where scene_graph.pt and its
    log go (default ``runs/<name>``). Returns the log record."""
    from cmpc.models.checkpoint import default_checkpoint

    t_start = time.perf_counter()
    torch.manual_seed(seed)
    out_dir = Path(out_dir) if out_dir is not None else Path(exp.run_dir)
    work = out_dir / "scene_graph_data"
    loc = Localizer.from_experiment(exp, checkpoint=checkpoint, index_dir=train_index_dir)
    source = source or SceneSource.of_experiment(exp)
    box = source.boxes
    y0 = min(b[1] for b in box)
    y1 = max(b[3] for b in box)
    y_val = y0 + val_frac * (y1 - y0)
    train_g: list[SceneGraph] = []
    val_g: list[SceneGraph] = []
    counts = {"train_scenes": 0, "val_scenes": 0, "dropped_straddling": 0}
    try:
        i = 0
        for hr in heading_ranges:
            geo = Georeferencer(loc, SceneSettings(rotation_range_deg=float(hr), top_k=top_k))
            for n in tiles:
                folder = work / f"train_{n}x{n}_h{hr:g}"
                source.cut(exp.data.root, folder, "train", n, count, float(hr), seed + i)
                i += 1
                for path, truth in list_scenes(folder):
                    lo, hi = _ys(truth)
                    if hi <= y_val:
                        val_g.append(scene_graph_example(geo, path, truth, max_disc))
                        counts["val_scenes"] += 1
                        if keep_val is not None:
                            dst = Path(keep_val) / f"{n}x{n}_h{hr:g}"
                            dst.mkdir(parents=True, exist_ok=True)
                            shutil.copy(path, dst / path.name)
                            shutil.copy(path.with_name(path.stem + ".truth.json"), dst / (path.stem + ".truth.json"))
                    elif lo >= y_val + geo.stride_m:
                        train_g.append(scene_graph_example(geo, path, truth, max_disc))
                        counts["train_scenes"] += 1
                    else:
                        counts["dropped_straddling"] += 1
        stride_m = geo.stride_m
    finally:
        shutil.rmtree(work, ignore_errors=True)
    t_data = time.perf_counter() - t_start
    y_all = torch.cat([g.y for g in train_g])
    pos_weight = torch.tensor(float((1 - y_all).sum() / max(float(y_all.sum()), 1.0)))
    model = SceneGraphNet(hidden, layers)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    history, best, best_state = [], None, None
    for ep in range(1, epochs + 1):
        model.train()
        order = rng.permutation(len(train_g))
        tot = 0.0
        for s in range(0, len(order), batch):
            x, ei, ea, y = batch_graphs([train_g[j] for j in order[s : s + batch]])
            loss = F.binary_cross_entropy_with_logits(model(x, ei, ea), y, pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += float(loss.detach())
        m = _metrics(model, val_g, pos_weight) if val_g else {"loss": tot, "top1": 0.0}
        history.append({"epoch": ep, "train_loss": round(tot / max(1, -(-len(order) // batch)), 5), **{f"val_{k}": v for k, v in m.items()}})
        key = (m["top1"], -m["loss"])
        if best is None or key > best:
            best, best_state = key, ({k: v.detach().clone() for k, v in model.state_dict().items()}, ep)
    assert best_state is not None
    model.load_state_dict(best_state[0])
    t_all = time.perf_counter() - t_start
    emb = provenance.record(default_checkpoint(exp.run_dir, checkpoint))
    rec = {
        "model": {"hidden": hidden, "layers": layers, "max_disc": max_disc, "params": sum(p.numel() for p in model.parameters())},
        "data": {"split": "train", "source": source.label, "top_k": int(top_k), "index": str(train_index_dir), "tiles": list(tiles), "scenes_per_setting": count,
                 "heading_ranges_deg": list(heading_ranges), "seed": seed, "val_frac_south": val_frac, "y_val_max": y_val,
                 "stride_m": stride_m, "positive": "candidate within one stride of the tile's true centre",
                 "train_nodes": int(len(y_all)), "train_positives": int(y_all.sum()), **counts},
        "best_epoch": best_state[1], "epochs": epochs, "val_at_best": history[best_state[1] - 1],
        "seconds": {"data": round(t_data, 1), "total": round(t_all, 1)}, "history": history,
    }
    index_manifest = Path(train_index_dir) / "manifest.json"
    save_scene_graph(out_dir / SCENE_GRAPH_FILE, model, emb,
                     {"max_disc": max_disc, "best_epoch": best_state[1],
                      "inputs_index": provenance.record(index_manifest) if index_manifest.is_file() else None})
    atomic_write_json(out_dir / "scene_graph_log.json", rec)
    return rec
