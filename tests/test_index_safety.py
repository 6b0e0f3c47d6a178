"""Trust at the seams: index names cannot leave index/, builds never replace a folder that is
not an index, one build per index / dataset root at a time, and an evaluation (or refiner
training) with another checkpoint never overwrites the experiment's index."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from index_fixtures import experiment, make_world, write_checkpoint, write_dataset, write_experiment_json
from tiny_rasters import write_tif

from cmpc.cli import main
from cmpc.errors import CmpcError, ConfigError
from cmpc.index.store import read_manifest
from cmpc.models.checkpoint import checkpoint_hash

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A 3x3-reference test split + train split, two checkpoints, an optical mosaic, an experiment file."""
    root = tmp_path_factory.mktemp("safety")
    write_dataset(root / "ds", grid=3, non_aligned=2, split="test")
    write_dataset(root / "ds", grid=3, non_aligned=0, split="train", seed=5, id_offset=100)
    write_checkpoint(root / "ck.pt", seed=0)
    write_checkpoint(root / "ck2.pt", seed=1)
    write_tif(root / "optical.tif", make_world(3, 40))
    write_experiment_json(root / "exp.json", "safe", "ds", index={"batch_size": 8, "factory": "Flat"})
    return root


def _cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@contextlib.contextmanager
def _lock_holder(lock: Path) -> Iterator[int]:
    """Another process holding ``lock`` as a running build does (the lock, its pid beside it); yields its pid."""
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from filelock import FileLock\n"
        "os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)\n"
        "with FileLock(sys.argv[1], timeout=0):\n"
        "    Path(sys.argv[1] + '.pid').write_text(str(os.getpid()))\n"
        "    print('ready', flush=True)\n"
        "    sys.stdin.read()\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        yield p.pid
    finally:
        if p.stdin is not None:
            p.stdin.close()
        p.wait(timeout=60)


# --------------------------------------------------------------------------- 1. index names


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "a/b", "../victim", "a\\b", "x" * 300, " a", "a\nb"])
def test_bad_index_names_are_refused(name):
    from cmpc.config import validate_index_name

    with pytest.raises(ConfigError, match="plain folder name"):
        validate_index_name(name)


@pytest.mark.parametrize("name", ["demo", "demo-train", "demo@0123456789ab", "run_1.v2"])
def test_good_index_names_pass(name):
    from cmpc.config import validate_index_name

    assert validate_index_name(name) == name


def test_index_dir_validates_the_name():
    exp = experiment("ok", "ds", "index.name=../victim")
    with pytest.raises(ConfigError, match="index.name"):
        _ = exp.index_dir


def test_cli_name_outside_index_is_refused_and_victim_intact(world, monkeypatch, capsys):
    monkeypatch.chdir(world)
    victim = world / "victim"
    victim.mkdir(exist_ok=True)
    (victim / "precious.txt").write_text("keep me")
    for name in ("../victim", ".."):
        rc, err = _cli(capsys, "index", "build", "exp.json", "--checkpoint", "ck.pt", "--name", name)
        assert rc == 2
        assert "plain folder name" in _one_error_line(err)
        assert (victim / "precious.txt").read_text() == "keep me"
    assert (world / "ds" / "test" / "annotations").is_dir()  # `..` = the cwd: untouched


def test_build_never_replaces_a_folder_that_is_not_an_index(world, monkeypatch, capsys):
    monkeypatch.chdir(world)
    notes = world / "index" / "notes"
    notes.mkdir(parents=True, exist_ok=True)
    (notes / "a.txt").write_text("mine")
    rc, err = _cli(capsys, "index", "build", "exp.json", "--checkpoint", "ck.pt", "--name", "notes")
    assert rc == 2 and "not a cmpc index" in _one_error_line(err)
    assert sorted(p.name for p in notes.iterdir()) == ["a.txt"] and (notes / "a.txt").read_text() == "mine"
    # A manifest that is not an index manifest does not make it one either.
    (notes / "manifest.json").write_text('{"hello": 1}')
    rc, err = _cli(capsys, "index", "build", "exp.json", "--checkpoint", "ck.pt", "--name", "notes")
    assert rc == 2 and "not a cmpc index" in _one_error_line(err)
    assert (notes / "a.txt").read_text() == "mine"
    # An empty folder and a real index are replaced (rebuilt) normally.
    (world / "index" / "empty").mkdir(exist_ok=True)
    assert _cli(capsys, "index", "build", "exp.json", "--checkpoint", "ck.pt", "--name", "empty")[0] == 0
    assert _cli(capsys, "index", "build", "exp.json", "--checkpoint", "ck2.pt", "--name", "empty")[0] == 0
    assert read_manifest(world / "index" / "empty")["checkpoint"]["hash"] == checkpoint_hash(world / "ck2.pt")


def test_raster_build_never_replaces_a_folder_that_is_not_an_index(world, monkeypatch):
    from cmpc.index.raster_build import build_index_from_raster

    monkeypatch.chdir(world)
    d = world / "index" / "rnotes"
    d.mkdir(parents=True, exist_ok=True)
    (d / "a.txt").write_text("mine")
    exp = experiment("rnotes", "ds", "index.raster=optical.tif", "index.patch_px=16", "index.factory=Flat")
    with pytest.raises(CmpcError, match="not a cmpc index"):
        build_index_from_raster(exp, checkpoint="ck.pt")
    assert sorted(p.name for p in d.iterdir()) == ["a.txt"]


# --------------------------------------------------------------------------- 2. one build at a time


def test_second_index_build_stops_naming_the_running_build(world, monkeypatch, capsys):
    monkeypatch.chdir(world)
    with _lock_holder(world / "index" / ".busy.lock") as pid:
        rc, err = _cli(capsys, "index", "build", "exp.json", "--checkpoint", "ck.pt", "--name", "busy")
        assert rc == 2
        line = _one_error_line(err)
        assert f"process {pid}" in line and "index build" in line
        assert not (world / "index" / "busy").exists()
    # The holder has exited: the lock is free again.
    assert _cli(capsys, "index", "build", "exp.json", "--checkpoint", "ck.pt", "--name", "busy")[0] == 0


def test_second_raster_build_stops_and_crashed_holder_frees_the_lock(world, monkeypatch, capsys):
    monkeypatch.chdir(world)
    args = ("index", "build", "exp.json", "--checkpoint", "ck.pt", "--name", "rbusy", "--raster", "optical.tif", "--patch-px", "16")
    with _lock_holder(world / "index" / ".rbusy.lock") as pid:
        rc, err = _cli(capsys, *args)
        assert rc == 2 and f"process {pid}" in _one_error_line(err)
        assert not (world / "index" / "rbusy").exists() and not (world / "index" / ".rbusy.building").exists()
    # A holder killed outright (a crash) releases the lock too.
    code = "import sys, time\nfrom filelock import FileLock\nwith FileLock(sys.argv[1], timeout=0):\n    print('ready', flush=True)\n    time.sleep(600)\n"
    p = subprocess.Popen([sys.executable, "-c", code, str(world / "index" / ".rbusy.lock")], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    p.kill()
    p.wait(timeout=60)
    rc, err = _cli(capsys, *args)
    assert rc == 0, err
    assert read_manifest(world / "index" / "rbusy")["count"] > 0


def test_lock_lives_beside_the_index_not_inside(world, monkeypatch, capsys):
    monkeypatch.chdir(world)
    assert _cli(capsys, "index", "build", "exp.json", "--checkpoint", "ck.pt", "--name", "beside")[0] == 0
    assert (world / "index" / ".beside.lock").is_file()
    assert not [p for p in (world / "index" / "beside").iterdir() if "lock" in p.name or "pid" in p.name]


def test_second_tiling_of_one_dataset_root_stops(world):
    from cmpc.config import TileConfig
    from cmpc.data.tiler import tile

    opt = world / "optical.tif"
    sar = write_tif(world / "sar.tif", make_world(3, 40).mean(axis=0, keepdims=True).astype(np.float32))
    out = world / "tiled"
    with _lock_holder(out.parent / f".{out.name}.lock") as pid:
        with pytest.raises(CmpcError, match=f"process {pid}"):
            tile(sar, opt, out, TileConfig(patch_px=16, split="same-area"), progress=False)
        assert not out.exists()
    tile(sar, opt, out, TileConfig(patch_px=16, split="same-area"), progress=False)
    assert (out / "dataset.json").is_file()


# --------------------------------------------------------------------------- 3. other checkpoints


def test_test_with_another_checkpoint_leaves_the_experiment_index_alone(world, monkeypatch, capsys):
    from cmpc.config import load_experiment
    from cmpc.localize.localizer import Localizer

    monkeypatch.chdir(world)
    write_experiment_json(world / "ev.json", "ev", "ds", eval={"plots": False, "out": "rep_ev", "grid_queries": 2})
    (world / "runs" / "ev").mkdir(parents=True, exist_ok=True)
    shutil.copy2(world / "ck.pt", world / "runs" / "ev" / "emb_best.pt")
    h1, h2 = checkpoint_hash(world / "ck.pt"), checkpoint_hash(world / "ck2.pt")
    assert _cli(capsys, "index", "build", "ev.json")[0] == 0
    rc, err = _cli(capsys, "test", "ev.json", "--checkpoint", "ck2.pt")
    assert rc == 0, err
    assert read_manifest(world / "index" / "ev")["checkpoint"]["hash"] == h1  # the experiment's index: untouched
    other = Path("index") / f"ev@{h2[:12]}"
    assert read_manifest(world / other)["checkpoint"]["hash"] == h2
    meta = json.loads((world / "rep_ev" / "metrics.json").read_text())["meta"]
    assert meta["index"] == str(other) and meta["checkpoint_hash"] == h2
    # `cmpc localize EXP` (the default checkpoint) still finds its own index.
    loc = Localizer.from_experiment(load_experiment("ev.json"), use_refiner=False)
    assert loc.index.manifest["checkpoint"]["hash"] == h1
    # `cmpc localize EXP --checkpoint OTHER` finds the per-checkpoint index that `cmpc test` built.
    loc2 = Localizer.from_experiment(load_experiment("ev.json"), checkpoint="ck2.pt", use_refiner=False)
    assert loc2.index.directory == other and loc2.index.manifest["checkpoint"]["hash"] == h2
    # The default checkpoint, by path, evaluates against the experiment's index; nothing else is built.
    assert _cli(capsys, "test", "ev.json", "--checkpoint", "runs/ev/emb_best.pt")[0] == 0
    assert json.loads((world / "rep_ev" / "metrics.json").read_text())["meta"]["index"] == str(Path("index/ev"))
    assert sorted(p.name for p in (world / "index").iterdir() if p.name.startswith("ev")) == ["ev", f"ev@{h2[:12]}"]


def test_refiner_train_index_with_another_checkpoint_leaves_the_index_alone(world, monkeypatch):
    from cmpc.index.build import ensure_train_index

    monkeypatch.chdir(world)
    exp = experiment("tr", "ds")
    (world / "runs" / "tr").mkdir(parents=True, exist_ok=True)
    shutil.copy2(world / "ck.pt", world / "runs" / "tr" / "emb_best.pt")
    h1, h2 = checkpoint_hash(world / "ck.pt"), checkpoint_hash(world / "ck2.pt")
    a = ensure_train_index(exp, world / "runs" / "tr" / "emb_best.pt")
    assert a.directory == Path("index/tr-train") and a.built and read_manifest(a.directory)["checkpoint"]["hash"] == h1
    b = ensure_train_index(exp, world / "ck2.pt")
    assert b.directory == Path(f"index/tr-train@{h2[:12]}") and b.built and read_manifest(b.directory)["checkpoint"]["hash"] == h2
    assert read_manifest(world / "index" / "tr-train")["checkpoint"]["hash"] == h1  # untouched
    m = read_manifest(a.directory)
    assert m["factory"] == "Flat" and [s["split"] for s in m["sources"]] == ["train"]  # exact, the train split
    assert exp.index.name is None and exp.index.split == "test"  # the experiment itself is not changed
    # Reused, not rebuilt, on the next call with either checkpoint.
    stamp = os.stat(world / "index" / "tr-train" / "manifest.json").st_mtime_ns
    again = ensure_train_index(exp, world / "runs" / "tr" / "emb_best.pt")
    assert again.directory == Path("index/tr-train") and not again.built
    assert ensure_train_index(exp, world / "ck2.pt").directory == Path(f"index/tr-train@{h2[:12]}")
    assert os.stat(world / "index" / "tr-train" / "manifest.json").st_mtime_ns == stamp
