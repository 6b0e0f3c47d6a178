"""Milvus Lite vs FAISS at 100k references: engine build time, query latency, recall@10, priors.

Data (:mod:`benchmarks.engine_data`): 100,489 real optical reference embeddings (a trained
embedder over a 4096 px synthetic mosaic, every 12 px) and 1000 real SAR query embeddings.
Every configuration is an index folder searched through :class:`cmpc.index.store.ReferenceIndex`
(the code `cmpc localize` runs): FAISS Flat (exact: the ground truth and the baseline measured in
the same run), FAISS HNSW32, and Milvus Lite FLAT, IVF_FLAT and HNSW. ``recall@10`` = share of
the exact top-10 returned (against exact Flat search on the same embeddings; with a prior,
against exact search over the prior's references). ``query_ms``: median over single queries
(one per call); ``batch_query_ms``: per query, all queries in one call (median of the passes).
``build_s``: what the engine adds once the embeddings exist (FAISS: train + add + write;
Milvus: create the collection, insert, build the index, load). ``prior``: a disc of 400 m
around the map centre (about 3 % of the references): a bounding-box filter in Milvus, then the
exact disc test. One thread for faiss everywhere (Milvus Lite runs faiss in this process too).
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import engine_data as ed
from benchmarks.harness import median, table

BENCH = "index_engine"
TITLE = "Index engines: Milvus Lite vs FAISS at 100k references (build, latency, recall@10, priors)"
K = 10
PRIOR_RADIUS_M = 400.0
WORK = Path("index/.bench_engine")


def configs(n: int) -> list[dict[str, Any]]:
    """(label, engine, factory, search parameter sweep) of every configuration."""
    nlist = 1024 if n >= 50_000 else 64
    return [
        {"label": "FAISS Flat", "engine": "faiss", "factory": "Flat", "sweep": [{}]},
        {"label": "FAISS HNSW32", "engine": "faiss", "factory": "HNSW32", "sweep": [{"ef_search": 64}, {"ef_search": 128}]},
        {"label": "Milvus Lite FLAT", "engine": "milvus", "factory": "Flat", "sweep": [{}]},
        {"label": f"Milvus Lite IVF_FLAT nlist={nlist}", "engine": "milvus", "factory": f"IVF{nlist},Flat",
         "sweep": [{"nprobe": 16}, {"nprobe": 32}, {"nprobe": 64}]},
        {"label": "Milvus Lite HNSW M=32", "engine": "milvus", "factory": "HNSW32", "sweep": [{"ef_search": 64}, {"ef_search": 128}]},
    ]


def _latency(ri: Any, q: np.ndarray, allowed: np.ndarray | None, n_single: int, passes: int) -> tuple[float, float, np.ndarray]:
    single = []
    for i in range(min(n_single, len(q))):
        t0 = time.perf_counter()
        ri.search(q[i : i + 1], K, allowed)
        single.append(time.perf_counter() - t0)
    batch, rows = [], None
    for _ in range(passes):
        t0 = time.perf_counter()
        _, rows = ri.search(q, K, allowed)
        batch.append((time.perf_counter() - t0) / len(q))
    return 1e3 * median(single), 1e3 * median(batch), rows


def recall10(rows: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a[:K], b[:K])) / K for a, b in zip(rows, gt)]))


def run(quick: bool) -> list[dict[str, Any]]:
    import faiss

    from cmpc.config import IndexConfig
    from cmpc.index.store import ReferenceIndex

    faiss.omp_set_num_threads(1)
    import torch

    torch.set_num_threads(1)
    feats, pos, ids, man = ed.load_map()
    q, _ = ed.ensure_queries()
    if quick:
        feats, pos, ids, q = feats[:10_000], pos[:10_000], ids[:10_000], q[:100]
    n = len(feats)
    centre = pos.mean(axis=0)
    allowed = np.flatnonzero(np.hypot(*(pos - centre).T) <= PRIOR_RADIUS_M)
    _, ckpt_desc = ed.embedder()[0], ed.embedder()[2]
    n_single, passes = (50, 1) if quick else (200, 3)
    rows_out: list[dict[str, Any]] = []
    gt: dict[bool, np.ndarray] = {}
    WORK.mkdir(parents=True, exist_ok=True)
    try:
        for cfg in configs(n):
            out = WORK / cfg["label"].split(" nlist")[0].replace(" ", "_").replace("=", "")
            icfg = IndexConfig(engine=cfg["engine"], factory=cfg["factory"])
            builds = []
            for _ in range(1 if (not quick and cfg["engine"] == "milvus" and "FLAT" not in cfg["label"]) else 2):
                m, secs = ed.write_index_folder(out, feats, pos, ids, man, icfg, cfg["factory"])
                builds.append(secs)
            print(f"bench_index_engine: {cfg['label']} built in {median(builds):.1f} s", file=sys.stderr, flush=True)
            engine_files = [out / "milvus.db"] if cfg["engine"] == "milvus" else [out / "index.faiss"]
            index_mb = sum(f.stat().st_size for p in engine_files for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()) / 2**20
            features_mb = (out / "features.h5").stat().st_size / 2**20
            for params in cfg["sweep"]:
                ri = ReferenceIndex.load(out, nprobe=params.get("nprobe", 16), ef_search=params.get("ef_search", 64))
                try:
                    for prior in (False, True):
                        q_ms, b_ms, rows = _latency(ri, q, allowed if prior else None, n_single, passes)
                        if cfg["label"] == "FAISS Flat":
                            gt[prior] = rows
                        r10 = recall10(rows, gt[prior])
                        if prior:
                            assert np.isin(rows, allowed).all()
                        ptxt = ", ".join(f"{k}={v}" for k, v in params.items())
                        rows_out.append({
                            "bench": BENCH, "name": cfg["label"] + (f" {ptxt}" if ptxt else "") + (" + prior" if prior else ""),
                            "engine": "faiss" if cfg["engine"] == "faiss" else "milvus-lite", "index_type": m.get("milvus", {}).get("index_type", cfg["factory"]),
                            "factory": cfg["factory"], "param": ptxt, "n_refs": int(n), "dim": int(feats.shape[1]), "n_queries": int(len(q)),
                            "recall@10": round(r10, 4), "query_ms": round(q_ms, 3), "batch_query_ms": round(b_ms, 4),
                            "build_s": round(median(builds), 2), "build_runs": len(builds), "prior": prior,
                            "index_mb": round(index_mb, 1), "bytes_per_ref": round(index_mb * 2**20 / n, 1),
                            "features_h5_bytes_per_ref": round(features_mb * 2**20 / n, 1),
                            "prior_refs": int(len(allowed)) if prior else None, "threads": 1, "embedder": ckpt_desc,
                        })
                        print(f"  {rows_out[-1]['name']}: R@10 {r10:.3f}, {q_ms:.2f} ms single, {b_ms:.3f} ms batched", file=sys.stderr, flush=True)
                finally:
                    ri.close()
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    flat = {r["prior"]: r for r in rows_out if r["name"].startswith("FAISS Flat")}
    for r in rows_out:
        base = flat[r["prior"]]
        r["query_ms_vs_faiss_flat"] = round(r["query_ms"] / base["query_ms"], 2) if base["query_ms"] > 0 else math.nan
    return rows_out


def render(rows: list[dict[str, Any]]) -> str:
    cols = [("name", "configuration"), ("engine", "engine"), ("n_refs", "references"), ("recall@10", "R@10 vs exact"),
            ("query_ms", "query ms"), ("batch_query_ms", "batched ms/query"), ("query_ms_vs_faiss_flat", "x FAISS Flat time"),
            ("build_s", "engine build s"), ("bytes_per_ref", "engine bytes/ref on disk"), ("prior", "prior")]
    r0 = rows[0]
    mil = [r for r in rows if r["engine"] == "milvus-lite" and not r["prior"] and r["index_type"] != "FLAT"]
    ok = [r for r in mil if r["recall@10"] >= 0.95]
    target = (f"Target, Milvus Lite at 100k references recall@10 >= 0.95: **met** by {', '.join(r['name'] for r in ok)} "
              f"(best {max(r['recall@10'] for r in mil):.3f})." if ok else
              f"Target, Milvus Lite at 100k references recall@10 >= 0.95: **not met** (best approximate {max((r['recall@10'] for r in mil), default=math.nan):.3f}).")
    exact_m = [r for r in rows if r["engine"] == "milvus-lite" and r["index_type"] == "FLAT"]
    parity = ("Exact FLAT in Milvus Lite returns the exact top-10 of FAISS Flat: recall@10 "
              + ", ".join(f"{r['recall@10']:.4f}" + (" (prior)" if r["prior"] else "") for r in exact_m) + ".") if exact_m else ""
    return "\n".join([
        f"Data: {r0.get('n_refs'):,} real optical reference embeddings ({r0.get('embedder')}) of a 4096 px synthetic mosaic "
        f"every 12 px, {r0.get('n_queries')} real SAR query embeddings; D = {r0.get('dim')}; k = {K}; one faiss thread. "
        f"Searches go through ReferenceIndex with its default backend (what `cmpc localize` runs: FAISS Flat batches of 16+ use torch matmul + topk). Prior = disc of {PRIOR_RADIUS_M:g} m around the map "
        f"centre ({next((r['prior_refs'] for r in rows if r['prior']), 0):,} references): Milvus filters by its bounding box, "
        "then the exact disc test. Baseline: FAISS Flat in the same run (`x FAISS Flat time`). Milvus Lite single queries "
        "pay a local gRPC round trip each; batched queries amortise it.",
        "", "Noisy, shared machine (another job's training run used about one of the two cores; load average "
        f"{(r0.get('machine') or {}).get('load_avg')}): latencies are medians (200 single queries; 3 batched passes), engine "
        "builds were run twice for FLAT and once for the approximate Milvus indexes at this size; compare within the table.",
        "", target, "", parity, "", table(rows, cols),
    ])


if __name__ == "__main__":
    import json

    print(json.dumps(run("--quick" in sys.argv), indent=1))
