"""Data of the engine and Dask benchmarks (issue 14), cached under data/bench/ and index/ (git-ignored).

- ``data/bench/mosaic_4096/{optical,sar}.tif``: a 4096 x 4096 px mosaic at 1 m. With the
  8192 px benchmark mosaic cached (:mod:`benchmarks.data`) it is its north-west crop; else
  (this machine) 2 x 2 worlds made by :func:`benchmarks.mosaic.make_mosaic` (seeds 1000-1003).
- ``index/bench_engine_refs``: references cut from that optical mosaic every 12 px by
  ``cmpc index build --raster`` with a trained embedder (``runs/bench/emb_best.pt``, 64 px
  patches, when cached; else the demo's ``runs/demo/emb_best.pt``, 128 px patches, its
  training footprint); the north-west square of 317 x 317 cells is the 100k map
  (100,489 references).
- ``data/bench/engine_queries.npz``: 1000 SAR patches of the SAR mosaic at random cells of
  that square, embedded with the SAR branch (real cross-modal queries, with their true cell).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import data as bdata

MOSAIC = bdata.BENCH_DIR / "mosaic_4096"
REFS = Path("index/bench_engine_refs")
QUERIES = bdata.BENCH_DIR / "engine_queries.npz"
STRIDE_PX = 12
REGION = 317  # cells per side of the 100k map
N_QUERIES = 1000


def ensure_mosaic() -> Path:
    """The 4096 px optical/SAR pair (folder)."""
    if (MOSAIC / "optical.tif").is_file() and (MOSAIC / "sar.tif").is_file():
        return MOSAIC
    big = bdata.MOSAIC
    if (big / "optical.tif").is_file() and (big / "sar.tif").is_file():
        MOSAIC.mkdir(parents=True, exist_ok=True)
        for name in ("optical.tif", "sar.tif"):
            bdata.crop_raster(big / name, MOSAIC / name, 4096, 4096)
        (MOSAIC / "mosaic.json").write_text(json.dumps({"crop_of": str(big), "px": 4096}))
        return MOSAIC
    from benchmarks.mosaic import make_mosaic

    make_mosaic(MOSAIC, tiles=2)
    return MOSAIC


def embedder() -> tuple[Path, int, str]:
    """(trained checkpoint, reference patch px, description)."""
    bench = bdata.checkpoint_path()
    if bench.is_file():
        return bench, 64, "benchmark embedder runs/bench/emb_best.pt (mobilenetv3_small_100, 64 px, D=256)"
    demo = Path("runs/demo/emb_best.pt")
    if demo.is_file():
        return demo, 128, "demo embedder runs/demo/emb_best.pt (cmpc_cnn_s, 128 px, D=256)"
    raise RuntimeError("no trained embedder: run `make demo` (runs/demo) or `python -m benchmarks.data` (runs/bench) first")


def _experiment(name: str, raster: Path, patch: int, stride: int, *extra: str):  # noqa: ANN202 - Experiment
    from cmpc.config import load_experiment

    return load_experiment(None, [f"name={name}", "train.device=cpu", f"index.raster={raster.resolve()}", f"index.patch_px={patch}",
                                  f"index.stride_px={stride}", "index.factory=Flat", "index.batch_size=128", *extra])


def ensure_refs() -> dict[str, Any]:
    """Build index/bench_engine_refs when missing (resumable); its manifest."""
    if (REFS / "manifest.json").is_file():
        return json.loads((REFS / "manifest.json").read_text())
    from cmpc.index.raster_build import build_index_from_raster

    ensure_mosaic()
    ckpt, patch, _ = embedder()
    t0 = time.perf_counter()
    m = build_index_from_raster(_experiment(REFS.name, MOSAIC / "optical.tif", patch, STRIDE_PX), checkpoint=str(ckpt))
    rec = {"wall_s": round(time.perf_counter() - t0, 1), "references": m["count"], "load_avg_end": list(os.getloadavg())}
    (bdata.BENCH_DIR / "engine_refs_build.json").write_text(json.dumps(rec, indent=2))
    return m


def region_rows(ids: np.ndarray, n_cols: int, side: int = REGION) -> np.ndarray:
    r, c = np.divmod(ids, n_cols)
    return np.flatnonzero((r < side) & (c < side))


def grid_cols(manifest: dict[str, Any]) -> int:
    src = manifest["sources"][0]
    h, w = src["grid"]
    return (w - src["patch_px"]) // src["stride_px"] + 1


def load_map() -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """(features (N, D), positions (N, 2), ids (N,), manifest) of the 100k map (region rows only)."""
    import h5py

    m = ensure_refs()
    with h5py.File(REFS / "features.h5", "r") as h5:
        ids = np.asarray(h5["ids"][:], dtype=np.int64)
        sel = region_rows(ids, grid_cols(m))
        feats = np.asarray(h5["features"][:], dtype=np.float32)[sel]
        pos = np.asarray(h5["positions"][:], dtype=np.float64)[sel]
    return feats, pos, ids[sel], m


def ensure_queries(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(SAR query embeddings (Q, D), true cell ids (Q,)) at random cells of the 100k map."""
    if not QUERIES.is_file():
        import torch

        from cmpc.data.raster import open_raster
        from cmpc.index.raster_build import prepare_batch
        from cmpc.models.checkpoint import load_embedder
        from cmpc.utils.io import atomic_path

        m = ensure_refs()
        n_cols = grid_cols(m)
        src = m["sources"][0]
        patch, stride = src["patch_px"], src["stride_px"]
        rng = np.random.default_rng(seed)
        r, c = rng.integers(0, REGION, N_QUERIES), rng.integers(0, REGION, N_QUERIES)
        model, meta = load_embedder(embedder()[0], "cpu")
        embs = []
        with open_raster(MOSAIC / "sar.tif", role="SAR mosaic") as s, torch.no_grad():
            for a in range(0, N_QUERIES, 128):
                arrays = [s.read_on(s.grid, int(rr) * stride, int(cc) * stride, patch, patch)[0] for rr, cc in zip(r[a : a + 128], c[a : a + 128])]
                embs.append(model(prepare_batch(arrays, int(meta["img_size"])), "sar").numpy())
        with atomic_path(QUERIES) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, emb=np.concatenate(embs).astype(np.float32), cells=(r * n_cols + c).astype(np.int64))
    with np.load(QUERIES) as z:
        return z["emb"], z["cells"]


def write_index_folder(out: Path, feats: np.ndarray, pos: np.ndarray, ids: np.ndarray, manifest: dict[str, Any], index_cfg: Any,
                       factory: str) -> tuple[dict[str, Any], float]:
    """An index folder over the given rows (no re-embedding) with the engine of ``index_cfg``:
    (manifest, seconds the engine took to build: fill_faiss / Milvus create + insert + index + load)."""
    import h5py

    from cmpc.index.store import FEATURES_FILE, MANIFEST_FILE
    from cmpc.index.writer import FeatureWriter, fill_index, index_manifest
    from cmpc.utils.io import atomic_write_json

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    n = len(feats)
    with h5py.File(out / FEATURES_FILE, "w") as h5:
        FeatureWriter(h5, feats.shape[1]).append_arrays(feats, ids=ids, positions=pos, bounds=np.concatenate([pos - 32, pos + 32], axis=1),
                                                        source=0, names=[""] * n, file_paths=[""] * n)
        t0 = time.perf_counter()
        filled = fill_index(out, h5, factory, feats.shape[1], index_cfg=index_cfg, index_name=out.name, checkpoint_hash=manifest["checkpoint"]["hash"])
        secs = time.perf_counter() - t0
        b = h5["bounds"][:]
    (out / "footprints.gpkg").write_bytes(b"")  # not read by search

    class _M:  # what index_manifest reads of the model
        embed_dim, sar_channels, optical_channels = feats.shape[1], 1, 3

    man = index_manifest(out, ckpt_path=Path(manifest["checkpoint"]["path"]), meta={"hash": manifest["checkpoint"]["hash"]}, model=_M,
                         img_size=manifest["img_size"], factory=factory, requested=factory, index_cfg=index_cfg, crs=manifest.get("crs"),
                         n_total=n, n_added=n, all_bounds=b, side_m=64.0, side_source="bench", dataset={}, sources=manifest["sources"],
                         filled=filled, created="", now="")
    atomic_write_json(out / MANIFEST_FILE, man)
    return man, secs
