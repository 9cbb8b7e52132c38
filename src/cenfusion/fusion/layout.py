"""The layout every fusion layer works on: modalities stacked along the batch dimension.

A tensor ``(M*B, C, H, W)`` holds modality 0's batch, then modality 1's, and so on (modality
major). Shared layers (convolutions, linear layers) process it in one call; private norms
view it as ``(M, B, C, H, W)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["per_channel", "split_modalities", "stack_modalities"]


def stack_modalities(
    inputs: Sequence[Tensor] | Tensor, num_modalities: int | None = None
) -> Tensor:
    """Return the modality-major stacked batch ``(M*B, C, H, W)``.

    Accepts ``M`` tensors ``(B, C, H, W)``, a data loader's batch ``(B, M, C, H, W)``, or an
    already stacked ``(M*B, C, H, W)`` tensor (returned unchanged). With ``num_modalities``
    the number of modalities given is checked (of a stacked tensor, that its batch is a
    multiple of it); the tensors of a list must have one shape
    (a stack of unequal batches would mix the modalities' samples).
    """
    if isinstance(inputs, Tensor):
        if inputs.dim() == 5:
            _check_count(
                inputs.shape[1], num_modalities, " along axis 1 of a (B, M, C, H, W) batch"
            )
            return inputs.transpose(0, 1).reshape(-1, *inputs.shape[2:])
        checked = num_modalities is not None and not torch.jit.is_tracing()
        if checked and inputs.shape[0] % num_modalities:
            raise ValueError(
                f"a stacked batch (M*B, C, H, W) of {inputs.shape[0]} is not a multiple of "
                f"{num_modalities} modalities (give M tensors (B, C, H, W) as a list)"
            )
        return inputs
    _check_count(len(inputs), num_modalities, "")
    if not torch.jit.is_tracing() and any(x.shape != inputs[0].shape for x in inputs[1:]):
        listed = ", ".join(str(tuple(x.shape)) for x in inputs)
        raise ValueError(f"the modalities' tensors must have one shape, got {listed}")
    return torch.cat(list(inputs), dim=0)


def _check_count(given: int, expected: int | None, where: str) -> None:
    if expected is not None and given != expected:
        raise ValueError(f"expected {expected} modalities, got {given}{where}")


def split_modalities(x: Tensor, num_modalities: int) -> Tensor:
    """View a stacked batch ``(M*B, ...)`` as ``(M, B, ...)`` (checked, except in a trace,
    which fixes the shapes and would warn at each check)."""
    if not torch.jit.is_tracing() and x.shape[0] % num_modalities:
        raise ValueError(
            f"stacked batch of {x.shape[0]} is not a multiple of {num_modalities} modalities"
        )
    return x.view(num_modalities, x.shape[0] // num_modalities, *x.shape[1:])


def per_channel(values: Tensor, spatial: int) -> Tensor:
    """``values`` (last axis: channels) with ``spatial`` unit axes appended, to broadcast
    against tensors whose channel axis is followed by that many spatial axes."""
    return values.view(*values.shape, *([1] * spatial))
