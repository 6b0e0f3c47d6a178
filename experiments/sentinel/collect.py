"""Collect the real-data rows of docs/real.json from the reports of real runs.

    .venv/bin/python experiments/sentinel/collect.py [--out docs/real.json]

Reads (every file that exists; nothing is invented for one that does not):

- ``reports/<run>/metrics.json`` of the sentinel-la test blocks (``cmpc test
  experiments/sentinel.json --set name=<run>``): one row per (stage, queries);
- ``reports/<run>/pairs_bigearthnet_*.json`` (``cmpc eval pairs``): BigEarthNet 60-way;
- ``reports/sentinel-s1s2/metrics.json`` and ``reports/sentinel-uavsar/metrics.json``: the shipped
  model on co-registered rasters (experiments/sentinel/cross.sh) (``cmpc localize --model sentinel ... --set
  localize.raster_truth=true``), if run.

Row fields (docs/real.json): dataset, split, stage, queries, seed, n_refs, n_queries, r1,
r5, r10, r20, map, chance_r1, median_m, within_25m, within_100m, within_640m (null where
positions do not apply), checkpoint_sha256, plus ``run`` and ``source`` (the report file).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cmpc.utils.io import atomic_write_text

#: the label of the rows of the card shipped until 2026-12-01 (the recipe trained on the pairs as published)
GRID_CARD = "grid-trained card, shipped until 2026-12-01"
#: run -> seed; the fused model (three seeds fused by score, `cmpc model fuse`) has seed "0+1+2"
RUNS: dict[str, int | str] = {"sentinel": 0, "sentinel_s1": 1, "sentinel_s2": 2, "sentinel_fused": "0+1+2"}
#: reports that add a refined stage to a run above (same checkpoint, same coarse answers):
#: report folder -> (seed, split label); only their refined rows are collected
REFINED: dict[str, tuple[int | str, str]] = {
    "sentinel_fused_cfog": ("0+1+2", "test blocks, CFOG fine alignment (no GNN)"),  # plain correlation scores, shipped until 2026-12-01
    "sentinel_fused_zncc": ("0+1+2", f"test blocks, CFOG fine alignment, ZNCC scores ({GRID_CARD})"),
}

#: reports of the grid-trained card (make sentinel; shipped until 2026-12-01) on the test blocks tiled
#: at the card's reference grid (every 32 px, ``inputs.ref_stride_m``; run.sh): report folder -> (seed,
#: split label); every stage
CARD_GRID: dict[str, tuple[int | str, str]] = {
    "sentinel_card32": ("0+1+2", f"test blocks tiled every 32 px (the card's grid), CFOG ZNCC ({GRID_CARD})"),
    "sentinel_card32reg": ("0+1+2", f"test blocks tiled every 32 px, each SAR file moved by its CFOG co-registration (tile.register), CFOG ZNCC ({GRID_CARD})"),
    "sentinel_card32reg_mi": ("0+1+2", f"test blocks tiled every 32 px, each SAR file moved by its MI co-registration (tile.register), CFOG ZNCC ({GRID_CARD})"),
}

#: the same recipe trained on CFOG-registered pairs (experiments/sentinel/run_registered.sh; its fused
#: model is the shipped card since 2026-12-01): run -> seed; coarse rows on the registered test blocks'
#: 64 px map, BigEarthNet rows
REG_TRAINED: dict[str, int | str] = {"sentinel_reg": 0, "sentinel_reg_s1": 1, "sentinel_reg_s2": 2, "sentinel_reg_fused": "0+1+2"}
REG_SPLIT = "trained on CFOG-registered pairs"
#: its fused model on the 32 px test tilings (registered, and the published grid) with the card's refine
#: settings and its own gate
REG_GRID: dict[str, tuple[int | str, str]] = {
    "sentinel_regfused32": ("0+1+2", f"test blocks tiled every 32 px (the card's grid), CFOG ZNCC ({REG_SPLIT})"),
    "sentinel_regfused32reg": ("0+1+2", f"test blocks tiled every 32 px, each SAR file moved by its CFOG co-registration, CFOG ZNCC ({REG_SPLIT})"),
    "sentinel_regfused32reg_mi": ("0+1+2", f"test blocks tiled every 32 px, each SAR file moved by its MI co-registration, CFOG ZNCC ({REG_SPLIT})"),
}
#: its seeds alone and fused with the card's CFOG refinement and the fused model's gate on the registered
#: 64 px test map (run_registered.sh): report folder -> (seed, split label); their refined rows only (the
#: coarse ones are REG_TRAINED's, the same checkpoints on the same map)
REG_REFINED: dict[str, tuple[int | str, str]] = {
    f"{run}_cfog": (seed, f"test blocks, each SAR file moved by its CFOG co-registration, CFOG ZNCC, the card's gate ({REG_SPLIT})")
    for run, seed in REG_TRAINED.items()
}


def _within(err: dict[str, Any], t: float) -> float | None:
    w = err.get("within") or {}
    for k, v in w.items():
        if abs(float(k) - t) < 1e-9:
            return float(v)
    return None


def metric_rows(path: Path, dataset: str, split: str, seed: int | str, run: str) -> list[dict[str, Any]]:
    """Rows of one ``metrics.json`` (cmpc test / cmpc localize with ground truth)."""
    m = json.loads(path.read_text())
    meta = m.get("meta") or {}
    n_refs = int(meta.get("references") or 0)
    out = []
    for queries in ("aligned", "non_aligned", "all"):
        block = m.get(queries)
        if not isinstance(block, dict) or not block.get("n_queries"):
            continue
        for stage in ("coarse", "refined"):
            s = block.get(stage)
            if not isinstance(s, dict):
                continue
            rec, err = s.get("recall") or {}, s.get("error_m") or {}
            out.append({
                "dataset": dataset, "split": split, "stage": stage, "queries": queries, "seed": seed,
                "n_refs": n_refs, "n_queries": int(block.get("n_queries") or 0),
                "r1": rec.get("1"), "r5": rec.get("5"), "r10": rec.get("10"), "r20": rec.get("20"),
                "map": s.get("mAP"), "chance_r1": 1.0 / n_refs if n_refs else None,
                "median_m": err.get("median"), "within_25m": _within(err, 25), "within_100m": _within(err, 100), "within_640m": _within(err, 640),
                "checkpoint_sha256": meta.get("checkpoint_hash"), "run": run, "source": str(path),
            })
    return out


def pair_rows(path: Path, seed: int | str, run: str) -> list[dict[str, Any]]:
    """The row of one ``cmpc eval pairs`` report (BigEarthNet: no positions)."""
    r = json.loads(path.read_text())
    rec, st = r.get("recall") or {}, r.get("settings") or {}
    n = int(r.get("n") or 0)
    return [{
        "dataset": "bigearthnet", "split": f"{n}-way, fit {st.get('fit')}, SAR {'+'.join(st.get('sar_bands') or [])} as {st.get('sar_scale')}",
        "stage": "coarse", "queries": "pairs", "seed": seed, "n_refs": n, "n_queries": n,
        "r1": rec.get("1"), "r5": rec.get("5"), "r10": rec.get("10"), "r20": rec.get("20"), "map": r.get("mAP"),
        "chance_r1": 1.0 / n if n else None, "median_m": None, "within_25m": None, "within_100m": None, "within_640m": None,
        "checkpoint_sha256": (r.get("meta") or {}).get("checkpoint_hash"), "run": run, "source": str(path),
    }]


def collect(reports: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    # each seed's (and fused model's) test-block and BigEarthNet rows; the registered recipe's
    # splits say so, so its rows never take the grid recipe's keys
    reg = f" ({REG_SPLIT})"
    for runs, split, tag in ((RUNS, "test blocks", ""), (REG_TRAINED, f"test blocks, each SAR file moved by its CFOG co-registration{reg}", reg)):
        for run, seed in runs.items():
            m = reports / run / "metrics.json"
            if m.is_file():
                rows += metric_rows(m, "sentinel-la", split, seed, run)
            for p in sorted((reports / run).glob("pairs_bigearthnet_*.json")):
                rows += [{**r, "split": r["split"] + tag} for r in pair_rows(p, seed, run)]
    for run, (seed, split) in (REFINED | REG_REFINED).items():
        m = reports / run / "metrics.json"
        if m.is_file():
            rows += [r for r in metric_rows(m, "sentinel-la", split, seed, run) if r["stage"] == "refined"]
    for run, (seed, split) in (CARD_GRID | REG_GRID).items():
        m = reports / run / "metrics.json"
        if m.is_file():
            rows += metric_rows(m, "sentinel-la", split, seed, run)
    # a shipped model (weights/sentinel when the report was made) on the cross-sensor pairs: each
    # report's own checkpoint names its seed, and a model trained on registered pairs gets its tag
    def tested_with(run: str) -> str | None:
        m = reports / run / "metrics.json"
        return (json.loads(m.read_text()).get("meta") or {}).get("checkpoint_hash") if m.is_file() else None

    seeds = {**RUNS, **REG_TRAINED, **{run: seed for run, (seed, _) in (REFINED | CARD_GRID | REG_GRID).items()}}
    for dataset, split in (("s1s2", "whole scene, aligned tiles (never trained on)"), ("uavsar", "whole pair, aligned tiles (L-band HV, warped to 8.3 m)")):
        for tag in ("", "_half"):  # the card's reference grid; the half-patch grid (cross.sh HALF_PATCH=1 TAG=_half)
            m = reports / f"sentinel-{dataset}{tag}" / "metrics.json"
            if not m.is_file():
                continue
            sha = tested_with(f"sentinel-{dataset}{tag}")
            run = next((r for r in seeds if sha and tested_with(r) == sha), None)  # a run with the same checkpoint
            seed = seeds.get(run) if run else _recorded_seed(sha)
            registered = run in (REG_TRAINED | REG_GRID) or (run is None and _recorded_registered(sha))
            label = _cross_split(m, split) + (reg if registered else "")
            got = metric_rows(m, dataset, label, -1 if seed is None else seed, "weights/sentinel")
            if "off this grid" in label:  # the tiles fall between references: not aligned in the sense
                got = [{**r, "queries": "non_aligned"} for r in got]
            rows += got
    return rows


def _recorded_seed(sha: str | None) -> int | str | None:
    """The seed docs/real.json records for the checkpoint ``sha`` (a checkout without the runs)."""
    p = Path("docs/real.json")
    if not sha or not p.is_file():
        return None
    return next((r["seed"] for r in json.loads(p.read_text()) if r.get("checkpoint_sha256") == sha), None)


def _recorded_registered(sha: str | None) -> bool:
    """Whether docs/real.json records ``sha`` as a model trained on registered pairs."""
    p = Path("docs/real.json")
    return bool(sha) and p.is_file() and any(r.get("checkpoint_sha256") == sha and REG_SPLIT in r["split"] for r in json.loads(p.read_text()))


def _cross_split(m: Path, split: str) -> str:
    """``split`` as labelled before ZNCC scores (plain-correlation CFOG, half-patch grid), else
    with the CFOG score and the reference grid the report was run with."""
    meta = json.loads(m.read_text()).get("meta") or {}
    cfg = meta.get("config") or {}
    score = (cfg.get("refine") or {}).get("align_score", "corr")
    if score == "corr":
        return split
    manifest = Path(str((meta.get("inputs") or {}).get("index", {}).get("path", "")))
    src = (json.loads(manifest.read_text()).get("sources") or [{}])[0] if manifest.is_file() else {}
    stride, patch = src.get("stride_px"), src.get("patch_px")
    grid = f"references every {stride} px of {patch}" if stride and patch else "references as indexed"
    if stride and patch and (patch // 2) % stride:  # the queries (every half patch) fall between references
        split = split.replace("aligned tiles", f"tiles every {patch // 2} px, off this grid")
    return f"{split}; CFOG {score}, {grid}"


def _key(r: dict[str, Any]) -> tuple:
    """A row's identity in docs/real.json: (dataset, split, stage, queries, seed)."""
    return (r["dataset"], r["split"], r["stage"], r["queries"], str(r["seed"]))


def _f(v: Any, nd: int = 3) -> str:
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def markdown(rows: list[dict[str, Any]]) -> str:
    """The docs/RESULTS.md tables of ``rows``: one line per row, then per (dataset, split,
    stage, queries) the mean over seeds."""
    cols = ("dataset", "queries", "stage", "seed", "n_refs", "n_queries", "r1", "r5", "r10", "r20", "map", "chance_r1", "median_m", "within_25m", "within_100m", "within_640m")
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_f(r.get(c), 1 if c == "median_m" else 4 if c == "chance_r1" else 3) for c in cols) + " |")
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        model = "fused" if isinstance(r["seed"], str) else "single"
        groups.setdefault((r["dataset"], r["split"], r["queries"], r["stage"], model), []).append(r)
    out += ["", "| dataset | split | queries | stage | model | runs | R@1 mean (min-max) | R@10 mean | median m mean | within 25 m mean | within 640 m mean |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (d, sp, q, st, model), g in groups.items():
        def mean(k: str) -> str:
            v = [x[k] for x in g if x.get(k) is not None]
            return _f(sum(v) / len(v), 1 if k == "median_m" else 3) if v else "-"
        r1 = [x["r1"] for x in g if x.get("r1") is not None]
        out.append(f"| {d} | {sp} | {q} | {st} | {model} | {len(g)} | {mean('r1')} ({_f(min(r1))}-{_f(max(r1))}) | {mean('r10')} | {mean('median_m')} | {mean('within_25m')} | {mean('within_640m')} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reports", default="reports")
    ap.add_argument("--out", default="docs/real.json")
    ap.add_argument("--markdown", action="store_true", help="also print the RESULTS.md tables")
    ap.add_argument("--merge", action="store_true", help="update --out in place: its rows whose reports are not under --reports stay")
    a = ap.parse_args()
    rows = collect(Path(a.reports))
    if not rows:
        raise SystemExit(f"no reports found under {a.reports}/ (run experiments/sentinel/run.sh first)")
    if a.merge and Path(a.out).is_file():  # rows of reports not here are kept; those collected replace theirs in place
        new = {_key(r): r for r in rows}
        old = json.loads(Path(a.out).read_text())
        kept = [new.pop(_key(r), r) for r in old]
        rows = kept + list(new.values())
    atomic_write_text(Path(a.out), json.dumps(rows, indent=1) + "\n")
    print(f"{len(rows)} rows -> {a.out}")
    if a.markdown:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
