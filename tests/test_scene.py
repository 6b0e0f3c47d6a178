"""Scene localization: transform estimation, tiling, the georef command, bad inputs.

Fast tests build correspondences and images by hand, so the expected transform is known.
The end-to-end test (marked slow) builds the smoke world in a temporary copy of the
project, cuts scenes from its test strip and runs ``cmpc georef`` / ``cmpc eval scenes``
in subprocesses.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from cmpc.localize.verify import (
    Correspondences,
    RansacSettings,
    SceneTransform,
    angle_diff_deg,
    estimate_scene_transform,
    warp_to_grid,
)


def _grid_centres(n: int, stride: float = 64.0) -> np.ndarray:
    return np.array([[stride * (i + 1), stride * (j + 1)] for j in range(n) for i in range(n)], dtype=np.float64)


def _correspondences(truth: SceneTransform, n: int, k: int, right_frac: float, noise_m: float, seed: int) -> Correspondences:
    """n x n tiles with k candidates each; ``right_frac`` of the tiles have their true
    position (plus uniform noise) at a random rank < 3, every other candidate is random
    over a 4 km x 4 km map."""
    rng = np.random.default_rng(seed)
    cs = _grid_centres(n)
    pts, tiles, ranks = [], [], []
    right_tiles = rng.permutation(len(cs))[: int(round(right_frac * len(cs)))]
    for t, c in enumerate(cs):
        xy = truth.apply(c[None])[0]
        right = int(rng.integers(0, 3)) if t in right_tiles else -1
        for r in range(k):
            pts.append(xy + rng.uniform(-noise_m, noise_m, 2) if r == right else rng.uniform([3000, 7000], [7000, 11000]))
            tiles.append(t)
            ranks.append(r)
    m = len(tiles)
    return Correspondences(np.repeat(cs, k, axis=0), np.array(pts), np.array(tiles), np.array(ranks), np.zeros(m, np.float32), np.zeros(m))


def test_scene_transform_convention() -> None:
    # heading 90: the scene's up points east, its right points south
    t = SceneTransform.from_params(2.0, 90.0, 100.0, 200.0)
    up = t.apply(np.array([[0.0, -1.0]]))[0] - t.apply(np.array([[0.0, 0.0]]))[0]
    right = t.apply(np.array([[1.0, 0.0]]))[0] - t.apply(np.array([[0.0, 0.0]]))[0]
    assert np.allclose(up, [2.0, 0.0]) and np.allclose(right, [0.0, -2.0])
    assert t.heading_deg == pytest.approx(90.0) and t.scale == pytest.approx(2.0)
    pts = np.array([[3.0, 4.0], [10.0, -2.0]])
    assert np.allclose(t.inverse(t.apply(pts)), pts)
    north_up = SceneTransform.from_params(1.0, 0.0, 500.0, 900.0)
    assert north_up.affine == pytest.approx((1.0, 0.0, 500.0, 0.0, -1.0, 900.0))
    assert float(angle_diff_deg(179.0, -179.0)) == pytest.approx(-2.0)


def test_ransac_exact_with_half_outliers_rotation_and_scale() -> None:
    # exact positions for half the tiles: the transform is recovered to numerical precision
    truth = SceneTransform.from_params(1.03, 12.0, 5000.0, 9000.0)
    corr = _correspondences(truth, 4, 8, 0.5, 0.0, seed=1)
    res = estimate_scene_transform(corr, RansacSettings(gsd_m=1.0, scale_tol=0.05, heading_range_deg=20.0))
    assert res.transform is not None
    assert res.inlier_tiles == 8 and res.n_tiles == 16 and res.inlier_frac == pytest.approx(0.5)
    assert np.allclose(res.transform.affine, truth.affine, atol=1e-6)
    assert res.transform.scale == pytest.approx(1.03, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ransac_noisy_grid_positions(seed: int) -> None:
    # candidates are reference centres on a 64 m grid: up to 32 m off the tile centre
    truth = SceneTransform.from_params(1.03, -9.0, 5000.0, 9000.0)
    corr = _correspondences(truth, 4, 20, 0.5, 32.0, seed=seed)
    res = estimate_scene_transform(corr, RansacSettings(gsd_m=1.0, scale_tol=0.05, heading_range_deg=15.0, seed=seed))
    assert res.transform is not None and res.inlier_tiles >= 7
    err = np.linalg.norm(res.transform.centre(320, 320) - truth.centre(320, 320))
    assert err < 35.0  # coarse: fine alignment brings it to metres
    assert abs(float(angle_diff_deg(res.transform.heading_deg, -9.0))) < 6.0
    assert abs(res.transform.scale / 1.03 - 1.0) <= 0.06


def test_ransac_bounds_refuse_wrong_scale_and_heading() -> None:
    # a consistent scene at twice the nominal GSD, or rotated by 40 degrees outside a +-10
    # range, is not accepted as a whole (neighbouring tiles alone cannot tell scale or
    # heading within the residual: a 2x2 block may still agree)
    corr = _correspondences(SceneTransform.from_params(2.0, 0.0, 5000.0, 9000.0), 4, 1, 1.0, 0.0, seed=0)
    res = estimate_scene_transform(corr, RansacSettings(gsd_m=1.0, scale_tol=0.05, heading_range_deg=3.0))
    assert res.transform is None or res.inlier_frac <= 0.3
    corr = _correspondences(SceneTransform.from_params(1.0, 40.0, 5000.0, 9000.0), 4, 1, 1.0, 0.0, seed=0)
    res = estimate_scene_transform(corr, RansacSettings(gsd_m=1.0, heading_deg=0.0, heading_range_deg=10.0))
    assert res.transform is None or res.inlier_frac <= 0.5
    assert estimate_scene_transform(corr.subset(np.array([0])), RansacSettings(gsd_m=1.0)).transform is None


def test_warp_to_grid_places_scene_pixels() -> None:
    # a scene with one bright pixel, rotated 30 degrees: the bright spot lands where the
    # transform puts that pixel on the map grid
    img = np.zeros((1, 40, 40), np.float32)
    img[0, 10:12, 30:32] = 1.0
    t = SceneTransform.from_params(1.0, 30.0, 1000.0, 2000.0)
    x, y = t.apply(np.array([[31.0, 11.0]]))[0]
    out, valid = warp_to_grid(img, np.ones((40, 40), bool), t, 950.0, 2050.0, 1.0, 0, 0, 120, 120)
    r, c = np.unravel_index(np.argmax(out[0]), out[0].shape)
    assert math.hypot((950.0 + c + 0.5) - x, (2050.0 - r - 0.5) - y) < 1.5
    assert 0.9 * 1600 < valid.sum() < 1.1 * 1600
