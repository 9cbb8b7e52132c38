"""Channel-exchanging fusion, independent of any task.

Modalities travel stacked along the batch dimension: a tensor ``(M*B, C, H, W)``, modality
major. Layers with weights (convolutions, linear layers) are shared and therefore need no
change: one call processes every modality. Normalisation layers are private: the modules here
view the batch as ``(M, B, C, H*W)`` and keep one set of statistics and affine parameters per
modality, stored as ``(M, C)`` tensors so that normalisation, exchange and the sparsity
penalty are single vectorised operations.

Exchange (CEN, Eq. 6): where ``|gamma_m[c]| < threshold``, modality ``m`` replaces its own
normalised channel ``c`` by the mean of the other modalities' normalised channel ``c``
(for two modalities exactly the other one's value). Gradients flow through the copy.

Sparsity: each exchanging norm's channels are cut into ``M`` disjoint contiguous parts; the
L1 penalty of modality ``m`` covers part ``m`` only.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AlphaEnsemble",
    "ExchangeStats",
    "ModalityBatchNorm2d",
    "ModalityInstanceNorm2d",
    "ModalityNorm",
    "convert",
    "exchange_stats",
    "exchanging_norms",
    "set_frozen_stats",
    "sparsity_penalty",
    "split_modalities",
    "stack_modalities",
]


def stack_modalities(inputs: Sequence[Tensor] | Tensor) -> Tensor:
    """Return the modality-major stacked batch ``(M*B, C, H, W)``.

    Accepts ``M`` tensors ``(B, C, H, W)``, a data loader's batch ``(B, M, C, H, W)``, or an
    already stacked ``(M*B, C, H, W)`` tensor (returned unchanged).
    """
    if isinstance(inputs, Tensor):
        if inputs.dim() == 5:
            return inputs.transpose(0, 1).reshape(-1, *inputs.shape[2:])
        return inputs
    return torch.cat(list(inputs), dim=0)


def split_modalities(x: Tensor, num_modalities: int) -> Tensor:
    """View a stacked batch ``(M*B, ...)`` as ``(M, B, ...)``."""
    if x.shape[0] % num_modalities:
        raise ValueError(
            f"stacked batch of {x.shape[0]} is not a multiple of {num_modalities} modalities"
        )
    return x.view(num_modalities, x.shape[0] // num_modalities, *x.shape[1:])


def _part_mask(num_modalities: int, num_channels: int) -> Tensor:
    """``(M, C)`` bool: modality ``m`` owns channels ``[m*C//M, (m+1)*C//M)``."""
    bounds = torch.arange(num_modalities + 1) * num_channels // num_modalities
    channel = torch.arange(num_channels)
    return (channel >= bounds[:-1, None]) & (channel < bounds[1:, None])


class ModalityNorm(nn.Module):
    """Shared part of the private norms: ``(M, C)`` affine parameters and the exchange.

    Subclasses normalise; the per-modality affine transform is one broadcast operation on the
    ``(M, B, C, H*W)`` view of the stacked batch, and the exchange one gather along its
    modality axis: for two modalities an exact copy of the other modality's channel, for
    more the mean of the others.
    """

    def __init__(
        self,
        num_features: int,
        num_modalities: int,
        eps: float,
        affine: bool,
        exchange: bool,
        threshold: float,
    ) -> None:
        super().__init__()
        if num_modalities < 1:
            raise ValueError("num_modalities must be >= 1")
        if exchange and num_modalities < 2:
            raise ValueError("channel exchange needs at least two modalities")
        if exchange and not affine:
            raise ValueError("channel exchange is driven by the affine scale; set affine=True")
        self.num_features = num_features
        self.num_modalities = num_modalities
        self.eps = eps
        self.exchange = exchange
        self.threshold = threshold
        if affine:
            self.weight = nn.Parameter(torch.ones(num_modalities, num_features))
            self.bias = nn.Parameter(torch.zeros(num_modalities, num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer(
            "penalty_mask", _part_mask(num_modalities, num_features), persistent=False
        )

    def exchange_mask(self) -> Tensor:
        """``(M, C)`` bool: channels that take the other modalities' values."""
        return self.weight.detach().abs() < self.threshold

    def _exchange(self, y: Tensor) -> Tensor:
        """Exchange in the ``(M, B, C, S)`` view; ``y`` is returned untouched without it."""
        if not self.exchange:
            return y
        mask = self.exchange_mask()
        m = self.num_modalities
        if m == 2:
            own = torch.arange(2, device=y.device)[:, None]
            source = torch.where(mask, 1 - own, own)
            return torch.gather(y, 0, source[:, None, :, None].expand_as(y))
        others = (y.sum(0, keepdim=True) - y) / (m - 1)
        return torch.where(mask[:, None, :, None], others, y)

    def _affine(self, xhat: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        """``xhat * scale + shift`` per modality and channel (``scale``, ``shift``: ``(M, C)``),
        then the exchange. ``xhat``: the stacked batch ``(M*B, C, H, W)``; same shape out."""
        m = self.num_modalities
        n, c, h, w = xhat.shape
        scale, shift = scale.to(xhat.dtype), shift.to(xhat.dtype)
        y = torch.addcmul(
            shift[:, None, :, None], xhat.view(m, n // m, c, h * w), scale[:, None, :, None]
        )
        return self._exchange(y).view(n, c, h, w)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, modalities={self.num_modalities}, eps={self.eps}, "
            f"exchange={self.exchange}, threshold={self.threshold}"
        )


class ModalityBatchNorm2d(ModalityNorm):
    """``M`` private BatchNorms over a modality-stacked batch ``(M*B, C, H, W)``.

    Each modality has its own running statistics and affine parameters, ``(M, C)`` each.
    With ``frozen_stats`` the running statistics are used and kept even in training mode,
    the setting of the paper for ImageNet-pretrained encoders (only gamma and beta learn).
    """

    def __init__(
        self,
        num_features: int,
        num_modalities: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        exchange: bool = False,
        threshold: float = 2e-2,
        frozen_stats: bool = False,
    ) -> None:
        super().__init__(num_features, num_modalities, eps, True, exchange, threshold)
        self.momentum = momentum
        self.frozen_stats = frozen_stats
        self.register_buffer("running_mean", torch.zeros(num_modalities, num_features))
        self.register_buffer("running_var", torch.ones(num_modalities, num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        m = self.num_modalities
        if not self.training or self.frozen_stats:
            scale = self.weight * torch.rsqrt(self.running_var + self.eps)
            return self._affine(x, scale, self.bias - self.running_mean * scale)
        # Batch statistics: one native BatchNorm per modality on its contiguous slice (a view
        # of the stack). Measured 2x faster on CPU than one call on a (B, M*C) transposed copy.
        y = torch.cat(
            [
                F.batch_norm(
                    part,
                    self.running_mean[i],
                    self.running_var[i],
                    self.weight[i],
                    self.bias[i],
                    training=True,
                    momentum=self.momentum,
                    eps=self.eps,
                )
                for i, part in enumerate(x.chunk(m))
            ]
        )
        self.num_batches_tracked.add_(1)
        n, c, h, w = x.shape
        return self._exchange(y.view(m, n // m, c, h * w)).view(n, c, h, w)

    @torch.no_grad()
    def load_from_batchnorm(self, bn: nn.BatchNorm2d) -> None:
        """Copy one BatchNorm's statistics and affine parameters into every modality."""
        if bn.affine:
            self.weight.copy_(bn.weight.expand_as(self.weight))
            self.bias.copy_(bn.bias.expand_as(self.bias))
        if bn.track_running_stats and bn.running_mean is not None:
            self.running_mean.copy_(bn.running_mean.expand_as(self.running_mean))
            self.running_var.copy_(bn.running_var.expand_as(self.running_var))
            self.num_batches_tracked.copy_(bn.num_batches_tracked)


class ModalityInstanceNorm2d(ModalityNorm):
    """Private affine InstanceNorm over a modality-stacked batch ``(M*B, C, H, W)``.

    Instance statistics never mix samples, so normalisation is one call for the whole stack;
    the affine parameters ``(M, C)`` and the exchange are per modality.
    """

    def __init__(
        self,
        num_features: int,
        num_modalities: int,
        eps: float = 1e-5,
        affine: bool = True,
        exchange: bool = False,
        threshold: float = 1e-2,
    ) -> None:
        super().__init__(num_features, num_modalities, eps, affine, exchange, threshold)

    def forward(self, x: Tensor) -> Tensor:
        xhat = F.instance_norm(x, eps=self.eps)
        if self.weight is None:
            return xhat
        return self._affine(xhat, self.weight, self.bias)


class AlphaEnsemble(nn.Module):
    """Final prediction ``sum_m softmax(alpha)_m * out_m``, ``alpha`` learnable, ones at start.

    As in the paper, the per-modality predictions are detached, so a loss on the ensemble
    trains only ``alpha``; ``detach=False`` lets it reach the network as well.
    """

    def __init__(self, num_modalities: int, detach: bool = True) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(num_modalities))
        self.detach = detach

    def forward(self, outs: Tensor) -> Tensor:
        """``outs``: ``(M, B, ...)`` per-modality predictions -> ``(B, ...)``."""
        if self.detach:
            outs = outs.detach()
        weights = torch.softmax(self.alpha, dim=0).to(outs.dtype)
        return torch.tensordot(weights, outs, dims=1)


def exchanging_norms(model: nn.Module) -> list[tuple[str, ModalityNorm]]:
    """The exchanging private norms of ``model`` with their qualified names, in order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ModalityNorm) and m.exchange]


def sparsity_penalty(model: nn.Module, lamda: float) -> Tensor:
    """``lamda * sum_m |gamma_m[part m]|_1`` over every exchanging norm (a scalar tensor).

    With ``lamda == 0`` it is an exact zero that adds nothing to the graph.
    """
    norms = exchanging_norms(model)
    if lamda == 0 or not norms:
        device = next(iter(model.parameters())).device
        return torch.zeros((), device=device)
    total = sum((norm.weight.abs() * norm.penalty_mask).sum() for _, norm in norms)
    return lamda * total


@dataclass(frozen=True)
class ExchangeStats:
    """Fraction of penalised gammas below threshold, per exchange point and overall."""

    per_point: dict[str, float]
    overall: float


@torch.no_grad()
def exchange_stats(model: nn.Module) -> ExchangeStats:
    """How far sparsity has gone: penalised gammas with ``|gamma| < threshold``.

    This grows during training as the L1 term pushes the penalised parts towards zero.
    """
    per_point: dict[str, float] = {}
    below = 0
    total = 0
    for name, norm in exchanging_norms(model):
        hits = int((norm.exchange_mask() & norm.penalty_mask).sum())
        count = int(norm.penalty_mask.sum())
        per_point[name] = hits / count
        below += hits
        total += count
    return ExchangeStats(per_point, below / total if total else 0.0)


def set_frozen_stats(model: nn.Module, frozen: bool = True) -> None:
    """Use and keep running statistics in every private BatchNorm, even in training mode."""
    for module in model.modules():
        if isinstance(module, ModalityBatchNorm2d):
            module.frozen_stats = frozen


ExchangeSelector = Sequence[str] | Callable[[str, nn.Module], bool]

RESNET_EXCHANGE_POINTS: tuple[str, ...] = ("layer*.*.bn2",)


def _matcher(exchange_at: ExchangeSelector) -> Callable[[str, nn.Module], bool]:
    if callable(exchange_at):
        return exchange_at
    patterns = [exchange_at] if isinstance(exchange_at, str) else list(exchange_at)
    return lambda name, _: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _private_norm(
    bn: nn.BatchNorm2d, num_modalities: int, exchange: bool, threshold: float
) -> ModalityBatchNorm2d:
    norm = ModalityBatchNorm2d(
        bn.num_features,
        num_modalities,
        eps=bn.eps,
        momentum=bn.momentum if bn.momentum is not None else 0.1,
        exchange=exchange,
        threshold=threshold,
    )
    norm.load_from_batchnorm(bn)
    return norm.to(device=bn.weight.device if bn.affine else None)


def convert(
    model: nn.Module,
    num_modalities: int,
    exchange_at: ExchangeSelector = RESNET_EXCHANGE_POINTS,
    threshold: float = 2e-2,
) -> nn.Module:
    """Turn a BatchNorm CNN into its CEN form, in place, and return it.

    Every ``nn.BatchNorm2d`` becomes a :class:`ModalityBatchNorm2d` holding its statistics
    and affine parameters copied into each of ``num_modalities`` modalities; those selected by
    ``exchange_at`` (``fnmatch`` patterns on qualified module names, or a predicate
    ``(name, module) -> bool``) also exchange channels below ``threshold``. All other layers
    stay shared. The converted model expects the modality-stacked batch ``(M*B, C, H, W)``.
    timm's ``BatchNormAct2d`` keeps its activation (and drop) after the private norm.

    The default points are the ``bn2`` of every block in ``layer1..4``: in ResNet
    bottlenecks, the BN after the 3x3 convolution, as in the paper. Tested with timm
    ``resnet*`` (basic and bottleneck blocks, torchvision layout) and ``resnext*``;
    other BatchNorm families convert but their exchange points must be given.
    """
    match = _matcher(exchange_at)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.BatchNorm2d) and name
    ]
    for name, bn in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        norm = _private_norm(bn, num_modalities, match(name, bn), threshold)
        act = getattr(bn, "act", None)
        if isinstance(act, nn.Module):
            replacement: nn.Module = nn.Sequential(norm, getattr(bn, "drop", nn.Identity()), act)
        else:
            replacement = norm
        setattr(parent, child, replacement)
    return model
