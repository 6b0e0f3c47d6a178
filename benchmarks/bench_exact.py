"""Exact search: faiss Flat against torch matmul + topk, and the memory-bandwidth limit.

A single exact query must read every reference embedding once: N x D x 4 bytes. Divided
by the memory read bandwidth measured here in the same run (numpy ``sum`` over a 256 MB
float32 array, one thread; ``copy`` is reported too), that is the fastest any single-query
exact search can be on this machine; ``efficiency`` = that limit / the measured latency.
Batched queries reuse each reference from cache for many queries, so a batch is bounded
by arithmetic instead (2 N D flops per query at the measured single-thread matmul
GFLOP/s). Everything runs with one thread.
"""

from __future__ import annotations

import time
from typing import Any

import faiss
import numpy as np
import torch

from benchmarks import data as bdata
from benchmarks.harness import median, table, time_runs

BENCH = "exact"
TITLE = "Exact search: faiss Flat vs torch matmul + topk, against the memory-bandwidth limit"
K = 10


def memory_bandwidth(nbytes: int, repeats: int = 5) -> dict[str, float]:
    """Read and copy bandwidth over an array of ``nbytes`` (GB/s), best of ``repeats``.

    Read = a vectorised float32 sum (torch, one thread), the access pattern of a flat scan;
    copy counts read + write bytes. Best-of, not median: a bandwidth is a ceiling, and on
    a shared CPU the other runs are slowed by other jobs. Use the size of the scanned data:
    the CPU's last-level cache may hold a small map (then "bandwidth" is cache bandwidth).
    """
    a = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
    b = torch.empty_like(a)
    read = time_runs(lambda: a.sum(), repeats)
    copy = time_runs(lambda: b.copy_(a), repeats)
    return {"read_gbs": a.numel() * 4 / read.min / 1e9, "copy_gbs": 2 * a.numel() * 4 / copy.min / 1e9}


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Single-thread float32 GEMM throughput (torch), GFLOP/s."""
    x = torch.randn(n, n)
    y = torch.randn(n, n)
    t = time_runs(lambda: x @ y, repeats)
    return 2 * n**3 / t.median / 1e9


def _latencies(search, q: np.ndarray, n_single: int, batch: int, passes: int) -> tuple[float, float]:  # noqa: ANN001
    single = []
    for _ in range(passes):
        for i in range(n_single):
            t0 = time.perf_counter()
            search(q[i : i + 1])
            single.append(time.perf_counter() - t0)
    batched = []
    for _ in range(passes):
        t0 = time.perf_counter()
        search(q[:batch])
        batched.append((time.perf_counter() - t0) / batch)
    return 1e3 * median(single), 1e3 * median(batched)


def compare(x: np.ndarray, q: np.ndarray, bw: dict[str, float], gflops: float, n_single: int = 50, batch: int = 256,
            passes: int = 3, data_label: str = "") -> list[dict[str, Any]]:
    """Rows for faiss Flat and torch matmul+topk over references ``x`` (N, D), queries ``q``."""
    n, d = x.shape
    flat = faiss.IndexFlatIP(d)
    flat.add(x)
    xt = torch.from_numpy(x)

    def torch_search(qq: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.topk(torch.from_numpy(qq) @ xt.T, K, dim=1)

    _, f_rows = flat.search(q[:batch], K)
    _, t_rows = torch_search(q[:batch])
    agree = float(np.mean(f_rows[:, 0] == t_rows[:, 0].numpy()))
    bytes_q = n * d * 4
    mem_limit_ms = 1e3 * bytes_q / (bw["read_gbs"] * 1e9)
    compute_limit_ms = 1e3 * 2 * n * d / (gflops * 1e9)
    def faiss_blas(qq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # faiss 1.15 only uses BLAS for >= 128000 queries (distance_compute_blas_threshold)
        old = faiss.cvar.distance_compute_blas_threshold
        faiss.cvar.distance_compute_blas_threshold = 20
        try:
            return flat.search(qq, K)
        finally:
            faiss.cvar.distance_compute_blas_threshold = old

    rows = []
    methods = (("faiss Flat", lambda qq: flat.search(qq, K)), ("faiss Flat, BLAS from 20 queries", faiss_blas),
               ("torch matmul+topk", torch_search))
    for method, fn in methods:
        single, batched = _latencies(fn, q, min(n_single, len(q)), min(batch, len(q)), passes)
        rows.append({
            "bench": BENCH, "name": f"{method} {n:,}", "method": method, "n_refs": int(n), "dim": int(d),
            "query_ms": round(single, 4), "batch_query_ms": round(batched, 4), "batch": int(min(batch, len(q))),
            "bytes_per_query_mb": round(bytes_q / 2**20, 1), "read_gbs": round(bw["read_gbs"], 2),
            "copy_gbs": round(bw["copy_gbs"], 2), "memory_limit_ms": round(mem_limit_ms, 3),
            "efficiency": round(mem_limit_ms / single, 3), "matmul_gflops": round(gflops, 1),
            "compute_limit_batch_ms": round(compute_limit_ms, 4), "batch_efficiency": round(compute_limit_ms / batched, 3),
            "top1_agree_faiss_torch": round(agree, 4), "threads": 1, "data": data_label,
        })
    return rows


def run(quick: bool) -> list[dict[str, Any]]:
    faiss.omp_set_num_threads(1)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gf = matmul_gflops(512 if quick else 1024)
        rows: list[dict[str, Any]] = []
        if not quick and not bdata.have_cache():
            bdata.ensure_queries("1m")
        if bdata.have_cache():
            feats, _ = bdata.load_features()
            q, _ = bdata.load_queries("1m")
            label = "real: optical mosaic embeddings, SAR queries"
            sizes = [20_000] if quick else [100_000, len(feats)]
        else:
            feats, q = bdata.clustered_vectors(20_000, 256, 256)
            label = "synthetic-clustered (no real cache)"
            sizes = [20_000]
        for n in sizes:
            bw = memory_bandwidth(n * feats.shape[1] * 4)
            rows += compare(np.ascontiguousarray(feats[:n]), q, bw, gf, n_single=20 if quick else 50,
                            batch=64 if quick else 256, passes=1 if quick else 3, data_label=label)
        return rows
    finally:
        torch.set_num_threads(torch_threads)


def render(rows: list[dict[str, Any]]) -> str:
    r0 = rows[0]
    cols = [("name", "method"), ("n_refs", "references"), ("query_ms", "1 query ms"), ("memory_limit_ms", "bandwidth limit ms"),
            ("efficiency", "limit / measured"), ("batch_query_ms", "batched ms/query"), ("compute_limit_batch_ms", "GEMM limit ms/query"),
            ("batch_efficiency", "limit / measured (batch)"), ("top1_agree_faiss_torch", "same top-1")]
    return "\n".join([
        f"Data: {r0.get('data')}; D = {r0.get('dim')}, k = {K}, one thread, batch = {r0.get('batch')} queries. "
        "Measured in the same run: read bandwidth per map size (" + ", ".join(f"{r['n_refs']:,}: {r['read_gbs']:.2f} GB/s read, "
        f"{r['copy_gbs']:.2f} GB/s copy" for r in rows if r["method"] == "faiss Flat") + f"), single-thread float32 GEMM "
        f"{r0['matmul_gflops']:.1f} GFLOP/s. "
        "A single query reads N x D x 4 bytes: `bandwidth limit` = those bytes / the read bandwidth "
        "measured over an array of that size (best of 5; a map smaller than the last-level cache is read at cache speed). "
        "`limit / measured` above 1 means the scan reads faster than this probe (a torch sum): it is at the machine's "
        "read bandwidth. `cmpc` searches Flat indexes on the CPU with faiss for fewer than 16 queries and with torch "
        "matmul + topk for batches (`cmpc.index.store.TORCH_BATCH_MIN`), from these numbers.",
        "",
        table(rows, cols),
    ])


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run("--quick" in sys.argv), indent=1))
