"""The 5x5 stride-1 max pool of RefineNet's chained residual pooling.

On the CPU the pool is one operator, ``cenfusion::max_pool_5x5``, with its own backward
operator: eager mode runs the fastest native kernel for the input's layout, and
``torch.compile`` keeps both as calls to those kernels rather than generating its own loops
for the 5x5 window, which ran a compiled training step slower than eager.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = ["max_pool_5x5", "recomputed_max_pool_5x5"]

WINDOW, STRIDE, PADDING = [5, 5], [1, 1], [2, 2]


def max_pool_5x5(x: Tensor) -> Tensor:
    """``max_pool2d(x, 5, stride=1, padding=2)``, the same values in ``x``'s memory format.

    Under autograd the pool is recomputed in the backward pass instead of keeping an int64
    index per output value: those indices are twice the activation's own size and were the
    largest of the decoder's saved tensors; finding the maxima again costs little next to
    the convolutions around it. While tracing for export: PyTorch's own operator.
    """
    if torch.jit.is_tracing():
        return F.max_pool2d(x, 5, stride=1, padding=2)
    if x.device.type == "cpu":
        return torch.ops.cenfusion.max_pool_5x5(x)
    return recomputed_max_pool_5x5(x)


def recomputed_max_pool_5x5(x: Tensor) -> Tensor:
    """The pool off the CPU: PyTorch's operator, recomputed in the backward pass by
    activation checkpointing (which ``torch.compile`` traces into the same graph)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return checkpoint(F.max_pool2d, x, 5, 1, 2, use_reentrant=False, preserve_rng_state=False)
    return F.max_pool2d(x, 5, stride=1, padding=2)


def _layout(x: Tensor) -> torch.memory_format:
    """The memory format the pool's output (and its input's gradient) keeps."""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return (
        torch.channels_last if channels_last and not x.is_contiguous() else torch.contiguous_format
    )


def _onednn(x: Tensor) -> bool:
    """Whether to pool an NCHW tensor in oneDNN's own layout: the conversions and the pool
    take half the time of the channels-last path, and no int64 indices are written
    (PyTorch's CPU pool writes them even when nothing needs them). oneDNN passes over NaNs
    where PyTorch's pool propagates them; finite inputs give the same values."""
    return (
        x.dtype in (torch.float32, torch.bfloat16)
        and x.dim() == 4
        and x.is_contiguous()
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


@torch.library.custom_op("cenfusion::max_pool_5x5", mutates_args=(), schema="(Tensor x) -> Tensor")
def _pool(x: Tensor) -> Tensor:
    """The CPU pool. PyTorch's kernel is several times slower on an NCHW tensor than on a
    channels-last one (the 5x5 window then runs over contiguous channels), so an NCHW tensor
    that oneDNN cannot take is pooled in channels-last: the conversion costs less than it
    saves."""
    if _onednn(x):
        return torch.mkldnn_max_pool2d(x.to_mkldnn(), WINDOW, STRIDE, PADDING).to_dense()
    pooled = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 5, 1, 2)
    return pooled.contiguous(memory_format=_layout(x))


@torch.library.custom_op(
    "cenfusion::max_pool_5x5_backward", mutates_args=(), schema="(Tensor grad, Tensor x) -> Tensor"
)
def _pool_backward(grad: Tensor, x: Tensor) -> Tensor:
    """The gradient of :func:`_pool` at ``x``, the maxima found again, in channels-last."""
    x = x.contiguous(memory_format=torch.channels_last)
    _, indices = torch.ops.aten.max_pool2d_with_indices(x, WINDOW, STRIDE, PADDING)
    grad = grad.contiguous(memory_format=torch.channels_last)
    dilation, ceil_mode = [1, 1], False
    result = torch.ops.aten.max_pool2d_with_indices_backward(
        grad, x, WINDOW, STRIDE, PADDING, dilation, ceil_mode, indices
    )
    return result.contiguous(memory_format=torch.channels_last)


@_pool.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=_layout(x))


@_pool_backward.register_fake
def _(grad: Tensor, x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.channels_last)


def _save_input(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(inputs[0])


def _backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
    (x,) = ctx.saved_tensors
    return _pool_backward(grad, x).contiguous(memory_format=_layout(x))


_pool.register_autograd(_backward, setup_context=_save_input)
