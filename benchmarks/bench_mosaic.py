"""Indexing a large optical mosaic straight from its GeoTIFF: throughput, memory, resume cost.

Full run: (1) the one-off 1M-reference build of the 8192 x 8192 px benchmark mosaic
(``cmpc index build --raster``, recorded by :mod:`benchmarks.data` in
``data/bench/build_1m.json``: wall time and peak RSS of that process); (2) measured now, a
build from a 1024 x 1024 px crop of the same mosaic (the baseline: same code, 1/64 of the
area) straight, and again interrupted after half its blocks then resumed, to show what an
interruption costs. Peak RSS is sampled in this process (growth over its start).

``--quick``: a 256 x 256 px crop and an untrained embedder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import data as bdata
from benchmarks.harness import PeakRss, table

BENCH = "mosaic"
TITLE = "Large mosaic: index build straight from a GeoTIFF (windowed, resumable)"


class _Interrupt(Exception):
    pass


def _build(exp_path: Path, sets: list[str], stop_at: int | None = None) -> tuple[float, float, dict[str, Any] | None]:
    """(seconds, peak RSS growth MB, manifest or None when interrupted) of one raster build."""
    from cmpc.config import load_experiment
    from cmpc.index.raster_build import build_index_from_raster

    exp = load_experiment(exp_path, sets)

    def hook(done: int, total: int) -> None:
        if stop_at is not None and done >= stop_at:
            raise _Interrupt

    t0 = time.perf_counter()
    with PeakRss() as mem:
        try:
            m = build_index_from_raster(exp, on_block=hook)
        except _Interrupt:
            m = None
    return time.perf_counter() - t0, mem.delta_mb, m


def run(quick: bool) -> list[dict[str, Any]]:
    from cmpc.utils.runtime import set_threads

    set_threads(1)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir="data" if Path("data").is_dir() else None) as td:
        tmp = Path(td).resolve()
        if quick:
            from benchmarks.bench_localize import _setup_quick

            exp_path = _setup_quick(tmp)[0]
            optical = tmp / "optical.tif"
            side, patch, stride, block = 256, 16, 8, 64
        else:
            bdata.ensure_index_1m()
            rec = json.loads((bdata.BENCH_DIR / "build_1m.json").read_text())
            opt_mb = (bdata.MOSAIC / "optical.tif").stat().st_size / 2**20
            rows.append({
                "name": f"1M build ({rec['references']:,} refs, 8192 px mosaic)", "n_refs": rec["references"], "mosaic_px": 8192,
                "mosaic_mb": round(opt_mb, 1), "build_s": rec["wall_s"], "refs_per_s": round(rec["references"] / rec["wall_s"], 1),
                "peak_rss_mb": round(rec["peak_rss_mb"], 1), "runs": 1, "resumed_blocks": rec["resumed_blocks"],
                "blocks": rec["blocks"], "threads": rec["threads"], "note": "one-off (python -m benchmarks.data); process peak RSS incl. the 1 GB Flat index",
            })
            exp_path = bdata.EXPERIMENT
            optical = bdata.crop_raster(bdata.MOSAIC / "optical.tif", tmp / "optical_1024.tif", 1024, 1024)
            side, patch, stride, block = 1024, bdata.PATCH_PX, bdata.STRIDE_PX, 256
        sets = [f"index.raster={optical.resolve()}", f"index.patch_px={patch}", f"index.stride_px={stride}",
                f"tile.block_px={block}", "index.factory=Flat", "index.name=bench_mosaic_tmp"]
        cwd = Path.cwd()
        if quick:
            os.chdir(tmp)  # the quick experiment's paths are relative to its folder
        try:
            secs, peak, m = _build(exp_path, sets)
            assert m is not None
            n, blocks = m["count"], m["raster_build"]["blocks"]
            rows.append({"name": f"straight build, {side} px crop", "n_refs": n, "mosaic_px": side, "build_s": round(secs, 2),
                         "refs_per_s": round(n / secs, 1), "peak_rss_mb": round(peak, 1), "runs": 1, "blocks": blocks, "threads": 1,
                         "note": "peak RSS = growth of this process during the build"})
            half = max(1, blocks // 2)
            s1, p1, _ = _build(exp_path, sets, stop_at=half)
            s2, p2, m2 = _build(exp_path, sets)
            assert m2 is not None and m2["raster_build"]["resumed_blocks"] == half
            rows.append({"name": f"interrupted after {half}/{blocks} blocks + resumed", "n_refs": n, "mosaic_px": side,
                         "build_s": round(s1 + s2, 2), "refs_per_s": round(n / (s1 + s2), 1), "peak_rss_mb": round(max(p1, p2), 1),
                         "runs": 1, "blocks": blocks, "resumed_blocks": half, "threads": 1,
                         "resume_overhead": round((s1 + s2) / secs - 1.0, 3),
                         "note": f"first run {s1:.1f} s, resumed run {s2:.1f} s"})
        finally:
            os.chdir(cwd)
            shutil.rmtree(Path("index") / "bench_mosaic_tmp", ignore_errors=True)
    for r in rows:
        r["bench"] = BENCH
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    return "\n".join([
        "References = 64 px windows every 8 px (full run), embedded by the benchmark embedder with one thread; the "
        "mosaic is read in blocks (never whole), each block's embeddings are committed to a chunk file, then the "
        "FAISS index is filled from them and the folder renamed into place.",
        "",
        table(rows, [("name", "run"), ("n_refs", "references"), ("mosaic_mb", "optical GeoTIFF MB"), ("build_s", "seconds"),
                     ("refs_per_s", "refs/s"), ("peak_rss_mb", "peak RSS MB"), ("resume_overhead", "resume overhead"), ("note", "note")]),
    ])


if __name__ == "__main__":
    import sys

    print(json.dumps(run("--quick" in sys.argv), indent=1))
