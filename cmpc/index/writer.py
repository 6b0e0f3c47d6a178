"""Writing an index folder: what the dataset build and the raster build share.

Both :mod:`cmpc.index.build` (references from a CMPC dataset split) and
:mod:`cmpc.index.raster_build` (references cut from a GeoTIFF mosaic) stream embeddings into
``features.h5`` with :class:`FeatureWriter`, fill the FAISS index from it in chunks
(:func:`fill_faiss`), draw ``footprints.gpkg`` (:func:`write_footprints`) and describe the
result in ``manifest.json`` (:func:`index_manifest`), all inside the folder that
:func:`cmpc.utils.io.atomic_dir` renames into place; one build per index at a time
(:func:`index_lock`). The formats are those :mod:`cmpc.index.store` reads.
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path
from typing import Any

import faiss
import h5py
import numpy as np
import torch

import cmpc
from cmpc.config import IndexConfig
from cmpc.data.layout import Annotation
from cmpc.errors import ConfigError
from cmpc.index.factory import maybe_to_gpu, new_index, to_cpu, train_index, training_sample_size
from cmpc.index.shards import SHARD_DIR, read_faiss, write_shards
from cmpc.index.store import FEATURES_FILE, FOOTPRINTS_FILE, INDEX_FILE, INDEX_FORMAT
from cmpc.utils.locks import exclusive, lock_path

_ADD_CHUNK = 65_536


class FeatureWriter:
    """Appends reference rows to the resizable datasets of ``features.h5``."""

    STR = h5py.string_dtype("utf-8")

    def __init__(self, h5: h5py.File, dim: int) -> None:
        self.h5 = h5
        if "features" not in h5:
            chunk = 1024
            h5.create_dataset("features", shape=(0, dim), maxshape=(None, dim), dtype=np.float32, chunks=(chunk, dim))
            h5.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(chunk,))
            h5.create_dataset("positions", shape=(0, 2), maxshape=(None, 2), dtype=np.float64, chunks=(chunk, 2))
            h5.create_dataset("bounds", shape=(0, 4), maxshape=(None, 4), dtype=np.float64, chunks=(chunk, 4))
            h5.create_dataset("source", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(chunk,))
            for key in ("names", "file_paths"):
                h5.create_dataset(key, shape=(0,), maxshape=(None,), dtype=self.STR, chunks=(chunk,))

    @property
    def rows(self) -> int:
        return int(self.h5["features"].shape[0])

    def append(self, feats: np.ndarray, refs: list[Annotation], bounds: np.ndarray, source: int) -> None:
        """Append the rows of annotated references (dataset builds)."""
        self.append_arrays(
            feats,
            ids=np.array([a.id for a in refs], dtype=np.int64),
            positions=np.array([[a.x, a.y] for a in refs], dtype=np.float64).reshape(-1, 2),
            bounds=bounds,
            source=source,
            names=[a.name for a in refs],
            file_paths=[a.file_path for a in refs],
        )

    def append_arrays(
        self, feats: np.ndarray, *, ids: np.ndarray, positions: np.ndarray, bounds: np.ndarray, source: int,
        names: list[str], file_paths: list[str],
    ) -> None:
        """Append n rows: features (n, D), ids (n,), positions (n, 2) and bounds (n, 4) metres."""
        n0, n = self.rows, len(feats)
        values: dict[str, Any] = {
            "features": np.asarray(feats, dtype=np.float32),
            "ids": np.asarray(ids, dtype=np.int64),
            "positions": np.asarray(positions, dtype=np.float64).reshape(-1, 2),
            "bounds": np.asarray(bounds, dtype=np.float64).reshape(-1, 4),
            "source": np.full(n, source, dtype=np.int32),
            "names": names,
            "file_paths": file_paths,
        }
        for key, v in values.items():
            ds = self.h5[key]
            ds.resize(n0 + n, axis=0)
            ds[n0 : n0 + n] = v


def _versions() -> dict[str, str]:
    return {
        "cmpc": cmpc.__version__,
        "faiss": faiss.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def write_footprints(h5_path: Path, out: Path, crs: str | None) -> None:
    """``footprints.gpkg`` (layer ``references``): one box per row with row, id, name, x, y."""
    import geopandas as gpd
    import shapely

    with h5py.File(h5_path, "r") as h5:
        b = h5["bounds"][:]
        pos = h5["positions"][:]
        ids = h5["ids"][:]
        names = [s.decode() if isinstance(s, bytes) else s for s in h5["names"][:]]
    gdf = gpd.GeoDataFrame(
        {"row": np.arange(len(ids)), "id": ids, "name": names, "x": pos[:, 0], "y": pos[:, 1]},
        geometry=shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3]),
        crs=crs,
    )
    gdf.to_file(out, driver="GPKG", layer="references", engine="pyogrio")


def fill_faiss(
    folder: Path,
    h5: h5py.File,
    factory: str,
    dim: int,
    *,
    shards: int = 1,
    use_gpu: bool = False,
    old_dir: Path | None = None,
    old_manifest: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train (when the factory needs it) and fill the FAISS index from ``h5["features"]``.

    Writes ``folder/index.faiss``, or ``folder/shards/*.faiss`` when ``shards`` > 1 or the
    old index is sharded. With ``old_dir``/``old_manifest`` (``--add``) the old rows are
    already in the index: only rows after them are added (to a sharded index as new
    shards). Rows are read back from HDF5 in chunks, so memory is the index plus a chunk.
    Returns ``{"trained_on": int, "built_on_gpu": bool, "shards": [entries] | None}``.
    """
    ds = h5["features"]
    n_total = int(ds.shape[0])
    n_old = int(old_manifest["count"]) if old_manifest else 0
    trained_on = int((old_manifest or {}).get("counts", {}).get("trained_on", 0))

    def read_rows(start: int, stop: int) -> np.ndarray:
        return np.asarray(ds[start:stop], dtype=np.float32)

    def trained(index: faiss.Index) -> faiss.Index:
        nonlocal trained_on
        if not index.is_trained:
            # IVF/PQ: train on a seeded sample of the whole map (sorted: HDF5 reads in order).
            n_train = training_sample_size(index, n_total)
            pick = np.sort(np.random.default_rng(0).choice(n_total, size=n_train, replace=False))
            train_index(index, np.asarray(ds[pick], dtype=np.float32), factory)
            trained_on = n_train
        return index

    old_shards = list((old_manifest or {}).get("shards") or [])
    if shards > 1 or old_shards:
        if old_shards:
            assert old_dir is not None
            shutil.copytree(old_dir / SHARD_DIR, folder / SHARD_DIR)
            template = read_faiss(old_dir / old_shards[0]["file"])
            template.reset()  # trained (same quantizer and codebook), empty
        else:
            template = trained(new_index(factory, dim))
        new_entries = write_shards(folder, template, n_total - n_old, max(1, shards), lambda a, b: read_rows(n_old + a, n_old + b),
                                   chunk_rows=_ADD_CHUNK, row0=n_old, first_file=len(old_shards))
        return {"trained_on": trained_on, "built_on_gpu": False, "shards": old_shards + new_entries}
    index = faiss.read_index(str(old_dir / INDEX_FILE)) if old_manifest is not None and old_dir is not None else new_index(factory, dim)
    index = trained(index)
    index, on_gpu = maybe_to_gpu(index, use_gpu)
    for s in range(n_old, n_total, _ADD_CHUNK):
        index.add(read_rows(s, min(n_total, s + _ADD_CHUNK)))
    if index.ntotal != n_total:
        raise RuntimeError(f"faiss holds {index.ntotal} rows but {n_total} references were written")  # a bug
    faiss.write_index(to_cpu(index, on_gpu), str(folder / INDEX_FILE))
    return {"trained_on": trained_on, "built_on_gpu": on_gpu, "shards": None}


def index_manifest(
    out_dir: Path,
    *,
    ckpt_path: Path,
    meta: dict[str, Any],
    model: Any,
    img_size: int,
    factory: str,
    requested: str,
    index_cfg: IndexConfig,
    crs: str | None,
    n_total: int,
    n_added: int,
    all_bounds: np.ndarray,
    side_m: float,
    side_source: str,
    dataset: dict[str, Any],
    sources: list[dict[str, Any]],
    filled: dict[str, Any],
    created: str,
    now: str,
) -> dict[str, Any]:
    """The ``manifest.json`` of an index (see :mod:`cmpc.index.store`); ``index_cfg`` gives its search defaults."""
    manifest: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "name": out_dir.name,
        "checkpoint": {"path": str(ckpt_path), "hash": meta["hash"]},
        "embed_dim": int(model.embed_dim),
        "img_size": img_size,
        "sar_channels": int(model.sar_channels),
        "optical_channels": int(model.optical_channels),
        "metric": "inner_product",
        "metric_note": "inner product of L2-normalised embeddings = cosine similarity",
        "factory": factory,
        "factory_requested": requested,
        "nprobe": index_cfg.nprobe,
        "ef_search": index_cfg.ef_search,
        "crs": crs,
        "count": n_total,
        "counts": {"references": n_total, "added_now": n_added, "trained_on": filled["trained_on"]},
        "extent": [
            float(all_bounds[:, 0].min()),
            float(all_bounds[:, 1].min()),
            float(all_bounds[:, 2].max()),
            float(all_bounds[:, 3].max()),
        ],
        "patch_m": side_m,
        "patch_m_source": side_source,
        "dataset": dataset,
        "sources": sources,
        "built_on_gpu": filled["built_on_gpu"],
        "engine": "milvus" if filled.get("milvus") else "faiss",
        "versions": _versions(),
        "created": created,
        "updated": now,
        "files": {"index": INDEX_FILE if not filled["shards"] else SHARD_DIR, "features": FEATURES_FILE, "footprints": FOOTPRINTS_FILE},
    }
    if filled["shards"]:
        manifest["shards"] = filled["shards"]
    if filled.get("milvus"):
        m = filled["milvus"]
        manifest["milvus"] = m
        manifest["files"]["index"] = f"milvus collection {m['collection']} at {m['uri']}"
        manifest["versions"].update(_milvus_versions())
    return manifest


def _milvus_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("pymilvus", "milvus-lite"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def fill_index(
    folder: Path,
    h5: h5py.File,
    factory: str,
    dim: int,
    *,
    index_cfg: IndexConfig,
    index_name: str,
    checkpoint_hash: str,
    old_dir: Path | None = None,
    old_manifest: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fill the vector engine of ``index_cfg`` from ``h5["features"]``: :func:`fill_faiss`
    (``index.engine = "faiss"``), or a new Milvus collection with every row
    (:func:`cmpc.index.milvus.fill_milvus`; ``--add`` re-inserts the old rows too)."""
    if index_cfg.engine == "milvus":
        from cmpc.index.milvus import fill_milvus

        return fill_milvus(folder, h5, factory, dim, index_name=index_name, uri=index_cfg.uri, checkpoint_hash=checkpoint_hash)
    return fill_faiss(folder, h5, factory, dim, shards=index_cfg.shards if old_manifest is None else 1, use_gpu=index_cfg.use_gpu,
                      old_dir=old_dir, old_manifest=old_manifest)


def check_engine(index_cfg: IndexConfig, old_manifest: dict[str, Any] | None = None) -> None:
    """One-line ConfigError, before any embedding, for engine settings that cannot work."""
    if index_cfg.engine != "milvus":
        return  # index.uri is only read by the milvus engine
    from cmpc.index.milvus import _pymilvus, check_uri, milvus_index_spec

    _pymilvus()
    check_uri(index_cfg.uri)
    if index_cfg.shards > 1:
        raise ConfigError("index.shards splits FAISS files; with index.engine=milvus leave it at 1 (Milvus shards its collections itself)")
    if index_cfg.factory.lower() != "auto":
        milvus_index_spec(index_cfg.factory, 0, 8)


def finish_replace(old_manifest: dict[str, Any] | None, out_dir: Path, manifest: dict[str, Any]) -> None:
    """After a new index is in place: drop Milvus collections it replaced (see :func:`cmpc.index.milvus.drop_replaced`)."""
    if manifest.get("engine") == "milvus" or (old_manifest or {}).get("engine") == "milvus":
        from cmpc.index.milvus import drop_replaced

        drop_replaced(old_manifest, out_dir, manifest)


def index_lock(out_dir: Path):  # noqa: ANN201 - context manager
    """The exclusive build lock of ``index/<name>/``: ``index/.<name>.lock`` beside it.

    A second build of the same index while one runs stops at once with
    :class:`cmpc.utils.locks.BusyError` naming the running build's process id.
    """
    return exclusive(lock_path(out_dir), what="index build", target=out_dir)
