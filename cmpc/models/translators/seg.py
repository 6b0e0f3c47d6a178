"""A small segmentation network: the judge of structure for Seg-CycleGAN and the metrics.

Trained here (``cmpc translate seg``, or automatically when Seg-CycleGAN or ``translate
eval`` needs one) on real patches of one modality with the class mask (the synthetic
world's labels.tif, or any label raster). It standardises its input per patch and channel,
so it accepts real patches and translator outputs alike, and it is differentiable end to
end so Seg-CycleGAN can back-propagate its loss into a generator.

Its pooled encoder features (B, 7w) are also the feature space of this project's FID
variant (see :mod:`cmpc.translate.metrics`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _gn(ch: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: no running statistics, so the network behaves the same in
    # training and in evaluation, and on translated images whose statistics differ.
    return nn.GroupNorm(min(8, ch // 2) or 1, ch)


def _conv(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), _gn(out_ch), nn.ReLU(True),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), _gn(out_ch), nn.ReLU(True),
    )


class SegNet(nn.Module):
    """Three-level U-Net: (B, C, H, W) -> (B, n_classes, H, W) logits; H, W multiples of 4.

    ``features(x)`` -> (B, 7 * width): global means of the three encoder levels.
    """

    multiple = 4

    def __init__(self, in_ch: int, n_classes: int, width: int = 16) -> None:
        super().__init__()
        w = width
        self.in_ch, self.n_classes, self.width = in_ch, n_classes, width
        self.enc1 = _conv(in_ch, w)
        self.enc2 = _conv(w, 2 * w)
        self.enc3 = _conv(2 * w, 4 * w)
        self.dec2 = _conv(4 * w + 2 * w, 2 * w)
        self.dec1 = _conv(2 * w + w, w)
        self.head = nn.Conv2d(w, n_classes, 1)

    @staticmethod
    def _standardize(x: torch.Tensor) -> torch.Tensor:
        # Per patch and band, so scaling of the input (dB, 8-bit, [-1, 1]) does not matter.
        mean = x.mean(dim=(-2, -1), keepdim=True)
        std = x.std(dim=(-2, -1), keepdim=True)
        return (x - mean) / (std + 1e-5)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self._standardize(x)
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        return e1, e2, e3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        e1, e2, e3 = self._encode(x)
        d2 = self.dec2(torch.cat([F.interpolate(e3, scale_factor=2, mode="nearest"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2, mode="nearest"), e1], 1))
        return self.head(d1)[..., :h, :w]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled encoder features (B, 7 * width) for the Fréchet distance."""
        e1, e2, e3 = self._encode(x)
        return torch.cat([e.mean(dim=(-2, -1)) for e in (e1, e2, e3)], 1)


def freeze(net: nn.Module) -> nn.Module:
    """Eval mode and no gradients for the parameters (gradients still flow to the input)."""
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net
