"""The commands as a user runs them: `cmpc demo` and the four top-level scripts, as subprocesses.

Everything else in the suite calls functions; this test goes through the console entry
points, argument parsing, exit codes and files on disk, in a fresh folder, the way README
tells a new user to. It takes about 40-60 s on the 2-core reference machine.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CMPC_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_demo_and_scripts_as_subprocesses(smoke_demo):
    # `cmpc demo experiments/smoke.json` ran in a fresh folder (the smoke_demo fixture).
    tmp_path = smoke_demo
    exp = "experiments/smoke.json"
    report = tmp_path / "reports" / "smoke"
    metrics = json.loads((report / "metrics.json").read_text())
    for name in ("README.md", "cmc.png", "error_cdf.png", "retrieval_grid.png", "error_map.png", "predictions.csv"):
        assert (report / name).stat().st_size > 0, name
    ckpt = tmp_path / "runs" / "smoke" / "emb_best.pt"
    refiner = tmp_path / "runs" / "smoke" / "refiner.pt"
    inputs = metrics["meta"]["inputs"]
    assert inputs["embedder"]["sha256"] == _sha256(ckpt)
    assert inputs["refiner"]["sha256"] == _sha256(refiner)
    # Every test query appears once in the predictions, and the metrics count the same queries.
    with open(report / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    n_sets = sum(metrics[s]["n_queries"] for s in ("aligned", "non_aligned"))
    assert len(rows) == n_sets == metrics["meta"]["n_queries"] > 0
    for s in ("aligned", "non_aligned"):
        r = metrics[s]["coarse"]["recall"]
        assert 0.0 <= r["1"] <= r["5"] <= r["10"] <= r["20"] <= 1.0

    # The scripts on a finished run: trained models are reused, not retrained (same bytes).
    before = {p: _sha256(p) for p in (ckpt, refiner)}
    stamps = {p: p.stat().st_mtime_ns for p in (ckpt, refiner)}
    for script in ("train_emb.py", "train_refine.py", "train.py"):
        res = _run([str(REPO / script), exp], tmp_path)
        assert res.returncode == 0, f"{script}: {res.stderr[-2000:]}"
        assert "Traceback" not in res.stderr
    assert {p: _sha256(p) for p in (ckpt, refiner)} == before
    assert {p: p.stat().st_mtime_ns for p in (ckpt, refiner)} == stamps

    # test.py re-evaluates the same models on the same index: the same numbers as the demo.
    res = _run([str(REPO / "test.py"), exp], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    printed = json.loads(res.stdout)
    again = json.loads((report / "metrics.json").read_text())
    for s in ("aligned", "non_aligned"):
        for stage in ("coarse", "refined"):
            assert again[s][stage]["recall"] == metrics[s][stage]["recall"], (s, stage)
            assert printed[s][stage]["recall"] == metrics[s][stage]["recall"], (s, stage)

    # A user error through a script: one line on stderr, exit 2, no traceback.
    bad = _run([str(REPO / "test.py"), exp, "--set", "eval.ks=[0]"], tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: ")
