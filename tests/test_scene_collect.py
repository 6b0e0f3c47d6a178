"""experiments/scenes/collect.py --datasets: one dataset's rows of docs/scenes.json rewritten from
the reports present, every other row kept where it stood (a partial re-run of the study)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiment_scripts import load_script


def _collect():  # noqa: ANN202 - the script as a module
    return load_script("experiments/scenes/collect.py")


def _row(ds: str, method: str, s25: float) -> dict:
    return {"dataset": ds, "tiles": 8, "heading_deg": 0, "method": method, "n_scenes": 200, "n_refs": 100, "success_5m": 0.0, "success_25m": s25,
            "not_found": 0.0, "false_claims": 0.0, "median_m": 10.0, "corner_m": 12.0, "heading_err_deg": 0.1, "s_per_scene": 1.0,
            "s_per_scene_study": 1.0, "timing": "t", "dense_search": 3, "embedder_sha256": "e", "decision_rule": None, "experiment": "x", "report": "r"}


def test_collect_rewrites_only_the_named_datasets_rows(tmp_path: Path, monkeypatch) -> None:
    collect = _collect()
    monkeypatch.chdir(tmp_path)
    rep = tmp_path / "reports" / "scenes" / "sentinel_8x8_h0"
    rep.mkdir(parents=True)
    fields = ("n_scenes", "success_5m", "success_25m", "not_found", "false_claims", "median_m", "corner_m", "heading_err_deg", "s_per_scene")
    new = [{"method": m, **{k: v for k, v in _row("sentinel-la", m, s).items() if k in fields}} for m, s in (("verify", 0.955), ("gnn+verify", 0.96))]
    (rep / "rows.json").write_text(json.dumps({"meta": {"n_refs": 1305, "answering": {"dense_search": 3}, "embedder_sha256": "abc", "torch_threads": 2},
                                               "rows": new, "per_scene": []}))
    (tmp_path / "docs").mkdir()
    old = [_row("synthetic", "verify", 1.0), _row("sentinel-la", "independent", 0.01), _row("sentinel-la", "verify", 0.87), _row("uavsar", "verify", 0.93)]
    (tmp_path / "docs" / "scenes.json").write_text(json.dumps(old))
    (tmp_path / "R.md").write_text("before\n<!-- scenes:start -->\nold table\n<!-- scenes:end -->\nafter\n")
    assert collect.main(["--out", "docs/scenes.json", "--datasets", "sentinel-la", "--results", "R.md"]) == 0
    rows = json.loads((tmp_path / "docs" / "scenes.json").read_text())
    assert [(r["dataset"], r["method"], r["success_25m"]) for r in rows] == [
        ("synthetic", "verify", 1.0), ("sentinel-la", "verify", 0.955), ("sentinel-la", "gnn+verify", 0.96), ("uavsar", "verify", 0.93)]
    assert rows[1]["n_refs"] == 1305 and rows[1]["report"] == "reports/scenes/sentinel_8x8_h0"
    md = (tmp_path / "R.md").read_text()
    assert "old table" not in md and "| sentinel-la | 8x8 | 0 | gnn+verify | 200 | 1305 | 0.000 | 0.960 |" in md and "| uavsar |" in md
    assert md.startswith("before\n") and md.endswith("after\n")
    assert not (tmp_path / "docs" / "img").exists()  # the plots need every dataset's reports: left alone
    with pytest.raises(SystemExit, match="uavsar"):  # no report for it: nothing rewritten
        collect.main(["--out", "docs/scenes.json", "--datasets", "uavsar"])
    assert json.loads((tmp_path / "docs" / "scenes.json").read_text()) == rows


def test_registered_truth_reports_are_their_own_datasets(tmp_path: Path, monkeypatch) -> None:
    """The sentinel-la scenes cut from the registered test blocks (reports ..._reg, ..._reg_mi) are
    rows of their own truth, never mixed with the grid truth's; such a suffix on another dataset's
    report is not read."""
    collect = _collect()
    monkeypatch.chdir(tmp_path)
    fields = ("n_scenes", "success_5m", "success_25m", "not_found", "false_claims", "median_m", "corner_m", "heading_err_deg", "s_per_scene")
    for name, s25 in (("sentinel_8x8_h0", 0.785), ("sentinel_8x8_h0_reg", 1.0), ("sentinel_8x8_h0_reg_mi", 0.995), ("uavsar_2x2_h0_reg", 0.5)):
        rep = tmp_path / "reports" / "scenes" / name
        rep.mkdir(parents=True)
        rows = [{"method": "verify", **{k: v for k, v in _row("x", "verify", s25).items() if k in fields}}]
        (rep / "rows.json").write_text(json.dumps({"meta": {"n_refs": 1305}, "rows": rows, "per_scene": []}))
    rows, _ = collect.load(tmp_path / "reports" / "scenes")
    assert [(r["dataset"], r["success_25m"]) for r in rows] == [
        ("sentinel-la", 0.785), ("sentinel-la (CFOG-registered truth)", 1.0), ("sentinel-la (MI-registered truth)", 0.995)]
