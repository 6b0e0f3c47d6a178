"""Exact inner-product top-k with torch (``matmul`` + ``topk``): the GPU path without faiss-gpu.

The pip ``faiss-cpu`` wheel has no GPU support. On a machine with CUDA, a Flat (exact) index
is then searched by torch on the GPU instead: the reference embeddings are copied to the
device once and every query batch is one matrix product plus ``topk``, in chunks of
references so the ``queries x references`` score matrix never exceeds ``max_score_bytes``.
Maps larger than ``max_device_bytes`` stay in host memory and stream to the device chunk by
chunk. The same code runs on the CPU (tests compare it with faiss ``IndexFlatIP``).
"""

from __future__ import annotations

import numpy as np
import torch

#: Reference chunk (rows) a query batch is multiplied with at once (bounded score matrix).
DEFAULT_CHUNK_ROWS = 262_144


class TorchFlatSearch:
    """Exact top-k by inner product over ``features`` (N, D) float32 on ``device``.

    ``device``: "cuda", "cuda:N" or "cpu". ``max_device_bytes``: keep the features on the
    device when they take at most this many bytes (default: half the free GPU memory, or
    everything on the CPU), else stream them from pinned host memory. ``max_score_bytes``:
    bound on the float32 score matrix of one (query batch x reference chunk) product.
    """

    def __init__(
        self,
        features: np.ndarray,
        device: str | torch.device = "cuda",
        max_device_bytes: int | None = None,
        max_score_bytes: int = 256 * 2**20,
    ) -> None:
        self.device = torch.device(device)
        feats = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        self.ntotal, self.d = int(feats.shape[0]), int(feats.shape[1])
        if max_device_bytes is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                max_device_bytes = free // 2
            else:
                max_device_bytes = 1 << 62
        self.on_device = feats.numel() * 4 <= max_device_bytes
        if self.on_device:
            self.features = feats.to(self.device)
        else:
            self.features = feats.pin_memory() if self.device.type == "cuda" else feats
        self.max_score_bytes = int(max_score_bytes)

    def _chunks(self, n_queries: int) -> int:
        rows = max(1024, self.max_score_bytes // max(1, 4 * n_queries))
        return int(min(rows, DEFAULT_CHUNK_ROWS, max(1, self.ntotal)))

    @torch.no_grad()
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``queries`` (B, D) -> (scores (B, k) float32 descending, rows (B, k) int64).

        Ties are broken by the lower row, as :func:`cmpc.index.store.merge_topk` does, so
        the result does not depend on the chunking.
        """
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
        k = int(min(k, self.ntotal))
        best_s = torch.full((len(q), 0), -float("inf"), device=self.device)
        best_r = torch.zeros((len(q), 0), dtype=torch.int64, device=self.device)
        step = self._chunks(len(q))
        for s in range(0, self.ntotal, step):
            f = self.features[s : s + step]
            if not self.on_device:
                f = f.to(self.device, non_blocking=True)
            scores = q @ f.T
            kk = min(k, scores.shape[1])
            cs, cr = torch.topk(scores, kk, dim=1)
            best_s = torch.cat([best_s, cs], dim=1)
            best_r = torch.cat([best_r, cr + s], dim=1)
            if best_s.shape[1] > k:
                best_s, pick = torch.topk(best_s, k, dim=1)
                best_r = torch.gather(best_r, 1, pick)
        s_np, r_np = best_s.float().cpu().numpy(), best_r.cpu().numpy().astype(np.int64)
        # Deterministic order: score descending, then row ascending (topk's tie order is unspecified).
        order = np.lexsort((r_np, -s_np), axis=1) if s_np.shape[1] else np.zeros_like(r_np)
        return np.take_along_axis(s_np, order, axis=1), np.take_along_axis(r_np, order, axis=1)


def torch_gpu_available() -> bool:
    """True when torch sees a CUDA device."""
    return bool(torch.cuda.is_available())
