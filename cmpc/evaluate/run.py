"""``test.py`` / ``cmpc test``: evaluate an experiment on its test SAR queries.

Receives the index folder to evaluate against: the caller runs the index step first
(:func:`cmpc.index.build.ensure_index`, which builds it only when missing or stale and gives
a checkpoint other than the experiment's ``runs/<name>/emb_best.pt`` its own
``index/<name>@<hash[:12]>/``). Loads the embedder and that index, localizes every test SAR
query of ``exp.data.root`` with the :class:`~cmpc.localize.localizer.Localizer` (and the
refiner when the experiment has one), and writes to ``exp.report_dir``: metrics.json (keys
fixed by DESIGN.md, per query set ``exp.eval.query_sets``), cmc.png, error_cdf.png,
retrieval_grid.png, error_map.png, predictions.csv and predictions.geojson. They are
written aside and moved in only when the whole run succeeded, so a failed run leaves the
previous report whole; what other commands wrote there (``localize/``, ``translate/``, ...)
stays.
"""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any

from cmpc.config import Experiment
from cmpc.data.layout import check_root
from cmpc.evaluate.ranks import GroundTruthScorer
from cmpc.evaluate.report import REPORT_FILES
from cmpc.localize.localizer import Localizer
from cmpc.localize.queries import AnnotationQueries
from cmpc.localize.run import run_queries, split_protocol
from cmpc.models.checkpoint import default_checkpoint
from cmpc.utils.io import atomic_dir


def evaluate(
    exp: Experiment,
    index_dir: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    index_rebuilt: bool = False,
) -> dict[str, Any]:
    """Evaluate ``exp`` against the index at ``index_dir`` (built with the checkpoint, default
    ``runs/<name>/emb_best.pt``); return metrics.json's content.

    ``index_rebuilt``: recorded in ``meta`` (whether the index step had to build it first).
    """
    ckpt = default_checkpoint(exp.run_dir, checkpoint)
    root = check_root(exp.data.root)
    localizer = Localizer.from_experiment(exp, ckpt, index_dir=index_dir)
    source = AnnotationQueries(root, "test", localizer.img_size, exp.data.num_workers)
    scorer = GroundTruthScorer(exp.eval, exp.localize.top_k)
    out_dir = exp.report_dir
    # Written aside and moved into reports/<name>/ only when everything succeeded: a failed
    # run leaves the previous report whole; other commands' outputs there (localize/, ...) stay.
    with atomic_dir(out_dir, merge=True, owned=REPORT_FILES) as tmp:
        records, stats = run_queries(localizer, source, tmp, exp.localize.batch_size, exp.eval.grid_queries, scorer)
        assert records is not None  # dataset queries always carry ground truth
        meta = {
            "dataset": str(root),
            "split": split_protocol(root),
            "query_split": "test",
            "checkpoint": str(ckpt),
            "checkpoint_hash": localizer.index.manifest["checkpoint"]["hash"],
            "inputs": localizer.inputs(),  # embedder / index / refiner {path, sha256} (cmpc.utils.provenance)
            "index": str(localizer.index.directory),
            "index_factory": localizer.index.manifest.get("factory"),
            "index_rebuilt": bool(index_rebuilt),
            "references": localizer.index.ntotal,
            "top_k": exp.localize.top_k,
            "config": exp.to_dict(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "timing": stats,
        }
        metrics = scorer.report(records, tmp, meta, localizer.index)
    return metrics
