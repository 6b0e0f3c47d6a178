"""The reference index: build, search, filtered search, add, atomicity, mismatch checks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from cmpc.errors import ConfigError, DataError, IndexMismatchError
from cmpc.index.factory import choose_factory, new_index, train_index
from cmpc.index.store import ReferenceIndex, read_manifest
from index_fixtures import experiment, write_checkpoint, write_dataset, write_experiment_json


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 4x4-reference dataset, two different checkpoints, and an index built with the first."""
    from cmpc.index.build import build_index

    root = tmp_path_factory.mktemp("index_world")
    info = write_dataset(root / "ds", grid=4, non_aligned=0)
    write_checkpoint(root / "ck.pt", seed=0)
    write_checkpoint(root / "ck_other.pt", seed=1)
    write_checkpoint(root / "ck_dim8.pt", seed=0, embed_dim=8)
    cwd = Path.cwd()
    import os

    os.chdir(root)
    try:
        manifest = build_index(experiment("base", "ds"), checkpoint="ck.pt")
    finally:
        os.chdir(cwd)
    return root, info, manifest


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _memory_index(factory: str, feats: np.ndarray, nprobe: int = 8, ef: int = 64) -> ReferenceIndex:
    """A ReferenceIndex over in-memory vectors (no files), to test search alone."""
    index = new_index(factory, feats.shape[1])
    if not index.is_trained:
        train_index(index, feats, factory)
    index.add(feats)
    n = len(feats)
    ri = ReferenceIndex(Path("mem"), {"embed_dim": feats.shape[1], "count": n, "crs": None}, index,
                        np.arange(n, dtype=np.int64), np.zeros((n, 2)), np.zeros((n, 4)), nprobe, ef)
    ri._features = feats
    from cmpc.index.factory import set_search_defaults

    set_search_defaults(ri.index, nprobe, ef)
    return ri


def _brute_topk(q, f, k, rows=None):
    s = q @ f.T
    if rows is not None:
        mask = np.full(len(f), -np.inf, dtype=np.float32)
        mask[rows] = 0
        s = s + mask
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), order


# --------------------------------------------------------------------------- building


def test_build_writes_consistent_index(world):
    from cmpc.data.patches import PatchDataset
    from cmpc.models.checkpoint import checkpoint_hash, load_embedder

    root, info, m = world
    d = root / "index" / "base"
    assert sorted(p.name for p in d.iterdir()) == ["features.h5", "footprints.gpkg", "index.faiss", "manifest.json"]
    assert m["count"] == 16 and m["embed_dim"] == 16 and m["factory"] == "Flat" and m["crs"] == "EPSG:32631"
    assert m["checkpoint"]["hash"] == checkpoint_hash(root / "ck.pt")
    assert m["metric"] == "inner_product" and m["img_size"] == 16
    assert {"cmpc", "faiss", "torch"} <= set(m["versions"]) and m["created"]
    assert m["extent"] == [500_000.0, 5_000_000.0 - 40, 500_040.0, 5_000_000.0]
    assert read_manifest(d) == m

    ri = ReferenceIndex.load(d)
    refs = info["refs"]
    assert ri.ids.tolist() == [a.id for a in refs]
    assert np.allclose(ri.positions, [[a.x, a.y] for a in refs])
    assert ri.names == [a.name for a in refs] and ri.reference_path(5).name == "5.png"
    # Stored features are the model's optical embeddings of the references.
    model, _ = load_embedder(root / "ck.pt")
    ds = PatchDataset(root / "ds", "test", "opt", 16)
    with torch.no_grad():
        expect = model(torch.stack([ds[i][0] for i in range(len(ds))]), "opt").numpy()
    assert np.allclose(ri.features, expect, atol=1e-5)
    assert np.allclose(np.linalg.norm(ri.features, axis=1), 1.0, atol=1e-5)

    import geopandas as gpd

    fp = gpd.read_file(d / "footprints.gpkg")
    assert len(fp) == 16 and fp.crs.to_epsg() == 32631
    assert np.allclose(fp.geometry.bounds.to_numpy(), [a.bounds for a in refs])
    assert fp["id"].tolist() == [a.id for a in refs]


def test_flat_search_equals_bruteforce(world):
    root, _, _ = world
    ri = ReferenceIndex.load(root / "index" / "base")
    q = _unit(np.random.default_rng(0), 7, 16)
    scores, rows = ri.search(q, 5)
    bs, br = _brute_topk(q, ri.features, 5)
    assert np.array_equal(rows, br) and np.allclose(scores, bs, atol=1e-5)
    s_all, r_all = ri.search(q, 100)  # k larger than the map: all rows, sorted
    assert r_all.shape == (7, 16) and np.all(np.diff(s_all, axis=1) <= 1e-6)


@pytest.mark.parametrize(
    "factory,min_recall",
    # measured on this data: 1.0, 0.80, 0.50, 0.26 (a broken index would be ~0.003 = 10/3000)
    [("HNSW32", 0.95), ("IVF16,Flat", 0.7), ("IVF16,PQ8x4,Refine(Flat)", 0.4), ("IVF16,PQ8x4", 0.15)],
)
def test_approximate_recall_vs_exact(factory, min_recall):
    rng = np.random.default_rng(1)
    feats = _unit(rng, 3000, 32)
    q = _unit(rng, 50, 32)
    ri = _memory_index(factory, feats, nprobe=6, ef=64)
    _, rows = ri.search(q, 10)
    _, exact = _brute_topk(q, feats, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, exact)])
    assert recall >= min_recall, f"{factory}: recall@10 vs exact {recall:.2f}"
    assert (rows >= 0).all()
    if "Refine" in factory:  # exact re-scoring of a 4k shortlist must beat the bare codes
        _, base_rows = _memory_index(factory.replace(",Refine(Flat)", ""), feats, nprobe=6).search(q, 10)
        base_recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(base_rows, exact)])
        assert recall > base_recall + 0.1


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF16,Flat", "IVF16,PQ8x4,Refine(Flat)", "PQ8x4"])
def test_prior_filter_returns_only_allowed_rows(factory):
    rng = np.random.default_rng(2)
    feats = _unit(rng, 2000, 32)
    q = _unit(rng, 20, 32)
    ri = _memory_index(factory, feats)
    allowed = np.sort(rng.choice(2000, size=150, replace=False))
    scores, rows = ri.search(q, 10, allowed=allowed)
    assert rows.shape == (20, 10) and np.isin(rows, allowed).all()
    assert np.all(np.diff(scores, axis=1) <= 1e-5)  # best first
    if factory in ("Flat", "PQ8x4"):  # exact / exact fallback: equals brute force over the subset
        bs, br = _brute_topk(q, feats, 10, allowed)
        assert np.array_equal(rows, br)
    few = allowed[:3]  # fewer allowed rows than k: k shrinks
    s3, r3 = ri.search(q, 10, allowed=few)
    assert r3.shape == (20, 3) and np.isin(r3, few).all()


def test_auto_factory_choice():
    assert choose_factory(100, 256) == "Flat"
    assert choose_factory(49_999, 256) == "Flat"
    assert choose_factory(200_000, 256) == "HNSW32"
    assert choose_factory(1_034_289, 256) == "HNSW32"  # 0.36 ms, recall@10 0.996 at 1M (docs/BENCHMARKS.md)
    big = choose_factory(4_000_000, 256)
    assert big == "IVF2048,PQ64x8,Refine(SQ8)" and new_index(big, 256).d == 256
    assert choose_factory(16_000_000, 256).startswith("IVF4096,")


def test_ivf_and_hnsw_builds(world, monkeypatch):
    from cmpc.index.build import build_index

    root, _, _ = world
    monkeypatch.chdir(root)
    m = build_index(experiment("ivf", "ds", "index.factory=IVF2,Flat"), checkpoint="ck.pt")
    assert m["factory"] == "IVF2,Flat" and m["counts"]["trained_on"] == 16
    ri = ReferenceIndex.load(root / "index" / "ivf", nprobe=2)
    _, rows = ri.search(ri.features, 1)
    assert rows[:, 0].tolist() == list(range(16))  # each reference finds itself
    m = build_index(experiment("hnsw", "ds", "index.factory=HNSW8"), checkpoint="ck.pt")
    ri = ReferenceIndex.load(root / "index" / "hnsw")
    _, rows = ri.search(ri.features, 1)
    assert rows[:, 0].tolist() == list(range(16))


def test_bad_factory_is_a_config_error(world, monkeypatch):
    from cmpc.index.build import build_index

    root, _, _ = world
    monkeypatch.chdir(root)
    with pytest.raises(ConfigError, match="not a valid faiss factory"):
        build_index(experiment("bad", "ds", "index.factory=IVFxyz"), checkpoint="ck.pt")
    with pytest.raises(ConfigError, match="cannot be trained on 16 references"):
        build_index(experiment("bad", "ds", "index.factory=IVF64,Flat"), checkpoint="ck.pt")
    assert not (root / "index" / "bad").exists()


# --------------------------------------------------------------------------- add


def test_add_appends_references(tmp_path, monkeypatch):
    from cmpc.index.build import build_index

    write_dataset(tmp_path / "a", grid=3, non_aligned=0, seed=4)
    write_dataset(tmp_path / "b", grid=3, non_aligned=0, seed=5, id_offset=100, origin=(500_040.0, 5_000_000.0))
    write_dataset(tmp_path / "c", grid=2, non_aligned=0, seed=6, id_offset=100)  # ids clash with b
    write_checkpoint(tmp_path / "ck.pt")
    write_checkpoint(tmp_path / "ck2.pt", seed=9)
    monkeypatch.chdir(tmp_path)
    build_index(experiment("grow", "a"), checkpoint="ck.pt")
    before = ReferenceIndex.load("index/grow").features.copy()
    m = build_index(experiment("grow", "b"), checkpoint="ck.pt", add=True)
    assert m["count"] == 18 and len(m["sources"]) == 2 and m["sources"][1]["first_row"] == 9
    assert m["extent"] == [500_000.0, 5_000_000.0 - 32, 500_072.0, 5_000_000.0]
    ri = ReferenceIndex.load("index/grow")
    assert ri.ids.tolist() == list(range(9)) + list(range(100, 109))
    assert np.array_equal(ri.features[:9], before)  # old rows untouched
    _, rows = ri.search(ri.features[9:], 1)
    assert rows[:, 0].tolist() == list(range(9, 18))  # new references are searchable
    assert ri.reference_path(12).parent == (tmp_path / "b" / "test" / "imgs" / "opt").resolve()

    with pytest.raises(IndexMismatchError, match="was built with checkpoint"):
        build_index(experiment("grow", "c"), checkpoint="ck2.pt", add=True)
    with pytest.raises(DataError, match="already in"):
        build_index(experiment("grow", "b"), checkpoint="ck.pt", add=True)
    with pytest.raises(DataError, match="location id"):
        build_index(experiment("grow", "c"), checkpoint="ck.pt", add=True)
    with pytest.raises(DataError, match="no index"):
        build_index(experiment("nothing", "a"), checkpoint="ck.pt", add=True)
    assert ReferenceIndex.load("index/grow").ntotal == 18  # refusals changed nothing


# --------------------------------------------------------------------------- atomicity


def _tree_digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_interrupted_build_leaves_no_corrupt_index(tmp_path, monkeypatch):
    import cmpc.index.build as build

    write_dataset(tmp_path / "ds", grid=4, non_aligned=0)
    write_checkpoint(tmp_path / "ck.pt")
    monkeypatch.chdir(tmp_path)
    real = build.embed_batches

    def dies_halfway(*args, **kwargs):
        for n, item in enumerate(real(*args, **kwargs)):
            if n == 1:
                raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-build
            yield item

    exp = experiment("atomic", "ds")
    monkeypatch.setattr(build, "embed_batches", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        build.build_index(exp, checkpoint="ck.pt")
    # no index, no partial folder (the build's lock file index/.atomic.lock stays beside it)
    assert [p.name for p in (tmp_path / "index").iterdir()] == [".atomic.lock"]

    monkeypatch.setattr(build, "embed_batches", real)
    build.build_index(exp, checkpoint="ck.pt")
    good = _tree_digest(tmp_path / "index" / "atomic")
    monkeypatch.setattr(build, "embed_batches", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        build.build_index(experiment("atomic", "ds", "index.factory=HNSW16"), checkpoint="ck.pt")
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == [".atomic.lock", "atomic"]
    assert _tree_digest(tmp_path / "index" / "atomic") == good  # the old index is intact
    assert ReferenceIndex.load(tmp_path / "index" / "atomic").ntotal == 16


# --------------------------------------------------------------------------- checks on load


def test_load_refuses_mismatches(world, tmp_path):
    import shutil

    from cmpc.models.checkpoint import checkpoint_hash

    root, _, m = world
    d = root / "index" / "base"
    other = checkpoint_hash(root / "ck_other.pt")
    with pytest.raises(IndexMismatchError) as e:
        ReferenceIndex.load(d, expect_hash=other, checkpoint_path=root / "ck_other.pt")
    msg = str(e.value)
    assert m["checkpoint"]["hash"][:12] in msg and other[:12] in msg and "cmpc index build" in msg and "\n" not in msg
    with pytest.raises(IndexMismatchError, match="16-dimensional"):
        ReferenceIndex.load(d, expect_dim=8)
    with pytest.raises(IndexMismatchError, match="EPSG:32632"):
        ReferenceIndex.load(d, expect_crs="EPSG:32632")
    ReferenceIndex.load(d, expect_hash=m["checkpoint"]["hash"], expect_dim=16, expect_crs="epsg:32631")  # fine

    broken = tmp_path / "broken"
    shutil.copytree(d, broken)
    (broken / "index.faiss").write_bytes(b"not a faiss index")
    with pytest.raises(DataError, match="corrupt"):
        ReferenceIndex.load(broken)
    (broken / "features.h5").unlink()
    with pytest.raises(DataError, match="features.h5 is missing"):
        ReferenceIndex.load(broken)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        ReferenceIndex.load(broken)
    with pytest.raises(DataError, match="no index at"):
        ReferenceIndex.load(tmp_path / "nowhere")
    # an index whose files disagree (features.h5 from a bigger build) is refused, not used
    shutil.rmtree(broken)
    shutil.copytree(d, broken)
    with h5py.File(broken / "features.h5", "a") as h5:
        h5["ids"].resize(15, axis=0)
    with pytest.raises(DataError, match="inconsistent"):
        ReferenceIndex.load(broken)


# --------------------------------------------------------------------------- CLI


class Payload:  # a class inside a checkpoint: code, refused by weights_only=True
    def __reduce__(self):
        return (print, ("this ran",))


def test_cli_index_build_info_and_bad_checkpoints(world, monkeypatch, capsys):
    from cmpc.cli import main

    root, _, _ = world
    monkeypatch.chdir(root)
    exp = write_experiment_json(root / "cli.json", "cli", "ds")
    assert main(["index", "build", str(exp), "--checkpoint", "ck.pt", "--factory", "Flat"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["count"] == 16 and (root / "index" / "cli" / "index.faiss").is_file()
    assert main(["index", "info", "index/cli"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == out["checkpoint"]

    (root / "corrupt.pt").write_bytes(Path(root / "ck.pt").read_bytes()[:2000])
    torch.save({"kind": "embedder", "model": Payload()}, root / "code.pt")
    for ckpt, expect in (("corrupt.pt", "corrupt or truncated"), ("code.pt", "holds code"), ("absent.pt", "no embedder checkpoint")):
        assert main(["index", "build", str(exp), "--checkpoint", ckpt]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expect in err and "\n" not in err, err
    assert main(["index", "info", "index/nowhere"]) == 2
    assert "no index at" in capsys.readouterr().err
    # the good index survived every failed rebuild
    assert ReferenceIndex.load(root / "index" / "cli").ntotal == 16


def test_wrong_optical_channels(world, monkeypatch):
    from cmpc.index.build import build_index

    root, _, _ = world
    monkeypatch.chdir(root)
    write_checkpoint(root / "ck_opt1.pt", optical_channels=1)
    with pytest.raises(DataError, match="have 3 band"):
        build_index(experiment("ch", "ds"), checkpoint="ck_opt1.pt")
