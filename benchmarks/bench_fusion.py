"""What score fusion costs: embedding throughput of one embedder vs K fused (patches/s).

The shipped sentinel model fuses three cmpc_cnn_s embedders (:mod:`cmpc.models.fusion`):
every patch goes through each member, and the index holds K x 256 dimensions. Measured here
in one run, so the ratios are what to read: model-only forward passes at 128 px (batch 32,
1 and 2 threads; median of repeated batches) for K = 1 (the baseline), 2, 3, and the exact
search cost of the wider vectors (FAISS Flat, 100k references, 256 queries, median of runs).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from benchmarks.harness import table, time_runs

BENCH = "fusion"
TITLE = "Score fusion: what K fused embedders cost (embedding and search)"


def _fused(k: int):  # noqa: ANN202 - an embedder
    from cmpc.config import ModelConfig
    from cmpc.models.embedder import build_embedder
    from cmpc.models.fusion import FusedEmbedder

    members = []
    for s in range(k):
        torch.manual_seed(s)
        members.append(build_embedder(ModelConfig(backbone="cmpc_cnn_s", pool="grid", embed_dim=256), 1, 3).eval())
    return members[0] if k == 1 else FusedEmbedder(members).eval()


def embed_rate(k: int, img: int, batch: int, threads: int, repeats: int) -> float:
    """Patches/s of optical forward passes through K fused members (median of ``repeats``)."""
    torch.set_num_threads(threads)
    m = _fused(k)
    x = torch.randn(batch, 3, img, img)

    def step() -> None:
        with torch.inference_mode():
            m(x, "opt")

    return batch / time_runs(step, repeats, warmup=2).median


def search_ms(dims: tuple[int, ...], n_refs: int, n_queries: int, repeats: int) -> dict[int, float]:
    """Milliseconds per query of exact inner-product search (FAISS Flat, top-20, 1 thread) per
    dimension; the dimensions take turns in every round (so drift and warm-up hit all alike),
    median over ``repeats`` rounds after one warm-up round."""
    import time

    import faiss

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    setups = {}
    for d in dims:
        index = faiss.IndexFlatIP(d)
        index.add(rng.standard_normal((n_refs, d)).astype(np.float32))
        setups[d] = (index, rng.standard_normal((n_queries, d)).astype(np.float32))
    times: dict[int, list[float]] = {d: [] for d in dims}
    for r in range(repeats + 1):
        for d in dims:
            index, q = setups[d]
            t0 = time.perf_counter()
            index.search(q, 20)
            if r:
                times[d].append(time.perf_counter() - t0)
    return {d: 1e3 * float(np.median(times[d])) / n_queries for d in dims}


def run(quick: bool) -> list[dict[str, Any]]:
    threads0 = torch.get_num_threads()
    rows: list[dict[str, Any]] = []
    try:
        img, batch = (32, 8) if quick else (128, 32)
        repeats = 3 if quick else 7
        for th in ((1,) if quick else (1, 2)):
            base = None
            for k in (1, 2, 3):
                ps = embed_rate(k, img, batch, th, repeats)
                base = base or ps
                rows.append({"name": f"embed K={k} {img}px b{batch} t{th}", "mode": "embed", "members": k, "img_size": img, "batch": batch,
                             "threads": th, "patches_s": round(ps, 1), "vs_one": round(ps / base, 3), "runs": repeats})
        n_refs = 1_000 if quick else 100_000
        ms = search_ms((256, 512, 768), n_refs, 64 if quick else 256, repeats)
        for k in (1, 2, 3):
            rows.append({"name": f"search K={k} dim {256 * k} {n_refs} refs", "mode": "search", "members": k, "dim": 256 * k,
                         "n_refs": n_refs, "threads": 1, "query_ms": round(ms[256 * k], 4), "vs_one": round(ms[256 * k] / ms[256], 3), "runs": repeats})
        for r in rows:
            r["bench"] = BENCH
        return rows
    finally:
        torch.set_num_threads(threads0)


def render(rows: list[dict[str, Any]]) -> str:
    emb = [r for r in rows if r["mode"] == "embed"]
    srch = [r for r in rows if r["mode"] == "search"]
    return "\n".join([
        "Embedding (model only, random optical tensors, cmpc_cnn_s + grid pooling, 256-d per member); "
        "`vs one` = throughput / one embedder's in the same run:",
        "",
        table(emb, [("members", "members K"), ("img_size", "input px"), ("batch", "batch"), ("threads", "threads"),
                    ("patches_s", "patches/s"), ("vs_one", "vs one")]),
        "",
        "Exact search of the wider vectors (FAISS IndexFlatIP, top-20, 1 thread); `vs one` = time / the 256-d time:",
        "",
        table(srch, [("members", "members K"), ("dim", "dim"), ("n_refs", "references"), ("query_ms", "ms/query"), ("vs_one", "vs one")]),
        "",
        _reading(emb, srch),
    ])


def _reading(emb: list[dict[str, Any]], srch: list[dict[str, Any]]) -> str:
    """One reading line from the measured ratios."""
    if not emb or not srch:
        return ""
    def span(rows: list[dict[str, Any]], k: int) -> str:
        v = [r["vs_one"] for r in rows if r["members"] == k]
        return f"{min(v):.2f}-{max(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"
    return (f"Reading: K fused members embed at {span(emb, 2)} (K = 2) and {span(emb, 3)} (K = 3) of one embedder's "
            f"throughput (the members run one after another); exact search of the {srch[-1]['dim']}-d vectors takes "
            f"{span(srch, 3)} times the 256-d time at {srch[-1]['n_refs']:,} references"
            + (" (less, not more: FAISS Flat with 256 queries is slower per query below 512 dimensions than above on this "
               "machine, a kernel choice of FAISS; numpy's matmul scales with the dimension)" if srch[-1]["vs_one"] < 1 else "")
            + "; the index holds K x 256 float32 per reference.")
