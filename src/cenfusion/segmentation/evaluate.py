"""``cen seg eval``: validation scores of a checkpoint under the released protocol and under
multi-scale + flip test-time augmentation.

- **single-scale (released protocol)**: the full image once, logits resized to the label size,
  argmax, as the released CEN code scores; training's validation is this (:func:`evaluate`).
- **multi-scale 0.5-1.5 + flip**, as most later RGB-D papers report: the inputs resized by
  each of 0.5, 0.75, 1, 1.25, 1.5 (photographs bilinearly, depth with nearest neighbour) and
  each also mirrored left-right (sides rounded half up, as mmsegmentation does); every
  pass's logits are resized to the label size as in the single-scale protocol (bicubic),
  mirrored back, turned into **softmax probabilities**, and the probabilities are averaged
  over the passes before the argmax. Averaging probabilities rather than logits keeps one
  over-confident scale from outvoting the others.

Both use the same evaluation loop and metric (one global confusion matrix per head, each
modality and the ensemble): the augmentation is a module wrapped around the model
(:class:`TestTimeAugmentation`), so :func:`evaluate` runs it unchanged.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, default_collate

from cenfusion.engine.files import FolderLock
from cenfusion.engine.interrupts import DeferredForkLoader, catching_interrupts
from cenfusion.engine.run import METRICS, append_metrics, log
from cenfusion.engine.runtime import Precision, open_runtime
from cenfusion.errors import CenError
from cenfusion.fusion import split_modalities, stack_modalities
from cenfusion.metrics.segmentation import (
    MultiHeadSegmentationMetric,
    format_scores,
    upsample_logits,
)
from cenfusion.segmentation.build import (
    build_dataset,
    check_model_fits,
    check_same_modalities,
    data_root,
)
from cenfusion.segmentation.config import SegmentationConfig
from cenfusion.segmentation.modelio import check_onnx_runtime, is_onnx, load_segmenter
from cenfusion.segmentation.predict import resize_input
from cenfusion.segmentation.visualize import save_prediction_panel

Scores = dict[str, dict[str, float | list[float]]]

#: The scales of the multi-scale protocol of the modern RGB-D papers.
MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)


def _number(s: float) -> str:
    return f"{s:g}"


@dataclass(frozen=True)
class Protocol:
    """How each validation image is presented: at which ``scales``, mirrored or not."""

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    def __post_init__(self) -> None:
        if not self.scales or any(not s > 0 for s in self.scales):
            raise CenError(f"--scales {list(self.scales)}: expected positive numbers")

    @property
    def single_pass(self) -> bool:
        """One pass at the image's own size: the released protocol."""
        return self.scales == (1.0,) and not self.flip

    @property
    def label(self) -> str:
        if self.single_pass:
            return "single-scale (released protocol)"
        flip = " + flip" if self.flip else ""
        if self.scales == (1.0,):
            return f"single-scale{flip}"
        if self.scales == MS_SCALES:
            return f"multi-scale 0.5-1.5{flip}"
        return f"multi-scale {', '.join(map(_number, self.scales))}{flip}"


SINGLE_SCALE = Protocol()
MULTI_SCALE_FLIP = Protocol(MS_SCALES, True)


def protocols_for(
    ms: bool = False, scales: Sequence[float] | None = None, flip: bool | None = None
) -> list[Protocol]:
    """The protocols ``cen seg eval`` runs: always the released single scale, plus the
    augmented one when ``--ms`` (scales 0.5-1.5, flip on unless ``--no-flip``), ``--scales``
    or ``--flip`` asks for it."""
    protocols = [SINGLE_SCALE]
    if ms or scales or flip:
        extra = Protocol(
            tuple(float(s) for s in scales) if scales else (MS_SCALES if ms else (1.0,)),
            ms if flip is None else flip,
        )
        if extra != SINGLE_SCALE:
            protocols.append(extra)
    return protocols


class TestTimeAugmentation(nn.Module):
    """Multi-scale (and flip) inference around a CEN segmenter.

    ``forward(inputs)``: ``M`` tensors ``(B, 3, H, W)`` (or the stacked ``(M*B, 3, H, W)``);
    returns ``(M + 1, B, K, H, W)``, one map per head (modalities, then the ensemble):
    the softmax probabilities averaged over every scale (and its mirror), at the input size,
    which in validation is the label size. ``kinds`` says how each modality is resized
    (``depth`` nearest neighbour, photographs bilinear).
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(
        self,
        model: nn.Module,
        kinds: Sequence[str],
        scales: Sequence[float] = MS_SCALES,
        flip: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.kinds = tuple(kinds)
        self.scales = tuple(scales)
        self.flip = flip

    def forward(self, inputs: Sequence[Tensor] | Tensor) -> Tensor:
        if isinstance(inputs, Tensor):
            stacked = stack_modalities(inputs, len(self.kinds))
            inputs = list(split_modalities(stacked, len(self.kinds)).unbind(0))
        if len(inputs) != len(self.kinds):
            raise ValueError(f"expected {len(self.kinds)} modalities, got {len(inputs)}")
        height, width = inputs[0].shape[-2:]
        total: list[Tensor] | None = None
        passes = 0
        for scale in self.scales:
            size = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))
            scaled = [resize_input(x, k, size) for x, k in zip(inputs, self.kinds)]
            for mirrored in (False, True) if self.flip else (False,):
                batch = [x.flip(-1) for x in scaled] if mirrored else scaled
                probs = []
                for logits in self.model(batch):
                    up = upsample_logits(logits, (height, width))
                    probs.append((up.flip(-1) if mirrored else up).softmax(dim=1))
                total = probs if total is None else [t + p for t, p in zip(total, probs)]
                passes += 1
        return torch.stack(total) / passes


@torch.no_grad()
def score_loader(
    model: nn.Module,
    loader: DataLoader,
    cfg: SegmentationConfig,
    device: torch.device,
    precision: Precision | None = None,
    image_dir: Path | None = None,
) -> MultiHeadSegmentationMetric:
    """The per-head confusion matrices of ``model`` over ``loader`` (see :func:`evaluate`)."""
    model.eval()
    precision = precision or Precision(False, device)
    metric = MultiHeadSegmentationMetric(cfg.num_classes, cfg.head_names, device)
    for loaded in loader:
        for batch in loaded if isinstance(loaded, list) else [loaded]:
            _score_batch(model, batch, metric, cfg, device, precision, image_dir)
    return metric


def _score_batch(
    model: nn.Module,
    batch: dict[str, Any],
    metric: MultiHeadSegmentationMetric,
    cfg: SegmentationConfig,
    device: torch.device,
    precision: Precision,
    image_dir: Path | None,
) -> None:
    """Add one batch (samples of one size) to ``metric``; with ``image_dir``, its panels."""
    target = batch["mask"].to(device, non_blocking=True)
    with precision.autocast():
        heads = model(stack_modalities(batch["inputs"].to(device, non_blocking=True))).float()
    metric.update(list(heads), target)
    for b, name in enumerate(batch["name"] if image_dir is not None else ()):
        save_prediction_panel(
            image_dir / f"{name}.png",
            list(batch["inputs"][b]),
            [k[b] for k in batch["kinds"]],
            batch["mask"][b],
            list(heads[:, b]),
            cfg.num_classes,
        )


def batches_by_size(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``collate_fn`` of a loader whose samples may differ in size: the list of batches of
    consecutive samples that share one (validation images keep their own sizes)."""
    runs: list[list[dict[str, Any]]] = []
    for sample in samples:
        if runs and runs[-1][0]["mask"].shape == sample["mask"].shape:
            runs[-1].append(sample)
        else:
            runs.append([sample])
    return [default_collate(run) for run in runs]


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    cfg: SegmentationConfig,
    device: torch.device,
    precision: Precision | None = None,
    image_dir: Path | None = None,
) -> Scores:
    """Single-scale scores of every head (one global confusion matrix each, summed across
    processes). With ``image_dir``, writes a panel per sample."""
    return score_loader(model, loader, cfg, device, precision, image_dir).compute()


def evaluate_protocols(
    cfg: SegmentationConfig,
    checkpoint: str | Path,
    protocols: Sequence[Protocol] = (SINGLE_SCALE,),
    official: bool | None = None,
    batch_size: int = 1,
) -> dict[str, Scores]:
    """Scores of the checkpoint on ``cfg``'s validation split, ``{protocol label: scores}``.

    The checkpoint may be ours or a released ``.pth.tar``; its modality and class counts must
    match ``cfg``'s. Single process; ``batch_size`` images a forward pass where consecutive
    validation images share their size (each keeps its own), the same scores as one at a time.
    """
    cfg.validate()
    if batch_size < 1:
        raise CenError(f"--batch-size {batch_size}: expected >= 1")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CenError(
            "cen seg eval runs in one process: start it without torchrun (seg train -c EXP "
            "--evaluate scores across processes)"
        )
    check_onnx_runtime(Path(checkpoint), cfg)
    loaded = load_segmenter(checkpoint, official)
    model = loaded.model
    if loaded.heads != "all":
        raise CenError(
            f"{checkpoint}: exported with --heads {loaded.heads}; scoring needs every head "
            f"(export with --heads all)"
        )
    check_model_fits(model, cfg, str(checkpoint))
    trained = [f"{n}:{k}" for n, k in loaded.trained_kinds().items()] or loaded.modalities
    check_same_modalities(trained, cfg, str(checkpoint), training=False)
    val_set = build_dataset(cfg, train=False)
    kinds = [m.kind for m in val_set.modalities]
    results: dict[str, Scores] = {}
    with catching_interrupts(), open_runtime(cfg) as runtime:
        how = "onnxruntime" if is_onnx(Path(checkpoint)) else runtime.describe()
        log.info(f"scoring {checkpoint} on {len(val_set)} samples of {cfg.val_list} ({how})")
        fast = runtime.prepare(model.eval(), frozen=True)
        loader = DeferredForkLoader(
            val_set,
            batch_size=batch_size,
            num_workers=cfg.workers,
            pin_memory=runtime.device.type == "cuda",
            collate_fn=batches_by_size,
        )
        for protocol in protocols:
            net = (
                fast
                if protocol.single_pass
                else TestTimeAugmentation(fast, kinds, protocol.scales, protocol.flip)
            )
            results[protocol.label] = evaluate(net, loader, cfg, runtime.device, runtime.precision)
    return results


def evaluate_checkpoint(
    cfg: SegmentationConfig,
    checkpoint: str | Path,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    official: bool | None = None,
) -> Scores:
    """``{head: scores}`` of one protocol; ``scales=(1.0,)`` without flip is the released
    single-scale evaluation, ``scales=MS_SCALES, flip=True`` the multi-scale + flip one."""
    protocol = Protocol(tuple(float(s) for s in scales), flip)
    return evaluate_protocols(cfg, checkpoint, [protocol], official)[protocol.label]


def run_evaluation(
    cfg: SegmentationConfig,
    checkpoint: str | Path,
    protocols: Sequence[Protocol] = (SINGLE_SCALE,),
    save: bool = False,
    official: bool | None = None,
    batch_size: int = 1,
) -> dict[str, Scores]:
    """Evaluate, print one labelled table per protocol and, with ``save``, append one JSON
    line per protocol to ``runs/EXP/metrics.jsonl`` (holding the run folder's lock, as a
    training does)."""
    with FolderLock(cfg.run_dir) if save else contextlib.nullcontext():
        results = evaluate_protocols(cfg, checkpoint, protocols, official, batch_size)
        for protocol in protocols:
            scores = results[protocol.label]
            log.info(f"{protocol.label}, {cfg.val_list} ({checkpoint}):\n{format_scores(scores)}")
        if save:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            for protocol in protocols:
                append_metrics(
                    cfg.run_dir / METRICS,
                    {
                        "evaluate": str(checkpoint),
                        "protocol": protocol.label,
                        "data": str(data_root(cfg)),
                        "val_list": cfg.val_list,
                        "scales": list(protocol.scales),
                        "flip": protocol.flip,
                        "val": results[protocol.label],
                    },
                )
        return results


__all__ = [
    "MS_SCALES",
    "MULTI_SCALE_FLIP",
    "SINGLE_SCALE",
    "Protocol",
    "TestTimeAugmentation",
    "evaluate_checkpoint",
    "evaluate_protocols",
    "protocols_for",
    "run_evaluation",
]
