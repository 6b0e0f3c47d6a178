"""``cmpc data synth``: generate a synthetic, georeferenced SAR/optical world and write it.

Outputs in ``cfg.out`` (written in a temporary folder, renamed into place when complete):

- ``optical.tif``  3-band uint8 RGB (the reference map, date 1)
- ``sar.tif``      float32, 1/2/4 bands (VV | VV,VH | HH,HV,VH,VV), dB or linear (date 2)
- ``labels.tif``   uint8 class mask of the optical date (classes in :mod:`.scene`)
- ``dsm.tif``      float32 surface heights above ground of the optical date, metres
- ``world.json``   parameters (``config``), CRS, transform, classes, sensor geometry,
                   misregistration, temporal changes, counts and timings
- ``preview.png``  optical and SAR side by side, with a zoom on a tall building

All rasters share one grid: projected CRS ``EPSG:cfg.epsg``, upper-left corner
``(origin_x, origin_y)``, square pixels of ``gsd_m`` metres, north up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from cmpc.config import SynthConfig
from cmpc.data.synth.acquisition import Presence, compose_scene, point_scatterers, split_changes
from cmpc.data.synth.layout import build_layout
from cmpc.data.synth.objects import place_buildings, place_trees, place_vehicles, raster_parts
from cmpc.data.synth.optical import render_optical
from cmpc.data.synth.sar import BANDS, NESZ_DB, SarGeometry, misregister, render_sar_mean, speckle, to_db
from cmpc.data.synth.scene import CLASS_NAMES
from cmpc.errors import ConfigError
from cmpc.utils.io import atomic_dir

GENERATOR_VERSION = 1
MAX_SIDE_PX = 32_768
BYTES_PER_PX = 270  # measured peak resident memory per world pixel (2048^2 px world: 1.1 GB)
CLASS_COLOURS = (
    (166, 136, 96), (70, 70, 70), (220, 60, 50), (40, 90, 200), (20, 110, 30), (225, 205, 80), (130, 200, 100),
    (230, 0, 230),
)


def world_shape(cfg: SynthConfig) -> tuple[int, int]:
    """(rows, cols) of the world grid; a one-line ConfigError when it is unusable."""
    side = int(round(cfg.size_m / cfg.gsd_m))
    if side < 64:
        raise ConfigError(
            f"synth world of {cfg.size_m:g} m at {cfg.gsd_m:g} m/px is only {side} px wide; "
            "need at least 64 px (raise size_m or lower gsd_m)"
        )
    if side > MAX_SIDE_PX:
        raise ConfigError(
            f"synth world of {cfg.size_m:g} m at {cfg.gsd_m:g} m/px is {side} px wide; the limit is "
            f"{MAX_SIDE_PX} px: lower size_m or raise gsd_m"
        )
    need = side * side * BYTES_PER_PX
    avail = _available_memory()
    if avail is not None and need > avail:
        raise ConfigError(
            f"synth world of {side} x {side} px needs about {need / 1e9:.1f} GB of memory, "
            f"{avail / 1e9:.1f} GB are available: lower size_m or raise gsd_m"
        )
    return side, side


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_crs(epsg: int) -> Any:
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    try:
        crs = CRS.from_epsg(int(epsg))
    except CRSError:
        raise ConfigError(f"synth.epsg {epsg} is not a known EPSG code; use a projected CRS such as 32631 (UTM 31N)") from None
    if not crs.is_projected:
        raise ConfigError(f"synth.epsg {epsg} is not a projected CRS (positions must be metres); use e.g. 32631 (UTM 31N)")
    return crs


def _check_out(out: Path) -> None:
    """Refuse to replace a folder that is not a previous synthetic world."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"synth.out {out} exists and is not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "world.json").is_file():
        raise ConfigError(f"synth.out {out} is a non-empty folder without world.json; refusing to replace it, choose another folder")


def _misregistration(cfg: SynthConfig, rng: np.random.Generator) -> tuple[float, float]:
    """Co-registration error: a random shift of at most misregistration_m, uniform in a disc."""
    r_m = cfg.misregistration_m * np.sqrt(rng.random())
    ang = rng.uniform(0.0, 2.0 * np.pi)
    return float(r_m * np.cos(ang)), float(r_m * np.sin(ang))


def sar_shift_m(cfg: SynthConfig) -> tuple[float, float]:
    """(east, north) metres by which the world's sar.tif content is displaced from its true
    position on the optical grid (what :func:`build_world` draws), without building it."""
    streams = np.random.SeedSequence([int(cfg.seed), 0x5A5]).spawn(12)
    return _misregistration(cfg, np.random.default_rng(streams[9]))


def build_world(cfg: SynthConfig) -> dict[str, Any]:
    """Generate everything in memory (no files). Returns a dict with the two scenes, the
    rendered images (``optical`` (H, W, 3) uint8, ``sar`` (P, H, W) float32 in the output
    units), ``shift_m`` (east, north), ``changes``, ``counts`` and per-step ``seconds``."""
    shape = world_shape(cfg)
    gsd = float(cfg.gsd_m)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    streams = np.random.SeedSequence([int(cfg.seed), 0x5A5]).spawn(12)
    rng = [np.random.default_rng(s) for s in streams]

    layout = build_layout(rng[0], shape, gsd)
    seconds["layout"] = time.perf_counter() - t

    t = time.perf_counter()
    buildings = place_buildings(rng[1], layout, cfg.building_density)
    _, flat, _ = raster_parts(buildings.parts, shape)
    occupied = np.zeros(shape[0] * shape[1], bool)
    occupied[flat] = True
    occupied = occupied.reshape(shape)
    occupied = ndi.binary_dilation(occupied, iterations=max(1, int(round(2.0 / gsd))))
    trees = place_trees(rng[2], layout, occupied)
    b1, b2, t1, t2 = split_changes(rng[3], len(buildings), len(trees), cfg.change_fraction)
    dates = []
    for k, (bp, tp, other) in enumerate(((b1, t1, b2), (b2, t2, b1))):
        vparts, vcol, vkind = place_vehicles(rng[4 + k], layout, occupied, layout.river_axis)
        dates.append(Presence(bp, other & ~bp, tp, vparts, vcol, vkind))
    scene_opt = compose_scene(layout, buildings, trees, dates[0])
    scene_sar = compose_scene(layout, buildings, trees, dates[1])
    scene_sar.points = point_scatterers(rng[6], scene_sar, layout, dates[1].vehicles, dates[1].vehicle_kind)
    seconds["objects"] = time.perf_counter() - t

    t = time.perf_counter()
    optical, _ = render_optical(
        scene_opt, rng[7], season=cfg.season, sun_azimuth_deg=cfg.sun_azimuth_deg,
        sun_elevation_deg=cfg.sun_elevation_deg, haze=cfg.haze, clouds=cfg.clouds,
    )
    seconds["optical"] = time.perf_counter() - t

    t = time.perf_counter()
    geom = SarGeometry(cfg.incidence_deg, cfg.look, gsd)
    mean = render_sar_mean(scene_sar, geom, cfg.polarisations, rng[8])
    shift_east, shift_north = _misregistration(cfg, rng[9])
    mean = misregister(mean, (-shift_north / gsd, shift_east / gsd))
    sar = speckle(mean, cfg.looks, rng[10], BANDS[cfg.polarisations])
    if cfg.sar_db:
        sar = to_db(sar)
    seconds["sar"] = time.perf_counter() - t

    n_b = len(buildings)
    changes = {
        "buildings_removed": int((b1 & ~b2).sum()),
        "buildings_added": int((b2 & ~b1).sum()),
        "trees_removed": int((t1 & ~t2).sum()),
        "trees_added": int((t2 & ~t1).sum()),
        "vehicles": "all cars and ships are drawn independently for each date",
        "note": "buildings present at one date only appear as construction sites at the other",
    }
    counts = {
        "buildings": n_b,
        "buildings_optical": int(b1.sum()),
        "buildings_sar": int(b2.sum()),
        "max_building_height_m": float(buildings.table["height"].max(initial=0.0)),
        "trees": int(len(trees)),
        "vehicles_optical": int(len(np.unique(scene_opt.vehicle_id)) - 1),
        "vehicles_sar": int(len(np.unique(scene_sar.vehicle_id)) - 1),
        "sar_point_targets": int(len(scene_sar.points)),
        "parcels": int(len(layout.parcels["zone"]) - 1),
        **{k: int(v) for k, v in layout.stats.items()},
    }
    return {
        "layout": layout, "buildings": buildings, "scene_optical": scene_opt, "scene_sar": scene_sar,
        "optical": optical, "sar": sar, "shift_m": (shift_east, shift_north), "geometry": geom,
        "changes": changes, "counts": counts, "seconds": seconds,
    }


def _class_fractions(labels: np.ndarray) -> dict[str, float]:
    counts = np.bincount(labels.ravel(), minlength=len(CLASS_NAMES))
    return {name: round(float(c) / labels.size, 4) for name, c in zip(CLASS_NAMES, counts)}


def write_geotiff(
    path: Path, data: np.ndarray, crs: Any, transform: Any, descriptions: tuple[str, ...] | None = None,
    colormap: dict[int, tuple[int, int, int]] | None = None, photometric: str | None = None,
) -> None:
    """Write (B, H, W) as a tiled, deflate-compressed GeoTIFF."""
    import rasterio

    b, h, w = data.shape
    profile = {
        "driver": "GTiff", "width": w, "height": h, "count": b, "dtype": data.dtype.name, "crs": crs,
        "transform": transform, "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate",
        "zlevel": 1, "predictor": 2 if data.dtype.kind in "ui" else 3,
    }
    if w < 256 or h < 256:
        profile.update(tiled=False)
        profile.pop("blockxsize")
        profile.pop("blockysize")
    if photometric:
        profile["photometric"] = photometric
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
            if descriptions:
                for i, d in enumerate(descriptions, start=1):
                    dst.set_band_description(i, d)
            if colormap:
                dst.write_colormap(1, colormap)


def generate_world(cfg: SynthConfig, preview: bool = True) -> dict[str, Any]:
    """Generate the world described by ``cfg`` and write it to ``cfg.out`` (atomically).

    Returns a summary: ``out``, ``files`` (name -> path), ``shape`` [rows, cols], ``crs``,
    ``transform`` (GDAL order), ``gsd_m``, ``bands``, ``counts`` and ``seconds``.
    """
    from affine import Affine

    t_all = time.perf_counter()
    out = Path(cfg.out)
    crs = _check_crs(cfg.epsg)
    world_shape(cfg)
    _check_out(out)
    w = build_world(cfg)
    h_px, w_px = w["optical"].shape[:2]
    gsd = float(cfg.gsd_m)
    transform = Affine(gsd, 0.0, cfg.origin_x, 0.0, -gsd, cfg.origin_y)
    geom: SarGeometry = w["geometry"]
    bands = BANDS[cfg.polarisations]
    labels = w["scene_optical"].labels

    t = time.perf_counter()
    files = {k: str(out / f"{k}.tif") for k in ("optical", "sar", "labels", "dsm")}
    files["world"] = str(out / "world.json")
    with atomic_dir(out) as tmp:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the world is a normal folder
        write_geotiff(tmp / "optical.tif", np.moveaxis(w["optical"], -1, 0), crs, transform, ("red", "green", "blue"), photometric="RGB")
        write_geotiff(tmp / "sar.tif", w["sar"], crs, transform, bands)
        write_geotiff(tmp / "labels.tif", labels[None], crs, transform, ("class",),
                      colormap={i: c for i, c in enumerate(CLASS_COLOURS)})
        write_geotiff(tmp / "dsm.tif", w["scene_optical"].dsm[None], crs, transform, ("height_m",))
        seconds = {k: round(v, 2) for k, v in w["seconds"].items()}
        seconds["write"] = round(time.perf_counter() - t, 2)
        if preview:
            from cmpc.data.synth.preview import make_preview

            t = time.perf_counter()
            make_preview(tmp / "preview.png", w, cfg)
            files["preview"] = str(out / "preview.png")
            seconds["preview"] = round(time.perf_counter() - t, 2)
        seconds["total"] = round(time.perf_counter() - t_all, 2)
        east = labels[:, int(0.75 * w_px):]
        west = labels[:, : int(0.75 * w_px)]
        meta = {
            "generator": "cmpc.data.synth",
            "version": GENERATOR_VERSION,
            "config": dataclasses.asdict(cfg),
            "crs": f"EPSG:{cfg.epsg}",
            "crs_wkt": crs.to_wkt(),
            "transform": list(transform.to_gdal()),
            "transform_note": "GDAL order: [origin_x, gsd, 0, origin_y, 0, -gsd]; pixel (row 0, col 0) is the north-west corner",
            "width": w_px,
            "height": h_px,
            "gsd_m": gsd,
            "bounds": [cfg.origin_x, cfg.origin_y - h_px * gsd, cfg.origin_x + w_px * gsd, cfg.origin_y],
            "files": {"optical": "optical.tif", "sar": "sar.tif", "labels": "labels.tif", "dsm": "dsm.tif",
                      **({"preview": "preview.png"} if preview else {})},
            "classes": {str(i): n for i, n in enumerate(CLASS_NAMES)},
            "class_colours": {str(i): list(c) for i, c in enumerate(CLASS_COLOURS)},
            "class_fractions": _class_fractions(labels),
            "class_fractions_west_75pct": _class_fractions(west),
            "class_fractions_east_25pct": _class_fractions(east),
            "optical": {"bands": ["red", "green", "blue"], "dtype": "uint8", "date": 1, "season": cfg.season,
                        "sun_azimuth_deg": cfg.sun_azimuth_deg, "sun_elevation_deg": cfg.sun_elevation_deg,
                        "haze": cfg.haze, "clouds": cfg.clouds},
            "sar": {
                "date": 2,
                "bands": list(bands),
                "units": "dB" if cfg.sar_db else "linear intensity",
                "dtype": "float32",
                "geometry": "ground range, flat terrain, constant incidence",
                "look": geom.look,
                "sensor_side": geom.sensor_side,
                "incidence_deg": geom.incidence_deg,
                "looks": cfg.looks,
                "nesz_db": NESZ_DB,
                "layover": "elevated points appear displaced toward the sensor by h / tan(incidence)",
                "radar_shadow": "behind elevated objects, away from the sensor, length h * tan(incidence)",
            },
            "misregistration": {
                "dx_east_m": round(w["shift_m"][0], 4),
                "dy_north_m": round(w["shift_m"][1], 4),
                "meaning": "sar.tif content is displaced by (dx_east_m, dy_north_m) metres from its true position on the optical grid",
                "max_m": cfg.misregistration_m,
            },
            "changes": w["changes"],
            "counts": w["counts"],
            "seconds": seconds,
        }
        (tmp / "world.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return {
        "out": str(out),
        "files": files,
        "shape": [h_px, w_px],
        "crs": f"EPSG:{cfg.epsg}",
        "transform": list(transform.to_gdal()),
        "gsd_m": gsd,
        "bands": list(bands),
        "counts": w["counts"],
        "seconds": seconds,
    }


def read_world_meta(out: str | Path) -> dict[str, Any]:
    """Read ``world.json`` of a generated world."""
    return json.loads((Path(out) / "world.json").read_text(encoding="utf-8"))



