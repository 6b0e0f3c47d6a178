"""``cmpc index build --raster MAP.tif``: index an optical mosaic of any size, resumably.

The references are a regular grid of ``patch_px`` windows every ``stride_px`` pixels over
the mosaic (its own grid; a mosaic whose CRS is not in ground metres (geographic, feet, Mercator) is viewed in its local UTM zone, see
:func:`cmpc.data.raster.open_raster`). Nothing ever holds the mosaic: it is read block by
block (``tile.block_px`` + one patch a side), each block's patches are embedded in batches
of ``index.batch_size`` and written to a chunk file, then the block is dropped.

One build per index name at a time: the build holds ``index/.<name>.lock`` (see
:func:`cmpc.index.writer.index_lock`); a second one stops at once naming the first's process id.

Resumable: the work happens in ``index/.<name>.building/`` beside the final folder. Each
finished block is one chunk file ``chunks/block_NNNNNN.npz`` written atomically (temp file
+ rename), so after an interruption (Ctrl-C, crash, power loss) every chunk on disk is whole
and the next run with the same parameters (``params.json``: raster, its size and mtime,
checkpoint hash, patch, stride, bands, block size) skips the finished blocks. Other
parameters start over. When every block is done the chunks are assembled into
``features.h5``, the FAISS index (or shards) is filled from it, and the complete folder is
renamed into ``index/<name>/`` in one step (the previous index stays until then); the work
folder is removed last.

Ids: a reference's location id is its grid cell number ``row_index * n_cols + col_index``
(stable across runs; cells skipped as nodata leave gaps). Names are ``r<top>_c<left>``
(pixel offsets of the window in the mosaic).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from cmpc.config import Experiment
from cmpc.data.layout import read_dataset_meta
from cmpc.data.crs import normalize_crs
from cmpc.data.raster import block_groups, crs_name, grid_positions, open_raster
from cmpc.errors import DataError
from cmpc.index.blocks import CHUNK_DIR, chunk_path, embed_arrays, embed_block, prepare_batch, write_chunk  # noqa: F401 - re-exported
from cmpc.index.factory import resolve_factory
from cmpc.index.store import FEATURES_FILE, FOOTPRINTS_FILE, MANIFEST_FILE, check_replaceable, read_manifest
from cmpc.index.writer import FeatureWriter, check_engine, fill_index, finish_replace, index_lock, index_manifest, write_footprints
from cmpc.models.checkpoint import default_checkpoint, load_embedder
from cmpc.utils.io import atomic_dir, atomic_write_json
from cmpc.utils.runtime import resolve_device

PARAMS_FILE = "params.json"


def work_dir(out_dir: Path) -> Path:
    """The resumable work folder of a raster build of ``out_dir``."""
    return out_dir.parent / f".{out_dir.name}.building"


def reference_patch_px(exp: Experiment, gsd_m: float, img_size: int) -> tuple[int, str]:
    """(reference patch side in pixels of the mosaic, where it came from).

    ``index.patch_px``; else the training dataset's footprint (``dataset.json`` ``patch_m``
    of ``data.root``) over the mosaic GSD, so references cover the ground the model was
    trained on; else the model input size.
    """
    if exp.index.patch_px:
        return int(exp.index.patch_px), "index.patch_px"
    try:
        meta = read_dataset_meta(exp.data.root)
    except DataError:
        meta = {}
    if meta.get("patch_m"):
        return max(8, int(round(float(meta["patch_m"]) / gsd_m))), f"dataset.json patch_m of {exp.data.root} / mosaic GSD"
    return int(img_size), "model input size"


def _done_blocks(work: Path, n_blocks: int) -> set[int]:
    """The blocks whose chunk file exists (chunks are written atomically; a Dask build
    finishes blocks out of order, so any subset may be done)."""
    folder = work / CHUNK_DIR
    if not folder.is_dir():
        return set()
    done = set()
    for f in folder.glob("block_*.npz"):
        try:
            b = int(f.stem.split("_", 1)[1])
        except ValueError:
            continue
        if 0 <= b < n_blocks:
            done.add(b)
    return done


def build_index_from_raster(
    exp: Experiment,
    raster: str | os.PathLike[str] | None = None,
    checkpoint: str | None = None,
    on_block: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Index the optical mosaic ``raster`` (default ``index.raster``) into ``exp.index_dir``.

    See the module doc. ``on_block(done, total)`` is called after each block is committed
    (progress hooks; an exception raised there interrupts the build like a crash would).
    Returns the manifest; its ``raster_build`` entry says how many blocks were resumed.
    Holds the index's build lock throughout (the work folder is never shared by two builds)
    and never replaces an ``index/<name>/`` that is not a cmpc index.
    """
    out_dir = exp.index_dir  # validates the index name
    check_engine(exp.index)
    if exp.index.dask:
        from cmpc.index.dask_build import check_dask

        check_dask(exp.index.dask)
    with index_lock(out_dir):
        check_replaceable(out_dir)
        return _build_from_raster(exp, out_dir, raster, checkpoint, on_block)


def _build_from_raster(
    exp: Experiment,
    out_dir: Path,
    raster: str | os.PathLike[str] | None,
    checkpoint: str | None,
    on_block: Callable[[int, int], None] | None,
) -> dict[str, Any]:
    """:func:`build_index_from_raster` under the index lock."""
    path = Path(raster or exp.index.raster or "")
    if not str(path) or not path.is_file():
        raise DataError(f"optical mosaic not found: {path} (index.raster / --raster)")
    ckpt_path = default_checkpoint(exp.run_dir, checkpoint)
    device = resolve_device(exp.train.device)
    model, meta = load_embedder(ckpt_path, device)
    img_size = int(meta.get("img_size") or exp.data.img_size)
    dim = int(model.embed_dim)
    amp = bool(exp.train.amp)

    with open_raster(path, bands=exp.index.bands, role="optical map") as src:
        if src.count != model.optical_channels:
            raise DataError(
                f"the optical mosaic {path} has {src.count} band(s) (index.bands {exp.index.bands}) but checkpoint "
                f"{ckpt_path} takes {model.optical_channels} optical band(s); select bands with index.bands or use a matching model"
            )
        g = src.grid
        patch_px, patch_source = reference_patch_px(exp, g.gsd_m, img_size)
        stride_px = int(exp.index.stride_px or max(1, patch_px // 2))
        tops, lefts = grid_positions(g.height, g.width, patch_px, stride_px)
        if len(tops) == 0:
            raise DataError(f"the optical mosaic {path} ({g.width} x {g.height} px) is smaller than one {patch_px} px reference patch")
        n_cols = (g.width - patch_px) // stride_px + 1
        cell_ids = (tops // stride_px) * n_cols + (lefts // stride_px)
        block_px = max(int(exp.tile.block_px), stride_px)
        groups = block_groups(tops, lefts, block_px)
        crs = normalize_crs(crs_name(g.crs))
        st = path.stat()
        params = {
            "raster": str(path.resolve()), "raster_bytes": st.st_size, "raster_mtime_ns": st.st_mtime_ns,
            "checkpoint_hash": meta["hash"], "patch_px": patch_px, "stride_px": stride_px, "bands": list(src.bands),
            "block_px": block_px, "img_size": img_size, "nodata_max_frac": exp.tile.nodata_max_frac, "crs": crs,
        }
        work = work_dir(out_dir)
        done: set[int] = set()
        if work.is_dir() and exp.index.resume and (work / PARAMS_FILE).is_file():
            try:
                same = json.loads((work / PARAMS_FILE).read_text()) == params
            except (json.JSONDecodeError, UnicodeDecodeError):
                same = False
            if same:
                done = _done_blocks(work, len(groups))
        resumed = len(done)
        if resumed == 0:
            shutil.rmtree(work, ignore_errors=True)
            (work / CHUNK_DIR).mkdir(parents=True)
            atomic_write_json(work / PARAMS_FILE, params)
        bar = tqdm(total=len(tops), desc=f"index {out_dir.name} (raster)", unit="ref", disable=None, mininterval=2.0)
        bar.update(sum(len(groups[b]) for b in done))
        todo = [b for b in range(len(groups)) if b not in done]
        if exp.index.dask:
            from cmpc.index.dask_build import BlockJob, embed_blocks_dask

            job = BlockJob(
                raster=params["raster"], bands=list(src.bands), checkpoint=str(Path(ckpt_path).resolve()), checkpoint_hash=meta["hash"],
                patch_px=patch_px, nodata_max_frac=float(exp.tile.nodata_max_frac), img_size=img_size, batch_size=int(exp.index.batch_size),
                device=exp.train.device, amp=amp, threads=int(exp.index.dask_threads),
            )
            dask_info = embed_blocks_dask(exp.index, job, tops, lefts, groups, todo, work, bar, on_block, n_done=resumed)
        else:
            dask_info = None
            for n, b in enumerate(todo, start=resumed + 1):
                idx = groups[b]
                feats, keep_a = embed_block(src, tops, lefts, idx, patch_px, exp.tile.nodata_max_frac, model, img_size,
                                            exp.index.batch_size, device, amp)
                write_chunk(work, b, feats, keep_a)
                bar.update(len(idx))
                if on_block is not None:
                    on_block(n, len(groups))
        bar.close()

    # ---- every block is on disk: assemble features.h5, fill FAISS, rename into place
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    source = {
        "raster": params["raster"], "bands": params["bands"], "patch_px": patch_px, "stride_px": stride_px,
        "gsd_m": g.gsd_m, "grid": [int(g.height), int(g.width)], "first_row": 0, "added": now,
    }
    replaced = _manifest_or_none(out_dir)
    with atomic_dir(out_dir) as tmp:
        h5_path = tmp / FEATURES_FILE
        with h5py.File(h5_path, "w") as h5:
            writer = FeatureWriter(h5, dim)
            for b in range(len(groups)):
                with np.load(chunk_path(work, b)) as z:
                    feats, cells = z["features"], z["cells"]
                if len(cells) == 0:
                    continue
                t, l = tops[cells], lefts[cells]
                xs = g.transform.c + (l + patch_px / 2.0) * g.res_x
                ys = g.transform.f - (t + patch_px / 2.0) * g.res_y
                bounds = np.stack([xs - patch_px * g.res_x / 2, ys - patch_px * g.res_y / 2, xs + patch_px * g.res_x / 2, ys + patch_px * g.res_y / 2], axis=1)
                writer.append_arrays(
                    feats, ids=cell_ids[cells], positions=np.stack([xs, ys], axis=1), bounds=bounds, source=0,
                    names=[f"r{int(a)}_c{int(c)}" for a, c in zip(t, l)], file_paths=[""] * len(cells),
                )
            n_total = writer.rows
            if n_total == 0:
                raise DataError(f"every reference patch of {path} is mostly nodata (tile.nodata_max_frac {exp.tile.nodata_max_frac}); nothing to index")
            factory = resolve_factory(exp.index.factory, n_total, dim)
            filled = fill_index(tmp, h5, factory, dim, index_cfg=exp.index, index_name=out_dir.name, checkpoint_hash=meta["hash"])
            h5.attrs["checkpoint_hash"] = meta["hash"]
            h5.attrs["embed_dim"] = dim
            h5.attrs["crs"] = crs or ""
            all_bounds = h5["bounds"][:]
        write_footprints(h5_path, tmp / FOOTPRINTS_FILE, crs)
        source["count"] = n_total
        manifest = index_manifest(
            out_dir, ckpt_path=ckpt_path, meta=meta, model=model, img_size=img_size, factory=factory,
            requested=exp.index.factory, index_cfg=exp.index, crs=crs, n_total=n_total, n_added=n_total, all_bounds=all_bounds,
            side_m=float(patch_px * g.gsd_m), side_source=f"raster patch {patch_px} px ({patch_source}) x {g.gsd_m:g} m/px",
            dataset={"root": None, "split": None, "raster": params["raster"]}, sources=[source], filled=filled, created=now, now=now,
        )
        manifest["raster_build"] = {"blocks": len(groups), "resumed_blocks": resumed, "grid_cells": int(len(tops)), "block_px": block_px}
        if dask_info is not None:
            manifest["raster_build"]["dask"] = dask_info
        atomic_write_json(tmp / MANIFEST_FILE, manifest)
    finish_replace(replaced, out_dir, manifest)
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def _manifest_or_none(d: Path) -> dict[str, Any] | None:
    try:
        return read_manifest(d) if (d / MANIFEST_FILE).is_file() else None
    except DataError:
        return None
