"""Translator building blocks: U-Net and ResNet generators, PatchGAN discriminators, init.

All generators map (B, C_in, H, W) in [-1, 1] to (B, C_out, H, W) in [-1, 1] (tanh) and are
fully convolutional: they train on small crops and translate whole patches. ``H`` and ``W``
must be multiples of :attr:`multiple`; :func:`pad_to_multiple` handles other sizes.

Normalisation is InstanceNorm throughout (as in CycleGAN; pix2pix's BatchNorm at batch
size 1 is the same thing), so a translation does not depend on the other patches in a batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _norm(ch: int) -> nn.Module:
    return nn.InstanceNorm2d(ch, affine=False, track_running_stats=False)


def unet_depth_for(patch_px: int) -> int:
    """Down-samplings that bring a ``patch_px`` crop to a 1x1 bottleneck (pix2pix: 256 -> 8)."""
    return max(2, int(math.floor(math.log2(patch_px))))


def disc_layers_for(patch_px: int) -> int:
    """PatchGAN depth for a crop side: 70x70 receptive field from 128 px, 34x34 from 48, else 16x16."""
    if patch_px >= 128:
        return 3
    if patch_px >= 48:
        return 2
    return 1


def patchgan_receptive_field(n_layers: int) -> int:
    """Receptive field (pixels) of a PatchGAN with ``n_layers`` strided convs (3 -> 70)."""
    rf = 1
    # Walk back from the output: two stride-1 4x4 convs, then n_layers stride-2 4x4 convs.
    for stride in [1, 1] + [2] * n_layers:
        rf = (rf - 1) * stride + 4
    return rf


class UnetBlock(nn.Module):
    """One level of the pix2pix U-Net: down, inner block, up, skip concatenation."""

    def __init__(
        self,
        outer: int,
        inner: int,
        in_ch: int | None = None,
        sub: nn.Module | None = None,
        outermost: bool = False,
        innermost: bool = False,
        dropout: bool = False,
        out_ch: int | None = None,
    ) -> None:
        super().__init__()
        self.outermost = outermost
        in_ch = outer if in_ch is None else in_ch
        down = nn.Conv2d(in_ch, inner, 4, stride=2, padding=1, bias=False)
        if outermost:
            up = nn.ConvTranspose2d(inner * 2, out_ch or outer, 4, stride=2, padding=1)
            layers = [down, sub, nn.ReLU(True), up, nn.Tanh()]
        elif innermost:
            # No norm at the bottleneck: at 1x1 an instance norm would zero every feature.
            up = nn.ConvTranspose2d(inner, outer, 4, stride=2, padding=1, bias=False)
            layers = [nn.LeakyReLU(0.2, True), down, nn.ReLU(True), up, _norm(outer)]
        else:
            up = nn.ConvTranspose2d(inner * 2, outer, 4, stride=2, padding=1, bias=False)
            layers = [nn.LeakyReLU(0.2, True), down, _norm(inner), sub, nn.ReLU(True), up, _norm(outer)]
            if dropout:
                layers.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*[m for m in layers if m is not None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    """pix2pix U-Net with ``depth`` down-samplings (widths ngf, 2ngf, 4ngf, 8ngf, 8ngf, ...).

    Dropout (0.5) on the three innermost 8ngf levels, as in pix2pix; it is active in training
    only, so a trained translator is deterministic.
    """

    def __init__(self, in_ch: int, out_ch: int, ngf: int = 64, depth: int = 8) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError("U-Net depth must be >= 2")
        self.depth = depth
        self.multiple = 2**depth
        self.model = self._build(in_ch, out_ch, ngf, depth)

    @staticmethod
    def _build(in_ch: int, out_ch: int, ngf: int, depth: int) -> nn.Module:
        # Level k (0 = outermost) goes from c_k channels to c_{k+1} channels at half resolution.
        chans = [ngf * min(2**k, 8) for k in range(depth)]  # channels after level k's down conv
        block: nn.Module = UnetBlock(chans[depth - 2], chans[depth - 1], innermost=True)
        n_dropout = 0
        for k in range(depth - 2, 0, -1):
            # pix2pix: dropout on (at most three) levels that are 8ngf wide on both sides.
            drop = chans[k - 1] == ngf * 8 and n_dropout < 3
            n_dropout += int(drop)
            block = UnetBlock(chans[k - 1], chans[k], sub=block, dropout=drop)
        return UnetBlock(out_ch, chans[0], in_ch=in_ch, sub=block, outermost=True, out_ch=out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class ResnetBlock(nn.Module):
    """Residual block: reflect-pad, conv3x3, norm, ReLU, reflect-pad, conv3x3, norm."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3, bias=False), _norm(ch), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3, bias=False), _norm(ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """CycleGAN generator: c7s1-ngf, d2ngf, d4ngf, ``n_blocks`` x R4ngf, u2ngf, u-ngf, c7s1-out, tanh."""

    multiple = 4

    def __init__(self, in_ch: int, out_ch: int, ngf: int = 64, n_blocks: int = 9) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(in_ch, ngf, 7, bias=False), _norm(ngf), nn.ReLU(True)]
        for i in range(2):
            c = ngf * 2**i
            layers += [nn.Conv2d(c, c * 2, 3, stride=2, padding=1, bias=False), _norm(c * 2), nn.ReLU(True)]
        layers += [ResnetBlock(ngf * 4) for _ in range(n_blocks)]
        for i in range(2, 0, -1):
            c = ngf * 2**i
            layers += [
                nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1, bias=False),
                _norm(c // 2),
                nn.ReLU(True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_ch, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PatchDiscriminator(nn.Module):
    """PatchGAN: (B, C, H, W) -> (B, 1, h, w) logits, one per receptive field.

    ``n_layers`` = 3 is the 70x70 PatchGAN of pix2pix/CycleGAN; 2 gives 34x34 and 1 gives
    16x16 for small crops, where a 70x70 field would see the whole patch as one patch.
    """

    def __init__(self, in_ch: int, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        self.n_layers = n_layers
        self.receptive_field = patchgan_receptive_field(n_layers)
        layers: list[nn.Module] = [nn.Conv2d(in_ch, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=False), _norm(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=False), _norm(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def init_weights(net: nn.Module, gain: float = 0.02) -> nn.Module:
    """pix2pix/CycleGAN init: conv weights N(0, 0.02), biases 0, norm scales N(1, 0.02)."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)
    return net


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad (B, C, H, W) on the bottom/right to multiples of ``multiple``; returns (x, (H, W))."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)


def run_generator(gen: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Translate (B, C, H, W) of any size: pad to the generator's multiple, run, crop back."""
    multiple = int(getattr(gen, "multiple", 1))
    xp, (h, w) = pad_to_multiple(x, multiple)
    return gen(xp)[..., :h, :w]
