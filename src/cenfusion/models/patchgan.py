"""The 70x70 PatchGAN discriminator of pix2pix, shared by every CEN branch (CEN paper, Sec. 4.2).

Input: ``cat(source, image)`` along channels, ``(N, source_channels + target_channels, H, W)``,
where ``image`` is the real target or a generated one. Layers: conv 4x4 stride 2 to ``ndf``
(no norm), then ``n_layers - 1`` convs stride 2 and one stride 1, doubling the width up to
``8 * ndf``, each followed by a norm, all with LeakyReLU(0.2); a last conv 4x4 stride 1 to one
channel. With ``n_layers = 3`` every output unit sees a 70x70 input patch, and a 256x256
input gives a 30x30 map. ``norm``:

- ``"affine_instance"`` (default): the released CEN discriminator's InstanceNorm, affine with
  running statistics (``nn.InstanceNorm2d(C, affine=True, track_running_stats=True)``), one
  module per layer shared by every branch. Training uses instance statistics; the running
  statistics are kept (as released) but used only in eval mode, where the discriminator never
  runs. The released code calls the norm once per branch, we once for the stacked branches,
  so the running statistics (not the outputs) differ from the released ones.
- ``"instance"``: non-affine InstanceNorm, pix2pix's instance setting (and the norm that
  checkpoints naming it in their discriminator config keep);
- ``"none"``.

Batch norm is not offered because it would mix the stacked branches.

The output is the map of *logits*: the sigmoid of the released network is folded into the
loss (``binary_cross_entropy_with_logits``), which is the same function, computed stably.
One discriminator serves all branches: their pairs travel stacked along the batch, and with
either norm each pair is judged independently of the others.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import Tensor, nn

__all__ = ["PatchDiscriminator", "PatchGANConfig", "create_patchgan"]

NORMS = ("affine_instance", "instance", "none")


@dataclass(frozen=True)
class PatchGANConfig:
    """Everything needed to rebuild a :class:`PatchDiscriminator` (saved inside checkpoints)."""

    in_channels: int = 6
    ndf: int = 64
    n_layers: int = 3
    norm: str = "affine_instance"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PatchGANConfig:
        return cls(**d)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "affine_instance":
        return nn.InstanceNorm2d(channels, affine=True, track_running_stats=True)
    return nn.InstanceNorm2d(channels) if kind == "instance" else nn.Identity()


class PatchDiscriminator(nn.Module):
    """PatchGAN: ``(N, in_channels, H, W)`` -> logits ``(N, 1, H', W')``.

    For ``n_layers = 3``: ``H' = H / 8 - 2`` (30 for 256).
    """

    def __init__(self, config: PatchGANConfig) -> None:
        super().__init__()
        if config.norm not in NORMS:
            raise ValueError(f"norm {config.norm!r}: expected one of {NORMS}")
        self.config = config
        ndf = config.ndf
        layers: list[nn.Module] = [
            nn.Conv2d(config.in_channels, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        width = ndf
        for i in range(1, config.n_layers + 1):
            out = ndf * min(2**i, 8)
            stride = 2 if i < config.n_layers else 1
            layers += [
                nn.Conv2d(width, out, 4, stride=stride, padding=1),
                _norm(config.norm, out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def create_patchgan(
    source_channels: int = 3,
    target_channels: int = 3,
    ndf: int = 64,
    n_layers: int = 3,
    norm: str = "affine_instance",
) -> PatchDiscriminator:
    """The 70x70 PatchGAN (defaults) judging ``cat(source, target)`` pairs."""
    return PatchDiscriminator(
        PatchGANConfig(source_channels + target_channels, ndf, n_layers, norm)
    )
