"""What fine alignment costs per query: the learned dense descriptor vs CFOG (stored and lazy).

Patch refinement correlates each query's dense descriptors with the map's around its best
``fine_top`` candidates (:func:`cmpc.localize.align.align_to_mosaic`). The learned descriptor
(:class:`~cmpc.models.descriptor.DenseDescriptor`, 16 channels every 4 px; the baseline) is
computed for the whole map once; CFOG (:class:`~cmpc.models.cfog.CfogDescriptor`, 9 channels
every pixel) is stored for small maps and described window by window for large ones
(:class:`~cmpc.localize.align.LazyFeatureMosaic`), scored by plain correlation or by ZNCC
(``refine.align_score=zncc``: the windows' zero-mean norms on top: per candidate context from
box sums, or, for a stored map once the queries have asked for 8x its area, read from norms of
the whole map computed once, :meth:`~cmpc.localize.align.FeatureMosaic.window_norms`: here
after about 42 queries of 20 candidates, i.e. in the warm-up and first timed batch). Measured here in one run on a random
3-band map (content does not change the cost): milliseconds per query (a batch of 32 queries
of 128 px, candidates spread over the map, search radius 64 px) for 5 and 20 candidates, 1
thread, median of repeated batches; plus the one-off cost of describing the map.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from benchmarks.harness import table, time_runs

BENCH = "align"
TITLE = "Fine alignment: per-query cost of the learned descriptor vs CFOG"


def _setup(kind: str, side: int):  # noqa: ANN202 - (descriptor, feature mosaic, seconds to build)
    from cmpc.localize.align import build_feature_mosaic
    from cmpc.models.cfog import CfogDescriptor
    from cmpc.models.descriptor import DenseDescriptor

    torch.manual_seed(0)
    img = np.random.default_rng(0).standard_normal((3, side, side)).astype(np.float32)
    model = DenseDescriptor(1, 3).eval() if kind == "learned" else CfogDescriptor(1, 3, sigma=1.5)
    kind = kind.replace(" zncc", "")
    t0 = time.perf_counter()
    with torch.inference_mode():
        fm = build_feature_mosaic(model, img, np.ones((side, side), bool), 0.0, side * 8.3, 8.3,
                                  lazy_bytes=0 if kind == "cfog lazy" else 2**40)
    return model, fm, time.perf_counter() - t0


def query_ms(kind: str, side: int, fine_top: int, n_queries: int, repeats: int) -> tuple[float, float]:
    """(ms per query of descriptor + alignment, seconds to describe the map) for one setting."""
    from cmpc.localize.align import align_to_mosaic

    model, fm, build_s = _setup(kind, side)
    score = "zncc" if kind.endswith("zncc") else "corr"
    rng = np.random.default_rng(1)
    q = torch.from_numpy(rng.standard_normal((n_queries, 1, 128, 128)).astype(np.float32))
    lo, hi = 8.3 * 200, 8.3 * (side - 200)
    centres = torch.from_numpy(rng.uniform(lo, hi, size=(n_queries, fine_top, 2)))

    def step() -> None:
        with torch.inference_mode():
            align_to_mosaic(model(q, "sar"), fm, centres, 128, 64, score=score)

    return 1e3 * time_runs(step, repeats, warmup=1).median / n_queries, build_s


def run(quick: bool) -> list[dict[str, Any]]:
    threads0 = torch.get_num_threads()
    rows: list[dict[str, Any]] = []
    try:
        torch.set_num_threads(1)
        side, n_q, repeats = (512, 4, 2) if quick else (2048, 32, 5)
        for top in ((5,) if quick else (5, 20)):
            base = None
            for kind in ("learned", "cfog", "cfog zncc", "cfog lazy", "cfog lazy zncc"):
                ms, build_s = query_ms(kind, side, top, n_q, repeats)
                base = base or ms
                rows.append({"bench": BENCH, "name": f"{kind} top{top} map {side}px", "descriptor": kind, "fine_top": top, "map_px": side,
                             "threads": 1, "query_ms": round(ms, 2), "vs_learned": round(ms / base, 2), "map_s": round(build_s, 2),
                             "runs": repeats, "queries": n_q})
        return rows
    finally:
        torch.set_num_threads(threads0)


def render(rows: list[dict[str, Any]]) -> str:
    return "\n".join([
        "Milliseconds per query (128 px SAR query: its descriptors, then correlation around `fine_top` candidates, "
        "search radius 64 px), 1 thread, median of repeated batches; `vs learned` = time / the learned descriptor's "
        "in the same run; `map s` = describing the whole map once (CFOG lazy keeps only the map image); zncc = scored by "
        "zero-mean normalised cross-correlation (refine.align_score=zncc):",
        "",
        table(rows, [("descriptor", "descriptor"), ("fine_top", "fine_top"), ("map_px", "map px"), ("query_ms", "ms/query"),
                     ("vs_learned", "vs learned"), ("map_s", "map s")]),
    ])
