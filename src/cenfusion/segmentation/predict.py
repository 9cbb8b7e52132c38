"""``cen seg predict``: run a trained CEN segmenter on one's own RGB-D pictures.

A checkpoint (a cenfusion one, or a released CEN ``.pth.tar``, told apart automatically) and
one image per modality for each sample; folders are paired by file stem. Writes, per sample::

    OUT/<stem>_color.png     coloured ensemble prediction
    OUT/<stem>_label.png     raw class indices, 8-bit single channel
    OUT/<stem>_overlay.png   the colours blended over the RGB input

and with ``heads=True`` the same three files for each modality's own head
(``<stem>_<modality>_color.png``, ...).

Inputs are decoded and normalised exactly as in training (:func:`decode_image`, then
:class:`Normalize`): RGB to ImageNet statistics, depth as raw PNG values times
``depth_scale`` (NYUDv2: 1/5000, i.e. millimetres / 5000) with no mean/std. **Holes** (0 in
the depth PNG, where the sensor saw nothing) stay 0: that is how the released NYUDv2 depth
encodes missing values, so it is what the network saw during training; filling them would
feed it values it never learned from. Resampling never blends a hole into valid depth either:
depth is always resized with nearest neighbour.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from cenfusion.data.listfile import HIGH_BIT_MODES, NYUDV2_DEPTH_SCALE, decode_image
from cenfusion.data.own_images import (
    Sample,
    check_images,
    check_output_folder,
    check_output_names,
    check_outputs_spare_inputs,
    collect_samples,
)
from cenfusion.data.read_ahead import read_ahead
from cenfusion.data.transforms import Normalize
from cenfusion.engine.run import RuntimeConfig
from cenfusion.engine.runtime import Precision, open_runtime
from cenfusion.errors import CenError
from cenfusion.segmentation.modelio import LoadedModel, check_onnx_runtime, load_segmenter
from cenfusion.segmentation.samples import Modality
from cenfusion.segmentation.visualize import colorize, input_to_rgb, predict_labels

if TYPE_CHECKING:
    from cenfusion.segmentation.onnx_segmenter import OnnxSegmenter

#: Weight of the prediction colours in ``_overlay.png`` (the RGB input gets the rest).
OVERLAY_ALPHA = 0.5
#: The files written per sample and head: ``<prefix>_<output>.png``.
OUTPUTS = ("color", "label", "overlay")


def check_fits(
    loaded: LoadedModel, names: Sequence[str], num_classes: int | None, where: str
) -> None:
    """Refuse inputs that do not match the network: one input per modality it was trained
    on, named as it names them (when it does), and (when the caller states one) its class
    count. ``names``: the inputs' modality names."""
    config = loaded.model.config
    given = ", ".join(names)
    if len(names) != config.num_modalities:
        trained = f" ({', '.join(loaded.modalities)})" if loaded.modalities else ""
        raise CenError(
            f"{where}: the model takes {config.num_modalities} modalities{trained}, "
            f"{len(names)} given ({given}); give one input per modality it was trained on"
        )
    unknown = [n for n in names if loaded.modalities and n not in loaded.modalities]
    if unknown:
        raise CenError(
            f"modality {unknown[0]}: {where} was trained on {', '.join(loaded.modalities)}; "
            "name each input after the modality it is"
        )
    if num_classes is not None and num_classes != config.num_classes:
        raise CenError(
            f"{where}: the model predicts {config.num_classes} classes, --num-classes says "
            f"{num_classes}; the class count is fixed by the checkpoint's classifier"
        )
    if config.num_classes > 256:
        raise CenError(f"{where}: {config.num_classes} classes do not fit an 8-bit label PNG")


def _warn(message: str) -> None:
    tqdm.write(f"cen: warning: {message}", file=sys.stderr)


def resize_input(x: Tensor, kind: str, size: Sequence[int]) -> Tensor:
    """Resize a batch ``(B, 3, H, W)`` of one modality to ``size``: depth with nearest
    neighbour (holes stay holes, no depth is invented across an edge), photographs
    bilinearly (``align_corners=False``)."""
    size = tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    if kind == "depth":
        return F.interpolate(x, size=size, mode="nearest-exact")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def load_inputs(
    sample: Sample, modalities: Sequence[Modality], depth_scale: float
) -> tuple[list[Tensor], int]:
    """Decoded, size-matched and normalised inputs ``(3, H, W)``, and the index of the
    reference input (the first RGB one, else the first) whose size the others take."""
    raw = [decode_image(p, m.kind, depth_scale) for p, m in zip(sample.paths, modalities)]
    ref = next((i for i, m in enumerate(modalities) if m.kind == "rgb"), 0)
    size = tuple(raw[ref].shape[-2:])
    for i, (x, m) in enumerate(zip(raw, modalities)):
        if tuple(x.shape[-2:]) != size:
            method = "nearest" if m.kind == "depth" else "bilinear"
            _warn(
                f"{sample.stem}: {m.name} {sample.paths[i]} is {x.shape[-2]}x{x.shape[-1]}, "
                f"{modalities[ref].name} {sample.paths[ref]} is {size[0]}x{size[1]}; resized "
                f"{m.name} to {size[0]}x{size[1]} ({method})"
            )
            raw[i] = resize_input(x[None], m.kind, size)[0]
    normalized = Normalize()({"inputs": raw, "kinds": [m.kind for m in modalities]})
    return normalized["inputs"], ref


def check_inputs(samples: Sequence[Sample], modalities: Sequence[Modality]) -> None:
    """Decode every input (``sample.paths`` in ``modalities`` order) before any output is
    written: a corrupt tenth image must not leave nine outputs behind. Raises
    :class:`CenError` with the first problem; with several, each is listed on stderr first."""
    paths = [path for sample in samples for path in sample.paths]
    check_images(paths, [m.kind for _ in samples for m in modalities])


def check_depth_bits(
    samples: Sequence[Sample],
    modalities: Sequence[Modality],
    trained: Mapping[str, int] | None,
    where: str,
    own_scale: bool,
) -> None:
    """Refuse depth files of another bit depth than the model's training data (``trained``:
    name -> bits, when the checkpoint says): one depth scale cannot fit both encodings, so
    the network would see depth some 256 times off. With ``own_scale`` (the caller chose the
    files' scale) a warning."""
    odd = []
    for sample in samples:
        for path, modality in zip(sample.paths, modalities):
            want = (trained or {}).get(modality.name)
            if modality.kind != "depth" or want is None:
                continue
            with Image.open(path) as image:
                bits = 16 if image.mode in HIGH_BIT_MODES else 8
            if bits != want:
                odd.append(
                    f"{path} is {bits}-bit, {where} was trained on {want}-bit {modality.name}"
                )
    if not odd:
        return
    said = odd[0] + (f" (and {len(odd) - 1} more)" if len(odd) > 1 else "")
    if not own_scale:
        raise CenError(f"{said}; convert it, or give --depth-scale for its values")
    _warn(f"{said}; read with the --depth-scale given")


def check_graph_size(
    samples: Sequence[Sample],
    modalities: Sequence[Modality],
    fixed: tuple[int, int],
    size: tuple[int, int] | None,
    model: Path,
) -> None:
    """Refuse, before any output is written, inputs that an ONNX graph exported at ``fixed``
    ``(H, W)`` cannot take: the network sees ``size`` when given, else each sample's
    reference image (the first RGB one) at its own size."""
    wanted = f"{model} takes {fixed[0]}x{fixed[1]} only"
    if size is not None:
        if tuple(size) != fixed:
            raise CenError(f"--size {size[0]} {size[1]}: {wanted} (export with --dynamic)")
        return
    ref = next((i for i, m in enumerate(modalities) if m.kind == "rgb"), 0)
    for sample in samples:
        with Image.open(sample.paths[ref]) as image:
            width, height = image.size
        if (height, width) != fixed:
            raise CenError(
                f"{sample.paths[ref]} is {height}x{width}, {wanted}: predict with --size "
                f"{fixed[0]} {fixed[1]} (resized there and back), or export with --dynamic"
            )


def _write_prediction(
    out: Path, prefix: str, labels: np.ndarray, base: np.ndarray, num_classes: int
) -> list[Path]:
    colours = colorize(labels, num_classes)
    overlay = OVERLAY_ALPHA * colours.astype(np.float32) + (1 - OVERLAY_ALPHA) * base
    arrays = (colours, labels.astype(np.uint8), overlay.round().clip(0, 255).astype(np.uint8))
    written = []
    for suffix, array in zip(OUTPUTS, arrays):
        path = out / f"{prefix}_{suffix}.png"
        Image.fromarray(array).save(path)
        written.append(path)
    return written


@torch.inference_mode()
def predict_batch(
    model: nn.Module | OnnxSegmenter,
    samples: Sequence[Sequence[Tensor]],
    kinds: Sequence[str],
    device: torch.device,
    size: tuple[int, int] | None = None,
    precision: Precision | None = None,
) -> list[list[np.ndarray]]:
    """Labels ``(H, W)`` uint8 of every head (modalities, then the ensemble) for each sample,
    from one forward pass over all of them.

    ``samples``: per sample ``M`` normalised tensors ``(3, H, W)``; the network sees them at
    ``size`` when given (resized), else at their own size, which must then be the same for
    all. Each sample's logits are resized back to its own ``(H, W)`` before the argmax
    (bicubic, as in evaluation). ``precision``: the autocast the network runs under.
    """
    batch = []
    for m, kind in enumerate(kinds):
        views = [sample[m][None].to(device) for sample in samples]
        if size is not None:
            views = [resize_input(x, kind, size) for x in views]
        batch.append(torch.cat(views))
    with (precision or Precision(False, device)).autocast():
        heads = model(batch)
    return [
        [predict_labels(h[b].float(), tuple(sample[0].shape[-2:])) for h in heads]
        for b, sample in enumerate(samples)
    ]


#: Settings of a prediction run that asks for none: the best device, float32, NCHW, eager.
DEFAULT_RUNTIME = RuntimeConfig()


def predict(
    checkpoint: str | Path,
    inputs: Sequence[str | Path | Sequence[str | Path]],
    out: str | Path,
    depth_scale: float | None = None,
    size: tuple[int, int] | None = None,
    heads: bool = False,
    official: bool | None = None,
    modalities: Sequence[str] | None = None,
    num_classes: int | None = None,
    progress: bool = True,
    batch_size: int = 1,
    runtime: RuntimeConfig = DEFAULT_RUNTIME,
) -> list[Path]:
    """Segment every sample of ``inputs`` with the model in ``checkpoint``; returns the
    files written under ``out`` (see the module docstring for their names).

    Args:
        checkpoint: a cenfusion checkpoint or a released ``.pth.tar`` (``official``: ``None``
            detects, ``True``/``False`` force the format).
        inputs: items of :func:`collect_samples`: ``(rgb, depth)`` file or folder pairs, or
            folders with ``rgb/`` and ``depth/`` subfolders.
        depth_scale: multiplies raw depth PNG values. Default: the factor the checkpoint
            was trained with, else NYUDv2's 1/5000 (millimetres).
        size: ``(H, W)`` the network sees; predictions come back at each image's own size.
        heads: also write each modality head's prediction.
        modalities: names (``NAME`` or ``NAME:KIND``) of the paths in each item, in order.
            Default: the names stored in the checkpoint, else ``rgb, depth``. A checkpoint
            that names its modalities takes those names alone; given in another order, the
            inputs are reordered to the order the model was trained with.
        num_classes: if given, must equal the checkpoint's class count.
        batch_size: images per forward pass; consecutive images share one only where the
            network sees them at one size (``size``, or images of equal size). The outputs
            are those of one image at a time.
        runtime: device, precision, layout, compile, threads and memory; ``amp``,
            ``channels_last`` and ``compile`` are for PyTorch checkpoints.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    runtime.validate()
    if batch_size < 1:
        raise CenError(f"--batch-size {batch_size}: expected >= 1")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise CenError(f"--size {list(size)}: expected two positive numbers H W")
    if depth_scale is not None and not depth_scale >= 0:
        raise CenError(f"--depth-scale {depth_scale}: expected >= 0")
    check_output_folder(out)
    check_onnx_runtime(checkpoint, runtime)
    loaded = load_segmenter(checkpoint, official)
    if modalities is None:
        modalities = loaded.modalities or ("rgb", "depth")
    trained_kinds = loaded.trained_kinds()
    trained = loaded.modalities
    check_fits(loaded, [m.partition(":")[0] for m in modalities], num_classes, str(checkpoint))
    parsed = [Modality.parse(m, trained_kinds) for m in modalities]
    if len({m.name for m in parsed}) != len(parsed):
        raise CenError(f"modalities {[m.name for m in parsed]}: expected distinct names")
    for m in parsed:
        if trained_kinds.get(m.name, m.kind) != m.kind:
            raise CenError(
                f"modality {m.name}:{m.kind}: {checkpoint} was trained on {m.name} as "
                f"{trained_kinds[m.name]}"
            )
    trained_scale = loaded.depth_scale
    own_scale = depth_scale is not None
    if depth_scale is None:
        depth_scale = NYUDV2_DEPTH_SCALE if trained_scale is None else trained_scale
    elif trained_scale not in (None, depth_scale) and any(m.kind == "depth" for m in parsed):
        _warn(f"--depth-scale {depth_scale:g}: {checkpoint} was trained with {trained_scale:g}")
    order = list(range(len(parsed)))
    if trained is not None and [m.name for m in parsed] != list(trained):
        order = [[m.name for m in parsed].index(n) for n in trained]
    samples = collect_samples(inputs, [m.name for m in parsed])
    check_output_names(samples, [m.name for m in parsed] if heads else [])
    check_inputs(samples, parsed)
    check_depth_bits(samples, parsed, loaded.depth_bits, str(checkpoint), own_scale)
    fixed = getattr(loaded.model, "fixed_size", None)
    if fixed is not None:
        check_graph_size(samples, parsed, fixed, size, checkpoint)
    parsed = [parsed[i] for i in order]
    kinds = [m.kind for m in parsed]

    if heads and loaded.heads == "ensemble":
        raise CenError(f"--heads: {checkpoint} was exported with the ensemble head only")
    num = loaded.model.config.num_classes
    prefixes = [s.stem for s in samples]
    prefixes += [f"{s.stem}_{m.name}" for s in samples for m in parsed] if heads else []
    planned = [out / f"{p}_{suffix}.png" for p in prefixes for suffix in OUTPUTS]
    check_outputs_spare_inputs(samples, planned)
    written: list[Path] = []
    pending: list[tuple[str, list[Tensor], int]] = []

    def load(sample: Sample) -> tuple[str, list[Tensor], int]:
        tensors, ref = load_inputs(
            Sample(sample.stem, tuple(sample.paths[i] for i in order)), parsed, depth_scale
        )
        return sample.stem, tensors, ref

    def flush() -> None:
        stacked = [tensors for _, tensors, _ in pending]
        labels = predict_batch(net, stacked, kinds, opened.device, size, opened.precision)
        for (stem, tensors, ref), maps in zip(pending, labels):
            base = input_to_rgb(tensors[ref], parsed[ref].kind).astype(np.float32)
            written.extend(_write_prediction(out, stem, maps[-1], base, num))
            if heads:
                for m, head in zip(parsed, maps[:-1]):
                    written.extend(_write_prediction(out, f"{stem}_{m.name}", head, base, num))
        bar.update(len(pending))
        pending.clear()

    with open_runtime(runtime) as opened:
        out.mkdir(parents=True, exist_ok=True)
        net = opened.prepare(loaded.model.eval(), frozen=True)
        loads = read_ahead(samples, load, ahead=2 * batch_size)
        quiet = not progress or len(samples) < 2
        bar = tqdm(desc="predict", total=len(samples), unit="image", disable=quiet, delay=1)
        for stem, tensors, ref in loads:
            seen = tuple(size or tensors[0].shape[-2:])
            if pending and tuple(size or pending[0][1][0].shape[-2:]) != seen:
                flush()
            pending.append((stem, tensors, ref))
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
        bar.close()
    return written
