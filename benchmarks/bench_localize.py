"""End-to-end ``cmpc localize``: latency per query and peak memory as the query count grows.

Full run: the benchmark embedder, a 100k-reference Flat map (``index/bench_100k``: the
north-west 317 x 317 references of ``index/bench_1m``) and a SAR GeoTIFF covering that map
(``data/bench/sar_100k.tif``, 2592 x 2592 px) tiled on the fly into 1k, 5k and 10k query
patches (64 px, stride 81 / 36 / 25 px). Each point is a fresh ``python -m cmpc localize``
process (model and index loading included), timed by ``/usr/bin/time``: wall seconds and
peak resident memory (``%M``). Median of 3 runs. Baselines in the same run: the embedding
alone and the search alone, per query, in this process (batches of ``localize.batch_size``).
Refinement is included only when the experiment has a refiner (the benchmark embedder has
none; refinement latency is in the ``bench_refine`` section).

``--quick``: a 512 m synthetic world, an untrained embedder, 100-400 queries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import data as bdata
from benchmarks.harness import median, table

BENCH = "localize"
TITLE = "End-to-end localize: latency per query and peak memory vs number of queries"
SAR_100K = bdata.BENCH_DIR / "sar_100k.tif"
INDEX_100K = Path("index/bench_100k")


def localize_process(exp_path: Path, queries: Path, out: Path, sets: list[str], threads: int, cwd: Path | None = None) -> dict[str, Any]:
    """Run ``cmpc localize`` in a fresh process; wall seconds, peak RSS MB and its summary."""
    cmd = ["/usr/bin/time", "-f", "TIME %e %M", sys.executable, "-m", "cmpc", "localize", str(exp_path), "--queries", str(queries),
           "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "CMPC_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(Path.cwd())}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)
    timing = [line for line in p.stderr.splitlines() if line.startswith("TIME ")]
    if p.returncode != 0 or not timing:
        raise RuntimeError(f"cmpc localize failed: {p.stderr.strip().splitlines()[-3:]}")
    _, wall, kb = timing[-1].split()
    return {"wall_s": float(wall), "peak_rss_mb": int(kb) / 1024, "summary": json.loads(p.stdout)}


def in_process_baselines(exp_path: Path, sets: list[str], queries: Path, n: int, threads: int) -> dict[str, float]:
    """Embedding-only and search-only milliseconds per query (batches of localize.batch_size)."""
    from cmpc.config import load_experiment
    from cmpc.localize.localizer import Localizer
    from cmpc.localize.queries import open_queries
    from cmpc.utils.runtime import set_threads

    set_threads(threads)
    exp = load_experiment(exp_path, sets)
    loc = Localizer.from_experiment(exp)
    src = open_queries(queries, "test", loc.img_size, loc.index, exp.localize, 0, exp.tile.nodata_max_frac)
    emb_t, search_t, done = [], [], 0
    for batch in src.batches(exp.localize.batch_size):
        t0 = time.perf_counter()
        e = loc.embed(batch.x)
        t1 = time.perf_counter()
        loc.index.search(e, exp.localize.top_k)
        t2 = time.perf_counter()
        emb_t.append((t1 - t0) / len(batch))
        search_t.append((t2 - t1) / len(batch))
        done += len(batch)
        if done >= n:
            break
    return {"embed_ms_per_query": 1e3 * median(emb_t), "search_ms_per_query": 1e3 * median(search_t)}


def _setup_full() -> tuple[Path, list[str], Path, dict[int, int], list[tuple[str, dict[int, int]]]]:
    """The 100k map twice (the factory ``auto`` picks for it, and Flat), the SAR crop, strides."""
    from cmpc.index.factory import resolve_factory

    bdata.ensure_index_1m()
    grid = bdata.Grid.of()
    side = grid.region_side(bdata.SIZES["100k"])
    rows = None
    auto = resolve_factory("auto", side * side, 256)
    maps = []
    for name, factory in ((INDEX_100K.name, auto), (f"{INDEX_100K.name}_flat", "Flat")):
        d = Path("index") / name
        if not (d / "manifest.json").is_file() or json.loads((d / "manifest.json").read_text())["factory"] != factory:
            if rows is None:
                _, ids = bdata.load_features()
                rows = bdata.region_rows(bdata.SIZES["100k"], ids, grid)
            bdata.subset_index(bdata.INDEX_1M, rows, d, factory)
        maps.append(name)
    px = (side - 1) * grid.stride_px + grid.patch_px
    if not SAR_100K.is_file():
        bdata.crop_raster(bdata.MOSAIC / "sar.tif", SAR_100K, px, px)
    strides = {1000: 81, 5000: 36, 10000: 25}
    sets = [f"localize.raster_patch_px={grid.patch_px}", "localize.batch_size=256", "eval.plots=false"]
    # every query count on the auto map; the Flat map at 10k queries as the exact baseline
    return bdata.EXPERIMENT, sets, SAR_100K, strides, [(maps[0], strides), (maps[1], {10000: 25})]


def _setup_quick(tmp: Path) -> tuple[Path, list[str], Path, dict[int, int], list[tuple[str, dict[int, int]]]]:
    """A 512 m world, untrained embedder, raster index: seconds."""
    import rasterio

    from cmpc.config import ModelConfig, SynthConfig, load_experiment
    from cmpc.data.synth import build_world
    from cmpc.data.synth.world import write_geotiff
    from cmpc.index.build import build_index
    from cmpc.models.checkpoint import embedder_payload, save_checkpoint
    from cmpc.models.embedder import build_embedder

    w = build_world(SynthConfig(size_m=512, gsd_m=2.0, seed=5))
    tr = rasterio.transform.from_origin(500_000, 5_000_000, 2.0, 2.0)
    write_geotiff(tmp / "optical.tif", np.moveaxis(w["optical"], -1, 0), "EPSG:32631", tr)
    write_geotiff(tmp / "sar.tif", w["sar"].astype(np.float32), "EPSG:32631", tr)
    import torch

    torch.manual_seed(0)
    model = build_embedder(ModelConfig(backbone="mobilenetv3_small_050", embed_dim=64, stem_channels=8), 1, 3).eval()
    save_checkpoint(tmp / "ck.pt", embedder_payload(model, 32))
    exp_path = tmp / "exp.json"
    exp_path.write_text(json.dumps({
        "name": "bench_quick", "runs_dir": str(tmp / "runs"), "train": {"device": "cpu"},
        "index": {"name": "bench_quick", "raster": str(tmp / "optical.tif"), "patch_px": 16, "stride_px": 8, "factory": "Flat"},
        "localize": {"batch_size": 64, "raster_patch_px": 16}, "refine": {"enabled": False}, "eval": {"plots": False},
    }))
    (tmp / "runs" / "bench_quick").mkdir(parents=True)
    os.replace(tmp / "ck.pt", tmp / "runs" / "bench_quick" / "emb_best.pt")
    cwd = Path.cwd()
    os.chdir(tmp)
    try:
        build_index(load_experiment(exp_path))
    finally:
        os.chdir(cwd)
    strides = {100: 24, 400: 12}
    return exp_path, [], tmp / "sar.tif", strides, [("bench_quick", strides)]


def run(quick: bool) -> list[dict[str, Any]]:
    from cmpc.index.store import read_manifest

    rows: list[dict[str, Any]] = []
    threads = 1
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td).resolve()
        exp_path, sets, sar, strides, plan = _setup_quick(tmp) if quick else _setup_full()
        cwd = tmp if quick else None
        runs = 1 if quick else 3
        exp_abs = exp_path if exp_path.is_absolute() else Path.cwd() / exp_path
        old = Path.cwd()
        for index_name, counts in plan:
            iset = [*sets, f"index.name={index_name}"]
            if quick:
                os.chdir(tmp)
            try:
                manifest = read_manifest(Path("index") / index_name)
                base = in_process_baselines(exp_abs, [*iset, f"localize.raster_stride_px={strides[max(strides)]}"], sar.resolve(),
                                            min(2048, max(strides)), threads)
            finally:
                os.chdir(old)
            for n, stride in counts.items():
                results = [localize_process(exp_abs, sar.resolve(), tmp / f"out_{n}_{r}", [*iset, f"localize.raster_stride_px={stride}"], threads, cwd)
                           for r in range(runs)]
                s0 = results[0]["summary"]
                rows.append({
                    "bench": BENCH, "name": f"localize {s0['queries']:,} queries, {manifest['factory']}", "n_queries": int(s0["queries"]),
                    "n_refs": int(manifest["count"]), "factory": manifest["factory"], "index": s0["index"], "refined": s0["refined"],
                    "wall_s": round(median(r["wall_s"] for r in results), 2),
                    "loop_s": round(median(r["summary"]["seconds"] for r in results), 2),
                    "ms_per_query": round(median(r["summary"]["ms_per_query"] for r in results), 3),
                    "peak_rss_mb": round(median(r["peak_rss_mb"] for r in results), 1),
                    "peak_rss_runs_mb": [round(r["peak_rss_mb"], 1) for r in results], "runs": runs, "threads": threads,
                    "embed_ms_per_query": round(base["embed_ms_per_query"], 3), "search_ms_per_query": round(base["search_ms_per_query"], 3),
                })
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    r0 = rows[0]
    main = [r for r in rows if r["factory"] == r0["factory"]]
    lo, hi = min(r["peak_rss_mb"] for r in main), max(r["peak_rss_mb"] for r in main)
    return "\n".join([
        f"`cmpc localize` of a SAR GeoTIFF tiled on the fly (64 px patches) against {r0['n_refs']:,} references, "
        f"{r0['threads']} thread, refinement {'on' if r0['refined'] else 'off (no refiner for this embedder)'}; a fresh process "
        f"per run, median of {r0['runs']}. `wall` includes start-up (imports, model and index loading); `loop` is the "
        "streaming loop (read, embed, search, write). Baselines measured in the same run, per query in batches of 256: "
        + "; ".join(f"{r['factory']}: embedding {r['embed_ms_per_query']:.2f} ms, search {r['search_ms_per_query']:.3f} ms"
                    for r in {x["factory"]: x for x in rows}.values()) + ".",
        "",
        table(rows, [("n_queries", "queries"), ("factory", "index"), ("wall_s", "wall s"), ("loop_s", "loop s"),
                     ("ms_per_query", "loop ms/query"), ("peak_rss_mb", "peak RSS MB")]),
        "",
        f"Peak memory ({r0['factory']}) from {main[0]['n_queries']:,} to {main[-1]['n_queries']:,} queries: {lo:.0f} to {hi:.0f} MB "
        f"({hi - lo:+.0f} MB): flat, queries stream in batches.",
    ])


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=1))
