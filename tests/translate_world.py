"""A tiny co-registered world and CMPC dataset for the translator tests, made on the fly.

128 x 128 px at 1 m (EPSG:32631): a class mask (0 field, 1 building, 2 water, 3 road), an
optical rendering (3-band uint8, per-class colour + noise) and a SAR rendering (1-band dB,
per-class backscatter x Gamma speckle), cut into 32 px patches on a 16 px grid. West half =
train, east half = test. Aligned SAR queries share their reference's footprint; one
non-aligned query per reference sits 5 px off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cmpc.data.layout import Annotation, write_annotation

CRS = "EPSG:32631"
X0, Y0 = 500_000.0, 5_000_000.0
SIDE = 128
PATCH = 32
STRIDE = 16
COLOURS = np.array([[110, 140, 60], [200, 190, 180], [30, 60, 110], [90, 90, 90]], dtype=np.float32)
SAR_DB = np.array([-12.0, 2.0, -24.0, -16.0], dtype=np.float32)


def make_labels(seed: int = 0, side: int = SIDE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = np.zeros((side, side), np.uint8)
    lab[:, side // 2 - 6 : side // 2 + 2] = 2  # a river, north-south
    lab[side // 3 : side // 3 + 3, :] = 3  # a road, east-west
    for _ in range(12):
        y, x = rng.integers(0, side - 12, 2)
        h, w = rng.integers(5, 12, 2)
        lab[y : y + h, x : x + w] = 1
    return lab


def render(lab: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(optical (3, H, W) uint8, sar (1, H, W) float32 dB)."""
    rng = np.random.default_rng(seed + 1)
    opt = COLOURS[lab].transpose(2, 0, 1) + rng.normal(0, 8, (3,) + lab.shape)
    opt = np.clip(opt, 0, 255).astype(np.uint8)
    lin = 10 ** (SAR_DB[lab] / 10) * rng.gamma(4.0, 1 / 4.0, lab.shape)
    sar = (10 * np.log10(lin))[None].astype(np.float32)
    return opt, sar


def write_raster(path: Path, arr: np.ndarray, crs: str = CRS, x0: float = X0, y0: float = Y0, res: float = 1.0) -> Path:
    import rasterio
    from rasterio.transform import from_origin

    arr = arr if arr.ndim == 3 else arr[None]
    with rasterio.open(
        path, "w", driver="GTiff", count=arr.shape[0], height=arr.shape[1], width=arr.shape[2], dtype=arr.dtype.name,
        crs=crs, transform=from_origin(x0, y0, res, res),
    ) as dst:
        dst.write(arr)
    return path


def _write_patch(path: Path, arr: np.ndarray, bounds: tuple[float, float, float, float]) -> None:
    if arr.dtype == np.uint8:
        from PIL import Image

        Image.fromarray(np.moveaxis(arr, 0, -1) if arr.shape[0] == 3 else arr[0]).save(path)
    else:
        import rasterio
        from rasterio.transform import from_bounds

        tr = from_bounds(*bounds, arr.shape[2], arr.shape[1])
        with rasterio.open(path, "w", driver="GTiff", count=arr.shape[0], height=arr.shape[1], width=arr.shape[2], dtype="float32", crs=CRS, transform=tr) as dst:
            dst.write(arr)


def make_world(tmp: Path, seed: int = 0, aligned: bool = True, sar_bands: int = 1) -> dict[str, Path]:
    """Write world/{optical,sar,labels}.tif and dataset/ under ``tmp``; returns their paths.

    ``aligned`` False writes only non-aligned SAR queries (no co-registered pair at all).
    ``sar_bands`` > 1 stacks speckle-independent copies (multi-polarisation SAR).
    """
    world = tmp / "world"
    world.mkdir(parents=True, exist_ok=True)
    lab = make_labels(seed)
    opt, sar = render(lab, seed)
    if sar_bands > 1:
        sar = np.concatenate([sar] + [render(lab, seed + 10 * b)[1] - 3.0 * b for b in range(1, sar_bands)], 0)
    write_raster(world / "optical.tif", opt)
    write_raster(world / "sar.tif", sar)
    write_raster(world / "labels.tif", lab)
    root = tmp / "dataset"
    n = 0
    for split, (c0, c1) in (("train", (0, SIDE // 2 + PATCH // 2)), ("test", (SIDE // 2, SIDE))):
        for mode in ("opt", "sar"):
            (root / split / "imgs" / mode).mkdir(parents=True, exist_ok=True)
        k = 0
        for r in range(0, SIDE - PATCH + 1, STRIDE):
            for c in range(c0, c1 - PATCH + 1, STRIDE):
                n += 1
                name = str(k)
                bounds = (X0 + c, Y0 - r - PATCH, X0 + c + PATCH, Y0 - r)
                cx, cy = X0 + c + PATCH / 2, Y0 - r - PATCH / 2
                _write_patch(root / split / "imgs" / "opt" / f"{name}.png", opt[:, r : r + PATCH, c : c + PATCH], bounds)
                write_annotation(root, split, "opt", Annotation(id=n, x=cx, y=cy, file_path=f"{name}.png", crs=CRS, bounds=bounds, gsd=1.0, name=name))
                queries = []
                if aligned:
                    queries.append((0, 0, True))
                dr = 5 if r + PATCH + 5 <= SIDE else -5
                dc = 5 if c + PATCH + 5 <= c1 else -5
                queries.append((dr, dc, False))
                for q, (dr_, dc_, al) in enumerate(queries):
                    qn = f"{k}_{q}"
                    rr, cc = r + dr_, c + dc_
                    qb = (X0 + cc, Y0 - rr - PATCH, X0 + cc + PATCH, Y0 - rr)
                    _write_patch(root / split / "imgs" / "sar" / f"{qn}.tif", sar[:, rr : rr + PATCH, cc : cc + PATCH], qb)
                    write_annotation(
                        root, split, "sar",
                        Annotation(id=n, x=X0 + cc + PATCH / 2, y=Y0 - rr - PATCH / 2, file_path=f"{qn}.tif", crs=CRS, bounds=qb, gsd=1.0, aligned=al, name=qn),
                    )
                k += 1
    return {"world": world, "root": root, "labels": world / "labels.tif", "optical": world / "optical.tif"}


def experiment_dict(paths: dict[str, Path], tmp: Path, **translate) -> dict:
    """An experiment JSON for the tiny world (fast translator settings)."""
    tr = {"patch_px": 32, "ngf": 8, "ndf": 8, "n_blocks": 2, "epochs": 1, "batch_size": 4, "max_steps_per_epoch": 3, "seg_epochs": 2, "seg_width": 8, "eval_max": 16, "threads": 1}
    tr.update(translate)
    return {
        "name": "tr_tiny",
        "runs_dir": str(tmp / "runs"),
        "synth": {"out": str(paths["world"])},
        "data": {"root": str(paths["root"]), "img_size": 32},
        "translate": tr,
        "eval": {"out": str(tmp / "reports")},
    }
