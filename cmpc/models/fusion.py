"""Score fusion of several embedders, packaged as one embedder.

Embedders of the same recipe trained from different seeds make different mistakes; fusing
their cosine scores, ``s(q, r) = sum_k w_k <q_k, r_k>`` with ``w_k >= 0`` and ``sum w_k = 1``,
ranks better than any one of them (sentinel-la validation block, three seeds: aligned R@1
0.593 / 0.700 / 0.700 alone, 0.740 fused; docs/RESULTS.md). That score is exactly the inner
product of the concatenations ``[sqrt(w_1) q_1, ..., sqrt(w_K) q_K]`` and the same for ``r``,
which are unit vectors again. So :class:`FusedEmbedder` is an ordinary embedder to everything
downstream (index, localizer, scene georeferencing, refiner training): ``forward(x,
modality)`` returns (B, sum D_k) unit vectors, and FAISS searches them as usual.

A fused checkpoint (``cmpc model fuse OUT.pt A.pt B.pt ...``,
:func:`cmpc.models.checkpoint.fuse_checkpoints`) is one file of kind ``"embedder"`` like any
other, so its SHA-256 is the model's identity for indexes and cards::

    {"kind": "embedder", "fusion": {"weights": [w_1, ...], "members": [member payload, ...]},
     "model_cfg": {... first member's ...}, "sar_channels", "optical_channels", "img_size",
     "embed_dim": sum D_k, "inputs": {"member0": {"path", "sha256"}, ...}}

Each member payload is the member checkpoint's plain data (weights, model config, channels,
input size, its own SHA-256), so the fused file stands alone and loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from cmpc.errors import ConfigError


class FusedEmbedder(nn.Module):
    """K embedders as one: ``forward(x, modality)`` = ``[sqrt(w_k) e_k(x)]_k`` concatenated.

    Members must take the same bands and input size. ``weights`` (K,) are normalised to sum
    to 1, so outputs are unit vectors and their dot product is the fused cosine score.
    """

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if not members:
            raise ConfigError("a fused embedder needs at least one member")
        chans = {(int(m.sar_channels), int(m.optical_channels)) for m in members}
        if len(chans) > 1:
            raise ConfigError(f"fused members take different band counts (SAR, optical) {sorted(chans)}; fuse models of one dataset")
        w = torch.ones(len(members), dtype=torch.float64) if weights is None else torch.as_tensor(list(weights), dtype=torch.float64)
        if w.shape != (len(members),) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ConfigError(f"fusion weights must be {len(members)} finite non-negative numbers with a positive sum, got {list(map(float, w))}")
        w = w / w.sum()
        self.members = nn.ModuleList(members)
        self.register_buffer("scale", w.sqrt().float())
        self.weights = [float(v) for v in w]
        self.sar_channels, self.optical_channels = next(iter(chans))
        self.embed_dim = int(sum(int(m.embed_dim) for m in members))
        self.cfg = members[0].cfg  # the members' shared recipe (backbone, pooling, ...) for reports

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """(B, C_mod, S, S) -> (B, sum D_k) unit vectors."""
        return torch.cat([s * m(x, modality) for s, m in zip(self.scale, self.members)], dim=-1)

    def forward_pair(self, sar: torch.Tensor, opt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed a SAR and an optical batch (each member batches both modalities together)."""
        pairs = [m.forward_pair(sar, opt) for m in self.members]
        return (torch.cat([s * p[0] for s, p in zip(self.scale, pairs)], dim=-1),
                torch.cat([s * p[1] for s, p in zip(self.scale, pairs)], dim=-1))

    def feature_map(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """Dense features are per member and not comparable across members: refused in one line."""
        raise ConfigError("a fused embedder has no single dense feature map; use one of its members (cmpc model fuse lists them)")
