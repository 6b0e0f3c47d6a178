"""Checkpoints: plain data (tensors, numbers, strings, dicts), loaded with ``weights_only=True``.

An embedder checkpoint holds::

    {"kind": "embedder", "model": state_dict, "model_cfg": {...ModelConfig...},
     "sar_channels": int, "optical_channels": int, "img_size": int, "embed_dim": int,
     "epoch": int, "metrics": {...}, "experiment": {...resolved config...}, ...}

Training state (optimizer, scheduler, RNG) may be added under other keys for resuming.
A checkpoint's identity is the SHA-256 of its file (:func:`checkpoint_hash`); indexes and
refiners record it so a model/index or model/refiner mismatch is caught. Conversely a
checkpoint lists the files it was built from under ``"inputs"`` (``{"<role>": {"path",
"sha256"}}``, see :mod:`cmpc.utils.provenance`).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from cmpc.config import ModelConfig, _build_section
from cmpc.errors import CheckpointError, ConfigError
from cmpc.models.embedder import Embedder, build_embedder
from cmpc.utils.io import atomic_path, file_sha256


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """``torch.save`` to ``path`` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); anything else is a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        obj = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).splitlines()[0] if str(e) else ""
        if "Weights only load failed" in str(e) or "weights_only" in str(e):
            raise CheckpointError(f"refusing to load {p}: it holds code or objects, not plain weights (weights_only=True)") from None
        raise CheckpointError(f"corrupt checkpoint {p}: {first}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"corrupt or truncated checkpoint {p}: {first}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p} is not a cmpc checkpoint (expected a dict)")
    return obj


def default_checkpoint(run_dir: str | os.PathLike[str], checkpoint: str | os.PathLike[str] | None = None) -> Path:
    """The embedder checkpoint to use: ``checkpoint``, else ``<run_dir>/emb_best.pt`` (``runs/<name>/``).

    The file must exist: a one-line :class:`CheckpointError` saying how to get one otherwise.
    """
    path = Path(checkpoint) if checkpoint else Path(run_dir) / "emb_best.pt"
    if not path.is_file():
        hint = "check the --checkpoint path" if checkpoint else "train one with `cmpc train emb EXPERIMENT.json` or pass --checkpoint"
        raise CheckpointError(f"no embedder checkpoint at {path}; {hint}")
    return path


def checkpoint_hash(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the checkpoint file (first 16 hex digits are shown to users)."""
    return file_sha256(path)


def embedder_payload(model: Embedder, img_size: int, **extra: Any) -> dict[str, Any]:
    """The plain-data description of an embedder (weights + how to rebuild it)."""
    m = model.module if hasattr(model, "module") else model
    return {
        "kind": "embedder",
        "model": {k: v.detach().cpu() for k, v in m.state_dict().items()},
        "model_cfg": dataclasses.asdict(m.cfg),
        "sar_channels": m.sar_channels,
        "optical_channels": m.optical_channels,
        "img_size": int(img_size),
        "embed_dim": int(m.embed_dim),
        **extra,
    }


def load_embedder(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[Embedder, dict[str, Any]]:
    """Rebuild an embedder from a checkpoint; returns (model in eval mode, checkpoint meta).

    ``meta`` holds every checkpoint key except the weights, plus ``hash`` and ``path``.
    """
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != "embedder" or "model" not in ckpt:
        raise CheckpointError(f"{path} is not an embedder checkpoint (kind={ckpt.get('kind')!r})")
    try:
        cfg = _build_section(ModelConfig, dict(ckpt["model_cfg"]), "model")
    except ConfigError as e:
        raise CheckpointError(f"{path}: stored model config is invalid: {e}") from None
    cfg.pretrained = False  # weights come from the checkpoint; never reach for a hub
    cfg.weights = None
    model = build_embedder(cfg, int(ckpt["sar_channels"]), int(ckpt["optical_channels"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the stored model config: {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    if torch.device(device).type == "cuda":
        model.to(memory_format=torch.channels_last)  # convolutions run faster in NHWC on GPUs (inputs follow)
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "scheduler", "critic", "critic_optimizer", "rng")}
    meta["hash"] = checkpoint_hash(path)
    meta["path"] = str(path)
    return model, meta


@torch.no_grad()
def embed_batches(
    model: Embedder,
    loader: torch.utils.data.DataLoader,
    modality: str,
    device: torch.device | str = "cpu",
    amp: bool = True,
):
    """Yield ``(embeddings (B, D) float32 numpy, indices (B,) numpy)`` batch by batch.

    Streaming: memory is bounded by the batch size, not the dataset.
    """
    device = torch.device(device)
    model.eval()
    use_amp = amp and device.type == "cuda"
    for x, idx in loader:
        x = x.to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, enabled=use_amp, dtype=torch.float16):
            e = model(x, modality)
        yield e.float().cpu().numpy(), idx.numpy()
