"""Train/test protocols of the tiler: where references and queries may be cut.

All coordinates here are pixels of the optical map's grid (rows down, cols right); the
*area* is the window of that grid where SAR and optical overlap.

- ``cross-area``: spatially disjoint. Default: the test area is the EAST strip of the area,
  ``test_fraction`` of its width; the train area is the west part minus a buffer of
  ``buffer_px`` (default one patch) in which nothing is cut. With ``block_m``, the area is
  cut into square blocks (side snapped to a multiple of the stride) and blocks go to test in
  a seeded random order until ``test_fraction`` of the area is test; a test footprint lies
  entirely in test blocks, a train footprint at least ``buffer_px`` from every test block.
  Either way, every test footprint is at least ``buffer_px`` pixels from every train footprint.
- ``same-area``: one reference grid over the whole area, shared by both splits.
- Named blocks (:class:`BoxPlan`, ``tile.test_blocks`` / ``tile.val_blocks``): boxes in
  metres of the dataset CRS. A footprint lying entirely inside a test (validation) box is
  test (validation); a footprint is train only when it stays ``tile.buffer_m`` away from
  every test and validation box; everything else (straddling a box edge, or in the buffer)
  is dropped. A scene crossing a box edge is thus cut at it. Validation patches are written
  into ``train/`` and the boxes recorded in ``dataset.json`` (``areas.val``), where the
  embedder trainer takes its validation hold-out from (:func:`cmpc.data.pairs.validation_holdout`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cmpc.data.raster import Grid, grid_positions
from cmpc.errors import DataError

TRAIN, TEST, BOTH, NONE = 0, 1, 2, -1
VAL = 3  # validation: written into train/, named in dataset.json areas.val
SPLIT_NAMES = {TRAIN: "train", TEST: "test", VAL: "val"}


@dataclass
class SplitPlan:
    """Where each split may cut patches (all values in pixels of the optical grid).

    ``row0, col0, height, width``: the tiled area. ``test_col0`` / ``train_col1``: the east
    test strip starts at ``test_col0``; train footprints end at or before ``train_col1``
    (strip mode). ``block_px`` / ``test_blocks`` (nby, nbx) bool: block mode.
    """

    protocol: str
    row0: int
    col0: int
    height: int
    width: int
    patch_px: int
    stride_px: int
    buffer_px: int
    test_fraction: float
    test_col0: int | None = None
    train_col1: int | None = None
    block_px: int | None = None
    test_blocks: np.ndarray | None = None

    # ---- classification --------------------------------------------------------------

    def _inside(self, tops: np.ndarray, lefts: np.ndarray) -> np.ndarray:
        p = self.patch_px
        return (
            (tops >= self.row0)
            & (lefts >= self.col0)
            & (tops + p <= self.row0 + self.height)
            & (lefts + p <= self.col0 + self.width)
        )

    def classify(self, tops: np.ndarray, lefts: np.ndarray) -> np.ndarray:
        """Split code per footprint with top-left (tops, lefts): TRAIN, TEST, BOTH (same-area) or NONE."""
        tops = np.asarray(tops, dtype=np.int64)
        lefts = np.asarray(lefts, dtype=np.int64)
        inside = self._inside(tops, lefts)
        out = np.full(tops.shape, NONE, dtype=np.int8)
        if self.protocol == "same-area":
            out[inside] = BOTH
            return out
        p = self.patch_px
        if self.block_px is None:
            assert self.test_col0 is not None and self.train_col1 is not None
            out[inside & (lefts >= self.test_col0)] = TEST
            out[inside & (lefts + p <= self.train_col1)] = TRAIN
            return out
        tb = self.test_blocks
        assert tb is not None
        b, bpx = self.buffer_px, self.block_px
        # Summed-area table over the test-block indicator: count test blocks in any block range.
        sat = np.zeros((tb.shape[0] + 1, tb.shape[1] + 1), dtype=np.int64)
        sat[1:, 1:] = tb.astype(np.int64).cumsum(0).cumsum(1)

        def count(r0: np.ndarray, r1: np.ndarray, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
            # Blocks touched by pixel rows [r0, r1) and cols [c0, c1) (relative to the area).
            by0, by1 = r0 // bpx, (r1 - 1) // bpx + 1
            bx0, bx1 = c0 // bpx, (c1 - 1) // bpx + 1
            return sat[by1, bx1] - sat[by0, bx1] - sat[by1, bx0] + sat[by0, bx0]

        rt, ct = tops - self.row0, lefts - self.col0
        rt_c, ct_c = np.clip(rt, 0, self.height - 1), np.clip(ct, 0, self.width - 1)
        n_blocks = (((rt_c + p - 1) // bpx) - rt_c // bpx + 1) * (((ct_c + p - 1) // bpx) - ct_c // bpx + 1)
        own = count(rt_c, np.minimum(rt_c + p, self.height), ct_c, np.minimum(ct_c + p, self.width))
        # Train footprints keep the buffer to every test block: look at the footprint grown by b.
        grown = count(
            np.clip(rt - b, 0, self.height - 1),
            np.clip(rt + p + b, 1, self.height),
            np.clip(ct - b, 0, self.width - 1),
            np.clip(ct + p + b, 1, self.width),
        )
        out[inside & (own == n_blocks)] = TEST
        out[inside & (grown == 0)] = TRAIN
        return out

    # ---- references and queries ------------------------------------------------------

    def reference_grid(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Reference top-lefts (rows, cols) and split codes, row-major per split (train first).

        In strip mode each split's grid starts at its own area's west edge, so the test map
        starts at the strip edge rather than wherever the train grid happened to fall.
        """
        p, s = self.patch_px, self.stride_px
        if self.protocol == "cross-area" and self.block_px is None:
            assert self.test_col0 is not None and self.train_col1 is not None
            tr = grid_positions(self.height, self.train_col1 - self.col0, p, s, self.row0, self.col0)
            te = grid_positions(self.height, self.col0 + self.width - self.test_col0, p, s, self.row0, self.test_col0)
            tops = np.concatenate([tr[0], te[0]])
            lefts = np.concatenate([tr[1], te[1]])
            codes = np.concatenate([np.full(len(tr[0]), TRAIN, np.int8), np.full(len(te[0]), TEST, np.int8)])
            return tops, lefts, codes
        tops, lefts = grid_positions(self.height, self.width, p, s, self.row0, self.col0)
        codes = self.classify(tops, lefts)
        keep = codes != NONE
        tops, lefts, codes = tops[keep], lefts[keep], codes[keep]
        order = np.argsort(codes, kind="stable")  # train first, then test; grid order inside
        return tops[order], lefts[order], codes[order]

    def sample_queries(self, quota: dict[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Random non-aligned query top-lefts, uniform over each split's allowed positions.

        ``quota`` maps a split code (TRAIN/TEST, or BOTH for same-area) to a count. Positions
        are drawn uniformly over the whole area and kept for a split that still needs
        queries (rejection sampling, so each split's queries are uniform over its area).
        Returns (tops, lefts, codes) in draw order.
        """
        p = self.patch_px
        need = {k: int(v) for k, v in quota.items() if v > 0}
        got_t: list[np.ndarray] = []
        got_l: list[np.ndarray] = []
        got_c: list[np.ndarray] = []
        total = sum(need.values())
        attempts = 0
        while any(v > 0 for v in need.values()) and attempts < 200 * max(total, 1):
            n = max(64, 2 * sum(need.values()))
            t = rng.integers(self.row0, self.row0 + self.height - p + 1, size=n)
            l = rng.integers(self.col0, self.col0 + self.width - p + 1, size=n)
            attempts += n
            c = self.classify(t, l)
            for code in list(need):
                idx = np.flatnonzero(c == code)[: need[code]]
                need[code] -= len(idx)
                got_t.append(t[idx])
                got_l.append(l[idx])
                got_c.append(c[idx])
        if not got_t:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int8)
        return np.concatenate(got_t), np.concatenate(got_l), np.concatenate(got_c)

    # ---- description -----------------------------------------------------------------

    def areas(self, grid: Grid) -> dict[str, object]:
        """Train/test areas as boxes (minx, miny, maxx, maxy) in metres, for dataset.json."""
        box = lambda r, c, h, w: [float(v) for v in grid.window_bounds(r, c, h, w)]  # noqa: E731
        whole = box(self.row0, self.col0, self.height, self.width)
        if self.protocol == "same-area":
            return {"train": {"bounds": whole, "boxes": [whole]}, "test": {"bounds": whole, "boxes": [whole]}}
        if self.block_px is None:
            assert self.test_col0 is not None and self.train_col1 is not None
            tr = box(self.row0, self.col0, self.height, self.train_col1 - self.col0)
            te = box(self.row0, self.test_col0, self.height, self.col0 + self.width - self.test_col0)
            return {"train": {"bounds": tr, "boxes": [tr]}, "test": {"bounds": te, "boxes": [te]}}
        tb = self.test_blocks
        assert tb is not None
        out: dict[str, object] = {}
        for name, flag in (("train", False), ("test", True)):
            boxes = []
            for by, bx in zip(*np.nonzero(tb == flag)):
                r, c = self.row0 + int(by) * self.block_px, self.col0 + int(bx) * self.block_px
                h = min(self.block_px, self.row0 + self.height - r)
                w = min(self.block_px, self.col0 + self.width - c)
                boxes.append(box(r, c, h, w))
            arr = np.array(boxes).reshape(-1, 4)
            bounds = [float(arr[:, 0].min()), float(arr[:, 1].min()), float(arr[:, 2].max()), float(arr[:, 3].max())] if len(arr) else None
            out[name] = {"bounds": bounds, "boxes": boxes}
        return out


def plan_split(
    protocol: str,
    area: tuple[int, int, int, int],
    patch_px: int,
    stride_px: int,
    test_fraction: float,
    gsd_m: float,
    buffer_px: int | None = None,
    block_m: float | None = None,
    seed: int = 0,
) -> SplitPlan:
    """Plan a split over ``area`` = (row0, col0, height, width) pixels of the optical grid.

    Raises :class:`DataError` when a split would be empty (area too small for the patch
    size, test strip narrower than a patch, ...), naming the config key to change.
    """
    row0, col0, height, width = area
    p = patch_px
    if height < p or width < p:
        raise DataError(
            f"the overlap of SAR and optical is {width}x{height} px, smaller than one patch ({p} px); lower tile.patch_px"
        )
    b = p if buffer_px is None else int(buffer_px)
    plan = SplitPlan(protocol, row0, col0, height, width, p, stride_px, b, test_fraction)
    if protocol == "same-area":
        return plan
    if protocol != "cross-area":
        raise DataError(f"unknown split protocol {protocol!r}; use cross-area or same-area")
    if test_fraction <= 0.0:
        raise DataError("tile.test_fraction is 0: the cross-area test area would be empty; use e.g. 0.25")
    if block_m is None:
        test_w = int(round(test_fraction * width))
        if test_w < p:
            raise DataError(
                f"the east test strip is {test_w} px wide (tile.test_fraction {test_fraction} of {width} px), narrower "
                f"than one patch ({p} px); raise tile.test_fraction or lower tile.patch_px"
            )
        train_w = width - test_w - b
        if train_w < p:
            raise DataError(
                f"the west train area is {train_w} px wide after the {test_w} px test strip and the {b} px buffer, "
                f"narrower than one patch ({p} px); lower tile.test_fraction, tile.buffer_px or tile.patch_px"
            )
        plan.test_col0 = col0 + width - test_w
        plan.train_col1 = col0 + train_w
        return plan
    # Blocks: side snapped to a multiple of the stride so the reference grid tiles them.
    k = max(1, int(round(block_m / gsd_m / stride_px)))
    bpx = max(k * stride_px, int(math.ceil(p / stride_px)) * stride_px)
    nby, nbx = -(-height // bpx), -(-width // bpx)
    if nby * nbx < 2:
        raise DataError(
            f"tile.block_m={block_m} m gives one {bpx} px block over a {width}x{height} px area; lower tile.block_m"
        )
    areas = np.array(
        [[min(bpx, height - by * bpx) * min(bpx, width - bx * bpx) for bx in range(nbx)] for by in range(nby)],
        dtype=np.float64,
    )
    order = np.random.default_rng([seed, 1]).permutation(nby * nbx)
    test = np.zeros(nby * nbx, dtype=bool)
    acc, total = 0.0, float(areas.sum())
    for i in order:
        if acc >= test_fraction * total:
            break
        test[i] = True
        acc += areas.flat[i]
    if test.all():
        test[order[-1]] = False
    plan.block_px = bpx
    plan.test_blocks = test.reshape(nby, nbx)
    return plan


# --------------------------------------------------------------------------- named blocks

Box = tuple[float, float, float, float]


def check_boxes(boxes: list[list[float]] | None, key: str) -> list[Box]:
    """``boxes`` ([[minx, miny, maxx, maxy], ...], metres) as tuples; :class:`DataError` naming
    ``key`` when one is not four numbers with min < max."""
    out: list[Box] = []
    for i, b in enumerate(boxes or []):
        if len(b) != 4 or not (b[0] < b[2] and b[1] < b[3]):
            raise DataError(f"{key}[{i}] = {b} is not a box [minx, miny, maxx, maxy] with min < max (metres in the dataset CRS)")
        out.append((float(b[0]), float(b[1]), float(b[2]), float(b[3])))
    return out


def _overlaps(a: Box, b: Box, gap: float = 0.0) -> bool:
    """The interiors of ``a`` grown by ``gap`` and ``b`` intersect."""
    return a[0] - gap < b[2] and b[0] < a[2] + gap and a[1] - gap < b[3] and b[1] < a[3] + gap


class BoxPlan(SplitPlan):
    """Cross-area split by named boxes (metres in ``grid``'s CRS) with a buffer in metres.

    Same interface as :class:`SplitPlan`; codes TRAIN, TEST, VAL or NONE. ``buffer_px`` is
    the buffer in pixels (rounded up), for dataset.json.
    """

    def __init__(self, area: tuple[int, int, int, int], patch_px: int, stride_px: int, grid: Grid,
                 test_boxes: list[Box], val_boxes: list[Box], buffer_m: float) -> None:
        row0, col0, height, width = area
        super().__init__("cross-area", row0, col0, height, width, patch_px, stride_px,
                         int(math.ceil(buffer_m / grid.res_x - 1e-9)), 0.0)
        self.grid = grid
        self.test_boxes, self.val_boxes, self.buffer_m = list(test_boxes), list(val_boxes), float(buffer_m)

    def footprints(self, tops: np.ndarray, lefts: np.ndarray) -> np.ndarray:
        """(N, 4) footprint boxes (minx, miny, maxx, maxy) in metres."""
        g, p = self.grid, self.patch_px
        minx = g.transform.c + np.asarray(lefts, dtype=np.float64) * g.res_x
        maxy = g.transform.f - np.asarray(tops, dtype=np.float64) * g.res_y
        return np.stack([minx, maxy - p * g.res_y, minx + p * g.res_x, maxy], axis=1).reshape(-1, 4)

    def classify(self, tops: np.ndarray, lefts: np.ndarray) -> np.ndarray:
        tops = np.asarray(tops, dtype=np.int64)
        lefts = np.asarray(lefts, dtype=np.int64)
        fp = self.footprints(tops, lefts)
        out = np.full(tops.shape, NONE, dtype=np.int8)
        eps = 1e-6 * self.grid.res_x
        near = np.zeros(len(fp), dtype=bool)
        for boxes, code in ((self.val_boxes, VAL), (self.test_boxes, TEST)):
            for b in boxes:
                inside = (fp[:, 0] >= b[0] - eps) & (fp[:, 1] >= b[1] - eps) & (fp[:, 2] <= b[2] + eps) & (fp[:, 3] <= b[3] + eps)
                out[inside] = code
                g = self.buffer_m - eps
                near |= (fp[:, 0] - g < b[2]) & (b[0] < fp[:, 2] + g) & (fp[:, 1] - g < b[3]) & (b[1] < fp[:, 3] + g)
        out[~near] = TRAIN
        out[~self._inside(tops, lefts)] = NONE
        return out

    def reference_grid(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Reference top-lefts and codes: one grid over the area, train first, then test, then val."""
        tops, lefts = grid_positions(self.height, self.width, self.patch_px, self.stride_px, self.row0, self.col0)
        codes = self.classify(tops, lefts)
        keep = codes != NONE
        tops, lefts, codes = tops[keep], lefts[keep], codes[keep]
        order = np.argsort(codes, kind="stable")
        return tops[order], lefts[order], codes[order]

    def areas(self, grid: Grid) -> dict[str, object]:
        def entry(boxes: list[Box]) -> dict[str, object]:
            arr = np.array(boxes, dtype=np.float64).reshape(-1, 4)
            bounds = [float(arr[:, 0].min()), float(arr[:, 1].min()), float(arr[:, 2].max()), float(arr[:, 3].max())] if len(arr) else None
            return {"bounds": bounds, "boxes": [list(b) for b in boxes]}

        whole = [float(v) for v in grid.window_bounds(self.row0, self.col0, self.height, self.width)]
        return {"train": {"bounds": whole, "boxes": [whole], "minus": "test and val boxes grown by buffer_m"},
                "test": entry(self.test_boxes), "val": entry(self.val_boxes), "buffer_m": self.buffer_m}


def plan_boxes(area: tuple[int, int, int, int], patch_px: int, stride_px: int, grid: Grid,
               test_blocks: list[list[float]] | None, val_blocks: list[list[float]] | None, buffer_m: float) -> BoxPlan:
    """A :class:`BoxPlan` after checking the boxes (test and validation boxes may not come
    closer than ``buffer_m`` to each other)."""
    test = check_boxes(test_blocks, "tile.test_blocks")
    val = check_boxes(val_blocks, "tile.val_blocks")
    if not test:
        raise DataError("tile.test_blocks is empty: name at least one test box [minx, miny, maxx, maxy] (metres)")
    for i, v in enumerate(val):
        for j, t in enumerate(test):
            if _overlaps(v, t, buffer_m):
                raise DataError(
                    f"tile.val_blocks[{i}] {list(v)} comes within tile.buffer_m={buffer_m} m of tile.test_blocks[{j}] {list(t)}; "
                    f"move one of them (validation must not touch the test area)"
                )
    return BoxPlan(area, patch_px, stride_px, grid, test, val, buffer_m)
