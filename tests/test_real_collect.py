"""experiments/sentinel/collect.py: docs/real.json rows from the reports present; the runs trained
on registered pairs get their own split labels, so their rows never replace the shipped model's
(a row's identity is (dataset, split, stage, queries, seed) and both fused models are seed 0+1+2)."""

from __future__ import annotations

import json
from pathlib import Path

from experiment_scripts import load_script


def _metrics(path: Path, n_refs: int, sha: str, r1: float, w25: float) -> None:
    """A ``cmpc test`` metrics.json with one aligned block (coarse and refined)."""
    stage = {"recall": {"1": r1, "5": r1, "10": r1, "20": r1}, "mAP": r1, "error_m": {"median": 3.0, "within": {"25": w25, "100": w25, "640": w25}}}
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps({"meta": {"references": n_refs, "checkpoint_hash": sha},
                                                   "aligned": {"n_queries": 10, "coarse": stage, "refined": {**stage, "recall": {"1": r1 + 0.1}}}}))


def test_registered_runs_get_their_own_rows(tmp_path: Path, monkeypatch) -> None:
    collect = load_script("experiments/sentinel/collect.py")
    monkeypatch.chdir(tmp_path)
    rep = tmp_path / "reports"
    _metrics(rep / "sentinel_fused", 1305, "grid", 0.9, 0.9)
    _metrics(rep / "sentinel_reg_fused", 1305, "reg", 0.86, 0.86)
    _metrics(rep / "sentinel_regfused32reg_mi", 5369, "reg", 0.775, 0.803)
    for run, sha, r1 in (("sentinel_fused", "grid", 0.5), ("sentinel_reg_fused", "reg", 0.55)):
        (rep / run / "pairs_bigearthnet_resize_amplitude_vh.json").write_text(json.dumps(
            {"n": 60, "recall": {"1": r1, "5": 0.7, "10": 0.8}, "mAP": 0.6, "settings": {"fit": "resize", "sar_bands": ["VH"], "sar_scale": "amplitude"},
             "meta": {"checkpoint_hash": sha}}))
    rows = collect.collect(rep)
    keys = [collect._key(r) for r in rows]
    assert len(keys) == len(set(keys)) == 2 + 2 + 2 + 2  # two stages per metrics.json, one BigEarthNet row per fused model
    shipped = [r for r in rows if r["run"] == "sentinel_fused" and r["dataset"] == "sentinel-la"]
    assert {r["split"] for r in shipped} == {"test blocks"} and {r["checkpoint_sha256"] for r in shipped} == {"grid"}
    reg = [r for r in rows if r["checkpoint_sha256"] == "reg"]
    assert len(reg) == 5 and all("CFOG-registered pairs" in r["split"] for r in reg)
    mi = next(r for r in rows if r["run"] == "sentinel_regfused32reg_mi" and r["stage"] == "refined")
    assert mi["n_refs"] == 5369 and mi["r1"] == 0.875 and mi["within_25m"] == 0.803 and "MI co-registration" in mi["split"]
    ben = next(r for r in rows if r["dataset"] == "bigearthnet" and r["checkpoint_sha256"] == "reg")
    assert ben["r1"] == 0.55 and ben["split"].startswith("60-way, fit resize") and ben["seed"] == "0+1+2"
