"""``test.py`` / ``cmpc test``: evaluate an experiment on its test SAR queries.

Loads the embedder and the reference index (building the index first when it is missing or
stale: another checkpoint, dataset, split or factory; a checkpoint other than the
experiment's ``runs/<name>/emb_best.pt`` gets its own ``index/<name>@<hash[:12]>/`` so the
experiment's index is left alone), localizes every test SAR query of
``exp.data.root`` with the :class:`~cmpc.localize.localizer.Localizer` (and the refiner when
the experiment has one), and writes to ``exp.report_dir``: metrics.json (keys fixed by
DESIGN.md, per query set ``exp.eval.query_sets``), cmc.png, error_cdf.png,
retrieval_grid.png, error_map.png, predictions.csv and predictions.geojson. They are
written aside and moved in only when the whole run succeeded, so a failed run leaves the
previous report whole; what other commands wrote there (``localize/``, ``translate/``, ...)
stays.
"""

from __future__ import annotations

import datetime as _dt
import sys
from typing import Any

from cmpc.config import Experiment
from cmpc.data.layout import check_root
from cmpc.evaluate.report import REPORT_FILES, write_report
from cmpc.index.build import build_index, default_checkpoint, index_experiment, index_is_current
from cmpc.localize.localizer import Localizer
from cmpc.localize.queries import AnnotationQueries
from cmpc.localize.run import run_queries, split_protocol
from cmpc.models.checkpoint import checkpoint_hash
from cmpc.utils.io import atomic_dir


def evaluate(exp: Experiment, checkpoint: str | None = None) -> dict[str, Any]:
    """Evaluate ``exp`` (checkpoint default ``runs/<name>/emb_best.pt``); return metrics.json's content."""
    ckpt = default_checkpoint(exp, checkpoint)
    root = check_root(exp.data.root)
    ckpt_hash = checkpoint_hash(ckpt)
    iexp = index_experiment(exp, ckpt, ckpt_hash)  # another model's index: index/<name>@<hash>, beside
    ok, why = index_is_current(iexp, ckpt_hash)
    if not ok:
        print(f"building the index first: {why}", file=sys.stderr)
        build_index(iexp, checkpoint=str(ckpt))
    localizer = Localizer.from_experiment(exp, ckpt, index_dir=iexp.index_dir)
    source = AnnotationQueries(root, "test", localizer.img_size, exp.data.num_workers)
    out_dir = exp.report_dir
    # Written aside and moved into reports/<name>/ only when everything succeeded: a failed
    # run leaves the previous report whole; other commands' outputs there (localize/, ...) stay.
    with atomic_dir(out_dir, merge=True, owned=REPORT_FILES) as tmp:
        records, stats = run_queries(localizer, source, tmp, exp.localize.batch_size, exp.eval.grid_queries)
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
            "index_rebuilt": not ok,
            "references": localizer.index.ntotal,
            "top_k": exp.localize.top_k,
            "config": exp.to_dict(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "timing": stats,
        }
        metrics = write_report(records, tmp, meta, exp.eval, localizer.index, exp.localize.top_k)
    return metrics
