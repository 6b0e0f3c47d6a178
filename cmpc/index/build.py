"""The index step: ``cmpc index build``, and :func:`ensure_index` for the steps that need an index.

References are the optical patches of ``exp.index.split`` of ``exp.data.root``. They are
embedded batch by batch (DataLoader, progress bar) and streamed into ``features.h5`` and the
FAISS index, so memory is bounded by the batch size, not the map. Indexes that need training
(IVF, PQ) are trained on a seeded sample read back from ``features.h5``, then filled from it
in chunks (the writing shared with the raster build is :mod:`cmpc.index.writer`).

Everything is built in a temporary folder beside ``index/<name>/`` and renamed into place
at the end: an interrupted or failed build leaves the previous index (if any) untouched and
no partial folder behind. ``add=True`` appends the references of another dataset/split to an
existing index built with the same checkpoint (new rows after the old ones).

Other steps never build an index themselves: whoever composes them (the CLI, the pipeline)
calls :func:`ensure_index` (the test map, for ``cmpc test``) or :func:`ensure_train_index`
(the training map, for refiner training) first and hands the returned folder on. Both build
only when the index is missing or stale (:func:`index_is_current`).

Safety at the seams: the index name must be a plain folder name
(:func:`cmpc.config.validate_index_name`); one build per index at a time
(:func:`cmpc.index.writer.index_lock`, ``index/.<name>.lock``: a second one stops at once
naming the running build's process id); an existing ``index/<name>/`` that is not a cmpc
index (no readable manifest) is never replaced. A checkpoint other than the experiment's
``runs/<name>/emb_best.pt`` gets its own ``index/<name>@<hash[:12]>/``
(:func:`index_experiment`), leaving the experiment's index alone; :func:`serving_index_dir`
finds it again at query time.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np
from torch.utils.data import DataLoader
from tqdm import tqdm

from cmpc.config import Experiment, validate_index_name
from cmpc.data.crs import dataset_crs
from cmpc.data.layout import Annotation, check_root, read_annotations, read_dataset_meta
from cmpc.data.patches import PatchDataset
from cmpc.errors import CmpcError, ConfigError, DataError
from cmpc.index.factory import resolve_factory
from cmpc.index.store import (
    FEATURES_FILE,
    FOOTPRINTS_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    ReferenceIndex,
    check_replaceable,
    read_manifest,
    short_hash,
)
from cmpc.index.writer import FeatureWriter, check_engine, fill_index, finish_replace, index_lock, index_manifest, write_footprints
from cmpc.models.checkpoint import checkpoint_hash, default_checkpoint, embed_batches, load_embedder
from cmpc.utils.io import atomic_dir, atomic_write_json
from cmpc.utils.runtime import resolve_device


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


def hashed_index_name(base: str, ckpt_hash: str) -> str:
    """``<base>@<first 12 hex of the checkpoint's SHA-256>``: the index of a non-default checkpoint."""
    return validate_index_name(f"{base}@{ckpt_hash[:12]}")


def is_default_checkpoint(run_dir: str | os.PathLike[str], ckpt_path: str | os.PathLike[str], ckpt_hash: str) -> bool:
    """Whether ``ckpt_path`` is (or has the bytes of) the run's ``<run_dir>/emb_best.pt``."""
    default = Path(run_dir) / "emb_best.pt"
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
    if current(exp, ckpt_hash) or is_default_checkpoint(exp.run_dir, ckpt_path, ckpt_hash):
        return exp
    return dataclasses.replace(exp, index=dataclasses.replace(exp.index, name=hashed_index_name(exp.index_dir.name, ckpt_hash)))


def serving_index_dir(index_dir: str | os.PathLike[str], ckpt_hash: str) -> Path:
    """The folder that serves checkpoint ``ckpt_hash`` at query time, given the experiment's
    ``index_dir``: ``index/<name>/`` when it was built with that checkpoint (or no other
    candidate exists: loading then names both hashes), else the per-checkpoint
    ``index/<name>@<hash[:12]>/`` that :func:`ensure_index` builds for another checkpoint."""
    own = Path(index_dir)
    hashed = own.with_name(hashed_index_name(own.name, ckpt_hash))
    if not (hashed / MANIFEST_FILE).is_file():
        return own
    try:
        if read_manifest(own).get("checkpoint", {}).get("hash") == ckpt_hash:
            return own
    except CmpcError:
        pass
    return hashed


class IndexReady(NamedTuple):
    """What :func:`ensure_index` hands the next step."""

    directory: Path
    """the index folder serving the checkpoint (``index/<name>/`` or ``index/<name>@<hash[:12]>/``)"""
    built: bool
    """whether it was (re)built just now"""
    reason: str
    """why it was built (missing, another checkpoint, ...); empty when it was current"""


def ensure_index(
    exp: Experiment,
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    is_current: Callable[[Experiment, str], tuple[bool, str]] | None = None,
) -> IndexReady:
    """The index serving embedder ``checkpoint`` (default ``runs/<name>/emb_best.pt``),
    built first only when it is missing or stale (``is_current``, default :func:`index_is_current`).

    The folder is ``exp.index_dir`` when it already serves this checkpoint or the checkpoint
    is the experiment's own (a stale index is then rebuilt), else the per-checkpoint
    ``index/<name>@<hash[:12]>/`` beside it (:func:`index_experiment`).
    """
    ckpt = default_checkpoint(exp.run_dir, checkpoint)
    ckpt_hash = checkpoint_hash(ckpt)
    current = is_current or index_is_current
    iexp = index_experiment(exp, ckpt, ckpt_hash, lambda e, h: current(e, h)[0])
    ok, why = current(iexp, ckpt_hash)
    if not ok:
        print(f"building the index first: {why}", file=sys.stderr)
        build_index(iexp, checkpoint=str(ckpt))
    return IndexReady(iexp.index_dir, not ok, "" if ok else why)


def training_index_experiment(exp: Experiment) -> Experiment:
    """The experiment whose index is the refiner's training map: the optical references of
    the train split of ``data.root`` (never ``index.raster``) in ``index/<index name>-train/``,
    exact (Flat: the training graphs should not carry ANN noise). A copy; ``exp`` is unchanged."""
    index = dataclasses.replace(exp.index, name=f"{exp.index_dir.name}-train", split="train", raster=None, factory="Flat")
    return dataclasses.replace(exp, index=index)


def training_index_is_current(exp: Experiment, ckpt_hash: str) -> tuple[bool, str]:
    """Whether ``exp.index_dir`` holds exactly the train split of ``exp.data.root``, embedded
    by checkpoint ``ckpt_hash``: (ok, reason when not)."""
    d = exp.index_dir
    try:
        man = read_manifest(d)
    except DataError as e:
        return False, str(e)
    src = man.get("sources") or [{}]
    if man.get("checkpoint", {}).get("hash") != ckpt_hash:
        return False, f"{d} was built with checkpoint {short_hash(man.get('checkpoint', {}).get('hash'))}"
    if len(src) != 1 or src[0].get("split") != "train" or Path(src[0].get("root") or "").resolve() != Path(exp.data.root).resolve():
        return False, f"{d} does not hold exactly the train split of {exp.data.root}"
    return True, ""


def ensure_train_index(exp: Experiment, checkpoint: str | os.PathLike[str] | None = None) -> IndexReady:
    """The refiner's training index (:func:`training_index_experiment`) for ``checkpoint``,
    built only when missing or stale; another checkpoint than the experiment's own gets
    ``index/<index name>-train@<hash[:12]>/`` (see :func:`ensure_index`)."""
    return ensure_index(training_index_experiment(exp), checkpoint, is_current=training_index_is_current)


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
    if exp.index.dask and not exp.index.raster:
        raise ConfigError("index.dask (--dask) embeds the blocks of a mosaic: give --raster MAP (index.raster) too")
    if exp.index.raster:
        if add:
            raise DataError("--add with index.raster is not supported: build one index per map, or join the rasters into one first (cmpc data join MAP.tif A.tif B.tif ...) and index that")
        from cmpc.index.raster_build import build_index_from_raster

        return build_index_from_raster(exp, checkpoint=checkpoint)
    with index_lock(out_dir):
        check_replaceable(out_dir)
        return _build_index_from_dataset(exp, out_dir, checkpoint, add)


def _build_index_from_dataset(exp: Experiment, out_dir: Path, checkpoint: str | None, add: bool) -> dict[str, Any]:
    """:func:`build_index` from ``exp.data.root``, under the index lock."""
    check_engine(exp.index)
    ckpt_path = default_checkpoint(exp.run_dir, checkpoint)
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
        old_engine = read_manifest(out_dir).get("engine", "faiss")
        if old_engine != exp.index.engine:
            raise DataError(f"--add: {out_dir} uses index.engine={old_engine} but the experiment asks for {exp.index.engine}; set index.engine={old_engine}")
        old = ReferenceIndex.load(out_dir, expect_hash=meta["hash"], checkpoint_path=ckpt_path)
        old.close()  # only its manifest and features are needed (and a Milvus Lite folder must be free to move)
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
    replaced = old.manifest if old is not None else _manifest_or_none(out_dir)
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
            writer = FeatureWriter(h5, dim)
            stream = embed_batches(model, loader, "opt", device, amp=exp.train.amp)
            for feats, idx in tqdm(stream, total=len(loader), desc=f"index {out_dir.name}", unit="batch", disable=None):
                rows = [int(i) for i in idx]
                writer.append(feats, [refs[i] for i in rows], bounds[rows], len(sources) - 1)
            n_total = writer.rows
            if n_total != n_old + len(refs):
                raise RuntimeError(f"embedded {n_total - n_old} of {len(refs)} references")  # a bug, not user input
            filled = fill_index(
                tmp, h5, factory, dim, index_cfg=exp.index, index_name=out_dir.name, checkpoint_hash=meta["hash"],
                old_dir=out_dir if old is not None else None, old_manifest=old.manifest if old is not None else None,
            )
            h5.attrs["checkpoint_hash"] = meta["hash"]
            h5.attrs["embed_dim"] = dim
            h5.attrs["crs"] = crs or ""
            all_bounds = h5["bounds"][:]
        write_footprints(h5_path, tmp / FOOTPRINTS_FILE, crs)
        manifest = index_manifest(
            out_dir, ckpt_path=ckpt_path, meta=meta, model=model, img_size=img_size, factory=factory, requested=requested,
            index_cfg=exp.index, crs=crs, n_total=n_total, n_added=len(refs), all_bounds=all_bounds, side_m=side_m, side_source=side_source,
            dataset={"root": sources[0].get("root"), "split": sources[0].get("split")}, sources=sources, filled=filled,
            created=old.manifest.get("created", now) if old is not None else now, now=now,
        )
        atomic_write_json(tmp / MANIFEST_FILE, manifest)
    finish_replace(replaced, out_dir, manifest)
    return manifest


def _manifest_or_none(d: Path) -> dict[str, Any] | None:
    """The manifest of an existing index folder, None when there is none (or it is unreadable)."""
    try:
        return read_manifest(d) if (d / MANIFEST_FILE).is_file() else None
    except DataError:
        return None


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
    engine = m.get("engine", "faiss")
    if engine != exp.index.engine:
        return False, f"{d} uses index.engine={engine}, the experiment asks for {exp.index.engine}"
    if engine == "milvus":
        from cmpc.index.milvus import stored_uri

        if (m.get("milvus") or {}).get("uri") != stored_uri(exp.index.uri):
            return False, f"{d} lives in Milvus at {(m.get('milvus') or {}).get('uri')}, the experiment asks for index.uri={exp.index.uri}"
    index_files = () if engine == "milvus" else ((e["file"] for e in m["shards"]) if m.get("shards") else (INDEX_FILE,))
    if any(not (d / f).is_file() for f in (*index_files, FEATURES_FILE, FOOTPRINTS_FILE)):
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
