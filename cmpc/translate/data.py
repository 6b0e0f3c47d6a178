"""Translator data from a CMPC dataset: paired and unpaired patch crops, class-mask patches.

- Pairs are aligned SAR queries and the optical reference with the same id and footprint
  (``aligned`` flag, or the same centre when the flag is absent, as in SN6-CMPC).
- Unpaired data is every SAR patch and every optical reference, drawn independently.
- Class masks are cut from a label raster at each annotation's ``bounds`` with rasterio
  windowed reads (the raster is never loaded whole). The label raster must sit on the optical
  raster's grid: same CRS, same pixel size, pixel corners aligned, covering it.

Pixels go to the translators as [-1, 1] via a per-band :class:`Normalizer` fitted on the
training patches (0.5 and 99.5 percentiles), stored in every translator checkpoint so
translations come back in the data's own units (dB, reflectance, 8-bit).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cmpc.data.layout import Annotation, read_annotations, read_dataset_meta, safe_image_path
from cmpc.data.patches import read_patch_array
from cmpc.errors import DataError

IGNORE_LABEL = -1


# --------------------------------------------------------------------------- normalisation


@dataclass
class Normalizer:
    """Per-band linear map of data values ``[lo, hi]`` onto ``[-1, 1]`` (clipped)."""

    lo: list[float]
    hi: list[float]

    @property
    def channels(self) -> int:
        return len(self.lo)

    def _lohi(self, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        shape = (-1,) + (1,) * (ndim - 1)
        lo = np.asarray(self.lo, dtype=np.float32).reshape(shape)
        hi = np.asarray(self.hi, dtype=np.float32).reshape(shape)
        return lo, np.maximum(hi, lo + 1e-6)

    def to_unit(self, arr: np.ndarray) -> np.ndarray:
        """(C, H, W) data units -> float32 in [-1, 1]."""
        if arr.shape[0] != self.channels:
            raise DataError(f"patch has {arr.shape[0]} band(s), the normaliser was fitted on {self.channels}")
        lo, hi = self._lohi(arr.ndim)
        return np.clip((arr - lo) / (hi - lo) * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)

    def from_unit(self, arr: np.ndarray) -> np.ndarray:
        """(C, H, W) in [-1, 1] -> float32 data units."""
        lo, hi = self._lohi(arr.ndim)
        return ((np.asarray(arr, dtype=np.float32) + 1.0) * 0.5 * (hi - lo) + lo).astype(np.float32)

    def to_dict(self) -> dict[str, list[float]]:
        return {"lo": [float(v) for v in self.lo], "hi": [float(v) for v in self.hi]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalizer:
        return cls(lo=[float(v) for v in d["lo"]], hi=[float(v) for v in d["hi"]])


def fit_normalizer(arrays: list[np.ndarray], q_lo: float = 0.5, q_hi: float = 99.5) -> Normalizer:
    """Per-band percentiles over (C, H, W) patches: robust to speckle peaks and saturated pixels."""
    if not arrays:
        raise DataError("no patches to fit the normaliser on")
    c = arrays[0].shape[0]
    stacked = np.concatenate([a.reshape(c, -1) for a in arrays], axis=1)
    lo = np.percentile(stacked, q_lo, axis=1)
    hi = np.percentile(stacked, q_hi, axis=1)
    return Normalizer(lo=[float(v) for v in lo], hi=[float(v) for v in hi])


# --------------------------------------------------------------------------- pairs


def _tolerance_m(ann: Annotation) -> float:
    # Half a pixel when the gsd is known; 0.5 m otherwise (SN6-CMPC centres are exact copies).
    return 0.5 * ann.gsd if ann.gsd else 0.5


def aligned_pairs(sar: list[Annotation], opt: list[Annotation]) -> list[tuple[int, int]]:
    """(sar index, optical index) of co-registered pairs: aligned SAR queries and their reference.

    A query with ``aligned`` = false is never paired; one without the flag is paired when its
    centre is within half a pixel of its reference's centre.
    """
    by_id = {a.id: j for j, a in enumerate(opt)}
    out: list[tuple[int, int]] = []
    for i, s in enumerate(sar):
        j = by_id.get(s.id)
        if j is None or s.aligned is False:
            continue
        o = opt[j]
        if s.aligned is None and math.hypot(s.x - o.x, s.y - o.y) > _tolerance_m(s):
            continue
        out.append((i, j))
    return out


def require_pairs(root: str | os.PathLike[str], split: str, sar: list[Annotation], opt: list[Annotation], what: str = "pix2pix") -> list[tuple[int, int]]:
    """:func:`aligned_pairs` or a one-line :class:`DataError` when there are none."""
    pairs = aligned_pairs(sar, opt)
    if not pairs:
        raise DataError(
            f"{what} needs co-registered SAR/optical pairs, but {root}/{split} has no aligned SAR query "
            f"(no SAR patch shares its reference's footprint); tile with aligned queries or use translate.model=cyclegan"
        )
    return pairs


# --------------------------------------------------------------------------- label raster


def _same_crs(a: Any, b: Any) -> bool:
    from rasterio.crs import CRS

    if a is None or b is None:
        return a is None and b is None
    try:
        return CRS.from_user_input(a) == CRS.from_user_input(b)
    except Exception:
        return str(a) == str(b)


class LabelRaster:
    """Class-mask patches from a label GeoTIFF, read window by window.

    ``optical`` (the optical raster the dataset was cut from) is checked for alignment: same
    CRS, same pixel size, pixel corners on the same grid, and the label raster covering it.
    Without it, ``crs`` (the dataset CRS) is checked instead. Any mismatch is a one-line
    :class:`DataError`.
    """

    def __init__(self, path: str | os.PathLike[str], optical: str | os.PathLike[str] | None = None, crs: str | None = None) -> None:
        import rasterio

        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"label raster not found: {self.path} (set translate.label_raster)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._src = rasterio.open(self.path)
        except Exception as e:
            raise DataError(f"cannot open label raster {self.path}: {type(e).__name__}") from None
        if optical is not None and Path(optical).is_file():
            self._check_against(Path(optical))
        # Footprints are in the dataset CRS: the label raster must be in it too.
        if crs is not None and not _same_crs(self._src.crs, crs):
            raise DataError(f"label raster {self.path} has CRS {self._src.crs}, the dataset has {crs}; reproject it onto the optical grid")
        self.nodata = self._src.nodata

    def _check_against(self, optical: Path) -> None:
        import rasterio

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with rasterio.open(optical) as opt:
                o_crs, o_tr, o_bounds = opt.crs, opt.transform, opt.bounds
        lab = self._src
        where = f"label raster {self.path} is not aligned with the optical raster {optical}"
        if not _same_crs(lab.crs, o_crs):
            raise DataError(f"{where}: CRS {lab.crs} vs {o_crs}; reproject it onto the optical grid")
        lt, ot = lab.transform, o_tr
        if abs(lt.a - ot.a) > 1e-6 * abs(ot.a) or abs(lt.e - ot.e) > 1e-6 * abs(ot.e) or abs(lt.b) > 1e-9 or abs(lt.d) > 1e-9:
            raise DataError(f"{where}: pixel size {lt.a:g} x {-lt.e:g} vs {ot.a:g} x {-ot.e:g}; resample it onto the optical grid")
        # Pixel corners must coincide (a whole number of pixels apart).
        fx, fy = (lt.c - ot.c) / ot.a, (lt.f - ot.f) / ot.e
        if abs(fx - round(fx)) > 1e-3 or abs(fy - round(fy)) > 1e-3:
            raise DataError(f"{where}: its grid is shifted by ({fx:.3f}, {fy:.3f}) pixels; resample it onto the optical grid")
        lb = lab.bounds
        tol = 0.5 * abs(ot.a)
        if lb.left > o_bounds.left + tol or lb.right < o_bounds.right - tol or lb.bottom > o_bounds.bottom + tol or lb.top < o_bounds.top - tol:
            raise DataError(
                f"{where}: extent {tuple(round(v, 1) for v in lb)} does not cover {tuple(round(v, 1) for v in o_bounds)}"
            )

    def read(self, bounds: tuple[float, float, float, float], shape: tuple[int, int]) -> np.ndarray:
        """Class ids (H, W) int64 inside ``bounds`` (minx, miny, maxx, maxy, metres); -1 = no label."""
        from rasterio.enums import Resampling
        from rasterio.windows import from_bounds

        win = from_bounds(*bounds, transform=self._src.transform)
        fill = self.nodata if self.nodata is not None else 255
        arr = self._src.read(1, window=win, out_shape=shape, boundless=True, fill_value=fill, resampling=Resampling.nearest)
        out = arr.astype(np.int64)
        out[arr == fill] = IGNORE_LABEL
        return out

    def close(self) -> None:
        self._src.close()


def default_label_raster(label_raster: str | None, synth_out: str) -> Path | None:
    """``translate.label_raster`` or ``<synth.out>/labels.tif`` when it exists."""
    if label_raster:
        return Path(label_raster)
    p = Path(synth_out) / "labels.tif"
    return p if p.is_file() else None


def optical_raster(tile_optical: str | None, synth_out: str, root: str | os.PathLike[str]) -> Path | None:
    """The optical raster a dataset was cut from (dataset.json ``sources``, ``tile.optical`` or
    ``<synth.out>/optical.tif``), or None when unknown or when the tiler reprojected it (then
    the dataset grid, not the source raster, is what a label raster must match)."""
    meta = read_dataset_meta(root)
    src = (meta.get("sources") or {}).get("optical") if isinstance(meta.get("sources"), dict) else None
    if isinstance(src, dict):
        if src.get("warped"):
            return None
        src = src.get("path")
    for cand in (src, tile_optical, str(Path(synth_out) / "optical.tif")):
        if isinstance(cand, str) and Path(cand).is_file():
            return Path(cand)
    return None


def dataset_crs(root: str | os.PathLike[str], anns: list[Annotation]) -> str | None:
    meta = read_dataset_meta(root)
    if isinstance(meta.get("crs"), str):
        return meta["crs"]
    return next((a.crs for a in anns if a.crs), None)


# --------------------------------------------------------------------------- patch stores


class PatchStore:
    """Patches of one split/modality in [-1, 1], decoded once and kept in RAM.

    ``size`` (H, W) forces a common pixel size (SAR patches cut from a coarser raster are
    resized to the optical patch size, so paired crops line up).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        mode: str,
        normalizer: Normalizer,
        annotations: list[Annotation],
        size: tuple[int, int] | None = None,
    ) -> None:
        self.root, self.split, self.mode = Path(root), split, mode
        self.normalizer = normalizer
        self.annotations = annotations
        self.size = size
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.annotations)

    def raw(self, i: int) -> np.ndarray:
        """The stored patch (C, H, W) float32, data units."""
        return read_patch_array(safe_image_path(self.root, self.split, self.mode, self.annotations[i].file_path))

    def get(self, i: int) -> np.ndarray:
        """(C, H, W) float32 in [-1, 1]."""
        if i not in self._cache:
            a = self.normalizer.to_unit(self.raw(i))
            if self.size is not None and a.shape[-2:] != tuple(self.size):
                t = F.interpolate(torch.from_numpy(a)[None], size=self.size, mode="bilinear", align_corners=False, antialias=True)
                a = t[0].numpy()
            self._cache[i] = a
        return self._cache[i]


class LabelStore:
    """Class-mask patches (H, W) int64 for a list of annotations (needs ``bounds``)."""

    def __init__(self, labels: LabelRaster, annotations: list[Annotation], shape: tuple[int, int]) -> None:
        missing = [a.name or str(a.id) for a in annotations if a.bounds is None]
        if missing:
            raise DataError(f"annotation {missing[0]} has no 'bounds': class masks need footprints (re-tile with this project's tiler)")
        self.labels, self.annotations, self.shape = labels, annotations, shape
        self._cache: dict[int, np.ndarray] = {}

    def get(self, i: int) -> np.ndarray:
        if i not in self._cache:
            self._cache[i] = self.labels.read(self.annotations[i].bounds, self.shape)  # type: ignore[arg-type]
        return self._cache[i]


def patch_shape(store: PatchStore) -> tuple[int, int]:
    """Pixel size (H, W) of a store's patches (after any forced resize)."""
    if store.size is not None:
        return tuple(store.size)  # type: ignore[return-value]
    return tuple(store.raw(0).shape[-2:])  # type: ignore[return-value]


def _crop_offsets(h: int, w: int, p: int, gen: torch.Generator) -> tuple[int, int, int]:
    p = min(p, h, w)
    y = int(torch.randint(0, h - p + 1, (1,), generator=gen))
    x = int(torch.randint(0, w - p + 1, (1,), generator=gen))
    return y, x, p


class PairedCrops(Dataset):
    """Random ``patch_px`` crops of co-registered pairs: {"sar", "opt"[, "sar_label", "opt_label"]}.

    No flips or rotations: a SAR image's look direction (layover, shadow) is part of what the
    translator must learn, and flipping would reverse it.
    """

    def __init__(self, sar: PatchStore, opt: PatchStore, pairs: list[tuple[int, int]], patch_px: int, labels: LabelStore | None = None, seed: int = 0) -> None:
        self.sar, self.opt, self.pairs, self.patch_px, self.labels = sar, opt, pairs, patch_px, labels
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        i, j = self.pairs[k]
        s, o = self.sar.get(i), self.opt.get(j)
        h, w = o.shape[-2:]
        y, x, p = _crop_offsets(h, w, self.patch_px, self.gen)
        out = {"sar": torch.from_numpy(s[:, y : y + p, x : x + p].copy()), "opt": torch.from_numpy(o[:, y : y + p, x : x + p].copy())}
        if self.labels is not None:
            lab = torch.from_numpy(self.labels.get(j)[y : y + p, x : x + p].copy())
            out["sar_label"] = lab
            out["opt_label"] = lab
        return out


class UnpairedCrops(Dataset):
    """Every SAR patch, each with an independently drawn optical reference (CycleGAN data).

    With ``sar_labels``/``opt_labels`` each crop carries its own class mask.
    """

    def __init__(
        self,
        sar: PatchStore,
        opt: PatchStore,
        patch_px: int,
        sar_labels: LabelStore | None = None,
        opt_labels: LabelStore | None = None,
        seed: int = 0,
    ) -> None:
        self.sar, self.opt, self.patch_px = sar, opt, patch_px
        self.sar_labels, self.opt_labels = sar_labels, opt_labels
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.sar)

    def _crop(self, store: PatchStore, labels: LabelStore | None, i: int, key: str, out: dict[str, torch.Tensor]) -> None:
        a = store.get(i)
        h, w = a.shape[-2:]
        y, x, p = _crop_offsets(h, w, self.patch_px, self.gen)
        out[key] = torch.from_numpy(a[:, y : y + p, x : x + p].copy())
        if labels is not None:
            out[f"{key}_label"] = torch.from_numpy(labels.get(i)[y : y + p, x : x + p].copy())

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        self._crop(self.sar, self.sar_labels, k, "sar", out)
        j = int(torch.randint(0, len(self.opt), (1,), generator=self.gen))
        self._crop(self.opt, self.opt_labels, j, "opt", out)
        return out


def read_split(root: str | os.PathLike[str], split: str) -> tuple[list[Annotation], list[Annotation]]:
    """(SAR annotations, optical annotations) of a split."""
    return read_annotations(root, split, "sar"), read_annotations(root, split, "opt")


def sample_indices(n: int, k: int, seed: int) -> list[int]:
    """``k`` distinct indices of ``range(n)`` (all when k >= n), sorted, seeded."""
    if k >= n:
        return list(range(n))
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n, size=k, replace=False))
