"""The final prediction: a learnt convex combination of the per-modality predictions."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cenfusion.arguments import check_count

__all__ = ["AlphaEnsemble"]


class AlphaEnsemble(nn.Module):
    """Final prediction ``sum_m softmax(alpha)_m * out_m``, ``alpha`` learnable, ones at start.

    As in the paper, the per-modality predictions are detached, so a loss on the ensemble
    trains only ``alpha``; ``detach=False`` lets it reach the network as well.
    """

    def __init__(self, num_modalities: int, detach: bool = True) -> None:
        super().__init__()
        check_count("num_modalities", num_modalities)
        self.alpha = nn.Parameter(torch.ones(num_modalities))
        self.detach = detach

    def forward(self, outs: Tensor) -> Tensor:
        """``outs``: ``(M, B, ...)`` per-modality predictions -> ``(B, ...)``."""
        wrong = not isinstance(outs, Tensor) or outs.dim() < 1
        if wrong or (not torch.jit.is_tracing() and outs.shape[0] != len(self.alpha)):
            shape = tuple(outs.shape) if isinstance(outs, Tensor) else type(outs).__name__
            raise ValueError(
                f"expected the {len(self.alpha)} modalities' predictions stacked along axis 0, "
                f"got {shape}"
            )
        if self.detach:
            outs = outs.detach()
        weights = torch.softmax(self.alpha, dim=0).to(outs.dtype)
        return torch.tensordot(weights, outs, dims=1)
