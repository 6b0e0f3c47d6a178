"""``cmpc index build``: embed every optical reference patch into ``index/<name>/``.

References are the optical patches of ``exp.index.split`` of ``exp.data.root``. They are
embedded batch by batch (DataLoader, progress bar) and streamed into ``features.h5`` and the
FAISS index, so memory is bounded by the batch size, not the map. Indexes that need training
(IVF, PQ) are trained on a seeded sample read back from ``features.h5``, then filled from it
in chunks.

Everything is built in a temporary folder beside ``index/<name>/`` and renamed into place
at the end: an interrupted or failed build leaves the previous index (if any) untouched and
no partial folder behind. ``add=True`` appends the references of another dataset/split to an
existing index built with the same checkpoint (new rows after the old ones).

Safety at the seams: the index name must be a plain folder name
(:func:`cmpc.index.store.validate_index_name`); one build per index at a time
(:func:`index_lock`, ``index/.<name>.lock``: a second one stops at once naming the running
build's process id); an existing ``index/<name>/`` that is not a cmpc index (no readable
manifest) is never replaced. An evaluation with a checkpoint other than the experiment's
``runs/<name>/emb_best.pt`` uses its own ``index/<name>@<hash[:12]>/``
(:func:`index_experiment`), leaving the experiment's index alone.
"""

from __future__ import annotations

import copy
import datetime as _dt
import os
import platform
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import cmpc
from cmpc.config import Experiment
from cmpc.data.layout import Annotation, check_root, read_annotations, read_dataset_meta
from cmpc.data.patches import PatchDataset
from cmpc.errors import CheckpointError, DataError
from cmpc.index.factory import maybe_to_gpu, new_index, resolve_factory, to_cpu, train_index, training_sample_size
from cmpc.index.shards import SHARD_DIR, read_faiss, write_shards
from cmpc.index.store import (
    FEATURES_FILE,
    FOOTPRINTS_FILE,
    INDEX_FILE,
    INDEX_FORMAT,
    MANIFEST_FILE,
    ReferenceIndex,
    check_replaceable,
    normalize_crs,
    read_manifest,
    short_hash,
    validate_index_name,
)
from cmpc.models.checkpoint import checkpoint_hash, embed_batches, load_embedder
from cmpc.utils.io import atomic_dir, atomic_write_json
from cmpc.utils.locks import exclusive, lock_path
from cmpc.utils.runtime import resolve_device

_ADD_CHUNK = 65_536


def default_checkpoint(exp: Experiment, checkpoint: str | os.PathLike[str] | None = None) -> Path:
    """The embedder checkpoint to use: ``checkpoint`` or ``runs/<name>/emb_best.pt`` (must exist)."""
    path = Path(checkpoint) if checkpoint else exp.run_dir / "emb_best.pt"
    if not path.is_file():
        hint = "check the --checkpoint path" if checkpoint else f"train one with `cmpc train emb EXPERIMENT.json` or pass --checkpoint"
        raise CheckpointError(f"no embedder checkpoint at {path}; {hint}")
    return path


def dataset_crs(dataset_meta: dict[str, Any], refs: list[Annotation]) -> str | None:
    """The map CRS from ``dataset.json`` or the annotations' ``crs``; None when unknown."""
    found = {normalize_crs(a.crs) for a in refs if a.crs}
    if dataset_meta.get("crs"):
        found.add(normalize_crs(dataset_meta["crs"]))
    if len(found) > 1:
        raise DataError(f"references mix several CRSs {sorted(found)}; one map must have one CRS")
    return found.pop() if found else None


def patch_side_m(refs: list[Annotation], dataset_meta: dict[str, Any], patch_px: int) -> tuple[float, str]:
    """(side of a reference footprint in metres, where that number came from).

    Order: annotation ``bounds``; annotation ``gsd`` x patch pixels; ``dataset.json``
    ``patch_m`` (or ``gsd_m`` x ``patch_px``); else twice the median spacing of reference
    centres (the CMPC grid overlaps by 50 %); a single reference without any of these is
    assumed 1 m/px.
    """
    sides = [b[2] - b[0] for b in (a.bounds for a in refs) if b is not None]
    if sides:
        return float(np.median(sides)), "annotation bounds"
    if refs and refs[0].gsd:
        return float(refs[0].gsd) * patch_px, "annotation gsd x patch pixels"
    if dataset_meta.get("patch_m"):
        return float(dataset_meta["patch_m"]), "dataset.json patch_m"
    if dataset_meta.get("gsd_m") and dataset_meta.get("patch_px"):
        return float(dataset_meta["gsd_m"]) * float(dataset_meta["patch_px"]), "dataset.json gsd_m x patch_px"
    if len(refs) > 1:
        from scipy.spatial import cKDTree

        pos = np.array([[a.x, a.y] for a in refs])
        dist, _ = cKDTree(pos).query(pos, k=2)
        spacing = float(np.median(dist[:, 1]))
        if spacing > 0:
            return 2.0 * spacing, "estimated: 2 x median reference spacing (50 % overlap)"
    return float(patch_px), "assumed 1 m/px"


def footprint_bounds(refs: list[Annotation], side_m: float) -> np.ndarray:
    """(N, 4) float64 footprints (minx, miny, maxx, maxy) metres: annotation bounds or centre +- side/2."""
    out = np.empty((len(refs), 4), dtype=np.float64)
    h = side_m / 2.0
    for i, a in enumerate(refs):
        out[i] = a.bounds if a.bounds is not None else (a.x - h, a.y - h, a.x + h, a.y + h)
    return out


class _FeatureWriter:
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


def _write_footprints(h5_path: Path, out: Path, crs: str | None) -> None:
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
    exp: Experiment,
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
    """The ``manifest.json`` of an index (see :mod:`cmpc.index.store`)."""
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
        "nprobe": exp.index.nprobe,
        "ef_search": exp.index.ef_search,
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
        "versions": _versions(),
        "created": created,
        "updated": now,
        "files": {"index": INDEX_FILE if not filled["shards"] else SHARD_DIR, "features": FEATURES_FILE, "footprints": FOOTPRINTS_FILE},
    }
    if filled["shards"]:
        manifest["shards"] = filled["shards"]
    return manifest


def index_lock(out_dir: Path):  # noqa: ANN201 - context manager
    """The exclusive build lock of ``index/<name>/``: ``index/.<name>.lock`` beside it.

    A second build of the same index while one runs stops at once with
    :class:`cmpc.utils.locks.BusyError` naming the running build's process id.
    """
    return exclusive(lock_path(out_dir), what="index build", target=out_dir)


def hashed_index_name(base: str, ckpt_hash: str) -> str:
    """``<base>@<first 12 hex of the checkpoint's SHA-256>``: the index of a non-default checkpoint."""
    return validate_index_name(f"{base}@{ckpt_hash[:12]}")


def is_default_checkpoint(exp: Experiment, ckpt_path: str | os.PathLike[str], ckpt_hash: str) -> bool:
    """Whether ``ckpt_path`` is (or has the bytes of) the experiment's ``runs/<name>/emb_best.pt``."""
    default = exp.run_dir / "emb_best.pt"
    try:
        if Path(ckpt_path).resolve() == default.resolve():
            return True
        return default.is_file() and checkpoint_hash(default) == ckpt_hash
    except OSError:
        return False


def index_experiment(
    exp: Experiment, ckpt_path: str | os.PathLike[str], ckpt_hash: str,
    is_current: Callable[[Experiment, str], bool] | None = None,
) -> Experiment:
    """The experiment whose ``index_dir`` serves checkpoint ``ckpt_path`` without clobbering another model's index.

    ``exp`` itself when its index already serves this checkpoint (``is_current``, default
    :func:`index_is_current`) or when the checkpoint is the experiment's default
    ``runs/<name>/emb_best.pt`` (its index is rebuilt when stale); otherwise a copy whose
    index is ``index/<index name>@<checkpoint hash[:12]>/``, beside the experiment's.
    """
    current = is_current or (lambda e, h: index_is_current(e, h)[0])
    if current(exp, ckpt_hash) or is_default_checkpoint(exp, ckpt_path, ckpt_hash):
        return exp
    other = copy.deepcopy(exp)
    other.index.name = hashed_index_name(exp.index_dir.name, ckpt_hash)
    return other


def build_index(exp: Experiment, checkpoint: str | None = None, add: bool = False) -> dict[str, Any]:
    """Embed the optical references of ``exp.index.split`` into ``exp.index_dir``; return the manifest.

    ``checkpoint``: embedder checkpoint (default ``runs/<name>/emb_best.pt``). ``add``: append
    to the existing index (refused when it was built with another checkpoint, another CRS,
    from the same dataset split already, or when location ids would repeat). With
    ``index.raster`` set, the references are cut from that GeoTIFF mosaic instead
    (:func:`cmpc.index.raster_build.build_index_from_raster`).

    One build per index at a time (:func:`index_lock`); an existing ``index/<name>/`` that is
    not a cmpc index is never replaced (:func:`cmpc.index.store.check_replaceable`).
    """
    out_dir = exp.index_dir  # validates the index name
    if exp.index.raster:
        if add:
            raise DataError("--add with index.raster is not supported: build one index per mosaic, or join the mosaics into one VRT (gdalbuildvrt) and index that")
        from cmpc.index.raster_build import build_index_from_raster

        return build_index_from_raster(exp, checkpoint=checkpoint)
    with index_lock(out_dir):
        check_replaceable(out_dir)
        return _build_index_from_dataset(exp, out_dir, checkpoint, add)


def _build_index_from_dataset(exp: Experiment, out_dir: Path, checkpoint: str | None, add: bool) -> dict[str, Any]:
    """:func:`build_index` from ``exp.data.root``, under the index lock."""
    ckpt_path = default_checkpoint(exp, checkpoint)
    device = resolve_device(exp.train.device)
    model, meta = load_embedder(ckpt_path, device)
    img_size = int(meta.get("img_size") or exp.data.img_size)
    dim = int(model.embed_dim)

    root = check_root(exp.data.root)
    split = exp.index.split
    refs = read_annotations(root, split, "opt")
    dsmeta = read_dataset_meta(root)
    crs = dataset_crs(dsmeta, refs)
    dataset = PatchDataset(root, split, "opt", img_size, annotations=refs)
    first = dataset.raw(0)
    if first.shape[0] != model.optical_channels:
        raise DataError(
            f"optical references in {root}/{split} have {first.shape[0]} band(s) but checkpoint {ckpt_path} "
            f"takes {model.optical_channels} optical band(s); use a model trained on this data"
        )
    side_m, side_source = patch_side_m(refs, dsmeta, int(first.shape[-1]))
    bounds = footprint_bounds(refs, side_m)
    source_entry = {"root": str(Path(root).resolve()), "split": split, "count": len(refs)}

    old: ReferenceIndex | None = None
    if add:
        if not (out_dir / MANIFEST_FILE).is_file():
            raise DataError(f"--add: there is no index at {out_dir} to add to; build it first without --add")
        old = ReferenceIndex.load(out_dir, expect_hash=meta["hash"], checkpoint_path=ckpt_path)
        old.check_crs(crs, f"references of {root}/{split}")
        for src in old.manifest["sources"]:
            if src.get("root") == source_entry["root"] and src.get("split") == split:
                raise DataError(f"--add: the references of {root}/{split} are already in {out_dir}; nothing to add")
        clash = np.intersect1d(old.ids, np.array([a.id for a in refs], dtype=np.int64))
        if len(clash):
            raise DataError(
                f"--add: {len(clash)} location id(s) of {root}/{split} already exist in {out_dir} "
                f"(e.g. {', '.join(str(int(c)) for c in clash[:3])}); ids must be unique within an index"
            )
        factory = str(old.manifest["factory"])
        requested = str(old.manifest.get("factory_requested", factory))
    else:
        factory = resolve_factory(exp.index.factory, len(refs), dim)
        requested = exp.index.factory

    loader = DataLoader(
        dataset,
        batch_size=exp.index.batch_size,
        shuffle=False,
        num_workers=exp.data.num_workers,
        pin_memory=device.type == "cuda",
    )
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    with atomic_dir(out_dir) as tmp:
        h5_path = tmp / FEATURES_FILE
        if old is not None:
            shutil.copy2(out_dir / FEATURES_FILE, h5_path)
            sources = list(old.manifest["sources"])
        else:
            sources = []
        n_old = old.ntotal if old is not None else 0
        source_entry["first_row"] = n_old
        source_entry["added"] = now
        sources.append(source_entry)
        with h5py.File(h5_path, "a") as h5:
            writer = _FeatureWriter(h5, dim)
            stream = embed_batches(model, loader, "opt", device, amp=exp.train.amp)
            for feats, idx in tqdm(stream, total=len(loader), desc=f"index {out_dir.name}", unit="batch", disable=None):
                rows = [int(i) for i in idx]
                writer.append(feats, [refs[i] for i in rows], bounds[rows], len(sources) - 1)
            n_total = writer.rows
            if n_total != n_old + len(refs):
                raise RuntimeError(f"embedded {n_total - n_old} of {len(refs)} references")  # a bug, not user input
            filled = fill_faiss(
                tmp, h5, factory, dim, shards=exp.index.shards if old is None else 1, use_gpu=exp.index.use_gpu,
                old_dir=out_dir if old is not None else None, old_manifest=old.manifest if old is not None else None,
            )
            h5.attrs["checkpoint_hash"] = meta["hash"]
            h5.attrs["embed_dim"] = dim
            h5.attrs["crs"] = crs or ""
            all_bounds = h5["bounds"][:]
        _write_footprints(h5_path, tmp / FOOTPRINTS_FILE, crs)
        manifest = index_manifest(
            out_dir, ckpt_path=ckpt_path, meta=meta, model=model, img_size=img_size, factory=factory, requested=requested,
            exp=exp, crs=crs, n_total=n_total, n_added=len(refs), all_bounds=all_bounds, side_m=side_m, side_source=side_source,
            dataset={"root": sources[0].get("root"), "split": sources[0].get("split")}, sources=sources, filled=filled,
            created=old.manifest.get("created", now) if old is not None else now, now=now,
        )
        atomic_write_json(tmp / MANIFEST_FILE, manifest)
    return manifest


def index_is_current(exp: Experiment, checkpoint_hash: str) -> tuple[bool, str]:
    """Whether ``exp.index_dir`` can serve ``exp`` as is: (ok, reason when not).

    Stale when missing, built by another checkpoint, from another dataset root or split, or
    with another explicit factory string.
    """
    d = exp.index_dir
    if not (d / MANIFEST_FILE).is_file():
        return False, f"no index at {d}"
    try:
        m = read_manifest(d)
    except DataError as e:
        return False, str(e)
    if any(not (d / f).is_file() for f in (INDEX_FILE, FEATURES_FILE, FOOTPRINTS_FILE)):
        return False, f"{d} is incomplete"
    if m["checkpoint"].get("hash") != checkpoint_hash:
        return False, f"{d} was built with checkpoint {short_hash(m['checkpoint'].get('hash'))}"
    ds = m.get("dataset", {})
    if exp.index.raster:
        if ds.get("raster") != str(Path(exp.index.raster).resolve()):
            return False, f"{d} was not built from the mosaic {exp.index.raster}"
    elif ds.get("root") != str(Path(exp.data.root).resolve()) or ds.get("split") != exp.index.split:
        return False, f"{d} was built from {ds.get('root')}/{ds.get('split')}"
    if exp.index.factory.lower() != "auto" and exp.index.factory != m.get("factory"):
        return False, f"{d} uses factory {m.get('factory')!r}, the experiment asks for {exp.index.factory!r}"
    return True, ""
