"""``cmpc localize``: SAR queries -> top-k references -> (refined) positions, streamed.

Queries (see :mod:`cmpc.localize.queries`) are read, embedded, searched and written batch
by batch (``localize.batch_size``); memory does not grow with the number of queries beyond a
few numbers per query kept for metrics, and no queries x references matrix is ever formed.
Outputs go to ``--out`` (default ``reports/<name>/localize/``): predictions.geojson (points
in the map CRS) and predictions.csv, plus metrics.json and the evaluation plots when the
queries carry ground truth and a ``scorer`` is given (the evaluation's
:class:`cmpc.evaluate.ranks.GroundTruthScorer`, handed in by whoever composes the steps:
this layer does not import the evaluation). They are written into a temporary sibling
folder and moved into the output folder only when the whole run succeeded
(:func:`cmpc.utils.io.atomic_dir`, ``merge``): a failed run leaves the previous outputs, or
no folder at all.
"""

from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from cmpc.config import Experiment
from cmpc.data.conventions import InputConventions, check_patch_files, check_sar_raster
from cmpc.data.layout import read_dataset_meta
from cmpc.errors import DataError
from cmpc.index.store import ReferenceIndex
from cmpc.localize.localizer import Localizer, LocalizeResult, load_refiner  # noqa: F401 - public re-exports
from cmpc.localize.outputs import CSV_FILE, GEOJSON_FILE, PredictionWriter, QueryRecords
from cmpc.localize.queries import AnnotationQueries, QuerySource, RasterQueries, open_queries
from cmpc.utils.io import atomic_dir, check_out_dir

__all__ = ["Localizer", "LocalizeResult", "Scorer", "check_query_conventions", "load_refiner", "localize", "run_queries", "split_protocol"]

#: What a localization run writes itself (a scorer adds its own files, :attr:`Scorer.files`).
PREDICTION_FILES = (CSV_FILE, GEOJSON_FILE)


class Scorer(Protocol):
    """What the localize step needs to score queries that carry ground truth.

    Implemented by :class:`cmpc.evaluate.ranks.GroundTruthScorer`; the caller composes them.
    """

    #: every file :meth:`report` may write into the output folder (a new run replaces them)
    files: tuple[str, ...]

    def ranks(self, localizer: Localizer, result: LocalizeResult, true_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(coarse ranks (B,), refined ranks (B,) or None) of the correct references, 1-based, inf = not found."""
        ...

    def report(self, records: QueryRecords, out_dir: Path, meta: dict[str, Any], index: ReferenceIndex) -> dict[str, Any]:
        """Write the metrics of ``records`` into ``out_dir``; return them."""
        ...

    def written(self) -> tuple[str, ...]:
        """The files :meth:`report` writes with this configuration."""
        ...


def split_protocol(root: str | Path) -> str:
    """``same-area`` / ``cross-area`` from ROOT/dataset.json, or ``unknown`` (e.g. SN6-CMPC)."""
    meta = read_dataset_meta(root)
    for value in (meta.get("split"), meta.get("protocol"), (meta.get("tile") or {}).get("split")):
        if isinstance(value, str) and value:
            return value
    return "unknown"


def run_queries(
    localizer: Localizer,
    source: QuerySource,
    out_dir: Path,
    batch_size: int,
    grid_queries: int = 0,
    scorer: Scorer | None = None,
) -> tuple[QueryRecords | None, dict[str, Any]]:
    """Stream ``source`` through ``localizer``, writing predictions into ``out_dir``.

    With ground truth in ``source`` and a ``scorer``, each query's ranks go into the
    predictions and into per-query records (``grid_queries`` of them keep their candidates
    for the retrieval grid). Returns (the records for metrics, or None without ground truth
    or scorer; run statistics: ``queries``, ``seconds``, ``ms_per_query``).
    """
    localizer.index.check_crs(source.crs, source.description)
    truth = source.has_truth and scorer is not None
    records = QueryRecords(grid_queries=grid_queries) if truth else None
    refined = localizer.refiner is not None
    t0 = time.perf_counter()
    with PredictionWriter(out_dir, localizer.index.crs, truth, refined) as writer:
        bar = tqdm(total=source.count, desc="localize", unit="query", disable=None)
        for batch in source.batches(batch_size):
            localizer.check_channels(batch.x.shape[1], source.description)
            res = localizer.localize_batch(batch.x)
            coarse_rank = refined_rank = None
            if records is not None:
                assert scorer is not None
                coarse_rank, refined_rank = scorer.ranks(localizer, res, batch.true_ids)
                records.add(batch, res, coarse_rank, refined_rank)
            writer.write(batch, res, coarse_rank, refined_rank)
            bar.update(len(batch))
        bar.close()
        if writer.count == 0:
            raise DataError(f"{source.description}: no query patch to localize (all skipped as nodata?)")
        n = writer.count
    seconds = time.perf_counter() - t0
    return records, {"queries": n, "seconds": round(seconds, 3), "ms_per_query": round(1000 * seconds / n, 3)}


def localize(
    exp: Experiment,
    queries: str,
    out: str | None = None,
    checkpoint: str | None = None,
    split: str = "test",
    *,
    index_dir: str | Path | None = None,
    scorer: Scorer | None = None,
    refiner_path: str | Path | None = None,
    use_refiner: bool = True,
    conventions: InputConventions | None = None,
) -> dict[str, Any]:
    """Localize ``queries`` against the index; return a summary (and write outputs).

    ``queries``: a folder of SAR patches, a CMPC dataset root (``split`` picks its SAR
    queries), a CMPC annotation folder, or a SAR GeoTIFF. ``checkpoint``: embedder (default
    ``runs/<name>/emb_best.pt``; must be the one the index was built with). ``index_dir``:
    the index folder (default the one serving the checkpoint, see
    :meth:`Localizer.from_experiment`). ``scorer``: scores queries that carry ground truth
    (metrics.json and plots beside the predictions); without one, predictions only.
    ``refiner_path`` / ``use_refiner``: see :meth:`Localizer.from_experiment`.
    ``conventions``: the input conventions of a shipped model (:mod:`cmpc.models.card`): the
    queries are checked against them before anything is embedded or written
    (:func:`check_query_conventions`).
    """
    out_dir = check_out_dir(Path(out) if out else exp.report_dir / "localize")  # a file there: one line, before any work
    localizer = Localizer.from_experiment(exp, checkpoint, index_dir=index_dir, use_refiner=use_refiner, refiner_path=refiner_path)
    source = open_queries(
        queries, split, localizer.img_size, localizer.index, exp.localize, exp.data.num_workers, exp.tile.nodata_max_frac
    )
    if conventions is not None:
        check_query_conventions(source, conventions)
    # Written aside and moved into out_dir only when everything succeeded: a failed run leaves
    # the previous outputs whole (or no folder at all); other files in out_dir stay.
    owned = PREDICTION_FILES + (scorer.files if scorer is not None else ())
    with atomic_dir(out_dir, merge=True, owned=owned) as tmp:
        records, stats = run_queries(localizer, source, tmp, exp.localize.batch_size, exp.eval.grid_queries, scorer)
        summary: dict[str, Any] = {
            "queries": stats["queries"],
            "source": source.description,
            "kind": source.kind,
            "index": str(localizer.index.directory),
            "checkpoint": str(localizer.checkpoint_path),
            "refined": localizer.refiner is not None,
            "prior_candidates": None if localizer.allowed_rows is None else int(len(localizer.allowed_rows)),
            "out": str(out_dir),
            "files": [str(out_dir / GEOJSON_FILE), str(out_dir / CSV_FILE)],
            "seconds": stats["seconds"],
            "ms_per_query": stats["ms_per_query"],
        }
        if records is not None and scorer is not None:
            annotated = isinstance(source, AnnotationQueries)
            meta = {
                # a co-registered GeoTIFF (localize.raster_truth) is scored against its own tiles
                "dataset": str(source.root) if annotated else str(getattr(source, "path", source.description)),
                "split": split_protocol(source.root) if annotated else "co-registered raster (localize.raster_truth)",
                "query_split": source.split if annotated else None,
                "checkpoint": str(localizer.checkpoint_path),
                "checkpoint_hash": localizer.index.manifest["checkpoint"]["hash"],
                "inputs": localizer.inputs(),  # embedder / index / refiner {path, sha256} (cmpc.utils.provenance)
                "index": str(localizer.index.directory),
                "index_factory": localizer.index.manifest.get("factory"),
                "references": int(len(localizer.index.ids)),
                "config": exp.to_dict(),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "timing": stats,
            }
            metrics = scorer.report(records, tmp, meta, localizer.index)
            summary["files"] += [str(out_dir / name) for name in scorer.written()]
            summary["metrics"] = short_metrics(metrics)
    return summary


def check_query_conventions(source: QuerySource, conventions: InputConventions) -> dict[str, Any]:
    """Check the SAR queries of ``source`` against a shipped model's input conventions
    (:mod:`cmpc.data.conventions`): a SAR GeoTIFF as a whole, patch files on a sample (their
    annotation ``gsd``, metres/pixel, when they carry one). One-line refusals; returns the facts."""
    if isinstance(source, RasterQueries):
        return check_sar_raster(source.path, conventions, bands=source.bands)
    paths = getattr(source, "paths", None)  # patch folders and dataset splits
    if paths is not None:
        gsds = [a.gsd for a in getattr(source, "annotations", []) if a.gsd]
        return check_patch_files(paths, conventions, "sar", gsd_m=float(np.median(gsds)) if gsds else None)
    return {}


def short_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """R@k, mAP and median error per set and stage, for printing."""
    out: dict[str, Any] = {}
    for name, block in metrics.items():
        if name == "meta":
            continue
        row: dict[str, Any] = {"n_queries": block["n_queries"]}
        for stage in ("coarse", "refined"):
            if stage in block:
                b = block[stage]
                row[stage] = {**{f"R@{k}": v for k, v in b["recall"].items()}, "mAP": b["mAP"], "median_error_m": b["error_m"]["median"]}
        out[name] = row
    return out
