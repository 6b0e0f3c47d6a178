"""CFOG: a hand-made dense SAR/optical descriptor for fine alignment (no weights to train).

Channel features of orientated gradients (Ye, Bruzzone, Shan, Bovolo, Zhu, "Fast and robust
matching for multimodal remote sensing image registration", IEEE TGRS 57(11), 2019), built for
SAR/optical template matching: per pixel, the magnitude of the image gradient projected on
``n_orient`` directions in [0, 180) degrees, taken as an absolute value (a boundary that is
bright-to-dark in the optical may be dark-to-bright in the SAR), smoothed by a Gaussian in
space and by [1, 2, 1] across neighbouring orientations, L2-normalised over the orientations (unit vectors where the gradient is clear, shorter
in flat areas).
The layout of edges survives the change of sensor where brightness does not.

It is a drop-in for :class:`~cmpc.models.descriptor.DenseDescriptor` in fine alignment
(:mod:`cmpc.localize.align`): same ``forward(x, modality)`` contract, output stride
:attr:`CfogDescriptor.stride` (1: a descriptor per pixel, so the mosaic of a map holds
``n_orient`` floats per pixel). Two differences, both on purpose:

- the SAR is smoothed first (``sar_sigma`` px): speckle is pixel-scale noise and would
  otherwise dominate the gradients;
- the SAR (template) descriptors are returned with their mean over the patch subtracted per
  orientation, so the correlation score is that of a zero-mean template: a window that is
  merely full of edges in every direction does not outscore the one whose edges match.
  Correlation peaks are therefore not mean cosines of unit vectors (they are much smaller:
  0.004-0.015 for 1 km Sentinel-1 patches on sentinel-la); thresholds on them
  (``refine.align_min_peak``) are this descriptor's own.

Measured on sentinel-la (docs/RESULTS.md, experiments/sentinel/calibrate_cfog.py): the 840
validation-block queries searched against the 11,763-reference training map, fine alignment
always taken around the top 20: the learned descriptor (seed 0's refiner) put 0.020 of them
within 25 m of the truth, this one 0.173 (non-aligned alone 0.129, within 100 m 0.329).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def gaussian_taps(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian taps of standard deviation ``sigma`` px (radius 3 sigma, >= 1)."""
    r = max(1, int(round(3.0 * sigma)))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-0.5 * (x / max(sigma, 1e-6)) ** 2)
    return g / g.sum()


def _blur(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable blur of (B, C, H, W) with 1-D ``taps``, reflect padding (replicate when too small)."""
    r = (len(taps) - 1) // 2
    if r == 0:
        return x
    C = x.shape[1]
    mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    x = F.pad(x, (r, r, r, r), mode=mode)
    x = F.conv2d(x, taps.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(x, taps.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


class CfogDescriptor(nn.Module):
    """CFOG descriptors: (B, C_mod, H, W) -> (B, n_orient, H, W), see the module doc.

    Args:
        sar_channels, optical_channels: band counts the inputs are checked against, None =
            any (the bands are averaged: the gradient layout is what is compared).
        n_orient: orientations in [0, 180) degrees.
        sigma: spatial Gaussian of the orientated gradients, px.
        sar_sigma: Gaussian pre-smoothing of the SAR (speckle), px; 0 = none.
        opt_sigma: the same for the optical; 0 = none.
    """

    stride = 1
    #: fine alignment keeps only the map image and computes descriptors per window
    #: (:class:`cmpc.localize.align.LazyFeatureMosaic`): 9 floats per map pixel do not fit
    #: in memory for large maps, and the descriptor is cheap
    lazy = True
    #: the feature-mosaic cache of an index keeps CFOG maps in their own file
    cache_tag = "_cfog"

    def __init__(self, sar_channels: int | None, optical_channels: int | None, n_orient: int = 9, sigma: float = 0.8, sar_sigma: float = 1.0, opt_sigma: float = 0.0) -> None:
        super().__init__()
        if n_orient < 2:
            raise ValueError("CFOG needs at least 2 orientations")
        self.sar_channels = None if sar_channels is None else int(sar_channels)
        self.optical_channels = None if optical_channels is None else int(optical_channels)
        self.dim = int(n_orient)
        self.settings = {"n_orient": int(n_orient), "sigma": float(sigma), "sar_sigma": float(sar_sigma), "opt_sigma": float(opt_sigma)}
        th = torch.arange(n_orient, dtype=torch.float32) * (math.pi / n_orient)
        # buffers, not parameters: nothing is trained, but the state_dict (and so the hash
        # that keys cached feature mosaics) changes with every setting
        self.register_buffer("directions", torch.stack([torch.cos(th), torch.sin(th)], dim=1))
        self.register_buffer("taps", gaussian_taps(sigma))
        self.register_buffer("sar_taps", gaussian_taps(sar_sigma) if sar_sigma > 0 else torch.ones(1))
        self.register_buffer("opt_taps", gaussian_taps(opt_sigma) if opt_sigma > 0 else torch.ones(1))
        #: pixels of context a window needs on each side for exact descriptors at its edge
        self.context_px = 1 + (len(self.taps) - 1) // 2 + (max(len(self.sar_taps), len(self.opt_taps)) - 1) // 2

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        if modality not in ("sar", "opt"):
            raise ValueError(f"modality must be 'sar' or 'opt', got {modality!r}")
        t = torch.nan_to_num(x.float()).mean(dim=1, keepdim=True)  # (B, 1, H, W)
        t = _blur(t, self.sar_taps if modality == "sar" else self.opt_taps)
        gx = torch.zeros_like(t)
        gy = torch.zeros_like(t)
        gx[..., :, 1:-1] = t[..., :, 2:] - t[..., :, :-2]
        gy[..., 1:-1, :] = t[..., 2:, :] - t[..., :-2, :]
        d = self.directions
        f = (d[:, 0].view(1, -1, 1, 1) * gx + d[:, 1].view(1, -1, 1, 1) * gy).abs()
        f = _blur(f, self.taps)
        # [1, 2, 1] across orientation; circular: 0 and 180 degrees are the same direction
        f = 0.25 * torch.roll(f, 1, dims=1) + 0.5 * f + 0.25 * torch.roll(f, -1, dims=1)
        # inputs are standardised (unit std): gradients far below 0.01 are rounding noise
        # (e.g. of a float16 map), not structure, and must not be scaled up to unit vectors
        f = f / (f.norm(dim=1, keepdim=True) + 1e-2)
        if modality == "sar":
            f = f - f.mean(dim=(2, 3), keepdim=True)
        return f
