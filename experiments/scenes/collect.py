"""Collect the scene-localization study (experiments/scenes/run.sh) into docs/scenes.json,
the curves docs/img/scenes_success.png / scenes_cdf.png, and a markdown table on stdout.

Reads ``reports/scenes/<dataset>_<n>x<n>_h<deg>/rows.json`` (written by ``cmpc eval scenes``);
``--more ROOT`` (repeatable) adds the methods of ``ROOT/<same names>/rows.json`` that the main
reports lack (e.g. gnn+verify answered later for the same scenes with another scene model);
every row keeps the report it came from.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

REPORTS = Path("reports/scenes")
NAMES = {"synthetic": "synthetic", "uavsar": "uavsar", "sentinel": "sentinel-la", "demo": "demo strip (synthetic)"}
#: report-name suffix -> the truth its scenes were cut against (sentinel-la: the test blocks with each
#: SAR file moved by its measured co-registration, experiments/scenes/run.sh)
TRUTHS = {"_reg": " (CFOG-registered truth)", "_reg_mi": " (MI-registered truth)"}
#: every dataset a row can name, in the order of the tables
DATASETS = [NAMES["synthetic"], NAMES["uavsar"], NAMES["sentinel"], *(NAMES["sentinel"] + t for t in TRUTHS.values()), NAMES["demo"]]
COLS = ("dataset", "tiles", "heading_deg", "method", "n_scenes", "n_refs", "success_5m", "success_25m", "not_found", "false_claims",
        "median_m", "corner_m", "heading_err_deg", "s_per_scene")


def _calibrated_with(meta: dict) -> str | None:
    """The embedder a report's decision was calibrated with (reports from before the report
    recorded its embedder: georef uses a decision only with the embedder it records)."""
    src = Path(str((meta.get("decision_rule") or {}).get("source", "")))
    if src.suffix == ".json" and src.is_file():
        return json.loads(src.read_text()).get("embedder_sha256")
    return None


def load(reports: Path = REPORTS, more: tuple[Path, ...] = ()) -> tuple[list[dict], dict[tuple, list[dict]]]:
    rows, per_scene = [], {}
    owner: dict[tuple, Path] = {}  # (dataset, tiles, heading, method) -> the report its row comes from
    for f in [f for root in (reports, *more) for f in sorted(Path(root).glob("*/rows.json"))]:
        m = re.fullmatch(r"(synthetic|uavsar|sentinel|demo)_(\d+)x\d+_h(\d+)(_reg|_reg_mi)?", f.parent.name)
        if not m or (m.group(4) and m.group(1) != "sentinel"):
            continue
        rec = json.loads(f.read_text())
        ds, n, h = NAMES[m.group(1)] + TRUTHS.get(m.group(4) or "", ""), int(m.group(2)), int(m.group(3))
        meta = rec["meta"]
        quiet: dict[str, float] = {}  # quiet 2-thread timings (timing.sh); scenes_timing first, then scenes_timing_* (e.g. _gnn)
        for timing in sorted(reports.parent.glob(f"scenes_timing*/{f.parent.name}/rows.json"), key=lambda p: (p.parent.parent.name != "scenes_timing", str(p))):
            for r in json.loads(timing.read_text())["rows"]:
                quiet.setdefault(r["method"], r["s_per_scene"])
        for r in rec["rows"]:
            if owner.setdefault((ds, n, h, r["method"]), f) != f:  # the main reports (then earlier --more roots) win
                continue
            r = dict(r)
            r["s_per_scene_study"] = r["s_per_scene"]
            r["s_per_scene"] = quiet.get(r["method"], r["s_per_scene"])
            threads = meta.get("torch_threads")  # recorded since 2026-11-30; earlier reports ran at 1 thread
            r["timing"] = "2 threads, quiet machine, median of 20 scenes (experiments/scenes/timing.sh)" if r["method"] in quiet else \
                f"median over the study's scenes at {threads} thread(s), possibly beside another job: an upper bound" if threads else \
                "1 thread beside another job: an upper bound"
            row = {"dataset": ds, "tiles": n, "heading_deg": h, **{k: r[k] for k in r if k != "method"}, "method": r["method"],
                   "n_refs": meta["n_refs"], "decision_rule": meta.get("decision_rule"), "experiment": meta.get("experiment"),
                   "report": str(f.parent), "dense_search": int((meta.get("answering") or {}).get("dense_search", 0)),
                   "embedder_sha256": meta.get("embedder_sha256") or _calibrated_with(meta)}
            rows.append({k: row[k] for k in COLS} | {k: row[k] for k in ("s_per_scene_study", "timing", "dense_search", "embedder_sha256",
                                                                        "decision_rule", "experiment", "report")})
        for p in rec["per_scene"]:
            if owner.get((ds, n, h, p["method"])) == f:
                per_scene.setdefault((ds, n, h, p["method"]), []).append(p)
    order = {d: i for i, d in enumerate(DATASETS)}
    rows.sort(key=lambda r: (order[r["dataset"]], r["heading_deg"], r["tiles"], ("independent", "verify", "gnn+verify").index(r["method"])))
    return rows, per_scene


def markdown(rows: list[dict]) -> str:
    head = "| dataset | tiles | heading | method | scenes | refs | within 5 m | within 25 m | not found | false claims | median m | corner m | heading err | s/scene |"
    out = [head, "|" + "---|" * 14]
    for r in rows:
        h = "0" if r["heading_deg"] == 0 else f"+-{r['heading_deg']}"
        out.append(f"| {r['dataset']} | {r['tiles']}x{r['tiles']} | {h} | {r['method']} | {r['n_scenes']} | {r['n_refs']} | {r['success_5m']:.3f} | "
                   f"{r['success_25m']:.3f} | {r['not_found']:.3f} | {r['false_claims']:.3f} | {r['median_m']} | {r['corner_m']} | "
                   f"{r['heading_err_deg']} | {r['s_per_scene']} |")
    return "\n".join(out)


def plots(rows: list[dict], per_scene: dict[tuple, list[dict]], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    methods = ("independent", "verify", "gnn+verify")
    colours = {"independent": "tab:grey", "verify": "tab:blue", "gnn+verify": "tab:red"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, h in zip(axes, (0, 15)):
        for m in methods:
            pts = sorted((r["tiles"], r["success_5m"], r["success_25m"]) for r in rows if r["dataset"] == "synthetic" and r["heading_deg"] == h and r["method"] == m)
            if pts:
                t = [p[0] for p in pts]
                ax.plot(t, [p[2] for p in pts], "o-", color=colours[m], label=f"{m} (25 m)")
                ax.plot(t, [p[1] for p in pts], "s--", color=colours[m], alpha=0.6, label=f"{m} (5 m)")
        for ds, mk in (("uavsar", "^"), ("sentinel-la", "D")):
            for r in rows:
                if r["dataset"] == ds and r["heading_deg"] == h and r["method"] == "verify":
                    ax.plot([r["tiles"]], [r["success_25m"]], mk, color="k", ms=7, label=f"{ds} verify (25 m)" if r["tiles"] == max(
                        x["tiles"] for x in rows if x["dataset"] == ds) else None)
        ax.set_xlabel("tiles per scene side")
        ax.set_title(f"heading {'0 (north-up)' if h == 0 else '+-15 deg'}")
        ax.set_xticks([2, 3, 4, 8])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of scenes found within 25 m (5 m dashed)")
    axes[0].set_ylim(0, 1.02)
    axes[1].legend(fontsize=7, loc="lower right")
    axes[0].legend(fontsize=7, loc="lower right", handles=[h for h in axes[0].get_legend_handles_labels()[0] if h.get_label().startswith(("uavsar", "sentinel"))])
    fig.suptitle("Scene localization success vs scene size (synthetic: 8 km unseen map, 16,129 references)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "scenes_success.png", dpi=110)
    plt.close(fig)

    # the error CDF of the default method (verify), one colour per (dataset, size) in both panels
    keys = sorted({(ds, n) for (ds, n, _, m) in per_scene if m == "verify"})
    cmap = plt.get_cmap("tab10")
    colour_of = {k: cmap(i % 10) for i, k in enumerate(keys)}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, h in zip(axes, (0, 15)):
        for (ds, n, hh, m), ps in sorted(per_scene.items()):
            if hh != h or m != "verify":
                continue
            err = np.sort(np.array([p["centre_m"] if np.isfinite(p["centre_m"]) else 1e9 for p in ps]))
            ax.step(err, np.arange(1, len(err) + 1) / len(err), where="post", color=colour_of[(ds, n)], label=f"{ds} {n}x{n}")
        ax.set_xscale("log")
        ax.set_xlim(0.1, 1e4)
        ax.set_xlabel("centre error, m (best guess, all scenes)")
        ax.set_title(f"verify (the default), heading {'0' if h == 0 else '+-15 deg'}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("fraction of scenes")
    fig.tight_layout()
    fig.savefig(out_dir / "scenes_cdf.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/scenes.json")
    ap.add_argument("--img", default="docs/img")
    ap.add_argument("--more", action="append", default=[], metavar="ROOT",
                    help="another reports root whose methods join rows the main reports lack (repeatable)")
    ap.add_argument("--results", default=None, metavar="MD",
                    help="also rewrite the table between <!-- scenes:start --> and <!-- scenes:end --> in this markdown file")
    ap.add_argument("--datasets", nargs="+", default=None, choices=sorted(DATASETS), metavar="DATASET",
                    help="rewrite only these datasets' rows of --out from the reports present (the rest of the file is kept, "
                         "in its order; the plots, which need every dataset's reports, are left as they are)")
    a = ap.parse_args(argv)
    rows, per_scene = load(more=tuple(Path(m) for m in a.more))
    if a.datasets:
        rows = [r for r in rows if r["dataset"] in a.datasets]
        if {r["dataset"] for r in rows} != set(a.datasets):
            raise SystemExit(f"--datasets {' '.join(a.datasets)}: no reports/scenes/*/rows.json for {sorted(set(a.datasets) - {r['dataset'] for r in rows})}")
    if not rows:
        raise SystemExit("no reports/scenes/*/rows.json: run experiments/scenes/run.sh first")
    # docs/scenes.json: one row per (dataset, tiles, heading_deg, method) of the study's three
    # datasets; the demo strip's rows (a 217-reference map) are in the markdown table only
    study = [r for r in rows if r["dataset"] != NAMES["demo"]]
    if a.datasets:
        kept = json.loads(Path(a.out).read_text())
        new = {ds: [r for r in study if r["dataset"] == ds] for ds in a.datasets}
        study, done = [], set()
        for r in kept:  # each replaced dataset's new rows where its old rows stood
            if r["dataset"] not in new:
                study.append(r)
            elif r["dataset"] not in done:
                study.extend(new[r["dataset"]])
                done.add(r["dataset"])
        study.extend(x for ds in a.datasets if ds not in done for x in new[ds])
    tmp = Path(a.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(study, indent=1) + "\n")
    tmp.replace(a.out)
    if not a.datasets:
        plots(rows, per_scene, Path(a.img))
    print(markdown(rows))
    if a.results:
        write_results_block(Path(a.results), study)
    return 0


def write_results_block(md: Path, study: list[dict]) -> None:
    """The study's rows as a table between the scenes markers of ``md`` (atomic rewrite)."""
    start, end = "<!-- scenes:start -->", "<!-- scenes:end -->"
    text = md.read_text(encoding="utf-8")
    if text.count(start) != 1 or text.count(end) != 1:
        raise SystemExit(f"{md} must hold exactly one {start} ... {end} block")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    timings: dict[str, list[str]] = {}  # timing label -> datasets it applies to (in row order)
    for r in study:
        ds = timings.setdefault(r["timing"], [])
        if r["dataset"] not in ds:
            ds.append(r["dataset"])
    how = "; ".join(f"{', '.join(ds)}: {label}" for label, ds in timings.items())
    block = f"{start}\n{markdown(study)}\n\n(docs/scenes.json, written by experiments/scenes/collect.py. Seconds per scene: {how}.)\n{end}"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(head + block + tail, encoding="utf-8")
    tmp.replace(md)


if __name__ == "__main__":
    raise SystemExit(main())
