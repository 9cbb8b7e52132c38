"""Channel-exchanging fusion, independent of any task.

Modalities travel stacked along the batch dimension: a tensor ``(M*B, C, H, W)``, modality
major. Layers with weights (convolutions, linear layers) are shared and therefore need no
change: one call processes every modality. Normalisation layers are private: the modules here
view the batch as ``(M, B, C, H, W)`` and keep one set of statistics and affine parameters per
modality, stored as ``(M, C)`` tensors. Two implementations compute the same function, each
used where it costs less (``benchmarks/bench_fusion.py`` times them against a per-modality
loop):

- a custom autograd function, on the CPU for large planes, where memory passes dominate: the
  native kernels, one per modality (one for the whole stack with instance statistics), write
  into one stacked output; the exchange touches only the exchanged channels where they are
  few, and a hand-written backward does the same;
- operations that autograd records (one native norm and one exchange per modality, then a
  concatenation) for small planes, on GPUs and under ``torch.compile`` or tracing, where
  host time dominates or the custom function cannot run.

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
from typing import NamedTuple

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


def _cache_key(tensors: Sequence[Tensor]) -> tuple:
    """What a cache of values derived from ``tensors`` compares: each tensor's object,
    in-place version and storage (a move or a cast gives new storage). The cache must also
    hold the tensors, so that no new tensor can take a freed one's ``id`` and address."""
    return tuple((id(t), t._version, t.data_ptr()) for t in tensors)


class ExchangePlan(NamedTuple):
    """Where channels are exchanged, found once per value of the gammas."""

    full_mask: Tensor
    """``(M, C)`` which modalities take the others' value, per channel."""
    channels: Tensor | None
    """``(E,)`` channels where some modality does; found on the CPU only, where listing them
    needs no device synchronisation."""
    mask: Tensor | None
    """``(M, E)`` which modalities take them."""


def _exchange_subset(plan: ExchangePlan, x: Tensor) -> bool:
    """Whether to exchange only the planned channels rather than over the whole stack: when
    they are at most half of all and each channel's plane is contiguous (gathering channels
    that are the innermost axis, in channels-last, is slow)."""
    return 2 * len(plan.channels) <= x.shape[1] and not _channels_innermost(x)


def _per_channel(values: Tensor, spatial: int) -> Tensor:
    """``values`` (last axis: channels) with ``spatial`` unit axes appended, to broadcast
    against tensors whose channel axis is followed by that many spatial axes."""
    return values.view(*values.shape, *([1] * spatial))


def _mix(y: Tensor, mask: Tensor, out: Tensor) -> Tensor:
    """The exchange of stacked values ``y`` ``(M, B, E, ...)`` into ``out`` (returned): where
    ``mask`` ``(M, E)`` is set, a modality takes the others' value (for two modalities an
    exact copy, else their mean). One elementwise pass per modality on its ``(B, E, ...)``
    slice, whose layout the kernels handle well whatever the memory format."""
    takes, ys, outs = _per_channel(mask, y.dim() - 3).unbind(0), y.unbind(0), out.unbind(0)
    m = len(ys)
    if m > 2:
        mean_all = ys[0] / (m - 1)
        for i in range(1, m):
            mean_all.add_(ys[i], alpha=1 / (m - 1))
    for i in range(m):
        others = ys[1 - i] if m == 2 else torch.add(mean_all, ys[i], alpha=-1 / (m - 1))
        torch.where(takes[i], others, ys[i], out=outs[i])
    return out


def _mix_grad(grad: Tensor, mask: Tensor, out: Tensor) -> Tensor:
    """Gradient of :func:`_mix` into ``out`` (returned): each output's gradient goes back to
    the modalities that provided its value. ``grad``: ``(M, B, E, ...)``, ``mask``: ``(M, E)``.

    With ``shared`` the gradient given away, ``sum_i mask_i * grad_i / (M - 1)``, a modality
    receives ``shared - grad / (M - 1)`` where it took the others' value and
    ``shared + grad`` where it kept its own: one pass for ``shared``, one for the result."""
    m, spatial = grad.shape[0], grad.dim() - 3
    share = _per_channel(mask.to(grad.dtype) / (m - 1), spatial)
    coeff = torch.where(_per_channel(mask, spatial), -share, 1)
    shared = grad[0] * share[0]
    for i in range(1, m):
        shared.addcmul_(grad[i], share[i])
    for i in range(m):
        torch.addcmul(shared, grad[i], coeff[i], out=out[i])
    return out


def _channels_innermost(x: Tensor) -> bool:
    """Whether channels are ``x``'s innermost axis in memory (channels-last layout)."""
    return x.shape[1] > 1 and x.stride(1) == 1


def _batch_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    running: tuple[Tensor, Tensor],
    batch_stats: bool,
    momentum: float,
    eps: float,
    out: Tensor,
) -> tuple[Tensor, Tensor]:
    """Private BatchNorms of ``x`` ``(M, B, C, H, W)`` into ``out``, one native kernel per
    modality. With ``batch_stats`` the running statistics are updated exactly as in
    ``nn.BatchNorm2d`` and the saved ``(M, C)`` batch mean and invstd are returned; otherwise
    each kernel applies its modality's statistics and affine parameters folded into one scale
    and shift per channel, and the running statistics are returned."""
    if batch_stats:
        stats = tuple(torch.empty((2, *weight.shape), dtype=weight.dtype, device=x.device))
        saved = zip(stats[0].unbind(0), stats[1].unbind(0))
    else:
        stats = running
        unused = torch.empty(0, dtype=weight.dtype, device=x.device)
        saved = ((unused, unused) for _ in range(x.shape[0]))
    per_modality = zip(
        x.unbind(0), weight.unbind(0), bias.unbind(0), *(r.unbind(0) for r in running)
    )
    for (xi, wi, bi, mean_i, var_i), oi, (save_mean, save_invstd) in zip(
        per_modality, out.unbind(0), saved
    ):
        torch.ops.aten.native_batch_norm.out(
            xi,
            wi,
            bi,
            mean_i,
            var_i,
            batch_stats,
            momentum,
            eps,
            out=oi,
            save_mean=save_mean,
            save_invstd=save_invstd,
        )
    return stats


def _batch_norm_grad(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    stats: tuple[Tensor, Tensor],
    batch_stats: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """BatchNorm backward per modality on ``(M, B, C, ...)`` stacks. ``stats``: the saved
    batch ``(mean, invstd)``, or ``(running_mean, running_var)`` when they were used;
    ``(M, C)`` each. Returns the gradients of ``x`` (stacked), ``weight`` and ``bias``.

    The native kernels only reduce, for the parameters' gradients; the input gradient is
    then affine in the incoming gradient and the input per modality and channel, written
    straight into the stack (the kernels' ``.out`` forms compute elsewhere and copy). Half
    precision with batch statistics keeps the native kernels, which subtract the mean in
    float32 before that affine form would lose it."""
    grad_x = torch.empty_like(x)
    per_modality = zip(grad.unbind(0), x.unbind(0), weight.unbind(0), *(s.unbind(0) for s in stats))
    if batch_stats and grad.dtype != weight.dtype:
        grad_weight, grad_bias = torch.empty(
            (2, *weight.shape), dtype=weight.dtype, device=x.device
        )
        outs = zip(grad_x.unbind(0), grad_weight.unbind(0), grad_bias.unbind(0))
        for (gi, xi, wi, *pair), (gxi, gwi, gbi) in zip(per_modality, outs):
            torch.ops.aten.native_batch_norm_backward.out(
                gi,
                xi,
                wi,
                None,
                None,
                *pair,
                True,
                eps,
                [True, True, True],
                out0=gxi,
                out1=gwi,
                out2=gbi,
            )
        return grad_x, grad_weight, grad_bias
    affine_grads = [
        torch.ops.aten.native_batch_norm_backward(
            gi,
            xi,
            wi,
            *((None, None, *pair) if batch_stats else (*pair, None, None)),
            batch_stats,
            eps,
            [False, True, True],
        )[1:]
        for gi, xi, wi, *pair in per_modality
    ]
    grad_weight, grad_bias = (torch.stack(g) for g in zip(*affine_grads))
    spatial = x.dim() - 3
    invstd = stats[1] if batch_stats else torch.rsqrt(stats[1] + eps)
    scale = weight * invstd
    if not batch_stats:
        scale = _per_channel(scale.to(grad.dtype), spatial)
        for gi, si, gxi in zip(grad.unbind(0), scale.unbind(0), grad_x.unbind(0)):
            torch.mul(gi, si, out=gxi)
        return grad_x, grad_weight, grad_bias
    count = x[0].numel() // x.shape[2]
    of_x = -scale * invstd * grad_weight / count
    shift = -(scale * grad_bias / count) - of_x * stats[0]
    coefficients = (_per_channel(k, spatial).unbind(0) for k in (scale, of_x, shift))
    for gi, xi, gxi, si, ki, bi in zip(
        grad.unbind(0), x.unbind(0), grad_x.unbind(0), *coefficients
    ):
        torch.addcmul(bi, xi, ki, out=gxi).addcmul_(gi, si)
    return grad_x, grad_weight, grad_bias


def _instance_norm(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, out: Tensor
) -> tuple[Tensor, Tensor]:
    """Private affine InstanceNorm of a contiguous ``x`` ``(M, B, C, ...)`` into ``out``: one
    native BatchNorm over the ``(1, M*B*C, ...)`` view, every (sample, channel) its own group
    with its modality's affine parameters. Returns the saved ``(M, B, C)`` mean and invstd."""
    m, b, c = x.shape[:3]
    mean = torch.empty((m, b, c), dtype=weight.dtype, device=x.device)
    invstd = torch.empty_like(mean)
    torch.ops.aten.native_batch_norm.out(
        x.view(1, m * b * c, -1),
        weight[:, None].expand(m, b, c).reshape(-1),
        bias[:, None].expand(m, b, c).reshape(-1),
        None,
        None,
        True,
        0.0,
        eps,
        out=out.view(1, m * b * c, -1),
        save_mean=mean.view(-1),
        save_invstd=invstd.view(-1),
    )
    return mean, invstd


def _instance_norm_grad(
    grad: Tensor, x: Tensor, weight: Tensor, stats: tuple[Tensor, Tensor], eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`_instance_norm`; ``stats``: its ``(M, B, C)`` mean and invstd."""
    m, b, c = x.shape[:3]
    grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
        grad.reshape(1, m * b * c, -1),
        x.reshape(1, m * b * c, -1),
        weight[:, None].expand(m, b, c).reshape(-1),
        None,
        None,
        stats[0].reshape(-1),
        stats[1].reshape(-1),
        True,
        eps,
        [True, True, True],
    )
    return grad_x.view(x.shape), grad_weight.view(m, b, c).sum(1), grad_bias.view(m, b, c).sum(1)


class _NormCall(NamedTuple):
    """What one call of a private norm needs besides its input and affine parameters."""

    mode: str
    """``"batch"`` (BatchNorm with batch statistics), ``"running"`` (running statistics) or
    ``"instance"``."""
    running: tuple[Tensor, Tensor] | None
    """The running ``(mean, var)``, ``(M, C)`` each; ``None`` for instance statistics."""
    momentum: float
    eps: float
    plan: ExchangePlan | None


def _norm_exchange(
    x: Tensor, weight: Tensor, bias: Tensor, call: _NormCall
) -> tuple[Tensor, tuple[Tensor, Tensor], str | None]:
    """Private norm, affine and exchange of a stacked batch ``x`` ``(M*B, C, H, W)``.

    The norm runs in native kernels straight into one stacked tensor; the exchange then
    touches only the planned channels, in place (``"subset"``), or runs over the whole stack
    into a new one (``"dense"``). Returns the output, the statistics the backward needs and
    the exchange done (``None`` if none)."""
    mode, running, momentum, eps, plan = call
    if mode == "instance":
        x = x.contiguous()
    m = weight.shape[0]
    out = torch.empty_like(x)
    x5, out5 = split_modalities(x, m), split_modalities(out, m)
    if mode == "instance":
        stats = _instance_norm(x5, weight, bias, eps, out5)
    else:
        stats = _batch_norm(x5, weight, bias, running, mode == "batch", momentum, eps, out5)
    if plan is None:
        return out, stats, None
    if _exchange_subset(plan, x):
        part = out5.index_select(2, plan.channels)
        out5.index_copy_(2, plan.channels, _mix(part, plan.mask, torch.empty_like(part)))
        return out, stats, "subset"
    mixed = torch.empty_like(out)
    _mix(out5, plan.full_mask, split_modalities(mixed, m))
    return mixed, stats, "dense"


class _PrivateNormExchange(torch.autograd.Function):
    """:func:`_norm_exchange` with a hand-written backward that follows the same path."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        call: _NormCall,
    ) -> Tensor:
        out, stats, ctx.exchange = _norm_exchange(x, weight, bias, call)
        plan = call.plan
        if ctx.exchange == "dense":
            ctx.save_for_backward(x, weight, *stats, plan.full_mask)
        elif ctx.exchange == "subset":
            ctx.save_for_backward(x, weight, *stats, plan.channels, plan.mask)
        else:
            ctx.save_for_backward(x, weight, *stats)
        ctx.mode, ctx.eps = call.mode, call.eps
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple:  # type: ignore[override]
        x, weight, mean, second, *plan = ctx.saved_tensors
        m = weight.shape[0]
        x5, grad5 = split_modalities(x, m), grad.reshape(m, -1, *grad.shape[1:])

        def norm_grad(g: Tensor, inputs: Tensor, w: Tensor, s: tuple[Tensor, Tensor]) -> tuple:
            if ctx.mode == "instance":
                return _instance_norm_grad(g, inputs, w, s, ctx.eps)
            return _batch_norm_grad(g, inputs, w, s, ctx.mode == "batch", ctx.eps)

        if ctx.exchange == "dense":
            grad5 = _mix_grad(grad5, plan[0], torch.empty_like(x5, dtype=grad.dtype))
        grad_x, grad_weight, grad_bias = norm_grad(grad5, x5, weight, (mean, second))
        if ctx.exchange == "subset":
            channels, mask = plan
            given = grad5.index_select(2, channels)
            part = norm_grad(
                _mix_grad(given, mask, torch.empty_like(given)),
                x5.index_select(2, channels),
                weight[:, channels],
                (mean.index_select(-1, channels), second.index_select(-1, channels)),
            )
            grad_x.index_copy_(2, channels, part[0])
            grad_weight[:, channels] = part[1]
            grad_bias[:, channels] = part[2]
        return grad_x.view(x.shape), grad_weight, grad_bias, None


def _private_norm_exchange(x: Tensor, weight: Tensor, bias: Tensor, call: _NormCall) -> Tensor:
    """:func:`_norm_exchange`, through the autograd function only when a gradient is wanted
    (its bookkeeping costs more host time than the kernels of a small inference step)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _PrivateNormExchange.apply(x, weight, bias, call)
    return _norm_exchange(x, weight, bias, call)[0]


class ModalityNorm(nn.Module):
    """Shared part of the private norms: ``(M, C)`` affine parameters and the exchange plan.

    The exchange is applied to the channels where some modality's ``|gamma|`` is below the
    threshold, found once per value of ``gamma`` (cached until the parameter changes: an
    optimizer step, ``load_state_dict``, ``.to()``), so inference pays for it once.
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
        self._plan_cache: tuple | None = None

    def exchange_mask(self) -> Tensor:
        """``(M, C)`` bool: channels that take the other modalities' values."""
        return self.weight.detach().abs() < self.threshold

    def exchange_plan(self) -> ExchangePlan | None:
        """Where channels are exchanged; ``None`` when nowhere. Off the CPU the channels are not
        listed (that would wait for the device once per training step and exchange point), and
        the plan is never ``None``: the exchange runs over the whole stack."""
        if not self.exchange:
            return None
        key = (_cache_key((self.weight,)), self.threshold)
        if self._plan_cache is None or self._plan_cache[0] != key:
            mask = self.exchange_mask()
            if mask.device.type == "cpu":
                channels = mask.any(0).nonzero().flatten()
                plan = ExchangePlan(mask, channels, mask[:, channels]) if len(channels) else None
            else:
                plan = ExchangePlan(mask, None, None)
            self._plan_cache = (key, self.weight, plan)
        return self._plan_cache[2]

    def _recorded_exchange(self, ys: Sequence[Tensor]) -> Tensor:
        """The exchange of the per-modality outputs ``ys`` (``M`` tensors ``(B, C, H, W)``) in
        tensor operations that autograd records, stacked into ``(M*B, C, H, W)``: the path of
        :func:`_recorded`. Under ``torch.compile`` and tracing, the mask is recomputed from
        gamma, as they cannot follow the cached plan."""
        if not self.exchange:
            return torch.cat(ys)
        if tracing():
            mask = self.exchange_mask()
        else:
            plan = self.exchange_plan()
            if plan is None:
                return torch.cat(ys)
            mask = plan.full_mask
        takes = _per_channel(mask, ys[0].dim() - 2).unbind(0)
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


def tracing() -> bool:
    """Under ``torch.compile`` or tracing (ONNX export), which cannot follow the cached plan,
    run the custom autograd function or export oneDNN's own layouts."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


_CUSTOM_MIN_PLANE = 1024
"""Fewest values per channel and modality (batch x height x width) for which the custom
function beats the recorded operations on the CPU (``benchmarks/bench_fusion.py``)."""


def _recorded(x: Tensor, num_modalities: int) -> bool:
    """Whether the private norms compute with tensor operations that autograd records, one
    norm and one exchange per modality and a concatenation, rather than the custom function.
    While :func:`tracing`, and off the CPU (the ``meta`` device of FLOP counting included),
    because the custom function needs the CPU's listed plan. And for small planes: there the
    step is bound by host time, and the recorded operations, whose backward runs in the
    autograd engine, cost less of it than the custom function, whose backward runs in
    Python. Steps on a GPU at the usual batch sizes are bound by host time too."""
    return (
        x.device.type != "cpu"
        or tracing()
        or x.numel() < _CUSTOM_MIN_PLANE * x.shape[1] * num_modalities
    )


class ModalityBatchNorm2d(ModalityNorm):
    """``M`` private BatchNorms over a modality-stacked batch ``(M*B, C, H, W)``.

    Each modality has its own running statistics and affine parameters, ``(M, C)`` each.
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
        self._fold_cache: tuple | None = None

    def forward(self, x: Tensor) -> Tensor:
        batch_stats = self.training and not self.frozen_stats
        if batch_stats:
            self.num_batches_tracked.add_(1)
        if _recorded(x, self.num_modalities):
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
                F.batch_norm(*args, batch_stats, self.momentum, self.eps) for args in per_modality
            ]
            return self._recorded_exchange(parts)
        call = _NormCall(
            "batch" if batch_stats else "running",
            (self.running_mean, self.running_var),
            self.momentum,
            self.eps,
            self.exchange_plan(),
        )
        return _private_norm_exchange(x, self.weight, self.bias, call)

    def _folded_affine(self, spatial: int) -> tuple[Tensor, Tensor]:
        """The running statistics and affine parameters as one scale and shift per modality
        and channel, ``y = scale * x + shift``, shaped ``(M, 1, C)`` plus ``spatial`` unit
        axes to broadcast against the modality-split input; cached while none of them
        changes."""
        sources = (self.weight, self.bias, self.running_mean, self.running_var)
        key = (_cache_key(sources), self.eps, spatial)
        if self._fold_cache is None or self._fold_cache[0] != key:
            with torch.no_grad():
                scale = self.weight * torch.rsqrt(self.running_var + self.eps)
                shift = self.bias - self.running_mean * scale
            shaped = (_per_channel(t[:, None], spatial) for t in (scale, shift))
            self._fold_cache = (key, sources, *shaped)
        return self._fold_cache[2], self._fold_cache[3]

    def _inference(self, x: Tensor) -> Tensor:
        """Running statistics without autograd on the recorded path: one multiply-add over
        the whole stack, in ``x``'s dtype and layout, then the exchange; one kernel where the
        per-modality norms launch ``M`` and a concatenation (a GPU step at small batch is
        bound by launches, and by the host's work per operator)."""
        scale, shift = self._folded_affine(x.dim() - 2)
        x5 = split_modalities(x, self.num_modalities)
        y = torch.addcmul(shift, x5, scale, out=torch.empty_like(x5))
        plan = self.exchange_plan()
        if plan is not None:
            y = _mix(y, plan.full_mask, torch.empty_like(y))
        return y.view(x.shape)

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
        if self.weight is None:
            return F.instance_norm(x, eps=self.eps)
        if _recorded(x, self.num_modalities):
            y = split_modalities(F.instance_norm(x, eps=self.eps), self.num_modalities)
            scale, shift = (_per_channel(p[:, None], x.dim() - 2) for p in (self.weight, self.bias))
            return self._recorded_exchange(torch.addcmul(shift, y, scale).unbind(0))
        call = _NormCall("instance", None, 0.0, self.eps, self.exchange_plan())
        return _private_norm_exchange(x, self.weight, self.bias, call)


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
