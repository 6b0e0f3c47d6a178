"""Loss values on hand-built embeddings (expected numbers worked out by hand in the comments)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from cmpc.config import LossConfig
from cmpc.models.losses import (
    LOSS_REGISTRY,
    BatchHardTripletLoss,
    SymmetricInfoNCE,
    WassersteinCritic,
    build_critic,
    build_critic_optimizer,
    build_losses,
)

# Three locations in 2-D. Cosine similarities S[i, j] = sar_i . opt_j:
#   s0=(1,0):  o0 .8   o1 0   o2 -.6
#   s1=(0,1):  o0 .6   o1 1   o2 -.8
#   s2=(-1,0): o0 -.8  o1 0   o2 .6
SAR = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
OPT = torch.tensor([[0.8, 0.6], [0.0, 1.0], [-0.6, -0.8]])


def test_batch_hard_triplet_exact_value() -> None:
    # Distances D = 1 - S: rows .2 1 1.6 / .4 0 1.8 / 1.8 1 .4; positives (diagonal) .2 0 .4.
    # SAR anchors, hardest optical negative (row min off the diagonal): 1, .4, 1
    #   relu(.2-1+.5)=0, relu(0-.4+.5)=.1, relu(.4-1+.5)=0          -> mean .1/3
    # optical anchors, hardest SAR negative (column min off the diagonal): .4, 1, 1.6
    #   relu(.2-.4+.5)=.3, relu(0-1+.5)=0, relu(.4-1.6+.5)=0         -> mean .3/3
    # loss = (.1/3 + .3/3) / 2 = 1/15
    loss = BatchHardTripletLoss(margin=0.5)(SAR, OPT)
    assert loss.item() == pytest.approx(1.0 / 15.0, abs=1e-6)


def test_batch_hard_triplet_ignores_same_location_rows() -> None:
    # Rows 0 and 1 are the same location: they are not negatives of each other. The only
    # negatives left are far (distances 1 to 1.8 against positives <= .4): every term is 0.
    loss = BatchHardTripletLoss(margin=0.5)(SAR, OPT, labels=torch.tensor([7, 7, 9]))
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    # A batch of one location has no negative at all: zero, not inf/nan.
    assert BatchHardTripletLoss(0.5)(SAR[:1], OPT[:1]).item() == 0.0


def test_infonce_exact_value_at_known_temperature() -> None:
    sar = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    opt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # T = 0.5: logits = 2 * S = [[2, 1.2], [0, 1.6]].
    row = ((-2 + math.log(math.exp(2) + math.exp(1.2))) + (-1.6 + math.log(math.exp(0) + math.exp(1.6)))) / 2
    col = ((-2 + math.log(math.exp(2) + math.exp(0))) + (-1.6 + math.log(math.exp(1.2) + math.exp(1.6)))) / 2
    loss_fn = SymmetricInfoNCE(temperature=0.5)
    assert loss_fn.temperature == pytest.approx(0.5)
    loss = loss_fn(sar, opt)
    assert loss.item() == pytest.approx((row + col) / 2, abs=1e-6)
    # Swapping the modalities transposes the logits: the symmetric loss is unchanged.
    assert loss_fn(opt, sar).item() == pytest.approx(loss.item(), abs=1e-6)


def test_infonce_temperature_is_learned() -> None:
    loss_fn = SymmetricInfoNCE(temperature=0.5)
    # Perfectly matched, orthogonal pairs: sharper logits (lower temperature) lower the loss,
    # so the gradient on log(1/T) is negative and a descent step lowers T.
    sar = torch.eye(3)
    opt = torch.eye(3)
    loss_fn(sar, opt).backward()
    assert loss_fn.log_scale.grad is not None and loss_fn.log_scale.grad.item() < 0
    with torch.no_grad():  # one plain gradient step (no torch.optim: its first use imports dynamo, seconds)
        loss_fn.log_scale -= 0.5 * loss_fn.log_scale.grad
    assert loss_fn.temperature < 0.5


def test_registry_and_weights_from_config() -> None:
    assert {"triplet", "infonce"} <= set(LOSS_REGISTRY)
    combined = build_losses(LossConfig(triplet=2.0, margin=0.5, infonce=0.0))
    assert set(combined.terms) == {"triplet"}  # weight 0 switches a term off
    total, parts = combined(SAR, OPT)
    assert parts["triplet"].item() == pytest.approx(1.0 / 15.0, abs=1e-6)
    assert total.item() == pytest.approx(2.0 / 15.0, abs=1e-6)
    assert build_critic(LossConfig(critic=0.0), 8) is None


def test_gradient_penalty_of_a_linear_critic() -> None:
    critic = WassersteinCritic(dim=2, mode="gp", gp_weight=10.0)
    linear = nn.Linear(2, 1)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[3.0, 4.0]]))
        linear.bias.fill_(0.5)
    critic.net = linear
    # c(x) = 3 x + 4 y + .5: the gradient is (3, 4) everywhere, norm 5 -> penalty (5 - 1)^2 = 16,
    # whatever the random interpolation points.
    gp = critic.gradient_penalty(SAR, OPT, generator=torch.Generator().manual_seed(0))
    assert gp.item() == pytest.approx(16.0, abs=1e-5)
    # Estimate E[c(opt)] - E[c(sar)] = c(mean opt) - c(mean sar) for a linear critic:
    # mean opt = (.2/3, .8/3), mean sar = (0, 1/3) -> 3 * .2/3 + 4 * (.8/3 - 1/3) = .2 - .2667
    assert critic.estimate(SAR, OPT).item() == pytest.approx(0.2 - 4.0 * 0.2 / 3.0, abs=1e-6)
    # The critic's own loss is -estimate + 10 * 16.
    loss = critic.critic_loss(SAR, OPT, generator=torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(-(0.2 - 0.8 / 3.0) + 160.0, abs=1e-4)


def test_weight_clipping_keeps_weights_in_range() -> None:
    torch.manual_seed(0)
    critic = WassersteinCritic(dim=4, hidden=16, mode="clip", clip=0.01)
    assert all(p.abs().max() <= 0.01 + 1e-9 for p in critic.parameters())  # clipped at construction
    opt = torch.optim.SGD(critic.parameters(), lr=10.0)  # huge steps: would leave the box unclipped
    sar, optical = torch.randn(32, 4), torch.randn(32, 4) + 2.0
    critic.update(sar, optical, opt, steps=5)
    flat = torch.cat([p.detach().flatten() for p in critic.parameters()])
    assert flat.abs().max().item() <= 0.01 + 1e-9
    assert (flat.abs() > 0.0099).float().mean().item() > 0.5  # the constraint is active, not trivially met


def _clouds(shift: float, n: int = 64, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sar = torch.randn(n, dim, generator=g) * 0.1
    opt = torch.randn(n, dim, generator=g) * 0.1
    opt[:, 0] += shift
    return sar, opt


@pytest.mark.parametrize("mode", ["gp", "clip"])
def test_critic_estimate_grows_with_separation(mode: str) -> None:
    cfg = LossConfig(critic=1.0, critic_mode=mode, critic_hidden=32, critic_lr=1e-2 if mode == "gp" else 5e-3)
    estimates = []
    for shift in (0.0, 1.0, 2.0):  # distance between the SAR and optical clouds (= their W1)
        torch.manual_seed(0)
        critic = build_critic(cfg, 8)
        assert critic is not None
        opt = build_critic_optimizer(critic, cfg)
        sar, optical = _clouds(shift, n=256)
        estimates.append(critic.update(sar, optical, opt, steps=60, generator=torch.Generator().manual_seed(1)))
    same, one, two = estimates
    if mode == "gp":
        # Near 1-Lipschitz: the estimate approaches W1 itself.
        assert abs(same) < 0.1
        assert 0.6 < one < 1.2
        assert 1.4 < two < 2.3
    else:
        # Clipping makes the critic K-Lipschitz for some small fixed K: the estimate is K * W1,
        # tiny but proportional to the separation.
        assert 0 < abs(same) < 0.2 * one
        assert two == pytest.approx(2 * one, rel=0.2)


def test_embedder_side_term_pulls_the_modalities_together() -> None:
    torch.manual_seed(0)
    cfg = LossConfig(critic=1.0, critic_mode="gp", critic_hidden=32, critic_lr=1e-2)
    critic = build_critic(cfg, 8)
    assert critic is not None
    critic.update(*_clouds(1.0), build_critic_optimizer(critic, cfg), steps=60)
    sar, optical = _clouds(1.0)
    sar.requires_grad_(True)
    optical.requires_grad_(True)
    critic(sar, optical).backward()
    # Descending the term moves SAR toward the optical cloud (+x) and optical toward SAR (-x).
    assert sar.grad[:, 0].mean().item() < 0
    assert optical.grad[:, 0].mean().item() > 0
