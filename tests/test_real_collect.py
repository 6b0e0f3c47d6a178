"""experiments/sentinel/collect.py: docs/real.json rows from the reports present; the runs trained
on registered pairs get their own split labels, so their rows never replace the shipped model's
(a row's identity is (dataset, split, stage, queries, seed) and both fused models are seed 0+1+2);
experiments/sentinel/card_metrics.py: the shipped card's numbers from its own reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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


def test_card_metrics_are_copied_from_the_cards_own_reports(tmp_path: Path, capsys) -> None:
    """experiments/sentinel/card_metrics.py: the card's numbers come from the reports of its own
    embedder (a report measured with another one is refused), a missing report is an error
    unless --partial, and the previous card's record is kept."""
    cm = load_script("experiments/sentinel/card_metrics.py")
    rep = tmp_path / "reports"
    for run, r1 in (("sentinel_reg_fused", 0.86), ("sentinel_reg", 0.8), ("sentinel_reg_s1", 0.74), ("sentinel_reg_s2", 0.78)):
        _metrics(rep / run, 1305, "reg", r1, r1)
        _metrics(rep / f"{run}_cfog", 1305, "reg", r1, r1 - 0.1)  # the card's refinement on the same map
    screen = tmp_path / "screen.json"
    rec = {k: {"aligned": {"1": v, "5": 0.9, "10": 0.95}, "non_aligned": {"1": v / 2}} for k, v in (("0", 0.64), ("1", 0.62), ("2", 0.63), ("3", 0.59), ("1+2+3", 0.68))}
    screen.write_text(json.dumps({"n_refs": 420, "recall": rec}))
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"files": {"embedder": {"sha256": "reg"}}, "metrics": {"previous_card": {"embedder_sha256": "grid"}}}))
    args = ["--card", str(card), "--reports", str(rep), "--screen", str(screen)]
    assert cm.main(args) == 1 and json.loads(card.read_text())["metrics"] == {"previous_card": {"embedder_sha256": "grid"}}  # nothing written
    assert "sentinel_la_test_scenes_8x8" in capsys.readouterr().err
    assert cm.main([*args, "--partial"]) == 0
    m = json.loads(card.read_text())["metrics"]
    assert m["validation_block"]["aligned_r1"] == 0.68 and m["validation_block"]["members_aligned_r1"] == [0.62, 0.63, 0.59]
    assert m["sentinel_la_test"]["aligned"]["coarse"]["r1"] == 0.86 and m["sentinel_la_test"]["aligned"]["refined"]["r1"] == 0.96
    assert m["sentinel_la_test"]["members_aligned_coarse_r1"] == [0.8, 0.74, 0.78] and m["sentinel_la_test"]["members_mean"] == 0.773
    assert m["sentinel_la_test"]["aligned"]["refined"]["within_25m"] == 0.76  # from sentinel_reg_fused_cfog
    assert m["sentinel_la_test"]["members_refined_within_25m"]["aligned_refined_within_25m"] == [0.7, 0.64, 0.68]
    assert m["previous_card"] == {"embedder_sha256": "grid"} and m["embedder_sha256"] == "reg"
    _metrics(rep / "sentinel_regfused32", 5369, "grid", 0.8, 0.7)  # measured with another embedder
    with pytest.raises(SystemExit, match="measured with embedder grid"):
        cm.main([*args, "--partial"])
