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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cmpc.config import ModelConfig, _build_section
from cmpc.errors import CheckpointError, ConfigError
from cmpc.models.embedder import Embedder, build_embedder
from cmpc.models.fusion import FusedEmbedder
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


def embedder_from_payload(ckpt: dict[str, Any], where: str | os.PathLike[str]) -> Embedder:
    """Rebuild an :class:`Embedder` (eval mode, CPU) from a checkpoint's plain data; ``where``
    names it in errors."""
    if ckpt.get("kind") != "embedder" or "model" not in ckpt:
        raise CheckpointError(f"{where} is not an embedder checkpoint (kind={ckpt.get('kind')!r})")
    try:
        cfg = _build_section(ModelConfig, dict(ckpt["model_cfg"]), "model")
    except ConfigError as e:
        raise CheckpointError(f"{where}: stored model config is invalid: {e}") from None
    cfg.pretrained = False  # weights come from the checkpoint; never reach for a hub
    cfg.weights = None
    model = build_embedder(cfg, int(ckpt["sar_channels"]), int(ckpt["optical_channels"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{where}: weights do not fit the stored model config: {str(e).splitlines()[0]}") from None
    return model.eval()


def load_embedder(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[Embedder, dict[str, Any]]:
    """Rebuild an embedder from a checkpoint; returns (model in eval mode, checkpoint meta).

    A fused checkpoint (:mod:`cmpc.models.fusion`) gives a
    :class:`~cmpc.models.fusion.FusedEmbedder`, which embeds like any embedder.
    ``meta`` holds every checkpoint key except the weights, plus ``hash`` and ``path``.
    """
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") == "embedder" and "fusion" in ckpt:
        model = build_fused(ckpt, path)
    else:
        model = embedder_from_payload(ckpt, path)
    model.to(device).eval()
    if torch.device(device).type == "cuda":
        model.to(memory_format=torch.channels_last)  # convolutions run faster in NHWC on GPUs (inputs follow)
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "fusion", "optimizer", "scheduler", "critic", "critic_optimizer", "rng")}
    if "fusion" in ckpt:
        meta["fusion"] = {"weights": ckpt["fusion"].get("weights"), "members": [m.get("sha256") for m in ckpt["fusion"]["members"]]}
    meta["hash"] = checkpoint_hash(path)
    meta["path"] = str(path)
    return model, meta


#: keys of a member checkpoint kept in a fused file (training state is dropped)
_MEMBER_KEYS = ("kind", "model", "model_cfg", "sar_channels", "optical_channels", "img_size", "embed_dim", "epoch", "metrics")


def fused_payload(paths: Sequence[str | os.PathLike[str]], weights: Sequence[float] | None = None) -> dict[str, Any]:
    """The plain-data checkpoint of the fusion of the embedder checkpoints ``paths`` (module doc).

    Every member is loaded (``weights_only=True``) and rebuilt once, so a member that does
    not load, is itself fused, or takes other bands or another input size is refused here.
    """
    if len(paths) < 2:
        raise ConfigError(f"fusing needs at least two embedder checkpoints, got {len(paths)}")
    members, models, inputs = [], [], {}
    for k, p in enumerate(paths):
        ckpt = load_checkpoint(p)
        if ckpt.get("kind") == "embedder" and "fusion" in ckpt:
            raise CheckpointError(f"{p} is already a fused embedder; fuse the member checkpoints themselves")
        if ckpt.get("kind") != "embedder" or "model" not in ckpt:
            raise CheckpointError(f"{p} is not an embedder checkpoint (kind={ckpt.get('kind')!r})")
        models.append(embedder_from_payload(ckpt, p))
        sha = checkpoint_hash(p)
        members.append({**{key: ckpt[key] for key in _MEMBER_KEYS if key in ckpt}, "sha256": sha})
        inputs[f"member{k}"] = {"path": str(p), "sha256": sha}
    sizes = {int(m["img_size"]) for m in members}
    if len(sizes) > 1:
        raise ConfigError(f"fused members take different input sizes {sorted(sizes)} px; fuse models of one recipe")
    fused = FusedEmbedder(models, weights)
    first = members[0]
    return {
        "kind": "embedder",
        "fusion": {"weights": fused.weights, "members": members},
        "model_cfg": first["model_cfg"],
        "sar_channels": fused.sar_channels,
        "optical_channels": fused.optical_channels,
        "img_size": int(first["img_size"]),
        "embed_dim": fused.embed_dim,
        "inputs": inputs,
    }


def fuse_checkpoints(out: str | os.PathLike[str], paths: Sequence[str | os.PathLike[str]], weights: Sequence[float] | None = None) -> Path:
    """Write the fused checkpoint of ``paths`` to ``out`` (atomically); returns ``out``."""
    out = Path(out)
    if any(Path(p).resolve() == out.resolve() for p in paths):
        raise ConfigError(f"the fused checkpoint {out} would overwrite one of its members; write it elsewhere")
    return save_checkpoint(out, fused_payload(paths, weights))


def build_fused(ckpt: dict[str, Any], path: str | os.PathLike[str]) -> FusedEmbedder:
    """Rebuild a :class:`FusedEmbedder` from a fused checkpoint's plain data (eval mode, CPU)."""
    fusion = ckpt.get("fusion")
    if not isinstance(fusion, dict) or not isinstance(fusion.get("members"), list) or not fusion["members"]:
        raise CheckpointError(f"{path}: 'fusion' must hold a non-empty list of members")
    models = [embedder_from_payload(m, f"{path} member {k}") for k, m in enumerate(fusion["members"])]
    try:
        fused = FusedEmbedder(models, fusion.get("weights"))
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if fused.embed_dim != int(ckpt.get("embed_dim", fused.embed_dim)):
        raise CheckpointError(f"{path}: members embed to {fused.embed_dim} dimensions but the file says {ckpt['embed_dim']}")
    return fused.eval()  # FusedEmbedder normalises the weights: unit-norm outputs whatever the file holds


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
