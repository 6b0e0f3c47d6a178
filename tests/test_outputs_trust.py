"""Trust at the seams: output folders, half-written outputs, NaN and odd config values.

Each test reproduces one way a run could mix, lose or half-write outputs, or end in a
traceback instead of one line (issue "Trust at the seams", items 6-9, 11, 12).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cmpc.cli import main
from cmpc.config import load_experiment
from cmpc.errors import CmpcError, ConfigError
from index_fixtures import evaluate_command, experiment, localize_command, write_checkpoint, write_dataset, write_experiment_json

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "experiments").glob("*.json")) + sorted((REPO / "experiments" / "translate").glob("*.json"))


def _partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial") or ".old-" in p.name)


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# --------------------------------------------------------------------------- item 6: folders follow the name


@pytest.mark.parametrize("exp_file", SHIPPED, ids=lambda p: p.relative_to(REPO / "experiments").as_posix())
def test_shipped_experiments_derive_output_folders_from_name(exp_file):
    """`--set name=X` on any shipped experiment writes reports/X, never the experiment's own folder."""
    exp = load_experiment(exp_file, ["name=someone_else"])
    assert exp.eval.out is None
    assert exp.report_dir == Path("reports/someone_else")
    assert exp.run_dir == Path("runs/someone_else")
    assert exp.index_dir == Path("index/someone_else")
    # an explicit output folder still wins
    assert load_experiment(exp_file, ["name=someone_else", "eval.out=elsewhere"]).report_dir == Path("elsewhere")


def test_readme_recipe_for_own_rasters_reports_under_its_name():
    exp = load_experiment(REPO / "experiments" / "demo.json", ["name=mine", "data.root=data/mine"])
    assert exp.report_dir == Path("reports/mine")
    assert load_experiment(REPO / "experiments" / "demo.json").report_dir == Path("reports/demo")


# --------------------------------------------------------------------------- item 7: written aside, renamed at the end


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny dataset, an untrained embedder and its index 'tr' (16 references, 4 non-aligned queries)."""
    from cmpc.index.build import build_index

    root = tmp_path_factory.mktemp("trust_world")
    write_dataset(root / "ds", grid=4, non_aligned=4)
    write_checkpoint(root / "runs" / "tr" / "emb_best.pt")
    cwd = Path.cwd()
    os.chdir(root)
    try:
        build_index(experiment("tr", "ds"))
    finally:
        os.chdir(cwd)
    return root


def test_failed_test_keeps_the_previous_report_and_other_outputs(world, monkeypatch):
    import cmpc.evaluate.ranks as ranks

    root = world
    monkeypatch.chdir(root)
    evaluate_command(experiment("tr", "ds", "eval.plots=false"))
    rep = root / "reports" / "tr"
    before = {f: (rep / f).read_bytes() for f in ("metrics.json", "predictions.csv", "predictions.geojson")}
    # outputs of other commands in the same folder: an earlier localize run, a pairs check
    (rep / "localize").mkdir()
    (rep / "localize" / "predictions.csv").write_text("earlier localize run\n")
    (rep / "pairs_bigearthnet.json").write_text("{}\n")

    def boom(*args, **kwargs):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(ranks, "write_report", boom)
    with pytest.raises(RuntimeError, match="plotting failed"):
        evaluate_command(experiment("tr", "ds", "eval.plots=false", "localize.top_k=3"))  # other predictions
    assert {f: (rep / f).read_bytes() for f in before} == before
    assert _partials(root / "reports") == []
    monkeypatch.undo()
    monkeypatch.chdir(root)

    # a later successful run replaces the report whole and keeps the other commands' outputs
    (rep / "cmc.png").write_bytes(b"a plot of the earlier run")  # the new run draws no plots
    evaluate_command(experiment("tr", "ds", "eval.plots=false", "localize.top_k=3"))
    assert (rep / "predictions.csv").read_bytes() != before["predictions.csv"]
    assert (rep / "localize" / "predictions.csv").read_text() == "earlier localize run\n"
    assert (rep / "pairs_bigearthnet.json").is_file()
    assert not (rep / "cmc.png").exists()  # no plot of another run beside the new metrics
    assert _partials(root / "reports") == []


def test_truncated_footprints_fail_in_one_line_before_anything_is_replaced(world, monkeypatch):
    from cmpc.evaluate.run import evaluate
    from cmpc.index.build import build_index

    root = world
    monkeypatch.chdir(root)
    (root / "runs" / "trfp").mkdir(parents=True, exist_ok=True)
    (root / "runs" / "trfp" / "emb_best.pt").write_bytes((root / "runs" / "tr" / "emb_best.pt").read_bytes())
    build_index(experiment("trfp", "ds"))
    evaluate(experiment("trfp", "ds", "eval.plots=false"), "index/trfp")
    rep = root / "reports" / "trfp"
    before = {p.name: p.read_bytes() for p in rep.iterdir()}
    fp = root / "index" / "trfp" / "footprints.gpkg"
    fp.write_bytes(fp.read_bytes()[:100])
    with pytest.raises(CmpcError):
        evaluate(experiment("trfp", "ds", "localize.top_k=3"), "index/trfp")  # plots on: the error map reads the footprints
    assert {p.name: p.read_bytes() for p in rep.iterdir()} == before
    assert _partials(root / "reports") == []


def test_failed_localize_leaves_no_output_folder(world, monkeypatch):
    import cmpc.localize.run as run

    root = world
    monkeypatch.chdir(root)

    def fails(self, x):
        raise RuntimeError("search failed")

    monkeypatch.setattr(run.Localizer, "localize_batch", fails)
    with pytest.raises(RuntimeError, match="search failed"):
        localize_command(experiment("tr", "ds", "eval.plots=false"), "ds", out="never")
    assert not (root / "never").exists()
    assert _partials(root) == []


def test_localize_keeps_other_files_in_its_out_folder(world, monkeypatch):
    root = world
    monkeypatch.chdir(root)
    (root / "mine").mkdir(exist_ok=True)
    (root / "mine" / "notes.txt").write_text("mine\n")
    (root / "mine" / "metrics.json").write_text("{}\n")  # an earlier run with ground truth
    s = localize_command(experiment("tr", "ds"), "ds/test/imgs/sar", out="mine")  # no ground truth: no metrics
    assert s["out"] == "mine" and "metrics" not in s
    assert sorted(p.name for p in (root / "mine").iterdir()) == ["notes.txt", "predictions.csv", "predictions.geojson"]
    assert _partials(root) == []


def test_localize_out_pointing_at_a_file_is_one_line(world, monkeypatch, capsys):
    root = world
    monkeypatch.chdir(root)
    exp = write_experiment_json(root / "tr.json", "tr", "ds")
    (root / "afile").write_text("not a folder\n")
    for out in ("afile", "afile/sub"):
        e = _one_line_error(capsys, ["localize", str(exp), "--queries", "ds", "--out", out])
        assert "afile" in e and "not a folder" in e
    assert (root / "afile").read_text() == "not a folder\n"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_atomic_dir_names_its_temp_folder_with_its_pid_and_removes_dead_runs_partials(tmp_path):
    from cmpc.utils.io import atomic_dir

    dead = _dead_pid()
    stale_new = tmp_path / f".x.{dead}.abcd1234.partial"
    stale_old = tmp_path / ".x.abcd1234.partial"  # older naming, without a pid
    live = tmp_path / f".x.{os.getpid()}.abcd1234.partial"  # a run in progress
    other = tmp_path / f".xy.{dead}.abcd1234.partial"  # another folder's
    building = tmp_path / ".x.building"  # a resumable raster build
    for d in (stale_new, stale_old, live, other, building):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "big.bin").write_bytes(b"0" * 1000)
    with atomic_dir(tmp_path / "x") as tmp:
        assert tmp.name.startswith(f".x.{os.getpid()}.") and tmp.name.endswith(".partial")
        (tmp / "a.txt").write_text("new\n")
    assert (tmp_path / "x" / "a.txt").read_text() == "new\n"
    assert not stale_new.exists() and not stale_old.exists()
    assert live.exists() and other.exists() and building.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["x", live.name, other.name, building.name])


def test_atomic_dir_puts_back_a_folder_a_killed_swap_left_aside(tmp_path):
    """Killed between 'move the old folder aside' and 'move the new one in': the old one returns."""
    from cmpc.utils.io import atomic_dir

    aside = tmp_path / f".x.old-{_dead_pid()}"
    aside.mkdir()
    (aside / "a.txt").write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "x"):
            raise RuntimeError("this run fails too")
    assert (tmp_path / "x" / "a.txt").read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_killed_tile_partials_are_removed_by_the_next_tile(tmp_path):
    """What a killed `cmpc data tile` left beside its dataset goes when the next tile of it starts."""
    from tiny_rasters import make_pair

    from cmpc.config import TileConfig
    from cmpc.data.tiler import tile

    sar, opt = make_pair(tmp_path)
    killed = tmp_path / f".ds.{_dead_pid()}.k1ll3d00.partial"
    (killed / "train" / "imgs").mkdir(parents=True)
    (killed / "train" / "imgs" / "x.tif").write_bytes(b"0" * 4096)
    tile(sar, opt, tmp_path / "ds", TileConfig(patch_px=16), progress=False)
    assert (tmp_path / "ds" / "dataset.json").is_file()
    assert _partials(tmp_path) == []


# --------------------------------------------------------------------------- item 8: NaN and inf


@pytest.mark.parametrize(
    "override",
    ["tile.test_fraction=NaN", "tile.test_fraction=-Infinity", "train.lr=Infinity", "loss.triplet=Infinity",
     "synth.origin_x=NaN", "localize.prior_center=[NaN, 0]", "eval.thresholds_m=[1, Infinity]",
     "refine.align_min_peak=NaN", "localize.prior_radius_m=Infinity"],
)
def test_nan_and_inf_are_refused(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}.*not a finite number"):
        load_experiment(None, [override])


def test_nan_in_a_json_file_is_refused(tmp_path):
    p = tmp_path / "nan.json"
    p.write_text(json.dumps({"tile": {"test_fraction": float("nan")}}))  # json writes NaN
    assert "NaN" in p.read_text()
    with pytest.raises(ConfigError, match="tile.test_fraction"):
        load_experiment(p)


def test_nan_through_the_cli_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    e = _one_line_error(capsys, ["data", "tile", "--set", "tile.test_fraction=NaN"])
    assert "tile.test_fraction" in e and "finite" in e
    e = _one_line_error(capsys, ["data", "tile", "--test-fraction", "nan"])
    assert "tile.test_fraction" in e
    exp = write_experiment_json(tmp_path / "e.json", "e", "ds")
    e = _one_line_error(capsys, ["localize", str(exp), "--queries", "ds", "--center", "nan", "0"])
    assert "localize.prior_center" in e
    assert list(tmp_path.iterdir()) == [exp]  # nothing started


# --------------------------------------------------------------------------- item 9: tracebacks -> one line


@pytest.mark.parametrize("key", ["train.device", "translate.device"])
def test_device_strings_are_checked(key):
    for bad in ("tpu", "cuda:", "cuda:x", "gpu", "CUDA", "cpu:0"):
        with pytest.raises(ConfigError, match=rf"{key}.*auto \| cpu \| cuda \| cuda:N"):
            load_experiment(None, [f"{key}={bad}"])
    for good in ("auto", "cpu", "cuda", "cuda:1"):
        assert load_experiment(None, [f"{key}={good}"])


def test_device_tpu_through_the_cli_is_one_line(tmp_path, capsys):
    exp = write_experiment_json(tmp_path / "e.json", "e", "ds")
    assert "train.device" in _one_line_error(capsys, ["train", "emb", str(exp), "--set", "train.device=tpu"])


def test_cuda_without_cuda_is_one_line(monkeypatch):
    import torch

    from cmpc.utils.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device(name)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="auto \\| cpu"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="1 CUDA device"):
        resolve_device("cuda:3")
    assert resolve_device("cuda:0") == torch.device("cuda:0")


@pytest.mark.parametrize("argv", [["config", "keys"], ["config", "show", "experiments/demo.json"], ["data", "info", "{ds}"]])
def test_closed_pipe_ends_quietly(argv, world):
    """`cmpc config keys | head`: the reader is gone before the output is written; no traceback."""
    argv = [a.replace("{ds}", str(world / "ds")) for a in argv]
    r, w = os.pipe()
    os.close(r)  # the reader has already stopped
    try:
        p = subprocess.run([sys.executable, "-m", "cmpc", *argv], stdout=w, stderr=subprocess.PIPE, cwd=REPO, timeout=120,
                           env={**os.environ, "CMPC_THREADS": "1"})
    finally:
        os.close(w)
    assert p.stderr.decode() == ""
    assert p.returncode in (0, 141)


# --------------------------------------------------------------------------- item 11: list fields


@pytest.mark.parametrize(
    "override, match",
    [
        ("eval.ks=[]", "at least 1"),
        ("eval.ks=[0]", "below the minimum 1"),
        ("eval.ks=[1, -5]", "below the minimum 1"),
        ("eval.thresholds_m=[-1]", "must be above 0"),
        ("eval.thresholds_m=[0]", "must be above 0"),
        ("eval.thresholds_m=[]", "at least 1"),
        ("eval.query_sets=[]", "at least 1"),
        ("eval.query_sets=[\"aligned\", \"bogus\"]", "not one of"),
        ("localize.prior_center=[1]", "exactly 2"),
        ("localize.prior_center=[1, 2, 3]", "exactly 2"),
        ("localize.raster_bands=[0]", "below the minimum 1"),
        ("localize.raster_bands=[]", "at least 1"),
        ("tile.sar_bands=[]", "at least 1"),
        ("tile.optical_bands=[0]", "below the minimum 1"),
        ("index.bands=[]", "at least 1"),
    ],
)
def test_list_fields_are_checked(override, match):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}.*{match}"):
        load_experiment(None, [override])


def test_valid_list_fields_still_load():
    exp = load_experiment(None, ["eval.ks=[1, 3]", "eval.thresholds_m=[0.5, 2]", "eval.query_sets=[\"all\"]",
                                 "localize.prior_center=[500000, 5000000]", "localize.raster_bands=[2]", "tile.sar_bands=null"])
    assert exp.eval.ks == [1, 3] and exp.eval.thresholds_m == [0.5, 2.0] and exp.localize.prior_center == [500000.0, 5000000.0]


def test_empty_ks_through_test_is_one_line(tmp_path, capsys):
    exp = write_experiment_json(tmp_path / "e.json", "e", "ds")
    assert "eval.ks" in _one_line_error(capsys, ["test", str(exp), "--set", "eval.ks=[]"])


# --------------------------------------------------------------------------- item 12: unlocalized queries are misses


def test_query_without_a_position_is_a_miss_in_within():
    from cmpc.evaluate.metrics import block_metrics, error_cdf, error_stats

    s = error_stats(np.array([1.0, 3.0, np.nan, np.inf]), [2, 5])
    assert s["within"] == {"2": 0.25, "5": 0.5}  # 4 queries, two without a position
    assert s["mean"] == pytest.approx(2.0) and s["median"] == pytest.approx(2.0)  # over the positioned ones
    none = error_stats(np.array([np.nan, np.nan]), [5])
    assert none["within"] == {"5": 0.0} and none["median"] is None
    assert error_stats(np.zeros(0), [5])["within"] == {"5": None}
    cdf = error_cdf(np.array([1.0, np.nan]), np.array([0.5, 2.0, 1e4]))
    assert cdf.tolist() == [0.0, 0.5, 0.5]
    b = block_metrics(np.array([1.0, np.inf]), np.array([0.0, np.nan]), [1], [1], 1)
    assert b["error_m"]["within"]["1"] == 0.5 and b["error_cdf"][-1] == 0.5
