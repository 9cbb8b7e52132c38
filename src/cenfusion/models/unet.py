"""CEN U-Net: the pix2pix U-Net generator with private InstanceNorms and channel exchange.

All convolutions are shared by the ``M`` input modalities, which travel stacked along the
batch, ``(M*B, C, H, W)`` modality major; every InstanceNorm is private (affine parameters
``(M, C)``). Layout (pix2pix U-Net as CEN uses it), with ``N = num_downs`` and
``c_i = ngf * min(2**i, 8)``:

- encoder block ``i = 1..N``: conv 4x4 stride 2 (bias) from ``c_{i-2}`` to ``c_{i-1}``
  channels; blocks ``2..N`` start with LeakyReLU(0.2); blocks ``2..N-1`` end with a private
  affine InstanceNorm that exchanges channels whose ``|gamma| < threshold``; block 1 and the
  innermost block ``N`` have no norm;
- decoder block ``j = 1..N`` (innermost first): ReLU, ConvTranspose 4x4 stride 2 (bias), a
  private InstanceNorm (not in block ``N``), Dropout(0.5) in blocks ``1..num_dropout``; its
  output is concatenated with the mirrored encoder output (``[decoder, encoder]``, the
  released order, so released pix2pix/CEN weights keep their meaning) before the next block;
  block ``N`` ends with Tanh.

For 256x256 input and ``N = 8`` (``pix2pix_unet256``) the innermost map is 1x1 and the
encoder widths are 64-128-256-512-512-512-512-512 with exchange in blocks 2..7. Any input
whose sides are multiples of ``2**N`` works, so small CPU runs use e.g. ``N = 6`` at 64x64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from cenfusion.arguments import check_count, check_non_negative, check_rate
from cenfusion.errors import CenError
from cenfusion.fusion import (
    AlphaEnsemble,
    ModalityInstanceNorm2d,
    split_modalities,
    stack_modalities,
)

__all__ = ["CENUNet", "CENUNetConfig", "create_cen_unet", "default_num_dropout"]


def default_num_dropout(num_downs: int) -> int:
    """Decoder blocks with dropout: 3 for the 8-level U-Net-256, one fewer per level removed.

    The dropout blocks are the wide ones next to the bottleneck (``8 * ngf`` channels), of
    which an ``N``-level U-Net has ``N - 5``.
    """
    return max(0, min(3, num_downs - 5))


@dataclass(frozen=True)
class CENUNetConfig:
    """Everything needed to rebuild a :class:`CENUNet` (saved inside checkpoints)."""

    num_modalities: int = 2
    in_channels: int = 3
    out_channels: int = 3
    ngf: int = 64
    num_downs: int = 8
    threshold: float = 1e-2
    num_dropout: int = 3
    drop_rate: float = 0.5
    ensemble_detach: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CENUNetConfig:
        return cls(**d)

    def widths(self) -> list[int]:
        """Encoder output channels ``c_0 .. c_{N-1}``, shallow to deep."""
        return [self.ngf * min(2**i, 8) for i in range(self.num_downs)]


class DownBlock(nn.Module):
    """``[LeakyReLU(0.2)] -> conv 4x4 s2 -> [private IN + exchange]`` on ``(M*B, C, H, W)``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_modalities: int,
        activation: bool,
        norm: bool,
        threshold: float,
    ) -> None:
        super().__init__()
        self.act = nn.LeakyReLU(0.2) if activation else nn.Identity()
        self.conv = nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1)
        self.norm = (
            ModalityInstanceNorm2d(out_channels, num_modalities, exchange=True, threshold=threshold)
            if norm
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(self.act(x)))


class UpBlock(nn.Module):
    """``ReLU -> conv-transpose 4x4 s2 -> private IN -> [Dropout]`` (last block: ``-> Tanh``).

    The decoder norms are private but never exchange (in CEN exchange is an encoder
    mechanism).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_modalities: int,
        outermost: bool,
        drop_rate: float,
    ) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1)
        self.norm = (
            nn.Identity() if outermost else ModalityInstanceNorm2d(out_channels, num_modalities)
        )
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.out = nn.Tanh() if outermost else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.drop(self.norm(self.conv(torch.relu(x)))))


class CENUNet(nn.Module):
    """CEN U-Net generator over ``M`` modalities with the alpha ensemble.

    ``forward(inputs)``: a list of ``M`` tensors ``(B, in_channels, H, W)`` or the stacked
    ``(M*B, in_channels, H, W)``, ``H`` and ``W`` multiples of ``2**num_downs``; returns the
    stacked predictions ``(M + 1, B, out_channels, H, W)`` in ``[-1, 1]``: index ``m < M`` is
    the branch of modality ``m`` (input order), index ``M`` the ensemble. One tensor rather
    than a list so that the losses over all heads are single operations.
    """

    def __init__(self, config: CENUNetConfig) -> None:
        super().__init__()
        check_count("num_modalities", config.num_modalities, 2)
        for name in ("in_channels", "out_channels", "ngf"):
            check_count(name, getattr(config, name))
        check_count("num_downs", config.num_downs, 2)
        check_count("num_dropout", config.num_dropout, 0)
        if config.num_dropout > config.num_downs - 1:
            raise CenError(f"num_dropout={config.num_dropout}: expected 0..{config.num_downs - 1}")
        check_rate("drop_rate", config.drop_rate)
        check_non_negative("threshold", config.threshold)
        self.config = config
        m, n, widths = config.num_modalities, config.num_downs, config.widths()
        self.down = nn.ModuleList(
            DownBlock(
                config.in_channels if i == 0 else widths[i - 1],
                widths[i],
                m,
                activation=i > 0,
                norm=0 < i < n - 1,
                threshold=config.threshold,
            )
            for i in range(n)
        )
        # Decoder block j (0-based, innermost first) reads encoder level n-1-j (concatenated
        # with the previous block's output for j > 0) and produces level n-2-j's width.
        self.up = nn.ModuleList(
            UpBlock(
                widths[n - 1] if j == 0 else 2 * widths[n - 1 - j],
                config.out_channels if j == n - 1 else widths[n - 2 - j],
                m,
                outermost=j == n - 1,
                drop_rate=config.drop_rate if j < config.num_dropout else 0.0,
            )
            for j in range(n)
        )
        self.ensemble = AlphaEnsemble(m, detach=config.ensemble_detach)
        self.reset_parameters()

    @property
    def num_modalities(self) -> int:
        return self.config.num_modalities

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Convolution weights ~ N(0, 0.02) and biases 0 (pix2pix init); the norms are left as
        they are (built at gamma 1, beta 0)."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(module.weight, 0.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward_stacked(self, x: Tensor) -> Tensor:
        """Stacked ``(M*B, C_in, H, W)`` -> per-branch predictions ``(M, B, C_out, H, W)``."""
        size = 2**self.config.num_downs
        if not torch.jit.is_tracing() and (x.shape[-2] % size or x.shape[-1] % size):
            raise ValueError(
                f"input {tuple(x.shape[-2:])}: sides must be multiples of 2**num_downs = {size}"
            )
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        skips.pop()
        for block in self.up:
            x = block(x)
            if skips:
                x = torch.cat([x, skips.pop()], dim=1)
        return split_modalities(x, self.num_modalities)

    def forward(self, inputs: Sequence[Tensor] | Tensor) -> Tensor:
        heads = self.forward_stacked(stack_modalities(inputs, self.num_modalities))
        return torch.cat([heads, self.ensemble(heads)[None]], dim=0)


def create_cen_unet(
    num_modalities: int = 2,
    in_channels: int = 3,
    out_channels: int = 3,
    ngf: int = 64,
    num_downs: int = 8,
    threshold: float = 1e-2,
    num_dropout: int | None = None,
    drop_rate: float = 0.5,
    ensemble_detach: bool = True,
) -> CENUNet:
    """Build a CEN U-Net (defaults: pix2pix U-Net-256, two modalities, theta = 1e-2).

    ``num_dropout`` defaults to :func:`default_num_dropout` of ``num_downs`` (3 for 8
    levels); ``drop_rate=0`` removes dropout altogether.
    """
    check_count("num_downs", num_downs, 2)
    config = CENUNetConfig(
        num_modalities=num_modalities,
        in_channels=in_channels,
        out_channels=out_channels,
        ngf=ngf,
        num_downs=num_downs,
        threshold=threshold,
        num_dropout=default_num_dropout(num_downs) if num_dropout is None else num_dropout,
        drop_rate=drop_rate,
        ensemble_detach=ensemble_detach,
    )
    return CENUNet(config)
