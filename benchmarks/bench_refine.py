"""Refinement latency per query: graph + GNN + fine alignment, beside the coarse search.

``python -m benchmarks.bench_refine [EXPERIMENT.json] [--runs N] [--queries N]`` (default
experiments/demo.json; needs its embedder, test index and refiner: ``make demo`` first).

Loads the experiment's Localizer (embedder + index + refiner), reads test SAR queries and
times, over ``--runs`` repetitions, each step per query, for single queries (batch 1: the
latency a user sees) and for batches of 64 (the throughput of ``cmpc localize``):

- coarse: embedding + FAISS search (the baseline, measured in the same run);
- refine: candidate graphs, GNN, SAR dense descriptors, correlation + peak refinement.

The one-off cost of the map's dense optical descriptors (built on first use, cached in the
index folder) is reported separately. Medians over runs; the machine and its load average
are recorded because timings on a shared CPU are noisy. Writes its section of
docs/BENCHMARKS.md (between ``<!-- bench_refine -->`` markers) and ``docs/bench_refine.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

START = "<!-- bench_refine:start -->"
END = "<!-- bench_refine:end -->"
STEPS = ("graph_s", "gnn_s", "align_desc_s", "align_corr_s")


def machine() -> dict[str, Any]:
    """CPU model, cores, torch threads, load average (the CPU is shared: say how busy it was)."""
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def _time_batches(loc, x: torch.Tensor, batch: int) -> dict[str, float]:  # noqa: ANN001 - Localizer
    """Seconds per query of each step over all of ``x`` in batches of ``batch``."""
    ref = loc.refiner
    saved = loc.refiner
    for k in list(ref.timings):
        ref.timings[k] = 0.0
    coarse = 0.0
    refine = 0.0
    n = len(x)
    for s in range(0, n, batch):
        xb = x[s : s + batch]
        t0 = time.perf_counter()
        loc.refiner = None
        res = loc.localize_batch(xb)  # embedding + search only
        coarse += time.perf_counter() - t0
        loc.refiner = saved
        t0 = time.perf_counter()
        ref.refine(res.query_emb, res.rows, res.scores, loc.index, xb)
        refine += time.perf_counter() - t0
    out = {"coarse": coarse / n, "refine": refine / n}
    for k in STEPS:
        out[k[:-2]] = ref.timings.get(k, 0.0) / n
    return out


def run(exp_path: str, runs: int, n_queries: int) -> dict[str, Any]:
    """Measure; returns the record written to docs/bench_refine.json."""
    from cmpc.config import load_experiment
    from cmpc.data.patches import PatchDataset
    from cmpc.localize.localizer import Localizer

    exp = load_experiment(exp_path)
    loc = Localizer.from_experiment(exp)
    if loc.refiner is None:
        raise SystemExit(f"no refiner for {exp.name}: train it first (cmpc train refine {exp_path})")
    ds = PatchDataset(exp.data.root, "test", "sar", loc.img_size or exp.data.img_size)
    idx = [i for i, a in enumerate(ds.annotations) if not a.aligned][:n_queries] or list(range(min(n_queries, len(ds))))
    x = torch.stack([ds[i][0] for i in idx])
    t0 = time.perf_counter()
    cached = None
    if loc.refiner.aligner is not None and exp.refine.fine_align:
        cached = any(Path(loc.index.directory).glob("align_features*.pt"))
        loc.refiner.feature_mosaic(loc.index, loc.refiner.footprint_m(loc.index) / x.shape[-1])
    mosaic_s = time.perf_counter() - t0
    _time_batches(loc, x[:8], 8)  # warm-up (allocators, first FFT plans)
    results: dict[str, dict[str, list[float]]] = {"batch 1": {}, "batch 64": {}}
    for _ in range(runs):
        for name, bs in (("batch 1", 1), ("batch 64", 64)):
            xs = x[: min(len(x), 64)] if bs == 1 else x
            for k, v in _time_batches(loc, xs, bs).items():
                results[name].setdefault(k, []).append(v * 1e3)
    med = {name: {k: round(statistics.median(v), 2) for k, v in r.items()} for name, r in results.items()}
    return {
        "experiment": exp_path,
        "index": str(loc.index.directory),
        "references": int(loc.index.ntotal),
        "queries": len(x),
        "runs": runs,
        "k": loc.refiner.k,
        "top_k": loc.top_k,
        "fine_top": exp.refine.fine_top,
        "fine_phases": exp.refine.fine_phases,
        "map_descriptors_s": round(mosaic_s, 2),
        "map_descriptors_from_cache": cached,
        "ms_per_query_median": med,
        "machine": machine(),
    }


def section(rec: dict[str, Any]) -> str:
    """The markdown section for docs/BENCHMARKS.md."""
    m = rec["machine"]
    lines = [
        START,
        "## Refinement latency (`benchmarks/bench_refine.py`)",
        "",
        f"{rec['queries']} test SAR queries of `{rec['experiment']}` against {rec['references']} references "
        f"(`{rec['index']}`), top-{rec['top_k']}, GNN over k={rec['k']}, fine alignment over {rec['fine_top']} candidates"
        f"{' with pixel-level phase refinement' if rec['fine_phases'] else ''}; median of {rec['runs']} runs, milliseconds per query.",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['torch_threads']} threads, "
        f"GPU: {m['gpu'] or 'none'}; 1-minute load average {m['load_avg_1m']} when measured "
        "(the CPU is shared with other jobs, so absolute times are noisy; compare within a row).",
        "",
        "| batch | coarse (embed + search) | refine total | graph | GNN | SAR descriptors | correlation + peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rec["ms_per_query_median"].items():
        lines.append(
            f"| {name} | {r['coarse']:.2f} | {r['refine']:.2f} | {r['graph']:.2f} | {r['gnn']:.2f} | {r['align_desc']:.2f} | {r['align_corr']:.2f} |"
        )
    lines += [
        "",
        f"One-off per map: dense optical descriptors of the reference map {rec['map_descriptors_s']:.1f} s "
        f"({'read from the cache' if rec['map_descriptors_from_cache'] else 'computed'}; cached in the index folder as `align_features_<gsd>m.pt`).",
        END,
    ]
    return "\n".join(lines)


def write_docs(rec: dict[str, Any], docs: Path = Path("docs")) -> None:
    """Replace (or append) this benchmark's section of docs/BENCHMARKS.md; write its JSON."""
    from cmpc.utils.io import atomic_write_json, atomic_write_text

    md = docs / "BENCHMARKS.md"
    text = md.read_text(encoding="utf-8") if md.is_file() else "# Benchmarks\n"
    sec = section(rec)
    if START in text and END in text:
        a = text.index(START)
        b = text.index(END) + len(END)
        text = text[:a] + sec + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + sec + "\n"
    atomic_write_text(md, text)
    atomic_write_json(docs / "bench_refine.json", rec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment", nargs="?", default="experiments/demo.json")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--queries", type=int, default=217)
    p.add_argument("--no-write", action="store_true", help="print only")
    a = p.parse_args(argv)
    threads = os.environ.get("CMPC_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    rec = run(a.experiment, a.runs, a.queries)
    print(json.dumps(rec, indent=2))
    if not a.no_write:
        write_docs(rec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
