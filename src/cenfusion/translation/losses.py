"""The losses of CEN translation (pix2pix's, per branch), on heads stacked by modality.

Per batch, with ``M`` input modalities stacked along the batch, generator heads
``G = (M + 1, B, 3, H, W)`` (branches, then the ensemble) and target ``y``:

- discriminator: ``sum_m 0.5 * [BCE(D(x_m, y), 1) + BCE(D(x_m, G_m), 0)]``;
- generator: ``sum_m BCE(D(x_m, G_m), 1) + l1_weight * sum_{k <= M} L1(G_k, y)
  + lamda * sum |gamma|`` over the disjoint penalised parts of the exchanging norms.

The ensemble head gets the L1 term too; its inputs are detached, so it trains only alpha.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
