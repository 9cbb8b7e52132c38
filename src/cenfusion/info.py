"""``cen info CKPT`` / ``cen info --enc 101``: what a CEN model is and how far it exchanges.

Parameters, FLOPs of one forward pass at a given input size (counted by
``torch.utils.flop_counter.FlopCounterMode`` on meta tensors, so nothing is computed and a
ResNet-152 at 480x640 costs well under a second; a multiply-add counts as 2 FLOPs, and only
convolutions and matrix products are counted), modalities, classes, exchange points and the
fraction of each modality's penalised gammas under the threshold at every point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from cenfusion.data.class_names import resolve_class_names
from cenfusion.engine.checkpoint import load_checkpoint
from cenfusion.errors import CenError
from cenfusion.fusion import exchanging_norms
from cenfusion.reporting.exchange import exchange_record
from cenfusion.tasks import task_named

__all__ = [
    "ExchangePointInfo",
    "ModelInfo",
    "count_flops",
    "format_model_info",
    "info_for_encoder",
    "info_from_checkpoint",
    "model_info",
]


@dataclass(frozen=True)
class ExchangePointInfo:
    """One exchanging norm: its name, channels, threshold and, per modality, the fraction of
    that modality's penalised gammas with ``|gamma| < threshold``."""

    name: str
    channels: int
    threshold: float
    fractions: tuple[float, ...]


@dataclass(frozen=True)
class ModelInfo:
    """A summary of a CEN model. ``flops``: one forward pass of every modality at
    ``input_size`` (batch 1 per modality); ``classes``: class names (empty for translation);
    ``progress``: where the checkpoint's training stood, if it says; ``target``: the domain
    a translation model outputs, if known."""

    source: str
    task: str
    architecture: str
    parameters: int
    trainable_parameters: int
    input_size: tuple[int, int]
    flops: int
    modalities: tuple[str, ...]
    classes: tuple[str, ...]
    exchange_points: tuple[ExchangePointInfo, ...]
    exchange_overall: float
    progress: str | None = None
    target: str | None = None


def count_flops(model: nn.Module, num_modalities: int, size: tuple[int, int]) -> int:
    """FLOPs of ``model`` on a stacked batch ``(M, 3, H, W)``, counted on meta tensors.

    The model's own weights are left untouched: the forward runs through
    ``torch.func.functional_call`` with meta copies of every parameter and buffer, in eval
    mode (restored afterwards).
    """
    meta = {
        name: torch.empty_like(t, device="meta")
        for name, t in (*model.named_parameters(), *model.named_buffers())
    }
    x = torch.empty(num_modalities, 3, *size, device="meta")
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            functional_call(model, meta, (x,))
    except (ValueError, RuntimeError) as err:
        raise CenError(f"FLOPs at {size[0]}x{size[1]}: the model does not run ({err})") from err
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def model_info(
    model: nn.Module,
    size: tuple[int, int],
    modalities: Sequence[str] | None = None,
    classes: Sequence[str] = (),
    task: str = "segmentation",
    source: str = "",
    progress: str | None = None,
    target: str | None = None,
) -> ModelInfo:
    """Summarise ``model`` (any CEN network taking ``(M*B, 3, H, W)``) at input ``size``."""
    num_modalities = int(getattr(model, "num_modalities", 0)) or max(
        (norm.num_modalities for _, norm in exchanging_norms(model)), default=1
    )
    names = (
        tuple(modalities) if modalities else tuple(f"modality {m}" for m in range(num_modalities))
    )
    record = exchange_record(model)
    points = tuple(
        ExchangePointInfo(name, norm.num_features, norm.threshold, tuple(record["points"][name]))
        for name, norm in exchanging_norms(model)
    )
    config = getattr(model, "config", None)
    return ModelInfo(
        source=source,
        task=task,
        architecture=_architecture(config),
        parameters=sum(p.numel() for p in model.parameters()),
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        input_size=(int(size[0]), int(size[1])),
        flops=count_flops(model, num_modalities, size),
        modalities=names,
        classes=tuple(classes),
        exchange_points=points,
        exchange_overall=float(record["overall"]),
        progress=progress,
        target=target,
    )


def _architecture(config: Any) -> str:
    if config is None:
        return "unknown"
    if hasattr(config, "backbone"):
        return (
            f"CEN RefineNet, {config.backbone} encoder, decoder width {config.decoder_width}, "
            f"exchange at {', '.join(config.exchange_at) or 'none'}"
        )
    if hasattr(config, "num_downs"):
        return f"CEN U-Net, {config.num_downs} downsamplings, ngf {config.ngf}"
    return type(config).__name__


def _size(size: tuple[int, int] | int | None, default: tuple[int, int]) -> tuple[int, int]:
    if size is None:
        return default
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(height, width) < 1:
        raise CenError(f"--size {height} {width}: expected two positive numbers H W")
    return height, width


#: Class names ``cen info`` lists before it cuts the line short.
MAX_CLASSES_SHOWN = 60


def info_from_checkpoint(path: str | Path, size: tuple[int, int] | int | None = None) -> ModelInfo:
    """Summarise the model of a cenfusion checkpoint (segmentation or translation).

    ``size``: input ``(H, W)`` for the FLOPs; default: the task's (480x640 for segmentation,
    the run's crop squared for translation).

    Raises:
        CenError: not a readable cenfusion checkpoint, or of an unknown task.
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        raise CenError(
            f"{path}: an ONNX file; cen info reads cenfusion checkpoints (its metadata: "
            "onnx.load(path).metadata_props)"
        )
    state = load_checkpoint(path)
    task = task_named(state.get("task"), str(path))
    summary = task.summarize(state, str(path))
    modalities = summary.modalities
    if len(modalities) != summary.model.num_modalities:
        modalities = []
    return model_info(
        summary.model,
        _size(size, summary.default_size),
        modalities,
        summary.classes,
        task.name,
        str(path),
        summary.progress,
        summary.target,
    )


def info_for_encoder(
    depth: int = 101,
    num_classes: int = 40,
    num_modalities: int = 2,
    size: tuple[int, int] | int | None = None,
) -> ModelInfo:
    """Summarise a freshly built CEN RefineNet (``--enc 50/101/152``, random weights, so the
    exchange fractions are 0); classes named as NYUDv2-40 or SUN RGB-D-37 when they fit."""
    from cenfusion.models.refinenet import create_cen_refinenet
    from cenfusion.segmentation.task import INFO_SIZE

    model = create_cen_refinenet(
        depth=depth, num_classes=num_classes, num_modalities=num_modalities, pretrained=None
    )
    names = ("rgb", "depth") if num_modalities == 2 else None
    return model_info(
        model,
        _size(size, INFO_SIZE),
        names,
        resolve_class_names(num_classes),
        "segmentation",
        f"--enc {depth} (fresh weights)",
    )


def _si(value: float) -> str:
    """``value`` with a k / M / G / T suffix and four significant digits."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.4g} {suffix}"
    return f"{value:.4g}"


def format_model_info(info: ModelInfo) -> list[str]:
    """Text lines for a terminal: a summary, then one line per exchange point."""
    h, w = info.input_size
    parameters = _si(info.parameters)
    trainable = _si(info.trainable_parameters)
    count = len(info.modalities)
    inputs = f"{count} modalit{'y' if count == 1 else 'ies'} at {h}x{w}, batch 1"
    lines = [
        f"model: {info.source}",
        f"task: {info.task}",
        f"architecture: {info.architecture}",
        f"parameters: {parameters} ({trainable} trainable)",
        f"FLOPs: {_si(info.flops)}, {inputs}",
        f"modalities: {', '.join(info.modalities)}",
    ]
    if info.target:
        lines.append(f"target: {info.target}")
    if info.classes:
        shown = ", ".join(info.classes[:MAX_CLASSES_SHOWN])
        more = ", ..." if len(info.classes) > MAX_CLASSES_SHOWN else ""
        lines.append(f"classes ({len(info.classes)}): {shown}{more}")
    if info.progress:
        lines.append(f"training: {info.progress}")
    if not info.exchange_points:
        lines.append("exchange points: none")
        return lines
    lines.append(
        f"exchange points ({len(info.exchange_points)}): {100 * info.exchange_overall:.1f}% of "
        "penalised gammas under threshold overall"
    )
    width = max(len(p.name) for p in info.exchange_points)
    columns = [max(len(m), 7) for m in info.modalities]
    header = "  ".join(f"{m:>{c}}" for m, c in zip(info.modalities, columns))
    lines.append(f"  {'point':<{width}}  {'channels':>8}  {'threshold':>9}  {header}")
    for point in info.exchange_points:
        shares = "  ".join(f"{100 * f:{c - 1}.1f}%" for f, c in zip(point.fractions, columns))
        lines.append(
            f"  {point.name:<{width}}  {point.channels:>8}  {point.threshold:>9.3g}  {shares}"
        )
    return lines
