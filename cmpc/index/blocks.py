"""One block of a raster build: read its window, embed its patches, commit its chunk file.

Shared by the in-process raster build (:mod:`cmpc.index.raster_build`) and the Dask workers
(:mod:`cmpc.index.dask_build`), so both embed a block with exactly the same code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cmpc.data.patches import standardize
from cmpc.models.embedder import Embedder
from cmpc.utils.io import atomic_path

CHUNK_DIR = "chunks"


def prepare_batch(arrays: list[np.ndarray], img_size: int) -> torch.Tensor:
    """(C, p, p) float32 patches (NaN = nodata) -> (B, C, S, S) model input.

    Nodata pixels take their band's mean over the patch (as for raster queries), then each
    patch is resized (bilinear, antialiased) and standardised per channel, exactly as
    :func:`cmpc.data.patches.to_model_input` does one patch at a time.
    """
    a = np.stack(arrays).astype(np.float32, copy=False)
    bad = ~np.isfinite(a)
    if bad.any():
        mean = np.nan_to_num(np.nanmean(np.where(bad, np.nan, a), axis=(2, 3), keepdims=True), nan=0.0)
        a = np.where(bad, mean, a).astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(a))
    if t.shape[-1] != img_size or t.shape[-2] != img_size:
        t = F.interpolate(t, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
    return standardize(t)


@torch.no_grad()
def embed_arrays(model: Embedder, arrays: list[np.ndarray], img_size: int, batch_size: int, device: torch.device, amp: bool) -> np.ndarray:
    """(N, D) float32 optical embeddings of N patches, in batches (AMP + channels_last on CUDA)."""
    out = []
    cuda = device.type == "cuda"
    for s in range(0, len(arrays), batch_size):
        x = prepare_batch(arrays[s : s + batch_size], img_size).to(device, non_blocking=True)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, enabled=amp and cuda, dtype=torch.float16):
            e = model(x, "opt")
        out.append(e.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.embed_dim), np.float32)


def chunk_path(work: Path, b: int) -> Path:
    return work / CHUNK_DIR / f"block_{b:06d}.npz"


def write_chunk(work: Path, b: int, feats: np.ndarray, cells: np.ndarray) -> None:
    """Commit block ``b``'s embeddings and grid cells (atomic: whole or absent)."""
    with atomic_path(chunk_path(work, b)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, features=np.asarray(feats, dtype=np.float32), cells=np.asarray(cells, dtype=np.int64))


def block_window(tops: np.ndarray, lefts: np.ndarray, idx: np.ndarray, patch_px: int) -> tuple[int, int, int, int]:
    """(row, col, height, width) pixels of the window holding the patches ``idx`` of one block."""
    r0, c0 = int(tops[idx].min()), int(lefts[idx].min())
    return r0, c0, int(tops[idx].max()) + patch_px - r0, int(lefts[idx].max()) + patch_px - c0


def embed_block(
    src: Any, tops: np.ndarray, lefts: np.ndarray, idx: np.ndarray, patch_px: int, nodata_max_frac: float,
    model: Embedder, img_size: int, batch_size: int, device: torch.device, amp: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Read one block's window from ``src`` (an open :class:`cmpc.data.raster.RasterSource`),
    drop mostly-nodata patches, embed the rest: (features (n, D) float32, kept grid indices (n,)).
    The in-process build and the Dask workers (:mod:`cmpc.index.dask_build`) both call this."""
    g = src.grid
    r0, c0, h, w = block_window(tops, lefts, idx, patch_px)
    arr, valid = src.read_on(g, r0, c0, h, w)
    keep, arrays = [], []
    for i in idx:
        r, c = int(tops[i]) - r0, int(lefts[i]) - c0
        if 1.0 - float(valid[r : r + patch_px, c : c + patch_px].mean()) > nodata_max_frac:
            continue
        keep.append(int(i))
        arrays.append(arr[:, r : r + patch_px, c : c + patch_px])
    del arr, valid
    feats = embed_arrays(model, arrays, img_size, batch_size, device, amp)
    return feats, np.asarray(keep, dtype=np.int64)


