"""Translator metrics against hand-computed values: PSNR, SSIM, segmentation scores, Fréchet distance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cmpc.translate.metrics import (
    confusion_matrix,
    fid_from_features,
    frechet_distance,
    gaussian_window,
    psnr,
    segmentation_scores,
    ssim,
)


def test_psnr_identical_is_inf_or_capped():
    x = torch.rand(2, 3, 16, 16)
    assert torch.isinf(psnr(x, x)).all()
    assert psnr(x, x, max_db=100.0).tolist() == [100.0, 100.0]


def test_psnr_known_mse():
    x = torch.zeros(1, 1, 8, 8)
    y = torch.full((1, 1, 8, 8), 0.1)  # MSE 0.01 -> 10 log10(1 / 0.01) = 20 dB
    assert psnr(x, y).item() == pytest.approx(20.0, abs=1e-4)
    # Range 2 (images in [-1, 1]): 10 log10(4 / 0.01) = 26.0206 dB
    assert psnr(x, y, data_range=2.0).item() == pytest.approx(26.0206, abs=1e-3)
    # Half the pixels off by 0.2: MSE 0.02 -> 16.9897 dB; per image, not pooled over the batch
    z = x.clone()
    z[..., :4, :] = 0.2
    out = psnr(torch.cat([x, x]), torch.cat([y, z]))
    assert out.tolist() == pytest.approx([20.0, 16.9897], abs=1e-3)


def test_ssim_identical_is_one():
    x = torch.rand(3, 2, 24, 24)
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)


def test_ssim_constant_images_hand_formula():
    # Constant images: variances and covariance are 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b = 0.2, 0.6
    c1 = (0.01 * 1.0) ** 2
    want = (2 * a * b + c1) / (a * a + b * b + c1)
    got = ssim(torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b)).item()
    assert got == pytest.approx(want, rel=1e-5)
    assert want == pytest.approx(0.6001, abs=1e-3)


def test_ssim_one_window_matches_weighted_statistics():
    # An 11x11 image holds exactly one window: compute the Gaussian-weighted moments by hand.
    rng = np.random.default_rng(0)
    x = rng.random((11, 11))
    y = 0.5 * x + 0.3 * rng.random((11, 11))
    w = gaussian_window(11, 1.5).numpy()
    assert w.sum() == pytest.approx(1.0)
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy = (w * x * x).sum() - mx**2, (w * y * y).sum() - my**2
    cxy = (w * x * y).sum() - mx * my
    c1, c2 = 0.01**2, 0.03**2
    want = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    got = ssim(torch.tensor(x)[None, None].float(), torch.tensor(y)[None, None].float()).item()
    assert got == pytest.approx(want, abs=1e-5)
    # Anti-correlated structure gives a negative SSIM.
    assert ssim(torch.tensor(x)[None, None].float(), torch.tensor(1 - x)[None, None].float()).item() < 0


def test_ssim_falls_with_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 32, 32, generator=g)
    noisy = [ssim(x, (x + s * torch.randn(1, 1, 32, 32, generator=g)).clamp(0, 1)).item() for s in (0.05, 0.2, 0.5)]
    assert noisy[0] > noisy[1] > noisy[2]


def test_confusion_matrix_counts_and_ignore():
    true = np.array([[0, 0, 1], [2, -1, 1]])
    pred = np.array([[0, 1, 1], [2, 2, 0]])
    cm = confusion_matrix(true, pred, 3)
    assert cm.tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]  # the -1 pixel is skipped
    assert cm.sum() == 5


def test_segmentation_scores_hand_made():
    cm = np.array([[8, 2, 0], [1, 3, 0], [0, 1, 5]])
    s = segmentation_scores(cm)
    # tp 8,3,5 of 20; true 10,4,6; predicted 9,6,5; unions 11,7,6.
    assert s["pixel_acc"] == pytest.approx(16 / 20)
    assert s["mPA"] == pytest.approx((8 / 10 + 3 / 4 + 5 / 6) / 3)
    assert s["mIoU"] == pytest.approx((8 / 11 + 3 / 7 + 5 / 6) / 3)
    assert s["FwIoU"] == pytest.approx(0.5 * 8 / 11 + 0.2 * 3 / 7 + 0.3 * 5 / 6)
    # A class absent from truth and prediction changes nothing.
    big = np.zeros((4, 4), int)
    big[:3, :3] = cm
    assert segmentation_scores(big) == pytest.approx(s)
    # A class only predicted (never true) counts in mIoU with IoU 0, not in mPA.
    fp = np.array([[5, 5], [0, 0]])
    s2 = segmentation_scores(fp)
    assert s2["mPA"] == pytest.approx(0.5)
    assert s2["mIoU"] == pytest.approx((0.5 + 0.0) / 2)
    assert s2["FwIoU"] == pytest.approx(0.5)
    assert math.isnan(segmentation_scores(np.zeros((2, 2)))["mIoU"])


def test_frechet_distance_hand_values():
    i2 = np.eye(2)
    assert frechet_distance(np.zeros(2), i2, np.zeros(2), i2) == pytest.approx(0.0, abs=1e-9)
    # Shifted means, equal covariances: ||d||^2.
    assert frechet_distance(np.array([1.0, 2.0]), i2, np.array([4.0, -2.0]), i2) == pytest.approx(25.0)
    # Diagonal covariances: sum (sqrt(a) - sqrt(b))^2 = (2 - 1)^2 + (3 - 1)^2 = 5.
    assert frechet_distance(np.zeros(2), np.diag([4.0, 9.0]), np.zeros(2), i2) == pytest.approx(5.0, abs=1e-6)


def test_fid_from_features_of_samples():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (4000, 3))
    b = rng.normal(0, 1, (4000, 3)) + np.array([2.0, 0.0, 0.0])
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-6)
    assert fid_from_features(a, b) == pytest.approx(4.0, abs=0.15)


def test_fid_with_floor_scale_free_and_equal_sizes():
    from cmpc.translate.metrics import fid_with_floor

    rng = np.random.default_rng(0)
    real = rng.normal(0, 1, (2000, 3))
    fake = rng.normal(0, 1, (2000, 3)) + np.array([1.0, 0.0, 0.0])
    fid, floor = fid_with_floor(real, fake)
    assert fid == pytest.approx(1.0, abs=0.1) and floor < 0.05 and fid > 10 * floor
    # Scaling every feature by 1000 (another network's magnitude) changes nothing.
    fid2, floor2 = fid_with_floor(1000 * real, 1000 * fake)
    assert fid2 == pytest.approx(fid, rel=1e-6) and floor2 == pytest.approx(floor, rel=1e-6)
