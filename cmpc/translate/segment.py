"""Training the segmentation networks that Seg-CycleGAN and the translator metrics rely on.

One network per modality (``seg_opt.pt`` on optical references, ``seg_sar.pt`` on SAR
patches), trained on the training split with class masks cut from the label raster, and
scored on the evaluation split (its mIoU on *real* patches is the ceiling a translation can
reach). They live in ``translate.seg_dir`` (default ``<runs_dir>/seg/<dataset folder>``) and
are shared by every translator of that dataset, so metrics stay comparable across them; a
network is retrained only when its dataset or label raster changes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from cmpc.config import Experiment
from cmpc.errors import CheckpointError, DataError
from cmpc.models.checkpoint import load_checkpoint, save_checkpoint
from cmpc.models.translators.seg import SegNet
from cmpc.translate.data import (
    IGNORE_LABEL,
    LabelRaster,
    LabelStore,
    Normalizer,
    PatchStore,
    UnpairedCrops,
    dataset_crs,
    default_label_raster,
    fit_normalizer,
    optical_raster,
    read_split,
    sample_indices,
)
from cmpc.translate.metrics import confusion_matrix, segmentation_scores
from cmpc.utils.io import append_jsonl
from cmpc.utils.runtime import resolve_device, seed_everything


def seg_dir(exp: Experiment) -> Path:
    """Where the segmentation networks of ``exp``'s dataset live."""
    if exp.translate.seg_dir:
        return Path(exp.translate.seg_dir)
    slug = "_".join(p for p in Path(exp.data.root).parts if p not in ("/", "..", ".")) or "dataset"
    return Path(exp.runs_dir) / "seg" / slug


def open_labels(exp: Experiment, anns: list | None = None) -> LabelRaster:
    """The experiment's label raster, checked against the optical raster (one-line errors)."""
    path = default_label_raster(exp.translate.label_raster, exp.synth.out)
    if path is None:
        raise DataError(
            f"no label raster: set translate.label_raster (a class-mask GeoTIFF on the optical grid); "
            f"{Path(exp.synth.out) / 'labels.tif'} does not exist"
        )
    opt = optical_raster(exp.tile.optical, exp.synth.out, exp.data.root)
    return LabelRaster(path, optical=opt, crs=dataset_crs(exp.data.root, anns or []))


def fit_normalizers(root: str, sar_anns: list, opt_anns: list, seed: int, n: int = 64) -> dict[str, Normalizer]:
    """Per-modality [-1, 1] normalisers from up to ``n`` training patches each."""
    out = {}
    for mode, anns in (("sar", sar_anns), ("opt", opt_anns)):
        store = PatchStore(root, "train", mode, Normalizer([0.0], [1.0]), anns)
        out[mode] = fit_normalizer([store.raw(i) for i in sample_indices(len(anns), n, seed)])
    return out


def _signature(exp: Experiment, labels: LabelRaster, mode: str) -> dict[str, Any]:
    return {
        "dataset": str(Path(exp.data.root).resolve()),
        "label_raster": str(labels.path.resolve()),
        "modality": mode,
        "width": exp.translate.seg_width,
        "epochs": exp.translate.seg_epochs,
    }


def load_segmenter(path: str | Path, device: str | torch.device = "cpu") -> tuple[SegNet, dict[str, Any]]:
    """Rebuild a segmentation network (eval mode) and its checkpoint meta."""
    ck = load_checkpoint(path)
    if ck.get("kind") != "segmenter":
        raise CheckpointError(f"{path} is not a segmentation checkpoint (kind={ck.get('kind')!r})")
    net = SegNet(int(ck["in_ch"]), int(ck["n_classes"]), int(ck["width"]))
    net.load_state_dict(ck["model"])
    net.to(device).eval()
    return net, {k: v for k, v in ck.items() if k != "model"}


@torch.no_grad()
def score_segmenter(net: SegNet, store: PatchStore, labels: LabelStore, n_classes: int, device: torch.device, batch: int = 16) -> dict[str, float]:
    """mPA / mIoU / FwIoU of ``net`` on whole patches of ``store``."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    net.eval()
    for s in range(0, len(store), batch):
        idx = list(range(s, min(s + batch, len(store))))
        x = torch.from_numpy(np.stack([store.get(i) for i in idx])).to(device)
        pred = net(x).argmax(1).cpu().numpy()
        for k, i in enumerate(idx):
            cm += confusion_matrix(labels.get(i), pred[k], n_classes)
    return segmentation_scores(cm)


def train_segmenter(exp: Experiment, mode: str, force: bool = False) -> Path:
    """Train (or reuse) the segmentation network for ``mode`` ("opt" | "sar"); returns its path."""
    # Callers may be inside torch.no_grad() (evaluation); training needs gradients.
    with torch.enable_grad():
        return _train_segmenter(exp, mode, force)


def _train_segmenter(exp: Experiment, mode: str, force: bool) -> Path:
    tc = exp.translate
    out = seg_dir(exp) / f"seg_{mode}.pt"
    sar_anns, opt_anns = read_split(exp.data.root, "train")
    labels = open_labels(exp, opt_anns)
    sig = _signature(exp, labels, mode)
    if out.is_file() and not force:
        try:
            meta = load_checkpoint(out)
            if meta.get("signature") == sig:
                return out
        except CheckpointError:
            pass  # unreadable: retrain over it

    seed_everything(tc.seed)
    device = resolve_device(tc.device)
    norms = fit_normalizers(exp.data.root, sar_anns, opt_anns, tc.seed)
    anns = opt_anns if mode == "opt" else sar_anns
    opt_shape = tuple(PatchStore(exp.data.root, "train", "opt", norms["opt"], opt_anns).raw(0).shape[-2:])
    store = PatchStore(exp.data.root, "train", mode, norms[mode], anns, size=opt_shape)  # type: ignore[arg-type]
    lstore = LabelStore(labels, anns, opt_shape)  # type: ignore[arg-type]

    # Class count and inverse-sqrt-frequency weights, so thin roads are not drowned by fields.
    counts = np.zeros(256, dtype=np.int64)
    for i in range(len(anns)):
        lab = lstore.get(i)
        counts += np.bincount(lab[lab >= 0].ravel(), minlength=256)[:256]
    if counts.sum() == 0:
        raise DataError(f"label raster {labels.path} has no labelled pixel under the {mode} training patches")
    n_classes = int(np.nonzero(counts)[0].max()) + 1
    freq = counts[:n_classes] / counts.sum()
    weights = torch.tensor(np.where(freq > 0, 1.0 / np.sqrt(np.maximum(freq, 1e-12)), 0.0), dtype=torch.float32)
    weights = (weights / weights[weights > 0].mean()).to(device)

    channels = store.get(0).shape[0]
    net = SegNet(channels, n_classes, tc.seg_width).to(device)
    optim = torch.optim.Adam(net.parameters(), lr=1e-3)
    # Optical crops only: UnpairedCrops draws the "other" modality at random, unused here.
    crops = UnpairedCrops(store, store, tc.patch_px, sar_labels=lstore, seed=tc.seed)
    loader = DataLoader(crops, batch_size=16, shuffle=True, num_workers=0, generator=torch.Generator().manual_seed(tc.seed))
    log = seg_dir(exp) / f"seg_{mode}_log.jsonl"
    if log.exists():
        log.unlink()
    for epoch in range(tc.seg_epochs):
        net.train()
        losses = []
        for batch in loader:
            x, y = batch["sar"].to(device), batch["sar_label"].to(device)
            loss = F.cross_entropy(net(x), y, weight=weights, ignore_index=IGNORE_LABEL)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            losses.append(loss.item())
        append_jsonl(log, {"epoch": epoch + 1, "loss": float(np.mean(losses))})
        print(f"[seg {mode}] epoch {epoch + 1}/{tc.seg_epochs} loss {np.mean(losses):.3f}", file=sys.stderr, flush=True)

    scores: dict[str, Any] = {}
    try:  # how good the judge is on real patches of the evaluation split (the ceiling for translations)
        es, eo = read_split(exp.data.root, tc.eval_split)
        eanns = eo if mode == "opt" else es
        keep = sample_indices(len(eanns), tc.eval_max, tc.seed)
        eanns = [eanns[i] for i in keep]
        estore = PatchStore(exp.data.root, tc.eval_split, mode, norms[mode], eanns, size=opt_shape)  # type: ignore[arg-type]
        scores = score_segmenter(net, estore, LabelStore(labels, eanns, opt_shape), n_classes, device)  # type: ignore[arg-type]
    except DataError as e:
        scores = {"note": str(e)}
    payload = {
        "kind": "segmenter",
        "modality": mode,
        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "in_ch": channels,
        "n_classes": n_classes,
        "width": tc.seg_width,
        "class_pixels": [int(c) for c in counts[:n_classes]],
        "normalizer": norms[mode].to_dict(),
        "signature": sig,
        "metrics": {f"{tc.eval_split}_real": scores},
    }
    save_checkpoint(out, payload)
    print(f"[seg {mode}] {out}: {json.dumps(payload['metrics'])}", file=sys.stderr, flush=True)
    return out


def ensure_segmenters(exp: Experiment, modes: tuple[str, ...] = ("opt", "sar"), device: str | torch.device = "cpu") -> dict[str, SegNet]:
    """Trained segmentation networks for ``modes`` (training the missing or stale ones)."""
    return {m: load_segmenter(train_segmenter(exp, m), device)[0] for m in modes}

