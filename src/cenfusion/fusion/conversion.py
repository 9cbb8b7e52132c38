"""Turn any BatchNorm CNN into its CEN form: shared layers, private norms, exchange points."""

from __future__ import annotations

import fnmatch
import re
import warnings
from collections import Counter
from collections.abc import Callable, Sequence

from torch import nn

from cenfusion.errors import CenError
from cenfusion.fusion.norms import ModalityBatchNorm2d

__all__ = ["RESNET_EXCHANGE_POINTS", "ExchangePointsError", "ExchangeSelector", "convert"]


ExchangeSelector = Sequence[str] | Callable[[str, nn.Module], bool]

RESNET_EXCHANGE_POINTS: tuple[str, ...] = ("layer*.*.bn2",)


class ExchangePointsError(CenError):
    """Exchange points that select none of a model's BatchNorms."""


def _patterns(exchange_at: Sequence[str]) -> list[str]:
    """The ``fnmatch`` patterns of ``exchange_at`` (one pattern may come as a bare string)."""
    return [exchange_at] if isinstance(exchange_at, str) else list(exchange_at)


def _matcher(exchange_at: ExchangeSelector) -> Callable[[str, nn.Module], bool]:
    if callable(exchange_at):
        return exchange_at
    patterns = _patterns(exchange_at)
    return lambda name, _: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _name_shapes(names: Sequence[str], limit: int = 6) -> str:
    """The distinct shapes of ``names``, their numeric parts (indices) as ``*``: the first
    ``limit``, e.g. ``bn1, blocks.*.*.bn1, blocks.*.*.bn2``."""
    shapes = list(dict.fromkeys(re.sub(r"(?<![^.])\d+(?![^.])", "*", n) for n in names))
    return ", ".join(shapes[:limit]) + (", ..." if len(shapes) > limit else "")


def _check_selection(
    exchange_at: ExchangeSelector, names: Sequence[str], chosen: Sequence[str]
) -> None:
    """Refuse exchange points that select nothing: a pattern that matches none of the
    BatchNorms (a typo, or ResNet's points on another family) would silently train without
    exchange."""
    if not names:
        raise ExchangePointsError(
            "the model has no BatchNorm2d: channel exchange needs a BatchNorm CNN"
        )
    if callable(exchange_at):
        unmatched = None if chosen else "the selector"
    else:
        missed = [
            p for p in _patterns(exchange_at) if not any(fnmatch.fnmatchcase(n, p) for n in names)
        ]
        unmatched = f"exchange point {missed[0]!r}" if missed else None
    if unmatched is not None:
        raise ExchangePointsError(
            f"{unmatched} matches none of the model's {len(names)} BatchNorms, named like "
            f"{_name_shapes(names)}"
        )


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
    other BatchNorm families convert but their exchange points must be given (e.g.
    ``("blocks.*.*.bn2",)`` for EfficientNet and MobileNet: the BN after the depthwise
    convolution). Empty ``exchange_at`` exchanges nothing. Other normalisation layers
    (``SyncBatchNorm``, ``GroupNorm``, ``LayerNorm``, ...) stay shared, with a warning.

    Raises:
        ExchangePointsError: a pattern of ``exchange_at`` (or the predicate) selects none of the
            model's BatchNorms; the message shows the shapes of their names.
    """
    match = _matcher(exchange_at)
    targets = [
        (name, module, match(name, module))
        for name, module in model.named_modules()
        if isinstance(module, nn.BatchNorm2d) and name
    ]
    if exchange_at:
        names = [name for name, _, _ in targets]
        _check_selection(exchange_at, names, [name for name, _, chosen in targets if chosen])
    for name, bn, exchange in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        norm = _private_norm(bn, num_modalities, exchange, threshold)
        act = getattr(bn, "act", None)
        if isinstance(act, nn.Module):
            replacement: nn.Module = nn.Sequential(norm, getattr(bn, "drop", nn.Identity()), act)
        else:
            replacement = norm
        setattr(parent, child, replacement)
    _warn_of_shared_norms(model)
    return model


def _warn_of_shared_norms(model: nn.Module) -> None:
    """Warn of normalisation layers that stay shared by the modalities (CEN keeps every norm
    private; only ``nn.BatchNorm2d`` is converted)."""
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    kinds = Counter(type(m).__name__ for m in model.modules() if isinstance(m, norms))
    if kinds:
        listed = ", ".join(f"{count} {kind}" for kind, count in kinds.items())
        warnings.warn(
            f"convert: {listed} stay shared by the modalities (only BatchNorm2d becomes private)",
            stacklevel=3,
        )
