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

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cenfusion.engine.runtime import Precision


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
    nets: tuple[Callable[[Tensor], Tensor], nn.Module],
    discriminator: nn.Module,
    optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
    x: Tensor,
    y: Tensor,
    l1_weight: float,
    penalty: Callable[[], Tensor],
    precision: Precision,
) -> dict[str, Tensor]:
    """One training step on stacked inputs ``x`` ``(M*B, C, H, W)`` and target ``y``.

    ``nets``: the generator and the discriminator as called (compiled, DDP-wrapped), the
    generator giving ``(M + 1, B, C, H, W)`` heads; ``discriminator``: the bare module;
    ``optimizers``: the generator's and the discriminator's; ``penalty()``: the sparsity term.
    Returns the detached losses, the generator's total under ``loss``.
    """
    g_net, d_net = nets
    opt_g, opt_d = optimizers
    with precision.autocast():
        heads = g_net(x)
        m = heads.shape[0] - 1
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
    sparsity = penalty()
    loss_g = loss_gan + l1_weight * loss_l1 + sparsity
    precision.backward_step(loss_g, opt_g)
    precision.update()
    discriminator.requires_grad_(True)
    terms = {"loss": loss_g, "loss_d": loss_d, "loss_gan": loss_gan, "loss_l1": loss_l1}
    return {k: v.detach() for k, v in {**terms, "penalty": sparsity}.items()}
