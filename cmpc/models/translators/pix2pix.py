"""pix2pix (Isola et al. 2017): U-Net generator, PatchGAN on (source, target) pairs,
vanilla GAN loss plus ``lambda_l1`` (100) x L1 to the co-registered target.

One model translates one direction (``translate.direction``); train two for both.
Paired data only: our datasets are co-registered (aligned SAR queries share their
reference's footprint).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cmpc.config import TranslateConfig
from cmpc.models.translators.base import GANLoss, TranslatorModel, direction_modes, set_requires_grad
from cmpc.models.translators.networks import PatchDiscriminator, disc_layers_for, init_weights, unet_depth_for


class Pix2Pix(TranslatorModel):
    """``train_step({"sar": (B,Cs,P,P), "opt": (B,Co,P,P)})`` -> {"G_gan", "G_l1", "D"}."""

    name = "pix2pix"
    paired = True

    def __init__(self, cfg: TranslateConfig, sar_channels: int, opt_channels: int) -> None:
        super().__init__(sar_channels, opt_channels)
        self.direction = cfg.direction
        self.src, self.tgt = direction_modes(cfg.direction)
        depth = cfg.unet_depth or unet_depth_for(cfg.patch_px)
        gen = self.add_generator(
            cfg.direction,
            {"type": "unet", "in_ch": self.channels(self.src), "out_ch": self.channels(self.tgt), "ngf": cfg.ngf, "depth": depth},
        )
        init_weights(gen)
        n_layers = cfg.disc_layers or disc_layers_for(cfg.patch_px)
        # Conditional discriminator: it sees the source beside the (real or fake) target.
        self.disc = init_weights(PatchDiscriminator(self.channels(self.src) + self.channels(self.tgt), cfg.ndf, n_layers))
        self.gan = GANLoss("vanilla")
        self.l1 = nn.L1Loss()
        self.lambda_l1 = cfg.lambda_l1
        self.opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
        self.optimizers = [self.opt_g, self.opt_d]

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        gen = self.generators[self.direction]
        gen.train()
        src, tgt = batch[self.src], batch[self.tgt]
        fake = gen(src)

        set_requires_grad([self.disc], True)
        self.opt_d.zero_grad(set_to_none=True)
        loss_d = 0.5 * (
            self.gan(self.disc(torch.cat([src, fake.detach()], 1)), False)
            + self.gan(self.disc(torch.cat([src, tgt], 1)), True)
        )
        loss_d.backward()
        self.opt_d.step()

        set_requires_grad([self.disc], False)
        self.opt_g.zero_grad(set_to_none=True)
        loss_gan = self.gan(self.disc(torch.cat([src, fake], 1)), True)
        loss_l1 = self.l1(fake, tgt)
        (loss_gan + self.lambda_l1 * loss_l1).backward()
        self.opt_g.step()
        return {"G_gan": loss_gan.item(), "G_l1": loss_l1.item(), "D": loss_d.item()}

    def discriminator_states(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"disc": {k: v.detach().cpu() for k, v in self.disc.state_dict().items()}}
