"""Embedding training (``train_emb.py EXPERIMENT.json`` / ``cmpc train emb``).

Reads ``exp.data.root`` split ``train``; holds out a spatial block of locations for
validation (:func:`cmpc.data.pairs.validation_holdout`: the tiler's validation boxes, else the west end); trains the pseudo-siamese embedder
with the weighted metric losses and the Wasserstein critic; writes to ``runs/<name>/``:

- ``config.json``: the resolved experiment;
- ``log.jsonl``: one record per step (``kind: "train"``: step, epoch, loss, per-term losses,
  lr, temperature, critic estimate, img/s, seconds), per epoch (``kind: "epoch"``: images,
  wall and CPU seconds, img/s) and per validation (``kind: "val"``: ``recall`` {"1", "5"} of
  validation SAR queries against validation optical references);
- ``emb_best.pt``: the best validation R@1 (ties: R@5) so far; with ``train.ema`` the EMA
  weights are validated beside the raw ones and the better of the two is the candidate
  (``weights``: ``"raw"`` or ``"ema"`` in the checkpoint and the log's ``best``);
- ``emb_last.pt``: everything needed to resume (optimiser, scheduler, critic and its
  optimiser, loss parameters, AMP scaler, RNG state, sampler position), saved every
  ``train.save_every_steps`` steps and at each epoch end. Re-running the same experiment
  resumes from it, mid-epoch included, and ends with the same weights as an uninterrupted
  run (CPU). A finished run is not retrained.

With ``train.members = K > 1``, :func:`train_embedder` trains K embedders of the same recipe
from seeds ``train.seed + k``, each an ordinary run in ``runs/<name>/members/seed<N>/``
(resumed or skipped like any run), then fuses their best checkpoints by score into
``runs/<name>/emb_best.pt`` (:mod:`cmpc.models.fusion`; redone only when a member changed)
and logs the fused model's validation recall (``kind: "fused"``) in ``runs/<name>/log.jsonl``.

Translated views (``translate.views``) reach the trainer as an argument, ``views`` (a
:class:`PairViews`, built by the caller: ``cmpc.translate.augment.training_views``); this
module does not import :mod:`cmpc.translate`. Both checkpoints record ``inputs``
(:mod:`cmpc.utils.provenance`): the SHA-256 of the translator checkpoints of
``translate.views`` (``views``) and of ``model.weights`` (``init_weights``). A run does
not resume (or count as finished) when one of those files has changed since: one line
names both hashes.

Determinism: all sampling and augmentation randomness is derived from ``(seed, epoch,
location)`` / ``(seed, step)``, never from global state shared with data workers.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel
(gloo on CPU, nccl on CUDA); every rank takes its slice of each global batch; only rank 0
validates, mines embedding neighbours (broadcast to the others) and writes files.

The loop, in parts (:func:`_fit` reads top to bottom): :func:`_previous_run` (resume or
refuse), :func:`_already_trained` (skip), :func:`_load_data` / :func:`_make_sampler` /
:func:`_make_loader` (data), :class:`_Optimisation` (model, losses, critic, optimisers,
schedule, AMP; one :meth:`~_Optimisation.step`), :func:`_restore` (a resumed state),
:func:`_train_epoch` (steps, logging, periodic saves), :func:`_end_epoch` (validation, best
and last checkpoints), :func:`_finish`. Thread counts and the allocator are the caller's:
entry points call :func:`cmpc.utils.runtime.configure_embedder_training` first.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cmpc.config import Experiment
from cmpc.data.layout import positions, read_annotations, read_dataset_meta
from cmpc.data.pairs import PairDataset, queries_by_location, validation_holdout
from cmpc.data.patches import PatchDataset, dataset_channels
from cmpc.data.sampler import LocationBatchSampler, embedding_neighbours
from cmpc.errors import CheckpointError, ConfigError, DataError
from cmpc.models.checkpoint import checkpoint_hash, embedder_payload, fuse_checkpoints, load_checkpoint, load_embedder, save_checkpoint
from cmpc.models.embedder import Embedder, build_embedder
from cmpc.models.losses import CombinedLoss, WassersteinCritic, build_critic, build_critic_optimizer, build_losses
from cmpc.utils import provenance
from cmpc.utils.io import append_jsonl, atomic_write_text, read_jsonl
from cmpc.utils.locks import exclusive, lock_path
from cmpc.utils.runtime import resolve_device, seed_everything

# Config keys that do not change the trained weights: a run may resume with them changed.
_RESUME_IGNORED = {
    "description",
    "runs_dir",
    "synth",
    "tile",
    "index",
    "refine",
    "localize",
    "eval",
    "data.num_workers",
    "data.cache",
    "train.threads",
    "train.device",
    "train.save_every_steps",
    "train.members",  # a member run is always one embedder; the fusion lives one folder up
}
# Of the translator section only these change embedding training (the auxiliary views).
_RESUME_TRANSLATE_KEYS = {"translate.views", "translate.view_prob"}


class PairViews(Protocol):
    """Replaces some training views (translated patches: ``training_views`` of
    :mod:`cmpc.translate.augment`). Called once per process, after seeding, with the training
    pairs; returns the pairs to train on. Validation keeps the real patches."""

    def __call__(self, pairs: PairDataset, *, progress: bool) -> PairDataset: ...


class TrainingInterrupted(RuntimeError):
    """Raised by the ``stop_after_steps`` hook: simulates a run killed between two saves."""


@dataclass
class TrainResult:
    """What :func:`fit_embedder` returns (the model is the trained one in memory, on CPU)."""

    best_path: Path
    last_path: Path
    model: Embedder
    metrics: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    already_finished: bool = False


# --------------------------------------------------------------------------- distributed


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _init_distributed(device_name: str) -> _Dist:
    """Join the process group torchrun (or a test) describes in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    owns = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name != "cpu"
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    return _Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, owns_group=owns)


def _average_grads(module: nn.Module) -> None:
    """All-reduce (mean) the gradients of a module that is not wrapped in DDP (the critic)."""
    world = dist.get_world_size()
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


# --------------------------------------------------------------------------- model + schedule


class _PairModel(nn.Module):
    """Embeds a SAR batch and an optical batch and computes the metric losses in one forward

    (one forward per step is what DistributedDataParallel expects; the learnable InfoNCE
    temperature lives here so DDP keeps it identical on every rank).
    """

    def __init__(self, embedder: Embedder, losses: CombinedLoss) -> None:
        super().__init__()
        self.embedder = embedder
        self.losses = losses

    def forward(
        self, sar_x: torch.Tensor, opt_x: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        sar, opt = self.embedder.forward_pair(sar_x, opt_x)
        sar, opt = sar.float(), opt.float()
        total, parts = self.losses(sar, opt, labels)
        return sar, opt, total, parts


def lr_factor(step: int, warmup_steps: int, total_steps: int, floor: float = 0.01) -> float:
    """Linear warm-up over ``warmup_steps`` then cosine decay to ``floor`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norm scales, GeM p and the temperature (0-D / 1-D tensors)."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def embed_patches(
    model: Embedder, data: PatchDataset, indices: np.ndarray, modality: str, device: torch.device, batch_size: int = 128
) -> torch.Tensor:
    """(len(indices), D) float32 CPU embeddings of ``data[indices]`` (model in eval mode)."""
    was_training = model.training
    model.eval()
    out = []
    for s in range(0, len(indices), batch_size):
        x = torch.stack([data.load(int(i)) for i in indices[s : s + batch_size]]).to(device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
            out.append(model(x, modality).float().cpu())
    model.train(was_training)
    d = model.embed_dim
    return torch.cat(out) if out else torch.zeros(0, d)


def recall_at_k(
    query_emb: torch.Tensor, query_ids: np.ndarray, ref_emb: torch.Tensor, ref_ids: np.ndarray, ks: tuple[int, ...] = (1, 5), chunk: int = 1024
) -> dict[str, float]:
    """Share of queries whose location id is among the ``k`` most similar references.

    Streams over query chunks (memory ``chunk x references``). Returns {"1": f, "5": f}.
    """
    if len(query_ids) == 0 or len(ref_ids) == 0:
        return {str(k): float("nan") for k in ks}
    kmax = min(max(ks), len(ref_ids))
    ref_ids_t = torch.as_tensor(ref_ids)
    hits = {k: 0 for k in ks}
    for s in range(0, len(query_ids), chunk):
        top = (query_emb[s : s + chunk] @ ref_emb.T).topk(kmax, dim=1).indices
        correct = ref_ids_t[top] == torch.as_tensor(query_ids[s : s + chunk])[:, None]
        for k in ks:
            hits[k] += int(correct[:, :k].any(dim=1).sum())
    return {str(k): hits[k] / len(query_ids) for k in ks}


# --------------------------------------------------------------------------- data


@dataclass
class _Data:
    optical: PatchDataset
    sar: PatchDataset
    train_locs: np.ndarray  # indices into optical annotations
    val_locs: np.ndarray
    val_queries: np.ndarray  # indices into sar annotations
    pairs: PairDataset
    sar_channels: int
    optical_channels: int


def _load_data(exp: Experiment, views: PairViews | None, progress: bool) -> _Data:
    """The training split: patches (cached with ``data.cache``), the spatial train /
    validation split of the locations, the validation queries and the training pairs
    (with ``views`` applied when given)."""
    root = exp.data.root
    if not Path(root).is_dir():
        raise DataError(f"dataset root not found: {root} (make one with `cmpc data synth` then `cmpc data tile`, or set data.root)")
    refs = read_annotations(root, "train", "opt")
    queries = read_annotations(root, "train", "sar")
    sar_ch, opt_ch = dataset_channels(root, "train")
    for key, given, found in (("sar_channels", exp.model.sar_channels, sar_ch), ("optical_channels", exp.model.optical_channels, opt_ch)):
        if given is not None and given != found:  # before decoding the whole dataset
            raise ConfigError(f"model.{key} is {given} but the data has {found} band(s); set it to {found} or null (from the data)")
    optical = PatchDataset(root, "train", "opt", exp.data.img_size, annotations=refs, cache=exp.data.cache)
    sar = PatchDataset(root, "train", "sar", exp.data.img_size, annotations=queries, cache=exp.data.cache)
    sar_of = queries_by_location(refs, queries, non_aligned=exp.train.non_aligned)
    split = validation_holdout(read_dataset_meta(root), refs, exp.train.val_fraction)  # tile.val_blocks, else the west end
    has_query = np.array([len(q) > 0 for q in sar_of], dtype=bool)
    train_locs = split.train[has_query[split.train]]
    val_locs = split.val
    if len(train_locs) < 2:
        raise DataError(f"{root}: fewer than 2 training locations with SAR queries; the dataset is too small to train on")
    val_queries = _validation_queries(refs, queries, val_locs)
    pairs = PairDataset(optical, sar, sar_of, seed=exp.train.seed, augment=exp.data.augment, rotate=exp.train.rotate)
    if exp.data.cache:
        pairs.preload(train_locs, progress=progress)
    if views is not None:
        # Auxiliary views (DESIGN "Translators"): translated patches replace a view with
        # probability translate.view_prob; validation keeps the real patches (optical/sar above).
        pairs = views(pairs, progress=progress)
    return _Data(optical, sar, train_locs, val_locs, val_queries, pairs, sar_ch, opt_ch)


class _Subset(torch.utils.data.Dataset):
    """Maps sampler keys (position among training locations, epoch) to dataset locations."""

    def __init__(self, pairs: PairDataset, locs: np.ndarray) -> None:
        self.pairs = pairs
        self.locs = locs

    def __len__(self) -> int:
        return len(self.locs)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        sar, opt, loc = self.pairs[(int(self.locs[key[0]]), key[1])]
        return sar, opt, int(key[0])


# --------------------------------------------------------------------------- resume


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys (``section.key``) that differ between two experiment dicts and change training."""
    a, b = _flatten(old), _flatten(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in _RESUME_IGNORED or key.split(".")[0] in _RESUME_IGNORED:
            continue
        if key.startswith("translate.") and key not in _RESUME_TRANSLATE_KEYS:
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(int(x) for x in state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _inputs(exp: Experiment) -> dict[str, Any]:
    """The provenance record of an embedder run: ``views`` (translator checkpoints of
    ``translate.views``) and ``init_weights`` (``model.weights``), each {path, sha256}. Files
    that do not exist are left out here (loading them is a one-line error of its own)."""
    out: dict[str, Any] = {}
    views = list(getattr(getattr(exp, "translate", None), "views", None) or [])
    if views:
        out["views"] = [provenance.record(v) for v in views if Path(v).is_file()]
    if exp.model.weights and Path(exp.model.weights).is_file():
        out["init_weights"] = provenance.record(exp.model.weights)
    return out


def _check_inputs(last_path: Path, old: dict[str, Any] | None, new: dict[str, Any]) -> None:
    """Refuse to resume ``last_path`` when an input file it was trained from has changed
    (older checkpoints without ``inputs`` are not checked)."""
    if not isinstance(old, dict):
        return
    fix = f"use another experiment name or delete {last_path.parent} to start over"
    old_views, new_views = old.get("views") or [], new.get("views") or []
    for i, (a, b) in enumerate(zip(old_views, new_views)):
        provenance.check(a, b, artefact=str(last_path), role=f"translate.views[{i}]", fix=fix)
    if old.get("init_weights") and new.get("init_weights"):
        provenance.check(old["init_weights"], new["init_weights"], artefact=str(last_path), role="model.weights", fix=fix)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log records written after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


# --------------------------------------------------------------------------- optimisation step


class _Optimisation:
    """The trained parts of a run and what updates them (one per process).

    - ``model`` (the embedder) and ``losses`` (the weighted metric losses, with the learnable
      InfoNCE temperature) in one :class:`_PairModel`, ``pair_model``; ``net`` is the module
      the forward goes through: ``pair_model`` itself, or it wrapped in
      DistributedDataParallel after :meth:`distribute`;
    - ``critic`` (Wasserstein critic; None when ``loss.critic`` is 0) and its optimiser;
    - AdamW (no decay on 0-D / 1-D tensors) with linear warm-up over ``train.warmup_epochs``
      and cosine decay to 1 % over the run, stepped once per batch (:func:`lr_factor`);
    - mixed precision on CUDA with ``train.amp``: bfloat16 where the GPU has it, else float16
      with a gradient scaler; CPU runs in float32 (the scaler is then a pass-through).

    Built fresh (random weights from the global torch generator: seed first); a resumed run
    then loads its state with :meth:`load_state_dict`.
    """

    def __init__(self, exp: Experiment, sar_channels: int, optical_channels: int, device: torch.device, steps_per_epoch: int) -> None:
        tc = exp.train
        self.device = device
        self.seed = tc.seed
        self.grad_clip = tc.grad_clip
        self.critic_weight, self.critic_steps = exp.loss.critic, exp.loss.critic_steps
        on_cuda = device.type == "cuda"
        self.channels_last = on_cuda and tc.channels_last

        self.model = build_embedder(exp.model, sar_channels, optical_channels)
        self.losses = build_losses(exp.loss)
        self.critic: WassersteinCritic | None = build_critic(exp.loss, exp.model.embed_dim)
        self.pair_model = _PairModel(self.model, self.losses).to(device)
        if self.channels_last:
            self.pair_model = self.pair_model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if self.critic is not None:
            self.critic.to(device)
        self.optimizer = torch.optim.AdamW(_param_groups(self.pair_model, tc.weight_decay), lr=tc.lr)
        self.critic_optimizer = build_critic_optimizer(self.critic, exp.loss) if self.critic is not None else None

        total_steps = tc.epochs * steps_per_epoch
        warmup = int(round(tc.warmup_epochs * steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, warmup, total_steps))
        self.amp_dtype = torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float16
        self.use_amp = on_cuda and tc.amp
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)

        self.net: nn.Module = self.pair_model
        self._sync_critic: Any = None  # averages the critic's gradients over ranks (DDP)
        # Weight EMA (train.ema): torch's AveragedModel, buffers (BatchNorm statistics) averaged too.
        self.ema: torch.optim.swa_utils.AveragedModel | None = None
        if tc.ema > 0:
            self.ema = torch.optim.swa_utils.AveragedModel(
                self.model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(tc.ema), use_buffers=True
            )

    def distribute(self, ddp: _Dist) -> None:
        """Wrap the pair model in DistributedDataParallel when there are several processes.

        Call after a resumed state is loaded: wrapping copies rank 0's weights to every rank.
        """
        if not ddp.enabled:
            return
        on_cuda = self.device.type == "cuda"
        self.net = nn.parallel.DistributedDataParallel(self.pair_model, device_ids=[self.device.index] if on_cuda else None)
        self._sync_critic = _average_grads

    def step(self, sar_x: torch.Tensor, opt_x: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], float | None]:
        """One optimisation step on a batch of B locations.

        ``sar_x`` (B, C_sar, S, S) and ``opt_x`` (B, C_opt, S, S) are model inputs (S pixels),
        ``labels`` (B,) location keys; ``step`` is the number of steps taken before this one
        (all ranks together; it seeds the critic's sampling). Updates the critic
        (``loss.critic_steps`` times), then the embedder and losses with the metric losses plus
        ``loss.critic`` x the critic's alignment term. Returns (total loss, per-term losses,
        the critic's Wasserstein estimate or None without a critic).
        """
        device = self.device
        sar_x, opt_x, labels = sar_x.to(device, non_blocking=True), opt_x.to(device, non_blocking=True), labels.to(device)
        if self.channels_last:
            sar_x, opt_x = sar_x.contiguous(memory_format=torch.channels_last), opt_x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            sar_e, opt_e, loss, parts = self.net(sar_x, opt_x, labels)
        critic_w = None
        if self.critic is not None:
            gen = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + step)
            critic_w = self.critic.update(sar_e, opt_e, self.critic_optimizer, self.critic_steps, generator=gen, sync_grads=self._sync_critic)  # type: ignore[arg-type]
            align = self.critic(sar_e, opt_e)
            parts = {**parts, "critic": align}
            loss = loss + self.critic_weight * align
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.pair_model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return loss, parts, critic_w

    @property
    def ema_model(self) -> Embedder | None:
        """The EMA copy of the embedder (``train.ema`` > 0), else None."""
        return None if self.ema is None else self.ema.module  # type: ignore[return-value]

    def state_dict(self) -> dict[str, Any]:
        """Everything but the embedder weights that resuming needs (checkpoint keys ``losses``,
        ``optimizer``, ``scheduler``, ``scaler``, ``critic``, ``critic_optimizer``)."""
        return {
            "losses": self.losses.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "critic": self.critic.state_dict() if self.critic is not None else None,
            "critic_optimizer": self.critic_optimizer.state_dict() if self.critic_optimizer is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Load the embedder weights (``model``) and :meth:`state_dict` from a ``emb_last.pt``."""
        self.model.load_state_dict(ckpt["model"])
        self.losses.load_state_dict(ckpt["losses"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.critic is not None:
            self.critic.load_state_dict(ckpt["critic"])
            self.critic_optimizer.load_state_dict(ckpt["critic_optimizer"])  # type: ignore[union-attr]
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])


def _share_rank0_buffers(module: nn.Module, ddp: _Dist) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics) at an epoch end.

    DDP syncs buffers at the start of each forward, so after the last step every rank holds
    the statistics of its own last shard.
    """
    if ddp.enabled:
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


# --------------------------------------------------------------------------- a run


@dataclass(frozen=True)
class _RunFiles:
    """The files of ``runs/<name>/`` (see the module docstring)."""

    dir: Path

    @property
    def last(self) -> Path:
        return self.dir / "emb_last.pt"

    @property
    def best(self) -> Path:
        return self.dir / "emb_best.pt"

    @property
    def log(self) -> Path:
        return self.dir / "log.jsonl"

    @property
    def config(self) -> Path:
        return self.dir / "config.json"


@dataclass
class _Progress:
    """Where a run stands.

    ``start_epoch`` / ``start_batch``: where this process starts (0-based epoch, batch within
    it; not 0 when resuming); ``step``: optimisation steps taken so far (all ranks together);
    ``best``: the best validation so far, {"recall": {"1": R@1, "5": R@5} or None, "epoch",
    "step"}; ``elapsed_before_s``: training seconds spent by earlier processes of this run.
    """

    start_epoch: int = 0
    start_batch: int = 0
    step: int = 0
    best: dict[str, Any] = field(default_factory=lambda: {"recall": None, "epoch": None})
    elapsed_before_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def elapsed_s(self) -> float:
        """Seconds this run has trained, earlier processes included."""
        return self.elapsed_before_s + time.perf_counter() - self.started


@dataclass
class _Run:
    """What the epochs of one training run share (put together by :func:`_fit`)."""

    exp: Experiment
    ddp: _Dist
    files: _RunFiles
    inputs: dict[str, Any]  # provenance record (see _inputs)
    data: _Data
    sampler: LocationBatchSampler
    steps_per_epoch: int
    loader: DataLoader
    opt: _Optimisation
    progress: _Progress


def _training_device(name: str, ddp: _Dist) -> torch.device:
    """``train.device`` resolved; under DDP on CUDA each process takes GPU ``LOCAL_RANK``."""
    device = resolve_device(name)
    if device.type == "cuda" and ddp.enabled:
        device = torch.device("cuda", ddp.local_rank)
        torch.cuda.set_device(device)  # nccl collectives use the current device
    return device


def _make_sampler(exp: Experiment, data: _Data, ddp: _Dist) -> tuple[LocationBatchSampler, int]:
    """The batch sampler over the training locations (this rank's slice of every global
    batch) and the number of batches per epoch; a one-line error when not one batch fits."""
    tc = exp.train
    sampler = LocationBatchSampler(
        positions(data.optical.annotations)[data.train_locs],
        tc.batch_size,
        seed=tc.seed,
        hard_negatives=tc.hard_negatives,
        group_size=tc.hard_group,
        neighbours_k=tc.neighbours_k,
        mining_start_epoch=tc.mining_start_epoch,
        max_batches=tc.max_steps_per_epoch,
        rank=ddp.rank,
        world_size=ddp.world,
    )
    steps_per_epoch = len(sampler.batches(0))
    if steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size {tc.batch_size} is larger than the {len(data.train_locs)} training locations; lower it")
    return sampler, steps_per_epoch


def _make_loader(exp: Experiment, data: _Data, sampler: LocationBatchSampler, device: torch.device) -> DataLoader:
    """Batches of (SAR inputs, optical inputs, location keys) in the sampler's order."""
    return DataLoader(
        _Subset(data.pairs, data.train_locs),
        batch_sampler=sampler,
        num_workers=exp.data.num_workers,
        persistent_workers=exp.data.num_workers > 0,
        pin_memory=device.type == "cuda",
    )


def _previous_run(exp: Experiment, files: _RunFiles, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """``emb_last.pt`` of an earlier run of this experiment (None when there is none).

    Refuses it in one line when it was trained with settings that change the weights
    (:func:`_config_differences`) or from input files that have changed since (``inputs``).
    """
    if not files.last.exists():
        return None
    resume = load_checkpoint(files.last)
    diffs = _config_differences(resume.get("experiment") or {}, exp.to_dict())
    if diffs:
        raise ConfigError(
            f"{files.last} was trained with a different configuration ({diffs[0]}"
            f"{f' and {len(diffs) - 1} more' if len(diffs) > 1 else ''}); "
            f"use another experiment name or delete {files.dir} to start over"
        )
    _check_inputs(files.last, resume.get(provenance.INPUTS), inputs)
    return resume


def _already_trained(resume: dict[str, Any], files: _RunFiles, ddp: _Dist) -> TrainResult:
    """The result of a finished run, read back from its checkpoints (nothing is trained)."""
    metrics = dict(resume.get("best_metrics") or {})
    _say(ddp, f"{files.dir}: already trained ({resume.get('epoch')} epochs, best val {metrics}); delete {files.last} to retrain")
    best = files.best if files.best.exists() else files.last
    model, _ = load_embedder(best)
    return TrainResult(best, files.last, model, metrics, int(resume.get("step", 0)), True)


def _restore(resume: dict[str, Any], opt: _Optimisation, sampler: LocationBatchSampler, files: _RunFiles, ddp: _Dist, steps_per_epoch: int) -> _Progress:
    """Load an unfinished run's state (weights, optimisers, sampler position, RNG state) and
    drop the log records written after it (they will be redone); returns where it stood."""
    try:
        opt.load_state_dict(resume)
        sampler.load_state_dict(resume["sampler"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{files.last} cannot be resumed ({type(e).__name__}: {str(e).splitlines()[0]}); delete it to start over") from None
    progress = _Progress(
        start_epoch=sampler.epoch,
        start_batch=sampler.start_batch,
        step=int(resume["step"]),
        best=dict(resume.get("best") or _Progress().best),
        elapsed_before_s=float(resume.get("elapsed_s", 0.0)),
    )
    _set_rng_state(resume["rng"])
    if ddp.main:
        _truncate_log(files.log, progress.step)
    _say(ddp, f"resuming {files.dir} at epoch {progress.start_epoch + 1}, batch {progress.start_batch}/{steps_per_epoch} (step {progress.step})")
    return progress


def _save_last(run: _Run, epoch: int, next_batch: int, finished: bool) -> None:
    """Write ``emb_last.pt``: everything needed to continue at batch ``next_batch`` of epoch
    ``epoch`` (0-based) with the same result as an uninterrupted run."""
    sampler_state = run.sampler.state_dict()
    sampler_state.update(epoch=epoch, start_batch=next_batch)
    best = run.progress.best
    payload = embedder_payload(
        run.opt.model,
        run.exp.data.img_size,
        epoch=epoch,
        step=run.progress.step,
        finished=finished,
        metrics=dict(best.get("recall") or {}),
        best=best,
        best_metrics=dict(best.get("recall") or {}),
        experiment=run.exp.to_dict(),
        **run.opt.state_dict(),
        sampler=sampler_state,
        rng=_rng_state(),
        elapsed_s=run.progress.elapsed_s(),
        inputs=run.inputs,
    )
    save_checkpoint(run.files.last, payload)


def _step_record(
    run: _Run, epoch: int, batch: int, loss: torch.Tensor, parts: dict[str, torch.Tensor], critic_w: float | None, images: int, batch_s: float
) -> dict[str, Any]:
    """The ``kind: "train"`` log record of the step just taken (``images``: SAR + optical
    inputs of the global batch; ``batch_s``: wall seconds since the previous step)."""
    record: dict[str, Any] = {} if critic_w is None else {"critic_w": critic_w}
    record.update(
        kind="train",
        step=run.progress.step,
        epoch=epoch + (batch + 1) / run.steps_per_epoch,
        loss=float(loss.detach()),
        losses={k: float(v.detach()) for k, v in parts.items()},
        lr=run.opt.optimizer.param_groups[0]["lr"],
        img_per_s=round(images / max(batch_s, 1e-9), 1),
        seconds=round(run.progress.elapsed_s(), 2),
    )
    if "infonce" in run.opt.losses.terms:
        record["temperature"] = run.opt.losses.terms["infonce"].temperature  # type: ignore[union-attr]
    return record


def _epoch_record(run: _Run, epoch: int, images: int, train_s: float, cpu_s: float) -> dict[str, Any]:
    """The ``kind: "epoch"`` log record: training throughput of epoch ``epoch`` (0-based) in
    images per wall second and per CPU second of this process (data loading included;
    validation and mining not)."""
    return {
        "kind": "epoch",
        "step": run.progress.step,
        "epoch": epoch + 1,
        "images": images,
        "train_seconds": round(train_s, 2),
        "img_per_s": round(images / max(train_s, 1e-9), 1),
        "cpu_seconds": round(cpu_s, 2),
        "img_per_cpu_s": round(images / max(cpu_s, 1e-9), 1),
    }


def _train_epoch(run: _Run, epoch: int, first_batch: int, stop_after_steps: int | None) -> None:
    """Train epoch ``epoch`` (0-based) from batch ``first_batch`` on.

    At the start of an epoch that mines hard negatives in embedding space, refreshes the
    sampler's neighbour table; then one :meth:`_Optimisation.step` per batch, a ``train`` log
    record per step and an ``epoch`` record at the end (rank 0), ``emb_last.pt`` every
    ``train.save_every_steps`` steps. ``stop_after_steps`` (test hook) raises
    :class:`TrainingInterrupted` once that many steps are taken, without saving.
    """
    tc, ddp, opt, progress = run.exp.train, run.ddp, run.opt, run.progress
    if first_batch == 0 and run.sampler.uses_embeddings(epoch):
        _refresh_mining(opt.model, run.data, run.sampler, tc.neighbours_k, opt.device, ddp)
    run.sampler.set_epoch(epoch, first_batch)
    opt.net.train()
    bar = tqdm(total=run.steps_per_epoch, initial=first_batch, desc=f"epoch {epoch + 1}/{tc.epochs}", disable=not ddp.main, leave=False, mininterval=1.0, file=sys.stderr)
    t_batch = t_epoch = time.perf_counter()
    cpu_epoch = time.process_time()  # CPU seconds of this process: throughput on a shared machine
    epoch_images = 0
    for b, (sar_x, opt_x, labels) in enumerate(run.loader, start=first_batch):
        loss, parts, critic_w = opt.step(sar_x, opt_x, labels, progress.step)
        progress.step += 1
        now = time.perf_counter()
        n_img = 2 * sar_x.shape[0] * ddp.world
        epoch_images += n_img
        if ddp.main:
            record = _step_record(run, epoch, b, loss, parts, critic_w, n_img, now - t_batch)
            append_jsonl(run.files.log, record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['img_per_s']:.0f}", refresh=False)
        bar.update(1)
        t_batch = now
        if tc.save_every_steps and progress.step % tc.save_every_steps == 0 and ddp.main:
            _save_last(run, epoch, b + 1, finished=False)
        if stop_after_steps is not None and progress.step >= stop_after_steps:
            bar.close()
            raise TrainingInterrupted(f"stopped after {progress.step} steps (test hook)")
    bar.close()
    if ddp.main and epoch_images:
        append_jsonl(run.files.log, _epoch_record(run, epoch, epoch_images, time.perf_counter() - t_epoch, time.process_time() - cpu_epoch))


def _end_epoch(run: _Run, epoch: int) -> None:
    """After epoch ``epoch`` (0-based), on rank 0: validate (every ``train.val_every`` epochs
    and after the last), keep the best weights in ``emb_best.pt`` (the latest ones when there
    is no validation data), save ``emb_last.pt``. Then every rank waits for rank 0."""
    exp, ddp, progress, opt = run.exp, run.ddp, run.progress, run.opt
    data = run.data
    is_last = epoch + 1 == exp.train.epochs
    if ddp.main:
        if len(data.val_queries) and ((epoch + 1) % exp.train.val_every == 0 or is_last):
            metrics = validate(opt.model, data, opt.device)
            record: dict[str, Any] = {"kind": "val", "step": progress.step, "epoch": epoch + 1, "recall": metrics}
            model, weights = opt.model, "raw"
            if opt.ema_model is not None:
                ema_metrics = validate(opt.ema_model, data, opt.device)
                record["recall_ema"] = ema_metrics
                if _better(ema_metrics, metrics):
                    model, weights, metrics = opt.ema_model, "ema", ema_metrics
            append_jsonl(run.files.log, {**record, "seconds": round(progress.elapsed_s(), 2)})
            ema_note = f" (EMA R@1 {record['recall_ema']['1']:.3f})" if "recall_ema" in record else ""
            _say(ddp, f"epoch {epoch + 1}: val R@1 {record['recall']['1']:.3f} R@5 {record['recall']['5']:.3f}{ema_note} ({len(data.val_queries)} queries, {len(data.val_locs)} references)")
            if _better(metrics, progress.best.get("recall")):
                progress.best = {"recall": metrics, "epoch": epoch + 1, "step": progress.step, "weights": weights}
                save_checkpoint(run.files.best, _best_payload(model, exp, epoch + 1, progress.step, metrics, opt.losses, run.inputs, weights=weights))
        elif not len(data.val_queries):
            # No validation data: the latest weights are the best we know.
            progress.best = {"recall": None, "epoch": epoch + 1, "step": progress.step}
            save_checkpoint(run.files.best, _best_payload(opt.model, exp, epoch + 1, progress.step, {}, opt.losses, run.inputs))
        _save_last(run, epoch + 1, 0, finished=is_last)
    ddp.barrier()


def _finish(run: _Run) -> None:
    """Log the ``done`` record and the best checkpoint (rank 0); every rank waits for it."""
    best, ddp = run.progress.best, run.ddp
    if ddp.main:
        append_jsonl(run.files.log, {"kind": "done", "step": run.progress.step, "epoch": run.exp.train.epochs, "best": best, "seconds": round(run.progress.elapsed_s(), 2)})
        _say(ddp, f"done in {run.progress.elapsed_s():.0f} s; best {run.files.best} (epoch {best.get('epoch')}, val R@k {best.get('recall')})")
    ddp.barrier()


# --------------------------------------------------------------------------- main


def train_embedder(exp: Experiment, *, views: PairViews | None = None, stop_after_steps: int | None = None) -> Path:
    """Train (or resume, or skip when finished) the embedder of ``exp``; return the best checkpoint path.

    ``views``: the translated views ``translate.views`` names (given exactly when that list
    is not empty; ``cmpc.translate.augment.training_views(exp)`` builds them).
    ``stop_after_steps`` is a test hook: raise :class:`TrainingInterrupted` after that many
    global steps without saving, as if the process had been killed.
    """
    if exp.train.members > 1:
        return _train_members(exp, views, stop_after_steps)
    return fit_embedder(exp, views=views, stop_after_steps=stop_after_steps).best_path


def member_experiments(exp: Experiment) -> list[Experiment]:
    """The runs of ``train.members``: member k trains with seed ``train.seed + k`` in
    ``runs/<name>/members/seed<N>/`` (one embedder each)."""
    folder = str(exp.run_dir / "members")
    return [
        dataclasses.replace(exp, runs_dir=folder, name=f"seed{exp.train.seed + k}",
                            train=dataclasses.replace(exp.train, seed=exp.train.seed + k, members=1))
        for k in range(exp.train.members)
    ]


def _train_members(exp: Experiment, views: PairViews | None, stop_after_steps: int | None) -> Path:
    """Train (resume, skip) every member, then fuse them into ``runs/<name>/emb_best.pt``."""
    results = [fit_embedder(m, views=views, stop_after_steps=stop_after_steps) for m in member_experiments(exp)]
    bests = [r.best_path for r in results]
    files = _RunFiles(exp.run_dir)
    hashes = [checkpoint_hash(p) for p in bests]
    if files.best.is_file():
        old = load_checkpoint(files.best).get("fusion") or {}
        if [m.get("sha256") for m in old.get("members") or []] == hashes:
            tqdm.write(f"[train emb] {files.best}: fusion of {len(bests)} members up to date", file=sys.stderr)
            return files.best
    fuse_checkpoints(files.best, bests)
    if files.last.exists():  # a one-embedder run's state: its best was just replaced by the fusion
        files.last.unlink()
    exp.save(files.config)
    model, _ = load_embedder(files.best)
    recall = validate_checkpoint(model, exp)
    members = [dict(r.metrics or {}) for r in results]  # each member's best validation recall
    append_jsonl(files.log, {"kind": "fused", "members": [str(p) for p in bests], "member_recall": members, "recall": recall})
    shown = f"val R@1 {recall['1']:.3f} R@5 {recall['5']:.3f}" if recall else "no validation data"
    alone = ", ".join(f"{m['1']:.3f}" if "1" in m else "-" for m in members)
    tqdm.write(f"[train emb] fused {len(bests)} members into {files.best}: {shown} (members alone R@1 {alone})", file=sys.stderr)
    return files.best


def fit_embedder(exp: Experiment, *, views: PairViews | None = None, stop_after_steps: int | None = None) -> TrainResult:
    """:func:`train_embedder`, returning the trained model and metrics as well."""
    if exp.translate.views and views is None:
        raise ValueError(
            "translate.views names translator checkpoints but no views were passed to the trainer; "
            "pass views=cmpc.translate.augment.training_views(exp) (the CLI does)"
        )
    if views is not None and not exp.translate.views:
        raise ValueError("views were passed to the trainer but translate.views is empty (the checkpoints would not record them)")
    ddp = _init_distributed(exp.train.device)
    try:
        if not ddp.main:
            return _fit(exp, ddp, views, stop_after_steps)
        # one training per run folder at a time: two would resume from and overwrite the same files
        with exclusive(lock_path(exp.run_dir), what="embedder training", target=exp.run_dir):
            return _fit(exp, ddp, views, stop_after_steps)
    finally:
        if ddp.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _say(ddp: _Dist, msg: str) -> None:
    if ddp.main:
        tqdm.write(f"[train emb] {msg}", file=sys.stderr)


def _fit(exp: Experiment, ddp: _Dist, views: PairViews | None, stop_after_steps: int | None) -> TrainResult:
    """One run: skip it when finished; else set it up (fresh or resumed), train the
    remaining epochs, validate and save after each."""
    files = _RunFiles(exp.run_dir)
    device = _training_device(exp.train.device, ddp)
    inputs = _inputs(exp)  # every rank: a refusal must stop them all, not leave some at a barrier
    resume = _previous_run(exp, files, inputs)
    if resume is not None and resume.get("finished"):
        return _already_trained(resume, files, ddp)

    seed_everything(exp.train.seed)
    data = _load_data(exp, views, progress=ddp.main)
    sampler, steps_per_epoch = _make_sampler(exp, data, ddp)
    opt = _Optimisation(exp, data.sar_channels, data.optical_channels, device, steps_per_epoch)
    progress = _restore(resume, opt, sampler, files, ddp, steps_per_epoch) if resume is not None else _Progress()
    opt.distribute(ddp)
    if ddp.main:
        files.dir.mkdir(parents=True, exist_ok=True)
        exp.save(files.config)
    run = _Run(exp, ddp, files, inputs, data, sampler, steps_per_epoch, _make_loader(exp, data, sampler, device), opt, progress)

    progress.started = time.perf_counter()
    for epoch in range(progress.start_epoch, exp.train.epochs):
        _train_epoch(run, epoch, progress.start_batch if epoch == progress.start_epoch else 0, stop_after_steps)
        _share_rank0_buffers(opt.pair_model, ddp)
        _end_epoch(run, epoch)
    _finish(run)
    return TrainResult(files.best, files.last, opt.model.cpu(), dict(progress.best.get("recall") or {}), progress.step)


def _better(new: dict[str, float], old: dict[str, float] | None) -> bool:
    if old is None:
        return True
    return (new["1"], new["5"]) > (old["1"], old["5"])


def _best_payload(
    model: Embedder,
    exp: Experiment,
    epoch: int,
    step: int,
    metrics: dict[str, float],
    losses: CombinedLoss,
    inputs: dict[str, Any] | None = None,
    weights: str = "raw",
) -> dict[str, Any]:
    """``emb_best.pt``; ``weights`` says which weights it holds: ``raw`` or ``ema`` (train.ema)."""
    return embedder_payload(
        model, exp.data.img_size, epoch=epoch, step=step, metrics=metrics, experiment=exp.to_dict(), losses=losses.state_dict(), inputs=dict(inputs or {}), weights=weights
    )


def _validation_queries(refs: list, queries: list, val_locs: np.ndarray) -> np.ndarray:
    """Rows of the SAR queries validation uses: the aligned ones of the validation locations
    (validation mimics the test: aligned queries vs validation references)."""
    aligned_of = queries_by_location(refs, queries, non_aligned=False)
    return np.array(sorted(q for i in val_locs for q in aligned_of[int(i)]), dtype=np.int64)


def validate_checkpoint(model: nn.Module, exp: Experiment) -> dict[str, float]:
    """R@1 / R@5 of ``model`` on the validation hold-out of ``exp`` (the one training
    validates on), reading only the validation patches; {} when there is none."""
    root = exp.data.root
    refs, queries = read_annotations(root, "train", "opt"), read_annotations(root, "train", "sar")
    split = validation_holdout(read_dataset_meta(root), refs, exp.train.val_fraction)
    val_queries = _validation_queries(refs, queries, split.val)
    if not len(val_queries):
        return {}
    optical = PatchDataset(root, "train", "opt", exp.data.img_size, annotations=refs)
    sar = PatchDataset(root, "train", "sar", exp.data.img_size, annotations=queries)
    return _recall(model, sar, val_queries, optical, np.asarray(split.val, np.int64), torch.device("cpu"))


def validate(model: Embedder, data: _Data, device: torch.device) -> dict[str, float]:
    """R@1 / R@5 of the validation SAR queries against the validation optical references."""
    return _recall(model, data.sar, data.val_queries, data.optical, data.val_locs, device)


def _recall(model: nn.Module, sar: PatchDataset, queries: np.ndarray, optical: PatchDataset, refs: np.ndarray, device: torch.device) -> dict[str, float]:
    q = embed_patches(model, sar, queries, "sar", device)
    r = embed_patches(model, optical, refs, "opt", device)
    q_ids = np.array([sar.annotations[int(i)].id for i in queries], dtype=np.int64)
    r_ids = np.array([optical.annotations[int(i)].id for i in refs], dtype=np.int64)
    return recall_at_k(q, q_ids, r, r_ids, ks=(1, 5))


def _refresh_mining(model: Embedder, data: _Data, sampler: LocationBatchSampler, k: int, device: torch.device, ddp: _Dist) -> None:
    """Embed every training reference and give the sampler each one's nearest in embedding space."""
    kk = min(k, len(data.train_locs) - 1)
    if ddp.main:
        emb = embed_patches(model, data.optical, data.train_locs, "opt", device)
        table = torch.from_numpy(embedding_neighbours(emb, kk))
    else:
        table = torch.zeros(len(data.train_locs), kk, dtype=torch.int64)
    if ddp.enabled:
        table = table.to(device)  # nccl broadcasts device tensors only
        dist.broadcast(table, src=0)
    sampler.set_embedding_neighbours(table.cpu().numpy())

