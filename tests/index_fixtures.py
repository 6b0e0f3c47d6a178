"""Tiny CMPC datasets and untrained embedders for the index / localize / evaluate tests.

A structured random "world" (smooth fields plus bright rectangles) is cut into optical
references on a 50 %-overlap grid, aligned SAR queries on the same footprints and
non-aligned SAR queries at random offsets, written with the real CMPC layout helpers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cmpc.config import ModelConfig
from cmpc.data.layout import Annotation, write_annotation
from cmpc.models.checkpoint import embedder_payload, save_checkpoint
from cmpc.models.embedder import build_embedder

CRS = "EPSG:32631"
ORIGIN = (500_000.0, 5_000_000.0)  # upper-left corner, metres


def make_world(seed: int, size_px: int) -> np.ndarray:
    """(3, size, size) uint8 optical world: smooth colour fields with random bright blocks."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((3, size_px // 8 + 2, size_px // 8 + 2)).astype(np.float32)
    t = torch.nn.functional.interpolate(torch.from_numpy(coarse)[None], size=(size_px, size_px), mode="bilinear", align_corners=False)[0]
    img = t.numpy() * 160
    for _ in range(size_px // 4):
        x, y = rng.integers(0, size_px - 6, size=2)
        w, h = rng.integers(2, 7, size=2)
        img[:, y : y + h, x : x + w] = rng.uniform(180, 255, size=(3, 1, 1))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_dataset(
    root: Path,
    *,
    seed: int = 0,
    grid: int = 4,
    patch_px: int = 16,
    split: str = "test",
    id_offset: int = 0,
    origin: tuple[float, float] = ORIGIN,
    crs: str | None = CRS,
    sar_bands: int = 1,
    sar_equals_optical: bool = False,
    non_aligned: int = 4,
    with_bounds: bool = True,
) -> dict:
    """Write a tiny CMPC dataset; return {"refs": [...], "queries": [...]} annotations.

    ``grid`` x ``grid`` references of ``patch_px`` px (1 m/px) on a 50 %-overlap grid;
    one aligned SAR query per reference (name ``a<i>``) and ``non_aligned`` queries at
    random positions (``n<j>``, id = nearest reference). ``sar_equals_optical`` writes the
    optical pixels as the SAR query (an oracle for a model whose two stems are equal).
    """
    stride = patch_px // 2
    size = stride * (grid + 1)
    world = make_world(seed, size)
    rng = np.random.default_rng(seed + 1)
    sar_world = world.mean(axis=0, keepdims=True).astype(np.float32)
    sar_world = 10 * np.log10(1 + sar_world * rng.gamma(4, 1 / 4, size=sar_world.shape))
    if sar_bands > 1:
        sar_world = np.concatenate([sar_world * (1 + 0.1 * b) for b in range(sar_bands)], axis=0)
    refs, queries = [], []
    centres = []
    (root / split / "imgs" / "opt").mkdir(parents=True, exist_ok=True)
    (root / split / "imgs" / "sar").mkdir(parents=True, exist_ok=True)

    def bounds_of(col: float, row: float) -> tuple[float, float, float, float]:
        minx = origin[0] + col
        maxy = origin[1] - row
        return (minx, maxy - patch_px, minx + patch_px, maxy)

    def write_sar(name: str, col: int, row: int) -> str:
        if sar_equals_optical:
            arr = world[:, row : row + patch_px, col : col + patch_px]
            Image.fromarray(np.moveaxis(arr, 0, -1)).save(root / split / "imgs" / "sar" / f"{name}.png")
            return f"{name}.png"
        import rasterio
        from rasterio.transform import from_origin

        arr = sar_world[:, row : row + patch_px, col : col + patch_px]
        tr = from_origin(origin[0] + col, origin[1] - row, 1.0, 1.0)
        with rasterio.open(
            root / split / "imgs" / "sar" / f"{name}.tif", "w", driver="GTiff", width=patch_px, height=patch_px,
            count=arr.shape[0], dtype="float32", crs=crs, transform=tr,
        ) as dst:
            dst.write(arr.astype(np.float32))
        return f"{name}.tif"

    k = 0
    for r in range(grid):
        for c in range(grid):
            col, row = c * stride, r * stride
            b = bounds_of(col, row)
            cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
            rid = id_offset + k
            Image.fromarray(np.moveaxis(world[:, row : row + patch_px, col : col + patch_px], 0, -1)).save(
                root / split / "imgs" / "opt" / f"{k}.png"
            )
            ref = Annotation(id=rid, x=cx, y=cy, file_path=f"{k}.png", crs=crs, bounds=b if with_bounds else None, gsd=1.0 if with_bounds else None, name=str(k))
            write_annotation(root, split, "opt", ref)
            refs.append(ref)
            centres.append((cx, cy))
            fp = write_sar(f"a{k}", col, row)
            q = Annotation(id=rid, x=cx, y=cy, file_path=fp, crs=crs, bounds=b if with_bounds else None, gsd=1.0, aligned=True, name=f"a{k}")
            write_annotation(root, split, "sar", q)
            queries.append(q)
            k += 1
    centres_a = np.array(centres)
    for j in range(non_aligned):
        col, row = (int(v) for v in rng.integers(0, size - patch_px, size=2))
        b = bounds_of(col, row)
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        near = np.argsort(np.hypot(centres_a[:, 0] - cx, centres_a[:, 1] - cy), kind="stable")
        fp = write_sar(f"n{j}", col, row)
        q = Annotation(
            id=id_offset + int(near[0]), x=cx, y=cy, file_path=fp, near_id=[id_offset + int(i) for i in near[:4]],
            crs=crs, bounds=b, gsd=1.0, aligned=False, name=f"n{j}",
        )
        write_annotation(root, split, "sar", q)
        queries.append(q)
    return {"refs": refs, "queries": queries, "world": world, "sar_world": sar_world}


def write_checkpoint(
    path: Path,
    *,
    sar_channels: int = 1,
    optical_channels: int = 3,
    img_size: int = 16,
    embed_dim: int = 16,
    seed: int = 0,
    tie_stems: bool = False,
    backbone: str = "resnet10t",
) -> Path:
    """Save an untrained tiny embedder checkpoint; ``tie_stems`` copies the optical stem into the SAR stem."""
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone=backbone, embed_dim=embed_dim, stem_channels=8)
    model = build_embedder(cfg, sar_channels, optical_channels)
    if tie_stems:
        model.stems["sar"].load_state_dict(model.stems["opt"].state_dict())
    model.eval()
    # Untrained BatchNorm running stats are (0, 1): fine, and deterministic in eval mode.
    return save_checkpoint(path, embedder_payload(model, img_size, epoch=0))


def experiment(name: str, root: Path | str, *overrides: str):  # noqa: ANN201 - cmpc.config.Experiment
    """An experiment for the tiny world: small batches, CPU, paths relative to the cwd."""
    from cmpc.config import load_experiment

    return load_experiment(
        None,
        [f"name={name}", f"data.root={root}", "index.batch_size=8", "localize.batch_size=8", "localize.top_k=5",
         "train.device=cpu", "eval.grid_queries=3", *overrides],
    )


def write_experiment_json(path: Path, name: str, root: Path | str, **sections: dict) -> Path:
    """An experiment JSON file for CLI tests."""
    import json

    raw = {"name": name, "data": {"root": str(root)}, "index": {"batch_size": 8}, "localize": {"batch_size": 8, "top_k": 5},
           "train": {"device": "cpu"}, "eval": {"grid_queries": 2}}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    path.write_text(json.dumps(raw))
    return path


# --------------------------------------------------------------------------- the steps as the CLI composes them


def evaluate_command(exp, checkpoint=None):  # noqa: ANN001, ANN201 - Experiment -> metrics dict
    """``cmpc test``: the index step (built only when missing or stale), then the evaluation."""
    from cmpc.evaluate.run import evaluate
    from cmpc.index.build import ensure_index

    index = ensure_index(exp, checkpoint)
    return evaluate(exp, index.directory, checkpoint=checkpoint, index_rebuilt=index.built)


def localize_command(exp, queries, **kwargs):  # noqa: ANN001, ANN201 - Experiment -> summary dict
    """``cmpc localize``: queries with ground truth are scored (metrics.json + plots)."""
    from cmpc.evaluate.ranks import GroundTruthScorer
    from cmpc.localize.run import localize

    return localize(exp, queries, scorer=GroundTruthScorer(exp.eval, exp.localize.top_k), **kwargs)


def train_refiner_command(exp, checkpoint=None):  # noqa: ANN001, ANN201 - Experiment -> Path
    """``cmpc train refine``: the index step builds the training map, then the refiner trains on it."""
    from cmpc.index.build import ensure_train_index
    from cmpc.train.refine import train_refiner

    return train_refiner(exp, ensure_train_index(exp, checkpoint).directory, checkpoint=checkpoint)
