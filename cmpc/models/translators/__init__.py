"""Image translators (SAR <-> optical) by name: pix2pix, CycleGAN, Seg-CycleGAN.

``create_translator("cyclegan", cfg, sar_channels, opt_channels)`` builds any of them the
same way, so an experiment names its translator by string (``translate.model``).
"""

from __future__ import annotations

from typing import Any

from cmpc.config import TranslateConfig
from cmpc.errors import ConfigError
from cmpc.models.translators.base import DIRECTIONS, TranslatorModel, build_generator, direction_modes
from cmpc.models.translators.cyclegan import CycleGAN
from cmpc.models.translators.pix2pix import Pix2Pix
from cmpc.models.translators.segcyclegan import SegCycleGAN

TRANSLATORS: dict[str, type[TranslatorModel]] = {
    "pix2pix": Pix2Pix,
    "cyclegan": CycleGAN,
    "segcyclegan": SegCycleGAN,
}


def create_translator(name: str, cfg: TranslateConfig, sar_channels: int, opt_channels: int, **kwargs: Any) -> TranslatorModel:
    """Build the translator registered as ``name`` (extra kwargs: Seg-CycleGAN's ``seg_opt``/``seg_sar``)."""
    if name not in TRANSLATORS:
        raise ConfigError(f"translate.model {name!r} is not a translator; valid: {sorted(TRANSLATORS)}")
    return TRANSLATORS[name](cfg, sar_channels, opt_channels, **kwargs)


__all__ = ["DIRECTIONS", "TRANSLATORS", "TranslatorModel", "build_generator", "create_translator", "direction_modes"]
