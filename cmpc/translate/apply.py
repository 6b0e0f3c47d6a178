"""Using a trained translator: load a checkpoint, check it fits the data, translate patches,
write translated patches as a CMPC dataset (``cmpc translate apply``).

A translator checkpoint records the band counts and the patch side (pixels) it was trained
on; data with other bands or another patch side is a one-line :class:`CheckpointError`
(a translator learned one sensor pair at one scale).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from cmpc.config import Experiment
from cmpc.data.layout import Annotation, read_annotations, safe_image_path, write_annotation
from cmpc.data.patches import read_patch_array
from cmpc.errors import CheckpointError, ConfigError
from cmpc.models.checkpoint import checkpoint_hash, load_checkpoint
from cmpc.models.translators.base import build_generator, direction_modes
from cmpc.models.translators.networks import run_generator
from cmpc.translate.data import Normalizer
from cmpc.utils import provenance
from cmpc.utils.io import atomic_dir, atomic_path, atomic_write_json


@dataclass
class LoadedTranslator:
    """A translator checkpoint ready to use: generators (eval mode) and its data contract."""

    path: Path
    model: str
    generators: dict[str, nn.Module]
    normalizers: dict[str, Normalizer]
    sar_channels: int
    opt_channels: int
    source_px: tuple[int, int]
    epoch: int
    hash: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def directions(self) -> tuple[str, ...]:
        return tuple(self.generators)

    def channels(self, modality: str) -> int:
        return self.sar_channels if modality == "sar" else self.opt_channels

    def check_data(self, sar_channels: int, opt_channels: int, patch_hw: tuple[int, int] | None = None) -> None:
        """One-line error when the data's bands or patch size differ from the training data's."""
        name = f"translator {self.path}"
        if sar_channels != self.sar_channels or opt_channels != self.opt_channels:
            raise CheckpointError(
                f"{name} was trained for {self.sar_channels}-band SAR and {self.opt_channels}-band optical, "
                f"the data has {sar_channels} and {opt_channels}; train a translator on this data"
            )
        if patch_hw is not None and tuple(patch_hw) != tuple(self.source_px):
            raise CheckpointError(
                f"{name} was trained on {self.source_px[0]}x{self.source_px[1]} px patches, the data has "
                f"{patch_hw[0]}x{patch_hw[1]} px; train a translator at this patch size"
            )

    def _gen(self, direction: str) -> nn.Module:
        if direction not in self.generators:
            raise ConfigError(f"translator {self.path} ({self.model}) translates {list(self.generators)}, not {direction}")
        return self.generators[direction]

    @torch.no_grad()
    def translate_unit(self, x: torch.Tensor, direction: str) -> torch.Tensor:
        """(B, C_src, H, W) in [-1, 1] -> (B, C_tgt, H, W) in [-1, 1]."""
        gen = self._gen(direction)
        src, _ = direction_modes(direction)
        if x.shape[1] != self.channels(src):
            raise CheckpointError(f"translator {self.path} expects {self.channels(src)}-band {src} input, got {x.shape[1]} band(s)")
        dev = next(gen.parameters()).device
        return run_generator(gen, x.to(dev)).cpu()

    def _to_source_grid(self, u: np.ndarray) -> np.ndarray:
        # SAR cut from a coarser raster was resized to the optical patch grid in training too.
        if u.shape[-2:] == tuple(self.source_px):
            return u
        t = torch.nn.functional.interpolate(torch.from_numpy(u)[None], size=self.source_px, mode="bilinear", align_corners=False, antialias=True)
        return t[0].numpy()

    def translate_arrays(self, arrays: list[np.ndarray], direction: str) -> list[np.ndarray]:
        """Patches (C_src, H, W) in data units -> translations (C_tgt, H', W') in the target's units.

        (H', W') is the training patch size (source patches on another grid are resized to it).
        """
        src, tgt = direction_modes(direction)
        units = [self._to_source_grid(self.normalizers[src].to_unit(a)) for a in arrays]
        same = len({u.shape for u in units}) == 1
        if same and units:
            outs = list(self.translate_unit(torch.from_numpy(np.stack(units)), direction).numpy())
        else:
            outs = [self.translate_unit(torch.from_numpy(u)[None], direction)[0].numpy() for u in units]
        return [self.normalizers[tgt].from_unit(o) for o in outs]


def load_translator(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedTranslator:
    """Rebuild a translator's generators from a checkpoint (``weights_only=True``)."""
    p = Path(path)
    ck = load_checkpoint(p)
    if ck.get("kind") != "translator" or "generators" not in ck:
        raise CheckpointError(f"{p} is not a translator checkpoint (kind={ck.get('kind')!r})")
    gens: dict[str, nn.Module] = {}
    for d, state in ck["generators"].items():
        try:
            g = build_generator(ck["archs"][d])
            g.load_state_dict(state)
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{p}: generator {d} does not fit its stored architecture: {str(e).splitlines()[0]}") from None
        gens[d] = g.to(device).eval()
    meta = {k: v for k, v in ck.items() if k not in ("generators", "discriminators")}
    return LoadedTranslator(
        path=p,
        model=str(ck["model"]),
        generators=gens,
        normalizers={m: Normalizer.from_dict(d) for m, d in ck["normalizers"].items()},
        sar_channels=int(ck["sar_channels"]),
        opt_channels=int(ck["opt_channels"]),
        source_px=(int(ck["source_px"][0]), int(ck["source_px"][1])),
        epoch=int(ck.get("epoch", 0)),
        hash=checkpoint_hash(p),
        meta=meta,
    )


def data_contract(root: str | os.PathLike[str], split: str) -> tuple[int, int, tuple[int, int]]:
    """(SAR bands, optical bands, optical patch (H, W) px) of a dataset split."""
    sar = read_annotations(root, split, "sar")
    opt = read_annotations(root, split, "opt")
    a_s = read_patch_array(safe_image_path(root, split, "sar", sar[0].file_path))
    a_o = read_patch_array(safe_image_path(root, split, "opt", opt[0].file_path))
    return int(a_s.shape[0]), int(a_o.shape[0]), (int(a_o.shape[1]), int(a_o.shape[2]))


def _write_patch(path: Path, arr: np.ndarray, png: bool, ann: Annotation) -> None:
    if png:
        from PIL import Image

        img = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        img = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
        with atomic_path(path) as tmp:
            Image.fromarray(img).save(tmp, format="PNG")
        return
    import rasterio
    from rasterio.transform import from_bounds

    profile: dict[str, Any] = {"driver": "GTiff", "count": arr.shape[0], "height": arr.shape[1], "width": arr.shape[2], "dtype": "float32"}
    if ann.bounds is not None:
        profile["transform"] = from_bounds(*ann.bounds, arr.shape[2], arr.shape[1])
    if ann.crs:
        profile["crs"] = ann.crs
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(arr.astype(np.float32))


def apply_translator(
    exp: Experiment,
    checkpoint: str | os.PathLike[str] | None = None,
    split: str = "test",
    direction: str | None = None,
    out: str | os.PathLike[str] | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Translate every source patch of ``split`` and write them as a CMPC dataset at ``out``.

    ``direction`` sar2opt writes ``out/<split>/{annotations,imgs}/opt/`` (pseudo-optical of
    the SAR patches, same ids, positions and footprints); opt2sar writes ``.../sar/``.
    Target patches are PNG when the real target patches are 8-bit PNG, else float32 GeoTIFF.
    The folder appears complete or not at all.
    """
    from cmpc.translate.train import translator_dir

    ckpt = Path(checkpoint or exp.translate.checkpoint or translator_dir(exp) / "last.pt")
    tr = load_translator(ckpt)
    direction = direction or (exp.translate.direction if exp.translate.direction in tr.directions else tr.directions[0])
    src, tgt = direction_modes(direction)
    root = exp.data.root
    sar_ch, opt_ch, hw = data_contract(root, split)
    tr.check_data(sar_ch, opt_ch, hw)
    anns = read_annotations(root, split, src)
    tgt_first = read_annotations(root, split, tgt)[0]
    png = Path(tgt_first.file_path).suffix.lower() == ".png"
    out = Path(out) if out else Path(root).parent / f"{Path(root).name}_{tr.model}_{direction}"
    with atomic_dir(out) as tmp:
        for s in tqdm(range(0, len(anns), batch_size), desc=f"translate {direction}", disable=not progress, file=sys.stderr, leave=False):
            chunk = anns[s : s + batch_size]
            arrs = [read_patch_array(safe_image_path(root, split, src, a.file_path)) for a in chunk]
            for a, t in zip(chunk, tr.translate_arrays(arrs, direction)):
                stem = Path(a.file_path).stem
                fp = f"{stem}.png" if png else f"{stem}.tif"
                (tmp / split / "imgs" / tgt).mkdir(parents=True, exist_ok=True)
                _write_patch(tmp / split / "imgs" / tgt / fp, t, png, a)
                new = Annotation(
                    id=a.id, x=a.x, y=a.y, file_path=fp, near_id=a.near_id, crs=a.crs, bounds=a.bounds, gsd=a.gsd,
                    aligned=a.aligned, name=a.name, extra={**a.extra, "translated_from": src, "translator": tr.model, "translator_hash": tr.hash[:16]},
                )
                write_annotation(tmp, split, tgt, new)
        atomic_write_json(
            tmp / "dataset.json",
            {
                "translated": True, "source_dataset": str(root), "split": split, "direction": direction, "translator": str(ckpt),
                "translator_hash": tr.hash, "epoch": tr.epoch, "inputs": {"translator": provenance.record(ckpt, tr.hash)},
            },
        )
    summary = {"out": str(out), "split": split, "direction": direction, "patches": len(anns), "translator": str(ckpt), "epoch": tr.epoch}
    return summary
