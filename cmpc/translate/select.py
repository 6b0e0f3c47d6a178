"""Choosing a translator checkpoint by the downstream task (``cmpc translate select``).

Image metrics do not tell which translator checkpoint makes the best training views (early
checkpoints, less sharp but less hallucinated, are often better). So, for each candidate,
a short embedder run (``translate.select_epochs`` epochs, otherwise the experiment's own
training settings) is trained with that checkpoint as its only auxiliary view source, and
the candidate with the best validation R@1 (ties: R@5, then the earlier checkpoint) wins.
A run without translated views is trained the same way as the reference row.

Runs are named ``<name>_sel_<tag>`` (checkpoints in ``runs/``; a finished run is reused).
Writes ``<report_dir>/translate_select.json`` and ``.md``.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path
from typing import Any

from cmpc.config import Experiment
from cmpc.errors import ConfigError
from cmpc.models.checkpoint import checkpoint_hash, load_checkpoint
from cmpc.utils.io import atomic_write_json, atomic_write_text


def candidate_checkpoints(exp: Experiment, candidates: list[str] | None = None) -> list[Path]:
    """``candidates``, else ``translate.select_checkpoints``, else every ``epoch_*.pt`` of the translator run."""
    from cmpc.translate.train import translator_dir

    paths = [Path(c) for c in (candidates or exp.translate.select_checkpoints)]
    if not paths:
        paths = sorted(translator_dir(exp).glob("epoch_*.pt"))
    if not paths:
        raise ConfigError(
            f"no translator checkpoints to choose from in {translator_dir(exp)}; train one with "
            f"`cmpc translate train` or list them in translate.select_checkpoints"
        )
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"translator checkpoint not found: {missing[0]}")
    return paths


def _short_run(exp: Experiment, tag: str, views: list[str]) -> dict[str, Any]:
    from cmpc.train.emb import fit_embedder
    from cmpc.translate.augment import training_views

    sub = copy.deepcopy(exp)
    sub.name = f"{exp.name}_sel_{tag}"
    sub.train.epochs = exp.translate.select_epochs
    sub.translate.views = views
    sub.refine.enabled = False
    t0 = time.perf_counter()
    res = fit_embedder(sub, views=training_views(sub))
    return {
        "run": str(sub.run_dir),
        "checkpoint": str(res.best_path),
        "val_recall": {k: float(v) for k, v in (res.metrics or {}).items()},
        "seconds": round(time.perf_counter() - t0, 1),
        "reused": bool(res.already_finished),
    }


def _key(row: dict[str, Any]) -> tuple[float, float, float]:
    r = row["val_recall"]
    r1 = r.get("1", float("nan"))
    r5 = r.get("5", float("nan"))
    return (r1 if math.isfinite(r1) else -1.0, r5 if math.isfinite(r5) else -1.0, -float(row.get("epoch") or 0))


def select_checkpoint(exp: Experiment, candidates: list[str] | None = None) -> dict[str, Any]:
    """Train a short embedder per candidate; return (and write) the table and the winner."""
    paths = candidate_checkpoints(exp, candidates)
    rows: list[dict[str, Any]] = []
    print(f"[translate select] baseline + {len(paths)} candidate(s), {exp.translate.select_epochs} epoch(s) each", file=sys.stderr, flush=True)
    base = {"candidate": "none (no translated views)", "epoch": None, "hash": None, **_short_run(exp, "none", [])}
    for p in paths:
        meta = load_checkpoint(p)
        if meta.get("kind") != "translator":
            raise ConfigError(f"{p} is not a translator checkpoint")
        h = checkpoint_hash(p)[:8]
        row = {"candidate": str(p), "model": meta.get("model"), "epoch": int(meta.get("epoch", 0)), "hash": h}
        row.update(_short_run(exp, f"{meta.get('model')}_e{int(meta.get('epoch', 0)):03d}_{h}", [str(p)]))
        rows.append(row)
        print(f"[translate select] {p}: val R@1 {row['val_recall'].get('1', float('nan')):.3f}", file=sys.stderr, flush=True)
    best = max(rows, key=_key)
    result = {
        "meta": {
            "experiment": exp.name,
            "dataset": exp.data.root,
            "select_epochs": exp.translate.select_epochs,
            "view_prob": exp.translate.view_prob,
            "criterion": "validation R@1 (ties: R@5, then the earlier checkpoint)",
        },
        "baseline": base,
        "candidates": rows,
        "best": best["candidate"],
        "best_val_r1": best["val_recall"].get("1"),
        "gain_over_baseline": (best["val_recall"].get("1", float("nan")) - base["val_recall"].get("1", float("nan"))),
    }
    out = exp.report_dir
    atomic_write_json(out / "translate_select.json", result)
    atomic_write_text(out / "translate_select.md", format_table(result))
    return result


def format_table(result: dict[str, Any]) -> str:
    """Markdown table of :func:`select_checkpoint`'s result."""
    m = result["meta"]
    lines = [
        f"# Translator checkpoint selection: {m['experiment']}",
        "",
        f"Dataset {m['dataset']}; {m['select_epochs']} embedder epoch(s) per candidate, view probability {m['view_prob']}; "
        f"criterion: {m['criterion']}.",
        "",
        "| candidate | epoch | val R@1 | val R@5 | seconds |",
        "|---|---|---|---|---|",
    ]
    for row in [result["baseline"]] + result["candidates"]:
        r = row["val_recall"]
        mark = " **(best)**" if row["candidate"] == result["best"] else ""
        lines.append(
            f"| {Path(row['candidate']).name if row['epoch'] is not None else row['candidate']}{mark} | {row['epoch'] if row['epoch'] is not None else '-'} | "
            f"{r.get('1', float('nan')):.3f} | {r.get('5', float('nan')):.3f} | {row['seconds']:.0f} |"
        )
    lines.append("")
    return "\n".join(lines)
