"""Tiling the real samples in ../shared/data/real (skipped with a reason when absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.warp import transform_bounds
from rasterio.windows import Window
from scipy.ndimage import gaussian_filter, sobel

from cmpc.config import load_experiment
from cmpc.data.info import dataset_summary
from cmpc.data.layout import read_annotations, safe_image_path
from cmpc.data.patches import read_patch_array
from cmpc.data.tiler import tile_dataset

REPO = Path(__file__).resolve().parents[1]
UAVSAR = "uavsar-nc/lngley_05521_09059_000_090813_L090_CX_01_pauli_x016_y020_{}.tif"

pytestmark = pytest.mark.real


def _experiment(name: str, real: Path, root: Path, sar: str, optical: str):
    exp = load_experiment(REPO / "experiments" / f"{name}.json", [f"data.root={root}"])
    exp.tile.sar, exp.tile.optical = str(real / sar), str(real / optical)  # wherever the fixture found them
    return exp


@pytest.fixture(scope="module")
def uavsar(real_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("uavsar") / "ds"
    exp = _experiment("uavsar", real_data, root, UAVSAR.format("radar"), UAVSAR.format("optique"))
    return root, tile_dataset(exp), real_data


def _edges(a: np.ndarray) -> np.ndarray:
    g = gaussian_filter(a.mean(axis=0), 1.5)
    return np.hypot(sobel(g, 0), sobel(g, 1))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum() + 1e-12))


@pytest.mark.slow
def test_uavsar_positions_are_utm_metres(uavsar):
    root, meta, real = uavsar
    assert meta["crs"] == "EPSG:32617" and meta["sources"]["optical"]["source_crs"] == "EPSG:4326"
    assert 5.5 < meta["gsd_m"] < 5.8 and meta["patch_m"] == pytest.approx(64 * meta["gsd_m"])
    with rasterio.open(real / UAVSAR.format("optique")) as src:
        minx, miny, maxx, maxy = transform_bounds(src.crs, "EPSG:32617", *src.bounds)
    # lon -78.36..-78.31, lat 34.88..34.94 -> about 2.7 deg east of the zone 17 meridian (81 W)
    assert 740_000 < minx < maxx < 747_000 and 3_863_000 < miny < maxy < 3_870_000
    for split in ("train", "test"):
        for mode in ("opt", "sar"):
            anns = read_annotations(root, split, mode)
            xy = np.array([a.position_m for a in anns])
            assert (xy[:, 0] > minx).all() and (xy[:, 0] < maxx).all()
            assert (xy[:, 1] > miny).all() and (xy[:, 1] < maxy).all()
            assert all(a.crs == "EPSG:32617" and a.file_path.endswith(".png") for a in anns)
    # west part trains, east strip tests, at least one patch (~362 m) apart
    train_maxx = max(a.bounds[2] for m in ("opt", "sar") for a in read_annotations(root, "train", m))
    test_minx = min(a.bounds[0] for m in ("opt", "sar") for a in read_annotations(root, "test", m))
    assert test_minx - train_maxx >= meta["patch_m"] - 1e-6
    s = dataset_summary(root)
    assert s["modalities"]["sar"]["bands"] == 3 and s["modalities"]["opt"]["dtype"] == "uint8"
    assert s["splits"]["test"]["opt"]["patches"] == meta["counts"]["test"]["opt"] > 100


@pytest.mark.slow
def test_uavsar_patches_are_coregistered(uavsar):
    """SAR and optical edges correlate at the aligned footprint (and not across locations),
    and the correlation peaks within 2 px of zero shift (the sample is registered to 1-2 px)."""
    root, _, _ = uavsar
    refs = {a.id: a for a in read_annotations(root, "test", "opt")}
    queries = [a for a in read_annotations(root, "test", "sar") if a.aligned][:120]
    ids = sorted(refs)
    rng = np.random.default_rng(0)
    shifts = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)]
    by_shift = {s: [] for s in shifts}
    aligned, shuffled = [], []
    for q in queries:
        es = _edges(read_patch_array(safe_image_path(root, "test", "sar", q.file_path)))
        eo = _edges(read_patch_array(safe_image_path(root, "test", "opt", refs[q.id].file_path)))
        other = _edges(read_patch_array(safe_image_path(root, "test", "opt", refs[ids[rng.integers(len(ids))]].file_path)))
        aligned.append(_corr(es, eo))
        shuffled.append(_corr(es, other))
        for dy, dx in shifts:
            by_shift[dy, dx].append(_corr(es[8 + dy : 56 + dy, 8 + dx : 56 + dx], eo[8:56, 8:56]))
    assert np.mean(aligned) > 0.3 and abs(np.mean(shuffled)) < 0.1
    mean = {s: np.mean(v) for s, v in by_shift.items()}
    best = max(mean, key=mean.get)
    assert max(abs(best[0]), abs(best[1])) <= 2, best
    assert mean[0, 0] > mean[4, 0] + 0.05 and mean[0, 0] > mean[0, 4] + 0.05


@pytest.mark.slow
def test_s1s2_float_bands_become_geotiff_patches(real_data, tmp_path):
    root = tmp_path / "ds"
    exp = _experiment("s1s2", real_data, root, "s1s2-gefolki/S1_patch11.tif", "s1s2-gefolki/S2_patch11.tif")
    meta = tile_dataset(exp)
    assert meta["crs"] == "EPSG:32631" and meta["gsd_m"] == 10.0 and meta["patch_m"] == 320.0
    assert meta["modalities"]["sar"] == {
        "bands": [1, 2], "band_descriptions": [None, None], "channels": 2,
        "dtype": "float32", "source_dtype": "float32", "format": "tif",
    }
    assert meta["modalities"]["opt"]["channels"] == 3 and meta["modalities"]["opt"]["format"] == "tif"
    # 448 px: test strip 134 px (7 grid cols), train 448-134-32 = 282 px (16 cols); 27 rows
    assert meta["counts"]["train"]["opt"] + meta["skipped_nodata"]["references"] >= 16 * 27
    assert meta["counts"]["test"]["opt"] <= 7 * 27
    sar_src = rasterio.open(real_data / "s1s2-gefolki/S1_patch11.tif")
    with sar_src:
        for split in ("train", "test"):
            for q in read_annotations(root, split, "sar")[::37]:
                assert 399_940 <= q.bounds[0] < q.bounds[2] <= 404_420 and 5_095_540 <= q.bounds[1] < q.bounds[3] <= 5_100_020
                with rasterio.open(safe_image_path(root, split, "sar", q.file_path)) as p:
                    assert p.count == 2 and p.dtypes[0] == "float32" and tuple(p.bounds) == q.bounds
                    patch = p.read()
                # same grid: the patch is exactly the source window, no resampling
                col, row = (q.bounds[0] - 399_940) / 10, (5_100_020 - q.bounds[3]) / 10
                np.testing.assert_array_equal(patch, sar_src.read(window=Window(col, row, 32, 32)))
