"""Input conventions of a shipped model, and the checks that keep other data out.

A model card (:mod:`cmpc.models.card`) states under ``inputs`` what its embedder was trained
on; :class:`InputConventions` is that statement, validated. Before ``cmpc index build
--model`` embeds an optical map, ``cmpc localize --model`` embeds SAR queries or ``cmpc
georef --model`` a SAR scene, the ``check_*`` functions compare the files with it. Nothing is silently fed:

- **refused** (one-line :class:`~cmpc.errors.DataError`, exit 2), with the numbers and the fix:
  another band count than the model's; SAR that looks like dB (mostly negative, or a
  negative median within -60..30 dB: :func:`cmpc.data.sentinel.detect_sar_scale`) or any
  other non-``uint8`` SAR (linear power, 16-bit digital numbers) where ``uint8`` amplitude
  is expected -> ``cmpc data convert-s1``; optical float reflectance (99th percentile <= 2)
  or 16-bit digital numbers where ``uint8`` is expected -> ``cmpc data convert-s2``; optical
  bands whose descriptions name Sentinel-2 bands in another order than the model's
  (e.g. B02,B03,B04) -> ``convert-s2`` or ``index.bands``; a ground sampling distance
  outside the card's ``gsd_m`` range (e.g. a 30 m map where 8.3 m was trained) ->
  ``gdalwarp -tr``.
- **warned** (one line ``warning: ...`` on stderr; the run goes on): SAR whose band
  description, tags or file name say another polarisation than the model's (VV where VH was
  trained: still amplitude in the right scaling, only the channel differs, and users with
  only VV can still get answers, weaker ones); a GSD that cannot be checked (a patch folder
  without georeferencing).

The GSD is the ground metres per pixel of the raster's working grid
(:func:`cmpc.data.raster.open_raster`: its own CRS when metric at the data, else its local
UTM zone; a World Mercator map at 34 N is thus measured in UTM metres, not Mercator ones).
Patch files of a CMPC dataset are checked on a sample (their annotation ``gsd`` gives the
GSD).
"""

from __future__ import annotations

import math
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmpc.errors import ConfigError, DataError

#: patch files read when a folder or dataset split is checked
PATCH_SAMPLE = 8
_S2_BAND = re.compile(r"B0?(\d{1,2})(A?)", re.IGNORECASE)


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


@dataclass(frozen=True)
class ModalitySpec:
    """What one modality's input must look like: ``bands`` (count), ``band_names`` (e.g.
    ``["VH"]`` or ``["B04", "B03", "B02"]``), ``dtype`` (numpy name, e.g. ``uint8``),
    ``scaling`` (words), ``product`` (words), ``polarisation`` (SAR: VV / VH / HH / HV)."""

    bands: int
    band_names: tuple[str, ...] = ()
    dtype: str = "uint8"
    scaling: str = ""
    product: str = ""
    polarisation: str | None = None

    def summary(self) -> str:
        """e.g. ``1 band VH uint8 (linear amplitude clipped at p99 -> uint8)``."""
        names = ",".join(self.band_names)
        return f"{self.bands} band(s) {names + ' ' if names else ''}{self.dtype}{f' ({self.scaling})' if self.scaling else ''}"


@dataclass(frozen=True)
class InputConventions:
    """A card's ``inputs``: the SAR and optical specs, the accepted ground sampling distance
    ``gsd_m`` = (min, max) metres/pixel, and ``patch_m``, the side of a training patch on the
    ground in metres (reference patches of a new map are cut to cover the same ground);
    optional ``ref_stride_m``, the spacing of a new map's reference grid on the ground in metres
    (default ``patch_m / 2``)."""

    sar: ModalitySpec
    optical: ModalitySpec
    gsd_m: tuple[float, float]
    patch_m: float
    ref_stride_m: float | None = None

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> InputConventions:
        """Validate a card's ``inputs`` object; one-line :class:`ConfigError` naming ``where`` otherwise."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: 'inputs' must be an object with 'sar', 'optical', 'gsd_m' and 'patch_m'")
        for key in ("sar", "optical", "gsd_m", "patch_m"):
            if key not in raw:
                raise ConfigError(f"{where}: 'inputs.{key}' is missing")
        unknown = sorted(set(raw) - _INPUT_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key 'inputs.{unknown[0]}'; valid: {sorted(_INPUT_KEYS)}")
        gsd = raw["gsd_m"]
        if (not isinstance(gsd, list) or len(gsd) != 2 or not all(_is_num(v) and v > 0 for v in gsd) or gsd[0] > gsd[1]):
            raise ConfigError(f"{where}: 'inputs.gsd_m' must be [min, max] metres/pixel with 0 < min <= max, got {gsd!r}")
        if not _is_num(raw["patch_m"]) or raw["patch_m"] <= 0:
            raise ConfigError(f"{where}: 'inputs.patch_m' must be the training patch side in metres (> 0), got {raw['patch_m']!r}")
        stride = raw.get("ref_stride_m")
        if stride is not None and (not _is_num(stride) or not 0 < stride <= raw["patch_m"]):
            raise ConfigError(f"{where}: 'inputs.ref_stride_m' must be the reference spacing in metres (0 < it <= patch_m), got {stride!r}")
        return cls(_spec(raw["sar"], f"{where}: inputs.sar", sar=True), _spec(raw["optical"], f"{where}: inputs.optical", sar=False),
                   (float(gsd[0]), float(gsd[1])), float(raw["patch_m"]), float(stride) if stride is not None else None)

    def patch_px(self, gsd_m: float) -> int:
        """Reference patch side in pixels of a map at ``gsd_m`` metres/pixel covering ``patch_m`` metres (at least 8)."""
        return max(8, int(round(self.patch_m / gsd_m)))

    def stride_px(self, gsd_m: float) -> int:
        """Reference grid stride in pixels of a map at ``gsd_m`` metres/pixel: ``ref_stride_m``
        on the ground, else half a patch (at least 1)."""
        if self.ref_stride_m is None:
            return max(1, self.patch_px(gsd_m) // 2)
        return max(1, int(round(self.ref_stride_m / gsd_m)))


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_INPUT_KEYS = {"sar", "optical", "gsd_m", "patch_m", "ref_stride_m"}
_SPEC_KEYS = {"bands", "band_names", "dtype", "scaling", "product", "polarisation"}


def _spec(raw: Any, where: str, *, sar: bool) -> ModalitySpec:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be an object")
    unknown = sorted(set(raw) - _SPEC_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}'; valid: {sorted(_SPEC_KEYS)}")
    bands = raw.get("bands")
    if not isinstance(bands, int) or isinstance(bands, bool) or not 1 <= bands <= 64:
        raise ConfigError(f"{where}.bands must be a band count 1..64, got {bands!r}")
    names = raw.get("band_names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or (names and len(names) != bands):
        raise ConfigError(f"{where}.band_names must list {bands} band name(s), got {names!r}")
    dtype = raw.get("dtype", "uint8")
    try:
        np.dtype(dtype)
    except TypeError:
        raise ConfigError(f"{where}.dtype {dtype!r} is not a numpy data type (e.g. uint8)") from None
    pol = raw.get("polarisation")
    if pol is not None and (not isinstance(pol, str) or pol.upper() not in ("VV", "VH", "HH", "HV")):
        raise ConfigError(f"{where}.polarisation must be VV, VH, HH or HV, got {pol!r}")
    if pol is not None and not sar:
        raise ConfigError(f"{where}.polarisation is for SAR only")
    return ModalitySpec(bands, tuple(str(n).upper() for n in names), str(np.dtype(dtype)), str(raw.get("scaling", "")),
                        str(raw.get("product", "")), pol.upper() if pol else None)


# --------------------------------------------------------------------------- checks


def _check_gsd(gsd: float | None, conv: InputConventions, what: str) -> None:
    lo, hi = conv.gsd_m
    if gsd is None:
        _warn(f"{what} has no georeferencing: its ground sampling distance cannot be checked against the model's {lo:g}-{hi:g} m/px")
        return
    if not lo <= gsd <= hi:
        mid = math.sqrt(lo * hi)
        raise DataError(
            f"{what} is at {gsd:.2f} m/px but the model takes {lo:g}-{hi:g} m/px (model card inputs.gsd_m); "
            f"resample it into that range first (e.g. gdalwarp -tr {mid:.1f} {mid:.1f} -r average)"
        )


def _check_count(count: int, spec: ModalitySpec, what: str, convert: str, band_key: str) -> None:
    if count != spec.bands:
        raise DataError(
            f"{what} has {count} band(s) but the model takes {spec.summary()}; "
            f"select bands with {band_key} or convert it with {convert}"
        )


def _sar_values(values: np.ndarray, dtype: str, spec: ModalitySpec, what: str) -> None:
    """Refuse SAR values that are not in the model's data type (dB, linear power, 16-bit)."""
    from cmpc.data.sentinel import detect_sar_scale

    if np.dtype(dtype) == np.dtype(spec.dtype):
        return
    scale, why = detect_sar_scale(values, dtype) if values.size else ("unknown", "no valid value")
    kind = {"db": "dB", "intensity": "linear power", "amplitude": "unscaled amplitude"}.get(scale, scale)
    raise DataError(
        f"{what} holds {dtype} {kind} values ({why}) but the model takes {spec.summary()}; "
        f"convert it with cmpc data convert-s1 IN OUT --pol {spec.polarisation or 'VH'}"
    )


def _optical_values(values: np.ndarray, dtype: str, spec: ModalitySpec, what: str) -> None:
    """Refuse optical values that are not in the model's data type (float reflectance, 16-bit DN)."""
    if np.dtype(dtype) == np.dtype(spec.dtype):
        return
    if values.size and not np.issubdtype(np.dtype(dtype), np.integer) and float(np.percentile(values, 99)) <= 2.0:
        kind = f"reflectance (99th percentile {float(np.percentile(values, 99)):.3f})"
    elif np.issubdtype(np.dtype(dtype), np.integer):
        kind = f"digital numbers (median {float(np.median(values)) if values.size else float('nan'):.0f})"
    else:
        kind = "values"
    raise DataError(
        f"{what} holds {dtype} {kind} but the model takes {spec.summary()}; "
        f"convert it with cmpc data convert-s2 IN OUT --bands <its band names in file order>"
    )


def _check_polarisation(found: str | None, spec: ModalitySpec, what: str) -> None:
    if spec.polarisation and found and found != spec.polarisation:
        _warn(f"{what} says {found} but the model was trained on {spec.polarisation}: expect weaker answers "
              f"(convert a {spec.polarisation} band with cmpc data convert-s1 --pol {spec.polarisation} if you have one)")


def _check_band_order(descriptions: Sequence[str | None], spec: ModalitySpec, what: str) -> None:
    """Refuse optical bands that name Sentinel-2 bands in another order than the model's."""
    want = [n for n in spec.band_names if _S2_BAND.fullmatch(n)]
    if not want or len(want) != len(spec.band_names):
        return
    got = []
    for d in descriptions:
        m = _S2_BAND.fullmatch((d or "").strip())
        if not m:
            return  # unnamed bands: nothing to compare
        got.append(f"B{int(m.group(1)):02d}{m.group(2).upper()}")
    if got != want:
        raise DataError(
            f"{what} bands are {','.join(got)} but the model takes {','.join(want)} in that order; "
            f"reorder with index.bands (1-based) or convert it with cmpc data convert-s2 IN OUT --bands {','.join(got)}"
        )


def _file_sample(path: Path, band: int) -> np.ndarray:
    """Finite, non-nodata values of ``band`` (1-based) of the file at ``path``, read decimated to at most 1024 px a side."""
    import rasterio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path) as f:
            k = max(1, math.ceil(max(f.width, f.height) / 1024))
            a = f.read(band, out_shape=(max(1, f.height // k), max(1, f.width // k)), out_dtype="float64")
            nd = f.nodatavals[band - 1]
    ok = np.isfinite(a)
    if nd is not None and math.isfinite(nd):
        ok &= a != nd
    return a[ok]


def _file_polarisation(path: Path, band: int) -> str | None:
    """The polarisation the file states for ``band`` (description, tags, file name), or None."""
    import rasterio

    from cmpc.data.sentinel import detect_polarisation

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path) as f:
            return detect_polarisation(f, path, band)


def check_sar_raster(path: str | os.PathLike[str], conv: InputConventions, bands: Sequence[int] | None = None) -> dict[str, Any]:
    """Check a SAR GeoTIFF (``localize --queries S1.tif``) against ``conv.sar``; return the facts
    (``bands``, ``dtype``, ``gsd_m``, ``polarisation``). Refusals and warnings: module doc."""
    from cmpc.data.raster import open_raster

    p = Path(path)
    what = f"the SAR raster {p.name}"
    spec = conv.sar
    with open_raster(p, bands=bands, role="query SAR") as src:
        _check_count(src.count, spec, what, f"cmpc data convert-s1 IN OUT --pol {spec.polarisation or 'VH'}", "localize.raster_bands")
        values = _file_sample(p, src.bands[0]) if np.dtype(src.source_dtype) != np.dtype(spec.dtype) else np.zeros(0)
        _sar_values(values, src.source_dtype, spec, what)
        pol = _file_polarisation(p, src.bands[0])
        _check_polarisation(pol, spec, what)
        gsd = float(src.grid.gsd_m)
        _check_gsd(gsd, conv, what)
        return {"bands": src.count, "dtype": src.source_dtype, "gsd_m": gsd, "polarisation": pol}


def check_optical_raster(path: str | os.PathLike[str], conv: InputConventions, bands: Sequence[int] | None = None) -> dict[str, Any]:
    """Check an optical map (``index build --raster MAP.tif``) against ``conv.optical``; return
    the facts (``bands``, ``dtype``, ``gsd_m``). Refusals: module doc."""
    from cmpc.data.raster import open_raster

    p = Path(path)
    what = f"the optical map {p.name}"
    spec = conv.optical
    with open_raster(p, bands=bands, role="optical map") as src:
        _check_count(src.count, spec, what, "cmpc data convert-s2", "index.bands")
        values = _file_sample(p, src.bands[0]) if np.dtype(src.source_dtype) != np.dtype(spec.dtype) else np.zeros(0)
        _optical_values(values, src.source_dtype, spec, what)
        _check_band_order(src.descriptions, spec, what)
        gsd = float(src.grid.gsd_m)
        _check_gsd(gsd, conv, what)
        return {"bands": src.count, "dtype": src.source_dtype, "gsd_m": gsd}


def _patch_facts(path: Path) -> tuple[int, str, np.ndarray, list[str | None], str | None, float | None]:
    """(bands, dtype, values of band 1, band descriptions, polarisation stated, GSD m/px or None) of one patch file."""
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        import rasterio

        from cmpc.data.sentinel import detect_polarisation, ground_gsd_m

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                with rasterio.open(path) as src:
                    a = src.read(1).astype(np.float64)
                    nd = src.nodata
                    ok = np.isfinite(a) & ((a != nd) if nd is not None and math.isfinite(nd) else True)
                    gsd = ground_gsd_m(src) if src.crs is not None and src.transform != rasterio.Affine.identity() else None
                    return src.count, src.dtypes[0], a[ok], list(src.descriptions), detect_polarisation(src, path, 1), gsd
            except rasterio.errors.RasterioError as e:
                raise DataError(f"cannot read the patch {path}: {str(e).splitlines()[0]}") from None
    from PIL import Image

    try:
        with Image.open(path) as im:
            a = np.asarray(im)
    except OSError as e:
        raise DataError(f"cannot read the patch {path}: {e}") from None
    count = 1 if a.ndim == 2 else int(a.shape[-1])
    first = a if a.ndim == 2 else a[..., 0]
    return count, a.dtype.name, first.astype(np.float64).ravel(), [None] * count, None, None


def check_patch_files(
    paths: Sequence[str | os.PathLike[str]], conv: InputConventions, modality: str, gsd_m: float | None = None,
) -> dict[str, Any]:
    """Check a sample (:data:`PATCH_SAMPLE`, spread over the list) of patch files of one
    ``modality`` (``sar`` or ``opt``) against the card; ``gsd_m``: their ground sampling
    distance when known (annotation ``gsd``), else read from georeferenced TIFF patches.
    Returns the facts of the first patch. Refusals and warnings: module doc."""
    if modality not in ("sar", "opt"):
        raise ValueError(modality)
    if not paths:
        return {}
    step = max(1, len(paths) // PATCH_SAMPLE)
    sample = [Path(paths[i]) for i in range(0, len(paths), step)][:PATCH_SAMPLE]
    spec = conv.sar if modality == "sar" else conv.optical
    facts: dict[str, Any] = {}
    pols: set[str] = set()
    for p in sample:
        count, dtype, values, desc, pol, gsd = _patch_facts(p)
        what = f"the {'SAR' if modality == 'sar' else 'optical'} patch {p.name} (of {len(paths)} in {p.parent})"
        if modality == "sar":
            _check_count(count, spec, what, f"cmpc data convert-s1 on the source raster, --pol {spec.polarisation or 'VH'}", "localize.raster_bands")
            _sar_values(values, dtype, spec, what)
            if pol:
                pols.add(pol)
        else:
            _check_count(count, spec, what, "cmpc data convert-s2 on the source raster", "index.bands")
            _optical_values(values, dtype, spec, what)
            _check_band_order(desc, spec, what)
        if not facts:
            facts = {"bands": count, "dtype": dtype, "gsd_m": gsd_m if gsd_m is not None else gsd}
    for pol in sorted(pols):
        _check_polarisation(pol, spec, f"SAR patches in {sample[0].parent}")
    _check_gsd(facts.get("gsd_m"), conv, f"the patches in {sample[0].parent}")
    return facts


def check_sar_scene(
    path: str | os.PathLike[str], conv: InputConventions, gsd_m: float | None = None, bands: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Check a SAR scene (``cmpc georef --model --scene S1.tif``) against ``conv.sar``: band
    count (of ``bands`` when given), values, polarisation, and the GSD (``gsd_m``, the user's
    ``--gsd``, else the file's georeferencing; a plain image without either is refused by
    the scene reader). Returns the facts. Refusals and warnings: module doc."""
    p = Path(path)
    count, dtype, values, _, pol, own_gsd = _patch_facts(p)
    what = f"the SAR scene {p.name}"
    spec = conv.sar
    n = len(bands) if bands else count
    _check_count(n, spec, what, f"cmpc data convert-s1 IN OUT --pol {spec.polarisation or 'VH'}", "localize.raster_bands")
    _sar_values(values, dtype, spec, what)
    _check_polarisation(pol, spec, what)
    gsd = float(gsd_m) if gsd_m is not None else own_gsd
    if gsd is not None:
        _check_gsd(gsd, conv, what)
    return {"bands": n, "dtype": dtype, "gsd_m": gsd, "polarisation": pol}


def check_map_sources(
    conv: InputConventions,
    *,
    raster: str | os.PathLike[str] | None = None,
    bands: Sequence[int] | None = None,
    root: str | os.PathLike[str] | None = None,
    split: str = "test",
) -> dict[str, Any]:
    """Check what ``cmpc index build --model`` is about to embed: the optical map ``raster``
    (``bands``: its 1-based bands in use), else the optical references of ``root``/``split``
    (a CMPC dataset, checked on a sample). Returns the facts (``gsd_m`` in metres/pixel)."""
    if raster:
        return check_optical_raster(raster, conv, bands=bands)
    if root is None:
        raise DataError("nothing to index: give an optical map (--raster) or a dataset (data.root)")
    from cmpc.data.layout import check_root, read_annotations, safe_image_path

    r = check_root(root)
    refs = read_annotations(r, split, "opt")
    gsds = [a.gsd for a in refs if a.gsd]
    paths = [safe_image_path(r, split, "opt", a.file_path) for a in refs]
    return check_patch_files(paths, conv, "opt", gsd_m=float(np.median(gsds)) if gsds else None)
