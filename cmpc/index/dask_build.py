"""``cmpc index build --raster MAP --dask [SCHEDULER]``: embed a mosaic's blocks on a Dask cluster.

The raster build (:mod:`cmpc.index.raster_build`) cuts the mosaic into blocks
(``tile.block_px``); here each block still to do is one Dask task. A worker loads the
embedder checkpoint once (cached per worker process, checked against the hash the client
read, so every worker embeds with the same model), opens the mosaic itself with rasterio and
reads only its block's window (:func:`cmpc.index.raster_build.embed_block`, the code the
in-process build runs), and sends back the block's embeddings. The client is the single
writer: it commits each finished block as the same chunk file the in-process build writes,
then fills the FAISS index or the Milvus collection (Milvus Lite allows one process per
database file) and renames the folder into place. Interrupted, the same command resumes:
finished blocks are skipped, whether they were embedded by Dask or in-process.

``index.dask = "local"`` starts a ``LocalCluster`` on this machine (``index.dask_workers``
worker processes, default cores / ``index.dask_threads``; one Dask thread each, running
``index.dask_threads`` torch threads); any other value is a scheduler address
(``tcp://host:8786``) whose workers see the mosaic and the checkpoint at the same paths as
the client (docs/SCALE.md). At most a few blocks per worker are in flight, so the client's
memory does not grow with the mosaic.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmpc.config import IndexConfig
from cmpc.errors import CmpcError, ConfigError, DataError

INSTALL_HINT = "pip install 'cmpc[dask]' (dask + distributed)"
#: Blocks in flight per worker (a little queue so no worker waits for the client).
IN_FLIGHT_PER_WORKER = 2
#: How long the client tries to reach a scheduler address before giving up.
CONNECT_TIMEOUT_S = 20


@dataclass(frozen=True)
class BlockJob:
    """What a worker needs to embed blocks of one build (sent with every task; small)."""

    raster: str
    bands: list[int]
    checkpoint: str
    checkpoint_hash: str
    patch_px: int
    nodata_max_frac: float
    img_size: int
    batch_size: int
    device: str
    amp: bool
    threads: int


def check_dask(value: str) -> None:
    """One-line ConfigError when Dask is missing or ``index.dask`` is not ``local`` / an address."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise ConfigError(f"index.dask needs dask.distributed: {INSTALL_HINT}") from None
    v = str(value).strip()
    if v == "local":
        return
    if "://" in v:
        scheme = v.split("://", 1)[0]
        if scheme not in ("tcp", "tls", "ucx", "ws", "wss", "inproc"):
            raise ConfigError(f"index.dask {v!r}: unknown scheme {scheme!r}; use 'local' or a scheduler address tcp://host:8786")
        return
    host, _, port = v.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"index.dask {v!r} is neither 'local' nor a scheduler address (tcp://host:8786)")


# --------------------------------------------------------------------------- worker side

_CACHE: dict[Any, Any] = {}
_CACHE_LOCK = threading.Lock()


def _tune_malloc() -> None:
    """Undo what Dask's nanny sets for its workers, ``MALLOC_TRIM_THRESHOLD_=65536``: it also
    pins glibc's mmap threshold at 128 kB, so every batch's tensors are fresh mmaps (page
    faults) and a worker embedded at half the in-process speed (366 vs 748 patches/s measured,
    docs/BENCHMARKS.md "Dask"). Big buffers go back to the heap (mmap threshold 32 MB, trim
    threshold 128 MB). glibc only; elsewhere a no-op."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 2**20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _worker_model(job: BlockJob):  # noqa: ANN202 - (model, device)
    """The embedder of ``job``, loaded once per worker process (and checked against the client's hash)."""
    key = ("model", job.checkpoint, job.checkpoint_hash, job.device)
    with _CACHE_LOCK:
        if key not in _CACHE:
            import torch

            _tune_malloc()

            from cmpc.models.checkpoint import load_embedder
            from cmpc.utils.runtime import resolve_device

            torch.set_num_threads(int(job.threads))
            device = resolve_device(job.device)
            if not Path(job.checkpoint).is_file():
                raise DataError(f"Dask worker on {os.uname().nodename}: checkpoint {job.checkpoint} not found; every worker needs it at the same path")
            model, meta = load_embedder(job.checkpoint, device)
            if meta["hash"] != job.checkpoint_hash:
                raise DataError(
                    f"Dask worker on {os.uname().nodename}: {job.checkpoint} has hash {meta['hash'][:12]}, the client's has "
                    f"{job.checkpoint_hash[:12]}; give every worker the same checkpoint file"
                )
            _CACHE[key] = (model, device)
        return _CACHE[key]


@contextlib.contextmanager
def _worker_raster(job: BlockJob) -> Iterator[Any]:
    """The mosaic, opened by this worker thread once and kept (rasterio datasets are per thread)."""
    if not Path(job.raster).is_file():
        raise DataError(f"Dask worker on {os.uname().nodename}: mosaic {job.raster} not found; every worker needs it at the same path")
    key = ("raster", job.raster, tuple(job.bands), os.stat(job.raster).st_mtime_ns, threading.get_ident())
    src = _CACHE.get(key)
    if src is None:
        from cmpc.data.raster import open_raster

        src = open_raster(job.raster, bands=job.bands, role="optical map")
        _CACHE[key] = src
    yield src


def embed_block_task(job: BlockJob, b: int, tops: np.ndarray, lefts: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """A Dask task: embed block ``b`` (its patches' top/left pixels); (b, features, kept local indices)."""
    from cmpc.index.blocks import embed_block

    model, device = _worker_model(job)
    with _worker_raster(job) as src:
        feats, keep = embed_block(src, tops, lefts, np.arange(len(tops)), job.patch_px, job.nodata_max_frac, model,
                                  job.img_size, job.batch_size, device, job.amp)
    return b, feats, keep


# --------------------------------------------------------------------------- client side


@contextlib.contextmanager
def dask_client(cfg: IndexConfig) -> Iterator[tuple[Any, dict[str, Any]]]:
    """A ``distributed.Client`` for ``cfg.dask`` (a LocalCluster for ``local``) and a description."""
    check_dask(str(cfg.dask))
    from distributed import Client, LocalCluster

    for name in ("distributed", "distributed.worker", "distributed.scheduler", "distributed.nanny", "distributed.core"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if cfg.dask == "local":
        n = int(cfg.dask_workers or max(1, (os.cpu_count() or 1) // max(1, cfg.dask_threads)))
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR)
        try:
            with Client(cluster) as client:
                yield client, {"scheduler": "local", "workers": n, "threads_per_worker": int(cfg.dask_threads)}
        finally:
            cluster.close()
        return
    try:
        client = Client(str(cfg.dask), timeout=f"{CONNECT_TIMEOUT_S}s")
    except (OSError, TimeoutError) as e:
        raise DataError(f"cannot reach the Dask scheduler at {cfg.dask} ({type(e).__name__}: {' '.join(str(e).split())[:160]}); start it (dask scheduler) or use --dask without an address for a local cluster") from None
    try:
        workers = client.scheduler_info().get("workers", {})
        if not workers:
            client.wait_for_workers(1, timeout="60s")
            workers = client.scheduler_info().get("workers", {})
        yield client, {"scheduler": str(cfg.dask), "workers": len(workers), "threads_per_worker": int(cfg.dask_threads)}
    finally:
        client.close()


def embed_blocks_dask(
    cfg: IndexConfig,
    job: BlockJob,
    tops: np.ndarray,
    lefts: np.ndarray,
    groups: list[np.ndarray],
    todo: list[int],
    work: Path,
    bar: Any,
    on_block: Callable[[int, int], None] | None,
    n_done: int,
) -> dict[str, Any]:
    """Embed blocks ``todo`` on the cluster; commit each as its chunk file as it arrives (this
    process is the only writer). Returns the manifest's ``raster_build.dask`` entry."""
    from distributed import as_completed

    from cmpc.index.blocks import write_chunk

    with dask_client(cfg) as (client, info):
        n_workers = max(1, int(info["workers"]))
        pending = iter(todo)
        futures: list[Any] = []

        def submit_next() -> bool:
            b = next(pending, None)
            if b is None:
                return False
            idx = groups[b]
            fut = client.submit(embed_block_task, job, b, tops[idx], lefts[idx], pure=False, key=f"cmpc-block-{b}-{os.getpid()}-{id(job)}")
            futures.append(fut)
            ac.add(fut)
            return True

        ac = as_completed()
        try:
            for _ in range(IN_FLIGHT_PER_WORKER * n_workers):
                if not submit_next():
                    break
            for fut in ac:
                try:
                    b, feats, keep = fut.result()
                except CmpcError:
                    raise
                except Exception as e:  # a worker crash, a lost connection: one line, the finished blocks stay
                    raise DataError(f"a Dask task failed ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                                    "run the same command again to resume") from None
                write_chunk(work, b, feats, groups[b][keep])
                fut.release()
                n_done += 1
                bar.update(len(groups[b]))
                if on_block is not None:
                    on_block(n_done, len(groups))
                submit_next()
        finally:
            live = [f for f in futures if not f.done()]
            if live:
                client.cancel(live)
    return info
