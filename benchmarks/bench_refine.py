"""Refinement latency per query: candidate graphs + GNN + fine alignment, beside the coarse search.

Full run: the experiment in ``CMPC_BENCH_REFINE_EXP`` (default experiments/demo.json; it needs
its embedder, test index and refiner: ``make demo``). Its Localizer (embedder + index +
refiner) localizes the test SAR queries of its dataset; for single queries (batch 1: the
latency one user sees) and batches of 64 (the throughput of ``cmpc localize``), and for
``refine.fine_top`` = 3, 10 and 20 (how many candidates fine alignment verifies), each step
is timed per query:

- coarse (the baseline, measured in the same run): embedding + FAISS search;
- refine: candidate graphs, GNN, SAR dense descriptors, correlation + peak.

The one-off cost of the map's dense optical descriptors (built on first use, cached in the
index folder) is reported separately. Medians of 3 runs. One torch thread (the machine is
shared: two threads on two busy cores thrash).

``--quick``: a 512 m synthetic world at 2 m/px, an untrained embedder and an untrained
refiner (the latency does not depend on the weights), seconds to set up.

Standalone: ``python -m benchmarks.bench_refine [EXPERIMENT.json] [--set k=v ...]`` prints rows.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.harness import median, table

BENCH = "refine"
TITLE = "Refinement latency per query (graph, GNN, fine alignment) beside the coarse search"
STEPS = ("graph_s", "gnn_s", "align_desc_s", "align_corr_s")
FINE_TOP = (3, 10, 20)


def _time_batches(loc, x: torch.Tensor, batch: int) -> dict[str, float]:  # noqa: ANN001 - Localizer
    """Milliseconds per query of each step over all of ``x`` in batches of ``batch``."""
    ref = loc.refiner
    for k in list(ref.timings):
        ref.timings[k] = 0.0
    coarse = refine = 0.0
    for s in range(0, len(x), batch):
        xb = x[s : s + batch]
        t0 = time.perf_counter()
        loc.refiner = None
        res = loc.localize_batch(xb)  # embedding + search only
        coarse += time.perf_counter() - t0
        loc.refiner = ref
        t0 = time.perf_counter()
        ref.refine(res.query_emb, res.rows, res.scores, loc.index, xb)
        refine += time.perf_counter() - t0
    n = len(x) / 1e3
    out = {"coarse_ms": coarse / n, "refine_ms": refine / n}
    for k in STEPS:
        out[k[:-2] + "_ms"] = ref.timings.get(k, 0.0) / n
    return out


def measure(exp_path: str | Path, overrides: list[str] | None = None, n_queries: int = 217, runs: int = 3) -> list[dict[str, Any]]:
    """Rows (one per batch size and fine_top) for the experiment's test queries."""
    from cmpc.config import load_experiment
    from cmpc.data.patches import PatchDataset
    from cmpc.localize.localizer import Localizer

    exp = load_experiment(exp_path, overrides)
    loc = Localizer.from_experiment(exp)
    if loc.refiner is None:
        raise RuntimeError(f"no refiner for {exp.name}: train it first (cmpc train refine {exp_path})")
    ds = PatchDataset(exp.data.root, "test", "sar", loc.img_size or exp.data.img_size)
    idx = [i for i, a in enumerate(ds.annotations) if not a.aligned][:n_queries] or list(range(min(n_queries, len(ds))))
    x = torch.stack([ds[i][0] for i in idx])
    mosaic_s, cached = 0.0, None
    if loc.refiner.aligner is not None and exp.refine.fine_align:
        cached = any(Path(loc.index.directory).glob("align_features*.pt"))
        t0 = time.perf_counter()
        loc.refiner.feature_mosaic(loc.index, loc.refiner.footprint_m(loc.index) / x.shape[-1])
        mosaic_s = time.perf_counter() - t0
    _time_batches(loc, x[:8], 8)  # warm-up (allocators, FFT plans)
    rows = []
    for fine_top in FINE_TOP:
        loc.refiner.cfg.fine_top = fine_top
        for batch in (1, 64):
            xs = x[: min(len(x), 32)] if batch == 1 else x
            per_run = [_time_batches(loc, xs, batch) for _ in range(runs)]
            row: dict[str, Any] = {"bench": BENCH, "experiment": str(exp_path), "overrides": list(overrides or []),
                                   "references": int(loc.index.ntotal), "queries": len(xs), "query_px": int(x.shape[-1]),
                                   "k": loc.refiner.k, "top_k": loc.top_k, "fine_top": fine_top, "batch": batch, "runs": runs,
                                   "threads": torch.get_num_threads(), "map_descriptors_s": round(mosaic_s, 2),
                                   "map_descriptors_from_cache": cached}
            for key in per_run[0]:
                row[key] = round(median(r[key] for r in per_run), 3)
            rows.append(row)
    return rows


def _setup_quick(tmp: Path) -> Path:
    """A 512 m world at 2 m/px tiled into a dataset, untrained embedder and refiner, test index."""
    from cmpc.config import ModelConfig, RefineConfig, load_experiment
    from cmpc.data.synth import generate_world
    from cmpc.data.tiler import tile_dataset
    from cmpc.index.build import build_index
    from cmpc.localize.refine import refiner_payload, save_refiner
    from cmpc.models.checkpoint import embedder_payload, save_checkpoint
    from cmpc.models.descriptor import DenseDescriptor
    from cmpc.models.embedder import build_embedder
    from cmpc.models.refiner import SceneGraphRefiner
    from cmpc.utils.provenance import record

    exp_path = tmp / "exp.json"
    exp_path.write_text(json.dumps({
        "name": "bench_refine_quick", "runs_dir": str(tmp / "runs"), "train": {"device": "cpu"},
        "synth": {"out": str(tmp / "world"), "size_m": 512, "gsd_m": 2.0, "seed": 5},
        "tile": {"patch_px": 32, "split": "cross-area", "test_fraction": 0.5},
        "data": {"root": str(tmp / "dataset"), "img_size": 32}, "model": {"embed_dim": 64},
        "index": {"name": "bench_refine_quick", "factory": "Flat"}, "localize": {"top_k": 20},
        "refine": {"k": 10}, "eval": {"plots": False},
    }))
    exp = load_experiment(exp_path)
    generate_world(exp.synth, preview=False)
    tile_dataset(exp)
    torch.manual_seed(0)
    model = build_embedder(ModelConfig(backbone="mobilenetv3_small_050", embed_dim=64, stem_channels=8), 1, 3).eval()
    exp.run_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(exp.run_dir / "emb_best.pt", embedder_payload(model, 32))
    rc = RefineConfig(k=10)
    save_refiner(exp.run_dir / "refiner.pt", refiner_payload(SceneGraphRefiner(64, rc.hidden, rc.layers, rc.heads), DenseDescriptor(1, 3).eval(),
                                                              rc, 10, 64, {"align_min_peak": -1.0},
                                                              inputs={"embedder": record(exp.run_dir / "emb_best.pt")}))
    build_index(exp)
    return exp_path


def run(quick: bool) -> list[dict[str, Any]]:
    from cmpc.utils.runtime import set_threads

    set_threads(1)
    if not quick:
        return measure(os.environ.get("CMPC_BENCH_REFINE_EXP", "experiments/demo.json"))
    old = Path.cwd()
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td).resolve()
        os.chdir(tmp)  # index/ is relative to the working directory
        try:
            return measure(_setup_quick(tmp), n_queries=128, runs=1)
        finally:
            os.chdir(old)


def render(rows: list[dict[str, Any]]) -> str:
    r0 = rows[0]
    return "\n".join([
        f"{r0['queries']} test SAR queries ({r0['query_px']} px) of `{r0['experiment']}`"
        f"{' with ' + ', '.join(r0['overrides']) if r0['overrides'] else ''} against {r0['references']} references, "
        f"top-{r0['top_k']}, GNN over k = {r0['k']}; {r0['threads']} torch thread, median of {r0['runs']} runs, "
        "milliseconds per query. `coarse` (embedding + FAISS search) is the baseline measured in the same run; "
        "`refine` is what refinement adds (graph + GNN + SAR descriptors + correlation/peak over `fine_top` candidates).",
        "",
        table(rows, [("fine_top", "fine_top"), ("batch", "batch"), ("coarse_ms", "coarse"), ("refine_ms", "refine"),
                     ("graph_ms", "graph"), ("gnn_ms", "GNN"), ("align_desc_ms", "SAR descriptors"), ("align_corr_ms", "correlation + peak")]),
        "",
        f"One-off per map: dense optical descriptors of the reference map {r0['map_descriptors_s']:.1f} s "
        f"({'read from the cache' if r0['map_descriptors_from_cache'] else 'computed'}; kept in the index folder as "
        "`align_features_<gsd>m.pt`).",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment", nargs="?", default="experiments/demo.json")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args(argv)
    from cmpc.utils.runtime import set_threads

    set_threads(1)
    rows = measure(a.experiment, a.set, runs=a.runs)
    print(render(rows))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
