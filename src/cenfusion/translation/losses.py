"""The losses of CEN translation (pix2pix's, per branch), on heads stacked by modality.

Per batch, with ``M`` input modalities stacked along the batch, generator heads
``G = (M + 1, B, 3, H, W)`` (branches, then the ensemble) and target ``y``:

- discriminator: ``sum_m 0.5 * [BCE(D(x_m, y), 1) + BCE(D(x_m, G_m), 0)]``;
- generator: ``sum_m BCE(D(x_m, G_m), 1) + l1_weight * sum_{k <= M} L1(G_k, y)
  + lamda * sum |gamma|`` over the disjoint penalised parts of the exchanging norms.

The ensemble head gets the L1 term too; its inputs are detached, so it trains only alpha.
:func:`pix2pix_step` applies them: D is updated first, then G against the updated D.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cenfusion.engine.runtime import Precision
from cenfusion.fusion import sparsity_penalty
from cenfusion.models.unet import CENUNet


def branch_bce(logits: Tensor, real: bool, num_branches: int) -> Tensor:
    """Sum over branches of each branch's mean BCE; ``logits`` ``(M*B, 1, h, w)``, stacked."""
    logits = logits.float()
    target = torch.full_like(logits, 1.0 if real else 0.0)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return loss.view(num_branches, -1).mean(1).sum()


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, num_branches: int) -> Tensor:
    """Half the sum of the real and the fake terms, each summed over branches."""
    real = branch_bce(real_logits, True, num_branches)
    return 0.5 * (real + branch_bce(fake_logits, False, num_branches))


def heads_l1(heads: Tensor, target: Tensor) -> Tensor:
    """Sum over heads of each head's mean absolute error; ``heads`` ``(K, B, C, H, W)``,
    ``target`` ``(B, C, H, W)``."""
    return (heads.float() - target[None]).abs().flatten(2).mean(2).mean(1).sum()


def pix2pix_step(
    generator: CENUNet,
    discriminator: nn.Module,
    nets: tuple[nn.Module, nn.Module],
    optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
    x: Tensor,
    y: Tensor,
    weights: tuple[float, float],
    precision: Precision,
) -> dict[str, Tensor]:
    """One training step on stacked inputs ``x`` ``(M*B, C, H, W)`` and target ``y``.

    ``nets``: the generator and the discriminator as called (compiled, DDP-wrapped);
    ``optimizers``: theirs, in that order; ``weights``: ``(l1_weight, lamda)``. Returns the
    detached losses, the generator's total under ``loss``.
    """
    g_net, d_net = nets
    opt_g, opt_d = optimizers
    m = generator.num_modalities
    with precision.autocast():
        heads = g_net(x)
        fakes = heads[:m].reshape(x.shape[0], *heads.shape[2:])
        discriminator.requires_grad_(True)
        real_logits = d_net(torch.cat([x, y.repeat(m, 1, 1, 1)], 1))
        fake_logits = d_net(torch.cat([x, fakes.detach()], 1))
    loss_d = discriminator_loss(real_logits, fake_logits, m)
    precision.backward_step(loss_d, opt_d)
    discriminator.requires_grad_(False)
    with precision.autocast():
        # the bare module: D takes no gradient here, so DDP has nothing to synchronise
        fooled = discriminator(torch.cat([x, fakes], 1))
    loss_gan = branch_bce(fooled, True, m)
    loss_l1 = heads_l1(heads, y)
    penalty = sparsity_penalty(generator, weights[1])
    loss_g = loss_gan + weights[0] * loss_l1 + penalty
    precision.backward_step(loss_g, opt_g)
    precision.update()
    discriminator.requires_grad_(True)
    terms = {"loss": loss_g, "loss_d": loss_d, "loss_gan": loss_gan, "loss_l1": loss_l1}
    return {k: v.detach() for k, v in {**terms, "penalty": penalty}.items()}
