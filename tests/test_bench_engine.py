"""The issue-14 benchmark sections: targets read from rows, renderers on minimal rows."""

from __future__ import annotations

from benchmarks import bench_index_engine, bench_mosaic_dask, run_all


def _eng(name, index_type, r10, prior=False, engine="milvus-lite"):
    return {"bench": "index_engine", "name": name, "engine": engine, "index_type": index_type, "n_refs": 100_489, "dim": 256,
            "n_queries": 1000, "recall@10": r10, "query_ms": 5.0, "batch_query_ms": 0.5, "build_s": 10.0, "prior": prior,
            "prior_refs": 3000 if prior else None, "embedder": "e", "machine": {"load_avg": [1, 1, 1]}}


def test_engine_and_dask_targets_and_sections():
    rows = [_eng("FAISS Flat", "Flat", 1.0, engine="faiss"), _eng("Milvus Lite FLAT", "FLAT", 1.0),
            _eng("Milvus Lite IVF_FLAT nprobe=16", "IVF_FLAT", 0.9), _eng("Milvus Lite HNSW ef=64", "HNSW", 0.97),
            _eng("Milvus Lite HNSW ef=64 + prior", "HNSW", 0.96, prior=True)]
    d = {"bench": "mosaic_dask", "name": "dask 2 workers", "workers": 2, "threads_per_worker": 1, "n_refs": 64_009, "mosaic_px": 4096,
         "build_s": 100.0, "patches_s": 640.0, "vs_in_process": 0.85, "peak_rss_mb": 900.0, "max_abs_diff": 2e-7, "blocks": 16,
         "embedder": "e", "torch_threads": 1, "machine": {"load_avg": [1, 1, 1]}}
    text = run_all.summary(rows + [d])
    assert "**0.970** (Milvus Lite HNSW ef=64" in text and "met)" in text
    assert "**0.85 x, max_abs_diff 2.0e-07** (64,009 references; met)" in text
    assert "**met** by Milvus Lite HNSW ef=64" in bench_index_engine.render(rows)
    assert "**met** (0.85 x" in bench_mosaic_dask.render([{**d, "workers": None, "name": "in-process"}, d])
    bad = {**d, "vs_in_process": 0.7}
    assert "NOT met" in run_all.summary([bad]) and "**not met**" in bench_mosaic_dask.render([bad])
