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


class _TextureDescriptor:
    """A stand-in for the dense descriptor (same interface): fixed random 7x7 filters, stride
    4, unit vectors. SAR and optical are the same image here, so places agree by design."""

    dim = 8
    sar_channels = optical_channels = 1

    def eval(self) -> _TextureDescriptor:
        return self

    def __call__(self, x, mode):  # noqa: ANN001, ANN204
        import torch
        import torch.nn.functional as F

        w = torch.randn(8, x.shape[1], 7, 7, generator=torch.Generator().manual_seed(0))
        return F.normalize(F.avg_pool2d(F.conv2d(x, w, padding=3), 4, 4, ceil_mode=True), dim=1)


def _textured_map(side: int, seed: int):  # noqa: ANN202 - (image (1, side, side), FeatureMosaic, ox, oy)
    """A smooth random texture as a 1 m map whose NW corner is (1000, 5000), described by _TextureDescriptor."""
    from scipy.ndimage import gaussian_filter

    from cmpc.localize.align import build_feature_mosaic

    img = gaussian_filter(np.random.default_rng(seed).normal(size=(side, side)), 3).astype(np.float32)[None]
    img = (img - img.mean()) / img.std()
    ox, oy = 1000.0, 5000.0
    return img, build_feature_mosaic(_TextureDescriptor(), img, np.ones((side, side), bool), ox, oy, 1.0, tile_px=128, margin_px=16), ox, oy


def _scene_from_map(img: np.ndarray, ox: float, oy: float, truth: SceneTransform, px: int = 160) -> np.ndarray:
    """The map sampled on the scene grid that ``truth`` places (bilinear): (1, px, px) float32."""
    from scipy.ndimage import map_coordinates

    cols, rows = np.meshgrid(np.arange(px) + 0.5, np.arange(px) + 0.5)
    xy = truth.apply(np.stack([cols.ravel(), rows.ravel()], 1))
    return map_coordinates(img[0], [(oy - xy[:, 1]) - 0.5, (xy[:, 0] - ox) - 0.5], order=1).reshape(1, px, px).astype(np.float32)


def _placed(heading: float, cx: float, cy: float, px: int = 160) -> SceneTransform:
    """A 1 m/px scene of ``px`` x ``px`` at ``heading`` degrees whose centre lies at (cx, cy)."""
    t = SceneTransform.from_params(1.0, heading, 0.0, 0.0)
    c = t.centre(px, px)
    return t.shifted(cx - c[0], cy - c[1])


def test_fine_alignment_recovers_offset_and_heading() -> None:
    # a textured map; the scene is the map sampled on a grid rotated by 8 degrees; the
    # estimate is 15 m and 2 degrees off: dense alignment + per-tile refit bring it to < 1 m
    from cmpc.localize.verify import fine_align_scene

    img, fm, ox, oy = _textured_map(400, 0)


    truth = _placed(8.0, 1200.0, 4800.0)
    scene = _scene_from_map(img, ox, oy, truth)
    centres = np.array([[40.0 + 40 * i, 40.0 + 40 * j] for j in range(3) for i in range(3)])
    fr = fine_align_scene(_TextureDescriptor(), fm, scene, np.ones((160, 160), bool), _placed(6.0, 1212.0, 4791.0), centres, 64.0,
                          max_shift_m=48.0, tile_shift_m=16.0, tile_residual_m=3.0)
    assert fr.refit and fr.tile_inlier.sum() >= 7 and fr.peak > 0.5
    assert np.linalg.norm(fr.transform.centre(160, 160) - truth.centre(160, 160)) < 1.0
    assert abs(fr.transform.heading_deg - 8.0) < 0.5 and abs(fr.transform.scale - 1.0) < 0.01


def test_cfog_polish_moves_a_placement_onto_the_content() -> None:
    # the scene is a speckled, squared "SAR" rendering of the textured map; placed 12 m east
    # and 7 m south of where its content lies, the CFOG polish finds the content's place to
    # under a metre, keeps heading and scale, and refuses an offset beyond its search radius
    from cmpc.localize.align import build_feature_mosaic
    from cmpc.localize.verify import fine_align_scene, polish_translation
    from cmpc.models.cfog import CfogDescriptor

    img, _, ox, oy = _textured_map(400, 1)
    cfog = CfogDescriptor(None, None, sigma=1.5, sar_sigma=1.0)
    fm = build_feature_mosaic(cfog, img, np.ones((400, 400), bool), ox, oy, 1.0)
    assert fm.stride == 1


    truth = _placed(5.0, 1200.0, 4800.0)
    clean = _scene_from_map(img, ox, oy, truth)
    speckle = np.random.default_rng(2).gamma(4.0, 0.25, size=clean.shape).astype(np.float32)
    scene = (clean**2 + 0.3) * speckle  # another sensor: brightness differs, the layout of edges does not
    valid = np.ones((160, 160), bool)
    pr = polish_translation(cfog, fm, scene, valid, _placed(5.0, 1212.0, 4793.0), max_shift_m=30.0)
    assert pr.used and pr.why is None and pr.peak > 0.2
    assert np.linalg.norm(pr.transform.centre(160, 160) - truth.centre(160, 160)) < 1.0
    assert abs(pr.shift_m[0] + 12.0) < 1.0 and abs(pr.shift_m[1] - 7.0) < 1.0
    assert abs(pr.transform.heading_deg - 5.0) < 1e-6 and abs(pr.transform.scale - 1.0) < 1e-9
    # the per-tile refit of scene_polish=cfog_refit (fine alignment on zncc scores): a placement
    # 1.5 degrees off (tiles up to 2 m off at this scene's corners) gets its heading back
    centres = np.array([[40.0 + 40 * i, 40.0 + 40 * j] for j in range(3) for i in range(3)])
    fr = fine_align_scene(cfog, fm, scene, valid, _placed(3.5, 1200.0, 4800.0), centres, 64.0, max_shift_m=2.0, tile_shift_m=10.0,
                          min_tile_peak=0.1, tile_residual_m=2.0, score="zncc")
    assert fr.refit and fr.tile_inlier.sum() >= 7 and abs(fr.transform.heading_deg - 5.0) < 0.3
    assert np.linalg.norm(fr.transform.centre(160, 160) - truth.centre(160, 160)) < 1.0
    for off, why in ((34.0, "border"), (45.0, "under")):  # searched within 30 m: the content lies beyond
        far = _placed(5.0, 1200.0 + off, 4800.0)
        pr = polish_translation(cfog, fm, scene, valid, far, max_shift_m=30.0, min_peak=0.1)
        assert not pr.used and why in pr.why and pr.transform == far and pr.shift_m == (0.0, 0.0), (off, pr.why)


# --------------------------------------------------------------------------- scenes: reading, tiling, bad input


def _plain_tiff(path, arr: np.ndarray, nodata: float | None = None) -> None:
    import warnings

    import rasterio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path, "w", driver="GTiff", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0], dtype="float32", nodata=nodata) as f:
            f.write(arr.astype(np.float32))


def test_read_scene_bad_inputs(tmp_path) -> None:
    from cmpc.errors import DataError
    from cmpc.localize.scene import read_scene

    rng = np.random.default_rng(0)
    ok = tmp_path / "ok.tif"
    _plain_tiff(ok, rng.normal(size=(1, 50, 60)))
    s = read_scene(ok, gsd_m=2.0)
    assert (s.width, s.height, s.gsd_m, s.georef) == (60, 50, 2.0, None) and s.valid.all()
    with pytest.raises(DataError, match="--gsd"):
        read_scene(ok)  # no georeferencing and no --gsd
    const = tmp_path / "const.tif"
    _plain_tiff(const, np.full((1, 40, 40), 7.0))
    with pytest.raises(DataError, match="constant"):
        read_scene(const, gsd_m=1.0)
    empty = tmp_path / "nodata.tif"
    _plain_tiff(empty, np.full((1, 40, 40), -9999.0), nodata=-9999.0)
    with pytest.raises(DataError, match="no valid pixel"):
        read_scene(empty, gsd_m=1.0)
    with pytest.raises(DataError, match="not found"):
        read_scene(tmp_path / "missing.tif", gsd_m=1.0)
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff at all")
    with pytest.raises(DataError):
        read_scene(bad, gsd_m=1.0)


def test_settings_and_tiling(tmp_path) -> None:
    from cmpc.errors import ConfigError, DataError
    from cmpc.localize.scene import SceneImage, SceneSettings, scene_grid_centres, tile_scene

    with pytest.raises(ConfigError, match="rotation-range"):
        SceneSettings(rotation_range_deg=200.0).check()
    assert SceneSettings().headings() == [0.0]
    assert SceneSettings(rotation_range_deg=12.0, rotation_step_deg=5.0).headings() == [-12.0, -10.0, -5.0, 0.0, 5.0, 10.0, 12.0]
    rng = np.random.default_rng(0)
    # a 3x3-tile scene: tiles of 32 m at 16 m stride -> 64 m side; GSD 2 m on a 1 m map
    img = rng.normal(size=(1, 32, 32)).astype(np.float32)
    scene = SceneImage(img, np.ones((32, 32), bool), 2.0, tmp_path / "s.tif")
    tiles = tile_scene(scene, 32.0, 16.0, 1.0, 16, [0.0], 0.8)
    assert len(tiles) == 9 and tiles.x.shape == (9, 1, 16, 16)
    assert np.allclose(np.sort(np.unique(tiles.centre_px[:, 0])), [8.0, 16.0, 24.0])
    assert np.allclose(scene_grid_centres(scene, 32.0, 16.0)[:3, 0], [8.0, 16.0, 24.0])
    rot = tile_scene(scene, 32.0, 16.0, 1.0, 16, [0.0, 15.0], 0.8)
    assert set(rot.per_heading) == {0.0, 15.0} and 0 < len(rot.per_heading[15.0]) <= 9
    small = SceneImage(img[:, :10, :10], np.ones((10, 10), bool), 2.0, tmp_path / "small.tif")
    with pytest.raises(DataError, match="smaller than one reference tile"):
        tile_scene(small, 32.0, 16.0, 1.0, 16, [0.0])


# --------------------------------------------------------------------------- end to end (slow)


@pytest.mark.slow
def test_georef_end_to_end_on_smoke_world(smoke_demo) -> None:
    import json
    import os
    import subprocess
    import sys

    tmp_path = smoke_demo  # `cmpc demo experiments/smoke.json` ran there (fixture)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CMPC_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cmpc", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)

    exp = "experiments/smoke.json"
    r = run("data", "scenes", exp, "--split", "test", "--tiles", "2", "--count", "3", "--seed", "0", "--out", "scenes")
    assert r.returncode == 0, r.stderr[-2000:]
    truth = json.loads((tmp_path / "scenes" / "scene_0000.truth.json").read_text())
    import warnings

    import rasterio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NotGeoreferencedWarning: that is the point
        with rasterio.open(tmp_path / "scenes" / "scene_0000.tif") as f:  # written without georeferencing
            assert f.crs is None and f.transform.is_identity
    r = run("georef", exp, "--scene", "scenes/scene_0000.tif", "--gsd", str(truth["gsd_m"]), "--out", "answer")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "answer" / "result.json").read_text())
    for name in ("tiles.csv", "footprint.geojson", "scene_on_map.tif", "overlay.png"):
        assert (tmp_path / "answer" / name).stat().st_size > 0, name
    assert len(res["transform"]) == 6 and res["tiles"] >= 1
    err = math.hypot(res["center_x"] - truth["center_xy"][0], res["center_y"] - truth["center_xy"][1])
    # within a few metres, or an honest not_found (the smoke model is 3 epochs old)
    assert (res["status"] == "found" and err < 10.0) or (res["status"] == "not_found" and res["reason"] and "not found" in r.stderr)
    with rasterio.open(tmp_path / "answer" / "scene_on_map.tif") as f:
        assert f.crs is not None and abs(f.transform.a - 2.0) < 1e-9
    # the CFOG polish re-measures the decided placement's translation; the decision is the same
    r = run("georef", exp, "--scene", "scenes/scene_0000.tif", "--gsd", str(truth["gsd_m"]), "--set", "refine.scene_polish=cfog_refit",
            "--set", "refine.scene_polish_m=20", "--out", "polished")
    assert r.returncode == 0, r.stderr[-2000:]
    pol = json.loads((tmp_path / "polished" / "result.json").read_text())
    if res["status"] == "found":
        assert pol["status"] == "found" and pol["inliers"] == res["inliers"] and pol["confidence"] == res["confidence"]
        p = pol["polish"]
        assert p["descriptor"] == "cfog" and p["radius_m"] == 20.0 and p["min_peak"] == 0.1
        moved = math.hypot(pol["center_x"] - res["center_x"], pol["center_y"] - res["center_y"])
        if not p["used"]:
            assert moved == 0.0 and p["why"] and "refit" not in p
        elif not p["refit"]["used"]:  # the translation alone
            assert abs(moved - math.hypot(*p["shift_m"])) < 1e-6
        assert moved < 2 * 20.0
        assert math.hypot(pol["center_x"] - truth["center_xy"][0], pol["center_y"] - truth["center_xy"][1]) < 10.0
    # the evaluation over the cut folder writes its table
    r = run("eval", "scenes", exp, "--scenes", "scenes", "--out", "table")
    assert r.returncode == 0, r.stderr[-2000:]
    table = json.loads((tmp_path / "table" / "rows.json").read_text())
    rows = table["rows"]
    assert [row["method"] for row in rows] == ["independent", "verify"] and rows[0]["n_scenes"] == 3
    assert table["meta"]["torch_threads"] >= 1  # its seconds per scene are read with it
    # deciding the same answers again under another decision equals answering them again under it
    (tmp_path / "dec").mkdir()
    lenient = {"min_inliers": 1, "min_inlier_frac": 0.0, "min_fine_peak": -1.0}
    (tmp_path / "dec" / "scene_decision.json").write_text(json.dumps(lenient))  # no min_scene_tiles: reference-stride tiling
    r = run("eval", "scenes", exp, "--redecide", "table", "--scene-model", "dec", "--out", "re")
    assert r.returncode == 2 and "spacing" in r.stderr and not (tmp_path / "re").exists()  # the table tiled 2x2 scenes densely
    (tmp_path / "dec" / "scene_decision.json").write_text(json.dumps({**lenient, "min_scene_tiles": 64}))  # a file from before the dense search
    r = run("eval", "scenes", exp, "--redecide", "table", "--scene-model", "dec", "--out", "re")
    assert r.returncode == 2 and "dense_search" in r.stderr and not (tmp_path / "re").exists()  # the table searched the whole map densely
    (tmp_path / "dec" / "scene_decision.json").write_text(json.dumps({**lenient, "min_scene_tiles": 64, "dense_search": 3}))
    r = run("eval", "scenes", exp, "--redecide", "table", "--scene-model", "dec", "--rotation-range", "10", "--out", "re")
    assert r.returncode == 2 and "--rotation-range" in r.stderr and not (tmp_path / "re").exists()  # other hypotheses, other evidence
    r = run("eval", "scenes", exp, "--redecide", "table", "--scene-model", "dec", "--out", "re")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("eval", "scenes", exp, "--scenes", "scenes", "--scene-model", "dec", "--out", "full")
    assert r.returncode == 0, r.stderr[-2000:]
    re_, full = (json.loads((tmp_path / d / "rows.json").read_text()) for d in ("re", "full"))
    keys = ("method", "status", "inliers", "tiles", "confidence", "centre_m")
    assert [[p[k] for k in keys] for p in re_["per_scene"]] == [[p[k] for k in keys] for p in full["per_scene"]]
    assert [{k: v for k, v in x.items() if k != "s_per_scene"} for x in re_["rows"]] == \
        [{k: v for k, v in x.items() if k != "s_per_scene"} for x in full["rows"]]
    assert any(p["status"] == "found" for p in full["per_scene"] if p["method"] == "verify")  # the lenient rule claims
    # bad inputs: one line on stderr, exit 2, nothing written
    _plain_tiff(tmp_path / "tiny.tif", np.random.default_rng(0).normal(size=(1, 8, 8)))
    for args, words in (
        (("--scene", "tiny.tif", "--gsd", "2"), "smaller than one reference tile"),
        (("--scene", "scenes/scene_0001.tif", "--gsd", "20"), "GSD"),
        (("--scene", "scenes/scene_0001.tif"), "--gsd"),
        (("--scene", "scenes/scene_0001.tif", "--gsd", "2", "--rotation-range", "400"), "rotation-range"),
        (("--scene", "scenes/scene_0001.tif", "--gsd", "2", "--center", "0", "0", "--radius", "100"), "prior"),
        (("--scene", "scenes/scene_0001.tif", "--gsd", "2", "--center", "0", "0"), "--radius"),
        (("--scene", "scenes/scene_0001.tif", "--gsd", "2", "--scene-model", "nowhere"), "--scene-model"),
        (("--scene", "scenes/scene_0001.tif", "--gsd", "2", "--index", "nowhere"), "nowhere"),
    ):
        r = run("georef", exp, *args, "--out", "bad")
        assert r.returncode == 2, (args, r.stderr[-500:])
        assert r.stderr.strip().count("\n") == 0 and words in r.stderr, (args, r.stderr)
        assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------- offset voting, screening


@pytest.mark.parametrize("heading", [0.0, 10.0])
def test_vote_placements_finds_a_few_agreeing_tiles_among_many_wrong(heading: float) -> None:
    # 8 x 8 tiles, 20 candidates each, only 10 of 64 tiles have their right candidate (within
    # half a 64 m stride, at a random rank < 3): the vote's best block is that placement
    from cmpc.localize.verify import vote_placements

    truth = SceneTransform.from_params(1.0, heading, 5000.0, 9000.0)
    corr = _correspondences(truth, 8, 20, 10 / 64, 32.0, seed=3)
    corr.heading_deg = np.full(len(corr), heading)
    votes = vote_placements(corr, 1.0, 64.0, top_n=5)
    tiles, _, best = votes[0]
    assert tiles >= 9  # the right tiles (over 1,280 random candidates the best random block gathers ~5)
    assert all(v[0] <= 6 for v in votes[1:])
    assert np.linalg.norm(best.centre(576, 576) - truth.centre(576, 576)) < 20.0
    assert best.heading_deg == pytest.approx(heading) and best.scale == pytest.approx(1.0)
    # a placement needs min_tiles distinct tiles; nothing to vote on gives nothing
    assert vote_placements(corr.subset(np.array([0])), 1.0, 64.0) == []
    assert vote_placements(corr.subset(np.array([], dtype=np.int64)), 1.0, 64.0) == []


def test_screen_placements_ranks_the_true_placement_first() -> None:
    # one descriptor pass per heading, one correlation per placement: the placement 20 m
    # off the truth scores like the exact alignment; 300 m off or 9 degrees off score low
    from cmpc.localize.verify import fine_align_scene, screen_placements

    img, fm, ox, oy = _textured_map(600, 1)
    truth = SceneTransform.from_params(1.0, 0.0, 1150.0, 4850.0)
    scene = _scene_from_map(img, ox, oy, truth)
    valid = np.ones((160, 160), bool)
    hyps = [truth.shifted(300.0, -250.0), truth.shifted(20.0, -13.0), SceneTransform.from_params(1.0, 9.0, 1150.0, 4850.0), truth.shifted(-190.0, 0.0)]
    peaks = screen_placements(_TextureDescriptor(), fm, scene, valid, hyps, max_shift_m=48.0)
    assert int(np.argmax(peaks)) == 1
    assert peaks[1] > 0.8 and max(peaks[0], peaks[2], peaks[3]) < 0.5
    exact = fine_align_scene(_TextureDescriptor(), fm, scene, valid, hyps[1], np.array([[80.0, 80.0]]), 64.0, max_shift_m=48.0)
    # the screen measures what the exact alignment measures, a little lower (sub-cell phase of a shared warp)
    assert exact.peak - 0.15 <= peaks[1] <= exact.peak + 0.02
    assert np.linalg.norm(exact.transform.centre(160, 160) - truth.centre(160, 160)) < 1.0


def test_area_boxes_and_misregistration_truth(tmp_path) -> None:
    # area files: a list, a mosaic.json (one box per world, with its SAR shift), a dataset.json
    import json

    from cmpc.data.scenes import load_box_shifts, load_boxes
    from cmpc.errors import DataError

    (tmp_path / "list.json").write_text(json.dumps([[0, 0, 10, 10]]))
    assert load_boxes(tmp_path / "list.json") == [[0.0, 0.0, 10.0, 10.0]] and load_box_shifts(tmp_path / "list.json") is None
    mosaic = {"worlds": [{"seed": 1, "box_m": [0, 0, 5, 5], "sar_shift_m": [0.5, -0.25]}, {"seed": 2, "box_m": [5, 0, 10, 5], "sar_shift_m": [0, 1]}]}
    (tmp_path / "mosaic.json").write_text(json.dumps(mosaic))
    assert load_boxes(tmp_path / "mosaic.json") == [[0.0, 0.0, 5.0, 5.0], [5.0, 0.0, 10.0, 5.0]]
    assert load_box_shifts(tmp_path / "mosaic.json") == [(0.5, -0.25), (0.0, 1.0)]
    (tmp_path / "dataset.json").write_text(json.dumps({"areas": {"test": {"boxes": [[1, 2, 3, 4]]}}}))
    assert load_boxes(tmp_path / "dataset.json", "test") == [[1.0, 2.0, 3.0, 4.0]]
    for bad in ([[0, 0, -1, 5]], {"areas": {}}, [1, 2, 3, 4], "x"):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(DataError, match="holds no area boxes"):
            load_boxes(tmp_path / "bad.json", "test")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(DataError, match="cannot read area boxes"):
        load_boxes(tmp_path / "broken.json")


def test_cut_scenes_truth_is_where_the_content_lies(tmp_path) -> None:
    # a world whose SAR is misregistered by (+2, -1) m: the truth is the content's place
    import json

    import rasterio
    from affine import Affine

    from cmpc.data.scenes import cut_scenes

    X, Y = 500_000.0, 5_000_000.0  # EPSG:32631 metres near the central meridian
    root = tmp_path / "ds"
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps({"patch_m": 16.0, "crs": "EPSG:32631", "areas": {"test": {"boxes": [[X, Y, X + 64, Y + 64]]}}}))
    with rasterio.open(tmp_path / "sar.tif", "w", driver="GTiff", width=64, height=64, count=1, dtype="float32", crs="EPSG:32631",
                       transform=Affine(1.0, 0, X, 0, -1.0, Y + 64.0)) as f:
        f.write(np.random.default_rng(0).normal(size=(1, 64, 64)).astype(np.float32))
    rec = cut_scenes(tmp_path / "sar.tif", root, tmp_path / "s", "test", 2, 3, 0.0, seed=0, boxes=[[X, Y, X + 64, Y + 64]], box_shifts=[(2.0, -1.0)])
    for s in rec["scenes"]:
        t = json.loads((tmp_path / "s" / f"{s['name']}.truth.json").read_text())
        assert t["center_xy"] == pytest.approx([t["raster_center_xy"][0] - 2.0, t["raster_center_xy"][1] + 1.0])
        assert t["transform"][2] == pytest.approx(t["raster_center_xy"][0] - 2.0 - 12.0)  # side (2+1)/2 * 16 = 24 m


def test_scene_commands_refuse_incomplete_flags() -> None:
    # one line, exit 2: --model needs an index; a calibration map needs its SAR, boxes and index together
    import subprocess
    import sys

    def run(*a: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cmpc", *a], capture_output=True, text=True, timeout=120)

    for args, words in (
        (("georef", "--model", "sentinel", "--scene", "x.tif"), "needs --index"),
        (("eval", "scenes", "--model", "sentinel", "--scenes", "x"), "needs --index"),
        (("georef", "--scene", "x.tif"), "experiment file or --model"),
        (("train", "scene", "experiments/demo.json", "--sar", "x.tif"), "go together"),
        (("train", "scene", "experiments/demo.json", "--index", "x", "--areas", "a.json"), "go together"),
        (("train", "scene", "experiments/demo.json", "--min-tiles", "0"), "go with --keep-gnn or --no-gnn"),
        (("train", "scene", "experiments/demo.json", "--no-gnn", "--max-dense-tiles", "-1"), ">= 0"),
        (("train", "scene", "experiments/demo.json", "--no-gnn", "--keep-gnn"), "contradict"),
        (("eval", "scenes", "experiments/demo.json"), "--scenes FOLDER"),
    ):
        r = run(*args)
        assert r.returncode == 2, (args, r.stderr[-500:])
        assert r.stderr.strip().count("\n") == 0 and words in r.stderr, (args, r.stderr)


def test_dense_tiling_policy() -> None:
    from cmpc.errors import ConfigError
    from cmpc.localize.scene import SceneSettings

    def spacing(n: int, **kw) -> float:  # an n x n-tile scene of 128 m tiles every 64 m
        return SceneSettings(**kw).tile_stride_m((n + 1) * 64.0, (n + 1) * 64.0, 128.0, 64.0)

    # small scenes (under 64 tiles at the reference stride) are tiled at half of it
    assert [spacing(n, max_dense_tiles=0) for n in (2, 3, 4, 8)] == [32.0, 32.0, 32.0, 64.0]
    # an 8x8 scene's 225 half-stride tiles fit the 1000-tile budget north-up, not with 7 headings
    assert spacing(8) == 32.0 and spacing(8, rotation_range_deg=15.0) == 64.0
    assert spacing(4, rotation_range_deg=15.0) == 32.0  # 49 x 7 = 343 tiles
    assert [spacing(n, min_scene_tiles=0, max_dense_tiles=0) for n in (2, 8)] == [64.0, 64.0]  # off: the reference stride
    assert spacing(8, tile_stride_frac=0.5, min_scene_tiles=0, max_dense_tiles=0) == 32.0
    with pytest.raises(ConfigError):
        SceneSettings(max_dense_tiles=-1).check()
