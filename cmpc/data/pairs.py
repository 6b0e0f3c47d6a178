"""Training pairs: locations, their SAR queries, the spatial validation hold-out.

A training *location* is an optical reference patch; its positives are the SAR queries whose
``id`` is the reference's id. Aligned queries share the reference's footprint exactly;
non-aligned ones are offset by up to half a grid step and are used only when asked
(``train.non_aligned``, off by default: measured in docs/EMBEDDING.md, they lower aligned R@1).

Validation is a contiguous block of locations (the west end of the training area) with a
one-footprint buffer removed from training, so, like the cross-area test, validation
patches never overlap a training patch; or, when the tiler was given validation boxes
(``tile.val_blocks``), the references inside them (:func:`validation_holdout`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from cmpc.data.layout import Annotation, positions
from cmpc.data.patches import PatchDataset


def footprint_side_m(refs: list[Annotation]) -> float:
    """Side of a reference footprint, metres: from ``bounds`` when present, else twice the

    median nearest-neighbour spacing (the CMPC grid has 50 % overlap).
    """
    sides = [b[2] - b[0] for b in (a.bounds for a in refs) if b is not None and b[2] > b[0]]
    if sides:
        return float(np.median(sides))
    pos = positions(refs)
    if len(pos) < 2:
        return 1.0
    from scipy.spatial import cKDTree

    d, _ = cKDTree(pos).query(pos, k=2)
    return float(2.0 * np.median(d[:, 1]))


@dataclass
class LocationSplit:
    """Indices into the reference list: training, validation and the buffer dropped between them."""

    train: np.ndarray
    val: np.ndarray
    buffer: np.ndarray


def spatial_holdout(positions_m: np.ndarray, fraction: float, side_m: float) -> LocationSplit:
    """Hold out the westmost ``fraction`` of locations as validation; drop the training

    locations whose footprint (a square of ``side_m`` metres) overlaps a validation footprint.
    ``positions_m`` (N, 2) patch centres in metres. ``fraction`` 0 gives no validation.
    """
    pos = np.asarray(positions_m, dtype=np.float64).reshape(-1, 2)
    n = len(pos)
    all_idx = np.arange(n)
    n_val = int(round(fraction * n))
    if n_val <= 0 or n < 4:
        return LocationSplit(all_idx, all_idx[:0], all_idx[:0])
    n_val = min(n_val, n - 2)
    # Stable sort on x (then y) so the block is contiguous and the split deterministic.
    order = np.lexsort((pos[:, 1], pos[:, 0]))
    val = np.sort(order[:n_val])
    rest = order[n_val:]
    from scipy.spatial import cKDTree

    # Chebyshev distance < side: the two square footprints overlap.
    tree = cKDTree(pos[val])
    d, _ = tree.query(pos[rest], k=1, p=np.inf)
    overlap = d < side_m - 1e-6
    train = np.sort(rest[~overlap])
    buffer = np.sort(rest[overlap])
    if len(train) < 2:  # tiny datasets: keep training possible, accept the overlap
        train, buffer = np.sort(rest), all_idx[:0]
    return LocationSplit(train, val, buffer)


def validation_holdout(dataset_meta: dict, refs: list[Annotation], fraction: float) -> LocationSplit:
    """The embedder's validation hold-out of the training references ``refs``.

    When the tiler named validation boxes (``dataset.json`` ``areas.val.boxes``: ``tile.val_blocks``,
    metres in the dataset CRS), validation is every reference whose footprint lies inside one
    of them (the tiler already kept train ``tile.buffer_m`` away, so ``buffer`` holds only
    references that still come within ``areas.buffer_m`` of a box); ``fraction`` is then
    ignored. Otherwise :func:`spatial_holdout` (the westmost ``fraction``).
    """
    boxes = ((dataset_meta.get("areas") or {}).get("val") or {}).get("boxes") if isinstance(dataset_meta, dict) else None
    if not boxes:
        return spatial_holdout(positions(refs), fraction, footprint_side_m(refs))
    side = footprint_side_m(refs)
    gap = float((dataset_meta.get("areas") or {}).get("buffer_m") or 0.0)
    fp = np.array([a.bounds if a.bounds is not None else (a.x - side / 2, a.y - side / 2, a.x + side / 2, a.y + side / 2) for a in refs], dtype=np.float64).reshape(-1, 4)
    inside = np.zeros(len(refs), dtype=bool)
    near = np.zeros(len(refs), dtype=bool)
    eps = 1e-6
    for b in boxes:
        inside |= (fp[:, 0] >= b[0] - eps) & (fp[:, 1] >= b[1] - eps) & (fp[:, 2] <= b[2] + eps) & (fp[:, 3] <= b[3] + eps)
        g = gap - eps
        near |= (fp[:, 0] - g < b[2]) & (b[0] < fp[:, 2] + g) & (fp[:, 1] - g < b[3]) & (b[1] < fp[:, 3] + g)
    idx = np.arange(len(refs))
    return LocationSplit(idx[~near], idx[inside], idx[near & ~inside])


def queries_by_location(refs: list[Annotation], queries: list[Annotation], non_aligned: bool = False) -> list[list[int]]:
    """For each reference (list order), the indices of its SAR queries.

    Aligned queries (``aligned`` true or absent, as in SN6-CMPC) always count; non-aligned
    ones only with ``non_aligned``. Queries whose id matches no reference are ignored.
    """
    row_of = {a.id: i for i, a in enumerate(refs)}
    out: list[list[int]] = [[] for _ in refs]
    for q_idx, q in enumerate(queries):
        r = row_of.get(q.id)
        if r is None:
            continue
        if q.aligned is False and not non_aligned:
            continue
        out[r].append(q_idx)
    return out


def d4_transform(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Rotate (C, H, W) by ``k`` quarter turns, then mirror left-right when ``flip``."""
    if k:
        x = torch.rot90(x, k, dims=(-2, -1))
    if flip:
        x = torch.flip(x, dims=(-1,))
    return x


class PairDataset(Dataset):
    """``dataset[(location, epoch)] -> (sar (C_s, S, S), optical (C_o, S, S), location)``.

    ``location`` indexes ``optical``'s annotations. The SAR query (when a location has
    several) and the augmentation are drawn from ``numpy.random.default_rng((seed, epoch,
    location))``: deterministic, independent of worker count and of global RNG state.
    Augmentation: the same flip / quarter-turn on both modalities (the pair stays
    co-registered); ``rotate`` False restricts it to left-right and up-down flips.
    """

    def __init__(
        self,
        optical: PatchDataset,
        sar: PatchDataset,
        sar_of_location: list[list[int]],
        seed: int = 0,
        augment: bool = True,
        rotate: bool = True,
    ) -> None:
        self.optical = optical
        self.sar = sar
        self.sar_of_location = sar_of_location
        self.seed = int(seed)
        self.augment = augment
        self.rotate = rotate

    def __len__(self) -> int:
        return len(self.optical)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        loc, epoch = int(key[0]), int(key[1])
        rng = np.random.default_rng([self.seed, epoch, loc])
        cands = self.sar_of_location[loc]
        q = cands[int(rng.integers(len(cands)))] if len(cands) > 1 else cands[0]
        sar = self.sar.load(q)
        opt = self.optical.load(loc)
        if self.augment:
            if self.rotate:
                k, flip = int(rng.integers(4)), bool(rng.integers(2))
            else:  # flips only: identity, left-right, up-down, both (= half turn)
                k, flip = 2 * int(rng.integers(2)), bool(rng.integers(2))
            sar, opt = d4_transform(sar, k, flip), d4_transform(opt, k, flip)
        return sar.contiguous(), opt.contiguous(), loc

    def preload(self, locations: np.ndarray, progress: bool = True) -> None:
        """Decode the optical patches of ``locations`` and all their SAR queries into RAM

        (when the patch datasets cache); call before forking DataLoader workers so they share it.
        """
        if not (self.optical.cache and self.sar.cache):
            return
        jobs = [("opt", int(i)) for i in locations] + [("sar", q) for i in locations for q in self.sar_of_location[int(i)]]
        for mode, i in tqdm(jobs, desc="caching patches", disable=not progress, leave=False, mininterval=1.0):
            (self.optical if mode == "opt" else self.sar).load(i)
