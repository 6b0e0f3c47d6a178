"""Scoring a translator (``cmpc translate eval``) on co-registered pairs of a split.

For each direction the checkpoint translates, on up to ``translate.eval_max`` aligned pairs:
- PSNR (dB) and SSIM of the translation against the co-registered truth, both mapped to
  [0, 1] by the translator's own normaliser (so dB SAR and 8-bit optical are scored alike);
- mPA / mIoU / FwIoU of the target modality's segmentation network on the translations,
  against the class mask at the patch footprint, and the same network on the real target
  patches (the ceiling);
- ``fid_seg``: Fréchet distance between segmentation-encoder features of translated and real
  target patches (disjoint halves of the pairs, features scaled to unit mean variance), and
  ``fid_seg_floor``: the same between the two halves of the real patches (what sampling
  noise alone gives at this sample size); with ``translate.fid_embedder``,
  ``fid_emb`` does the same with a trained embedder's pooled trunk features (no labels
  needed). Neither is comparable to Inception-based FIDs.
Writes ``<report_dir>/translate/<model>_e<epoch>.json`` (its ``meta.inputs``: SHA-256 of the
translator, the segmentation judges and the FID embedder used, :mod:`cmpc.utils.provenance`)
and a sample grid PNG per direction (columns: source, translation, truth).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmpc.config import Experiment
from cmpc.errors import DataError
from cmpc.models.translators.base import direction_modes
from cmpc.translate.apply import LoadedTranslator, data_contract, load_translator
from cmpc.translate.data import LabelStore, PatchStore, read_split, require_pairs, sample_indices
from cmpc.translate.metrics import confusion_matrix, fid_with_floor, mean_finite, psnr, segmentation_scores, ssim
from cmpc.utils import provenance
from cmpc.utils.io import atomic_path, atomic_write_json
from cmpc.utils.runtime import resolve_device

GRID_ROWS = 6


def to_display(unit: np.ndarray) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W, 3) uint8: RGB from the first three bands, else band 0 as grey."""
    a = np.clip((np.asarray(unit) + 1.0) * 127.5, 0, 255).astype(np.uint8)
    if a.shape[0] >= 3:
        return np.moveaxis(a[:3], 0, -1)
    return np.repeat(a[0][..., None], 3, axis=-1)


def save_grid(path: Path, rows: list[list[np.ndarray]], titles: list[str]) -> None:
    """Rows of equally sized (H, W, 3) uint8 tiles -> one PNG with column titles (atomic)."""
    from PIL import Image, ImageDraw

    up = max(1, 128 // rows[0][0].shape[0])  # small patches are enlarged (nearest) to stay legible
    rows = [[np.kron(t, np.ones((up, up, 1), np.uint8)) for t in row] for row in rows]
    h, w = rows[0][0].shape[:2]
    gap, head = 2, 14
    canvas = np.full((head + len(rows) * (h + gap), len(titles) * (w + gap), 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            y, x = head + r * (h + gap), c * (w + gap)
            canvas[y : y + h, x : x + w] = tile
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    for c, t in enumerate(titles):
        draw.text((c * (w + gap) + 2, 1), t, fill=(0, 0, 0))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


class EmbedderFeatures:
    """Pooled trunk features (B, C) of a trained embedder's branch for one modality: the FID
    variant ``fid_emb`` (works without a label raster; not comparable to Inception FIDs)."""

    def __init__(self, path: str | os.PathLike[str], device: torch.device) -> None:
        from cmpc.models.checkpoint import load_embedder

        # Building an embedder runs a backward pass (unused-parameter freezing): needs grad mode.
        with torch.enable_grad():
            self.model, meta = load_embedder(path, device)
        self.img_size = int(meta["img_size"])
        self.hash = meta["hash"]
        self.device = device

    @torch.no_grad()
    def __call__(self, unit: torch.Tensor, modality: str) -> np.ndarray:
        from cmpc.data.patches import standardize

        x = torch.nn.functional.interpolate(unit, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False, antialias=True)
        # Per-patch standardisation, as for real inputs (it also undoes the [-1, 1] scaling).
        f = self.model.pool(self.model.feature_map(standardize(x).to(self.device), modality))
        return f.float().cpu().numpy()


def _labels_and_segmenters(exp: Experiment, tr: LoadedTranslator, device: torch.device) -> tuple[Any, dict[str, Any], str | None]:
    from cmpc.translate.segment import ensure_segmenters, open_labels

    try:
        labels = open_labels(exp)
    except DataError as e:
        return None, {}, f"no segmentation metrics or FID: {e}"
    modes = tuple(sorted({direction_modes(d)[1] for d in tr.directions}))
    return labels, ensure_segmenters(exp, modes, device), None


def _inputs(exp: Experiment, ckpt: Path, tr: LoadedTranslator, segs: dict[str, Any], emb_feats: EmbedderFeatures | None) -> dict[str, Any]:
    """What the scores were computed with: translator, segmentation judges, FID embedder."""
    from cmpc.translate.segment import seg_dir

    out: dict[str, Any] = {"translator": provenance.record(ckpt, tr.hash)}
    for m in sorted(segs):
        path = seg_dir(exp) / f"seg_{m}.pt"
        if path.is_file():
            out[f"seg_{m}"] = provenance.record(path)
    if emb_feats is not None:
        out["fid_embedder"] = provenance.record(exp.translate.fid_embedder, emb_feats.hash)
    return out


@torch.no_grad()
def evaluate_translator(
    exp: Experiment,
    checkpoint: str | os.PathLike[str] | None = None,
    split: str | None = None,
    out: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Metrics of one translator checkpoint (see the module doc); returns the JSON written."""
    from cmpc.translate.train import translator_dir

    tc = exp.translate
    device = resolve_device(tc.device)
    ckpt = Path(checkpoint or tc.checkpoint or translator_dir(exp) / "last.pt")
    tr = load_translator(ckpt, device)
    split = split or tc.eval_split
    root = exp.data.root
    sar_ch, opt_ch, hw = data_contract(root, split)
    tr.check_data(sar_ch, opt_ch, hw)
    sar_anns, opt_anns = read_split(root, split)
    pairs = require_pairs(root, split, sar_anns, opt_anns, what="translator metrics (PSNR/SSIM against the truth)")
    pairs = [pairs[i] for i in sample_indices(len(pairs), tc.eval_max, tc.seed)]
    sar_sel = [sar_anns[i] for i, _ in pairs]
    opt_sel = [opt_anns[j] for _, j in pairs]
    labels, segs, seg_note = _labels_and_segmenters(exp, tr, device)
    label_store = LabelStore(labels, opt_sel, tr.source_px) if labels is not None else None
    emb_feats = EmbedderFeatures(tc.fid_embedder, device) if tc.fid_embedder else None
    out_dir = Path(out) if out else exp.report_dir / "translate"
    result: dict[str, Any] = {
        "meta": {
            "checkpoint": str(ckpt),
            "checkpoint_hash": tr.hash[:16],
            "model": tr.model,
            "epoch": tr.epoch,
            "dataset": str(root),
            "split": split,
            "n_pairs": len(pairs),
            "value_range": "PSNR/SSIM on [0, 1] = translator normaliser (0.5/99.5 percentiles of training patches)",
            "fid_features": "fid_seg: pooled encoder features of this project's segmentation network for the target modality; "
            "fid_emb: GeM-pooled trunk features of the embedder translate.fid_embedder (target-modality branch). "
            "Neither is Inception: not comparable to published FIDs",
            "fid_embedder": tc.fid_embedder,
            "inputs": _inputs(exp, ckpt, tr, segs, emb_feats),
        }
    }
    if seg_note:
        result["meta"]["note"] = seg_note
    for direction in tr.directions:
        src, tgt = direction_modes(direction)
        stores = {
            "sar": PatchStore(root, split, "sar", tr.normalizers["sar"], sar_sel, size=tr.source_px),
            "opt": PatchStore(root, split, "opt", tr.normalizers["opt"], opt_sel, size=tr.source_px),
        }
        net = segs.get(tgt)
        n_cls = net.n_classes if net is not None else 0
        cm_fake = np.zeros((n_cls, n_cls), np.int64)
        cm_real = np.zeros((n_cls, n_cls), np.int64)
        psnrs: list[float] = []
        ssims: list[float] = []
        f_real: list[np.ndarray] = []
        f_fake: list[np.ndarray] = []
        e_real: list[np.ndarray] = []
        e_fake: list[np.ndarray] = []
        grid: list[list[np.ndarray]] = []
        for s in range(0, len(pairs), 16):
            idx = list(range(s, min(s + 16, len(pairs))))
            x = torch.from_numpy(np.stack([stores[src].get(i) for i in idx]))
            real = torch.from_numpy(np.stack([stores[tgt].get(i) for i in idx]))
            fake = tr.translate_unit(x, direction)
            psnrs += psnr((fake + 1) / 2, (real + 1) / 2).tolist()
            ssims += ssim((fake + 1) / 2, (real + 1) / 2).tolist()
            if net is not None and label_store is not None:
                pf = net(fake.to(device)).argmax(1).cpu().numpy()
                pr = net(real.to(device)).argmax(1).cpu().numpy()
                for k, i in enumerate(idx):
                    lab = label_store.get(i)
                    cm_fake += confusion_matrix(lab, pf[k], n_cls)
                    cm_real += confusion_matrix(lab, pr[k], n_cls)
                f_real.append(net.features(real.to(device)).cpu().numpy())
                f_fake.append(net.features(fake.to(device)).cpu().numpy())
            if emb_feats is not None:
                e_real.append(emb_feats(real, tgt))
                e_fake.append(emb_feats(fake, tgt))
            for k, i in enumerate(idx):
                if len(grid) < GRID_ROWS:
                    grid.append([to_display(x[k].numpy()), to_display(fake[k].numpy()), to_display(real[k].numpy())])
        block: dict[str, Any] = {
            "n": len(pairs),
            "psnr_db": mean_finite(psnrs),
            "ssim": float(np.mean(ssims)),
        }
        if net is not None:
            block["seg"] = segmentation_scores(cm_fake)
            block["seg_real"] = segmentation_scores(cm_real)
            fr, ff = np.concatenate(f_real), np.concatenate(f_fake)
            if len(fr) >= 8:
                block["fid_seg"], block["fid_seg_floor"] = fid_with_floor(fr, ff)
        if e_real:
            er, ef = np.concatenate(e_real), np.concatenate(e_fake)
            if len(er) >= 8:
                block["fid_emb"], block["fid_emb_floor"] = fid_with_floor(er, ef)
        img = out_dir / f"{tr.model}_e{tr.epoch:03d}_{direction}.png"
        save_grid(img, grid, [f"{src} (input)", f"pseudo-{tgt}", f"{tgt} (truth)"])
        block["grid"] = str(img)
        result[direction] = block
        print(f"[translate eval] {tr.model} e{tr.epoch} {direction}: " + _short(block), file=sys.stderr, flush=True)
    atomic_write_json(out_dir / f"{tr.model}_e{tr.epoch:03d}.json", result)
    return result


def _short(block: dict[str, Any]) -> str:
    parts = [f"PSNR {block['psnr_db']:.2f} dB", f"SSIM {block['ssim']:.3f}"]
    if "seg" in block:
        parts += [f"mIoU {block['seg']['mIoU']:.3f} (real {block['seg_real']['mIoU']:.3f})"]
    if "fid_seg" in block:
        parts += [f"FID-seg {block['fid_seg']:.2f} (floor {block['fid_seg_floor']:.2f})"]
    if "fid_emb" in block:
        parts += [f"FID-emb {block['fid_emb']:.2f} (floor {block['fid_emb_floor']:.2f})"]
    return ", ".join(parts)
