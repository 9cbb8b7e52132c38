"""Private norms over a modality-stacked batch, and the exchange that follows them.

Each modality keeps its own statistics and affine parameters, stored as ``(M, C)`` tensors.
Exchange (CEN, Eq. 6): where ``|gamma_m[c]| < threshold``, modality ``m`` replaces its own
normalised channel ``c`` by the mean of the other modalities' normalised channel ``c`` (for
two modalities exactly the other one's value). Gradients flow through the copy. Each norm's
channels are cut into ``M`` disjoint contiguous parts: modality ``m``'s sparsity penalty
covers part ``m`` only (:attr:`ModalityNorm.penalty_mask`).

The forward passes below are the reference computation, in plain tensor operations; where
those cost more, the norms hand the same computation to :mod:`cenfusion.fusion.fastpath`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cenfusion.arguments import check_count, check_non_negative
from cenfusion.errors import CenError
from cenfusion.fusion.fastpath import (
    ExchangePlan,
    NormCall,
    cache_key,
    exchange_plan,
    fold,
    folded_inference,
    private_norm_exchange,
    recorded,
    tracing,
)
from cenfusion.fusion.layout import per_channel, split_modalities

__all__ = ["ModalityBatchNorm2d", "ModalityInstanceNorm2d", "ModalityNorm", "set_frozen_stats"]


def part_mask(num_modalities: int, num_channels: int) -> Tensor:
    """``(M, C)`` bool: modality ``m`` owns channels ``[m*C//M, (m+1)*C//M)``."""
    bounds = torch.arange(num_modalities + 1) * num_channels // num_modalities
    channel = torch.arange(num_channels)
    return (channel >= bounds[:-1, None]) & (channel < bounds[1:, None])


class ModalityNorm(nn.Module):
    """Shared part of the private norms: ``(M, C)`` affine parameters and the exchange plan.

    The exchange is applied to the channels where some modality's ``|gamma|`` is below the
    threshold. A forward that can train ``gamma`` (gradients on, ``gamma`` trainable) finds
    them afresh and drops the cached ones, since a fused optimizer's step is no change torch
    counts; otherwise they are cached until the parameter changes (``load_state_dict``,
    ``.to()``, an in-place change under ``torch.no_grad()``), so inference pays for them
    once. A change through ``.data`` is not seen: torch does not count it as a change.
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
        check_count("num_features", num_features)
        check_count("num_modalities", num_modalities)
        check_non_negative("eps", eps)
        check_non_negative("threshold", threshold)
        if exchange and num_modalities < 2:
            raise CenError("channel exchange needs at least two modalities (exchange=False)")
        if exchange and not affine:
            raise CenError("channel exchange is driven by the affine scale; set affine=True")
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
            "penalty_mask", part_mask(num_modalities, num_features), persistent=False
        )
        self._plan_cache: tuple | None = None

    def exchange_mask(self) -> Tensor:
        """``(M, C)`` bool: channels that take the other modalities' values."""
        return self.weight.detach().abs() < self.threshold

    def exchange_plan(self) -> ExchangePlan | None:
        """Where channels are exchanged (:func:`~cenfusion.fusion.fastpath.exchange_plan`),
        cached while ``gamma`` and the threshold stay."""
        if not self.exchange:
            return None
        if torch.is_grad_enabled() and self.weight.requires_grad:
            self._plan_cache = None
            return exchange_plan(self.exchange_mask())
        weight = cache_key((self.weight,))
        if weight is None:
            return exchange_plan(self.exchange_mask())
        key = (weight, self.threshold, torch.is_inference_mode_enabled())
        if self._plan_cache is None or self._plan_cache[0] != key:
            self._plan_cache = (key, self.weight, exchange_plan(self.exchange_mask()))
        return self._plan_cache[2]

    def _check_input(self, x: Tensor, dims: int) -> None:
        """Refuse an input of another rank or channel count, as ``nn.BatchNorm2d`` does: the
        fast path would read and write past the ``(M, C)`` parameters and statistics. A trace
        (``torch.jit.trace``, ONNX export) fixes the shapes, and would warn at each check."""
        if torch.jit.is_tracing():
            return
        if x.dim() != dims or x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}): expected a {dims}-D input with "
                f"{self.num_features} channels, got shape {tuple(x.shape)}"
            )

    def _exchange(self, ys: Sequence[Tensor]) -> Tensor:
        """The exchange of the per-modality outputs ``ys`` (``M`` tensors ``(B, C, H, W)``),
        stacked into ``(M*B, C, H, W)``. Under ``torch.compile`` and tracing the mask is
        recomputed from gamma, as they cannot follow the cached plan."""
        if not self.exchange:
            return torch.cat(ys)
        if tracing():
            mask = self.exchange_mask()
        else:
            plan = self.exchange_plan()
            if plan is None:
                return torch.cat(ys)
            mask = plan.full_mask
        takes = per_channel(mask, ys[0].dim() - 2).unbind(0)
        if len(ys) == 2:
            others: Sequence[Tensor] = ys[::-1]
        else:
            total = sum(ys[1:], ys[0])
            others = [(total - y) / (len(ys) - 1) for y in ys]
        return torch.cat([torch.where(t, o, y) for t, o, y in zip(takes, others, ys)])

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, modalities={self.num_modalities}, eps={self.eps}, "
            f"exchange={self.exchange}, threshold={self.threshold}"
        )


class ModalityBatchNorm2d(ModalityNorm):
    """``M`` private BatchNorms over a modality-stacked batch ``(M*B, C, H, W)``.

    Each modality has its own running statistics and affine parameters, ``(M, C)`` each.
    ``momentum=None`` keeps a cumulative average, as in ``nn.BatchNorm2d``.
    With ``frozen_stats`` the running statistics are used and kept even in training mode,
    the setting of the paper for ImageNet-pretrained encoders (only gamma and beta learn).
    With batch statistics, each modality's statistics and running-statistics update are those
    of ``nn.BatchNorm2d``; with running statistics, normalisation and affine fold into one
    scale and shift per modality and channel.
    """

    def __init__(
        self,
        num_features: int,
        num_modalities: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
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
        self._fold_cache: tuple | None = None

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x, 4)
        batch_stats = self.training and not self.frozen_stats
        momentum = self.momentum
        if batch_stats or torch.is_grad_enabled():
            # the norm kernels and fused optimizers change tensors without a new version
            self._fold_cache = None
        if batch_stats:
            self.num_batches_tracked.add_(1)
            if momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        if recorded(x, self.num_modalities):
            if not (batch_stats or torch.is_grad_enabled() or tracing()):
                return self._inference(x)
            per_modality = zip(
                split_modalities(x, self.num_modalities).unbind(0),
                *(
                    t.unbind(0)
                    for t in (self.running_mean, self.running_var, self.weight, self.bias)
                ),
            )
            parts = [
                F.batch_norm(*args, batch_stats, momentum or 0.0, self.eps) for args in per_modality
            ]
            return self._exchange(parts)
        call = NormCall(
            "batch" if batch_stats else "running",
            (self.running_mean, self.running_var),
            momentum or 0.0,
            self.eps,
            self.exchange_plan(),
        )
        return private_norm_exchange(x, self.weight, self.bias, call)

    def _inference(self, x: Tensor) -> Tensor:
        """Running statistics without autograd: the fast path's one multiply-add with the
        statistics and affine parameters folded, cached while none of them changes."""
        sources = (self.weight, self.bias, self.running_mean, self.running_var)
        dims, stored = x.dim() - 2, cache_key(sources)
        if stored is None:
            folded = fold(*sources, self.eps, dims)
        else:
            key = (stored, self.eps, dims)
            if self._fold_cache is None or self._fold_cache[0] != key:
                self._fold_cache = (key, sources, fold(*sources, self.eps, dims))
            folded = self._fold_cache[2]
        return folded_inference(x, *folded, self.exchange_plan())

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

    Instance statistics never mix samples, so normalisation with each modality's affine
    parameters is one native call for the whole stack, followed by the exchange.
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
        self._check_input(x, 4)
        if self.weight is None:
            return F.instance_norm(x, eps=self.eps)
        if recorded(x, self.num_modalities):
            y = split_modalities(F.instance_norm(x, eps=self.eps), self.num_modalities)
            scale, shift = (per_channel(p[:, None], x.dim() - 2) for p in (self.weight, self.bias))
            return self._exchange(torch.addcmul(shift, y, scale).unbind(0))
        call = NormCall("instance", None, 0.0, self.eps, self.exchange_plan())
        return private_norm_exchange(x, self.weight, self.bias, call)


def set_frozen_stats(model: nn.Module, frozen: bool = True) -> None:
    """Use and keep running statistics in every private BatchNorm, even in training mode."""
    for module in model.modules():
        if isinstance(module, ModalityBatchNorm2d):
            module.frozen_stats = frozen
