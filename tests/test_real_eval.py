"""The BigEarthNet reader and the N-way pair evaluation (``cmpc eval pairs``).

Real-data tests read ../shared/data/real/bigearthnet-s1s2 through the ``real_data`` fixture and
skip with a reason when it is absent; the metric and error tests need no real data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from cmpc.config import ModelConfig
from cmpc.data.bigearthnet import PATCH_PX, load_bigearthnet_pairs, read_npz_pair, read_npz_pairs
from cmpc.errors import DataError
from cmpc.evaluate.pairs import chance_levels, evaluate_bigearthnet, model_inputs, pair_ranks, pair_retrieval_metrics, sar_values
from cmpc.models.embedder import build_embedder

BEN = "bigearthnet-s1s2"


@pytest.fixture(scope="module")
def ben_root(real_data: Path) -> Path:
    root = real_data / BEN
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    return root


@pytest.fixture(scope="module")
def ben_pairs(ben_root: Path):
    return load_bigearthnet_pairs(ben_root, nir=True)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --------------------------------------------------------------------------- reader (real data)


@pytest.mark.real
def test_reader_loads_60_pairs_with_bands_in_order(ben_root, ben_pairs):
    pairs = ben_pairs
    assert len(pairs) == 60 and len({p.name for p in pairs}) == 60
    assert [p.source for p in pairs].count("geotiff") == 6 and [p.source for p in pairs].count("npz") == 54
    for p in pairs:
        assert p.sar.shape == (2, PATCH_PX, PATCH_PX) and p.sar.dtype == np.float32
        assert p.optical.shape == (4, PATCH_PX, PATCH_PX) and p.optical.dtype == np.float32
        assert -40.0 < p.sar[0].mean() < 5.0 and -45.0 < p.sar[1].mean() < 5.0  # backscatter in dB
    # cross-polarisation is weaker than co-polarisation (all but one open-sea patch)
    assert sum(p.sar[1].mean() < p.sar[0].mean() - 3.0 for p in pairs) >= 55
    # band order against the source files: optical = B04, B03, B02, B08; SAR = VV, VH
    g = pairs[[p.source for p in pairs].index("geotiff")]
    s2 = ben_root / "ben_common_geotiff" / "BigEarthNet-S2-Example" / g.name
    s1 = ben_root / "ben_common_geotiff" / "BigEarthNet-S1-Example" / g.s1_name
    for i, band in enumerate(("B04", "B03", "B02", "B08")):
        with rasterio.open(s2 / f"{g.name}_{band}.tif") as src:
            np.testing.assert_array_equal(g.optical[i], src.read(1).astype(np.float32))
    with rasterio.open(s1 / f"{g.s1_name}_VH.tif") as src:
        np.testing.assert_array_equal(g.sar[1], src.read(1))
    n = pairs[[p.source for p in pairs].index("npz")]
    with np.load(n.path) as z:
        np.testing.assert_array_equal(n.optical[0], z["B04"].astype(np.float32))
        np.testing.assert_array_equal(n.sar[0], z["VV"])
    assert load_bigearthnet_pairs(ben_root)[0].optical.shape == (3, PATCH_PX, PATCH_PX)  # RGB without nir


# --------------------------------------------------------------------------- reader errors (no real data)


def _npz(path: Path, drop: str | None = None, shape: tuple[int, int] = (PATCH_PX, PATCH_PX)) -> Path:
    bands = {b: np.zeros(shape, np.float32) for b in ("VV", "VH", "B02", "B03", "B04", "B08") if b != drop}
    np.savez(path, **bands)
    return path


def test_reader_errors_are_one_line(tmp_path):
    with pytest.raises(DataError, match="BigEarthNet folder .* not found"):
        load_bigearthnet_pairs(tmp_path / "nope")
    with pytest.raises(DataError, match="has no band B04"):
        read_npz_pair(_npz(tmp_path / "a.npz", drop="B04"))
    with pytest.raises(DataError, match=r"shape \(60, 60\), expected \(120, 120\)"):
        read_npz_pair(_npz(tmp_path / "b.npz", shape=(60, 60)))
    (tmp_path / "c.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="cannot read BigEarthNet pair"):
        read_npz_pair(tmp_path / "c.npz")
    d = tmp_path / "configilm_mock_npz"
    d.mkdir()
    (d / "pairs.csv").write_text("file,s2_name,s1_name,labels\nmissing.npz,S2X,S1X,\n")
    with pytest.raises(DataError, match="missing BigEarthNet pair file"):
        read_npz_pairs(tmp_path)
    with pytest.raises(DataError, match="GeoTIFF folder .* not found") as e:
        load_bigearthnet_pairs(tmp_path)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- metrics (no real data)


def test_oracle_embeddings_rank_their_pair_first():
    e = _unit(np.random.default_rng(0).normal(size=(60, 16)))
    m = pair_retrieval_metrics(e, e, ks=(1, 5))
    assert m["recall"] == {"1": 1.0, "5": 1.0} and m["mAP"] == 1.0 and m["median_rank"] == 1.0


def test_ranks_of_a_known_permutation_and_of_a_collapsed_embedder():
    e = _unit(np.random.default_rng(1).normal(size=(10, 32)))
    perm = np.array([0, 1, 2, 3, 4, 5, 6, 7, 9, 8])  # the last two optical patches swapped
    r = pair_ranks(e, e[perm])
    assert (r[:8] == 1).all() and (r[8:] > 1).all()
    assert pair_retrieval_metrics(e, e[perm], ks=(1,))["recall"]["1"] == pytest.approx(0.8)
    # one vector for everything: ties count against the query, so the pair ranks last
    same = np.ones((10, 4)) / 2.0
    assert (pair_ranks(same, same) == 10).all()
    c = chance_levels(60, (1, 5, 60))
    assert c["recall"] == {"1": pytest.approx(1 / 60), "5": pytest.approx(5 / 60), "60": 1.0}
    assert c["mAP"] == pytest.approx(sum(1 / k for k in range(1, 61)) / 60)


def test_model_inputs_fit_modes_and_sar_scales():
    a = np.random.default_rng(2).normal(size=(3, 2, 120, 120)).astype(np.float32)
    assert model_inputs(a, 32, "resize").shape == (3, 2, 32, 32)
    crop = model_inputs(a, 32, "crop")
    assert crop.shape == (3, 2, 32, 32)
    c = a[..., 44:76, 44:76]
    np.testing.assert_allclose(crop[0, 0].numpy(), ((c[0, 0] - c[0, 0].mean()) / (c[0, 0].std(ddof=1) + 1e-6)), atol=1e-4)
    assert model_inputs(a, 32, "native").shape == (3, 2, 120, 120)
    np.testing.assert_allclose(sar_values(np.array([-20.0, 0.0]), "amplitude"), [0.1, 1.0], rtol=1e-6)
    np.testing.assert_allclose(sar_values(np.array([-20.0, 0.0]), "intensity"), [0.01, 1.0], rtol=1e-6)


# --------------------------------------------------------------------------- 60-way on real pairs


@pytest.mark.real
def test_60_way_with_a_tiny_untrained_embedder(ben_root):
    torch.manual_seed(0)
    model = build_embedder(ModelConfig(backbone="cmpc_cnn_s", pool="grid", embed_dim=16, stem_channels=8), 2, 3).eval()
    m = evaluate_bigearthnet(model, 32, ben_root, fit="resize", ks=(1, 5, 10, 60))
    assert m["n"] == 60 and len(m["pairs"]) == 60 and m["recall"]["60"] == 1.0
    assert all(0.0 <= m["recall"][k] <= 1.0 for k in ("1", "5", "10"))
    assert m["recall"]["1"] <= m["recall"]["5"] <= m["recall"]["10"]
    assert 1 / 60 <= m["mAP"] <= 1.0 and all(1 <= r <= 60 for r in m["ranks"])
    assert m["chance"]["recall"]["1"] == pytest.approx(1 / 60) and m["settings"]["optical_bands"] == ["B04", "B03", "B02"]


@pytest.mark.real
def test_cli_eval_pairs_writes_a_report(ben_root, tmp_path, monkeypatch, capsys):
    from cmpc.cli import main
    from cmpc.models.checkpoint import embedder_payload, save_checkpoint

    torch.manual_seed(0)
    model = build_embedder(ModelConfig(backbone="cmpc_cnn_s", pool="grid", embed_dim=16, stem_channels=8), 1, 4).eval()
    save_checkpoint(tmp_path / "runs" / "ben" / "emb_best.pt", embedder_payload(model, 32))
    monkeypatch.chdir(tmp_path)
    argv = ["eval", "pairs", "--set", "name=ben", "--root", str(ben_root), "--fit", "crop", "--sar-scale", "amplitude", "--sar-bands", "VH"]
    (tmp_path / "ben.json").write_text("{}")
    assert main(argv[:2] + ["ben.json"] + argv[2:]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 60 and out["settings"]["optical_bands"] == ["B04", "B03", "B02", "B08"] and out["settings"]["sar_bands"] == ["VH"]
    saved = json.loads((tmp_path / "reports" / "ben" / "pairs_bigearthnet_crop_amplitude_vh.json").read_text())
    assert saved["recall"] == out["recall"] and len(saved["ranks"]) == 60
    # a band count the embedder cannot take is one line and exit 2
    assert main(argv[:2] + ["ben.json", "--set", "name=ben", "--root", str(ben_root), "--sar-bands", "VV", "VH"]) == 2
    assert "takes 1 SAR band(s)" in capsys.readouterr().err
