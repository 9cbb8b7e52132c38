"""Turn any BatchNorm CNN into its CEN form: shared layers, private norms, exchange points."""

from __future__ import annotations

import fnmatch
import re
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from cenfusion.arguments import check_non_negative
from cenfusion.errors import CenError
from cenfusion.fusion.norms import ModalityBatchNorm2d, ModalityNorm

__all__ = [
    "RESNET_EXCHANGE_POINTS",
    "ExchangePointsError",
    "ExchangeSelector",
    "ModalityBatchNormAct2d",
    "NoBatchNormError",
    "convert",
]


ExchangeSelector = Sequence[str] | Callable[[str, nn.Module], bool]

RESNET_EXCHANGE_POINTS: tuple[str, ...] = ("layer*.*.bn2",)


class ExchangePointsError(CenError):
    """Exchange points that select none of a model's BatchNorms."""


class NoBatchNormError(ExchangePointsError):
    """A model without any BatchNorm2d: not the exchange points' fault but the model's."""


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
    ``limit``, e.g. ``bn1, blocks.*.*.bn1, blocks.*.*.bn2``, then a few names as they are
    where indices were hidden (``e.g. 0.1, 0.4, 1.1``). The digits ending a part count as an
    index too (``denseblock*.denselayer*.norm2``), except in the norm's own name: its last
    part (``bn2``), or its last two when the last has no digits (RegNet's ``conv2.bn``)."""
    shaped = {n: _shape(n) for n in names}
    shapes = list(dict.fromkeys(shaped.values()))
    listed = ", ".join(shapes[:limit]) + (", ..." if len(shapes) > limit else "")
    hidden = [n for n, shape in shaped.items() if shape != n]
    return listed + (f" (e.g. {', '.join(hidden[:3])})" if hidden else "")


def _shape(name: str) -> str:
    """``name`` with its indices as ``*`` (see :func:`_name_shapes`)."""
    parts = name.split(".")
    own = 1 if re.search(r"\d", parts[-1]) or len(parts) == 1 else 2
    return ".".join(
        "*" if part.isdigit() else part if i >= len(parts) - own else re.sub(r"\d+$", "*", part)
        for i, part in enumerate(parts)
    )


def _check_selection(
    exchange_at: ExchangeSelector, names: Sequence[str], chosen: Sequence[str]
) -> None:
    """Refuse exchange points that select nothing: a pattern that matches none of the
    BatchNorms (a typo, or ResNet's points on another family) would silently train without
    exchange. ResNet's points on a model most of whose BatchNorms lie outside ``layer1..4``
    (HRNet has a ``layer1``) are refused too: they would exchange in a corner of it."""
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
    outside = [n for n in names if not n.startswith("layer")]
    resnets = not callable(exchange_at) and tuple(_patterns(exchange_at)) == RESNET_EXCHANGE_POINTS
    if resnets and len(outside) > len(names) / 2:
        raise ExchangePointsError(
            f"ResNet's exchange points {RESNET_EXCHANGE_POINTS[0]!r} match {len(chosen)} of "
            f"the model's {len(names)} BatchNorms, most of which lie outside layer1..4 (named "
            f"like {_name_shapes(outside)}): name this family's points"
        )


class ModalityBatchNormAct2d(ModalityBatchNorm2d):
    """The private form of timm's ``BatchNormAct2d``: the norm, then its dropout and
    activation, under the norm's own name (so state-dict keys and exchange points keep the
    names timm gives)."""

    def __init__(self, *args: Any, drop: nn.Module, act: nn.Module, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.drop = drop
        self.act = act
        self.register_load_state_dict_pre_hook(_unnest_keys)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


def _unnest_keys(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Read a checkpoint saved when the norm was the first module of a ``Sequential``."""
    for key in [k for k in state_dict if k.startswith(f"{prefix}0.")]:
        state_dict[prefix + key.removeprefix(f"{prefix}0.")] = state_dict.pop(key)


def _private_norm(
    bn: nn.BatchNorm2d, num_modalities: int, exchange: bool, threshold: float
) -> ModalityBatchNorm2d:
    """``bn``'s private form on its device, in its dtype and mode, its values in every
    modality, its parameters frozen where ``bn``'s are."""
    act = getattr(bn, "act", None)
    extra = {}
    if isinstance(act, nn.Module):
        extra = {"drop": getattr(bn, "drop", nn.Identity()), "act": act}
    kind = ModalityBatchNormAct2d if extra else ModalityBatchNorm2d
    norm = kind(
        bn.num_features,
        num_modalities,
        eps=bn.eps,
        momentum=bn.momentum,
        exchange=exchange,
        threshold=threshold,
        **extra,
    )
    norm.to(device=bn.weight.device, dtype=bn.weight.dtype).train(bn.training)
    norm.load_from_batchnorm(bn)
    norm.weight.requires_grad_(bn.weight.requires_grad)
    norm.bias.requires_grad_(bn.bias.requires_grad)
    return norm


def _private_kind(module: nn.Module) -> bool:
    """Whether ``module`` becomes a private norm: a BatchNorm2d with affine parameters (the
    exchange is driven by gamma) and running statistics (used at inference)."""
    return isinstance(module, nn.BatchNorm2d) and module.affine and module.track_running_stats


def _shared_norms(model: nn.Module) -> Counter[str]:
    """Normalisation layers of ``model`` that stay shared by the modalities, by kind."""
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    kinds: Counter[str] = Counter()
    for module in model.modules():
        kind = type(module).__name__
        if isinstance(module, nn.BatchNorm2d) and not module.affine:
            kinds[f"{kind} without affine parameters"] += 1
        elif isinstance(module, nn.BatchNorm2d) and not module.track_running_stats:
            kinds[f"{kind} without running statistics"] += 1
        elif (isinstance(module, norms) and not _private_kind(module)) or "FrozenBatchNorm" in kind:
            kinds[kind] += 1
    return kinds


def _listed(kinds: Counter[str]) -> str:
    return ", ".join(f"{count} {kind}" for kind, count in kinds.items())


def convert(
    model: nn.Module,
    num_modalities: int,
    exchange_at: ExchangeSelector = RESNET_EXCHANGE_POINTS,
    threshold: float = 2e-2,
) -> nn.Module:
    """Turn a BatchNorm CNN into its CEN form, in place, and return it.

    Every ``nn.BatchNorm2d`` (with affine parameters and running statistics) becomes a
    :class:`ModalityBatchNorm2d` holding its statistics and affine parameters copied into each
    of ``num_modalities`` modalities, on its device, in its dtype and in its training or
    evaluation mode; those selected by ``exchange_at`` (``fnmatch`` patterns on qualified
    module names, or a predicate ``(name, module) -> bool``) also exchange channels below
    ``threshold``. All other layers stay shared. The converted model expects the
    modality-stacked batch ``(M*B, C, H, W)``. timm's ``BatchNormAct2d`` becomes a
    :class:`ModalityBatchNormAct2d`, which keeps its activation (and drop) and its names.

    The default points are the ``bn2`` of every block in ``layer1..4``: in ResNet
    bottlenecks, the BN after the 3x3 convolution, as in the paper. Tested with timm
    ``resnet*`` (basic and bottleneck blocks, torchvision layout) and ``resnext*``;
    an untrained timm ResNet with basic blocks (ResNet-18/34) starts its ``bn2`` gammas at
    zero, so every channel of those points exchanges until they grow: from scratch, set them
    to one first, as :func:`~cenfusion.models.refinenet.create_cen_refinenet` does. Other
    BatchNorm families convert but their exchange points must be given (e.g.
    ``("blocks.*.*.bn2",)`` for EfficientNet and MobileNet: the BN after the depthwise
    convolution). Empty ``exchange_at`` exchanges nothing. Other normalisation layers
    (``SyncBatchNorm``, ``GroupNorm``, ``LayerNorm``, frozen BatchNorms, BatchNorms without
    affine parameters or running statistics, ...) stay shared, with a warning.

    Raises:
        ExchangePointsError: the model has no BatchNorm2d to make private; a pattern of
            ``exchange_at`` (or the predicate) selects none of its BatchNorms; or ResNet's
            points meet a model most of whose BatchNorms lie outside ``layer1..4``. The
            message shows the shapes of their names.
        CenError: an argument of the wrong kind, or a model that already holds private norms.
    """
    _check_arguments(model, num_modalities, exchange_at, threshold)
    match = _matcher(exchange_at)
    targets = [
        (name, module, match(name, module))
        for name, module in model.named_modules()
        if _private_kind(module) and name
    ]
    names = [name for name, _, _ in targets]
    if not names and _private_kind(model):
        raise ExchangePointsError(
            f"the model is itself a {type(model).__name__}: convert makes the norms inside a "
            "model private; for one norm, build cenfusion.ModalityBatchNorm2d"
        )
    if not names:
        shared = _shared_norms(model)
        kept = f" ({_listed(shared)} stay shared)" if shared else ""
        raise NoBatchNormError(
            f"the model has no BatchNorm2d to make private{kept}: channel exchange needs a "
            "BatchNorm CNN"
        )
    if exchange_at:
        chosen = [name for name, _, exchange in targets if exchange]
        _check_selection(exchange_at, names, chosen)
    private = {
        id(bn): _private_norm(bn, num_modalities, exchange, threshold)
        for _, bn, exchange in targets
    }
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if name and id(module) in private:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, private[id(module)])
    if shared := _shared_norms(model):
        warnings.warn(
            f"convert: {_listed(shared)} stay shared by the modalities (private norms are "
            "made of BatchNorm2d with affine parameters and running statistics)",
            stacklevel=2,
        )
    return model


def _check_arguments(
    model: nn.Module, num_modalities: int, exchange_at: ExchangeSelector, threshold: float
) -> None:
    """One line for arguments ``convert`` cannot use, before anything is changed."""
    if not isinstance(model, nn.Module):
        raise CenError(f"convert: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(num_modalities, bool) or not isinstance(num_modalities, int):
        raise CenError(f"convert: num_modalities={num_modalities!r}: expected an integer")
    if num_modalities < 1:
        raise CenError(f"convert: num_modalities={num_modalities}: expected at least 1")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise CenError(f"convert: threshold={threshold!r}: expected a number")
    check_non_negative("convert: threshold", threshold)
    if not callable(exchange_at):
        listed = [exchange_at] if isinstance(exchange_at, str) else exchange_at
        if not isinstance(listed, Sequence) or not all(isinstance(p, str) for p in listed):
            raise CenError(
                f"convert: exchange_at={exchange_at!r}: expected fnmatch patterns or a predicate"
            )
    if num_modalities < 2 and (callable(exchange_at) or exchange_at):
        raise CenError(
            f"convert: num_modalities={num_modalities}: channel exchange needs at least two "
            "modalities (exchange_at=() gives private norms alone)"
        )
    done = {type(m).__name__ for m in model.modules() if isinstance(m, ModalityNorm)}
    if done:
        raise CenError(
            f"convert: the model already holds private norms ({', '.join(sorted(done))}); "
            "convert the original model once"
        )
