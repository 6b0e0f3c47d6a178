"""CycleGAN (Zhu et al. 2017): two ResNet generators (SAR -> optical, optical -> SAR), two
PatchGANs, LSGAN loss, an image pool of ``pool_size`` (50) past fakes per discriminator,
cycle-consistency ``lambda_cycle`` (10) and identity ``lambda_identity`` (0.5, times
``lambda_cycle``). Trains on unpaired data; one model translates both directions.

The identity term feeds a target-domain image to a generator, which only makes sense when
both modalities have the same band count (e.g. Pauli-RGB SAR and RGB optical); otherwise it
is switched off and the logs say so (``identity_used`` = 0).
"""

from __future__ import annotations

import random

import torch
import torch.nn as nn

from cmpc.config import TranslateConfig
from cmpc.models.translators.base import GANLoss, ImagePool, TranslatorModel, set_requires_grad
from cmpc.models.translators.networks import PatchDiscriminator, disc_layers_for, init_weights


class CycleGAN(TranslatorModel):
    """``train_step({"sar": (B,Cs,P,P), "opt": (B,Co,P,P)})`` (unpaired) -> losses dict."""

    name = "cyclegan"
    paired = False

    def __init__(self, cfg: TranslateConfig, sar_channels: int, opt_channels: int) -> None:
        super().__init__(sar_channels, opt_channels)
        for direction, (i, o) in (("sar2opt", (sar_channels, opt_channels)), ("opt2sar", (opt_channels, sar_channels))):
            init_weights(self.add_generator(direction, {"type": "resnet", "in_ch": i, "out_ch": o, "ngf": cfg.ngf, "n_blocks": cfg.n_blocks}))
        n_layers = cfg.disc_layers or disc_layers_for(cfg.patch_px)
        self.discs = nn.ModuleDict(
            {"opt": init_weights(PatchDiscriminator(opt_channels, cfg.ndf, n_layers)), "sar": init_weights(PatchDiscriminator(sar_channels, cfg.ndf, n_layers))}
        )
        rng = random.Random(cfg.seed)
        self.pools = {"opt": ImagePool(cfg.pool_size, rng), "sar": ImagePool(cfg.pool_size, rng)}
        self.gan = GANLoss("lsgan")
        self.l1 = nn.L1Loss()
        self.lambda_cycle = cfg.lambda_cycle
        self.identity_used = cfg.lambda_identity > 0 and sar_channels == opt_channels
        self.lambda_identity = cfg.lambda_identity if self.identity_used else 0.0
        self.opt_g = torch.optim.Adam(self.generators.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.discs.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
        self.optimizers = [self.opt_g, self.opt_d]

    def extra_generator_loss(self, batch: dict[str, torch.Tensor], fake_opt: torch.Tensor, fake_sar: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Hook for subclasses (Seg-CycleGAN): an extra term on the translated images."""
        return fake_opt.new_zeros(()), {}

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        g_s2o, g_o2s = self.generators["sar2opt"], self.generators["opt2sar"]
        self.generators.train()
        real_sar, real_opt = batch["sar"], batch["opt"]
        fake_opt = g_s2o(real_sar)
        rec_sar = g_o2s(fake_opt)
        fake_sar = g_o2s(real_opt)
        rec_opt = g_s2o(fake_sar)

        # Generators: fool both discriminators, close both cycles, (identity), extra.
        set_requires_grad(list(self.discs.values()), False)
        self.opt_g.zero_grad(set_to_none=True)
        loss_gan = self.gan(self.discs["opt"](fake_opt), True) + self.gan(self.discs["sar"](fake_sar), True)
        loss_cycle = self.l1(rec_sar, real_sar) + self.l1(rec_opt, real_opt)
        loss_idt = fake_opt.new_zeros(())
        if self.lambda_identity > 0:
            loss_idt = self.l1(g_s2o(real_opt), real_opt) + self.l1(g_o2s(real_sar), real_sar)
        loss_extra, extra_logs = self.extra_generator_loss(batch, fake_opt, fake_sar)
        loss_g = loss_gan + self.lambda_cycle * loss_cycle + self.lambda_cycle * self.lambda_identity * loss_idt + loss_extra
        loss_g.backward()
        self.opt_g.step()

        # Discriminators: real vs pooled fakes, halved as in CycleGAN.
        set_requires_grad(list(self.discs.values()), True)
        self.opt_d.zero_grad(set_to_none=True)
        loss_d = fake_opt.new_zeros(())
        for mode, real, fake in (("opt", real_opt, fake_opt), ("sar", real_sar, fake_sar)):
            pooled = self.pools[mode].query(fake.detach())
            d = self.discs[mode]
            loss_d = loss_d + 0.5 * (self.gan(d(real), True) + self.gan(d(pooled), False))
        loss_d.backward()
        self.opt_d.step()
        return {
            "G_gan": loss_gan.item(),
            "cycle": loss_cycle.item(),
            "identity": loss_idt.item(),
            "identity_used": float(self.identity_used),
            "D": loss_d.item(),
            **extra_logs,
        }

    def discriminator_states(self) -> dict[str, dict[str, torch.Tensor]]:
        return {f"disc_{m}": {k: v.detach().cpu() for k, v in d.state_dict().items()} for m, d in self.discs.items()}
