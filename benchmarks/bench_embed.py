"""Embedding throughput (patches/s): model only, data loader only, and both together.

Backbones mobilenetv3_small_100, convnext_atto and resnet18 (the embedder of
:mod:`cmpc.models.embedder`: stem + timm trunk + GeM + projection, D = 256), at 64 and 128 px
inputs, batch 1 and 32, with 1 and 2 CPU threads. ``model``: forward passes on tensors
already in memory (the baseline); ``loader``: reading + decoding + resizing +
standardising patches of a CMPC dataset (PNG optical, GeoTIFF SAR) through a DataLoader;
``loader+model``: ``embed_batches`` as ``cmpc index build`` runs it. If loader+model is
close to model alone, the data pipeline is not the bottleneck. With a CUDA GPU, model rows
are added with AMP (float16) and channels_last.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.harness import table, time_runs

BENCH = "embed"
TITLE = "Embedding throughput: model, data loader, both (patches/s)"
# cmpc_cnn_s is the trunk of the demo, UAVSAR and S1/S2 experiments (with grid pooling, as there);
# the timm backbones use the default GeM pooling.
BACKBONES = ("cmpc_cnn_s", "mobilenetv3_small_100", "convnext_atto", "resnet18")
POOL = {"cmpc_cnn_s": "grid"}


def _model(backbone: str, device: str = "cpu"):  # noqa: ANN202 - Embedder
    from cmpc.config import ModelConfig
    from cmpc.models.embedder import build_embedder

    m = build_embedder(ModelConfig(backbone=backbone, pool=POOL.get(backbone, "gem"), embed_dim=256), 1, 3).eval().to(device)
    if device == "cuda":
        m = m.to(memory_format=torch.channels_last)
    return m


def model_throughput(backbone: str, img: int, batch: int, threads: int, repeats: int, device: str = "cpu") -> float:
    """Patches/s of optical forward passes (inference mode), median over ``repeats`` batches."""
    torch.set_num_threads(threads)
    m = _model(backbone, device)
    x = torch.randn(batch, 3, img, img, device=device)
    amp = device == "cuda"
    if amp:
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.inference_mode(), torch.autocast(device_type=device, dtype=torch.float16, enabled=amp):
            m(x, "opt")
        if amp:
            torch.cuda.synchronize()

    t = time_runs(step, repeats, warmup=2)
    return batch / t.median


def tiny_dataset(root: Path, n: int = 64, patch_px: int = 64, seed: int = 0) -> Path:
    """A CMPC dataset of n random optical PNG and SAR GeoTIFF patches (quick mode, tests)."""
    import rasterio
    from PIL import Image

    from cmpc.data.layout import Annotation, write_annotation

    rng = np.random.default_rng(seed)
    for mode in ("opt", "sar"):
        (root / "test" / "imgs" / mode).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (patch_px, patch_px, 3), dtype=np.uint8)).save(root / "test/imgs/opt" / f"{i}.png")
        with rasterio.open(root / "test/imgs/sar" / f"{i}.tif", "w", driver="GTiff", width=patch_px, height=patch_px,
                           count=1, dtype="float32", crs="EPSG:32631", transform=rasterio.transform.from_origin(500_000 + 64 * i, 5_000_000, 1, 1)) as dst:
            dst.write(rng.normal(-10, 3, (1, patch_px, patch_px)).astype(np.float32))
        for mode, ext in (("opt", "png"), ("sar", "tif")):
            write_annotation(root, "test", mode, Annotation(id=i, x=float(i), y=0.0, file_path=f"{i}.{ext}", name=str(i)))
    return root


def loader_throughput(root: Path, mode: str, img: int, batch: int, workers: int, max_batches: int) -> float:
    """Patches/s of a DataLoader over ``root``/test/``mode`` (decode + resize + standardise)."""
    from cmpc.data.patches import PatchDataset

    ds = PatchDataset(root, "test", mode, img)
    loader = DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers)
    n, t0 = 0, time.perf_counter()
    for k, (x, _) in enumerate(loader):
        n += len(x)
        if k + 1 >= max_batches:
            break
    return n / (time.perf_counter() - t0)


def both_throughput(root: Path, backbone: str, img: int, batch: int, workers: int, threads: int, max_batches: int) -> float:
    """Patches/s of ``embed_batches`` over the optical references (what ``cmpc index build`` does)."""
    from cmpc.data.patches import PatchDataset
    from cmpc.models.checkpoint import embed_batches

    torch.set_num_threads(threads)
    m = _model(backbone)
    ds = PatchDataset(root, "test", "opt", img)
    loader = DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers)
    n, t0 = 0, time.perf_counter()
    for k, (e, _) in enumerate(embed_batches(m, loader, "opt", "cpu")):
        n += len(e)
        if k + 1 >= max_batches:
            break
    return n / (time.perf_counter() - t0)


def run(quick: bool) -> list[dict[str, Any]]:
    threads0 = torch.get_num_threads()
    rows: list[dict[str, Any]] = []
    tmp = tempfile.TemporaryDirectory()
    try:
        bench_ds = Path("data/bench/dataset")
        if not quick and not (bench_ds / "test").is_dir() and Path("data/demo/dataset/test").is_dir():
            bench_ds = Path("data/demo/dataset")  # the demo's patches (128 px) when the benchmark cache is absent
        if quick or not (bench_ds / "test").is_dir():
            root, data_label = tiny_dataset(Path(tmp.name) / "ds", n=48 if quick else 512), "random 64 px patches"
        else:
            root, data_label = bench_ds, str(bench_ds)
        backbones = BACKBONES[:1] if quick else BACKBONES
        imgs = (32,) if quick else (64, 128)
        batches = (8,) if quick else (1, 32)
        threads = (1,) if quick else (1, 2)
        repeats = 3 if quick else 5
        for bb in backbones:
            for img in imgs:
                for bs in batches:
                    for th in threads:
                        ps = model_throughput(bb, img, bs, th, repeats)
                        rows.append({"name": f"{bb} {img}px b{bs} t{th} model", "mode": "model", "backbone": bb, "img_size": img,
                                     "batch": bs, "threads": th, "device": "cpu", "patches_s": round(ps, 1), "runs": repeats})
        if torch.cuda.is_available():
            for bb in backbones:
                for img in imgs:
                    ps = model_throughput(bb, img, 128, threads0, repeats, device="cuda")
                    rows.append({"name": f"{bb} {img}px b128 cuda amp model", "mode": "model", "backbone": bb, "img_size": img,
                                 "batch": 128, "threads": threads0, "device": f"cuda ({torch.cuda.get_device_name(0)}), AMP fp16, channels_last",
                                 "patches_s": round(ps, 1), "runs": repeats})
        # The data pipeline alone and with the model, for the index-build configuration (img 64, batch 32).
        img, bs = imgs[0], batches[-1]
        nb = 2 if quick else 12
        for mode, kind in (("opt", "PNG optical"), ("sar", "GeoTIFF SAR")):
            for w in ((0,) if quick else (0, 1)):
                ps = max(loader_throughput(root, mode, img, bs, w, nb) for _ in range(1 if quick else 3))
                rows.append({"name": f"loader {kind} {img}px w{w}", "mode": "loader", "data": kind, "img_size": img, "batch": bs,
                             "num_workers": w, "threads": 1, "device": "cpu", "patches_s": round(ps, 1)})
        for bb in backbones:
            for w in ((0,) if quick else (0, 1)):
                ps = max(both_throughput(root, bb, img, bs, w, 1, nb) for _ in range(1 if quick else 3))
                model_only = next(r["patches_s"] for r in rows if r["mode"] == "model" and r["backbone"] == bb and r["img_size"] == img
                                  and r["batch"] == bs and r["threads"] == 1)
                rows.append({"name": f"{bb} {img}px b{bs} loader+model w{w}", "mode": "loader+model", "backbone": bb, "img_size": img,
                             "batch": bs, "num_workers": w, "threads": 1, "device": "cpu", "patches_s": round(ps, 1),
                             "vs_model_only": round(ps / model_only, 3)})
        for r in rows:
            r["bench"] = BENCH
            r["dataset"] = data_label
            r["ms_per_patch"] = round(1e3 / r["patches_s"], 3) if r["patches_s"] else None
        return rows
    finally:
        torch.set_num_threads(threads0)
        tmp.cleanup()


def render(rows: list[dict[str, Any]]) -> str:
    model = [r for r in rows if r["mode"] == "model"]
    pipe = [r for r in rows if r["mode"] != "model"]
    return "\n".join([
        "Model only (random tensors in memory; the baseline), patches/s, median of repeated batches:",
        "",
        table(model, [("backbone", "backbone"), ("img_size", "input px"), ("batch", "batch"), ("threads", "threads"),
                      ("device", "device"), ("patches_s", "patches/s"), ("ms_per_patch", "ms/patch")]),
        "",
        f"Data pipeline ({pipe[0].get('dataset') if pipe else ''}) alone and with the model (`embed_batches`, as in "
        "`cmpc index build`), best of 3 passes; `vs model only` = loader+model / model-only throughput at the same "
        "size, batch and threads (1.0 = the loader costs nothing):",
        "",
        table(pipe, [("name", "configuration"), ("num_workers", "workers"), ("patches_s", "patches/s"),
                     ("ms_per_patch", "ms/patch"), ("vs_model_only", "vs model only")]),
        "",
        _bottleneck_note(pipe),
    ])


def _bottleneck_note(pipe: list[dict[str, Any]]) -> str:
    """One reading line: which backbones the data loader holds back (vs model only < 0.8)."""
    both = [r for r in pipe if r["mode"] == "loader+model" and r.get("vs_model_only") is not None]
    loaders = [r["patches_s"] for r in pipe if r["mode"] == "loader"]
    slow = sorted({r["backbone"] for r in both if r["vs_model_only"] < 0.8})
    if not both or not loaders:
        return ""
    if not slow:
        return "Reading: the loader keeps up with every backbone (vs model only >= 0.8)."
    return (
        f"Reading: the loader (decode + resize + standardise, {min(loaders):,.0f}-{max(loaders):,.0f} patches/s alone) "
        f"holds back {', '.join(slow)} (vs model only < 0.8): for these small trunks, reading patch files costs more than "
        "the network; a worker process does not help on 2 cores."
    )


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run("--quick" in sys.argv), indent=1))
