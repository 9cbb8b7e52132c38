"""Where channels are exchanged and how far: the L1 sparsity term that decides it, and the
fraction of penalised gammas under the threshold that reports it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from cenfusion.arguments import check_non_negative
from cenfusion.errors import CenError
from cenfusion.fusion.norms import ModalityNorm

__all__ = ["ExchangeStats", "exchange_stats", "exchanging_norms", "sparsity_penalty"]


def exchanging_norms(model: nn.Module) -> list[tuple[str, ModalityNorm]]:
    """The exchanging private norms of ``model`` with their qualified names, in order."""
    if not isinstance(model, nn.Module):
        raise CenError(f"model={type(model).__name__}: expected a torch.nn.Module")
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ModalityNorm) and m.exchange]


def sparsity_penalty(model: nn.Module, lamda: float) -> Tensor:
    """``lamda * sum_m |gamma_m[part m]|_1`` over every exchanging norm (a scalar tensor).

    Every norm's gammas are concatenated first, so that the term costs a few operations a
    step rather than a few per norm (on a GPU, each is a kernel the host launches). With
    ``lamda == 0`` it is an exact zero that adds nothing to the graph.
    """
    if isinstance(lamda, Tensor):
        if lamda.numel() != 1:
            raise CenError(
                f"lamda: expected one number, got a tensor of shape {tuple(lamda.shape)}"
            )
    else:
        check_non_negative("lamda", lamda)
    norms = [norm for _, norm in exchanging_norms(model)]
    if lamda == 0 or not norms:
        anchor = next(iter(model.parameters()), None)
        return torch.zeros((), device=None if anchor is None else anchor.device)
    gammas = torch.cat([norm.weight.flatten() for norm in norms])
    parts = torch.cat([norm.penalty_mask.flatten() for norm in norms])
    return lamda * (gammas.abs() * parts).sum()


@dataclass(frozen=True)
class ExchangeStats:
    """Fraction of penalised gammas below threshold: per exchange point and modality, per
    point (all modalities together) and overall."""

    per_point: dict[str, float]
    overall: float
    per_modality: dict[str, list[float]] = field(default_factory=dict)
    """``per_modality[name][m]``: the fraction of modality ``m``'s penalised gammas."""


@torch.no_grad()
def exchange_stats(model: nn.Module) -> ExchangeStats:
    """How far sparsity has gone: penalised gammas with ``|gamma| < threshold``.

    This grows during training as the L1 term pushes the penalised parts towards zero.
    """
    per_point: dict[str, float] = {}
    per_modality: dict[str, list[float]] = {}
    below = 0
    total = 0
    for name, norm in exchanging_norms(model):
        hits = (norm.exchange_mask() & norm.penalty_mask).sum(1)
        counts = norm.penalty_mask.sum(1)
        per_modality[name] = (hits.double() / counts.clamp(min=1).double()).tolist()
        per_point[name] = int(hits.sum()) / int(counts.sum())
        below += int(hits.sum())
        total += int(counts.sum())
    return ExchangeStats(per_point, below / total if total else 0.0, per_modality)
