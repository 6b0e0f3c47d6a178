"""Batch sampler over training locations with geographic and embedding hard negatives.

A *location* is an optical reference (its id is the location id); a training sample is the
location's optical patch and one of its SAR queries. Every epoch visits each location exactly
once, so a batch never holds two views of the same location (they would be false negatives
of each other).

Hard negatives come from how batches are filled: the epoch's locations are taken in a
seeded random order, and each one pulls up to ``group_size - 1`` of its still-unused
neighbours into the batch right after it:

- ``geo``: spatial neighbours (k nearest reference centres; with 50 % overlap these share
  footprint and are the confusers a metre-level localizer must separate);
- ``embedding``: the references whose optical embeddings are nearest (refreshed each epoch
  from the current model through :meth:`LocationBatchSampler.set_embedding_neighbours`,
  used from ``mining_start_epoch`` on);
- ``geo+embedding``: each group draws from one of the two, chosen at random.

Batches are deterministic for ``(seed, epoch)`` (and the embedding-neighbour table). Under
DDP every rank computes the same global batches and takes its own contiguous slice, so the
ranks step in lockstep and groups of neighbours mostly stay on one rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

MODES = ("none", "geo", "embedding", "geo+embedding")


def geo_neighbours(positions_m: np.ndarray, k: int) -> np.ndarray:
    """(N, k') int64: for each location the indices of its k nearest others by centre distance (metres).

    ``k' = min(k, N - 1)``; nearest first, ties broken by index.
    """
    from scipy.spatial import cKDTree

    pos = np.asarray(positions_m, dtype=np.float64).reshape(-1, 2)
    n = len(pos)
    kk = min(k, n - 1)
    if kk <= 0:
        return np.zeros((n, 0), dtype=np.int64)
    _, idx = cKDTree(pos).query(pos, k=kk + 1)
    idx = np.asarray(idx).reshape(n, kk + 1)
    out = np.empty((n, kk), dtype=np.int64)
    for i in range(n):  # drop self (not always column 0 when centres coincide)
        row = [j for j in idx[i] if j != i][:kk]
        out[i] = row
    return out


@torch.no_grad()
def embedding_neighbours(embeddings: torch.Tensor | np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """(N, k') int64: for each row the indices of the k most cosine-similar other rows.

    ``embeddings`` (N, D) should be L2-normalised. Computed in row chunks, so memory is
    ``chunk x N``, never N x N.
    """
    e = torch.as_tensor(embeddings, dtype=torch.float32)
    n = e.shape[0]
    kk = min(k, n - 1)
    if kk <= 0:
        return np.zeros((n, 0), dtype=np.int64)
    out = np.empty((n, kk), dtype=np.int64)
    for s in range(0, n, chunk):
        sim = e[s : s + chunk] @ e.T
        rows = torch.arange(s, min(s + chunk, n))
        sim[rows - s, rows] = float("-inf")  # not its own neighbour
        out[s : s + chunk] = sim.topk(kk, dim=1).indices.numpy()
    return out


class LocationBatchSampler:
    """Yields batches of ``(location index, epoch)`` keys for a DataLoader ``batch_sampler``.

    ``batch_size`` is the *global* batch (locations per optimisation step over all ranks).
    The epoch travels inside each key so dataset workers (persistent ones included) derive
    per-sample augmentation from ``(seed, epoch, location)`` without shared state.
    """

    def __init__(
        self,
        positions_m: np.ndarray,
        batch_size: int,
        *,
        seed: int = 0,
        hard_negatives: str = "geo+embedding",
        group_size: int = 4,
        neighbours_k: int = 8,
        mining_start_epoch: int = 1,
        max_batches: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if hard_negatives not in MODES:
            raise ValueError(f"hard_negatives must be one of {MODES}, got {hard_negatives!r}")
        self.n = int(len(positions_m))
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.mode = hard_negatives
        self.group_size = max(1, int(group_size))
        self.mining_start_epoch = int(mining_start_epoch)
        self.max_batches = max_batches
        self.rank = int(rank)
        self.world_size = int(world_size)
        if self.batch_size < 2 * self.world_size:
            raise ValueError(f"batch_size {batch_size} gives fewer than 2 locations per process ({world_size} processes)")
        self.geo = geo_neighbours(positions_m, neighbours_k) if "geo" in self.mode else None
        self.embedding: np.ndarray | None = None
        self.epoch = 0
        self.start_batch = 0
        self._memo: tuple[tuple[int, int], list[list[int]]] | None = None  # (epoch, has table) -> batches

    # ---- state ----
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch to iterate; ``start_batch`` skips batches already trained (resume)."""
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def set_embedding_neighbours(self, table: np.ndarray | None) -> None:
        """(N, k) int64 embedding-nearest locations (see :func:`embedding_neighbours`)."""
        if table is not None:
            table = np.asarray(table, dtype=np.int64)
            if table.shape[0] != self.n:
                raise ValueError(f"neighbour table has {table.shape[0]} rows for {self.n} locations")
        self.embedding = table
        self._memo = None

    def uses_embeddings(self, epoch: int) -> bool:
        """Whether batches of ``epoch`` draw on embedding-mined neighbours."""
        return "embedding" in self.mode and epoch >= self.mining_start_epoch

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors/ints (loadable with ``weights_only=True``)."""
        return {
            "epoch": self.epoch,
            "start_batch": self.start_batch,
            "embedding": None if self.embedding is None else torch.from_numpy(self.embedding.copy()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set_epoch(int(state["epoch"]), int(state["start_batch"]))
        emb = state.get("embedding")
        self.set_embedding_neighbours(None if emb is None else emb.numpy())

    # ---- batches ----
    def _groups(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch, 0x5A3])
        order = rng.permutation(self.n)
        sources: list[np.ndarray] = []
        if self.geo is not None and self.geo.shape[1] > 0:
            sources.append(self.geo)
        if self.uses_embeddings(epoch) and self.embedding is not None and self.embedding.shape[1] > 0:
            sources.append(self.embedding)
        if self.mode == "none" or not sources or self.group_size == 1:
            return [[int(i)] for i in order]
        picks = rng.integers(len(sources), size=self.n)
        used = np.zeros(self.n, dtype=bool)
        groups: list[list[int]] = []
        for s in order:
            if used[s]:
                continue
            used[s] = True
            group = [int(s)]
            for j in sources[picks[s]][s]:
                if len(group) >= self.group_size:
                    break
                if not used[j]:
                    used[j] = True
                    group.append(int(j))
            groups.append(group)
        return groups

    def batches(self, epoch: int) -> list[list[int]]:
        """The global batches (location indices) of ``epoch``: each location exactly once,

        except a final batch too small to give every process two locations, which is dropped.
        """
        key = (int(epoch), 0 if self.embedding is None else 1)
        if self._memo is not None and self._memo[0] == key:
            return self._memo[1]
        flat = [i for g in self._groups(epoch) for i in g]
        out = [flat[s : s + self.batch_size] for s in range(0, len(flat), self.batch_size)]
        if out and len(out[-1]) < 2 * self.world_size:
            out.pop()
        if self.max_batches is not None:
            out = out[: self.max_batches]
        self._memo = (key, out)
        return out

    def shard(self, batch: list[int]) -> list[int]:
        """This rank's contiguous slice of a global batch."""
        if self.world_size == 1:
            return batch
        parts = np.array_split(np.asarray(batch, dtype=np.int64), self.world_size)
        return [int(i) for i in parts[self.rank]]

    def __len__(self) -> int:
        """Batches of the current epoch still to yield (after ``start_batch``)."""
        return max(0, len(self.batches(self.epoch)) - self.start_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batches(self.epoch)[self.start_batch :]:
            yield [(i, self.epoch) for i in self.shard(batch)]
