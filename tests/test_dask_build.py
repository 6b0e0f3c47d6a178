"""`cmpc index build --raster MAP --dask`: blocks embedded on Dask workers, the client writes.

One local Dask cluster (one worker process) serves the module: a build interrupted after
two blocks resumes (in-process blocks and Dask blocks mix freely) and gives the in-process
build's index (same ids, positions, embeddings within 1e-5).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from index_fixtures import experiment, make_world, write_checkpoint, write_experiment_json
from tiny_rasters import write_tif

pytest.importorskip("distributed", reason="the dask extra is not installed: pip install 'cmpc[dask]'")

from cmpc.errors import ConfigError  # noqa: E402
from cmpc.index.store import ReferenceIndex  # noqa: E402

PATCH, STRIDE, BLOCK = 16, 8, 32


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory):
    root = tmp_path_factory.mktemp("dask_mosaic")
    world = make_world(5, 88)[:, :72, :]
    write_tif(root / "optical.tif", world, block=16)
    write_checkpoint(root / "ck.pt", img_size=16, embed_dim=16)
    return root


@pytest.fixture(scope="module")
def scheduler():
    """A LocalCluster with one worker process (its address is what `--dask ADDRESS` takes)."""
    import logging

    from distributed import LocalCluster

    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR)
    yield cluster.scheduler_address
    cluster.close()


def _exp(name: str, *extra: str):
    return experiment(name, "ds", "index.raster=optical.tif", f"index.patch_px={PATCH}", f"index.stride_px={STRIDE}",
                      f"tile.block_px={BLOCK}", "index.factory=Flat", *extra)


def test_interrupted_dask_build_resumes_and_equals_in_process(mosaic, scheduler, monkeypatch):
    from cmpc.index.raster_build import build_index_from_raster, work_dir

    monkeypatch.chdir(mosaic)
    straight = build_index_from_raster(_exp("straight"), checkpoint="ck.pt")

    def crash_after_2(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    exp = _exp("dask", f"index.dask={scheduler}")
    with pytest.raises(KeyboardInterrupt):
        build_index_from_raster(exp, checkpoint="ck.pt", on_block=crash_after_2)
    assert not exp.index_dir.exists()
    assert len(list((work_dir(exp.index_dir) / "chunks").glob("*.npz"))) >= 2  # blocks finish in any order; each is whole
    seen: list[int] = []
    m = build_index_from_raster(exp, checkpoint="ck.pt", on_block=lambda d, t: seen.append(d))
    assert m["raster_build"]["resumed_blocks"] >= 2 and seen[-1] == 6 and len(seen) == 6 - m["raster_build"]["resumed_blocks"]
    assert m["raster_build"]["dask"] == {"scheduler": scheduler, "workers": 1, "threads_per_worker": 1}
    a, b = ReferenceIndex.load("index/straight"), ReferenceIndex.load("index/dask")
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.positions, b.positions)
    assert float(np.abs(a.features - b.features).max()) <= 1e-5
    assert straight["count"] == m["count"] == 8 * 10
    assert not work_dir(exp.index_dir).exists()


def test_dask_cli_and_bad_input(mosaic, monkeypatch, capsys):
    from cmpc.cli import main
    from cmpc.index.build import build_index

    monkeypatch.chdir(mosaic)
    with pytest.raises(ConfigError, match="give --raster"):
        build_index(experiment("x", "ds", "index.dask=local"), checkpoint="ck.pt")
    with pytest.raises(ConfigError, match="neither 'local' nor a scheduler address"):
        build_index(_exp("x", "index.dask=somewhere"), checkpoint="ck.pt")
    exp_json = write_experiment_json(mosaic / "exp.json", "cli", "ds", tile={"block_px": BLOCK}, index={"factory": "Flat"})
    common = ["index", "build", str(exp_json), "--checkpoint", "ck.pt", "--raster", "optical.tif", "--patch-px", str(PATCH), "--stride-px", str(STRIDE)]
    # a scheduler nobody runs: one line, no traceback, nothing built
    monkeypatch.setattr("cmpc.index.dask_build.CONNECT_TIMEOUT_S", 1)
    rc = main([*common, "--name", "y", "--dask", "tcp://127.0.0.1:9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in err[0]
    assert not (mosaic / "index" / "y").exists()
    # --dask without an address: a LocalCluster (one worker here), then the Milvus engine as the writer
    assert main([*common, "--name", "local", "--dask", "--dask-workers", "1", "--engine", "milvus"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["raster_build"]["dask"]["scheduler"] == "local" and m["raster_build"]["dask"]["workers"] == 1
    assert m["engine"] == "milvus" and m["count"] == 8 * 10
    ri = ReferenceIndex.load("index/local")
    try:
        _, rows = ri.search(ri.features[:3], 1)
        assert rows[:, 0].tolist() == [0, 1, 2]
    finally:
        ri.close()
