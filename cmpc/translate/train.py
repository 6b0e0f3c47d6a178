"""Training a translator (``cmpc translate train``): pix2pix, CycleGAN or Seg-CycleGAN.

Reads the training split of ``data.root``; pix2pix takes co-registered pairs (a dataset
without aligned pairs is a one-line error), the CycleGANs take every SAR patch and every
optical reference unpaired; Seg-CycleGAN also takes class masks from the label raster and
the segmentation networks of :mod:`cmpc.translate.segment` (trained first when missing).

Writes to ``translate.out`` (default ``runs/<name>/translator/``): ``epoch_NNN.pt`` every
``save_every`` epochs (checkpoint selection compares them), ``last.pt``, ``log.jsonl``
(one line per epoch with mean losses, lr and seconds) and ``config.json``. Checkpoints and
the training state record ``inputs`` (:mod:`cmpc.utils.provenance`): for Seg-CycleGAN the
SHA-256 of the segmentation judges ``seg_opt`` / ``seg_sar``; a run whose judges changed
since its state was saved does not resume (one line names both hashes) but starts over.
Learning rate: constant for the first half of the epochs, then linear decay to zero
(the pix2pix/CycleGAN schedule).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cmpc.config import Experiment
from cmpc.errors import CheckpointError, DataError
from cmpc.models.checkpoint import load_checkpoint, save_checkpoint
from cmpc.models.translators import TRANSLATORS, TranslatorModel, create_translator
from cmpc.translate.data import (
    LabelStore,
    PairedCrops,
    PatchStore,
    UnpairedCrops,
    read_split,
    require_pairs,
)
from cmpc.translate.segment import ensure_segmenters, fit_normalizers, open_labels
from cmpc.utils import provenance
from cmpc.utils.io import append_jsonl, atomic_write_text
from cmpc.utils.runtime import resolve_device, seed_everything


def translator_dir(exp: Experiment) -> Path:
    """``translate.out`` or ``runs/<name>/translator``."""
    return Path(exp.translate.out) if exp.translate.out else exp.run_dir / "translator"


def lr_at(epoch: int, epochs: int, lr: float) -> float:
    """Constant for the first half of ``epochs``, then linear decay towards 0 (0-based ``epoch``)."""
    keep = epochs // 2
    decay = epochs - keep
    if epoch < keep:
        return lr
    return lr * (1.0 - (epoch - keep + 1) / (decay + 1))


def translator_payload(model: TranslatorModel, exp: Experiment, extra: dict[str, Any]) -> dict[str, Any]:
    """Plain-data checkpoint: generators (by direction), how to rebuild them, and the data contract."""
    return {
        "kind": "translator",
        "model": model.name,
        "directions": list(model.directions),
        "generators": {d: {k: v.detach().cpu() for k, v in g.state_dict().items()} for d, g in model.generators.items()},
        "archs": {d: dict(a) for d, a in model.archs.items()},
        "discriminators": model.discriminator_states(),
        "sar_channels": model.sar_channels,
        "opt_channels": model.opt_channels,
        "patch_px": exp.translate.patch_px,
        "config": dataclasses.asdict(exp.translate),
        "dataset": str(exp.data.root),
        **extra,
    }


def build_training_data(exp: Experiment, model_name: str) -> tuple[Any, dict[str, Any]]:
    """The crop dataset for ``model_name`` and the facts a checkpoint records about the data."""
    tc = exp.translate
    root = exp.data.root
    if not Path(root).is_dir():
        raise DataError(f"dataset root not found: {root} (make one with `cmpc data synth` then `cmpc data tile`, or set data.root)")
    sar_anns, opt_anns = read_split(root, "train")
    norms = fit_normalizers(root, sar_anns, opt_anns, tc.seed)
    opt_store = PatchStore(root, "train", "opt", norms["opt"], opt_anns)
    shape = tuple(opt_store.raw(0).shape[-2:])
    opt_store.size = shape  # type: ignore[assignment]
    sar_store = PatchStore(root, "train", "sar", norms["sar"], sar_anns, size=shape)  # type: ignore[arg-type]
    cls = TRANSLATORS[model_name]
    labels = open_labels(exp, opt_anns) if cls.needs_labels else None
    if cls.paired:
        pairs = require_pairs(root, "train", sar_anns, opt_anns, what=model_name)
        data: Any = PairedCrops(sar_store, opt_store, pairs, tc.patch_px, seed=tc.seed)
        n_desc = f"{len(pairs)} aligned pairs"
    else:
        data = UnpairedCrops(
            sar_store,
            opt_store,
            tc.patch_px,
            sar_labels=LabelStore(labels, sar_anns, shape) if labels else None,  # type: ignore[arg-type]
            opt_labels=LabelStore(labels, opt_anns, shape) if labels else None,  # type: ignore[arg-type]
            seed=tc.seed,
        )
        n_desc = f"{len(sar_anns)} SAR patches, {len(opt_anns)} optical references (unpaired)"
    facts = {
        "normalizers": {m: n.to_dict() for m, n in norms.items()},
        "source_px": [int(shape[0]), int(shape[1])],
        "sar_channels": int(sar_store.get(0).shape[0]),
        "opt_channels": int(opt_store.get(0).shape[0]),
        "data_desc": n_desc,
        "label_raster": str(labels.path) if labels else None,
    }
    if tc.patch_px > min(shape):
        print(f"[translate] note: patch_px {tc.patch_px} > patch side {min(shape)}: training on whole patches", file=sys.stderr)
    return data, facts


def train_translator(exp: Experiment, progress: bool = True) -> Path:
    """Train ``exp.translate.model`` on ``exp.data.root``; returns the path of ``last.pt``."""
    tc = exp.translate
    out = translator_dir(exp)
    last = out / "last.pt"
    state = _resumable_state(out / STATE_FILE, exp)
    finished = (int(state["epoch"]) >= tc.epochs and last.is_file()) if state is not None else _finished_checkpoint(last, exp)
    if finished:
        print(f"[translate] {out}: already trained ({tc.epochs} epochs); nothing to do", file=sys.stderr, flush=True)
        return last
    seed_everything(tc.seed)
    device = resolve_device(tc.device)
    data, facts = build_training_data(exp, tc.model)
    kwargs: dict[str, Any] = {}
    inputs: dict[str, Any] = {}
    if tc.model == "segcyclegan":
        from cmpc.translate.segment import seg_dir

        segs = ensure_segmenters(exp, ("opt", "sar"), device)
        kwargs = {"seg_opt": segs["opt"], "seg_sar": segs["sar"]}
        inputs = {f"seg_{m}": provenance.record(seg_dir(exp) / f"seg_{m}.pt") for m in ("opt", "sar")}
    state = _same_inputs(state, inputs, out / STATE_FILE)
    seed_everything(tc.seed)  # segmenter training consumed random numbers; restart the stream
    model = create_translator(tc.model, tc, facts["sar_channels"], facts["opt_channels"], **kwargs).to(device)

    out.mkdir(parents=True, exist_ok=True)
    start_epoch, step, elapsed = 0, 0, 0.0
    exp.save(out / "config.json")
    log_path = out / "log.jsonl"
    if state is not None:
        model.load_state_dict(state["model"])
        for opt, st in zip(model.optimizers, state["optimizers"]):
            opt.load_state_dict(st)
        start_epoch, step, elapsed = int(state["epoch"]), int(state["step"]), float(state["seconds"])
        _truncate_log(log_path, start_epoch)
        print(f"[translate] resuming {out} after epoch {start_epoch} (image pools restart empty)", file=sys.stderr, flush=True)
    elif log_path.exists():
        log_path.unlink()
    loader = DataLoader(
        data,
        batch_size=tc.batch_size,
        shuffle=True,
        drop_last=len(data) > tc.batch_size,
        num_workers=0,
        # Seeded per start epoch: a resumed run draws fresh crops rather than replaying epoch 1.
        generator=torch.Generator().manual_seed(tc.seed + start_epoch),
    )
    steps = len(loader) if tc.max_steps_per_epoch is None else min(len(loader), tc.max_steps_per_epoch)
    print(
        f"[translate] {tc.model} on {facts['data_desc']}: {tc.epochs} epochs x {steps} steps, batch {tc.batch_size}, "
        f"crop {tc.patch_px} px, ngf {tc.ngf}, ndf {tc.ndf}, device {device}",
        file=sys.stderr,
        flush=True,
    )
    t0 = time.perf_counter() - elapsed
    for epoch in range(start_epoch, tc.epochs):
        lr = lr_at(epoch, tc.epochs, tc.lr)
        model.set_lr(lr)
        sums: dict[str, list[float]] = defaultdict(list)
        bar = tqdm(total=steps, desc=f"{tc.model} epoch {epoch + 1}/{tc.epochs}", disable=not progress, leave=False, file=sys.stderr, mininterval=1.0)
        for b, batch in enumerate(loader):
            if b >= steps:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            losses = model.train_step(batch)
            for k, v in losses.items():
                sums[k].append(v)
            step += 1
            bar.update(1)
        bar.close()
        means = {k: float(np.mean(v)) for k, v in sums.items()}
        if not all(math.isfinite(v) for v in means.values()):
            raise RuntimeError(f"translator training diverged at epoch {epoch + 1}: {means}")
        rec = {"epoch": epoch + 1, "step": step, "lr": lr, "seconds": round(time.perf_counter() - t0, 2), **means}
        append_jsonl(log_path, rec)
        print(f"[translate] epoch {epoch + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()), file=sys.stderr, flush=True)
        if (epoch + 1) % tc.save_every == 0 or epoch + 1 == tc.epochs:
            path = out / f"epoch_{epoch + 1:03d}.pt"
            save_checkpoint(path, translator_payload(model, exp, {**facts, "epoch": epoch + 1, "step": step, "losses": means, "inputs": inputs}))
            # last.pt is a copy made atomically (save_checkpoint writes a temp file and renames).
            tmp = out / ".last.pt.copy"
            shutil.copyfile(path, tmp)
            tmp.replace(last)
        # Everything needed to continue after this epoch (written after last.pt, so a resumed
        # run never has a state newer than its checkpoints).
        save_checkpoint(
            out / STATE_FILE,
            {
                "kind": "translator_state",
                "epoch": epoch + 1,
                "step": step,
                "seconds": rec["seconds"],
                "signature": _signature(exp),
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizers": [o.state_dict() for o in model.optimizers],
                "inputs": inputs,
            },
        )
    return last


def _same_inputs(state: dict[str, Any] | None, inputs: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """``state``, or None (train from scratch, saying why in one line naming both hashes) when
    a file it was trained with (a segmentation judge) has changed since. States saved before
    ``inputs`` existed are taken as they are."""
    old = state.get("inputs") if state is not None else None
    if not isinstance(old, dict):
        return state
    from cmpc.errors import CmpcError

    try:
        for role, rec in inputs.items():
            provenance.check(old.get(role), rec, artefact=str(path), role=role, fix="training from scratch")
    except CmpcError as e:
        print(f"[translate] not resuming: {e}", file=sys.stderr, flush=True)
        return None
    return state


STATE_FILE = "state.pt"
#: translate.* keys that shape training (evaluation, selection, views and threads do not).
TRAINING_KEYS = (
    "model", "direction", "patch_px", "ngf", "ndf", "n_blocks", "unet_depth", "disc_layers", "epochs", "lr",
    "batch_size", "max_steps_per_epoch", "lambda_l1", "lambda_cycle", "lambda_identity", "lambda_seg",
    "pool_size", "label_raster", "seg_epochs", "seg_width", "save_every", "seed",
)


def _signature(exp: Experiment) -> dict[str, Any]:
    """What must match for a run to continue another: the translator settings and the dataset."""
    return _signature_of(dataclasses.asdict(exp.translate), str(exp.data.root))


def _signature_of(translate: dict[str, Any], dataset: str | None) -> dict[str, Any]:
    tc = json.loads(json.dumps(translate))  # tuples -> lists, as stored in checkpoints
    return {"translate": {k: tc.get(k) for k in TRAINING_KEYS}, "dataset": dataset}


def _resumable_state(path: Path, exp: Experiment) -> dict[str, Any] | None:
    """The saved training state of an interrupted (or finished) run of the same settings, else None."""
    if not path.is_file():
        return None
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        print(f"[translate] not resuming: {e}", file=sys.stderr, flush=True)
        return None
    if state.get("kind") != "translator_state" or state.get("signature") != _signature(exp):
        print(f"[translate] {path} is from other settings: training from scratch", file=sys.stderr, flush=True)
        return None
    return state


def _finished_checkpoint(last: Path, exp: Experiment) -> bool:
    """True when ``last`` holds the final epoch of a run with the same settings (runs saved
    before ``state.pt`` existed have only their checkpoints to say they are finished)."""
    if not last.is_file():
        return False
    try:
        meta = load_checkpoint(last)
    except CheckpointError:
        return False
    same = _signature_of(meta.get("config") or {}, meta.get("dataset")) == _signature(exp)
    return same and int(meta.get("epoch", -1)) == exp.translate.epochs


def _truncate_log(log_path: Path, epochs: int) -> None:
    """Keep the first ``epochs`` epoch records of log.jsonl (a crash may have left later ones)."""
    if not log_path.is_file():
        return
    recs = [line for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line)["epoch"] <= epochs]
    atomic_write_text(log_path, "".join(r + "\n" for r in recs))
