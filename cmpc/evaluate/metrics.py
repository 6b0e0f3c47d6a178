"""Retrieval and localization metrics (pure NumPy).

Ranks are 1-based positions of the first correct reference (correct = same location id);
``inf`` (or ``None`` on input) means the correct reference was never found. From them:
recall@k and the CMC curve (share of queries with rank <= k), and mAP, which for one
correct reference per query is the mean reciprocal rank of the first correct hit.
Localization errors are metres between the predicted and the true query centre.

Exact ranks are computed without a queries x references matrix: for a batch of queries the
references are streamed in chunks and, per query, the references scoring higher than its
correct one are counted (:func:`count_higher`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

#: Error thresholds (metres) at which the error CDF is stored and plotted (log-spaced).
CDF_GRID_M = np.round(np.geomspace(0.1, 10_000.0, 101), 4)


def as_ranks(ranks: Sequence[float | int | None] | np.ndarray) -> np.ndarray:
    """(Q,) float64 ranks with ``None``/NaN -> ``inf``; values must be >= 1."""
    r = np.array([np.inf if v is None else v for v in ranks] if not isinstance(ranks, np.ndarray) else ranks, dtype=np.float64)
    r = np.where(np.isnan(r), np.inf, r)
    if (r < 1).any():
        raise ValueError("ranks are 1-based; got a value below 1")
    return r


def key_of(v: float) -> str:
    """Metric key of a cut-off or threshold: 1 -> "1", 2.5 -> "2.5"."""
    return f"{float(v):g}"


def recall_at_k(ranks: Sequence[float | int | None] | np.ndarray, ks: Iterable[int]) -> dict[str, float | None]:
    """{"k": share of queries whose first correct reference is within the top k}; None when empty."""
    r = as_ranks(ranks)
    return {str(int(k)): (float(np.mean(r <= k)) if len(r) else None) for k in ks}


def cmc_curve(ranks: Sequence[float | int | None] | np.ndarray, max_k: int) -> np.ndarray:
    """(max_k,) recall@1..max_k (the cumulative match characteristic); empty ranks -> NaN."""
    r = as_ranks(ranks)
    if not len(r):
        return np.full(max_k, np.nan)
    return np.array([np.mean(r <= k) for k in range(1, max_k + 1)], dtype=np.float64)


def mean_average_precision(ranks: Sequence[float | int | None] | np.ndarray) -> float | None:
    """mAP with one correct reference per query = mean of 1/rank (0 when never found)."""
    r = as_ranks(ranks)
    return float(np.mean(1.0 / r)) if len(r) else None


def error_stats(errors_m: Sequence[float] | np.ndarray, thresholds_m: Iterable[float]) -> dict[str, Any]:
    """Mean, median, P90 (metres) and the share within each threshold.

    ``{"mean", "median", "p90", "within": {"1": f, ...}}``. A query without a position (a
    non-finite error: no candidate survived, e.g. under a prior) is a miss at every
    threshold: it stays in the ``within`` denominators. Mean, median and P90 are over the
    queries that have a position (None when none has). Everything is None without queries.
    """
    e_all = np.asarray(errors_m, dtype=np.float64)
    e = e_all[np.isfinite(e_all)]
    th = list(thresholds_m)
    if not len(e_all):
        return {"mean": None, "median": None, "p90": None, "within": {key_of(t): None for t in th}}
    within = {key_of(t): float(np.count_nonzero(e <= t) / len(e_all)) for t in th}
    if not len(e):
        return {"mean": None, "median": None, "p90": None, "within": within}
    return {
        "mean": float(e.mean()),
        "median": float(np.median(e)),
        "p90": float(np.percentile(e, 90)),
        "within": within,
    }


def error_cdf(errors_m: Sequence[float] | np.ndarray, grid_m: np.ndarray = CDF_GRID_M) -> np.ndarray:
    """Share of queries with error <= each value of ``grid_m`` (metres); NaN when empty.

    Queries without a position (non-finite error) count as misses, as in :func:`error_stats`.
    """
    e_all = np.asarray(errors_m, dtype=np.float64)
    if not len(e_all):
        return np.full(len(grid_m), np.nan)
    e = np.sort(e_all[np.isfinite(e_all)])
    return np.searchsorted(e, grid_m, side="right") / len(e_all)


def first_correct_position(retrieved_ids: np.ndarray, true_ids: np.ndarray) -> np.ndarray:
    """(B,) 1-based position of the first retrieved id equal to the true id; inf when absent.

    ``retrieved_ids`` (B, k) int; ``true_ids`` (B,) int (-1 = unknown -> inf).
    """
    hit = (retrieved_ids == true_ids[:, None]) & (true_ids[:, None] >= 0)
    first = np.argmax(hit, axis=1).astype(np.float64) + 1.0
    return np.where(hit.any(axis=1), first, np.inf)


def count_higher(
    query_emb: np.ndarray,
    query_ids: np.ndarray,
    correct_scores: np.ndarray,
    feature_chunks: Iterable[tuple[int, np.ndarray]],
    ref_ids: np.ndarray,
    allowed_mask: np.ndarray | None = None,
) -> np.ndarray:
    """(B,) number of references of another id scoring strictly higher than each query's correct one.

    ``query_emb`` (B, D); ``query_ids`` (B,); ``correct_scores`` (B,) (``-inf`` for queries
    without a correct reference: their count is meaningless); ``feature_chunks`` yields
    ``(first_row, (C, D))`` reference features; ``ref_ids`` (N,) their ids (references of the
    query's own id never count, so rounding differences between two ways of computing the
    correct score cannot push it below itself); ``allowed_mask`` (N,) bool restricts the
    references counted (a prior). Memory is B x C per chunk, never B x N.
    """
    counts = np.zeros(len(query_emb), dtype=np.int64)
    thr = np.asarray(correct_scores, dtype=np.float32)[:, None]
    qid = np.asarray(query_ids)[:, None]
    for start, f in feature_chunks:
        s = query_emb @ f.T
        above = (s > thr) & (ref_ids[start : start + len(f)][None, :] != qid)
        if allowed_mask is not None:
            above &= allowed_mask[start : start + len(f)][None, :]
        counts += above.sum(axis=1)
    return counts


def exact_ranks(
    query_emb: np.ndarray,
    query_ids: np.ndarray,
    ref_features: np.ndarray,
    ref_ids: np.ndarray,
    chunk_rows: int = 65_536,
) -> np.ndarray:
    """(B,) exact rank of each query's correct reference among all references (inf if absent).

    rank = 1 + number of references scoring higher than the best-scoring reference of the
    query's id (ties are resolved in the query's favour). Chunked over references.
    """
    correct = np.full(len(query_emb), -np.inf, dtype=np.float32)
    for s in range(0, len(ref_features), chunk_rows):
        sc = query_emb @ ref_features[s : s + chunk_rows].T
        same = ref_ids[s : s + chunk_rows][None, :] == query_ids[:, None]
        correct = np.maximum(correct, np.where(same, sc, -np.inf).max(axis=1, initial=-np.inf))
    chunks = ((s, ref_features[s : s + chunk_rows]) for s in range(0, len(ref_features), chunk_rows))
    ranks = 1.0 + count_higher(query_emb, query_ids, correct, chunks, ref_ids).astype(np.float64)
    return np.where(np.isfinite(correct), ranks, np.inf)


def block_metrics(
    ranks: np.ndarray,
    errors_m: np.ndarray,
    ks: Iterable[int],
    thresholds_m: Iterable[float],
    cmc_max_k: int,
) -> dict[str, Any]:
    """One ``coarse``/``refined`` block of metrics.json, plus the plotted curves.

    Keys fixed by DESIGN.md: ``recall`` {k: f}, ``mAP``, ``error_m`` {mean, median, p90,
    within}. Extra keys: ``cmc`` (recall@1..cmc_max_k) and ``error_cdf`` (share within each
    value of :data:`CDF_GRID_M`).
    """
    cmc = cmc_curve(ranks, cmc_max_k)
    cdf = error_cdf(errors_m)
    return {
        "recall": recall_at_k(ranks, ks),
        "mAP": mean_average_precision(ranks),
        "error_m": error_stats(errors_m, thresholds_m),
        "cmc": [None if np.isnan(v) else float(v) for v in cmc],
        "error_cdf": [None if np.isnan(v) else float(v) for v in cdf],
    }
