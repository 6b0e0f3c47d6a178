"""Localization outputs, written while queries stream: predictions.csv and predictions.geojson.

Both files are written to temporary names and renamed into place when the run completes, so
an interrupted run leaves the previous outputs (or none), never half a file. Per-query
numbers needed for metrics (ranks, errors, positions: a few floats per query) are kept in
:class:`QueryRecords`; patches and score matrices are not.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import numpy as np

from cmpc.localize.localizer import LocalizeResult
from cmpc.localize.queries import QueryBatch
from cmpc.utils.io import atomic_path

CSV_FILE = "predictions.csv"
GEOJSON_FILE = "predictions.geojson"


def _num(v: float) -> float | None:
    """JSON-safe float (NaN/inf -> None)."""
    v = float(v)
    return v if math.isfinite(v) else None


def _geojson_crs(crs: str | None) -> dict[str, Any] | None:
    """The (pre-RFC 7946) ``crs`` member GDAL/QGIS read, for coordinates in a projected CRS."""
    if not crs:
        return None
    if crs.upper().startswith("EPSG:"):
        return {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{crs.split(':', 1)[1]}"}}
    return {"type": "name", "properties": {"name": crs}}


class PredictionWriter:
    """Context manager streaming one CSV row and one GeoJSON point per query.

    Columns / properties: ``query``, final ``x``, ``y`` (refined when a refiner is used, else
    coarse; metres in the map CRS), ``coarse_x``, ``coarse_y``, ``refined_x``, ``refined_y``
    (with a refiner), ``position_from`` (``aligned``: fine alignment took it; ``gnn``;
    ``coarse``: the refiner's evidence was below its calibrated threshold and the coarse
    answer was kept) and ``align_peak`` (best alignment peak, mean cosine), ``top1_id``, ``top1_score``, ``topk_ids``, ``topk_scores``, and with
    ground truth ``true_id``, ``true_x``, ``true_y``, ``aligned``, ``coarse_rank``,
    ``coarse_error_m`` (+ ``refined_rank``, ``refined_error_m``). Ranks are empty when the
    correct reference was not found.
    """

    def __init__(self, out_dir: Path, crs: str | None, has_truth: bool, has_refiner: bool) -> None:
        self.out_dir = Path(out_dir)
        self.crs = crs
        self.has_truth = has_truth
        self.has_refiner = has_refiner
        self._stack = contextlib.ExitStack()
        self._n = 0
        cols = ["query", "x", "y", "coarse_x", "coarse_y"]
        if has_refiner:
            cols += ["refined_x", "refined_y", "position_from", "align_peak"]
        cols += ["top1_id", "top1_score", "topk_ids", "topk_scores"]
        if has_truth:
            cols += ["true_id", "true_x", "true_y", "aligned", "coarse_rank", "coarse_error_m"]
            if has_refiner:
                cols += ["refined_rank", "refined_error_m"]
        self.columns = cols

    def __enter__(self) -> PredictionWriter:
        try:
            return self._open()
        except BaseException as e:
            self._stack.__exit__(type(e), e, e.__traceback__)  # not close(): that would rename partial files
            raise

    def _open(self) -> PredictionWriter:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        csv_tmp = self._stack.enter_context(atomic_path(self.out_dir / CSV_FILE))
        geo_tmp = self._stack.enter_context(atomic_path(self.out_dir / GEOJSON_FILE))
        # Files are closed (LIFO) before atomic_path renames them.
        self._csv_f: TextIO = self._stack.enter_context(open(csv_tmp, "w", newline="", encoding="utf-8"))
        self._geo: TextIO = self._stack.enter_context(open(geo_tmp, "w", encoding="utf-8"))
        self._csv = csv.writer(self._csv_f)
        self._csv.writerow(self.columns)
        head: dict[str, Any] = {"type": "FeatureCollection", "name": "predictions"}
        if (crs := _geojson_crs(self.crs)) is not None:
            head["crs"] = crs
        self._geo.write(json.dumps(head)[:-1] + ', "features": [\n')
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> bool | None:
        if et is None:
            self._geo.write("\n]}\n")
        return self._stack.__exit__(et, e, tb)

    @property
    def count(self) -> int:
        """Queries written so far."""
        return self._n

    def write(
        self,
        batch: QueryBatch,
        res: LocalizeResult,
        coarse_rank: np.ndarray | None = None,
        refined_rank: np.ndarray | None = None,
    ) -> None:
        """Append the B queries of one batch."""
        final = res.refined_xy if res.refined else res.coarse_xy
        for i, name in enumerate(batch.names):
            props: dict[str, Any] = {
                "query": name,
                "x": _num(final[i, 0]),
                "y": _num(final[i, 1]),
                "coarse_x": _num(res.coarse_xy[i, 0]),
                "coarse_y": _num(res.coarse_xy[i, 1]),
            }
            if self.has_refiner:
                props["refined_x"] = _num(res.refined_xy[i, 0])
                props["refined_y"] = _num(res.refined_xy[i, 1])
                props["position_from"] = str(res.position_from[i]) if res.position_from is not None else "refiner"
                props["align_peak"] = round(float(res.align_peak[i]), 4) if res.align_peak is not None else None
            ids = [int(v) for v in res.ids[i]]
            scores = [round(float(v), 6) for v in res.scores[i]]
            props.update(top1_id=ids[0] if ids else None, top1_score=scores[0] if scores else None, topk_ids=ids, topk_scores=scores)
            if self.has_truth:
                t = batch.true_xy[i]
                props.update(true_id=int(batch.true_ids[i]), true_x=_num(t[0]), true_y=_num(t[1]), aligned=bool(batch.aligned[i]))
                props["coarse_rank"] = int(coarse_rank[i]) if coarse_rank is not None and np.isfinite(coarse_rank[i]) else None
                props["coarse_error_m"] = _num(np.hypot(*(res.coarse_xy[i] - t)))
                if self.has_refiner:
                    props["refined_rank"] = int(refined_rank[i]) if refined_rank is not None and np.isfinite(refined_rank[i]) else None
                    props["refined_error_m"] = _num(np.hypot(*(res.refined_xy[i] - t)))
            row = []
            for c in self.columns:
                v = props.get(c)
                if isinstance(v, list):
                    v = " ".join(str(u) for u in v)
                row.append("" if v is None else v)
            self._csv.writerow(row)
            geom = {"type": "Point", "coordinates": [props["x"], props["y"]]} if props["x"] is not None else None
            feat = {"type": "Feature", "geometry": geom, "properties": props}
            self._geo.write(("" if self._n == 0 else ",\n") + json.dumps(feat))
            self._n += 1


@dataclass
class GridSample:
    """One query shown in the retrieval grid: its input image and its top candidates."""

    name: str
    image: np.ndarray  # (C, S, S) float32, standardised model input
    true_id: int
    rows: np.ndarray  # (n,) index rows, best first
    ids: np.ndarray
    scores: np.ndarray


@dataclass
class QueryRecords:
    """Per-query numbers kept for metrics and plots (a few floats per query)."""

    grid_queries: int = 0
    grid_top: int = 5
    aligned: list[np.ndarray] = field(default_factory=list)
    true_xy: list[np.ndarray] = field(default_factory=list)
    coarse_xy: list[np.ndarray] = field(default_factory=list)
    refined_xy: list[np.ndarray] = field(default_factory=list)
    coarse_rank: list[np.ndarray] = field(default_factory=list)
    refined_rank: list[np.ndarray] = field(default_factory=list)
    grid: list[GridSample] = field(default_factory=list)
    refined: bool = False

    def add(self, batch: QueryBatch, res: LocalizeResult, coarse_rank: np.ndarray, refined_rank: np.ndarray | None) -> None:
        self.aligned.append(batch.aligned.astype(bool))
        self.true_xy.append(batch.true_xy)
        self.coarse_xy.append(res.coarse_xy)
        self.refined_xy.append(res.refined_xy)
        self.coarse_rank.append(coarse_rank)
        self.refined = res.refined
        self.refined_rank.append(refined_rank if refined_rank is not None else coarse_rank)
        for i in range(len(batch)):
            if len(self.grid) >= self.grid_queries:
                break
            n = min(self.grid_top, res.rows.shape[1])
            self.grid.append(
                GridSample(batch.names[i], batch.x[i].numpy().copy(), int(batch.true_ids[i]), res.rows[i, :n].copy(), res.ids[i, :n].copy(), res.scores[i, :n].copy())
            )

    def arrays(self) -> dict[str, np.ndarray]:
        """Concatenated per-query arrays: aligned (Q,), true_xy/coarse_xy/refined_xy (Q, 2),
        coarse_rank/refined_rank (Q,), coarse_error_m/refined_error_m (Q,) metres."""
        cat = lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape)  # noqa: E731
        out = {
            "aligned": cat(self.aligned, (0,)).astype(bool),
            "true_xy": cat(self.true_xy, (0, 2)),
            "coarse_xy": cat(self.coarse_xy, (0, 2)),
            "refined_xy": cat(self.refined_xy, (0, 2)),
            "coarse_rank": cat(self.coarse_rank, (0,)),
            "refined_rank": cat(self.refined_rank, (0,)),
        }
        out["coarse_error_m"] = np.hypot(*(out["coarse_xy"] - out["true_xy"]).T) if len(out["true_xy"]) else np.zeros(0)
        out["refined_error_m"] = np.hypot(*(out["refined_xy"] - out["true_xy"]).T) if len(out["true_xy"]) else np.zeros(0)
        return out
