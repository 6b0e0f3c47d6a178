"""A tiny CMPC dataset for embedding-training tests, generated on the fly.

An optical "world" of random coloured rectangles (buildings, fields) on smooth noise; the SAR
view is a noisy, degraded function of it (luminance remapped non-linearly, bright edges as
double-bounce, blur, multiplicative Gamma speckle, dB). References sit on a 50 %-overlap grid;
each has one aligned SAR query and (optionally) one non-aligned query offset by a few pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cmpc.data.layout import Annotation, write_annotation


def _world(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8 optical world."""
    base = rng.normal(0, 1, (h // 8 + 2, w // 8 + 2, 3))
    img = np.kron(base, np.ones((8, 8, 1)))[:h, :w] * 12 + 110
    for _ in range(int(h * w / 60)):
        rh, rw = rng.integers(3, 14, size=2)
        y, x = rng.integers(0, h - rh), rng.integers(0, w - rw)
        img[y : y + rh, x : x + rw] = rng.uniform(20, 240, size=3)
    return np.clip(img, 0, 255).astype(np.uint8)


def _sar(rng: np.random.Generator, opt: np.ndarray, looks: int = 4) -> np.ndarray:
    """(h, w) float32 SAR in dB from an optical world."""
    from scipy.ndimage import gaussian_filter, sobel

    lum = opt.astype(np.float32).mean(axis=2) / 255.0
    inten = 0.05 + lum**2  # non-linear remap
    edges = np.hypot(sobel(lum, 0), sobel(lum, 1))
    inten = gaussian_filter(inten + 0.8 * edges, 0.8)
    speckle = rng.gamma(looks, 1.0 / looks, size=inten.shape)
    return (10.0 * np.log10(inten * speckle + 1e-4)).astype(np.float32)


def make_tiny_dataset(
    root: Path,
    grid: tuple[int, int] = (8, 10),
    patch: int = 32,
    seed: int = 0,
    non_aligned: bool = True,
    sar_bands: int = 1,
    split: str = "train",
) -> Path:
    """Write ``root/split/...`` with ``grid`` (rows, cols) references of ``patch`` px at 1 m/px.

    Returns ``root``. Positions are metres (EPSG:32631-like numbers); SAR patches are float
    GeoTIFFs with ``sar_bands`` bands, optical patches RGB PNGs.
    """
    import rasterio

    rng = np.random.default_rng(seed)
    rows, cols = grid
    stride = patch // 2
    h, w = stride * (rows + 1) + 8, stride * (cols + 1) + 8
    opt = _world(rng, h, w)
    sar = np.stack([_sar(rng, opt) for _ in range(sar_bands)])
    x0, y0 = 500_000.0, 5_000_000.0
    pos = np.array([(x0 + c * stride + patch / 2, y0 - r * stride - patch / 2) for r in range(rows) for c in range(cols)])
    q = 0
    for i, (py, px) in enumerate((r * stride, c * stride) for r in range(rows) for c in range(cols)):
        cx, cy = pos[i]
        near = np.argsort(np.hypot(*(pos - pos[i]).T))[1:9].tolist()
        bounds = (cx - patch / 2, cy - patch / 2, cx + patch / 2, cy + patch / 2)
        opt_dir = root / split / "imgs" / "opt"
        opt_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(opt[py : py + patch, px : px + patch]).save(opt_dir / f"{i}.png")
        write_annotation(root, split, "opt", Annotation(id=i, x=cx, y=cy, file_path=f"{i}.png", near_id=near, bounds=bounds, gsd=1.0, name=str(i)))
        offsets = [(0, 0)] + ([tuple(int(v) for v in rng.integers(-4, 5, size=2))] if non_aligned else [])
        for k, (dy, dx) in enumerate(offsets):
            yy, xx = int(np.clip(py + dy, 0, h - patch)), int(np.clip(px + dx, 0, w - patch))
            sar_dir = root / split / "imgs" / "sar"
            sar_dir.mkdir(parents=True, exist_ok=True)
            qx, qy = x0 + xx + patch / 2, y0 - yy - patch / 2
            transform = rasterio.Affine(1.0, 0.0, qx - patch / 2, 0.0, -1.0, qy + patch / 2)  # 1 m/px, north up
            with rasterio.open(
                sar_dir / f"{q}.tif", "w", driver="GTiff", width=patch, height=patch, count=sar_bands, dtype="float32",
                crs="EPSG:32631", transform=transform,
            ) as dst:
                dst.write(sar[:, yy : yy + patch, xx : xx + patch])
            write_annotation(
                root, split, "sar",
                Annotation(id=i, x=qx, y=qy, file_path=f"{q}.tif", near_id=near, gsd=1.0, aligned=(k == 0), name=str(q)),
            )
            q += 1
    return root
