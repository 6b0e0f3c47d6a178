"""What every translator shares: the GAN losses, the image pool, generator rebuilding.

A translator is an ``nn.Module`` holding one generator per direction it can translate
(``"sar2opt"``: SAR -> pseudo-optical, ``"opt2sar"``: optical -> pseudo-SAR) and the
discriminators and optimisers it trains them with. ``train_step(batch)`` does one
optimisation step and returns its losses; ``translate(x, direction)`` runs a generator.
Images are (B, C, H, W) in [-1, 1] (see :class:`cmpc.translate.data.Normalizer`).
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn as nn

from cmpc.models.translators.networks import ResnetGenerator, UnetGenerator, run_generator

DIRECTIONS: tuple[str, ...] = ("sar2opt", "opt2sar")


def direction_modes(direction: str) -> tuple[str, str]:
    """``"sar2opt"`` -> (``"sar"``, ``"opt"``): (source modality, target modality)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    src, tgt = direction.split("2")
    return src, tgt


class GANLoss(nn.Module):
    """``vanilla`` (BCE on logits, pix2pix) or ``lsgan`` (least squares, CycleGAN) against all-real/all-fake."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        if mode not in ("vanilla", "lsgan"):
            raise ValueError(f"GAN mode must be vanilla or lsgan, got {mode!r}")
        self.mode = mode
        self.loss = nn.BCEWithLogitsLoss() if mode == "vanilla" else nn.MSELoss()

    def forward(self, pred: torch.Tensor, target_is_real: bool) -> torch.Tensor:
        target = torch.full_like(pred, 1.0 if target_is_real else 0.0)
        return self.loss(pred, target)


class ImagePool:
    """CycleGAN's history of generated images (Shrivastava et al.): the discriminator sees a
    mix of current fakes and up to ``size`` older ones, which damps oscillation."""

    def __init__(self, size: int = 50, rng: random.Random | None = None) -> None:
        self.size = size
        self.images: list[torch.Tensor] = []
        self.rng = rng or random.Random(0)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for img in images.detach():
            img = img[None]
            if len(self.images) < self.size:
                self.images.append(img)
                out.append(img)
            elif self.rng.random() > 0.5:
                j = self.rng.randrange(self.size)
                out.append(self.images[j].clone())
                self.images[j] = img
            else:
                out.append(img)
        return torch.cat(out, 0)


def build_generator(arch: dict[str, Any]) -> nn.Module:
    """Rebuild a generator from its plain-data description (stored in checkpoints)."""
    kind = arch.get("type")
    if kind == "unet":
        return UnetGenerator(int(arch["in_ch"]), int(arch["out_ch"]), int(arch["ngf"]), int(arch["depth"]))
    if kind == "resnet":
        return ResnetGenerator(int(arch["in_ch"]), int(arch["out_ch"]), int(arch["ngf"]), int(arch["n_blocks"]))
    raise ValueError(f"unknown generator type {kind!r}")


def set_requires_grad(nets: list[nn.Module], flag: bool) -> None:
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)


class TranslatorModel(nn.Module):
    """Base class: generators by direction, their architectures, lr control, translate."""

    name = "translator"
    #: True when the method needs co-registered pairs (pix2pix); CycleGANs train unpaired.
    paired = False
    #: True when batches must carry class masks (``sar_label``/``opt_label``).
    needs_labels = False

    def __init__(self, sar_channels: int, opt_channels: int) -> None:
        super().__init__()
        self.sar_channels = sar_channels
        self.opt_channels = opt_channels
        self.generators = nn.ModuleDict()
        self.archs: dict[str, dict[str, Any]] = {}
        self.optimizers: list[torch.optim.Optimizer] = []

    def channels(self, modality: str) -> int:
        return self.sar_channels if modality == "sar" else self.opt_channels

    @property
    def directions(self) -> tuple[str, ...]:
        return tuple(self.generators.keys())

    def add_generator(self, direction: str, arch: dict[str, Any]) -> nn.Module:
        gen = build_generator(arch)
        self.generators[direction] = gen
        self.archs[direction] = dict(arch)
        return gen

    def set_lr(self, lr: float) -> None:
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = lr

    @torch.no_grad()
    def translate(self, x: torch.Tensor, direction: str) -> torch.Tensor:
        """(B, C_src, H, W) in [-1, 1] -> (B, C_tgt, H, W) in [-1, 1], any H, W."""
        gen = self.generators[direction]
        was_training = gen.training
        gen.eval()
        try:
            return run_generator(gen, x)
        finally:
            gen.train(was_training)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def discriminator_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """Discriminator weights by name (saved for inspection; translation needs only generators)."""
        return {}
