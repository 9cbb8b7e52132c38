"""A per-modality reference of CEN RefineNet, computing the way the released system does.

Each modality is its own tensor in a Python list; every shared convolution is called once
per modality, each modality has its own ``nn.BatchNorm2d``, and after each bottleneck's
``bn2`` a channel whose ``|gamma_m| < threshold`` takes the other modality's value (the mean
of the others for more than two). The RefineNet decoder runs once per modality and a
``softmax(alpha)`` ensemble of the detached heads comes last.

It is built from a cenfusion :class:`CENRefineNet` (torchvision-layout ResNet encoder): the
convolutions are the model's own modules (shared, not copied) and each private BatchNorm is
made from one row of the model's ``(M, C)`` norm parameters and buffers, so the same weights
give the same outputs. ``cen bench`` times it beside cenfusion, after checking that both
compute the same function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cenfusion.fusion import ModalityBatchNorm2d, ModalityInstanceNorm2d, ModalityNorm
from cenfusion.models.refinenet import CENRefineNet, RefineStage, ResidualConvUnit

Tensors = list[Tensor]


class PrivateNorms(nn.Module):
    """One norm per modality (``norms``), then the masked-copy exchange if it exchanges: a
    channel whose ``|gamma_m| < threshold`` takes the other modality's value (the mean of
    the others for more than two)."""

    def __init__(self, norms: list[nn.Module], source: ModalityNorm) -> None:
        super().__init__()
        self.norms = nn.ModuleList(n.to(source.weight.device, source.weight.dtype) for n in norms)
        self.exchange = source.exchange
        self.threshold = source.threshold

    def forward(self, xs: Tensors) -> Tensors:
        ys = [norm(x) for norm, x in zip(self.norms, xs)]
        if not self.exchange:
            return ys
        outs = []
        for m, (norm, y) in enumerate(zip(self.norms, ys)):
            others = [ys[n] for n in range(len(ys)) if n != m]
            source = others[0] if len(others) == 1 else sum(others) / len(others)
            mask = (norm.weight.detach().abs() < self.threshold)[None, :, None, None]
            outs.append(torch.where(mask, source, y))
        return outs

    def sparsity(self) -> Tensor:
        """L1 of modality ``m``'s gammas on its own contiguous part ``m`` of the channels."""
        m, c = len(self.norms), self.norms[0].num_features
        bounds = [i * c // m for i in range(m + 1)]
        return sum(
            norm.weight[bounds[i] : bounds[i + 1]].abs().sum() for i, norm in enumerate(self.norms)
        )


def _copy_rows(norm: nn.Module, source: ModalityNorm, m: int, names: tuple[str, ...]) -> None:
    with torch.no_grad():
        for name in names:
            getattr(norm, name).copy_(getattr(source, name)[m])


class PrivateBatchNorm(PrivateNorms):
    """One ``nn.BatchNorm2d`` per modality, made from one row each of ``source``."""

    def __init__(self, source: ModalityBatchNorm2d) -> None:
        bns = []
        for m in range(source.num_modalities):
            bn = nn.BatchNorm2d(source.num_features, source.eps, source.momentum)
            _copy_rows(bn, source, m, ("weight", "bias", "running_mean", "running_var"))
            with torch.no_grad():
                bn.num_batches_tracked.copy_(source.num_batches_tracked)
            bns.append(bn)
        super().__init__(bns, source)
        self.frozen = source.frozen_stats

    def train(self, mode: bool = True) -> PrivateBatchNorm:
        super().train(mode)
        for bn in self.norms:
            bn.train(mode and not self.frozen)
        return self


class PrivateInstanceNorm(PrivateNorms):
    """One affine ``nn.InstanceNorm2d`` per modality, made from one row each of ``source``."""

    def __init__(self, source: ModalityInstanceNorm2d) -> None:
        norms = []
        for m in range(source.num_modalities):
            norm = nn.InstanceNorm2d(source.num_features, source.eps, affine=True)
            _copy_rows(norm, source, m, ("weight", "bias"))
            norms.append(norm)
        super().__init__(norms, source)


def reference_penalty(model: nn.Module, lamda: float) -> Tensor:
    """``lamda`` times the L1 of every exchanging norm's penalised gammas."""
    norms = [n for n in model.modules() if isinstance(n, PrivateNorms) and n.exchange]
    return lamda * sum(n.sparsity() for n in norms)


def each(module: Callable[[Tensor], Tensor], xs: Tensors) -> Tensors:
    """Call a shared module once per modality."""
    return [module(x) for x in xs]


def relu(xs: Tensors) -> Tensors:
    return [F.relu(x) for x in xs]


class ReferenceBottleneck(nn.Module):
    """A ResNet bottleneck over a list of modalities, sharing the block's convolutions."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        if not isinstance(block.drop_block, nn.Identity) or block.se is not None:
            raise ValueError("the reference covers plain torchvision-layout bottlenecks only")
        self.conv1, self.conv2, self.conv3 = block.conv1, block.conv2, block.conv3
        self.bn1, self.bn2, self.bn3 = (
            PrivateBatchNorm(b) for b in (block.bn1, block.bn2, block.bn3)
        )
        self.down_conv = block.downsample[0] if block.downsample is not None else None
        self.down_bn = PrivateBatchNorm(block.downsample[1]) if self.down_conv is not None else None

    def forward(self, xs: Tensors) -> Tensors:
        ys = relu(self.bn1(each(self.conv1, xs)))
        ys = relu(self.bn2(each(self.conv2, ys)))
        ys = self.bn3(each(self.conv3, ys))
        shortcut = xs if self.down_conv is None else self.down_bn(each(self.down_conv, xs))
        return [F.relu(y + s) for y, s in zip(ys, shortcut)]


class ReferenceEncoder(nn.Module):
    """Stem and the four ResNet layers; returns the four levels, each a list of modalities."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.conv1, self.bn1, self.maxpool = (
            encoder.conv1,
            PrivateBatchNorm(encoder.bn1),
            encoder.maxpool,
        )
        self.layers = nn.ModuleList(
            nn.Sequential(*(ReferenceBottleneck(b) for b in getattr(encoder, f"layer{i}")))
            for i in range(1, 5)
        )

    def forward(self, xs: Tensors) -> list[Tensors]:
        xs = each(self.maxpool, relu(self.bn1(each(self.conv1, xs))))
        levels = []
        for layer in self.layers:
            xs = layer(xs)
            levels.append(xs)
        return levels


def residual_unit(unit: ResidualConvUnit, x: Tensor) -> Tensor:
    """The RefineNet RCU adds the rectified input: ``relu(x) + conv2(relu(conv1(relu(x))))``."""
    x = F.relu(x)
    return x + unit.conv2(F.relu(unit.conv1(x)))


def chained_pool(convs: nn.ModuleList, x: Tensor) -> Tensor:
    top = x
    for conv in convs:
        top = conv(F.max_pool2d(top, 5, stride=1, padding=2))
        x = x + top
    return x


def refine_stage(stage: RefineStage, x: Tensor, deeper: Tensor | None, size) -> Tensor:
    x = stage.reduce(x)
    for unit in stage.rcu_in:
        x = residual_unit(unit, x)
    if stage.fuse is not None:
        x = stage.fuse(x) + deeper
    x = chained_pool(stage.crp.convs, F.relu(x))
    for unit in stage.rcu_out:
        x = residual_unit(unit, x)
    if stage.project is None:
        return x
    return F.interpolate(stage.project(x), size=size, mode="bilinear", align_corners=True)


class ReferenceCEN(nn.Module):
    """CEN RefineNet over a list of ``M`` tensors ``(B, 3, H, W)``; returns ``M + 1`` logits."""

    def __init__(self, model: CENRefineNet) -> None:
        super().__init__()
        self.encoder = ReferenceEncoder(model.encoder)
        self.stages = model.decoder.stages
        self.classifier = model.decoder.classifier
        self.dropout = nn.Dropout(model.decoder.dropout.p)
        self.alpha = model.ensemble.alpha
        self.detach = model.ensemble.detach

    def decode(self, l1: Tensor, l2: Tensor, l3: Tensor, l4: Tensor) -> Tensor:
        levels = [self.dropout(l4), self.dropout(l3), l2, l1]
        x = None
        for i, stage in enumerate(self.stages):
            size = tuple(levels[i + 1].shape[-2:]) if i + 1 < len(levels) else None
            x = refine_stage(stage, levels[i], x, size)
        return self.classifier(self.dropout(x))

    def forward(self, xs: Tensors) -> Tensors:
        levels = self.encoder(list(xs))
        outs = [self.decode(*feats) for feats in zip(*levels)]
        weights = torch.softmax(self.alpha, dim=0)
        ensemble = sum(w * (o.detach() if self.detach else o) for w, o in zip(weights, outs))
        return [*outs, ensemble]
