"""A large co-registered SAR/optical mosaic for the scale benchmarks, written in strips.

The synthetic generator makes one 2048 m world at a time (about 1.1 GB of working memory
each); ``make_mosaic`` tiles ``tiles x tiles`` worlds with different seeds side by side into
one optical GeoTIFF and one SAR GeoTIFF on a single grid (EPSG:32631, 1 m/px by default),
writing each world into its window of the big files and dropping it before the next one:
memory stays at one world whatever the mosaic size. Seams between worlds are visible (each
world is its own city); that does not matter for indexing.

The default 4 x 4 mosaic of 2048 px worlds is 8192 x 8192 px: 201 MB of optical pixels
(3 x uint8) and 268 MB of SAR (float32), tiled 512 px blocks, uncompressed (windowed reads
touch only their blocks). Cut into 64 px references every 8 px it gives 1017^2 = 1.03 M
references, the 1M-reference benchmark. Generation is resumable: finished worlds are
recorded in ``progress.json`` and skipped on a rerun; the folder is renamed into place
when complete.

``mosaic.json`` records each world's seed, box (metres) and SAR misregistration, so scenes can
be cut inside one world (no seam crossing) with their true position known. ``python -m benchmarks.mosaic [--tiles 4] [--seed0 1000] [--out data/bench/mosaic]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_OUT = Path("data/bench/mosaic")
ORIGIN = (400_000.0, 5_100_000.0)  # upper-left corner, EPSG:32631 metres
EPSG = 32631


def _profile(width: int, height: int, count: int, dtype: str, gsd: float) -> dict[str, Any]:
    from affine import Affine

    return {
        "driver": "GTiff", "width": width, "height": height, "count": count, "dtype": dtype,
        "crs": f"EPSG:{EPSG}", "transform": Affine(gsd, 0.0, ORIGIN[0], 0.0, -gsd, ORIGIN[1]),
        "tiled": True, "blockxsize": 512, "blockysize": 512, "BIGTIFF": "IF_SAFER",
    }


def _worlds(tiles: int, tile_m: float, gsd_m: float, seed0: int) -> list[dict[str, Any]]:
    """Per world: seed, box (minx, miny, maxx, maxy) metres, and the misregistration its SAR
    was drawn with (``sar_shift_m``: east, north metres; the SAR content sits that far from
    its true place on the optical grid)."""
    from cmpc.config import SynthConfig
    from cmpc.data.synth.world import sar_shift_m

    out = []
    for k in range(tiles * tiles):
        r, c = divmod(k, tiles)
        cfg = SynthConfig(seed=seed0 + k, size_m=tile_m, gsd_m=gsd_m, epsg=EPSG)
        out.append({"seed": seed0 + k, "box_m": [ORIGIN[0] + c * tile_m, ORIGIN[1] - (r + 1) * tile_m, ORIGIN[0] + (c + 1) * tile_m, ORIGIN[1] - r * tile_m],
                    "sar_shift_m": [round(v, 4) for v in sar_shift_m(cfg)]})
    return out


def make_mosaic(out: Path = DEFAULT_OUT, tiles: int = 4, tile_m: float = 2048.0, gsd_m: float = 1.0, seed0: int = 1000) -> dict[str, Any]:
    """Write ``out/optical.tif`` and ``out/sar.tif`` (``tiles`` x ``tiles`` worlds); return ``out/mosaic.json``.

    Returns at once when a complete mosaic of the same parameters is already there.
    """
    import rasterio

    from cmpc.config import SynthConfig
    from cmpc.data.synth import build_world

    params = {"tiles": tiles, "tile_m": tile_m, "gsd_m": gsd_m, "seed0": seed0, "epsg": EPSG, "origin": list(ORIGIN)}
    meta_path = out / "mosaic.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("params") == params:
            if any("sar_shift_m" not in w for w in meta.get("worlds", [{}])):
                meta["worlds"] = _worlds(tiles, tile_m, gsd_m, seed0)  # recorded by an older version
                tmp = meta_path.with_suffix(".tmp")
                tmp.write_text(json.dumps(meta, indent=2))
                os.replace(tmp, meta_path)
            return meta
    work = out.with_name(f".{out.name}.partial")
    progress_path = work / "progress.json"
    done: list[int] = []
    if progress_path.is_file() and json.loads(progress_path.read_text()).get("params") == params:
        done = json.loads(progress_path.read_text())["done"]
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    side = int(round(tile_m / gsd_m))
    total = side * tiles
    t0 = time.perf_counter()
    seconds: list[float] = []
    for k in range(tiles * tiles):
        if k in done:
            continue
        t = time.perf_counter()
        r, c = divmod(k, tiles)
        cfg = SynthConfig(out=str(work / "unused"), seed=seed0 + k, size_m=tile_m, gsd_m=gsd_m, epsg=EPSG,
                          origin_x=ORIGIN[0] + c * tile_m, origin_y=ORIGIN[1] - r * tile_m)
        w = build_world(cfg)
        opt = np.moveaxis(w["optical"], -1, 0)
        sar = w["sar"].astype(np.float32)
        del w
        from rasterio.windows import Window

        win = Window(c * side, r * side, side, side)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, arr in (("optical.tif", opt), ("sar.tif", sar)):
                path = work / name
                mode = "r+" if path.is_file() else "w"
                kw = {} if mode == "r+" else _profile(total, total, arr.shape[0], arr.dtype.name, gsd_m)
                with rasterio.open(path, mode, **kw) as dst:
                    dst.write(arr, window=win)
        del opt, sar
        done.append(k)
        seconds.append(time.perf_counter() - t)
        tmp = progress_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"params": params, "done": done}))
        os.replace(tmp, progress_path)
        print(f"mosaic: world {k + 1}/{tiles * tiles} in {seconds[-1]:.0f} s", flush=True)
    meta = {
        "params": params,
        "shape_px": [total, total],
        "extent_m": [ORIGIN[0], ORIGIN[1] - total * gsd_m, ORIGIN[0] + total * gsd_m, ORIGIN[1]],
        "bytes": {n: (work / n).stat().st_size for n in ("optical.tif", "sar.tif")},
        "worlds": _worlds(tiles, tile_m, gsd_m, seed0),
        "seconds_per_world_median": float(np.median(seconds)) if seconds else None,
        "seconds_this_run": round(time.perf_counter() - t0, 1),
        "synth": {k: v for k, v in dataclasses.asdict(SynthConfig(size_m=tile_m, gsd_m=gsd_m, epsg=EPSG)).items() if k not in ("out", "seed", "origin_x", "origin_y")},
    }
    (work / "mosaic.json").write_text(json.dumps(meta, indent=2))
    progress_path.unlink()
    if out.exists():
        shutil.rmtree(out)
    os.replace(work, out)
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--tiles", type=int, default=4, help="worlds per side")
    p.add_argument("--tile-m", type=float, default=2048.0, help="side of one world, metres")
    p.add_argument("--seed0", type=int, default=1000, help="seed of the first world (world k has seed0 + k)")
    a = p.parse_args(argv)
    print(json.dumps(make_mosaic(a.out, a.tiles, a.tile_m, seed0=a.seed0), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
