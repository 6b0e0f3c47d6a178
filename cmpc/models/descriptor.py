"""The dense cross-modal descriptor of fine alignment (the network; its use is :mod:`cmpc.localize.align`).

:class:`DenseDescriptor` has one small fully-convolutional branch per modality (output
stride :data:`STRIDE`, L2-normalised per cell); trained so that SAR and optical
descriptors agree at corresponding places (:mod:`cmpc.train.align`), it lets the query be
correlated against the optical map around each candidate.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

STRIDE = 4  # pixels per descriptor cell


def _branch(in_ch: int, dim: int, width: int) -> nn.Sequential:
    w1, w2, w3 = max(8, width // 2), width, width + width // 2

    def cbr(i: int, o: int, k: int, s: int = 1, d: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(i, o, k, stride=s, padding=d * (k // 2), dilation=d, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

    # stride 2 at once (speckle is pixel-scale noise), then context at 1/4 with a dilated
    # layer: ~50 px receptive field, enough to see a building and its SAR layover/shadow
    return nn.Sequential(
        *cbr(in_ch, w1, 5, 2),
        *cbr(w1, w2, 3),
        *cbr(w2, w3, 3, 2),
        *cbr(w3, w3, 3),
        *cbr(w3, w3, 3, 1, 2),
        nn.Conv2d(w3, dim, 1),
    )


class DenseDescriptor(nn.Module):
    """Cross-modal dense descriptors: (B, C_mod, H, W) -> (B, dim, ceil(H/4), ceil(W/4)).

    Cell ``(r, c)`` describes the neighbourhood of pixel ``(4 r, 4 c)``; descriptors are unit
    vectors. ``modality`` is ``"sar"`` or ``"opt"``; inputs are standardised per channel.
    """

    stride = STRIDE

    def __init__(self, sar_channels: int, optical_channels: int, dim: int = 16, width: int = 32) -> None:
        super().__init__()
        self.sar_channels = sar_channels
        self.optical_channels = optical_channels
        self.dim = dim
        self.width = width
        self.branches = nn.ModuleDict({"sar": _branch(sar_channels, dim, width), "opt": _branch(optical_channels, dim, width)})

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        return F.normalize(self.branches[modality](x), dim=1)
