"""Fine alignment: correlation, sub-cell peaks, map stitching, shift recovery, descriptor training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage as ndi

from cmpc.localize.align import FeatureMosaic, align_to_mosaic, build_feature_mosaic, correlate, subpixel_peak
from cmpc.models.descriptor import DenseDescriptor
from cmpc.localize.mosaic import stitch_patches

torch.set_grad_enabled(True)


def test_correlate_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 4, 5, generator=g)
    c = torch.randn(2, 2, 3, 9, 8, generator=g)
    got = correlate(t, c)
    assert got.shape == (2, 2, 6, 4)
    want = torch.zeros_like(got)
    for b in range(2):
        for m in range(2):
            for u in range(6):
                for v in range(4):
                    want[b, m, u, v] = (c[b, m, :, u : u + 4, v : v + 5] * t[b]).sum() / 20
    assert torch.allclose(got, want, atol=1e-5)


def test_subpixel_peak_recovers_a_parabola_vertex():
    rr, cc = torch.meshgrid(torch.arange(9.0), torch.arange(11.0), indexing="ij")
    score = 1.0 - 0.1 * (rr - 3.3) ** 2 - 0.05 * (cc - 6.8) ** 2
    val, r, c = subpixel_peak(score[None])
    assert r.item() == pytest.approx(3.3, abs=1e-4)
    assert c.item() == pytest.approx(6.8, abs=1e-4)
    assert val.item() == pytest.approx(float(score[3, 7]))
    # a peak on the border: integer position, no extrapolation
    _, r, c = subpixel_peak((-(rr - 0.0) ** 2 - (cc - 10.0) ** 2)[None])
    assert (r.item(), c.item()) == (0.0, 10.0)


def test_feature_mosaic_crops_pad_with_zeros():
    desc = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    fm = FeatureMosaic(desc, 0.0, 0.0, 1.0)
    out = fm.crops(torch.tensor([-1, 1]), torch.tensor([2, 0]), 3, 3)
    assert out.shape == (2, 2, 3, 3)
    assert out[0, :, 0].abs().sum() == 0  # row -1 is outside
    assert torch.equal(out[0, :, 1:, :2], desc[:, 0:2, 2:4])
    assert out[0, :, :, 2].abs().sum() == 0  # column 4 is outside
    assert torch.equal(out[1, :, :2], desc[:, 1:3, 0:3])


def test_stitching_rebuilds_the_map(tmp_path):
    rng = np.random.default_rng(0)
    world = rng.integers(0, 255, size=(40, 56, 3), dtype=np.uint8)
    paths, bounds = [], []
    x0, y0, S = 1000.0, 2000.0, 16
    for r in range(0, 40 - S + 1, 8):
        for c in range(0, 56 - S + 1, 8):
            p = tmp_path / f"{r}_{c}.png"
            Image.fromarray(world[r : r + S, c : c + S]).save(p)
            paths.append(p)
            bounds.append((x0 + c * 2.0, y0 - (r + S) * 2.0, x0 + (c + S) * 2.0, y0 - r * 2.0))  # 2 m/px
    m = stitch_patches(paths, np.array(bounds))
    assert m.gsd_m == 2.0 and (m.origin_x, m.origin_y) == (x0, y0)
    assert m.image.shape == (3, 40, 56) and m.valid.all()
    assert np.array_equal(m.image.astype(np.uint8), world.transpose(2, 0, 1))
    row, col = m.pixel_of(x0 + 10.0, y0 - 4.0)
    assert (float(row), float(col)) == (2.0, 5.0)


def _texture(seed: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.stack([ndi.gaussian_filter(rng.standard_normal((size, size)), s) for s in (1.0, 2.0, 3.0)]).astype(np.float32)
    return (img - img.mean((1, 2), keepdims=True)) / img.std((1, 2), keepdims=True)


@torch.no_grad()
def test_alignment_recovers_known_shifts_same_modality():
    """Geometry of the whole chain: a patch cut from the map at a known place is found there
    (within 1 px) from a search window centred up to 40 px away. Same modality and an
    untrained descriptor isolate the geometry from learning."""
    torch.manual_seed(0)
    img = _texture(0, 320)
    model = DenseDescriptor(3, 3, dim=16, width=16).eval()
    ox, oy, gsd, S = 1000.0, 5000.0, 0.5, 64
    fm = build_feature_mosaic(model, img, np.ones(img.shape[1:], bool), ox, oy, gsd, tile_px=128, margin_px=32, phases=True)
    rng = np.random.default_rng(1)
    tl = rng.integers(60, 320 - S - 60, size=(12, 2))
    q = torch.stack([torch.from_numpy(img[:, r : r + S, c : c + S]) for r, c in tl])
    true = np.stack([ox + (tl[:, 1] + S / 2) * gsd, oy - (tl[:, 0] + S / 2) * gsd], 1)
    centres = true + rng.uniform(-40, 40, size=true.shape) * gsd
    res = align_to_mosaic(model(q, "opt"), fm, torch.from_numpy(centres)[:, None], S, max_shift_px=48)
    err_px = np.linalg.norm(res.position_m[:, 0].numpy() - true, axis=1) / gsd
    assert err_px.max() <= 1.0, err_px  # pixel-level refinement on the 16 phase maps
    assert (res.peak > 0.9).all()
    # without the phase maps only the cell-level (4 px) peak and its quadratic fit remain
    cell_only = FeatureMosaic(fm.desc, ox, oy, gsd)
    res4 = align_to_mosaic(model(q, "opt"), cell_only, torch.from_numpy(centres)[:, None], S, max_shift_px=48)
    err4 = np.linalg.norm(res4.position_m[:, 0].numpy() - true, axis=1) / gsd
    assert err4.max() <= 4.0 and np.median(err4) > np.median(err_px)
    # outside the search radius the match is not found
    far = align_to_mosaic(model(q[:1], "opt"), fm, torch.from_numpy(true[:1] + 100 * gsd)[:, None], S, max_shift_px=16)
    assert np.linalg.norm(far.position_m[0, 0].numpy() - true[0]) / gsd > 20


def test_resample_keeps_the_corner_and_shrinks_the_valid_area():
    from cmpc.localize.mosaic import ImageMosaic, resample

    img = np.zeros((1, 8, 12), np.float32)
    img[0, :, 6:] = 4.0  # right half bright
    valid = np.ones((8, 12), bool)
    valid[:, :2] = False  # two uncovered columns
    m = resample(ImageMosaic(img, valid, 100.0, 200.0, 0.5), 1.0)
    assert m.image.shape == (1, 4, 6) and (m.origin_x, m.origin_y, m.gsd_m) == (100.0, 200.0, 1.0)
    # antialiased bilinear (as the queries are resized): only the columns next to the edge blend
    assert m.image[0, :, :2].max() < 1e-6 and np.allclose(m.image[0, :, 4:], 4.0)
    assert 0 < m.image[0, 0, 2] < m.image[0, 0, 3] < 4.0
    # valid only where the whole filter support was covered
    assert m.valid[:, 2:].all() and not m.valid[:, :2].any()
    # same point, same place: x = 103 m lies in column 3 at 1 m/px (column 6 at 0.5 m/px)
    assert float(m.pixel_of(103.0, 199.0)[1]) == 3.0
