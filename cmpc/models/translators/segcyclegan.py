"""Seg-CycleGAN: CycleGAN plus a frozen segmentation network's loss on each translated image,
guided by the class mask of the *source* patch (the world does not move when its appearance
is translated): buildings, water and roads must stay where the mask says they are.

``seg_opt`` judges pseudo-optical images (trained on real optical patches); ``seg_sar``, when
given, judges pseudo-SAR (trained on real SAR patches). Batches carry ``sar_label`` and
``opt_label`` (B, H, W) int64 masks; -1 marks pixels without a label (ignored).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cmpc.config import TranslateConfig
from cmpc.models.translators.cyclegan import CycleGAN
from cmpc.models.translators.seg import SegNet, freeze

IGNORE = -1


class SegCycleGAN(CycleGAN):
    """CycleGAN + ``lambda_seg`` x cross-entropy of the frozen segmenters on the fakes."""

    name = "segcyclegan"
    needs_labels = True

    def __init__(
        self,
        cfg: TranslateConfig,
        sar_channels: int,
        opt_channels: int,
        seg_opt: SegNet | None = None,
        seg_sar: SegNet | None = None,
    ) -> None:
        super().__init__(cfg, sar_channels, opt_channels)
        if seg_opt is None and seg_sar is None:
            raise ValueError("Seg-CycleGAN needs at least one segmentation network")
        # Kept outside the module tree: they are frozen judges, not part of the translator's weights.
        self._seg = {m: freeze(n) for m, n in (("opt", seg_opt), ("sar", seg_sar)) if n is not None}
        self.lambda_seg = cfg.lambda_seg

    def to(self, *args, **kwargs):  # type: ignore[override]
        for net in self._seg.values():
            net.to(*args, **kwargs)
        return super().to(*args, **kwargs)

    def extra_generator_loss(self, batch: dict[str, torch.Tensor], fake_opt: torch.Tensor, fake_sar: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss = fake_opt.new_zeros(())
        logs: dict[str, float] = {}
        # Pseudo-optical comes from a SAR patch: the SAR patch's mask is its truth, and vice versa.
        for mode, fake, key in (("opt", fake_opt, "sar_label"), ("sar", fake_sar, "opt_label")):
            net = self._seg.get(mode)
            if net is None or key not in batch:
                continue
            ce = F.cross_entropy(net(fake), batch[key], ignore_index=IGNORE)
            logs[f"seg_{mode}"] = ce.item()
            loss = loss + ce
        logs["seg"] = loss.item()
        return self.lambda_seg * loss, logs


def seg_modules(model: nn.Module) -> dict[str, SegNet]:
    """The frozen segmenters of a Seg-CycleGAN (empty for other translators)."""
    return dict(getattr(model, "_seg", {}))
