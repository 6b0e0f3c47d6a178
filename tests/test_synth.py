"""Synthetic world generator: physics of the renderers, determinism, GeoTIFF output, CLI.

Physics tests render hand-made scenes (one building on flat ground) so the expected numbers
follow from the geometry: layover h / tan(theta) toward the sensor, radar shadow
h * tan(theta) away from it, optical shadow h / tan(elevation) away from the sun, speckle
coefficient of variation 1 / sqrt(L).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from scipy import ndimage as ndi

from cmpc.cli import main
from cmpc.config import SynthConfig
from cmpc.data.synth import build_world, generate_world
from cmpc.data.synth.optical import render_optical
from cmpc.data.synth.sar import NESZ_DB, SarGeometry, render_sar_mean, speckle, to_db
from cmpc.data.synth.scene import CLASS_NAMES, CONCRETE, GRASS, SOIL, TREE, WATER, Scene

THETA = 35.0
TAN = np.tan(np.radians(THETA))
# Unit step (row, col) of each look direction; the sensor sits on the opposite side.
LOOK_RC = {"east": (0, 1), "west": (0, -1), "north": (-1, 0), "south": (1, 0)}


def _one_building(look: str, height: float = 30.0, size: int = 240, box: int = 20, roof_db: float = -3.0):
    scene = Scene.flat(size, size, 1.0, GRASS)
    r0 = c0 = size // 2 - box // 2
    scene.add_box(r0, r0 + box, c0, c0 + box, height, roof_db=roof_db)
    mean = render_sar_mean(scene, SarGeometry(THETA, look, 1.0), 1, np.random.default_rng(0))[0]
    return mean, (r0, r0 + box, c0, c0 + box)


def _range_profile(img: np.ndarray, fp: tuple[int, int, int, int], look: str) -> tuple[np.ndarray, int, int]:
    """Mean profile through the building along the look direction (index grows with range),
    with the footprint's near and far edges as indices in that profile."""
    r0, r1, c0, c1 = fp
    n = img.shape[0]
    if look in ("east", "west"):
        prof = img[r0 + 3 : r1 - 3].mean(axis=0)
        near, far = c0, c1  # first/past-last footprint index along +col
    else:
        prof = img[:, c0 + 3 : c1 - 3].mean(axis=1)
        near, far = r0, r1
    if look in ("west", "north"):  # range grows toward -col / -row: reverse
        prof = prof[::-1]
        near, far = n - far, n - near
    return prof, near, far


@pytest.mark.parametrize("look", ["east", "west", "north", "south"])
def test_radar_shadow_is_behind_the_building_away_from_the_sensor(look: str) -> None:
    h = 30.0
    mean, fp = _one_building(look, h)
    db = to_db(mean)
    grass = float(np.median(db))
    prof, near, far = _range_profile(db, fp, look)
    shadow_len = h * TAN  # 21 m
    behind = prof[far + 1 : far + int(0.8 * shadow_len)]
    in_front = prof[near - 80 : near - 55]  # beyond the layover band, on the sensor side
    assert behind.max() < -22.0, "far side must be radar shadow (noise floor -25 dB)"
    assert abs(float(np.median(in_front)) - grass) < 1.0, "sensor side must not be shadowed"
    # Shadow length along range: the dark run right behind the far edge.
    dark = prof[far:] < (grass + -25.0) / 2
    run = int(np.argmin(dark)) if not dark.all() else dark.size
    assert run == pytest.approx(shadow_len, rel=0.15)


@pytest.mark.parametrize(("look", "height"), [("east", 30.0), ("east", 15.0), ("north", 30.0), ("west", 22.0)])
def test_layover_displaces_roof_toward_sensor_by_h_over_tan_theta(look: str, height: float) -> None:
    mean, fp = _one_building(look, height)
    prof, near, far = _range_profile(mean, fp, look)
    box = far - near
    bg = float(np.median(prof))
    signal = np.clip(prof - bg, 0.0, None)
    # Cross-correlate the SAR range profile with the footprint: the best shift is where the
    # roof appears (negative = toward the sensor).
    shifts = np.arange(-120, 30)
    corr = [signal[near + s : far + s].sum() for s in shifts]
    best = int(shifts[int(np.argmax(corr))])
    expected = -height / TAN
    assert best < 0
    assert best == pytest.approx(expected, rel=0.2)
    assert box == 20


def test_double_bounce_line_at_the_sensor_side_wall_foot() -> None:
    mean, fp = _one_building("east", 20.0, roof_db=-8.0)
    prof, near, far = _range_profile(mean, fp, "east")
    peak = int(np.argmax(prof))
    assert near - 2 <= peak <= near  # the wall foot, not displaced by layover
    assert 10 * np.log10(prof[peak] / np.median(prof)) > 6.0


def test_optical_shadow_falls_away_from_the_sun() -> None:
    h, el = 20.0, 45.0
    for az in (150.0, 300.0):
        scene = Scene.flat(200, 200, 1.0, GRASS)
        scene.add_box(90, 110, 90, 110, h)
        rgb, mask = render_optical(scene, np.random.default_rng(1), sun_azimuth_deg=az, sun_elevation_deg=el, haze=0.0)
        lum = rgb.astype(float).mean(axis=2)
        dark = (lum < 0.6 * np.median(lum))
        dark[90:110, 90:110] = False
        rr, cc = np.nonzero(dark)
        vec = np.array([cc.mean() - 99.5, -(rr.mean() - 99.5)])  # (east, north) from the centre
        away = -np.array([np.sin(np.radians(az)), np.cos(np.radians(az))])
        assert vec @ away / np.linalg.norm(vec) > 0.95
        # The shadow reaches about h / tan(elevation) beyond the footprint, along `away`.
        proj = (np.stack([cc - 99.5, -(rr - 99.5)], 1) @ away)
        edge = 10.0 / max(abs(away[0]), abs(away[1]))  # centre-to-edge distance along `away`
        assert proj.max() - edge == pytest.approx(h / np.tan(np.radians(el)), rel=0.2)
        assert mask[dark].mean() > 0.95  # dark pixels are the cast-shadow mask


@pytest.mark.parametrize("looks", [1, 4])
def test_speckle_cv_matches_looks_on_a_flat_homogeneous_area(looks: int) -> None:
    scene = Scene.flat(256, 256, 1.0, CONCRETE)
    mean = render_sar_mean(scene, SarGeometry(THETA, "east", 1.0), 1, np.random.default_rng(0))
    assert float(mean.std() / mean.mean()) < 1e-4  # the speckle-free scene is flat
    img = speckle(mean, looks, np.random.default_rng(7))[0]
    cv = float(img.std() / img.mean())
    assert cv == pytest.approx(1.0 / np.sqrt(looks), rel=0.05)
    assert float(img.mean() / mean.mean()) == pytest.approx(1.0, abs=0.02)


def test_cross_pol_weaker_and_volume_scattering_stronger_in_cross_pol() -> None:
    scene = Scene.flat(128, 128, 1.0, SOIL)
    scene.material[:, 64:] = TREE
    scene.dsm[:, 64:] = 0.0  # flat canopy test: only the scattering mechanism differs
    mean = render_sar_mean(scene, SarGeometry(THETA, "east", 1.0), 4, np.random.default_rng(0))
    # Remove the thermal noise floor so that only the scattering mechanisms are compared.
    hh, hv, vh, vv = (to_db(b - 10.0 ** (NESZ_DB / 10.0)) for b in mean)
    assert np.array_equal(hv, vh)  # reciprocity
    ratio_soil = float(np.median(hv[:, 8:56] - vv[:, 8:56]))
    ratio_tree = float(np.median(hv[:, 72:120] - vv[:, 72:120]))
    assert ratio_soil < -12.0 and ratio_tree < -3.0
    assert float(np.median(hh[:, 8:56] - vv[:, 8:56])) < 0.0  # surface: HH below VV
    assert ratio_tree - ratio_soil > 5.0


# --------------------------------------------------------------------------- generated worlds


@pytest.fixture(scope="module")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthConfig, dict]:
    out = tmp_path_factory.mktemp("synth") / "world"
    cfg = SynthConfig(out=str(out), seed=3, size_m=384.0, gsd_m=1.0, epsg=32632, origin_x=400_000.0, origin_y=5_100_000.0)
    info = generate_world(cfg, preview=True)
    return cfg, info


def test_geotiffs_share_a_projected_grid(small_world) -> None:
    cfg, info = small_world
    out = Path(cfg.out)
    expect = {"optical": (3, "uint8"), "sar": (1, "float32"), "labels": (1, "uint8"), "dsm": (1, "float32")}
    for name, (count, dtype) in expect.items():
        with rasterio.open(out / f"{name}.tif") as src:
            assert src.crs.to_epsg() == 32632 and src.crs.is_projected
            assert tuple(src.transform)[:6] == (1.0, 0.0, 400_000.0, 0.0, -1.0, 5_100_000.0)
            assert (src.height, src.width, src.count, src.dtypes[0]) == (384, 384, count, dtype)
    meta = json.loads((out / "world.json").read_text())
    assert meta["config"]["seed"] == 3 and meta["crs"] == "EPSG:32632"
    assert meta["transform"] == [400_000.0, 1.0, 0.0, 5_100_000.0, 0.0, -1.0]
    assert meta["classes"] == {str(i): n for i, n in enumerate(CLASS_NAMES)}
    assert np.hypot(meta["misregistration"]["dx_east_m"], meta["misregistration"]["dy_north_m"]) <= cfg.misregistration_m
    assert meta["sar"]["look"] == "east" and meta["sar"]["sensor_side"] == "west"
    with rasterio.open(out / "labels.tif") as src:
        labels = src.read(1)
    assert labels.max() < len(CLASS_NAMES)
    assert abs(sum(meta["class_fractions"].values()) - 1.0) < 1e-3
    assert (out / "preview.png").stat().st_size > 20_000
    assert info["shape"] == [384, 384]
    assert not list(out.parent.glob(".world.*"))  # no temporary folders left behind


def test_water_is_darker_than_roofs_in_sar(small_world) -> None:
    cfg, _ = small_world
    w = build_world(cfg)
    sar = w["sar"][0]  # dB
    scene = w["scene_sar"]
    water = ndi.binary_erosion(scene.material == WATER, iterations=3)
    # Roof pixels at the position where SAR shows them: displaced toward the sensor (west).
    rr, cc = np.nonzero(scene.building_id > 0)
    shift = np.round(scene.dsm[rr, cc] / TAN).astype(int)
    ok = cc - shift >= 0
    roofs = sar[rr[ok], cc[ok] - shift[ok]]
    assert water.sum() > 2000 and roofs.size > 2000
    assert float(np.median(roofs) - np.median(sar[water])) > 6.0


def test_speckle_on_generated_water_matches_looks(small_world) -> None:
    cfg, _ = small_world
    with rasterio.open(Path(cfg.out) / "sar.tif") as src:
        lin = 10.0 ** (src.read(1) / 10.0)
    with rasterio.open(Path(cfg.out) / "labels.tif") as src:
        water = ndi.binary_erosion(src.read(1) == CLASS_NAMES.index("water"), iterations=4)
    cvs = []
    for r in range(0, 384 - 12, 12):
        for c in range(0, 384 - 12, 12):
            if water[r : r + 12, c : c + 12].all():
                win = lin[r : r + 12, c : c + 12]
                cvs.append(win.std() / win.mean())
    assert len(cvs) >= 30
    # Median over windows: a few hold a ship or a bridge of the SAR date (bright outliers).
    assert float(np.median(cvs)) == pytest.approx(1.0 / np.sqrt(cfg.looks), rel=0.1)


def test_deterministic_per_seed_and_different_across_seeds() -> None:
    cfg = SynthConfig(seed=11, size_m=256.0, polarisations=2)
    a, b = build_world(cfg), build_world(cfg)
    for key in ("optical", "sar"):
        assert np.array_equal(a[key], b[key])
    assert np.array_equal(a["scene_optical"].labels, b["scene_optical"].labels)
    assert np.array_equal(a["scene_optical"].dsm, b["scene_optical"].dsm)
    c = build_world(SynthConfig(seed=12, size_m=256.0, polarisations=2))
    assert (a["scene_optical"].labels != c["scene_optical"].labels).mean() > 0.3
    assert (a["optical"] != c["optical"]).any(axis=2).mean() > 0.5


def test_four_polarisations_write_four_named_bands(tmp_path: Path) -> None:
    cfg = SynthConfig(out=str(tmp_path / "w4"), seed=2, size_m=256.0, polarisations=4, sar_db=False)
    info = generate_world(cfg, preview=False)
    assert info["bands"] == ["HH", "HV", "VH", "VV"]
    with rasterio.open(tmp_path / "w4" / "sar.tif") as src:
        assert src.count == 4 and src.descriptions == ("HH", "HV", "VH", "VV")
        data = src.read()
    assert (data > 0).all()  # linear intensity
    assert 10 * np.log10(np.median(data[1]) / np.median(data[3])) < -6.0  # cross-pol weaker


def test_temporal_changes_follow_change_fraction() -> None:
    w = build_world(SynthConfig(seed=5, size_m=512.0, change_fraction=0.2))
    n = w["counts"]["buildings"]
    ch = w["changes"]
    assert n > 20
    assert ch["buildings_removed"] + ch["buildings_added"] == round(0.2 * n)
    assert abs(ch["buildings_removed"] - ch["buildings_added"]) <= 1


# --------------------------------------------------------------------------- CLI and errors


def test_cli_synth_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli_world"
    assert main(["data", "synth", "--out", str(out), "--seed", "4", "--size-m", "200", "--gsd", "2", "--looks", "1", "--no-preview"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shape"] == [100, 100] and info["gsd_m"] == 2.0
    assert not (out / "preview.png").exists()
    meta = json.loads((out / "world.json").read_text())
    assert meta["config"]["looks"] == 1 and meta["config"]["seed"] == 4


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--size-m", "100", "--gsd", "2"], "at least 64 px"),
        (["--size-m", "50000", "--gsd", "1"], "limit"),
        (["--looks", "0"], "synth.looks"),
        (["--set", "synth.epsg=4326"], "not a projected CRS"),
        (["--set", "synth.look=up"], "synth.look"),
    ],
)
def test_cli_bad_values_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str) -> None:
    code = main(["data", "synth", "--out", str(tmp_path / "w"), "--no-preview", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1
    assert not (tmp_path / "w").exists()


def test_refuses_to_replace_a_foreign_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    assert main(["data", "synth", "--out", str(precious), "--size-m", "128", "--no-preview"]) == 2
    assert "refusing" in capsys.readouterr().err
    assert (precious / "notes.txt").read_text() == "keep me"


def test_failed_generation_leaves_previous_world_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cmpc.data.synth import world as world_mod

    cfg = SynthConfig(out=str(tmp_path / "w"), seed=1, size_m=128.0)
    generate_world(cfg, preview=False)
    before = (tmp_path / "w" / "world.json").read_text()

    def boom(path, *a, **k):
        if Path(path).name == "sar.tif":
            raise OSError("disk full")
        return real(path, *a, **k)

    real = world_mod.write_geotiff
    monkeypatch.setattr(world_mod, "write_geotiff", boom)
    with pytest.raises(OSError):
        generate_world(SynthConfig(out=str(tmp_path / "w"), seed=2, size_m=128.0), preview=False)
    assert (tmp_path / "w" / "world.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_misregistration_shift_is_recorded_with_its_direction() -> None:
    # Same seed: same scene and same speckle draw; only the co-registration error differs.
    base = build_world(SynthConfig(seed=6, size_m=256.0, misregistration_m=0.0, looks=64))
    moved = build_world(SynthConfig(seed=6, size_m=256.0, misregistration_m=8.0, looks=64))
    dx, dy = moved["shift_m"]
    assert 0.0 < np.hypot(dx, dy) <= 8.0
    # Speckle is drawn on the SAR grid (not shifted): smooth it away, keep the scene.
    a, b = (ndi.gaussian_filter(w["sar"][0], 2.0) for w in (base, moved))
    a, b = a - a.mean(), b - b.mean()
    corr = np.fft.ifft2(np.fft.fft2(b) * np.conj(np.fft.fft2(a))).real
    r, c = np.unravel_index(np.argmax(corr), corr.shape)
    r = r - 256 if r > 128 else r
    c = c - 256 if c > 128 else c
    assert c == pytest.approx(dx, abs=1.0)  # columns grow eastward
    assert -r == pytest.approx(dy, abs=1.0)  # rows grow southward
