"""Scale paths: indexing a mosaic in windows (== tiled dataset, resumable), sharded indexes
(== unsharded), memory-mapped loading, and the torch matmul+topk search (== faiss Flat)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from index_fixtures import experiment, make_world, write_checkpoint, write_dataset
from tiny_rasters import write_tif

from cmpc.data.raster import RasterSource
from cmpc.errors import DataError, IndexMismatchError
from cmpc.index.shards import shard_ranges
from cmpc.index.store import ReferenceIndex

PATCH, STRIDE, BLOCK = 16, 8, 32


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory):
    """A 72 x 88 px optical/SAR pair at 1 m (textured), its same-area tiled dataset, a checkpoint."""
    from cmpc.config import TileConfig
    from cmpc.data.tiler import tile

    root = tmp_path_factory.mktemp("mosaic")
    world = make_world(3, 88)[:, :72, :]  # (3, 72, 88): not square, to catch row/col swaps
    opt = write_tif(root / "optical.tif", world, block=16)
    sar = write_tif(root / "sar.tif", world.mean(axis=0, keepdims=True).astype(np.float32))
    tile(sar, opt, root / "ds", TileConfig(patch_px=PATCH, stride_px=STRIDE, split="same-area", non_aligned_per_ref=0.0), progress=False)
    write_checkpoint(root / "ck.pt", img_size=16, embed_dim=16)
    return root


def _raster_exp(name: str, *extra: str):
    return experiment(name, "ds", "index.raster=optical.tif", f"index.patch_px={PATCH}", f"index.stride_px={STRIDE}",
                      f"tile.block_px={BLOCK}", "index.factory=Flat", *extra)


def _by_position(ri: ReferenceIndex) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((ri.positions[:, 0], -ri.positions[:, 1]))
    return ri.positions[order], ri.features[order]


def test_raster_index_equals_tiled_dataset_index(mosaic, monkeypatch):
    """Index cut from the GeoTIFF in windows == index built from the tiler's patches of the same grid."""
    from cmpc.index.build import build_index

    monkeypatch.chdir(mosaic)
    windows: list[tuple[int, int]] = []
    real_read = RasterSource.read_on

    def spy(self, grid, row, col, height, width):
        windows.append((height, width))
        return real_read(self, grid, row, col, height, width)

    monkeypatch.setattr(RasterSource, "read_on", spy)
    m = build_index(_raster_exp("from_raster"), checkpoint="ck.pt")
    monkeypatch.setattr(RasterSource, "read_on", real_read)
    rows, cols = (72 - PATCH) // STRIDE + 1, (88 - PATCH) // STRIDE + 1
    assert m["count"] == rows * cols == 8 * 10
    assert m["raster_build"]["blocks"] == len(windows) == 6  # top-left pixels in 2 x 3 blocks of 32 px
    assert max(max(h, w) for h, w in windows) <= BLOCK + PATCH  # never the whole raster (72 x 88)
    assert m["patch_m"] == PATCH and m["crs"] == "EPSG:32631"

    build_index(experiment("from_tiles", "ds", "index.factory=Flat"), checkpoint="ck.pt")
    a = ReferenceIndex.load("index/from_raster")
    b = ReferenceIndex.load("index/from_tiles")
    pa, fa = _by_position(a)
    pb, fb = _by_position(b)
    assert np.array_equal(pa, pb)
    np.testing.assert_allclose(fa, fb, atol=2e-5)  # same pixels, same preprocessing (batched vs one by one)
    assert a.extent == b.extent
    # ids are grid cells: row-major over the 10-column grid
    assert sorted(a.ids.tolist()) == list(range(80))
    r = int(np.flatnonzero(a.ids == 13)[0])
    assert a.names[r] == f"r{1 * STRIDE}_c{3 * STRIDE}" and a.reference_path(r) is None
    x0, y0 = 500_000.0, 5_000_000.0
    assert tuple(a.positions[r]) == (x0 + 3 * STRIDE + PATCH / 2, y0 - 1 * STRIDE - PATCH / 2)
    assert not (mosaic / "index" / ".from_raster.building").exists()  # work folder removed


def test_fine_alignment_map_of_a_raster_index_is_the_raster(mosaic, monkeypatch):
    """A raster-built index has no patch files: the refiner's map is read from the raster and
    equals the map stitched from the tiler's reference patches of the same grid."""
    from cmpc.index.build import build_index
    from cmpc.localize.mosaic import mosaic_from_index

    monkeypatch.chdir(mosaic)
    if not (mosaic / "index" / "from_raster").exists():
        build_index(_raster_exp("from_raster"), checkpoint="ck.pt")
    if not (mosaic / "index" / "from_tiles").exists():
        build_index(experiment("from_tiles", "ds", "index.factory=Flat"), checkpoint="ck.pt")
    a = mosaic_from_index(ReferenceIndex.load("index/from_raster"))
    b = mosaic_from_index(ReferenceIndex.load("index/from_tiles"))
    assert a.image.shape == b.image.shape == (3, 72, 88)
    assert (a.origin_x, a.origin_y, a.gsd_m) == (b.origin_x, b.origin_y, b.gsd_m) == (500_000.0, 5_000_000.0, 1.0)
    assert a.valid.all() and b.valid.all()
    np.testing.assert_allclose(a.image, b.image, atol=0.51)  # PNG patches are the raster's 8-bit values


@pytest.mark.slow
def test_resumed_raster_build_equals_straight_build(mosaic, monkeypatch):
    """Interrupted after 4 of 6 blocks, a rerun embeds only the 2 left and gives the same index."""
    from cmpc.index.raster_build import build_index_from_raster, work_dir

    monkeypatch.chdir(mosaic)
    straight = build_index_from_raster(_raster_exp("straight"), checkpoint="ck.pt")

    def crash_after_4(done: int, total: int) -> None:
        if done == 4:
            raise KeyboardInterrupt

    exp = _raster_exp("resumed")
    with pytest.raises(KeyboardInterrupt):
        build_index_from_raster(exp, checkpoint="ck.pt", on_block=crash_after_4)
    assert not exp.index_dir.exists()  # nothing half-built in place
    assert len(list((work_dir(exp.index_dir) / "chunks").glob("*.npz"))) == 4
    seen: list[int] = []
    m = build_index_from_raster(exp, checkpoint="ck.pt", on_block=lambda d, t: seen.append(d))
    assert m["raster_build"]["resumed_blocks"] == 4 and seen == [5, 6]
    a, b = ReferenceIndex.load("index/straight"), ReferenceIndex.load("index/resumed")
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.positions, b.positions)
    assert np.array_equal(a.features, b.features)
    assert straight["count"] == m["count"]

    # Other parameters (stride) start over instead of mixing grids.
    with pytest.raises(KeyboardInterrupt):
        build_index_from_raster(exp, checkpoint="ck.pt", on_block=crash_after_4)
    m2 = build_index_from_raster(_raster_exp("resumed", "index.stride_px=16"), checkpoint="ck.pt")
    assert m2["raster_build"]["resumed_blocks"] == 0 and m2["count"] == 4 * 5


def test_raster_build_errors(mosaic, monkeypatch):
    from cmpc.index.build import build_index

    monkeypatch.chdir(mosaic)
    with pytest.raises(DataError, match="not found"):
        build_index(_raster_exp("x", "index.raster=nope.tif"), checkpoint="ck.pt")
    with pytest.raises(DataError, match="takes 3 optical band"):
        build_index(_raster_exp("x", "index.bands=[1]"), checkpoint="ck.pt")
    with pytest.raises(DataError, match="smaller than one"):
        build_index(_raster_exp("x", "index.patch_px=128"), checkpoint="ck.pt")
    with pytest.raises(DataError, match="--add with index.raster"):
        build_index(_raster_exp("x"), checkpoint="ck.pt", add=True)


# --------------------------------------------------------------------------- shards


def test_shard_ranges_cover_rows():
    assert shard_ranges(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert shard_ranges(2, 5) == [(0, 1), (1, 2)]  # never an empty shard
    assert shard_ranges(0, 4) == [(0, 0)]


@pytest.fixture(scope="module")
def shard_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_dataset(root / "ds", grid=6, non_aligned=0, seed=2)  # 36 references
    write_dataset(root / "more", grid=3, non_aligned=0, seed=3, id_offset=100, origin=(500_100.0, 5_000_000.0))
    write_checkpoint(root / "ck.pt")
    from cmpc.index.build import build_index

    cwd = Path.cwd()
    os.chdir(root)
    try:
        build_index(experiment("one", "ds", "index.factory=Flat"), checkpoint="ck.pt")  # the unsharded reference
        build_index(experiment("ivf2", "ds", "index.factory=IVF4,Flat", "index.shards=2", "index.nprobe=4"), checkpoint="ck.pt")
    finally:
        os.chdir(cwd)
    return root


def test_sharded_flat_equals_unsharded(shard_world, monkeypatch):
    from cmpc.index.build import build_index

    monkeypatch.chdir(shard_world)
    m = build_index(experiment("three", "ds", "index.factory=Flat", "index.shards=3"), checkpoint="ck.pt")
    assert [(e["first_row"], e["count"]) for e in m["shards"]] == [(0, 12), (12, 12), (24, 12)]
    assert not (shard_world / "index/three/index.faiss").exists()
    one, three = ReferenceIndex.load("index/one"), ReferenceIndex.load("index/three", mmap=True)
    q = one.features[::2] + 0.05 * np.random.default_rng(0).standard_normal((18, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    s1, r1 = one.search(q, 10)
    s3, r3 = three.search(q, 10)
    assert np.array_equal(r1, r3) and np.allclose(s1, s3, atol=1e-6)
    allowed = np.arange(5, 30, 3)  # a prior spanning all three shards
    s1, r1 = one.search(q, 4, allowed=allowed)
    s3, r3 = three.search(q, 4, allowed=allowed)
    assert np.array_equal(r1, r3) and np.allclose(s1, s3, atol=1e-6) and np.isin(r3, allowed).all()

    # --add appends the new references as a new shard
    m = build_index(experiment("three", "more", "index.factory=Flat"), checkpoint="ck.pt", add=True)
    assert [e["count"] for e in m["shards"]] == [12, 12, 12, 9] and m["count"] == 45
    grown = ReferenceIndex.load("index/three")
    _, rows = grown.search(grown.features[36:], 1)
    assert rows[:, 0].tolist() == list(range(36, 45))


def test_sharded_ivf_shares_quantizer_and_is_exact_with_all_cells(shard_world, monkeypatch):
    monkeypatch.chdir(shard_world)
    ri = ReferenceIndex.load("index/ivf2")
    subs = [faiss.extract_index_ivf(s) for _, s in ri.sharded.shards]
    c0, c1 = (faiss.rev_swig_ptr(faiss.downcast_index(s.quantizer).get_xb(), 4 * 16) for s in subs)
    assert np.array_equal(c0, c1)  # one coarse quantizer for all shards
    exact = ReferenceIndex.load("index/one")
    s, r = ri.search(exact.features, 5)  # nprobe = nlist: IVF is exhaustive
    se, re_ = exact.search(exact.features, 5)
    assert np.array_equal(r, re_) and np.allclose(s, se, atol=1e-5)


def test_sharded_index_detects_missing_shard(shard_world, monkeypatch, tmp_path):
    import shutil

    monkeypatch.chdir(shard_world)
    broken = tmp_path / "broken"
    shutil.copytree(shard_world / "index/ivf2", broken)
    (broken / "shards/shard_001.faiss").unlink()
    with pytest.raises(DataError, match="shard_001.faiss is missing"):
        ReferenceIndex.load(broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    shutil.copy(shard_world / "index/ivf2/shards/shard_001.faiss", broken / "shards/shard_001.faiss")
    manifest["shards"][1]["count"] += 1
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="corrupt or inconsistent"):
        ReferenceIndex.load(broken)


# --------------------------------------------------------------------------- torch search


def test_torch_search_equals_faiss_flat(shard_world, monkeypatch):
    """The GPU fallback (matmul + topk) on the CPU, chunked, equals faiss IndexFlatIP."""
    from cmpc.index.torch_search import TorchFlatSearch

    rng = np.random.default_rng(1)
    x = rng.standard_normal((5000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:50] + 0.3 * rng.standard_normal((50, 32)).astype(np.float32)
    flat = faiss.IndexFlatIP(32)
    flat.add(x)
    fs, fr = flat.search(q, 20)
    ts = TorchFlatSearch(x, "cpu", max_score_bytes=50 * 1024 * 4)  # 1024-row chunks: 5 merges
    assert ts._chunks(50) == 1024
    s, r = ts.search(q, 20)
    assert np.array_equal(r, fr) and np.allclose(s, fs, atol=1e-5)
    streamed = TorchFlatSearch(x, "cpu", max_device_bytes=0)  # the streaming path (map too big for the device)
    assert not streamed.on_device and np.array_equal(streamed.search(q, 20)[1], fr)

    monkeypatch.chdir(shard_world)
    ri = ReferenceIndex.load("index/one", backend="torch", torch_device="cpu")
    assert ri.backend == "torch-cpu"
    base = ReferenceIndex.load("index/one")
    assert np.array_equal(ri.search(base.features, 7)[1], base.search(base.features, 7)[1])
    allowed = np.arange(0, 36, 4)
    assert np.array_equal(ri.search(base.features, 3, allowed)[1], base.search(base.features, 3, allowed)[1])
    # default (auto) on the CPU: batches of 16+ go through torch on a view of faiss's vectors
    auto = ReferenceIndex.load("index/one")
    pure = ReferenceIndex.load("index/one", backend="faiss")
    assert "torch-cpu" in auto.backend and pure.backend == "faiss"
    qs = base.features[:20] + 0.1
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    sa, ra = auto.search(qs, 9)
    sp, rp = pure.search(qs, 9)
    assert np.array_equal(ra, rp) and np.allclose(sa, sp, atol=1e-5)
    assert ReferenceIndex.load("index/one", mmap=True).search(qs, 9)[1].tolist() == rp.tolist()
    with pytest.raises(IndexMismatchError, match="needs a Flat index"):
        ReferenceIndex.load("index/ivf2", backend="torch", torch_device="cpu")


# --------------------------------------------------------------------------- DDP


def test_every_trainable_embedder_parameter_gets_a_gradient():
    """DistributedDataParallel refuses parameters without gradient (MobileNetV3's conv_head
    sits outside forward_features): they must be frozen, the rest must all train."""
    from cmpc.config import ModelConfig
    from cmpc.models.embedder import build_embedder

    torch.manual_seed(0)
    m = build_embedder(ModelConfig(backbone="mobilenetv3_small_050", embed_dim=16, stem_channels=8), 1, 3).train()
    sar, opt = m.forward_pair(torch.randn(4, 1, 32, 32), torch.randn(4, 3, 32, 32))
    (sar.sum() + opt.sum()).backward()
    frozen = [n for n, p in m.named_parameters() if not p.requires_grad]
    assert frozen and all("conv_head" in n for n in frozen)
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
