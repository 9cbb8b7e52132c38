"""CEN RefineNet to ONNX, for :class:`~cenfusion.segmentation.onnx_segmenter.OnnxSegmenter`
(onnxruntime) and any other ONNX runtime.

The exported graph takes **one input per modality**, named after the modality (``rgb``,
``depth``, ...), each ``(B, 3, H, W)`` float32, normalised exactly as for the torch model;
it stacks them along the batch inside the graph, so a deployment feeds its images as they
come. Outputs are logits ``(B, K, ceil(H/4), ceil(W/4))``: ``<modality>_logits`` per head
then ``ensemble`` (``heads="all"``), or ``ensemble`` alone (``heads="ensemble"``). The batch
size is always free; ``dynamic=True`` frees height and width too.

The model is exported in eval mode, where every private BatchNorm is a fixed per-modality
affine map and the exchange masks depend only on the (now constant) gammas: constant
folding turns them into fixed gather indices, so the graph holds no data-dependent
control flow. The TorchScript exporter is used: it exports an order of magnitude faster than
the ``torch.export`` one (``dynamo=True``), with the same outputs.

The file carries metadata (modality names, heads, class count, the model config, the kinds,
depth scale and run settings when known) that
:class:`~cenfusion.segmentation.onnx_segmenter.OnnxSegmenter` reads back. ``onnx`` and
``onnxruntime`` are an optional extra: ``pip install cenfusion[onnx]``.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cenfusion.engine.files import atomic_write, refuse_overwriting
from cenfusion.engine.run import RuntimeConfig
from cenfusion.engine.runtime import out_of_memory
from cenfusion.errors import CenError
from cenfusion.models.refinenet import CENRefineNet
from cenfusion.segmentation.modelio import is_onnx, load_segmenter
from cenfusion.segmentation.onnx_segmenter import METADATA_PREFIX, OnnxSegmenter, require

HEADS = ("all", "ensemble")
#: The ensemble's weighted sum (``tensordot``, exported as ``Einsum``) needs opset 12; 20 is
#: the TorchScript exporter's last.
MIN_OPSET, MAX_OPSET = 12, 20
DEFAULT_OPSET = 17


def default_modality_names(num_modalities: int) -> tuple[str, ...]:
    """``rgb, depth`` for two modalities (the NYUDv2 order), else ``input0, input1, ...``."""
    if num_modalities == 2:
        return ("rgb", "depth")
    return tuple(f"input{m}" for m in range(num_modalities))


class _ExportGraph(nn.Module):
    """The traced function: ``M`` inputs ``(B, 3, H, W)`` -> the selected heads' logits."""

    def __init__(self, model: CENRefineNet, ensemble_only: bool) -> None:
        super().__init__()
        self.model = model
        self.ensemble_only = ensemble_only

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        heads = self.model.forward_stacked(torch.cat(inputs, dim=0))
        ensemble = self.model.ensemble(heads)
        if self.ensemble_only:
            return (ensemble,)
        return (*heads.unbind(0), ensemble)


def _check_export_arguments(
    heads: str, height: int, width: int, opset: int, names: Sequence[str], num_modalities: int
) -> None:
    if heads not in HEADS:
        raise CenError(f"--heads {heads}: expected one of {', '.join(HEADS)}")
    if height < 1 or width < 1:
        raise CenError(f"--size {height} {width}: expected two positive numbers H W")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise CenError(f"--opset {opset}: expected {MIN_OPSET}..{MAX_OPSET}")
    if len(names) != num_modalities or len(set(names)) != len(names):
        raise CenError(
            f"modalities {list(names)}: the model takes {num_modalities} distinct modality names"
        )
    if "ensemble" in names:
        raise CenError("modality name 'ensemble' is taken by the ensemble output")


def _check_out_path(out_path: Path) -> None:
    """Refuse, before the export's work, a path that cannot become the file."""
    if out_path.is_dir():
        raise CenError(f"{out_path}: a folder, expected the ONNX file to write")
    existing = next((p for p in out_path.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise CenError(f"{out_path}: {existing} is a file, expected a folder (made if missing)")


def export_onnx(
    model: CENRefineNet,
    out_path: str | Path,
    *,
    heads: str = "all",
    height: int = 480,
    width: int = 640,
    dynamic: bool = False,
    opset: int = DEFAULT_OPSET,
    modalities: Sequence[str] | None = None,
    depth_scale: float | None = None,
    kinds: Sequence[str] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` as an ONNX file at ``out_path`` and return the path.

    ``height``/``width``: the input size the graph is fixed to (traced at, with ``dynamic``).
    ``modalities``: input names in the model's modality order (default
    :func:`default_modality_names`). ``depth_scale`` and ``kinds``: the factor of the raw
    depth values and each modality's kind the model was trained with, stored for ``cen seg
    predict`` (``None``: not stored); ``settings``: the run's, for ``cen seg eval`` of the
    file as of its checkpoint. The model's train/eval mode is restored afterwards.
    """
    names = tuple(modalities or default_modality_names(model.num_modalities))
    _check_export_arguments(heads, height, width, opset, names, model.num_modalities)
    step = model.size_multiple
    if height % step or width % step:
        raise CenError(
            f"--size {height} {width}: {model.config.backbone} takes sides in multiples of "
            f"{step}; export at such a size (with --dynamic the file pads other sizes)"
        )
    out_path = Path(out_path)
    _check_out_path(out_path)
    onnx = require("onnx")
    output_names = [f"{n}_logits" for n in names] if heads == "all" else []
    output_names.append("ensemble")
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}
    out_axes = {0: "batch", 2: "out_height", 3: "out_width"} if dynamic else {0: "batch"}
    parameter = next(model.parameters())
    buffer = io.BytesIO()
    was_training = model.training
    model.eval()
    try:
        example = tuple(
            torch.zeros(1, 3, height, width, dtype=parameter.dtype, device=parameter.device)
            for _ in names
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                _ExportGraph(model, heads == "ensemble"),
                example,
                buffer,
                input_names=list(names),
                output_names=output_names,
                dynamic_axes={
                    **{n: axes for n in names},
                    **{n: out_axes for n in output_names},
                },
                opset_version=opset,
                dynamo=False,
            )
    except RuntimeError as err:
        if not out_of_memory(err):
            raise
        raise CenError(
            f"--size {height} {width}: out of memory tracing the network at that size (a "
            "smaller one; with --dynamic the file takes any size)"
        ) from err
    finally:
        model.train(was_training)
    proto = onnx.load_from_string(buffer.getvalue())
    metadata = {
        "modalities": json.dumps(list(names)),
        "heads": heads,
        "num_classes": str(model.config.num_classes),
        "model_config": json.dumps(model.config.to_dict()),
        "size_multiple": str(model.size_multiple),
    }
    if depth_scale is not None:
        metadata["depth_scale"] = repr(float(depth_scale))
    if kinds is not None:
        metadata["kinds"] = json.dumps(list(kinds))
    if settings is not None:
        metadata["settings"] = json.dumps(dict(settings), default=str)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, value
    atomic_write(out_path, lambda f: f.write(proto.SerializeToString()))
    return out_path


def export_checkpoint(
    checkpoint: str | Path,
    out_path: str | Path,
    *,
    heads: str = "all",
    height: int = 480,
    width: int = 640,
    dynamic: bool = False,
    opset: int = DEFAULT_OPSET,
    official: bool | None = None,
) -> Path:
    """``cen export onnx CKPT OUT``: a cenfusion or released checkpoint to ONNX.

    Inputs are named after the modalities stored in the checkpoint (released files store
    none: ``rgb``, ``depth``); their kinds, its depth scale and its run's settings, where it
    has them, go along; not how it ran (device, precision, layout): onnxruntime runs the file
    as it was exported.
    """
    checkpoint, out_path = Path(checkpoint), Path(out_path)
    if is_onnx(checkpoint):
        raise CenError(
            f"{checkpoint}: an ONNX file already; export takes a cenfusion checkpoint or a "
            "released .pth.tar"
        )
    refuse_overwriting(out_path, "OUT", [checkpoint])
    loaded = load_segmenter(checkpoint, official)
    runtime = {f.name for f in fields(RuntimeConfig)}
    settings = loaded.settings and {k: v for k, v in loaded.settings.items() if k not in runtime}
    return export_onnx(
        loaded.model,
        out_path,
        heads=heads,
        height=height,
        width=width,
        dynamic=dynamic,
        opset=opset,
        modalities=loaded.modalities,
        depth_scale=loaded.depth_scale,
        kinds=loaded.kinds,
        settings=settings,
    )


@torch.no_grad()
def max_abs_difference(
    model: CENRefineNet, onnx_path: str | Path, inputs: Sequence[Tensor]
) -> float:
    """Largest ``|torch - onnxruntime|`` over every output of the ONNX file, on ``inputs``
    (``M`` tensors ``(B, 3, H, W)``); the torch model runs in eval mode, restored after."""
    segmenter = OnnxSegmenter(onnx_path)
    was_training = model.training
    model.eval()
    try:
        parameter = next(model.parameters())
        expected = model([x.to(parameter.device, parameter.dtype) for x in inputs])
    finally:
        model.train(was_training)
    if segmenter.heads == "ensemble":
        expected = expected[-1:]
    got = segmenter(inputs)
    return max(float((g - e.float().cpu()).abs().max()) for g, e in zip(got, expected))
