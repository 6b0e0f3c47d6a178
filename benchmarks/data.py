"""The cached data of the scale benchmarks (all under data/bench/ and index/, git-ignored).

``python -m benchmarks.data`` builds whatever is missing, in this order (each step is
skipped when its output exists, and the long ones resume after an interruption):

1. the benchmark embedder ``runs/bench/emb_best.pt`` (experiments/bench.json: a 2 km world
   seed 999, 64 px patches at 1 m, mobilenetv3_small_100, D = 256, 8 epochs on the CPU);
2. the 8192 x 8192 px mosaic ``data/bench/mosaic/{optical,sar}.tif`` (16 worlds, see
   :mod:`benchmarks.mosaic`);
3. ``index/bench_1m``: every 64 px window every 8 px of the optical mosaic, embedded by
   ``cmpc index build --raster`` (1017 x 1017 = 1,034,289 references; Flat); its
   ``features.h5`` is the 1M real-embedding cache. Wall time and peak RSS of that build are
   recorded in ``data/bench/build_1m.json``;
4. query embeddings ``data/bench/queries_<n>.npz``: SAR patches of the SAR mosaic at random
   reference cells of the square region holding the first n references (n = 10k, 100k,
   1M), embedded with the SAR branch: real cross-modal queries, with their true cell.

Regions: the 10k map is the 100 x 100 cells in the north-west corner, the 100k map the
317 x 317 cells there, the 1M map everything (maps of different sizes at the same density).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

EXPERIMENT = Path("experiments/bench.json")
BENCH_DIR = Path("data/bench")
MOSAIC = BENCH_DIR / "mosaic"
INDEX_1M = Path("index/bench_1m")
PATCH_PX, STRIDE_PX = 64, 8
SIZES = {"10k": 10_000, "100k": 100_000, "1m": 1_034_289}
N_QUERIES = 1000


def checkpoint_path() -> Path:
    """The benchmark embedder (runs/bench/emb_best.pt)."""
    return Path("runs/bench/emb_best.pt")


def _cmpc(*args: str, threads: int = 1, log: Path | None = None) -> None:
    """Run ``python -m cmpc ARGS`` with ``threads`` CPU threads (1 on a busy machine: see BENCHMARKS.md)."""
    env = {**os.environ, "CMPC_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "cmpc", *args]
    print("benchmarks.data:", " ".join(cmd[1:]), file=sys.stderr, flush=True)
    out = open(log, "a") if log else None
    try:
        subprocess.run(cmd, check=True, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
    finally:
        if out:
            out.close()


def ensure_checkpoint() -> Path:
    """Train the benchmark embedder when missing (world + tiles + training: ~15 min on a busy CPU)."""
    ck = checkpoint_path()
    if ck.is_file():
        return ck
    logs = BENCH_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if not Path("data/bench/world_train/optical.tif").is_file():
        _cmpc("data", "synth", str(EXPERIMENT), "--no-preview", log=logs / "synth_train.log")
    if not Path("data/bench/dataset/dataset.json").is_file():
        _cmpc("data", "tile", str(EXPERIMENT), log=logs / "tile.log")
    _cmpc("train", "emb", str(EXPERIMENT), log=logs / "train.log")
    return ck


def ensure_index_1m() -> Path:
    """Build index/bench_1m from the mosaic (resumable; ~1 h at ~400 patches/s on one core)."""
    if (INDEX_1M / "manifest.json").is_file():
        return INDEX_1M
    from benchmarks.mosaic import make_mosaic

    ensure_checkpoint()
    make_mosaic(MOSAIC)
    t0 = time.time()
    cmd = ["/usr/bin/time", "-f", "%e %M", sys.executable, "-m", "cmpc", "index", "build", str(EXPERIMENT),
           "--raster", str(MOSAIC / "optical.tif"), "--patch-px", str(PATCH_PX), "--stride-px", str(STRIDE_PX),
           "--name", INDEX_1M.name, "--factory", "Flat"]
    env = {**os.environ, "CMPC_THREADS": "1", "OMP_NUM_THREADS": "1"}
    log = BENCH_DIR / "logs" / "index_1m.log"
    with open(log, "a") as f:
        p = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.PIPE, text=True)
    tail = p.stderr.strip().splitlines()
    if p.returncode != 0:
        raise RuntimeError(f"index build failed (see {log}): {' | '.join(tail[-3:])}")
    wall, maxrss_kb = tail[-1].split()
    manifest = json.loads((INDEX_1M / "manifest.json").read_text())
    rec = {
        "command": " ".join(cmd[3:]), "wall_s": float(wall), "peak_rss_mb": int(maxrss_kb) / 1024,
        "references": manifest["count"], "resumed_blocks": manifest["raster_build"]["resumed_blocks"],
        "blocks": manifest["raster_build"]["blocks"], "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "load_avg_end": list(os.getloadavg()), "threads": 1, "note": "wall time of the last (possibly resumed) run only",
        "started_epoch_s": t0,
    }
    (BENCH_DIR / "build_1m.json").write_text(json.dumps(rec, indent=2))
    return INDEX_1M


@dataclass
class Grid:
    """The reference grid of index/bench_1m: ``n_rows`` x ``n_cols`` cells, patch/stride px."""

    n_rows: int
    n_cols: int
    patch_px: int
    stride_px: int

    @classmethod
    def of(cls, index_dir: Path = INDEX_1M) -> Grid:
        src = json.loads((index_dir / "manifest.json").read_text())["sources"][0]
        h, w = src["grid"]
        p, s = src["patch_px"], src["stride_px"]
        return cls((h - p) // s + 1, (w - p) // s + 1, p, s)

    def region_side(self, n: int) -> int:
        """Side (cells) of the north-west square region holding at least n references."""
        return min(int(np.ceil(np.sqrt(n))), self.n_rows, self.n_cols)

    def in_region(self, cell_ids: np.ndarray, n: int) -> np.ndarray:
        """Mask of the cells inside the region of size n."""
        side = self.region_side(n)
        r, c = np.divmod(np.asarray(cell_ids, dtype=np.int64), self.n_cols)
        return (r < side) & (c < side)


def load_features(index_dir: Path = INDEX_1M) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, cell ids (N,)) of the cached 1M references."""
    import h5py

    with h5py.File(index_dir / "features.h5", "r") as h5:
        return np.asarray(h5["features"][:], dtype=np.float32), np.asarray(h5["ids"][:], dtype=np.int64)


def load_positions(index_dir: Path = INDEX_1M) -> np.ndarray:
    """(N, 2) float64 reference centres, metres (same rows as :func:`load_features`)."""
    import h5py

    with h5py.File(index_dir / "features.h5", "r") as h5:
        return np.asarray(h5["positions"][:], dtype=np.float64)


def region_rows(n: int, ids: np.ndarray, grid: Grid) -> np.ndarray:
    """Rows (sorted) of the references in the region of size n."""
    return np.flatnonzero(grid.in_region(ids, n))


def ensure_queries(size: str, n_queries: int = N_QUERIES, seed: int = 0) -> Path:
    """``data/bench/queries_<size>.npz``: SAR embeddings (Q, D) and true cells (Q,) in the region."""
    out = BENCH_DIR / f"queries_{size}.npz"
    if out.is_file():
        return out
    import torch

    from cmpc.data.raster import open_raster
    from cmpc.index.raster_build import prepare_batch
    from cmpc.models.checkpoint import load_embedder
    from cmpc.utils.io import atomic_path

    ensure_index_1m()
    grid = Grid.of()
    side = grid.region_side(SIZES[size])
    rng = np.random.default_rng(seed)
    r = rng.integers(0, side, n_queries)
    c = rng.integers(0, side, n_queries)
    cells = r * grid.n_cols + c
    model, meta = load_embedder(checkpoint_path(), "cpu")
    img = int(meta["img_size"])
    embs = []
    with open_raster(MOSAIC / "sar.tif", role="SAR mosaic") as src, torch.no_grad():
        for s in range(0, n_queries, 128):
            arrays = [src.read_on(src.grid, int(rr) * grid.stride_px, int(cc) * grid.stride_px, grid.patch_px, grid.patch_px)[0]
                      for rr, cc in zip(r[s : s + 128], c[s : s + 128])]
            embs.append(model(prepare_batch(arrays, img), "sar").numpy())
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, emb=np.concatenate(embs).astype(np.float32), cells=cells.astype(np.int64))
    return out


def load_queries(size: str) -> tuple[np.ndarray, np.ndarray]:
    """(SAR query embeddings (Q, D), true cells (Q,)) of the region ``size``."""
    with np.load(ensure_queries(size)) as z:
        return z["emb"], z["cells"]


def subset_index(src_dir: Path, rows: np.ndarray, out_dir: Path, factory: str = "Flat") -> Path:
    """A real index folder holding only ``rows`` (sorted) of ``src_dir`` (same checkpoint,
    ids, positions; a new FAISS index of ``factory``), written atomically. No re-embedding."""
    import h5py

    from cmpc.index.writer import FeatureWriter, fill_faiss, write_footprints
    from cmpc.index.store import FEATURES_FILE, FOOTPRINTS_FILE, MANIFEST_FILE
    from cmpc.utils.io import atomic_dir, atomic_write_json

    rows = np.sort(np.asarray(rows, dtype=np.int64))
    manifest = json.loads((src_dir / MANIFEST_FILE).read_text())
    with atomic_dir(out_dir) as tmp, h5py.File(src_dir / FEATURES_FILE, "r") as src:
        with h5py.File(tmp / FEATURES_FILE, "w") as h5:
            w = FeatureWriter(h5, int(manifest["embed_dim"]))
            for s in range(0, len(rows), 65_536):
                r = rows[s : s + 65_536]
                get = lambda k: src[k][r]  # noqa: E731 - h5py reads increasing indices
                w.append_arrays(get("features"), ids=get("ids"), positions=get("positions"), bounds=get("bounds"), source=0,
                                names=[x.decode() if isinstance(x, bytes) else x for x in get("names")], file_paths=[""] * len(r))
            filled = fill_faiss(tmp, h5, factory, int(manifest["embed_dim"]))
            for k, v in src.attrs.items():
                h5.attrs[k] = v
            b = h5["bounds"][:]
        write_footprints(tmp / FEATURES_FILE, tmp / FOOTPRINTS_FILE, manifest.get("crs"))
        manifest.update(name=out_dir.name, factory=factory, factory_requested=factory, count=int(len(rows)),
                        counts={"references": int(len(rows)), "added_now": int(len(rows)), "trained_on": filled["trained_on"]},
                        extent=[float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max())])
        manifest["sources"][0]["count"] = int(len(rows))
        manifest["subset_of"] = str(src_dir)
        manifest.pop("shards", None)
        manifest["files"]["index"] = "index.faiss"
        atomic_write_json(tmp / MANIFEST_FILE, manifest)
    return out_dir


def crop_raster(src_path: Path, out_path: Path, width_px: int, height_px: int) -> Path:
    """The north-west ``width_px`` x ``height_px`` window of a GeoTIFF as its own GeoTIFF."""
    import rasterio
    from rasterio.windows import Window

    from cmpc.utils.io import atomic_path

    with rasterio.open(src_path) as src:
        win = Window(0, 0, width_px, height_px)
        prof = {**src.profile, "width": width_px, "height": height_px, "transform": src.window_transform(win)}
        with atomic_path(out_path) as tmp, rasterio.open(tmp, "w", **prof) as dst:
            dst.write(src.read(window=win))
    return out_path


def have_cache() -> bool:
    """Whether the 1M index and all query sets are cached (full benchmarks can run quickly)."""
    return (INDEX_1M / "manifest.json").is_file() and all((BENCH_DIR / f"queries_{s}.npz").is_file() for s in SIZES)


def clustered_vectors(n: int, dim: int, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Quick-mode stand-in when the real cache is absent: (refs (n, D), queries (Q, D)),
    unit vectors around 64 random centres (queries = perturbed references). Rows made
    from these are labelled ``data: synthetic-clustered``, never mixed with real ones."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, dim)).astype(np.float32)
    x = centres[rng.integers(0, 64, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.integers(0, n, n_queries)] + 0.3 * rng.standard_normal((n_queries, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, q


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.parse_args(argv)
    ensure_checkpoint()
    ensure_index_1m()
    for size in SIZES:
        ensure_queries(size)
    info: dict[str, Any] = {"index": str(INDEX_1M), "queries": [str(BENCH_DIR / f"queries_{s}.npz") for s in SIZES]}
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
