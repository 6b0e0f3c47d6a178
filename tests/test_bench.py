"""The benchmark harness on tiny sizes: medians, row merging, markdown sections, the
index/exact benchmarks' numbers, and run_all's discovery and contract checks."""

from __future__ import annotations

import gc
import json
import sys
import types
from pathlib import Path

import faiss
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import harness, run_all  # noqa: E402
from benchmarks.data import clustered_vectors  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    faiss.omp_set_num_threads(1)
    yield


def test_time_runs_counts_and_median():
    calls = []
    t = harness.time_runs(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(calls) == 6 and len(t.runs) == 4 and all(r >= 0 for r in t.runs)
    t = harness.Timing(runs=[3.0, 1.0, 2.0, 10.0])
    assert t.median == 2.5 and t.min == 1.0 and t.spread == pytest.approx(9.0 / 2.5)
    assert harness.median([5, 1, 3]) == 3 and np.isnan(harness.median([]))


def test_peak_rss_sees_an_allocation():
    # earlier tests' cyclic garbage, collected inside the block, would lower the RSS by as much as
    # the block raises it (seen in long runs): collect it first
    gc.collect()
    with harness.PeakRss(interval=0.005) as mem:
        block = np.ones(64 * 2**20 // 8)  # 64 MB, touched
        block[::512] = 2.0
    assert mem.delta_mb > 50
    del block


def _row(bench: str, name: str, **kw) -> dict:
    return {"bench": bench, "name": name, **kw}


def test_merge_rows_replaces_only_the_rerun_benchmark():
    old = [_row("refine", "a"), _row("index", "old1"), _row("index", "old2"), _row("embed", "x")]
    new = [_row("index", "new1"), _row("exact", "e1")]
    merged = harness.merge_rows(old, new)
    assert [(r["bench"], r["name"]) for r in merged] == [("refine", "a"), ("index", "new1"), ("embed", "x"), ("exact", "e1")]
    assert harness.merge_rows([], new) == new


def test_write_results_merges_json_and_keeps_foreign_sections(tmp_path):
    foreign = "<!-- bench_refine:start -->\n## Refinement latency\n| a | b |\n<!-- bench_refine:end -->"
    (tmp_path / "BENCHMARKS.md").write_text(f"# Benchmarks\n\nold text\n\n{foreign}\n")
    (tmp_path / "benchmarks.json").write_text(json.dumps([_row("embed", "kept", patches_s=10.0)]))
    machine = {"cpu": "TestCPU", "cores": 2, "gpu": None, "load_avg": [1.0, 1.0, 1.0], "date": "2025-01-01"}
    rows = [_row("index", "Flat 1,000", query_ms=0.5, machine=machine)]
    out = harness.write_results(rows, tmp_path, renderers={"index": lambda rs: f"INDEX TABLE {len(rs)}"}, titles={"index": "Index"})
    assert [r["name"] for r in out] == ["kept", "Flat 1,000"]
    assert json.loads((tmp_path / "benchmarks.json").read_text()) == out
    md = (tmp_path / "BENCHMARKS.md").read_text()
    assert md.count(foreign) == 1 and "old text" not in md
    assert "<!-- bench:index:start -->\n## Index" in md and "INDEX TABLE 1" in md and "Machine: TestCPU" in md
    assert "| patches_s |" in md.replace("name | patches_s", "| patches_s")  # generic table for the embed rows
    # a second run replaces its own section, never duplicates anything
    harness.write_results([_row("index", "HNSW", query_ms=0.1, machine=machine)], tmp_path,
                          renderers={"index": lambda rs: f"INDEX TABLE {rs[0]['name']}"})
    md2 = (tmp_path / "BENCHMARKS.md").read_text()
    assert md2.count("bench:index:start") == 1 and "INDEX TABLE HNSW" in md2 and md2.count(foreign) == 1
    assert [r["name"] for r in json.loads((tmp_path / "benchmarks.json").read_text())] == ["kept", "HNSW"]
    (tmp_path / "benchmarks.json").write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="not a list of benchmark rows"):
        harness.read_rows(tmp_path / "benchmarks.json")


def test_index_benchmark_rows_on_tiny_map():
    from benchmarks import bench_index

    x, q = clustered_vectors(1500, 32, 40, seed=3)
    rows = bench_index.measure_map(x, q, quick=True, data_label="test", builds=1, n_single=5, passes=1)
    keys = {"bench", "name", "factory", "n_refs", "dim", "recall@1", "recall@10", "query_ms", "batch_query_ms", "build_s", "index_mb"}
    assert all(keys <= set(r) for r in rows)
    by = {r["name"]: r for r in rows}
    flat = by["Flat 1,500"]
    assert flat["recall@1"] == flat["recall@10"] == 1.0 and flat["n_refs"] == 1500 and flat["dim"] == 32
    assert flat["index_mb"] == pytest.approx(1500 * 32 * 4 / 2**20, rel=0.02)  # the vectors, plus a small header
    ivf = [r for r in rows if r["index_type"] == "IVF-Flat"]
    assert [r["param"] for r in ivf] == ["nprobe=4", "nprobe=16"]
    assert ivf[1]["recall@10"] >= ivf[0]["recall@10"]  # more cells visited: a superset of candidates
    assert bench_index.best_per_size(rows, 0.999)[0]["recall@10"] >= 0.999
    gt = np.array([[1, 2, 3], [4, 5, 6]])
    assert bench_index.recall(np.array([[1, 3, 9], [5, 4, 6]]), gt) == (0.5, pytest.approx(0.1 * (2 + 3) / 2))
    assert bench_index.nlist_for(1_000_000) == 1024 and bench_index.nlist_for(10_000) == 128


def test_exact_benchmark_limit_arithmetic():
    from benchmarks import bench_exact

    x, q = clustered_vectors(3000, 32, 16, seed=1)
    bw = {"read_gbs": 2.0, "copy_gbs": 3.0}
    rows = bench_exact.compare(x, q, bw, gflops=10.0, n_single=4, batch=16, passes=1)
    assert [r["method"] for r in rows] == ["faiss Flat", "faiss Flat, BLAS from 20 queries", "torch matmul+topk"]
    r = rows[0]
    assert r["memory_limit_ms"] == pytest.approx(1e3 * 3000 * 32 * 4 / 2e9, rel=1e-3)
    assert r["compute_limit_batch_ms"] == pytest.approx(1e3 * 2 * 3000 * 32 / 1e10, rel=1e-2)
    rounding = 0.0006 / r["query_ms"] + 0.002  # query_ms is rounded to 1e-4 ms, efficiency to 1e-3
    assert r["efficiency"] == pytest.approx(r["memory_limit_ms"] / r["query_ms"], rel=rounding)
    assert r["top1_agree_faiss_torch"] == 1.0


def test_run_all_discovers_contract_modules_and_stamps_rows(tmp_path, capsys):
    mods = run_all.discover()
    assert {"embed", "exact", "index", "localize", "mosaic"} <= set(mods)
    fake = types.ModuleType("benchmarks.bench_fake")
    fake.BENCH = "fake"
    fake.run = lambda quick: [{"name": "one", "value": 1.5 if quick else 0.0}]
    rows = run_all.run_benchmark(fake, quick=True)
    assert rows[0]["bench"] == "fake" and rows[0]["quick"] is True and rows[0]["value"] == 1.5
    assert {"cpu", "cores", "torch", "faiss", "load_avg", "date"} <= set(rows[0]["machine"])
    bad = types.ModuleType("benchmarks.bench_bad")
    bad.BENCH = "bad"
    bad.run = lambda quick: [{"bench": "other", "name": "x"}]
    with pytest.raises(ValueError, match="expected 'bad'"):
        run_all.run_benchmark(bad, quick=True)
    assert run_all.main(["--only", "nope", "--docs", str(tmp_path)]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err
    assert run_all.main(["--list"]) == 0 and "index:" in capsys.readouterr().out


def test_summary_reads_the_targets_from_rows(tmp_path):
    m = {"load_avg": [1.0, 1.0, 1.0]}
    rows = [
        _row("index", "Flat 1,000,000", index_type="Flat", n_refs=1_000_000, **{"recall@10": 1.0}, query_ms=80.0, machine=m),
        _row("index", "HNSW32 ef=16", index_type="HNSW32", n_refs=1_000_000, **{"recall@10": 0.93}, query_ms=0.1, machine=m),
        _row("index", "HNSW32 ef=32", index_type="HNSW32", n_refs=1_000_000, **{"recall@10": 0.98}, query_ms=0.2, machine=m),
        _row("localize", "a", n_queries=1000, wall_s=5.0, peak_rss_mb=1000.0, factory="HNSW32", machine=m),
        _row("localize", "b", n_queries=10000, wall_s=20.0, peak_rss_mb=1010.0, factory="HNSW32", machine=m),
    ]
    text = run_all.summary(rows)
    assert "**0.20 ms at recall@10 0.980** (HNSW32 ef=32; exact Flat: 80 ms)" in text  # ef=16 misses 0.95
    assert "**10,000 queries in 20 s**" in text and "1000-1010 MB" in text
    assert "not measured yet" in run_all.summary([])
    (tmp_path / "benchmarks.json").write_text(json.dumps(rows))
    assert run_all.main(["--render", "--docs", str(tmp_path)]) == 0
    assert "**10,000 queries in 20 s**" in (tmp_path / "BENCHMARKS.md").read_text()
    assert "section renderer failed: KeyError" in (tmp_path / "BENCHMARKS.md").read_text()  # fake rows lack keys
