"""Tiny GeoTIFFs with a real CRS and transform, generated on the fly, with known content.

The *coordinate rasters* encode where each pixel is, so a patch read back tells where it was
cut: band 1 = column + 0.5 (the pixel-centre x offset from the origin, in pixels), band 2 =
row + 0.5. For the default 1 m grid that is the pixel centre in metres from the upper-left
corner, so ``mean(band1) == pos.x - X0`` and ``mean(band2) == Y0 - pos.y`` for any patch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

X0, Y0 = 500_000.0, 5_000_000.0  # upper-left corner, EPSG:32631 metres
CRS = "EPSG:32631"


def write_tif(
    path: Path,
    data: np.ndarray,
    crs: str | None = CRS,
    transform=None,
    nodata: float | None = None,
    block: int | None = None,
) -> Path:
    """Write (C, H, W) ``data`` as a GeoTIFF (tiled with ``block`` px blocks when given)."""
    c, h, w = data.shape
    kw = {}
    if block:
        kw = {"tiled": True, "blockxsize": block, "blockysize": block}
    with rasterio.open(
        path, "w", driver="GTiff", width=w, height=h, count=c, dtype=data.dtype.name,
        crs=crs, transform=transform if transform is not None else Affine(1.0, 0.0, X0, 0.0, -1.0, Y0), nodata=nodata, **kw,
    ) as dst:
        dst.write(data)
    return path


def coord_bands(h: int, w: int, scale: float = 1.0) -> np.ndarray:
    """(2, h, w) float32: band 1 = (col + 0.5) * scale, band 2 = (row + 0.5) * scale."""
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([(cols + 0.5) * scale, (rows + 0.5) * scale]).astype(np.float32)


def optical_u8(h: int, w: int) -> np.ndarray:
    """(3, h, w) uint8: band 1 = col, band 2 = row, band 3 = (col + row) % 200 (never 255)."""
    rows, cols = np.mgrid[0:h, 0:w]
    return np.stack([cols, rows, (cols + rows) % 200]).astype(np.uint8)


def make_pair(tmp: Path, h: int = 64, w: int = 96, sar_dtype: str = "float32") -> tuple[Path, Path]:
    """A co-registered pair on the same 1 m grid: optical uint8 3-band, SAR 2 coordinate bands."""
    opt = write_tif(tmp / "optical.tif", optical_u8(h, w))
    sar = write_tif(tmp / "sar.tif", coord_bands(h, w).astype(sar_dtype))
    return sar, opt
