"""experiments/sentinel/coregistration.py: mutual-information shift between a SAR and an
optical raster, on a hand-made pair with a known shift and a non-linear intensity relation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, shift as nd_shift

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("coregistration", ROOT / "experiments/sentinel/coregistration.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("dx,dy", [(2.0, -1.0), (-3.5, 2.5)])
def test_mi_shift_recovers_a_known_shift(dx: float, dy: float) -> None:
    co = _module()
    rng = np.random.default_rng(0)
    opt = gaussian_filter(rng.normal(size=(256, 256)), 3.0)
    opt = (opt - opt.min()) / (opt.max() - opt.min()) * 250 + 1
    # SAR content that the optical shows at p lies at p + (dx, dy); a non-monotone response
    sar = nd_shift(opt, (dy, dx), order=3, mode="nearest")
    sar = np.abs(np.sin(sar / 40.0)) * 254 + 1 + rng.normal(0, 5, sar.shape)
    sar = np.clip(sar, 1, 255)
    s = co.mi_shift(sar.astype(np.float32), opt.astype(np.float32), search=5, step=1)
    assert s["col"] == pytest.approx(dx, abs=0.35) and s["row"] == pytest.approx(dy, abs=0.35)
    assert not s["at_edge"] and s["contrast"] > 0.05
    # mutual information itself: independent values share (almost) none
    a, b = rng.integers(0, 255, 20000), rng.integers(0, 255, 20000)
    assert co.mutual_information(a, b) < 0.1 < co.mutual_information(a, a)


def test_scene_truth_finds_a_scenes_content_offset_and_scores_against_it(tmp_path: Path) -> None:
    """experiments/sentinel/scene_truth.py: an optical file in UTM, a scene whose SAR content
    lies 3 px east and 2 px north of its grid place; the content offset comes back in metres
    with the right signs, and an answer placed on the content scores within 25 m of it (and
    not of the grid)."""
    import csv
    import json
    import sys

    import rasterio
    from rasterio.transform import from_origin

    sys.path.insert(0, str(ROOT / "experiments/sentinel"))
    try:
        spec = importlib.util.spec_from_file_location("scene_truth", ROOT / "experiments/sentinel/scene_truth.py")
        st = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(st)
    finally:
        sys.path.remove(str(ROOT / "experiments/sentinel"))
    rng = np.random.default_rng(1)
    gsd, x0, y0, n = 10.0, 400000.0, 3750000.0, 200
    opt = gaussian_filter(rng.normal(size=(n, n)), 2.5)
    opt = (opt - opt.min()) / (opt.max() - opt.min()) * 250 + 1
    path = tmp_path / "001_optical.tif"
    with rasterio.open(path, "w", driver="GTiff", width=n, height=n, count=3, dtype="uint8", crs="EPSG:32611",
                       transform=from_origin(x0, y0, gsd, gsd), nodata=0) as f:
        f.write(np.repeat(np.round(opt)[None].astype(np.uint8), 3, axis=0))
    # the scene's grid starts 40 px in; its SAR shows what lies 3 px west / 2 px south of each
    # pixel, i.e. the content sits 3 px east and 2 px north of where the grid puts it
    r0 = c0 = 40
    side = 96
    src = nd_shift(opt, (2.0, -3.0), order=3, mode="nearest")  # src[p] = opt[p - (2, -3)] (row, col)
    sar = np.abs(np.sin(src[r0:r0 + side, c0:c0 + side] / 40.0)) * 254 + 1
    scene = tmp_path / "scene_0000.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=side, height=side, count=1, dtype="uint8") as f:
        f.write(np.clip(np.round(sar), 1, 255).astype(np.uint8)[None])
    truth = {"scene": scene.name, "gsd_m": gsd, "heading_deg": 0.0, "crs": "EPSG:32611",
             "transform": [gsd, 0.0, x0 + c0 * gsd, 0.0, -gsd, y0 - r0 * gsd]}
    pairs = [(path, (x0, y0 - n * gsd, x0 + n * gsd, y0))]
    rec = st.scene_shift(scene, truth, pairs, search=5)
    assert rec["content_dx_m"] == pytest.approx(30.0, abs=4.0) and rec["content_dy_m"] == pytest.approx(20.0, abs=4.0)
    # scoring: one answer on the content (36 m from the grid truth), one on the grid
    report = tmp_path / "report"
    report.mkdir()
    with open(report / "scenes.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["method", "status", "dx_m", "dy_m", "scene"])
        w.writeheader()
        w.writerow({"method": "on_content", "status": "found", "dx_m": 30.0, "dy_m": 20.0, "scene": scene.name})
        w.writerow({"method": "on_grid", "status": "found", "dx_m": 0.0, "dy_m": 0.0, "scene": scene.name})
    rows = {r["method"]: r for r in st.score(report, {scene.name: rec})}
    assert rows["on_content"]["within_25m_vs_content"] == 1.0 and rows["on_content"]["within_25m_vs_grid"] == 0.0
    assert rows["on_grid"]["within_25m_vs_content"] == 0.0 and rows["on_grid"]["within_25m_vs_grid"] == 1.0
    json.dumps(rows)  # plain values, as the summary file holds
