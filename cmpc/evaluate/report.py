"""metrics.json and the four plots, from the per-query records of a localization run.

Shared by ``cmpc localize`` (when the queries have ground truth) and ``test.py``. The keys
of metrics.json are fixed by DESIGN.md; the curves that the plots draw are stored too
(``cmc``, ``error_cdf`` per block, ``meta.error_cdf_grid_m``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cmpc.config import EvalConfig
from cmpc.errors import ConfigError, DataError
from cmpc.evaluate.metrics import CDF_GRID_M, block_metrics
from cmpc.evaluate.plots import plot_cmc, plot_error_cdf, plot_error_map, plot_retrieval_grid
from cmpc.index.store import FOOTPRINTS_FILE, ReferenceIndex
from cmpc.localize.outputs import CSV_FILE, GEOJSON_FILE, QueryRecords
from cmpc.utils.io import atomic_write_json

QUERY_SETS = ("aligned", "non_aligned", "all")
PLOTS = ("cmc.png", "error_cdf.png", "retrieval_grid.png", "error_map.png")
#: Everything one localization / evaluation run writes into its folder: a new run replaces
#: all of them (one it no longer writes, e.g. the plots with eval.plots=false, is removed).
REPORT_FILES = (CSV_FILE, GEOJSON_FILE, "metrics.json", *PLOTS)


def set_masks(aligned: np.ndarray, query_sets: list[str]) -> dict[str, np.ndarray]:
    """Boolean masks per query set: ``aligned`` (flag true or missing), ``non_aligned``, ``all``."""
    unknown = [s for s in query_sets if s not in QUERY_SETS]
    if unknown:
        raise ConfigError(f"eval.query_sets: unknown set {unknown[0]!r}; valid: {list(QUERY_SETS)}")
    table = {"aligned": aligned, "non_aligned": ~aligned, "all": np.ones_like(aligned)}
    return {s: table[s] for s in query_sets}


def compute_metrics(arrays: dict[str, np.ndarray], cfg: EvalConfig, refined: bool, cmc_max_k: int) -> dict[str, Any]:
    """``{set: {"n_queries", "coarse": {...}, "refined": {...} (with a refiner)}}``."""
    out: dict[str, Any] = {}
    for name, mask in set_masks(arrays["aligned"], list(cfg.query_sets)).items():
        block: dict[str, Any] = {"n_queries": int(mask.sum())}
        block["coarse"] = block_metrics(arrays["coarse_rank"][mask], arrays["coarse_error_m"][mask], cfg.ks, cfg.thresholds_m, cmc_max_k)
        if refined:
            block["refined"] = block_metrics(arrays["refined_rank"][mask], arrays["refined_error_m"][mask], cfg.ks, cfg.thresholds_m, cmc_max_k)
        out[name] = block
    return out


def _reference_loader(index: ReferenceIndex):  # noqa: ANN202
    from cmpc.data.patches import read_patch_array

    def load(row: int) -> np.ndarray | None:
        p = index.reference_path(row)
        if p is None:
            return None
        try:
            return read_patch_array(p)
        except DataError:
            return None

    return load


def write_report(
    records: QueryRecords,
    out_dir: Path,
    meta: dict[str, Any],
    cfg: EvalConfig,
    index: ReferenceIndex,
    top_k: int,
) -> dict[str, Any]:
    """Compute the metrics, write ``metrics.json`` and the plots into ``out_dir``; return the metrics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = records.arrays()
    cmc_max_k = int(min(100, max(max(cfg.ks), top_k)))
    sets = compute_metrics(arrays, cfg, records.refined, cmc_max_k)
    meta = dict(meta)
    meta["n_queries"] = int(len(arrays["aligned"]))
    meta["refined"] = records.refined
    meta["error_cdf_grid_m"] = [float(v) for v in CDF_GRID_M]
    meta["rank_note"] = (
        "rank = position of the first reference with the query's id in the returned top-k, "
        "else its exact rank among all (prior-allowed) references (>= k+1); inf/None = not in the map"
    )
    metrics = {"meta": meta, **sets}
    atomic_write_json(out_dir / "metrics.json", _json_safe(metrics))
    if cfg.plots:
        write_plots(sets, records, arrays, out_dir, index)
    return metrics


def write_plots(sets: dict[str, Any], records: QueryRecords, arrays: dict[str, np.ndarray], out_dir: Path, index: ReferenceIndex) -> None:
    """cmc.png, error_cdf.png, retrieval_grid.png, error_map.png from the computed metrics."""
    from pyogrio.errors import DataLayerError, DataSourceError

    stages = ("coarse", "refined") if records.refined else ("coarse",)
    plot_cmc({s: {st: b[st]["cmc"] for st in stages} for s, b in sets.items()}, out_dir / "cmc.png")
    plot_error_cdf({s: {st: b[st]["error_cdf"] for st in stages} for s, b in sets.items()}, out_dir / "error_cdf.png")
    plot_retrieval_grid(records.grid, _reference_loader(index), out_dir / "retrieval_grid.png")
    pred = arrays["refined_xy"] if records.refined else arrays["coarse_xy"]
    footprints = index.directory / FOOTPRINTS_FILE
    try:
        plot_error_map(footprints, arrays["true_xy"], pred, out_dir / "error_map.png",
                       title=f"{'Refined' if records.refined else 'Coarse'} localization errors")
    except (DataSourceError, DataLayerError) as e:
        why = str(e).split(";")[0][:160]
        raise DataError(f"{footprints}: unreadable reference footprints ({why}); rebuild the index with cmpc index build") from None


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> None (strict JSON), numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
