"""Reading patches from a CMPC dataset into model-ready tensors.

A patch file is a PNG (8-bit, 1 or 3 bands) or a GeoTIFF (any band count, float or
integer). Patches are returned as float32 (C, H, W), resized to the model input size and
standardised per channel (zero mean, unit variance within the patch): SAR in dB, linear
SAR, 8-bit SAR and optical reflectance then all look alike to the network.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cmpc.data.layout import Annotation, read_annotations, safe_image_path
from cmpc.errors import DataError


def read_patch_array(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a patch file as float32 (C, H, W); non-finite pixels become 0.

    Raises :class:`DataError` for unreadable or corrupt files.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"patch file not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import rasterio

            # A patch has no sidecar files: skip GDAL's listing of the folder on open (that
            # listing made a 1400-patch folder decode 1.6x slower; docs/BENCHMARKS.md).
            with warnings.catch_warnings(), rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"):
                warnings.simplefilter("ignore")
                with rasterio.open(p) as src:
                    arr = src.read(masked=False).astype(np.float32)
                    nodata = src.nodata
            if nodata is not None and np.isfinite(nodata):
                arr[arr == nodata] = np.nan
        else:
            from PIL import Image

            with Image.open(p) as im:
                a = np.asarray(im)
            arr = a.astype(np.float32)
            arr = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
    except DataError:
        raise
    except Exception as e:  # rasterio / PIL raise many types for corrupt files
        raise DataError(f"cannot read patch {p}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not np.isfinite(arr).all():
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    return arr


def standardize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-channel standardisation of (C, H, W) or (B, C, H, W) over the spatial axes."""
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.std(dim=(-2, -1), keepdim=True)
    return (x - mean) / (std + eps)


def to_model_input(arr: np.ndarray, img_size: int) -> torch.Tensor:
    """(C, H, W) array -> standardised float32 tensor (C, img_size, img_size)."""
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if t.shape[-1] != img_size or t.shape[-2] != img_size:
        t = F.interpolate(t[None], size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)[0]
    return standardize(t)


class PatchDataset(Dataset):
    """Patches of one split and modality of a CMPC dataset.

    ``dataset[i]`` is ``(tensor (C, S, S), i)``; ``dataset.annotations[i]`` the annotation.
    ``filter`` optionally keeps a subset (e.g. ``lambda a: a.aligned``).
    With ``cache`` decoded, resized patches are kept in RAM (uint8-sized datasets fit easily).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        mode: str,
        img_size: int,
        annotations: list[Annotation] | None = None,
        cache: bool = False,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.mode = mode
        self.img_size = img_size
        self.annotations = annotations if annotations is not None else read_annotations(root, split, mode)
        self.cache = cache
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.annotations)

    def path(self, i: int) -> Path:
        return safe_image_path(self.root, self.split, self.mode, self.annotations[i].file_path)

    def raw(self, i: int) -> np.ndarray:
        """The patch as stored, float32 (C, H, W)."""
        return read_patch_array(self.path(i))

    def load(self, i: int) -> torch.Tensor:
        if self.cache and i in self._cache:
            return self._cache[i]
        t = to_model_input(self.raw(i), self.img_size)
        if self.cache:
            self._cache[i] = t
        return t

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.load(i), i

    def channels(self) -> int:
        """Band count, read from the first patch."""
        return int(self.raw(0).shape[0])


def dataset_channels(root: str | os.PathLike[str], split: str = "train") -> tuple[int, int]:
    """(sar_channels, optical_channels) of a dataset, from its first patches."""
    sar = PatchDataset(root, split, "sar", 16).channels()
    opt = PatchDataset(root, split, "opt", 16).channels()
    return sar, opt
