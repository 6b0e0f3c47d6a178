"""Pseudo-siamese SAR/optical embedder.

SAR and optical patches have different band counts and statistics, so each modality has
its own stem (conv-BN-act at full resolution). Both feed a trunk built by timm from any
backbone name (shared by default, or one per modality), then GeM pooling, a linear
projection to ``embed_dim`` and L2 normalisation. Cosine similarity of two embeddings is
their dot product.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import cmpc.models.backbones  # noqa: F401  (registers the cmpc_cnn_* trunks with timm)
from cmpc.config import ModelConfig
from cmpc.errors import CheckpointError, ConfigError

MODALITIES = ("sar", "opt")


class GeM(nn.Module):
    """Generalised-mean pooling: (B, C, H, W) -> (B, C); p is learned (p=1 mean, p->inf max)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(min=1.0)
        return x.clamp(min=self.eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class GridPool(nn.Module):
    """Layout-keeping pooling: (B, C, h, w) -> 1x1 conv to ``channels`` -> average into a

    ``size`` x ``size`` grid -> (B, channels * size * size). Unlike a global pool it keeps
    *where* things are in the patch, which separates references that share content but
    not position (50 %-overlapping neighbours). The same transform (flip, rotation) applied to
    a SAR patch and its optical reference permutes both grids identically.
    """

    def __init__(self, in_channels: int, channels: int = 32, size: int = 4) -> None:
        super().__init__()
        self.size = size
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.out_features = channels * size * size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.reduce(x), self.size).flatten(1)


def _stem(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


def _trunk(cfg: ModelConfig) -> nn.Module:
    try:
        trunk = timm.create_model(
            cfg.backbone,
            pretrained=cfg.pretrained,
            in_chans=cfg.stem_channels,
            num_classes=0,
            global_pool="",
        )
    except RuntimeError as e:
        if "Unknown model" in str(e) or "Unknown" in str(e):
            raise ConfigError(f"model.backbone {cfg.backbone!r} is not a timm model (see timm.list_models())") from None
        raise ConfigError(f"cannot build backbone {cfg.backbone!r}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # offline hub, missing weights
        raise ConfigError(f"cannot build backbone {cfg.backbone!r} (pretrained={cfg.pretrained}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if cfg.weights:
        path = Path(cfg.weights)
        if not path.is_file():
            raise ConfigError(f"model.weights: file not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot load trunk weights {path} safely: {type(e).__name__}") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        missing, unexpected = trunk.load_state_dict(state, strict=False)
        if len(missing) > len(trunk.state_dict()) // 2:
            raise CheckpointError(f"model.weights {path} does not fit backbone {cfg.backbone!r} ({len(missing)} missing keys)")
    _freeze_unused(trunk, cfg.stem_channels)
    return trunk


def _freeze_unused(trunk: nn.Module, in_ch: int) -> None:
    """``requires_grad=False`` on trunk parameters that ``forward_features`` never uses.

    Some timm models keep head layers outside ``forward_features`` (MobileNetV3's
    ``conv_head``); they never get a gradient, which DistributedDataParallel refuses
    ("parameters that were not used in producing loss"). Found by one tiny backward pass
    in eval mode (no batch-norm statistics change); the weights stay in the state dict.
    """
    was_training = trunk.training
    trunk.eval()
    params = [p for p in trunk.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    trunk.forward_features(torch.zeros(1, in_ch, 64, 64)).float().sum().backward()
    for p in params:
        if p.grad is None:
            p.requires_grad_(False)
        p.grad = None
    trunk.train(was_training)


class Embedder(nn.Module):
    """``forward(x, modality)`` maps (B, C_mod, S, S) patches to (B, D) unit vectors.

    ``modality`` is ``"sar"`` or ``"opt"``. ``feature_map`` gives the trunk's last dense
    features (B, C, h, w) for alignment and visualisation.
    """

    def __init__(self, cfg: ModelConfig, sar_channels: int, optical_channels: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.sar_channels = sar_channels
        self.optical_channels = optical_channels
        self.stems = nn.ModuleDict({"sar": _stem(sar_channels, cfg.stem_channels), "opt": _stem(optical_channels, cfg.stem_channels)})
        if cfg.share_trunk:
            shared = _trunk(cfg)
            self.trunks = nn.ModuleDict({"shared": shared})
        else:
            self.trunks = nn.ModuleDict({"sar": _trunk(cfg), "opt": _trunk(cfg)})
        feat = self._trunk("sar").num_features
        self.pool: nn.Module
        if getattr(cfg, "pool", "gem") == "grid":
            self.pool = GridPool(feat, cfg.grid_channels, cfg.grid_size)
            pooled = self.pool.out_features
        else:
            self.pool = GeM(cfg.gem_p)
            pooled = feat
        self.proj = nn.Sequential(nn.Linear(pooled, cfg.embed_dim), nn.BatchNorm1d(cfg.embed_dim))
        self.embed_dim = cfg.embed_dim

    def _trunk(self, modality: str) -> nn.Module:
        return self.trunks["shared"] if "shared" in self.trunks else self.trunks[modality]

    def channels(self, modality: str) -> int:
        return self.sar_channels if modality == "sar" else self.optical_channels

    def feature_map(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """(B, C_mod, S, S) -> trunk features (B, C, h, w)."""
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if x.shape[1] != self.channels(modality):
            raise ConfigError(
                f"{modality} input has {x.shape[1]} band(s) but the model was trained for {self.channels(modality)}"
            )
        return self._trunk(modality).forward_features(self.stems[modality](x))

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        f = self.pool(self.feature_map(x, modality))
        return F.normalize(self.proj(f.float()), dim=-1)

    def forward_pair(self, sar: torch.Tensor, opt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed a SAR batch (B, C_sar, S, S) and an optical batch (B', C_opt, S, S) together.

        With a shared trunk both stems' outputs go through the trunk, pooling and projection as
        ONE batch, so batch-norm statistics in training mix both modalities exactly as the
        running statistics used at inference do. (Two separate training forwards would
        normalise each modality by its own batch statistics, while inference normalises by
        their running average: SAR and optical embeddings then drift apart at test time.)
        """
        if "shared" not in self.trunks or sar.shape[-2:] != opt.shape[-2:]:
            return self(sar, "sar"), self(opt, "opt")
        for modality, x in (("sar", sar), ("opt", opt)):
            if x.shape[1] != self.channels(modality):
                raise ConfigError(
                    f"{modality} input has {x.shape[1]} band(s) but the model was trained for {self.channels(modality)}"
                )
        stems = torch.cat([self.stems["sar"](sar), self.stems["opt"](opt)])
        f = self.pool(self.trunks["shared"].forward_features(stems))
        e = F.normalize(self.proj(f.float()), dim=-1)
        return e[: sar.shape[0]], e[sar.shape[0] :]


def build_embedder(cfg: ModelConfig, sar_channels: int, optical_channels: int) -> Embedder:
    """Construct an :class:`Embedder`; explicit ``cfg.*_channels`` must match the data."""
    for name, given, data in (("sar_channels", cfg.sar_channels, sar_channels), ("optical_channels", cfg.optical_channels, optical_channels)):
        if given is not None and given != data:
            raise ConfigError(f"model.{name} is {given} but the data has {data} band(s)")
    return Embedder(cfg, sar_channels, optical_channels)
