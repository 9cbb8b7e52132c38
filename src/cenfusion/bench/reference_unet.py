"""A per-modality reference of the CEN U-Net and its PatchGAN, computing the way the released
translation code does.

Each modality is its own tensor in a Python list; every shared convolution is called once
per modality, each modality has its own affine ``nn.InstanceNorm2d``, and after each
exchanging norm a channel whose ``|gamma_m| < threshold`` takes the other modality's value.
The discriminator is called once per branch. Built from a cenfusion :class:`CENUNet` (its
convolutions shared, one row of each ``(M, C)`` norm parameter per modality), so the same
weights give the same outputs; ``cen bench --task i2i`` times it beside cenfusion.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cenfusion.bench.reference import PrivateInstanceNorm, Tensors, each
from cenfusion.fusion import ModalityInstanceNorm2d
from cenfusion.models.unet import CENUNet

__all__ = ["PerBranchDiscriminator", "ReferenceUNet"]


def _private(norm: nn.Module) -> nn.Module:
    return PrivateInstanceNorm(norm) if isinstance(norm, ModalityInstanceNorm2d) else norm


class ReferenceUNet(nn.Module):
    """CEN U-Net over ``M`` tensors ``(B, C, H, W)`` (or the stacked ``(M*B, C, H, W)``, split);
    returns the heads stacked as :class:`CENUNet` does, ``(M + 1, B, C_out, H, W)``."""

    def __init__(self, model: CENUNet) -> None:
        super().__init__()
        self.num_modalities = model.num_modalities
        self.down = nn.ModuleList(
            nn.ModuleList([block.act, block.conv, _private(block.norm)]) for block in model.down
        )
        self.up = nn.ModuleList(
            nn.ModuleList([block.conv, _private(block.norm), block.drop, block.out])
            for block in model.up
        )
        self.alpha = model.ensemble.alpha
        self.detach = model.ensemble.detach

    def forward(self, inputs: Sequence[Tensor] | Tensor) -> Tensor:
        if isinstance(inputs, Tensor):
            inputs = inputs.chunk(self.num_modalities)
        xs = list(inputs)
        skips = []
        for act, conv, norm in self.down:
            xs = _apply(norm, each(conv, each(act, xs)))
            skips.append(xs)
        skips.pop()
        for conv, norm, drop, out in self.up:
            xs = each(out, each(drop, _apply(norm, each(conv, each(torch.relu, xs)))))
            if skips:
                xs = [torch.cat([a, b], dim=1) for a, b in zip(xs, skips.pop())]
        weights = torch.softmax(self.alpha, dim=0)
        ensemble = sum(w * (o.detach() if self.detach else o) for w, o in zip(weights, xs))
        return torch.stack([*xs, ensemble])


def _apply(norm: nn.Module, xs: Tensors) -> Tensors:
    """A private norm takes the list; an identity leaves it."""
    return norm(xs) if isinstance(norm, PrivateInstanceNorm) else xs


class PerBranchDiscriminator(nn.Module):
    """The shared PatchGAN called once per branch of a stacked ``(M*B, C, H, W)`` input."""

    def __init__(self, discriminator: nn.Module, num_modalities: int) -> None:
        super().__init__()
        self.discriminator = discriminator
        self.num_modalities = num_modalities

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.discriminator(part) for part in x.chunk(self.num_modalities)])
