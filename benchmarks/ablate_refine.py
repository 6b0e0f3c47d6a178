"""Ablations of the refinement on an experiment's test split (default: the demo world).

``python -m benchmarks.ablate_refine [EXPERIMENT.json]`` needs the experiment's embedder
(``runs/<name>/emb_best.pt``) and refiner (``runs/<name>/refiner.pt``). Every variant is a
real ``evaluate`` run (the code path of ``test.py``) with switches of the refine section:

- coarse only: the centre of the coarse top-1 reference;
- + GNN rerank: the GNN's order, position = centre of its top-1;
- + GNN position: the GNN's regressed position;
- + fine alignment: dense alignment around the best ``fine_top`` candidates (the full
  refiner), also with only the best 3 and 10 candidates verified;
- fine alignment without the GNN (coarse order, alignment around the coarse candidates);
- spatial edges off: a GNN retrained with ``refine.spatial_knn=0`` (same embedder, same
  aligner weights), then the full refiner.

Writes reports/<name>/ablation/<variant>/metrics.json, docs/ablation_refine.json and the
section of docs/RESULTS.md between ``<!-- ablate_refine -->`` markers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

START = "<!-- ablate_refine:start -->"
END = "<!-- ablate_refine:end -->"

VARIANTS: list[tuple[str, str, list[str]]] = [
    ("coarse", "coarse only (top-1 centre)", ["refine.enabled=false"]),
    ("gnn_rerank", "+ GNN rerank", ["refine.fine_align=false", "refine.gnn_position=false"]),
    ("gnn_position", "+ GNN position", ["refine.fine_align=false"]),
    ("full", "+ fine alignment (full refiner)", []),
    ("full_top3", "full, fine alignment over the best 3 candidates only", ["refine.fine_top=3"]),
    ("full_top10", "full, fine alignment over the best 10 candidates", ["refine.fine_top=10"]),
    ("fine_only", "fine alignment without GNN", ["refine.rerank=false", "refine.gnn_position=false"]),
    ("no_spatial", "full, GNN without spatial edges", []),
]


def _summary(block: dict[str, Any], stage: str) -> dict[str, Any]:
    m = block[stage]
    e = m["error_m"]
    return {
        "n": block["n_queries"],
        "R@1": m["recall"].get("1"),
        "R@5": m["recall"].get("5"),
        "mAP": m["mAP"],
        "median_m": e["median"],
        "mean_m": e["mean"],
        "p90_m": e["p90"],
        "within_1m": e["within"].get("1"),
        "within_5m": e["within"].get("5"),
        "within_25m": e["within"].get("25"),
    }


def _no_spatial_refiner(exp, ckpt: Path) -> Any:  # noqa: ANN001 - Experiment
    """Train a GNN with spatial_knn=0 into runs/<name>-nospatial/refiner.pt, reusing the
    main refiner's aligner (the ablation is about the graph, not the aligner)."""
    from cmpc.index.build import ensure_train_index
    from cmpc.models.checkpoint import load_checkpoint, save_checkpoint
    from cmpc.train.refine import train_refiner
    from cmpc.utils.runtime import set_torch_threads

    set_torch_threads(exp.train.threads)  # what `cmpc train refine` uses
    var = dataclasses.replace(
        exp,
        name=f"{exp.name}-nospatial",
        index=dataclasses.replace(exp.index, name=exp.index_dir.name),
        refine=dataclasses.replace(exp.refine, spatial_knn=0, align_steps=0),
    )
    path = train_refiner(var, ensure_train_index(var, ckpt).directory, checkpoint=ckpt)
    main = load_checkpoint(exp.run_dir / "refiner.pt")
    mine = load_checkpoint(path)
    for key in ("aligner", "aligner_arch"):
        mine[key] = main.get(key)
    mine["stats"]["align_min_peak"] = main.get("stats", {}).get("align_min_peak", 0.0)
    mine["refine_cfg"]["fine_align"] = True
    save_checkpoint(path, mine)
    return var


def run(exp_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    from cmpc.config import load_experiment
    from cmpc.evaluate.run import evaluate
    from cmpc.index.build import ensure_index
    from cmpc.models.checkpoint import default_checkpoint

    overrides = list(overrides or [])
    base = load_experiment(exp_path, overrides)
    ckpt = default_checkpoint(base.run_dir)
    if not (base.run_dir / "refiner.pt").is_file():
        raise SystemExit(f"no refiner at {base.run_dir / 'refiner.pt'}: train it first (cmpc train refine {exp_path})")
    out: dict[str, Any] = {"experiment": exp_path, "checkpoint": str(ckpt), "refiner": str(base.run_dir / "refiner.pt"), "variants": {}}
    for key, label, sets in VARIANTS:
        t0 = time.perf_counter()
        if key == "no_spatial":
            exp = _no_spatial_refiner(base, ckpt)
        else:
            exp = load_experiment(exp_path, overrides + sets)
        exp = dataclasses.replace(exp, eval=dataclasses.replace(exp.eval, out=str(base.report_dir / "ablation" / key), plots=key == "full"))
        index = ensure_index(exp, ckpt)
        metrics = evaluate(exp, index.directory, checkpoint=str(ckpt), index_rebuilt=index.built)
        stage = "coarse" if key == "coarse" else "refined"
        rec = {"label": label, "overrides": sets, "seconds": round(time.perf_counter() - t0, 1)}
        for qset in ("non_aligned", "aligned"):
            if qset in metrics and stage in metrics[qset]:
                rec[qset] = _summary(metrics[qset], stage)
        out["variants"][key] = rec
        print(json.dumps({key: rec}), flush=True)
    out["alignment_given_neighbourhood"] = alignment_oracle(base)
    print(json.dumps(out["alignment_given_neighbourhood"]), flush=True)
    return out


def alignment_oracle(exp) -> dict[str, Any]:  # noqa: ANN001 - Experiment
    """Fine alignment alone on the test split: every test SAR query searched within
    +-max_shift px of a random point near its true centre (as if retrieval had found its
    neighbourhood), with and without the pixel-level phase refinement. Errors in pixels."""
    import numpy as np
    import torch

    from cmpc.localize.refine import refiner_from_checkpoint
    from cmpc.train.align import evaluate_aligner, load_align_data

    ref = refiner_from_checkpoint(exp.run_dir / "refiner.pt", exp.refine)
    if ref.aligner is None:
        return {}
    data = load_align_data(exp.data.root, "test")
    rows = np.arange(len(data.queries))
    shift = exp.refine.fine_max_shift_px if exp.refine.fine_max_shift_px is not None else data.query_px // 2
    with torch.no_grad():
        cell = evaluate_aligner(ref.aligner, data, rows, shift, seed=1)
        pixel = evaluate_aligner(ref.aligner, data, rows, shift, seed=1, phases=True)
    return {"max_shift_px": shift, "gsd_m": data.mosaic.gsd_m, "cell_quadratic": cell, "phase_refined": pixel}


def section(rec: dict[str, Any]) -> str:
    lines = [
        START,
        "## Refinement ablations (`benchmarks/ablate_refine.py`)",
        "",
        f"Experiment `{rec['experiment']}`, embedder `{rec['checkpoint']}`, refiner `{rec['refiner']}`; "
        "test split of the dataset against the test reference map, every row a full `evaluate` run.",
        "",
    ]
    for qset in ("non_aligned", "aligned"):
        lines += [
            f"**{qset.replace('_', '-')} queries**",
            "",
            "| variant | n | R@1 | R@5 | mAP | median err (m) | mean err (m) | p90 (m) | within 1 m | within 5 m | within 25 m |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for key, v in rec["variants"].items():
            s = v.get(qset)
            if not s:
                continue
            lines.append(
                f"| {v['label']} | {s['n']} | {s['R@1']:.3f} | {s['R@5']:.3f} | {s['mAP']:.3f} | {s['median_m']:.2f} | "
                f"{s['mean_m']:.2f} | {s['p90_m']:.2f} | {s['within_1m']:.3f} | {s['within_5m']:.3f} | {s['within_25m']:.3f} |"
            )
        lines.append("")
    al = rec.get("alignment_given_neighbourhood")
    if al:
        lines += [
            f"**Fine alignment alone** (every test SAR query searched within +-{al['max_shift_px']} px of a random point "
            f"near its true centre, as when retrieval finds its neighbourhood; {al['gsd_m']:g} m/px):",
            "",
            "| peak | n | median (px) | mean (px) | within 1 px | within 2 px | within 4 px |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, label in (("cell_quadratic", "cell (4 px) + quadratic"), ("phase_refined", "+ pixel phase refinement")):
            a = al[key]
            lines.append(f"| {label} | {a['n']} | {a['median_px']:.2f} | {a['mean_px']:.2f} | {a['within_1px']:.3f} | {a['within_2px']:.3f} | {a['within_4px']:.3f} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def write_docs(rec: dict[str, Any], docs: Path = Path("docs")) -> None:
    from cmpc.utils.io import atomic_write_json, atomic_write_text

    md = docs / "RESULTS.md"
    text = md.read_text(encoding="utf-8") if md.is_file() else "# Results\n"
    sec = section(rec)
    if START in text and END in text:
        text = text[: text.index(START)] + sec + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + sec + "\n"
    atomic_write_text(md, text)
    atomic_write_json(docs / "ablation_refine.json", rec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment", nargs="?", default="experiments/demo.json")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="experiment override (repeatable)")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)
    rec = run(a.experiment, a.set)
    if a.set:
        rec["overrides"] = a.set
    if not a.no_write:
        write_docs(rec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
