"""Where the correct reference ranks for each localized query (the input of every metric).

:func:`ground_truth_ranks` turns a batch's :class:`~cmpc.localize.localizer.LocalizeResult`
and the queries' true location ids into 1-based coarse and refined ranks, streaming over
the reference features for queries whose correct reference is outside the returned top-k.
:class:`GroundTruthScorer` is what the localize step (:func:`cmpc.localize.run.run_queries`)
is given to score queries that carry ground truth: these ranks per batch, then
``metrics.json`` and the plots (:func:`cmpc.evaluate.report.write_report`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cmpc.config import EvalConfig
from cmpc.evaluate.metrics import count_higher, first_correct_position
from cmpc.evaluate.report import PLOTS, write_report
from cmpc.index.store import ReferenceIndex
from cmpc.localize.localizer import Localizer, LocalizeResult
from cmpc.localize.outputs import QueryRecords

METRICS_FILE = "metrics.json"


def ground_truth_ranks(
    index: ReferenceIndex,
    result: LocalizeResult,
    true_ids: np.ndarray,
    allowed_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(coarse ranks (B,), refined ranks (B,) or None), 1-based, inf = not found.

    A query whose correct reference (same id) is in the returned top-k gets its position
    there; otherwise its exact rank among all (``allowed_mask``: prior-allowed) references
    of ``index``, streamed in chunks (at least k+1, since the search did not return it). The
    refiner only reorders the top-k, so a correct reference outside it keeps that coarse rank.
    """
    k = result.rows.shape[1]
    pos = first_correct_position(result.ids, true_ids)
    outside = np.full(len(pos), np.inf)
    # Only queries whose correct reference is not in the top-k need the streamed count:
    # with a good model that is few of them, which keeps evaluation cheap on big maps.
    todo = np.flatnonzero(~np.isfinite(pos) & (true_ids >= 0))
    if len(todo):
        emb, ids = result.query_emb[todo], true_ids[todo]
        correct = index.correct_scores(emb, ids, allowed_mask)
        higher = count_higher(emb, ids, correct, index.iter_features(), index.ids, allowed_mask)
        exact = np.where(np.isfinite(correct), 1.0 + higher, np.inf)
        outside[todo] = np.maximum(exact, k + 1.0)
    coarse = np.where(np.isfinite(pos), pos, outside)
    if result.refined_rows is None:
        return coarse, None
    pos_r = first_correct_position(index.ids[result.refined_rows], true_ids)
    return coarse, np.where(np.isfinite(pos_r), pos_r, outside)


class GroundTruthScorer:
    """Scores localized queries against their ground truth (the localize step's ``scorer``).

    ``cfg``: the eval section (query sets, k values, thresholds, plots); ``top_k``: the
    candidates kept per query (``localize.top_k``: the CMC curve runs that far).
    """

    #: what :meth:`report` may write into an output folder (a new run replaces all of them)
    files: tuple[str, ...] = (METRICS_FILE, *PLOTS)

    def __init__(self, cfg: EvalConfig, top_k: int) -> None:
        self.cfg = cfg
        self.top_k = int(top_k)

    def ranks(self, localizer: Localizer, result: LocalizeResult, true_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """:func:`ground_truth_ranks` against the localizer's index and prior."""
        return ground_truth_ranks(localizer.index, result, true_ids, localizer.allowed_mask)

    def report(self, records: QueryRecords, out_dir: Path, meta: dict[str, Any], index: ReferenceIndex) -> dict[str, Any]:
        """Write ``metrics.json`` (+ the plots with ``eval.plots``) into ``out_dir``; return the metrics."""
        return write_report(records, out_dir, meta, self.cfg, index, self.top_k)

    def written(self) -> tuple[str, ...]:
        """The files :meth:`report` writes with this configuration."""
        return (METRICS_FILE, *(PLOTS if self.cfg.plots else ()))
