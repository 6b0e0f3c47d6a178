"""Summary of a CMPC dataset (``cmpc data info ROOT``).

Works on datasets written by the tiler (``ROOT/dataset.json`` present) and on the original
SN6-CMPC layout, which has only annotations (``id``, ``pos``, ``file_path``, ``near_id``) and
images: CRS, patch size and bands are then inferred from the annotations and the first
image of each modality, and a SAR query counts as aligned when an optical reference of the
same split has the same id and centre.

It also says whether positions are ground metres: for a tiled dataset, how the sources' CRS
became the dataset CRS (used as is, or viewed in the local UTM zone; see
:func:`cmpc.data.raster.working_crs`); for GeoTIFF patches in a CRS that is not metric at
the data (World Mercator, feet, degrees), the ground GSD in the local UTM zone and a warning
that the annotation positions are CRS units, not metres.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from cmpc.data.layout import MODES, SPLITS, Annotation, check_root, read_annotations, read_dataset_meta, safe_image_path
from cmpc.errors import DataError

_ALIGN_TOL_M = 1e-3  # a SAR centre within a millimetre of its reference's centre is "aligned"


def _ground_gsd(crs: Any, transform: Any, width: int, height: int) -> tuple[float, str | None]:
    """(pixel size, None) when ``crs`` is metric at the data, else (ground GSD in metres/px
    measured along the image edges in the local UTM zone, the reason from
    :func:`cmpc.data.raster.working_crs`)."""
    from rasterio.warp import transform as warp_transform

    from cmpc.data.raster import normalized_bounds, working_crs

    res = float(abs(transform.a))
    try:
        corners = [transform * (0, 0), transform * (width, 0), transform * (0, height)]
        (x0, y0), (x1, _), (_, y2) = corners
        wc, reason = working_crs(crs, normalized_bounds((min(x0, x1), min(y0, y2), max(x0, x1), max(y0, y2))))
        if wc == crs:
            return res, None
        xs, ys = warp_transform(crs, wc, [c[0] for c in corners], [c[1] for c in corners])
        top = float(np.hypot(xs[1] - xs[0], ys[1] - ys[0])) / width
        left = float(np.hypot(xs[2] - xs[0], ys[2] - ys[0])) / height
        return (top + left) / 2.0, reason
    except Exception:  # an exotic CRS PROJ cannot place: report the CRS pixel size as before
        return res, None


def _image_info(path: Path) -> dict[str, Any]:
    """Bands, dtype, size (px) and, for GeoTIFF, CRS and ground GSD of one patch file (header only)."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import rasterio

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with rasterio.open(path) as src:
                    crs = src.crs
                    gsd, note = (
                        _ground_gsd(crs, src.transform, src.width, src.height)
                        if crs is not None else (None, None)
                    )
                    return {
                        "bands": src.count,
                        "dtype": src.dtypes[0],
                        "height_px": src.height,
                        "width_px": src.width,
                        "format": "tif",
                        "crs": (f"EPSG:{crs.to_epsg()}" if crs is not None and crs.to_epsg() else (crs.to_string() if crs else None)),
                        "gsd_m": gsd,
                        "crs_note": note,
                    }
        from PIL import Image

        with Image.open(path) as im:
            bands = len(im.getbands())
            dtype = {"I;16": "uint16", "I": "int32", "F": "float32"}.get(im.mode, "uint8")
            return {"bands": bands, "dtype": dtype, "height_px": im.height, "width_px": im.width, "format": path.suffix.lower().lstrip(".")}
    except Exception as e:  # PIL/rasterio raise many types for a corrupt file
        raise DataError(f"cannot read the patch {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _aligned_counts(sar: list[Annotation], opt: list[Annotation]) -> tuple[int, int, int, bool]:
    """(aligned, non_aligned, unknown, inferred) for the SAR queries of one split."""
    flags = [a.aligned for a in sar]
    if all(f is not None for f in flags):
        n_al = sum(1 for f in flags if f)
        return n_al, len(flags) - n_al, 0, False
    # SN6-CMPC has no flag: aligned = same centre as the reference with the same id.
    ref_pos = {a.id: (a.x, a.y) for a in opt}
    n_al = n_non = 0
    for a in sar:
        if a.aligned is not None:
            n_al += bool(a.aligned)
            n_non += not a.aligned
            continue
        ref = ref_pos.get(a.id)
        if ref is not None and abs(ref[0] - a.x) <= _ALIGN_TOL_M and abs(ref[1] - a.y) <= _ALIGN_TOL_M:
            n_al += 1
        else:
            n_non += 1
    return n_al, n_non, 0, True


def dataset_summary(root: str | os.PathLike[str]) -> dict[str, Any]:
    """Counts per split/modality (aligned / non-aligned queries), CRS, extent (metres), patch
    size (px and m), bands and dtypes per modality of the CMPC dataset at ``root``.

    A split folder that is absent is reported as such; a split folder that exists must hold
    both ``annotations/opt`` and ``annotations/sar`` with at least one valid JSON file each.
    Raises :class:`DataError` (one line) for a missing root, empty or missing annotation
    folders, malformed JSON or a ``file_path`` escaping its folder.
    """
    r = check_root(root)
    meta = read_dataset_meta(r)
    splits: dict[str, Any] = {}
    first: dict[str, tuple[str, Annotation]] = {}
    crs_seen: set[str] = set()
    gsd_seen: list[float] = []
    boxes: list[tuple[float, float, float, float]] = []
    centres: list[tuple[float, float]] = []
    for split in SPLITS:
        if not (r / split).is_dir():
            splits[split] = None
            continue
        anns = {mode: read_annotations(r, split, mode) for mode in MODES}
        block: dict[str, Any] = {}
        for mode in MODES:
            lst = anns[mode]
            missing = sum(1 for a in lst if not safe_image_path(r, split, mode, a.file_path).is_file())
            info: dict[str, Any] = {
                "patches": len(lst),
                "locations": len({a.id for a in lst}),
                "missing_images": missing,
                "near_k": max((len(a.near_id) for a in lst), default=0),
            }
            if mode == "sar":
                al, non, unk, inferred = _aligned_counts(lst, anns["opt"])
                info.update(aligned=al, non_aligned=non, aligned_inferred=inferred)
            block[mode] = info
            for a in lst:
                if a.crs:
                    crs_seen.add(a.crs)
                if a.gsd:
                    gsd_seen.append(a.gsd)
                if a.bounds is not None:
                    boxes.append(a.bounds)
                centres.append((a.x, a.y))
            if mode not in first:
                ok = next((a for a in lst if safe_image_path(r, split, mode, a.file_path).is_file()), None)
                if ok is not None:
                    first[mode] = (split, ok)
        splits[split] = block

    modalities: dict[str, Any] = {}
    patch_notes: list[str] = []
    for mode in MODES:
        if mode in first:
            split, a = first[mode]
            img = _image_info(safe_image_path(r, split, mode, a.file_path))
        else:
            img = {}
        m_meta = (meta.get("modalities") or {}).get(mode) or {}
        modalities[mode] = {
            "bands": m_meta.get("channels", img.get("bands")),
            "dtype": m_meta.get("dtype", img.get("dtype")),
            "format": m_meta.get("format", img.get("format")),
            "patch_px": [img["height_px"], img["width_px"]] if img else None,
        }
        if img.get("crs"):
            crs_seen.add(img["crs"])
        if img.get("crs_note"):
            patch_notes.append(img["crs_note"])
            gsd_seen = [img["gsd_m"]]  # the annotations' gsd, if any, is in CRS units
        if img.get("gsd_m") and not gsd_seen:
            gsd_seen.append(img["gsd_m"])

    crs = meta.get("crs") or (sorted(crs_seen)[0] if crs_seen else None)
    gsd = meta.get("gsd_m") or (float(np.median(gsd_seen)) if gsd_seen else None)
    crs_note = None
    src_opt = (meta.get("sources") or {}).get("optical") or {}
    if src_opt.get("crs_reason"):
        crs_note = f"optical source: {src_opt['crs_reason']}"
    elif patch_notes:
        # Patches (and so the annotation positions) in a CRS that is not metric at the data,
        # e.g. tiled by an older version straight in World Mercator: report the ground gsd.
        gsd = float(np.median(gsd_seen))
        crs_note = (
            f"positions are {crs} units, not ground metres ({patch_notes[0]}); gsd is the ground gsd; "
            f"re-tile from the source rasters with cmpc data tile"
        )
    patch_px = meta.get("patch_px") or ((modalities["opt"]["patch_px"] or [None])[0])
    patch_m = meta.get("patch_m")
    if patch_m is None and boxes:
        patch_m = float(np.median([b[2] - b[0] for b in boxes]))
    if (patch_m is None or (patch_notes and not src_opt.get("crs_reason"))) and gsd and patch_px:
        patch_m = gsd * patch_px  # ground metres when the patches' CRS is not metric
    if boxes:
        arr = np.array(boxes)
        extent = [float(arr[:, 0].min()), float(arr[:, 1].min()), float(arr[:, 2].max()), float(arr[:, 3].max())]
        extent_of = "footprints"
    else:
        c = np.array(centres).reshape(-1, 2)
        half = patch_m / 2.0 if patch_m else 0.0
        extent = [float(c[:, 0].min() - half), float(c[:, 1].min() - half), float(c[:, 0].max() + half), float(c[:, 1].max() + half)]
        extent_of = "footprints" if patch_m else "centres"
    return {
        "root": str(r),
        "described_by": "dataset.json" if meta else "annotations",
        "crs": crs,
        "crs_all": sorted(crs_seen | ({meta["crs"]} if meta.get("crs") else set())),
        "crs_note": crs_note,
        "split_protocol": meta.get("split"),
        "gsd_m": gsd,
        "patch_px": patch_px,
        "patch_m": patch_m,
        "stride_px": meta.get("stride_px"),
        "extent_m": extent,
        "extent_of": extent_of,
        "size_m": [extent[2] - extent[0], extent[3] - extent[1]],
        "modalities": modalities,
        "splits": splits,
        # Validation named by tile.val_blocks: a subset of train/ (cmpc.data.pairs.validation_holdout).
        "validation": (
            {"counts": (meta.get("counts") or {}).get("val"), "boxes": ((meta.get("areas") or {}).get("val") or {}).get("boxes"),
             "buffer_m": (meta.get("areas") or {}).get("buffer_m")}
            if ((meta.get("areas") or {}).get("val") or {}).get("boxes") else None
        ),
        "maps": [{"pairs": m.get("pairs"), "references": m.get("references")} for m in meta.get("maps") or []] or None,
    }


def _num(v: Any, fmt: str = "{:.1f}") -> str:
    return "?" if v is None else fmt.format(v)


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable text of :func:`dataset_summary` (what ``cmpc data info`` prints)."""
    s = summary
    ext = s["extent_m"]
    lines = [
        f"dataset   {s['root']}  (described by {s['described_by']})",
        f"crs       {s['crs'] or 'unknown'}" + (f"  (several: {', '.join(s['crs_all'])})" if len(s["crs_all"]) > 1 else ""),
        *([f"          {s['crs_note']}"] if s.get("crs_note") else []),
        f"extent    x {ext[0]:.1f} .. {ext[2]:.1f}, y {ext[1]:.1f} .. {ext[3]:.1f}  "
        f"({s['size_m'][0]:.1f} x {s['size_m'][1]:.1f} m, {s['extent_of']})",
        f"patch     {_num(s['patch_px'], '{}')} px = {_num(s['patch_m'])} m  (gsd {_num(s['gsd_m'], '{:.3f}')} m/px"
        + (f", stride {s['stride_px']} px)" if s.get("stride_px") else ")"),
        f"split     {s['split_protocol'] or 'unknown protocol'}",
    ]
    for mode, name in (("opt", "optical"), ("sar", "SAR")):
        m = s["modalities"][mode]
        lines.append(f"{name:<9} {_num(m['bands'], '{}')} band(s), {m['dtype'] or '?'}, {m['format'] or '?'}")
    lines.append("")
    lines.append(f"{'split':<6} {'mode':<5} {'patches':>8} {'locations':>10} {'aligned':>8} {'non-aligned':>12} {'missing':>8}")
    for split, block in s["splits"].items():
        if block is None:
            lines.append(f"{split:<6} (absent)")
            continue
        for mode in MODES:
            b = block[mode]
            al = f"{b['aligned']}" + ("*" if b.get("aligned_inferred") else "") if mode == "sar" else "-"
            non = f"{b['non_aligned']}" if mode == "sar" else "-"
            lines.append(f"{split:<6} {mode:<5} {b['patches']:>8} {b['locations']:>10} {al:>8} {non:>12} {b['missing_images']:>8}")
    val = s.get("validation")
    if val and val.get("counts"):
        c = val["counts"]
        lines.append(f"{'val':<6} {'opt':<5} {c['opt']:>8} {c['opt']:>10} {'-':>8} {'-':>12}   (inside train/: the validation blocks)")
        lines.append(f"{'val':<6} {'sar':<5} {c['sar']:>8} {'':>10} {c['sar_aligned']:>8} {c['sar_non_aligned']:>12}")
        lines.append(f"val blocks {val['boxes']} (m), buffer to train {val.get('buffer_m')} m")
    if s.get("maps"):
        lines.append(f"maps      {len(s['maps'])}: " + "; ".join(f"{len(m['pairs'])} pair(s) {m['pairs'][0]}..{m['pairs'][-1]}" for m in s["maps"]))
    if any(block and block["sar"].get("aligned_inferred") for block in s["splits"].values()):
        lines.append("* inferred: same id and centre as an optical reference (no 'aligned' flag in the annotations)")
    return "\n".join(lines)
