"""Translation metrics: PSNR, SSIM, segmentation scores, and a Fréchet distance.

- PSNR / SSIM compare a translated patch with its co-registered truth, both mapped to [0, 1]
  (``data_range`` 1). SSIM uses an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03,
  over valid windows (no padding), averaged over windows and bands (Wang et al. 2004).
- Segmentation pixel accuracy (mPA), mean IoU and frequency-weighted IoU come from a
  confusion matrix ``C[true, predicted]`` (the "FCN score" of pix2pix).
- ``frechet_distance`` is the FID formula. This project feeds it the pooled encoder features
  of its own segmentation network (:class:`cmpc.models.translators.seg.SegNet`, trained here on
  the target modality), because no Inception weights can be downloaded. Its values are NOT
  comparable to Inception-based FIDs in the literature; compare them only with each other
  (same segmentation checkpoint, same split). :func:`fid_with_floor` reports it at equal
  sample sizes beside the value two halves of the real set give (the noise floor).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, max_db: float | None = None) -> torch.Tensor:
    """Peak signal-to-noise ratio (dB) per image of (B, C, H, W) batches -> (B,).

    Identical images give ``inf`` (or ``max_db`` when given).
    """
    if x.shape != y.shape:
        raise ValueError(f"psnr: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    mse = ((x.double() - y.double()) ** 2).flatten(1).mean(1)
    with np.errstate(divide="ignore"):
        out = 10.0 * torch.log10(torch.as_tensor(data_range, dtype=torch.float64) ** 2 / mse)
    if max_db is not None:
        out = out.clamp(max=max_db)
    return out.float()


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 2-D Gaussian (size, size), float64."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity per image of (B, C, H, W) batches -> (B,), in [-1, 1].

    Patches smaller than the window use the largest odd window that fits.
    """
    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    b, c, h, w = x.shape
    win = min(win_size, h, w)
    win -= 1 - win % 2
    kernel = gaussian_window(win, sigma).to(x.device)[None, None].repeat(c, 1, 1, 1)
    x, y = x.double(), y.double()

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x**2
    syy = filt(y * y) - mu_y**2
    sxy = filt(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).float()


def confusion_matrix(true: np.ndarray | torch.Tensor, pred: np.ndarray | torch.Tensor, n_classes: int, ignore: int = -1) -> np.ndarray:
    """(n_classes, n_classes) int64 counts, rows = true class, columns = predicted; ``ignore`` skipped."""
    t = np.asarray(true.cpu() if isinstance(true, torch.Tensor) else true).ravel().astype(np.int64)
    p = np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred).ravel().astype(np.int64)
    keep = (t != ignore) & (t >= 0) & (t < n_classes) & (p >= 0) & (p < n_classes)
    return np.bincount(t[keep] * n_classes + p[keep], minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def segmentation_scores(cm: np.ndarray) -> dict[str, float]:
    """Pixel accuracy, mean per-class pixel accuracy (mPA), mIoU and frequency-weighted IoU.

    Classes absent from the truth are left out of mPA; classes absent from both truth and
    prediction are left out of mIoU (their IoU is undefined). FwIoU weighs each class's IoU by
    its share of true pixels.
    """
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    if total == 0:
        return {"pixel_acc": float("nan"), "mPA": float("nan"), "mIoU": float("nan"), "FwIoU": float("nan")}
    tp = np.diag(cm)
    true_n = cm.sum(1)
    pred_n = cm.sum(0)
    union = true_n + pred_n - tp
    present = true_n > 0
    pa = tp[present] / true_n[present]
    seen = union > 0
    iou = np.zeros_like(tp)
    iou[seen] = tp[seen] / union[seen]
    freq = true_n / total
    return {
        "pixel_acc": float(tp.sum() / total),
        "mPA": float(pa.mean()),
        "mIoU": float(iou[seen].mean()),
        "FwIoU": float((freq[seen] * iou[seen]).sum()),
    }


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of (N, D) features (unbiased, N - 1)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError("need at least two feature vectors (N, D)")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians (the FID formula)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    s1, s2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        # Near-singular product: regularise as the reference FID code does.
        off = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = np.real(covmean)
    return float(max(0.0, diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean)))


def fid_from_features(real: np.ndarray, fake: np.ndarray, scale: float | None = None) -> float:
    """Fréchet distance between two (N, D) feature sets (see the module note on comparability).

    ``scale``: features are divided by it first (e.g. :func:`feature_scale` of the real set,
    which makes values independent of the feature network's overall magnitude).
    """
    s = 1.0 if scale is None else float(scale)
    return frechet_distance(*feature_stats(np.asarray(real) / s), *feature_stats(np.asarray(fake) / s))


def feature_scale(features: np.ndarray) -> float:
    """sqrt of the mean per-dimension variance of (N, D) features (1 when degenerate)."""
    v = float(np.asarray(features, dtype=np.float64).var(axis=0, ddof=1).mean())
    return math.sqrt(v) if v > 0 else 1.0


def fid_with_floor(real: np.ndarray, fake: np.ndarray, max_dims: int = 64) -> tuple[float, float]:
    """(FID, floor) at equal sample sizes: translations of the first half of the pairs against
    real patches of the second half, and real first half against the same real second half.

    Disjoint halves keep paired samples from flattering the score, and the floor shows what
    sampling noise alone gives at this size. A covariance needs many more samples than
    dimensions, so features are first projected on the real set's top ``k`` principal axes,
    ``k = min(max_dims, D, n_half // 4)``, then scaled so the real set has unit mean variance
    per dimension (values do not depend on the feature network's magnitude).
    """
    real = np.asarray(real, dtype=np.float64)
    fake = np.asarray(fake, dtype=np.float64)
    h = len(real) // 2
    k = max(1, min(max_dims, real.shape[1], h // 4))
    mu = real.mean(0)
    _, _, vt = np.linalg.svd(real - mu, full_matrices=False)
    proj = vt[:k].T
    r, f = (real - mu) @ proj, (fake - mu) @ proj
    s = feature_scale(r)
    return fid_from_features(r[h:], f[:h], s), fid_from_features(r[h:], r[:h], s)


def mean_finite(values: list[float]) -> float:
    """Mean of the finite values (PSNR of identical patches is inf), nan when none."""
    v = [x for x in values if math.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")
