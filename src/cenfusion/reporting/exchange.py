"""The per-epoch ``exchange`` record: how far channel exchange has gone at every point.

A training loop logs ``{"exchange": exchange_record(model)}`` in each ``metrics.jsonl`` line;
the plots draw it as a layers x epochs heat map per modality and a histogram of the
penalised gammas. The record is plain JSON::

    {
      "overall": 0.42,                       # all penalised gammas under threshold (fraction)
      "thresholds": [0.02],                  # the distinct thresholds of the points
      "points": {"encoder.layer1.0.bn2": [0.10, 0.30], ...},
      "gamma_hist": {"edges": [0.0, 1e-4, ...], "counts": [[...], [...]]}
    }

``points[name][m]`` is the fraction of modality ``m``'s penalised gammas (its part of the
channels, see :func:`cenfusion.fusion.sparsity_penalty`) with ``|gamma| < threshold`` at
that point. ``gamma_hist.counts[m]`` counts modality ``m``'s penalised ``|gamma|`` over all
points in the bins ``[edges[i], edges[i+1])``; values past the last edge fall in the last
bin. The default edges are fixed (0, then log-spaced 1e-4 .. 10), so epochs and runs compare.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from cenfusion.fusion import exchange_stats, exchanging_norms

__all__ = ["GAMMA_EDGES", "exchange_record"]

#: Bin edges of the penalised-gamma histogram: 0, then 25 log-spaced edges from 1e-4 to 10.
GAMMA_EDGES: tuple[float, ...] = (0.0, *(float(e) for e in np.logspace(-4, 1, 26)))


@torch.no_grad()
def exchange_record(model: nn.Module, edges: Sequence[float] = GAMMA_EDGES) -> dict[str, Any]:
    """The JSON-ready exchange record of ``model`` (schema in the module docstring).

    A model without exchange points gives ``overall`` 0, no points and zero counts.
    """
    norms = exchanging_norms(model)
    num_modalities = max((norm.num_modalities for _, norm in norms), default=0)
    edges_array = np.asarray(edges, dtype=np.float64)
    if edges_array.ndim != 1 or len(edges_array) < 2 or np.any(np.diff(edges_array) <= 0):
        raise ValueError("edges must be at least two increasing values")
    stats = exchange_stats(model)
    gammas: list[list[np.ndarray]] = [[] for _ in range(num_modalities)]
    for _, norm in norms:
        magnitudes = norm.weight.detach().abs().float().cpu()
        for m in range(norm.num_modalities):
            gammas[m].append(magnitudes[m][norm.penalty_mask[m].cpu()].numpy())
    hist = []
    for parts in gammas:
        values = np.concatenate(parts) if parts else np.zeros(0)
        values = np.clip(values, edges_array[0], edges_array[-1])
        hist.append(np.histogram(values, bins=edges_array)[0].tolist())
    return {
        "overall": stats.overall,
        "thresholds": sorted({float(norm.threshold) for _, norm in norms}),
        "points": stats.per_modality,
        "gamma_hist": {"edges": edges_array.tolist(), "counts": hist},
    }
