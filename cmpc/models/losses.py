"""Cross-modal metric losses and the Wasserstein modal-alignment critic.

One contract for every metric loss (pytorch-metric-learning style)::

    loss(sar, opt, labels=None) -> scalar tensor

``sar`` and ``opt`` are (B, D) L2-normalised embeddings; row ``i`` of both comes from the
same location (the positive pair). ``labels`` (B,) are location ids: two rows with the same
label are never used as negatives of each other (the sampler already guarantees one sample
per location per batch; labels make the losses safe without that guarantee). Cosine
similarity is the dot product; cosine distance is ``1 - similarity`` (range [0, 2]).

Losses are registered by name (:data:`LOSS_REGISTRY`); the experiment weights them through
:class:`cmpc.config.LossConfig` keys of the same name (``triplet``, ``infonce``), and
:func:`build_losses` builds the weighted sum of the non-zero terms. The critic is separate
(:func:`build_critic`): it has its own optimiser and is trained a few steps per batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from cmpc.config import LossConfig


def _positive_mask(labels: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """(B, B) bool: True where row and column are the same location (never negatives)."""
    if labels is None:
        return torch.eye(n, dtype=torch.bool, device=device)
    labels = labels.to(device)
    return labels[:, None] == labels[None, :]


class PairLoss(nn.Module):
    """Base class: ``forward(sar (B, D), opt (B, D), labels (B,) | None) -> scalar``."""

    name: str = ""

    @classmethod
    def from_config(cls, cfg: LossConfig) -> PairLoss:
        raise NotImplementedError

    def forward(self, sar: torch.Tensor, opt: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        raise NotImplementedError


LOSS_REGISTRY: dict[str, type[PairLoss]] = {}


def register_loss(name: str) -> Callable[[type[PairLoss]], type[PairLoss]]:
    """Class decorator: make a :class:`PairLoss` available to experiments under ``name``."""

    def deco(cls: type[PairLoss]) -> type[PairLoss]:
        cls.name = name
        LOSS_REGISTRY[name] = cls
        return cls

    return deco


@register_loss("triplet")
class BatchHardTripletLoss(PairLoss):
    """Batch-hard triplet loss across modalities (CMPC), cosine distance.

    For each SAR anchor: its optical positive and the hardest (closest) optical negative in
    the batch, ``relu(d(a, p) - d(a, n) + margin)``; symmetrically for each optical anchor
    with SAR negatives. The value is the mean over all 2B anchors.
    """

    def __init__(self, margin: float = 0.3) -> None:
        super().__init__()
        self.margin = float(margin)

    @classmethod
    def from_config(cls, cfg: LossConfig) -> BatchHardTripletLoss:
        return cls(margin=cfg.margin)

    def forward(self, sar: torch.Tensor, opt: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        dist = 1.0 - sar @ opt.T  # (B, B): row = SAR anchor, column = optical candidate
        pos = dist.diagonal()
        neg = dist.masked_fill(_positive_mask(labels, dist.shape[0], dist.device), float("inf"))
        hardest_opt = neg.min(dim=1).values  # for each SAR anchor
        hardest_sar = neg.min(dim=0).values  # for each optical anchor
        # A batch of one location has no negative (inf): its terms are relu(-inf) = 0.
        sar_terms = F.relu(pos - hardest_opt + self.margin)
        opt_terms = F.relu(pos - hardest_sar + self.margin)
        return 0.5 * (sar_terms.mean() + opt_terms.mean())


@register_loss("infonce")
class SymmetricInfoNCE(PairLoss):
    """Symmetric InfoNCE (Sample4Geo / CLIP) with a learnable temperature.

    ``logits = sar @ opt.T / T``; the loss is the mean of the cross-entropy of each SAR row
    over optical columns and of each optical column over SAR rows, the diagonal being the
    target. ``T`` is learned as ``log(1/T)`` and kept >= 0.01 (logit scale <= 100, as CLIP).
    """

    max_scale = 100.0

    def __init__(self, temperature: float = 0.07) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    @classmethod
    def from_config(cls, cfg: LossConfig) -> SymmetricInfoNCE:
        return cls(temperature=cfg.temperature)

    @property
    def temperature(self) -> float:
        return 1.0 / float(self.log_scale.detach().exp().clamp(max=self.max_scale))

    def forward(self, sar: torch.Tensor, opt: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        scale = self.log_scale.exp().clamp(max=self.max_scale)
        logits = scale * (sar @ opt.T)
        if labels is not None:
            # Same-location off-diagonal entries are not negatives: remove them from both softmaxes.
            same = _positive_mask(labels, logits.shape[0], logits.device)
            same.fill_diagonal_(False)
            logits = logits.masked_fill(same, float("-inf"))
        target = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class CombinedLoss(nn.Module):
    """Weighted sum of named :class:`PairLoss` terms; returns ``(total, {name: value})``."""

    def __init__(self, terms: dict[str, PairLoss], weights: dict[str, float]) -> None:
        super().__init__()
        self.terms = nn.ModuleDict(terms)
        self.weights = dict(weights)

    def forward(
        self, sar: torch.Tensor, opt: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {name: term(sar, opt, labels) for name, term in self.terms.items()}
        total = sum((self.weights[n] * v for n, v in parts.items()), sar.new_zeros(()))
        return total, parts


def build_losses(cfg: LossConfig) -> CombinedLoss:
    """The registered metric losses whose weight (``cfg.<name>``) is > 0."""
    terms: dict[str, PairLoss] = {}
    weights: dict[str, float] = {}
    for name, cls in LOSS_REGISTRY.items():
        w = float(getattr(cfg, name, 0.0) or 0.0)
        if w > 0:
            terms[name] = cls.from_config(cfg)
            weights[name] = w
    return CombinedLoss(terms, weights)


# --------------------------------------------------------------------------- critic


class WassersteinCritic(nn.Module):
    """Wasserstein critic for SAR/optical modal alignment (CMPC).

    An MLP ``c: R^D -> R`` is trained (:meth:`update`, a few steps per batch, on detached
    embeddings) to maximise ``E[c(opt)] - E[c(sar)]``, kept (approximately) 1-Lipschitz by
    weight clipping (``mode="clip"``, as CMPC / WGAN) or a gradient penalty (``mode="gp"``,
    WGAN-GP). Its maximum is then an estimate of the Wasserstein-1 distance between the
    optical and SAR embedding distributions.

    :meth:`forward` returns that estimate with gradients flowing into *both* embeddings;
    the embedder minimises ``weight * forward(...)``. Because the trunk is shared and both
    modalities receive the gradient, the two distributions are pulled toward each other
    rather than SAR being dragged onto a fixed optical target (the symmetric form); on a
    shared trunk this avoids the optical branch drifting away while SAR chases it.
    """

    def __init__(self, dim: int, hidden: int = 256, mode: str = "gp", clip: float = 0.01, gp_weight: float = 10.0) -> None:
        super().__init__()
        if mode not in ("clip", "gp"):
            raise ValueError(f"critic mode must be 'clip' or 'gp', got {mode!r}")
        self.mode = mode
        self.clip = float(clip)
        self.gp_weight = float(gp_weight)
        # No normalisation layers: batch statistics would break the per-sample gradient penalty.
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1),
        )
        if mode == "clip":
            self.clip_weights()

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B,) critic values."""
        return self.net(x).squeeze(-1)

    def estimate(self, sar: torch.Tensor, opt: torch.Tensor) -> torch.Tensor:
        """``E[c(opt)] - E[c(sar)]``: the Wasserstein-1 estimate (scalar)."""
        return self.score(opt).mean() - self.score(sar).mean()

    def forward(self, sar: torch.Tensor, opt: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The embedder's alignment term (to minimise): the critic's estimate."""
        return self.estimate(sar, opt)

    def gradient_penalty(self, sar: torch.Tensor, opt: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """WGAN-GP: ``E[(||grad c(x_hat)|| - 1)^2]`` at random interpolates of SAR and optical rows."""
        n = min(sar.shape[0], opt.shape[0])
        alpha = torch.rand(n, 1, generator=generator, dtype=sar.dtype, device="cpu" if generator is None else generator.device)
        alpha = alpha.to(sar.device)
        x_hat = (alpha * opt[:n] + (1.0 - alpha) * sar[:n]).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.score(x_hat).sum(), x_hat, create_graph=True)
        return ((grad.norm(dim=1) - 1.0) ** 2).mean()

    def critic_loss(self, sar: torch.Tensor, opt: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """What the critic minimises: ``-(E[c(opt)] - E[c(sar)])`` (+ gradient penalty in gp mode)."""
        loss = -self.estimate(sar, opt)
        if self.mode == "gp" and self.gp_weight > 0:
            loss = loss + self.gp_weight * self.gradient_penalty(sar, opt, generator)
        return loss

    @torch.no_grad()
    def clip_weights(self) -> None:
        """Clamp every critic parameter to ``[-clip, clip]`` (the WGAN Lipschitz constraint)."""
        for p in self.net.parameters():
            p.clamp_(-self.clip, self.clip)

    def update(
        self,
        sar: torch.Tensor,
        opt: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        steps: int,
        generator: torch.Generator | None = None,
        sync_grads: Callable[[nn.Module], None] | None = None,
    ) -> float:
        """Train the critic ``steps`` times on detached embeddings; returns the estimate after them.

        ``sync_grads`` (DDP) averages the critic's gradients over processes so every rank
        keeps an identical critic.
        """
        sar, opt = sar.detach().float(), opt.detach().float()
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = self.critic_loss(sar, opt, generator)
            loss.backward()
            if sync_grads is not None:
                sync_grads(self)
            optimizer.step()
            if self.mode == "clip":
                self.clip_weights()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            return float(self.estimate(sar, opt))


def build_critic(cfg: LossConfig, dim: int) -> WassersteinCritic | None:
    """The critic for ``cfg`` (None when ``cfg.critic`` is 0)."""
    if cfg.critic <= 0:
        return None
    return WassersteinCritic(dim, hidden=cfg.critic_hidden, mode=cfg.critic_mode, clip=cfg.critic_clip, gp_weight=cfg.critic_gp)


def build_critic_optimizer(critic: WassersteinCritic, cfg: LossConfig) -> torch.optim.Optimizer:
    """RMSprop for weight clipping (momentum destabilises clipped WGANs), Adam(0.5, 0.9) for gp (WGAN-GP)."""
    if critic.mode == "clip":
        return torch.optim.RMSprop(critic.parameters(), lr=cfg.critic_lr)
    return torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr, betas=(0.5, 0.9))
