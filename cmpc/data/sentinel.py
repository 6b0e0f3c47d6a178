"""Convert a user's Sentinel-1 / Sentinel-2 rasters to the sentinel-la input conventions
(``cmpc data convert-s1`` / ``cmpc data convert-s2``), so a model trained on
../shared/data/real/sentinel-la sees what it was trained on. Evidence: docs/SENTINEL.md.

- **SAR** (sentinel-la ``NNN_sar.tif``): one band, VH, uint8; the *linear amplitude* clipped at
  the file's 99th percentile and scaled ``round(255 * A / p99)``. Inputs: GRD amplitude
  (digital numbers, integer), linear power (sigma0/beta0/gamma0 intensity, float >= 0) or
  dB (float, mostly negative); ``scale="auto"`` tells them apart (:func:`detect_sar_scale`).
  Here 0 is nodata (no sentinel-la pixel is 0: their minimum is 7..21), so valid pixels
  are written as 1..255.
- **Optical** (sentinel-la ``NNN_optical.tif``): Sentinel-2 L1C RGB = bands B04, B03, B02, uint8,
  top-of-atmosphere reflectance times 255 / ``saturation`` (default 0.2: reflectance 0.2
  maps to 255, brighter saturates; inferred, see docs), 0 = nodata. Inputs: L1C or L2A
  digital numbers (reflectance x 10000, minus ``dn_offset``: 1000 for products of
  processing baseline 04.00 and later) or float reflectance (0..1), bands in any order
  given by name (``bands``) or found in the band descriptions.
- Checks (one line each): a polarisation that is not the one asked for, dB data declared
  linear (or the reverse), an 8-bit input, a ground sampling distance beyond 0.6..1.5 x
  the 8.3 m of sentinel-la (30 m, 60 m rasters) are refused (:class:`DataError`, exit 2)
  unless ``force``, which turns them into warnings; smaller doubts (polarisation not stated,
  GSD off by more than 10 %, L2A instead of L1C) are one warning line on stderr.
Outputs keep the input's CRS and grid (the tiler views any CRS in ground metres).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from cmpc.errors import DataError

#: Ground sampling distance of sentinel-la (metres/pixel, EPSG:3395 at 34 N viewed in UTM 11N).
SENTINEL_LA_GSD_M = 8.3
GSD_REFUSE = (0.6, 1.5)  # ratio to SENTINEL_LA_GSD_M beyond which a raster is refused
GSD_WARN = 0.10  # relative difference beyond which a warning is printed
SAR_SCALES = ("auto", "amplitude", "linear", "intensity", "db")
_SAMPLE_PX = 2048  # side of the decimated read used for statistics


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def _problem(msg: str, force: bool) -> None:
    """Refuse (DataError) or, with ``force``, warn."""
    if force:
        _warn(msg + " (continuing: --force)")
    else:
        raise DataError(msg + "; use --force to convert anyway")


def _open(path: str | os.PathLike[str], role: str) -> Any:
    import rasterio

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{role} raster not found: {p}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return rasterio.open(p)
    except rasterio.errors.RasterioError as e:
        raise DataError(f"cannot open the {role} raster {p}: {str(e).splitlines()[0]}") from None


def ground_gsd_m(src: Any) -> float | None:
    """Ground metres per pixel of an open raster (in its local UTM zone when its CRS is not
    metric at the data, e.g. Mercator or degrees); None without CRS."""
    from cmpc.data.raster import ground_gsd

    if src.crs is None:
        return None
    return ground_gsd(src.crs, src.transform, src.width, src.height)


def check_gsd(gsd: float | None, force: bool, what: str) -> None:
    """Refuse a GSD beyond :data:`GSD_REFUSE` x 8.3 m, warn beyond 10 % (one line)."""
    if gsd is None:
        _warn(f"the {what} has no CRS: its ground sampling distance cannot be checked against sentinel-la's {SENTINEL_LA_GSD_M} m")
        return
    r = gsd / SENTINEL_LA_GSD_M
    if not GSD_REFUSE[0] <= r <= GSD_REFUSE[1]:
        _problem(
            f"the {what} is at {gsd:.1f} m/px but sentinel-la models are trained at {SENTINEL_LA_GSD_M} m/px ({r:.2f} x); "
            f"resample it first (gdalwarp -tr {SENTINEL_LA_GSD_M} {SENTINEL_LA_GSD_M} -r average)", force)
    elif abs(r - 1.0) > GSD_WARN:
        _warn(f"the {what} is at {gsd:.1f} m/px, {abs(r - 1) * 100:.0f} % off sentinel-la's {SENTINEL_LA_GSD_M} m/px: patches cover a different ground size")


def _sample(src: Any, band: int) -> np.ndarray:
    """Finite, non-nodata values of ``band`` from a decimated read (at most 2048 px a side)."""
    f = max(1, math.ceil(max(src.width, src.height) / _SAMPLE_PX))
    shape = (max(1, src.height // f), max(1, src.width // f))
    a = src.read(band, out_shape=shape, out_dtype="float64")
    ok = np.isfinite(a)
    nd = src.nodatavals[band - 1]
    if nd is not None and math.isfinite(nd):
        ok &= a != nd
    return a[ok]


# --------------------------------------------------------------------------- Sentinel-1


def detect_polarisation(src: Any, path: Path, band: int) -> str | None:
    """VV / VH / HH / HV from the band description, band or dataset tags, or the file name; None if unstated."""
    texts = [src.descriptions[band - 1] or "", json.dumps(src.tags(band)), json.dumps(src.tags()), path.stem]
    for t in texts:
        m = re.search(r"(?<![a-z])(vv|vh|hh|hv)(?![a-z])", t, flags=re.IGNORECASE)
        if m:
            return m.group(1).upper()
    return None


def detect_sar_scale(values: np.ndarray, dtype: str) -> tuple[str, str]:
    """(``"db"``, ``"amplitude"`` or ``"intensity"``, the evidence in words) for SAR ``values``.

    dB: more than 5 % negative values, or all within -60..+30 with a negative median
    (backscatter in dB is mostly -30..0). Otherwise integers are GRD amplitude digital
    numbers, non-negative floats are linear power (calibrated sigma0, median < 1) or
    amplitude (median >= 1: digital numbers stored as float).
    """
    v = values[np.isfinite(values)]
    if v.size == 0:
        raise DataError("the SAR raster holds no valid value (all nodata / NaN)")
    neg = float(np.mean(v < 0))
    med = float(np.median(v))
    if neg > 0.05 or (med < 0 and v.min() >= -60 and v.max() <= 30):
        return "db", f"{neg:.0%} negative values, median {med:.2f}"
    if np.issubdtype(np.dtype(dtype), np.integer):
        return "amplitude", f"integer {dtype} >= 0 (GRD digital numbers), median {med:.0f}"
    if med < 1.0:
        return "intensity", f"float >= 0 with median {med:.4f} (calibrated linear power)"
    return "amplitude", f"float >= 0 with median {med:.1f} (digital numbers)"


def to_amplitude(values: np.ndarray, scale: str) -> np.ndarray:
    """Linear amplitude from ``amplitude`` (as is), ``intensity``/``linear`` (sqrt) or ``db``
    (10 ** (dB / 20), dB of power)."""
    v = values.astype(np.float64)
    if scale == "amplitude":
        return v
    if scale in ("intensity", "linear"):
        return np.sqrt(np.maximum(v, 0.0))
    if scale == "db":
        return np.power(10.0, v / 20.0)
    raise ValueError(scale)


def convert_s1(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    pol: str = "VH",
    scale: str = "auto",
    band: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write ``in_path`` (Sentinel-1 GRD: amplitude, linear power or dB) as a sentinel-la SAR
    file: one uint8 band, linear amplitude clipped at its 99th percentile, ``round(255 * A / p99)``
    (valid pixels 1..255, 0 = nodata). Returns the facts (also stored as the output's
    ``cmpc_convert`` tag). Raises :class:`DataError` (one line) on a refused mismatch."""
    import rasterio

    pol = pol.upper()
    if scale not in SAR_SCALES:
        raise DataError(f"--scale {scale!r} is not one of {list(SAR_SCALES)}")
    ip = Path(in_path)
    with _open(ip, "SAR") as src:
        if band is None:
            found = [detect_polarisation(src, Path(""), b) for b in range(1, src.count + 1)] if src.count > 1 else []
            if src.count > 1:
                if pol not in found:
                    raise DataError(
                        f"{ip.name} has {src.count} bands ({', '.join(str(f) for f in found)}) and none is named {pol}; "
                        f"pick one with --band N")
                band = found.index(pol) + 1
            else:
                band = 1
        if not 1 <= band <= src.count:
            raise DataError(f"--band {band} is beyond {ip.name}, which has {src.count} band(s)")
        dtype = src.dtypes[band - 1]
        if dtype == "uint8":
            _problem(f"{ip.name} is already 8-bit: its scaling is unknown (a sentinel-la file needs no conversion)", force)
        found_pol = detect_polarisation(src, ip, band)
        if found_pol is None:
            _warn(f"{ip.name} does not state its polarisation; taken as {pol} (--pol)")
        elif found_pol != pol:
            _problem(f"{ip.name} band {band} is {found_pol} but {pol} was asked (sentinel-la models are trained on VH)", force)
        if pol != "VH":
            _warn(f"converting {pol}: sentinel-la models are trained on VH")
        check_gsd(ground_gsd_m(src), force, f"SAR raster {ip.name}")
        sample = _sample(src, band)
        detected, why = detect_sar_scale(sample, dtype)
        if scale == "auto":
            used = detected
        else:
            used = "intensity" if scale == "linear" else scale
            if (used == "db") != (detected == "db"):
                _problem(f"{ip.name} looks like {'dB' if detected == 'db' else 'linear'} data ({why}) but --scale {scale} was given", force)
        amp = to_amplitude(sample, used)
        amp = amp[np.isfinite(amp) & (amp > 0)]
        if amp.size == 0:
            raise DataError(f"{ip.name}: no positive amplitude to scale")
        p99 = float(np.percentile(amp, 99))
        nd = src.nodatavals[band - 1]
        facts = {
            "kind": "sentinel-1", "input": str(ip), "band": band, "polarisation": found_pol or f"{pol} (assumed)",
            "scale": used, "scale_detected": detected, "scale_evidence": why, "p99_amplitude": p99,
            "rule": "uint8 = clip(round(255 * amplitude / p99), 1, 255); 0 = nodata", "gsd_m": ground_gsd_m(src),
        }
        profile = _out_profile(src, 1)
        with rasterio.open(Path(out_path), "w", **profile) as dst:
            for _, win in src.block_windows(band):
                a = src.read(band, window=win, out_dtype="float64")
                bad = ~np.isfinite(a)
                if nd is not None and math.isfinite(nd):
                    bad |= a == nd
                A = to_amplitude(np.where(bad, 0.0, a), used)
                if used != "db":
                    bad |= ~(A > 0)  # GRD border fill is 0
                u8 = np.clip(np.rint(255.0 * A / p99), 1, 255).astype(np.uint8)
                u8[bad] = 0
                dst.write(u8, 1, window=win)
            dst.set_band_description(1, pol)
            dst.update_tags(cmpc_convert=json.dumps(facts))
    return facts


# --------------------------------------------------------------------------- Sentinel-2


def _band_names(src: Any, bands: str | None, ip: Path) -> list[str]:
    if bands:
        names = [b.strip().upper() for b in bands.split(",") if b.strip()]
        if len(names) != src.count:
            raise DataError(f"--bands names {len(names)} band(s) but {ip.name} has {src.count}; list every band of the file in its order")
        return [_norm_band(n) for n in names]
    desc = [(d or "").strip().upper() for d in src.descriptions]
    if all(re.fullmatch(r"B0?\d{1,2}A?", d) for d in desc):
        return [_norm_band(d) for d in desc]
    if src.count == 3:
        _warn(f"{ip.name} does not name its 3 bands; taken as B04,B03,B02 (red, green, blue): say --bands otherwise")
        return ["B04", "B03", "B02"]
    raise DataError(f"{ip.name} has {src.count} bands without names; list them in file order with --bands, e.g. --bands B02,B03,B04,B08")


def _norm_band(n: str) -> str:
    m = re.fullmatch(r"B0?(\d{1,2})(A?)", n.upper())
    if not m:
        raise DataError(f"band name {n!r} is not a Sentinel-2 band (B01..B12, B8A)")
    return f"B{int(m.group(1)):02d}{m.group(2)}"


def convert_s2(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    bands: str | None = None,
    level: str = "L1C",
    dn_offset: float = 0.0,
    saturation: float = 0.2,
    force: bool = False,
) -> dict[str, Any]:
    """Write ``in_path`` (Sentinel-2 L1C/L2A, digital numbers or reflectance, bands in any
    order) as a sentinel-la optical file: B04, B03, B02 as uint8 ``round(255 * reflectance /
    saturation)`` clipped to 1..255, 0 = nodata. Returns the facts (also the output's
    ``cmpc_convert`` tag)."""
    import rasterio

    level = level.upper()
    if level not in ("L1C", "L2A"):
        raise DataError(f"--level {level!r} is not L1C or L2A")
    if not saturation > 0:
        raise DataError("--saturation must be a reflectance above 0 (sentinel-la: 0.2)")
    ip = Path(in_path)
    with _open(ip, "optical") as src:
        names = _band_names(src, bands, ip)
        missing = [b for b in ("B04", "B03", "B02") if b not in names]
        if missing:
            raise DataError(f"{ip.name} lacks {', '.join(missing)} (its bands: {','.join(names)}); sentinel-la optical is B04,B03,B02")
        idx = [names.index(b) + 1 for b in ("B04", "B03", "B02")]
        dtype = src.dtypes[idx[0] - 1]
        if dtype == "uint8":
            _problem(f"{ip.name} is already 8-bit: its scaling is unknown (a sentinel-la file needs no conversion)", force)
        if level == "L2A":
            _warn("L2A is surface reflectance; sentinel-la models are trained on L1C (top of atmosphere, hazier and brighter in blue): expect a domain shift")
        check_gsd(ground_gsd_m(src), force, f"optical raster {ip.name}")
        sample = _sample(src, idx[0])
        is_reflectance = not np.issubdtype(np.dtype(dtype), np.integer) and sample.size and float(np.percentile(sample, 99)) <= 2.0
        gain = 1.0 if is_reflectance else 1.0 / 10000.0
        offset = 0.0 if is_reflectance else float(dn_offset)
        if not is_reflectance and sample.size and float(np.percentile(sample, 50)) < 50:
            _problem(f"{ip.name} red median is {np.percentile(sample, 50):.1f}: not Sentinel-2 digital numbers (reflectance x 10000)", force)
        facts = {
            "kind": "sentinel-2", "input": str(ip), "bands_in": names, "bands_out": ["B04", "B03", "B02"], "level": level,
            "values": "reflectance" if is_reflectance else f"digital numbers: reflectance = (DN - {offset:g}) / 10000",
            "rule": f"uint8 = clip(round(255 * reflectance / {saturation:g}), 1, 255); 0 = nodata", "gsd_m": ground_gsd_m(src),
        }
        nd = src.nodatavals[idx[0] - 1]
        with rasterio.open(Path(out_path), "w", **_out_profile(src, 3)) as dst:
            for _, win in src.block_windows(idx[0]):
                a = src.read(idx, window=win, out_dtype="float64")
                bad = np.any(~np.isfinite(a), axis=0)
                if nd is not None and math.isfinite(nd):
                    bad |= np.all(a == nd, axis=0)
                if not is_reflectance:
                    bad |= np.all(a == 0, axis=0)  # L1C/L2A fill value
                refl = (np.where(np.isfinite(a), a, 0.0) - offset) * gain
                u8 = np.clip(np.rint(255.0 * refl / saturation), 1, 255).astype(np.uint8)
                u8[:, bad] = 0
                dst.write(u8, window=win)
            for i, b in enumerate(("B04", "B03", "B02"), start=1):
                dst.set_band_description(i, b)
            dst.update_tags(cmpc_convert=json.dumps(facts))
    return facts


def _out_profile(src: Any, count: int) -> dict[str, Any]:
    """A tiled, deflated uint8 GeoTIFF on the input's grid, 0 = nodata."""
    prof = {
        "driver": "GTiff", "width": src.width, "height": src.height, "count": count, "dtype": "uint8",
        "crs": src.crs, "transform": src.transform, "nodata": 0, "compress": "deflate",
    }
    if src.width >= 256 and src.height >= 256:
        prof.update(tiled=True, blockxsize=256, blockysize=256)
    return prof
