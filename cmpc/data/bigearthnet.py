"""Reader for the real BigEarthNet Sentinel-1 / Sentinel-2 patch pairs (a 60-way check).

The folder (``../shared/data/real/bigearthnet-s1s2``, README.md there) holds two layouts:

- ``ben_common_geotiff/BigEarthNet-S1-Example/<S1 patch>/<S1 patch>_{VV,VH}.tif`` (float32 dB)
  and ``BigEarthNet-S2-Example/<S2 patch>/<S2 patch>_B??.tif`` (uint16), one file per band,
  paired through the S1 ``*_labels_metadata.json`` key ``corresponding_s2_patch``;
- ``configilm_mock_npz/*.npz`` (keys ``VV``, ``VH`` float32 dB; ``B02``, ``B03``, ``B04``,
  ``B08`` uint16), listed by ``configilm_mock_npz/pairs.csv``.

Every patch is 120 x 120 px at 10 m (1200 m x 1200 m). :func:`load_bigearthnet_pairs` returns
them as :class:`BenPair`: SAR (2, 120, 120) float32 = (VV, VH) in dB as stored, optical
(3 or 4, 120, 120) float32 = (B04, B03, B02[, B08]) surface reflectance DN (red, green, blue
[, near infrared]). Missing or corrupt files stop with one line (:class:`DataError`).
"""

from __future__ import annotations

import csv
import json
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cmpc.errors import DataError

#: Patch side, pixels (10 m each).
PATCH_PX = 120
#: SAR bands, in the order of :attr:`BenPair.sar`.
SAR_BANDS: tuple[str, ...] = ("VV", "VH")
#: Optical bands (red, green, blue), in the order of :attr:`BenPair.optical`; B08 (NIR) is appended with ``nir=True``.
RGB_BANDS: tuple[str, ...] = ("B04", "B03", "B02")
NIR_BAND = "B08"

GEOTIFF_DIR = "ben_common_geotiff"
NPZ_DIR = "configilm_mock_npz"
PAIRS_CSV = "pairs.csv"


@dataclass
class BenPair:
    """One co-located Sentinel-1 / Sentinel-2 patch pair (acquisitions a few days apart).

    ``sar``: float32 (2, 120, 120), VV and VH backscatter in dB.
    ``optical``: float32 (C, 120, 120), B04, B03, B02 (and B08 when asked) reflectance DN.
    """

    name: str
    s1_name: str
    source: str  # "geotiff" | "npz"
    sar: np.ndarray
    optical: np.ndarray
    labels: list[str] = field(default_factory=list)
    path: str = ""  # the .npz file, or the S2 patch folder


def _check_band(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.shape != (PATCH_PX, PATCH_PX):
        raise DataError(f"{what} has shape {tuple(arr.shape)}, expected ({PATCH_PX}, {PATCH_PX}) (a BigEarthNet 10 m band)")
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
    return out


def _read_tif_band(path: Path) -> np.ndarray:
    """First band of a single-band GeoTIFF as float32 (120, 120)."""
    if not path.is_file():
        raise DataError(f"missing BigEarthNet band file {path}")
    try:
        import rasterio

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BigEarthNet GeoTIFFs carry no georeferencing warnings worth showing
            with rasterio.open(path) as src:
                arr = src.read(1)
    except Exception as e:  # rasterio raises several types for corrupt files
        raise DataError(f"cannot read BigEarthNet band {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return _check_band(arr, str(path))


def _optical_bands(nir: bool) -> tuple[str, ...]:
    return RGB_BANDS + ((NIR_BAND,) if nir else ())


def read_geotiff_pairs(root: str | os.PathLike[str], nir: bool = False) -> list[BenPair]:
    """Pairs of ``ROOT/ben_common_geotiff`` (one GeoTIFF per band), sorted by S2 name."""
    base = Path(root) / GEOTIFF_DIR
    s1_dir, s2_dir = base / "BigEarthNet-S1-Example", base / "BigEarthNet-S2-Example"
    for d in (s1_dir, s2_dir):
        if not d.is_dir():
            raise DataError(f"BigEarthNet GeoTIFF folder {d} not found")
    pairs: list[BenPair] = []
    for s1 in sorted(p for p in s1_dir.iterdir() if p.is_dir()):
        meta_path = s1 / f"{s1.name}_labels_metadata.json"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            s2_name = str(meta["corresponding_s2_patch"])
        except FileNotFoundError:
            raise DataError(f"missing BigEarthNet metadata {meta_path}") from None
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise DataError(f"corrupt BigEarthNet metadata {meta_path}: no 'corresponding_s2_patch'") from None
        s2 = s2_dir / s2_name
        if not s2.is_dir():
            raise DataError(f"S1 patch {s1.name} names S2 patch {s2_name}, but {s2} is missing")
        sar = np.stack([_read_tif_band(s1 / f"{s1.name}_{b}.tif") for b in SAR_BANDS])
        opt = np.stack([_read_tif_band(s2 / f"{s2_name}_{b}.tif") for b in _optical_bands(nir)])
        pairs.append(BenPair(s2_name, s1.name, "geotiff", sar, opt, [str(x) for x in meta.get("labels", [])], str(s2)))
    return sorted(pairs, key=lambda p: p.name)


def read_npz_pair(path: str | os.PathLike[str], nir: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(sar (2, 120, 120), optical (C, 120, 120)) float32 of one ConfigILM ``.npz`` pair."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"missing BigEarthNet pair file {p}")
    try:
        with np.load(p, allow_pickle=False) as z:
            keys = set(z.files)
            want = SAR_BANDS + _optical_bands(nir)
            missing = [k for k in want if k not in keys]
            if missing:
                raise DataError(f"BigEarthNet pair {p} has no band {missing[0]} (it has {sorted(keys)})")
            bands = {k: np.asarray(z[k]) for k in want}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read BigEarthNet pair {p}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    sar = np.stack([_check_band(bands[b], f"{p} band {b}") for b in SAR_BANDS])
    opt = np.stack([_check_band(bands[b], f"{p} band {b}") for b in _optical_bands(nir)])
    return sar, opt


def read_npz_pairs(root: str | os.PathLike[str], nir: bool = False) -> list[BenPair]:
    """Pairs listed by ``ROOT/configilm_mock_npz/pairs.csv``, in its order."""
    base = Path(root) / NPZ_DIR
    csv_path = base / PAIRS_CSV
    if not csv_path.is_file():
        raise DataError(f"BigEarthNet pair list {csv_path} not found")
    try:
        with csv_path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read {csv_path}: {e}") from None
    if rows and not {"file", "s2_name", "s1_name"} <= set(rows[0]):
        raise DataError(f"{csv_path} needs the columns file, s2_name, s1_name")
    pairs: list[BenPair] = []
    for row in rows:
        name = row["file"]
        if not name or Path(name).name != name:
            raise DataError(f"{csv_path}: bad file name {name!r} (plain .npz names only)")
        sar, opt = read_npz_pair(base / name, nir)
        labels = [x for x in (row.get("labels") or "").split("|") if x]
        pairs.append(BenPair(row["s2_name"], row["s1_name"], "npz", sar, opt, labels, str(base / name)))
    return pairs


def load_bigearthnet_pairs(root: str | os.PathLike[str], nir: bool = False) -> list[BenPair]:
    """All pairs of a ``bigearthnet-s1s2`` folder: the GeoTIFF ones, then the ``.npz`` ones.

    ``nir`` adds B08 as a fourth optical band. Raises :class:`DataError` (one line) when the
    folder, a band file or a listed pair is missing or unreadable, or when two pairs share an
    S2 patch name (a duplicate would make retrieval ambiguous).
    """
    r = Path(root)
    if not r.is_dir():
        raise DataError(f"BigEarthNet folder {r} not found (expected ../shared/data/real/bigearthnet-s1s2)")
    pairs = read_geotiff_pairs(r, nir) + read_npz_pairs(r, nir)
    seen: set[str] = set()
    for p in pairs:
        if p.name in seen:
            raise DataError(f"BigEarthNet S2 patch {p.name} appears twice in {r}")
        seen.add(p.name)
    return pairs
