"""Scene cutter (``cmpc data scenes``): SAR scenes with known answers, for measurement.

Cuts ``count`` square SAR scenes of ``tiles x tiles`` query tiles from the SAR raster of an
experiment's world, at random positions (and headings within +-``heading_range_deg``)
inside one split's area (``dataset.json`` ``areas``: a whole scene footprint lies inside one
area box). A scene of n x n tiles covers n x n tiles laid at the reference stride (half a
tile), so its side is ``(n + 1) / 2`` tile widths. A rotated scene is resampled (bilinear)
on a rotated grid.

Written WITHOUT georeferencing (plain GeoTIFF: no CRS, no transform), beside a truth file:

    OUT/scenes.json             what was cut (experiment, split, tiles, headings, seed, raster)
    OUT/scene_0000.tif          (C, side_px, side_px) in the SAR raster's data type: float32
                                with NaN outside the raster, or integer (e.g. uint8) with an
                                internal mask there
    OUT/scene_0000.truth.json   gsd_m, heading_deg, transform (scene pixel -> map, rasterio
                                order a..f), center_xy, corners_xy, crs

Geometry: heading h (degrees clockwise from north) of the scene's "up"; with GSD g the true
transform is ``a = g cos h, b = -g sin h, d = -g sin h, e = -g cos h`` (see
:mod:`cmpc.localize.verify`).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from cmpc.errors import ConfigError, DataError
from cmpc.utils.io import atomic_dir, atomic_write_json


def _affine(gsd: float, heading_deg: float, cx: float, cy: float, side_px: int) -> tuple[float, ...]:
    """Rasterio-order transform of a square scene of ``side_px`` centred on (cx, cy)."""
    h = math.radians(heading_deg)
    a, b, d, e = gsd * math.cos(h), -gsd * math.sin(h), -gsd * math.sin(h), -gsd * math.cos(h)
    half = side_px / 2.0
    return (a, b, cx - a * half - b * half, d, e, cy - d * half - e * half)


def _apply(t: tuple[float, ...], col: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b, c, d, e, f = t
    return a * col + b * row + c, d * col + e * row + f


def split_boxes(root: str | os.PathLike[str], split: str) -> list[list[float]]:
    """Area boxes (minx, miny, maxx, maxy) metres of ``split`` in a dataset's dataset.json."""
    p = Path(root) / "dataset.json"
    if not p.is_file():
        raise DataError(f"{p} is missing: the split areas come from the tiled dataset (run `cmpc data tile` or the demo first)")
    meta = json.loads(p.read_text(encoding="utf-8"))
    areas = meta.get("areas") or {}
    boxes = (areas.get(split) or {}).get("boxes") or []
    if not boxes:
        raise DataError(f"{p} records no area for split {split!r}")
    return [list(map(float, b)) for b in boxes]


def cut_scenes(
    sar_path: str | os.PathLike[str],
    dataset_root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    split: str,
    tiles: int,
    count: int,
    heading_range_deg: float = 0.0,
    seed: int = 0,
    bands: list[int] | None = None,
    extra: dict[str, Any] | None = None,
    boxes: list[list[float]] | None = None,
    box_shifts: list[tuple[float, float] | None] | None = None,
    min_valid: float = 0.95,
    max_draws: int = 200,
) -> dict[str, Any]:
    """Cut the scenes (module doc) into ``out`` (atomically); returns the scenes.json record.

    ``sar_path``: one SAR raster, or a folder / list of SAR-optical pairs (a multi-pair
    dataset such as sentinel-la: the pairs' SAR is read as the tiler reads it, in the
    dataset's CRS). ``boxes``: area boxes (minx, miny, maxx, maxy) metres the scenes must lie
    in, instead of the dataset's ``split`` area (see :func:`load_boxes`); ``box_shifts``:
    per box, the (east, north) metres by which the SAR content there is displaced from its
    true place on the optical grid (a synthetic world's drawn misregistration): the truth is
    then where the scene's content really lies, not the SAR raster's own georeferencing.
    A draw with under ``min_valid`` of its pixels on SAR data is drawn again (at most
    ``max_draws`` times per scene)."""
    from skimage.transform import AffineTransform, warp

    if tiles < 1:
        raise ConfigError(f"--tiles must be at least 1, got {tiles}")
    if count < 1:
        raise ConfigError(f"--count must be at least 1, got {count}")
    if not (0.0 <= heading_range_deg <= 180.0):
        raise ConfigError(f"--heading-range must be within 0..180 degrees, got {heading_range_deg:g}")
    meta = json.loads((Path(dataset_root) / "dataset.json").read_text(encoding="utf-8")) if (Path(dataset_root) / "dataset.json").is_file() else {}
    boxes = [list(map(float, b)) for b in boxes] if boxes else split_boxes(dataset_root, split)
    patch_m = float(meta.get("patch_m") or 0.0)
    if not patch_m:
        raise DataError(f"{dataset_root}/dataset.json has no patch_m (the tile size in metres)")
    rng = np.random.default_rng(seed)
    register = (meta.get("tile_config") or {}).get("register")  # the dataset's SAR was moved by a measured offset: so is the scenes'
    with _open_sar(sar_path, bands, meta.get("crs"), register) as src:
        gsd = float(src.grid.gsd_m)
        side_m = (tiles + 1) / 2.0 * patch_m
        side_px = int(round(side_m / gsd))
        record: dict[str, Any] = {
            **({"register": str(register)} if register else {}),
            "format": "cmpc-scenes", "version": 1, "sar": str(sar_path), "dataset": str(dataset_root), "split": split,
            "tiles": tiles, "count": count, "heading_range_deg": heading_range_deg, "seed": seed, "gsd_m": gsd,
            "side_px": side_px, "side_m": side_px * gsd, "patch_m": patch_m, "crs": meta.get("crs"), **(extra or {}), "scenes": [],
        }
        with atomic_dir(out) as tmp:
            for i in range(count):
                for _attempt in range(max_draws):  # redraw scenes over nodata (gaps between a dataset's files)
                    h = float(rng.uniform(-heading_range_deg, heading_range_deg)) if heading_range_deg > 0 else 0.0
                    half = side_px * gsd / 2.0 * (abs(math.cos(math.radians(h))) + abs(math.sin(math.radians(h))))
                    fit_ids = [j for j, b in enumerate(boxes) if b[2] - b[0] > 2 * half and b[3] - b[1] > 2 * half]
                    fits = [boxes[j] for j in fit_ids]
                    if not fits:
                        raise DataError(
                            f"a {tiles}x{tiles}-tile scene ({side_px * gsd:.0f} m, heading up to {heading_range_deg:g} deg) does not fit "
                            f"inside any {split} area box of {dataset_root}; cut smaller scenes"
                        )
                    w = np.array([(b[2] - b[0] - 2 * half) * (b[3] - b[1] - 2 * half) for b in fits])
                    k = int(rng.choice(len(fits), p=w / w.sum()))
                    box = fits[k]
                    shift = None
                    if box_shifts is not None:
                        shift = box_shifts[fit_ids[k]]
                    cx = float(rng.uniform(box[0] + half, box[2] - half))
                    cy = float(rng.uniform(box[1] + half, box[3] - half))
                    t = _affine(gsd, h, cx, cy, side_px)
                    # read the raster over the footprint's bounding box, then sample the scene grid
                    bb = (cx - half - 2 * gsd, cy - half - 2 * gsd, cx + half + 2 * gsd, cy + half + 2 * gsd)
                    n_px = int(round((bb[2] - bb[0]) / gsd))
                    arr, valid = src.read_bounds(bb, (n_px, n_px))
                    wg = (bb[2] - bb[0]) / n_px
                    # output (col j, row i) centre -> map -> window pixel (skimage: centres at integers)
                    a, b, c, d, e, f = t
                    m_scene = np.array([[a, b, a * 0.5 + b * 0.5 + c], [d, e, d * 0.5 + e * 0.5 + f], [0, 0, 1.0]])
                    m_win = np.array([[1 / wg, 0, -bb[0] / wg - 0.5], [0, -1 / wg, bb[3] / wg - 0.5], [0, 0, 1.0]])
                    tf = AffineTransform(matrix=m_win @ m_scene)
                    data = np.nan_to_num(np.asarray(arr, dtype=np.float32), nan=0.0)
                    scene = np.stack([warp(ch, tf, output_shape=(side_px, side_px), order=1, preserve_range=True) for ch in data]).astype(np.float32)
                    ok = warp(np.asarray(valid, np.float32), tf, output_shape=(side_px, side_px), order=1, preserve_range=True) > 0.999
                    scene[:, ~ok] = np.nan
                    if ok.mean() >= min_valid:
                        break
                else:
                    raise DataError(
                        f"no {tiles}x{tiles}-tile scene with {min_valid:.0%} valid pixels found in {max_draws} draws inside the {split} area boxes; "
                        "the SAR raster has little data there (check --areas / the split boxes)"
                    )
                name = f"scene_{i:04d}"
                _write_plain_tiff(tmp / f"{name}.tif", scene, src.source_dtype)
                corners = np.array([[0, 0], [side_px, 0], [side_px, side_px], [0, side_px]], dtype=np.float64)
                tt, tcx, tcy = t, cx, cy
                if shift is not None:  # the content of SAR pixel P shows the ground at P - shift
                    tt = (t[0], t[1], t[2] - shift[0], t[3], t[4], t[5] - shift[1])
                    tcx, tcy = cx - shift[0], cy - shift[1]
                xs, ys = _apply(tt, corners[:, 0], corners[:, 1])
                truth = {
                    "scene": f"{name}.tif", "gsd_m": gsd, "heading_deg": h, "transform": list(tt), "center_xy": [tcx, tcy],
                    "corners_xy": [[float(x), float(y)] for x, y in zip(xs, ys)], "crs": meta.get("crs"), "split": split, "tiles": tiles,
                    **({"sar_shift_m": list(shift), "raster_center_xy": [cx, cy]} if shift is not None else {}),
                }
                atomic_write_json(tmp / f"{name}.truth.json", truth)
                record["scenes"].append({"name": name, "heading_deg": h, "center_xy": [cx, cy]})
            atomic_write_json(tmp / "scenes.json", record)
    return record


def _open_sar(sar: str | os.PathLike[str], bands: list[int] | None, crs: str | None, register: str | None = None):  # noqa: ANN202 - RasterSource | MapsSource
    """A SAR raster, or the SAR of a folder / list of pairs, in ``crs``; ``register``: the
    dataset's co-registration record (``tile.register``), applied as the tiler applied it."""
    from cmpc.data.raster import open_raster

    p = Path(sar)
    if p.is_dir() or p.suffix.lower() in (".json", ".csv"):
        from cmpc.data.mosaic import open_maps

        return open_maps(p, "sar", crs=crs, bands=bands, register=register)
    shift = None
    if register:
        from cmpc.data.coregister import single_pair_offset

        shift = single_pair_offset(register, p)
    return open_raster(p, bands=bands, crs=crs, role="SAR world", shift_m=shift)


def load_box_shifts(path: str | os.PathLike[str]) -> list[tuple[float, float] | None] | None:
    """Per box of a mosaic.json (``worlds[*].sar_shift_m``), the SAR misregistration; None
    for any other area file."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(doc, dict) and isinstance(doc.get("worlds"), list) and all("sar_shift_m" in w for w in doc["worlds"]):
        return [tuple(map(float, w["sar_shift_m"])) for w in doc["worlds"]]  # type: ignore[misc]
    return None


def load_boxes(path: str | os.PathLike[str], split: str = "test") -> list[list[float]]:
    """Area boxes (minx, miny, maxx, maxy) metres from a JSON file: a list of boxes, a mosaic
    record (``benchmarks.mosaic``: ``worlds[*].box_m``, one box per world, so no scene crosses
    a seam) or a dataset.json (``areas[split].boxes``)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read area boxes from {p}: {str(e).splitlines()[0]}") from None
    if isinstance(doc, dict) and "worlds" in doc:
        boxes = [w.get("box_m") for w in doc["worlds"]]
    elif isinstance(doc, dict) and "areas" in doc:
        boxes = ((doc["areas"] or {}).get(split) or {}).get("boxes") or []
    else:
        boxes = doc
    ok = isinstance(boxes, list) and boxes and all(
        isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b) and b[2] > b[0] and b[3] > b[1] for b in boxes
    )
    if not ok:
        raise DataError(f"{p} holds no area boxes: expected [[minx, miny, maxx, maxy], ...], a mosaic.json (worlds) or a dataset.json (areas.{split})")
    return [list(map(float, b)) for b in boxes]


def _write_plain_tiff(path: Path, arr: np.ndarray, dtype: str = "float32") -> None:
    """A GeoTIFF without CRS or transform (what an image of unknown position looks like).
    ``arr``: float32 with NaN outside the source raster. Written in the source's ``dtype``:
    float as is (NaN nodata); integer rounded and clipped to the type's range, the pixels
    outside in an internal mask (every value stays a valid datum: a uint8 SAR scene is what
    a shipped model's user brings, and ``georef --model`` checks the type)."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    dt = np.dtype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        if not np.issubdtype(dt, np.integer):
            with rasterio.open(path, "w", driver="GTiff", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0], dtype="float32", nodata=np.nan) as f:
                f.write(arr.astype(np.float32))
            return
        ok = np.isfinite(arr).all(axis=0)
        info = np.iinfo(dt)
        out = np.clip(np.rint(np.nan_to_num(arr, nan=0.0)), info.min, info.max).astype(dt)
        with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
            with rasterio.open(path, "w", driver="GTiff", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0], dtype=dt.name) as f:
                f.write(out)
                f.write_mask(np.where(ok, 255, 0).astype(np.uint8))


def read_truth(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A scene's truth file (``<stem>.truth.json``)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def world_sar(synth_out: str | os.PathLike[str], dataset_root: str | os.PathLike[str]) -> Path:
    """The SAR raster the experiment's dataset was tiled from: the SAR source recorded in the
    dataset's dataset.json (one raster, or the pair folder of a multi-pair dataset), else
    ``synth.out/sar.tif`` (a synthetic world tiled by an older version)."""
    p = Path(synth_out) / "sar.tif"
    meta_p = Path(dataset_root) / "dataset.json"
    if meta_p.is_file():
        src = ((json.loads(meta_p.read_text(encoding="utf-8")).get("sources") or {}).get("sar") or {}).get("path")
        if src and (Path(src).is_file() or Path(src).is_dir()):
            return Path(src)
    if p.is_file():
        return p
    raise DataError(f"no SAR raster for this experiment: neither a SAR source in {meta_p} nor {p}")


class SceneSource:
    """Where training / calibration scenes are cut: ``sar`` (raster or pair folder),
    ``boxes`` (area boxes, metres) and optional ``box_shifts`` (see :func:`cut_scenes`).
    :meth:`of_experiment` is the experiment's own training area; :meth:`of_files` another
    map (e.g. a synthetic calibration mosaic of worlds no test map uses)."""

    def __init__(self, sar: Path, boxes: list[list[float]], box_shifts: list[tuple[float, float] | None] | None = None, label: str = "") -> None:
        self.sar, self.boxes, self.box_shifts, self.label = Path(sar), boxes, box_shifts, label

    @classmethod
    def of_experiment(cls, exp, split: str = "train") -> SceneSource:  # noqa: ANN001 - cmpc.config.Experiment
        return cls(world_sar(exp.synth.out, exp.data.root), split_boxes(exp.data.root, split), None, f"{exp.name} {split} area")

    @classmethod
    def of_files(cls, sar: str | os.PathLike[str], areas: str | os.PathLike[str], split: str = "train") -> SceneSource:
        if not Path(sar).exists():
            raise DataError(f"--sar {sar} does not exist")
        return cls(Path(sar), load_boxes(areas, split), load_box_shifts(areas), f"{sar} within {areas}")

    def cut(self, dataset_root: str | os.PathLike[str], out: str | os.PathLike[str], split: str, tiles: int, count: int,
            heading_range_deg: float, seed: int) -> dict[str, Any]:
        """:func:`cut_scenes` from this source."""
        return cut_scenes(self.sar, dataset_root, out, split, tiles, count, heading_range_deg, seed, boxes=self.boxes, box_shifts=self.box_shifts)
