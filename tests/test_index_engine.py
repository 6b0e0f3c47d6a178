"""index.engine = "milvus" (Milvus Lite here): parity with FAISS, priors, hashes, bad input.

The same tiny map is indexed by both engines (exact: FAISS Flat / Milvus FLAT); searches,
filtered searches and the `cmpc localize` step must give the same top-k ids. A collection
whose properties do not carry the manifest's hashes is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from index_fixtures import evaluate_command, experiment, localize_command, write_checkpoint, write_dataset

pytest.importorskip("pymilvus", reason="the milvus extra is not installed: pip install 'cmpc[milvus]'")

from cmpc.errors import ConfigError, DataError, IndexMismatchError  # noqa: E402
from cmpc.index.store import ReferenceIndex  # noqa: E402


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """A 7 x 7-reference map indexed exactly by FAISS (index/f) and by Milvus Lite (index/m)."""
    from cmpc.index.build import build_index

    root = tmp_path_factory.mktemp("engines")
    cwd = Path.cwd()
    os.chdir(root)
    try:
        write_dataset(Path("ds"), grid=7, non_aligned=6)
        write_checkpoint(Path("ck.pt"))
        mf = build_index(experiment("f", "ds", "index.factory=Flat"), checkpoint="ck.pt")
        mm = build_index(experiment("m", "ds", "index.factory=Flat", "index.engine=milvus"), checkpoint="ck.pt")
    finally:
        os.chdir(cwd)
    return root, mf, mm


def _queries(ri: ReferenceIndex, n: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = ri.features[rng.choice(ri.ntotal, n, replace=False)] + 0.05 * rng.standard_normal((n, ri.dim)).astype(np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def test_engine_parity_exact_search_and_localize(engines, monkeypatch):
    root, mf, mm = engines
    monkeypatch.chdir(root)
    assert mf["engine"] == "faiss" and mm["engine"] == "milvus"
    assert mm["milvus"]["uri"] == "milvus.db" and mm["milvus"]["index_type"] == "FLAT" and (root / "index/m/milvus.db").is_dir()
    assert not (root / "index/m/index.faiss").exists()
    a, b = ReferenceIndex.load("index/f"), ReferenceIndex.load("index/m")
    try:
        assert b.backend == "milvus-lite" and b.engine == "milvus" and b.ntotal == a.ntotal == 49
        q = _queries(a)
        sa, ra = a.search(q, 10)
        sb, rb = b.search(q, 10)
        assert np.array_equal(ra, rb)
        np.testing.assert_allclose(sa, sb, atol=1e-5)
    finally:
        b.close()
    # `cmpc localize` on both engines: the same top-k ids for every query (SAR patches of the dataset)
    outs = {}
    for name in ("f", "m"):
        exp = experiment(name, "ds", "index.factory=Flat", "localize.top_k=8", *(["index.engine=milvus"] if name == "m" else []))
        res = localize_command(exp, "ds", out=f"loc_{name}", checkpoint="ck.pt", split="test")
        outs[name] = json.loads(Path(res["files"][0]).read_text())
    ids = {n: [f["properties"]["topk_ids"] for f in o["features"]] for n, o in outs.items()}
    assert len(ids["f"]) == 49 + 6 and ids["f"] == ids["m"]
    # `cmpc test` / test.py: the index step finds the Milvus index current, the metrics are the FAISS ones
    metrics = {}
    for name in ("f", "m"):
        exp = experiment(name, "ds", "index.factory=Flat", "eval.plots=false", f"eval.out=rep_{name}", *(["index.engine=milvus"] if name == "m" else []))
        metrics[name] = evaluate_command(exp, checkpoint="ck.pt")
    assert metrics["m"]["meta"]["index_rebuilt"] is False and metrics["f"]["meta"]["index_rebuilt"] is False
    for qs in ("aligned", "non_aligned"):
        assert metrics["m"][qs]["coarse"]["recall"] == metrics["f"][qs]["coarse"]["recall"]
        assert metrics["m"][qs]["coarse"]["error_m"] == metrics["f"][qs]["coarse"]["error_m"]


def test_prior_filters_bbox_then_exact(engines, monkeypatch):
    """Disc and polygon priors: Milvus filters by bounding box, the exact test keeps allowed rows only."""
    import shapely

    from cmpc.config import LocalizeConfig
    from cmpc.localize.prior import prior_rows

    root, _, _ = engines
    monkeypatch.chdir(root)
    a, b = ReferenceIndex.load("index/f"), ReferenceIndex.load("index/m")
    try:
        cx, cy = (float(v) for v in a.positions.mean(axis=0))
        disc = prior_rows(LocalizeConfig(prior_center=[cx, cy], prior_radius_m=10.0), a)
        tri = shapely.Polygon([(cx - 30, cy - 30), (cx + 30, cy - 30), (cx - 30, cy + 30)])
        Path("tri.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
            {"type": "Feature", "properties": {}, "geometry": shapely.geometry.mapping(tri)}]}))
        poly = prior_rows(LocalizeConfig(prior="tri.geojson"), a)
        q = _queries(a, seed=1)
        for allowed in (disc, poly):
            assert 3 < len(allowed) < a.ntotal
            sa, ra = a.search(q, 3, allowed)
            sb, rb = b.search(q, 3, allowed)
            assert np.isin(rb, allowed).all() and np.array_equal(ra, rb)
            np.testing.assert_allclose(sa, sb, atol=1e-5)
        # the box of the disc holds rows the disc does not: they never come back
        x, y = a.positions[:, 0], a.positions[:, 1]
        box = np.flatnonzero((np.abs(x - cx) <= 10) & (np.abs(y - cy) <= 10))
        assert len(np.setdiff1d(box, disc)) > 0
        _, rows = b.search(q, len(disc), disc)
        assert set(rows.ravel()) <= set(disc.tolist())
        # more candidates asked than the prior holds: k shrinks to the prior's size, like faiss
        assert b.search(q, 100, disc)[1].shape == (len(q), len(disc))
    finally:
        b.close()


def test_approximate_milvus_index_with_prior(engines, monkeypatch):
    """IVF_FLAT and HNSW collections (external .db shared by two indexes): stated parameters, priors honoured."""
    from cmpc.index.build import build_index

    root, _, _ = engines
    monkeypatch.chdir(root)
    db = root / "shared" / "refs.db"
    db.parent.mkdir(exist_ok=True)
    m1 = build_index(experiment("ivf", "ds", "index.factory=IVF4,Flat", "index.engine=milvus", f"index.uri={db}", "index.nprobe=4"), checkpoint="ck.pt")
    m2 = build_index(experiment("hnsw", "ds", "index.factory=HNSW8", "index.engine=milvus", f"index.uri={db}"), checkpoint="ck.pt")
    assert m1["milvus"]["index_type"] == "IVF_FLAT" and m1["milvus"]["index_params"] == {"nlist": 4}
    assert m2["milvus"]["index_type"] == "HNSW" and m2["milvus"]["index_params"] == {"M": 8, "efConstruction": 40}
    assert m1["milvus"]["uri"] == str(db) and not (root / "index/ivf/milvus.db").exists()
    a = ReferenceIndex.load("index/f")
    q = _queries(a, seed=2)
    allowed = np.arange(10, 30)
    _, exact = a.search(q, 5)
    for name in ("ivf", "hnsw"):
        ri = ReferenceIndex.load(f"index/{name}")
        try:
            _, rows = ri.search(q, 5)
            assert np.mean([len(np.intersect1d(x, y)) / 5 for x, y in zip(rows, exact)]) >= 0.9  # nprobe = nlist: exact
            _, rows = ri.search(q, 5, allowed)
            assert np.isin(rows, allowed).all() and (rows >= 0).all()
        finally:
            ri.close()
    # a rebuild into the shared file replaces the collection: the old one is dropped after the swap
    from cmpc.index.milvus import MilvusCollection

    old = m1["milvus"]["collection"]
    m3 = build_index(experiment("ivf", "ds", "index.factory=IVF4,Flat", "index.engine=milvus", f"index.uri={db}"), checkpoint="ck.pt")
    coll = MilvusCollection(str(db), m3["milvus"]["collection"])
    try:
        names = coll.list_collections()
    finally:
        coll.close(release_lite=True)
    assert m3["milvus"]["collection"] in names and old not in names and m2["milvus"]["collection"] in names


def test_hash_mismatch_refused(engines, monkeypatch, tmp_path):
    """The collection's properties must carry the manifest's hashes; a missing collection or db is refused."""
    import shutil

    from cmpc.index.milvus import PROP_FEATURES, MilvusCollection

    root, _, mm = engines
    monkeypatch.chdir(root)
    shutil.copytree(root / "index" / "m", root / "index" / "m2")
    man = json.loads((root / "index/m2/manifest.json").read_text())
    # 1) the manifest says other features than the collection holds
    man2 = {**man, "milvus": {**man["milvus"], "features_sha256": "0" * 64}}
    (root / "index/m2/manifest.json").write_text(json.dumps(man2))
    with pytest.raises(IndexMismatchError, match="features_sha256.*not the one this index was built with"):
        ReferenceIndex.load("index/m2")
    # 2) the collection's property changed (someone refilled it): refused too
    (root / "index/m2/manifest.json").write_text(json.dumps(man))
    coll = MilvusCollection(str(root / "index/m2/milvus.db"), man["milvus"]["collection"])
    try:
        coll.client.alter_collection_properties(coll.name, properties={PROP_FEATURES: "f" * 64})
    finally:
        coll.close(release_lite=True)
    with pytest.raises(IndexMismatchError, match="features_sha256=ffffffffffff"):
        ReferenceIndex.load("index/m2")
    # 3) another checkpoint than the one the index was built with: refused before Milvus is asked
    with pytest.raises(IndexMismatchError, match="was built with checkpoint"):
        ReferenceIndex.load("index/m", expect_hash="0" * 64)
    # 4) a collection that is not there
    (root / "index/m2/manifest.json").write_text(json.dumps({**man, "milvus": {**man["milvus"], "collection": "cmpc_gone_000000_00000000"}}))
    with pytest.raises(DataError, match="is not at"):
        ReferenceIndex.load("index/m2")
    # 5) the Milvus Lite database folder is missing
    shutil.rmtree(root / "index/m2/milvus.db")
    with pytest.raises(DataError, match="incomplete: its Milvus Lite database"):
        ReferenceIndex.load("index/m2")


def test_engine_bad_input(engines, monkeypatch):
    from cmpc.index.build import build_index, index_is_current
    from cmpc.models.checkpoint import checkpoint_hash

    root, _, _ = engines
    monkeypatch.chdir(root)
    with pytest.raises(ConfigError, match="must end in .db"):
        build_index(experiment("x", "ds", "index.engine=milvus", "index.uri=refs.sqlite"), checkpoint="ck.pt")
    with pytest.raises(ConfigError, match="unknown scheme"):
        build_index(experiment("x", "ds", "index.engine=milvus", "index.uri=ftp://h/x.db"), checkpoint="ck.pt")
    with pytest.raises(ConfigError, match="no Milvus equivalent"):
        build_index(experiment("x", "ds", "index.engine=milvus", "index.factory=LSH"), checkpoint="ck.pt")
    with pytest.raises(ConfigError, match="index.shards"):
        build_index(experiment("x", "ds", "index.engine=milvus", "index.shards=2"), checkpoint="ck.pt")
    with pytest.raises(ConfigError, match="cannot build a IVF_PQ index"):  # Milvus Lite has no IVF_PQ (a server has)
        build_index(experiment("x", "ds", "index.engine=milvus", "index.factory=IVF4,PQ4"), checkpoint="ck.pt")
    assert not (root / "index" / "x").exists()
    with pytest.raises(ConfigError, match="index.engine"):
        experiment("x", "ds", "index.engine=lance")
    # switching the engine makes the index stale (cmpc test rebuilds it)
    h = checkpoint_hash(Path("ck.pt"))
    assert index_is_current(experiment("m", "ds", "index.factory=Flat", "index.engine=milvus"), h) == (True, "")
    ok, why = index_is_current(experiment("m", "ds", "index.factory=Flat"), h)
    assert not ok and "index.engine=milvus" in why
    # --add is refused across engines
    with pytest.raises(DataError, match="uses index.engine=milvus"):
        build_index(experiment("m", "ds", "index.factory=Flat"), checkpoint="ck.pt", add=True)
