"""Location batch sampler, neighbour tables, spatial hold-out and training pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmpc.data.pairs import PairDataset, d4_transform, spatial_holdout
from cmpc.data.sampler import LocationBatchSampler, embedding_neighbours, geo_neighbours


def _grid(rows: int = 10, cols: int = 12, step_m: float = 64.0) -> np.ndarray:
    """Reference centres on a regular grid, metres (row-major)."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    return np.stack([xx.ravel() * step_m, -yy.ravel() * step_m], axis=1).astype(np.float64)


def test_geo_and_embedding_neighbours_by_hand() -> None:
    pos = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0], [5.0, 2.0]])
    assert geo_neighbours(pos, 2).tolist() == [[1, 2], [0, 2], [3, 1], [2, 1]]
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.6, 0.8]])
    # cosines: 0-2 .8, 0-3 .6, 1-3 .8, 1-2 .6, 2-3 .96
    assert embedding_neighbours(emb, 2, chunk=3).tolist() == [[2, 3], [3, 2], [3, 0], [2, 1]]


def test_every_location_once_per_epoch_and_deterministic() -> None:
    pos = _grid()
    n = len(pos)
    s = LocationBatchSampler(pos, 16, seed=3, hard_negatives="geo")
    for epoch in (0, 1):
        batches = s.batches(epoch)
        flat = [i for b in batches for i in b]
        assert all(len(set(b)) == len(b) for b in batches)  # one view per location per batch
        assert len(flat) == len(set(flat)) == n  # 120 = 7 x 16 + 8: the short last batch is kept
        assert [len(b) for b in batches] == [16] * 7 + [8]
    again = LocationBatchSampler(pos, 16, seed=3, hard_negatives="geo")
    assert again.batches(1) == s.batches(1)
    assert s.batches(0) != s.batches(1)
    assert LocationBatchSampler(pos, 16, seed=4, hard_negatives="geo").batches(0) != s.batches(0)
    # The DataLoader keys carry the epoch (for per-sample augmentation in workers).
    s.set_epoch(1)
    first = next(iter(s))
    assert [k for k, _ in first] == s.batches(1)[0] and {e for _, e in first} == {1}


def _neighbour_share(batches: list[list[int]], pos: np.ndarray, radius_m: float) -> float:
    """Mean share of batch members that have another member within ``radius_m``."""
    shares = []
    for b in batches:
        p = pos[b]
        d = np.hypot(*(p[:, None, :] - p[None, :, :]).transpose(2, 0, 1))
        np.fill_diagonal(d, np.inf)
        shares.append(float((d.min(axis=1) <= radius_m).mean()))
    return float(np.mean(shares))


def test_geographic_hard_negatives_fill_batches_with_neighbours() -> None:
    pos = _grid()
    radius = 64.0 * 1.5  # the 8-neighbourhood on the grid
    geo = _neighbour_share(LocationBatchSampler(pos, 16, seed=0, hard_negatives="geo", group_size=4).batches(0), pos, radius)
    rnd = _neighbour_share(LocationBatchSampler(pos, 16, seed=0, hard_negatives="none").batches(0), pos, radius)
    # Random batches of 16 out of 120: about 1 - (1 - 8/119)^15 = 0.65 have a neighbour by chance.
    assert rnd < 0.7
    assert geo > 0.9  # (greedy grouping leaves a few singletons at the end of an epoch)


def test_embedding_mined_negatives_start_at_mining_epoch() -> None:
    pos = _grid()
    n = len(pos)
    # An embedding table that pairs location i with i + n/2 (far apart on the map).
    twin = (np.arange(n) + n // 2) % n
    table = np.stack([twin, (twin + 1) % n], axis=1)
    s = LocationBatchSampler(pos, 16, seed=0, hard_negatives="embedding", group_size=2, mining_start_epoch=1)
    s.set_embedding_neighbours(table)
    assert not s.uses_embeddings(0) and s.uses_embeddings(1)

    def together(batches: list[list[int]]) -> float:
        where = {i: k for k, b in enumerate(batches) for i in b}
        return float(np.mean([where[i] == where[int(twin[i])] for i in range(n)]))

    assert together(s.batches(0)) < 0.3  # epoch 0: random batches
    assert together(s.batches(1)) > 0.9  # from the mining epoch on: twins share a batch
    # The table is part of the sampler state (resuming mid-epoch needs the same batches).
    restored = LocationBatchSampler(pos, 16, seed=0, hard_negatives="embedding", group_size=2, mining_start_epoch=1)
    restored.load_state_dict(s.state_dict())
    assert restored.batches(1) == s.batches(1)


def test_ddp_shards_partition_each_global_batch_and_resume_skips() -> None:
    pos = _grid()
    ranks = [LocationBatchSampler(pos, 16, seed=1, hard_negatives="geo", rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(2)
    per_rank = [list(iter(r)) for r in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0].batches(2))  # lockstep
    for g, a, b in zip(ranks[0].batches(2), *per_rank):
        ka, kb = [k for k, _ in a], [k for k, _ in b]
        assert not set(ka) & set(kb) and sorted(ka + kb) == sorted(g)
        assert abs(len(ka) - len(kb)) <= 1
    ranks[0].set_epoch(2, start_batch=5)
    assert [[k for k, _ in b] for b in ranks[0]] == [[k for k, _ in b] for b in per_rank[0][5:]]
    with pytest.raises(ValueError):
        LocationBatchSampler(pos, 3, world_size=2)  # fewer than 2 locations per process


def test_spatial_holdout_is_a_western_block_with_a_buffer() -> None:
    pos = _grid(rows=12, cols=10, step_m=64.0)  # footprints 128 m: neighbours overlap by half
    split = spatial_holdout(pos, 0.2, side_m=128.0)
    assert len(split.val) == 24  # 20 % of 120 = the two western columns of 12
    assert set(np.unique(pos[split.val, 0])) == {0.0, 64.0}
    assert set(np.unique(pos[split.buffer, 0])) == {128.0}  # overlaps column 64 m by half
    assert len(split.train) == 120 - 24 - 12
    # No training footprint overlaps a validation footprint (Chebyshev distance >= side).
    d = np.abs(pos[split.train][:, None, :] - pos[split.val][None, :, :]).max(axis=2)
    assert d.min() >= 128.0
    none = spatial_holdout(pos, 0.0, side_m=128.0)
    assert len(none.val) == 0 and len(none.train) == 120


class _Patches:
    """A PatchDataset stand-in holding tensors (the pair logic does not read files)."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors
        self.cache = False

    def __len__(self) -> int:
        return len(self.tensors)

    def load(self, i: int) -> torch.Tensor:
        return self.tensors[i]


def test_pair_augmentation_is_shared_and_keyed_by_seed_epoch_location() -> None:
    g = torch.Generator().manual_seed(0)
    optical = [torch.randn(3, 8, 8, generator=g) for _ in range(4)]
    # SAR = first optical band: after augmentation it must still equal the optical band.
    sar = [o[:1].clone() for o in optical] + [torch.zeros(1, 8, 8)]
    pairs = PairDataset(_Patches(optical), _Patches(sar), [[0], [1], [2, 4], [3]], seed=5, augment=True)  # type: ignore[arg-type]
    seen = set()
    for epoch in range(8):
        s, o, loc = pairs[(1, epoch)]
        assert loc == 1 and torch.equal(s, o[:1])  # co-registered after the transform
        seen.add(tuple(o[0, 0, :2].tolist()))
        s2, o2, _ = pairs[(1, epoch)]
        assert torch.equal(o, o2) and torch.equal(s, s2)  # same key, same sample
    assert len(seen) >= 4  # different epochs, different transforms
    # Location 2 has two SAR queries (2 real, 4 blank): both get drawn over epochs.
    drawn = {bool(pairs[(2, e)][0].abs().sum() > 0) for e in range(12)}
    assert drawn == {True, False}
    # d4_transform: a quarter turn then a mirror, on a 2x2 example.
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    assert d4_transform(x, 1, False).tolist() == [[[2.0, 4.0], [1.0, 3.0]]]
    assert d4_transform(x, 0, True).tolist() == [[[2.0, 1.0], [4.0, 3.0]]]
