"""Semantic-segmentation scores from one global confusion matrix, as the released CEN code scores.

Two pure functions and two stateful classes in the torchmetrics spirit:

- :func:`confusion_matrix` counts ``(ground truth, prediction)`` pairs of one batch;
- :func:`scores_from_confusion` turns an accumulated matrix into pixel accuracy, mean
  accuracy and mIoU;
- :class:`SegmentationMetric` accumulates the matrix over a data set and sums it across
  processes (``torch.distributed``, SUM) when it computes;
- :class:`MultiHeadSegmentationMetric` keeps one per output head (``rgb``, ``depth``,
  ``ensemble``) and formats them as a table.

Example:
    >>> metric = SegmentationMetric(num_classes=3)
    >>> target = torch.tensor([[[0, 1], [2, 255]]])
    >>> metric.update(torch.tensor([[[0, 1], [1, 0]]]), target)
    >>> round(metric.compute()["pixel_acc"], 2)
    66.67
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MultiHeadSegmentationMetric",
    "SegmentationMetric",
    "confusion_matrix",
    "scores_from_confusion",
    "upsample_logits",
]


def upsample_logits(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Logits ``(B, C, h, w)`` resized to ``size`` ``(H, W)`` for the argmax, as the
    released evaluation does: bicubic (OpenCV's ``INTER_CUBIC``: the cubic's ``a = -0.75``,
    pixel centres aligned, edges repeated), in float32; the two differ by the float rounding
    of the sample position (about 1e-5 at NYUDv2's 4x, up to 1e-3 at other ratios). A
    bilinear resize moved the demo's mIoU by 0.2 to 1 point."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits.float()
    return F.interpolate(logits.float(), size=tuple(size), mode="bicubic", align_corners=False)


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Count how often each ground-truth class was predicted as each class.

    Args:
        pred: predicted class indices, integer tensor of any shape ``(N, ...)``; values of the
            kept pixels must lie in ``[0, num_classes)``.
        target: ground-truth class indices, same shape as ``pred``. Pixels whose label lies
            outside ``[0, num_classes)`` (the ignore label 255, or a negative one) are dropped.
        num_classes: number of classes ``C``.

    Returns:
        ``(C, C)`` int64 tensor on ``target``'s device; entry ``[i, j]`` counts pixels of
        ground-truth class ``i`` predicted as ``j`` (rows are ground truth).

    Raises:
        ValueError: if shapes differ, an input is not integer, or a kept prediction is out of
            range.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if pred.is_floating_point() or target.is_floating_point():
        raise ValueError("pred and target must hold integer class indices")
    pred = pred.to(target.device)
    kept = (target >= 0) & (target < num_classes)
    if bool((kept & ((pred < 0) | (pred >= num_classes))).any()):
        raise ValueError(f"predicted class indices must lie in [0, {num_classes})")
    return _counts(pred, target, num_classes)


def _counts(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """:func:`confusion_matrix` of predictions known to lie in ``[0, C)``, without waiting
    for the device: ignored pixels are counted in one extra bin, dropped at the end, rather
    than removed (which must learn how many are left), and the bins are a scatter-add, as
    CUDA's ``bincount`` first reads the largest value to size its output."""
    target = target.reshape(-1).long()
    pixel = target * num_classes + pred.reshape(-1).long()
    unused = num_classes * num_classes
    bins = torch.where((target >= 0) & (target < num_classes), pixel, unused)
    counts = torch.zeros(unused + 1, dtype=torch.int64, device=target.device)
    counts.scatter_add_(0, bins, torch.ones_like(bins))
    return counts[:unused].view(num_classes, num_classes)


def scores_from_confusion(confmat: Tensor) -> dict[str, float | list[float]]:
    """Pixel accuracy, mean class accuracy and mean IoU of a confusion matrix, in percent.

    Computed in float64 as in the released CEN evaluation:
    pixel acc = trace / sum; mean acc = nanmean(diag / row sum); mIoU =
    nanmean(diag / (row sum + column sum - diag)). A class with no ground-truth pixel has a
    NaN accuracy, a class absent from both ground truth and prediction a NaN IoU; ``nanmean``
    skips them. A class predicted but absent from the ground truth has IoU 0 and counts.

    Args:
        confmat: ``(C, C)`` counts, rows ground truth (see :func:`confusion_matrix`).

    Returns:
        ``{"pixel_acc", "mean_acc", "miou"}`` as floats and ``"iou"``, a list of ``C``
        per-class IoUs, all multiplied by 100. Every value is NaN for an empty matrix.
    """
    cm = confmat.to(torch.float64)
    diag = cm.diagonal()
    rows = cm.sum(dim=1)
    cols = cm.sum(dim=0)
    class_acc = diag / rows
    iou = diag / (rows + cols - diag)
    return {
        "pixel_acc": float(diag.sum() / cm.sum()) * 100.0,
        "mean_acc": float(torch.nanmean(class_acc)) * 100.0,
        "miou": float(torch.nanmean(iou)) * 100.0,
        "iou": (iou * 100.0).tolist(),
    }


class SegmentationMetric:
    """Global confusion matrix over a data set, summed across processes on :meth:`compute`.

    Logits are resized to the label size (:func:`upsample_logits`) before the argmax, so
    that scores are taken at the label's full resolution as in the released evaluation.

    Args:
        num_classes: number of classes ``C``; labels ``>= C`` (255) are ignored.
        device: where the ``(C, C)`` int64 state lives. Under ``torch.distributed`` it must
            suit the backend (a CUDA device for NCCL, any for gloo).

    Example:
        >>> metric = SegmentationMetric(num_classes=2)
        >>> metric.update(torch.randn(1, 2, 4, 4), torch.zeros(1, 8, 8, dtype=torch.long))
        >>> sorted(metric.compute())
        ['iou', 'mean_acc', 'miou', 'pixel_acc']
    """

    def __init__(self, num_classes: int, device: torch.device | str | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.confmat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add one batch to the confusion matrix.

        Args:
            preds: logits ``(B, C, h, w)`` (any float dtype and size; resized to ``(H, W)``
                then argmaxed) or class indices ``(B, H, W)`` (integer).
            target: labels ``(B, H, W)`` integer, 255 (or any value ``>= C``) = ignore.
        """
        if preds.dim() == target.dim() + 1:
            if preds.shape[1] != self.num_classes:
                raise ValueError(
                    f"logits have {preds.shape[1]} channels, expected {self.num_classes}"
                )
            preds = upsample_logits(preds, target.shape[1:])
            counts = _counts(preds.argmax(dim=1).to(target.device), target, self.num_classes)
        elif preds.dim() == target.dim():
            counts = confusion_matrix(preds, target, self.num_classes)
        else:
            raise ValueError(
                f"preds {tuple(preds.shape)} must be logits (B, C, H, W) or labels shaped like "
                f"target {tuple(target.shape)}"
            )
        self.confmat += counts.to(self.confmat.device)

    def compute(self) -> dict[str, float | list[float]]:
        """Scores of everything seen so far (see :func:`scores_from_confusion`).

        Under an initialised ``torch.distributed`` process group this is a collective call:
        every rank must call it, and every rank gets the scores of the summed matrix. The
        accumulated state itself is left unchanged.
        """
        return scores_from_confusion(self.summed_confmat())

    def summed_confmat(self) -> Tensor:
        """The ``(C, C)`` matrix of every process's updates (a collective call under
        ``torch.distributed``; this process's state is left unchanged)."""
        confmat = self.confmat.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(confmat, op=dist.ReduceOp.SUM)
        return confmat

    def reset(self) -> None:
        """Zero the confusion matrix."""
        self.confmat.zero_()


class MultiHeadSegmentationMetric:
    """One :class:`SegmentationMetric` per output head, e.g. ``["rgb", "depth", "ensemble"]``.

    Args:
        num_classes: number of classes ``C``.
        heads: names of the heads, in the order :meth:`update` receives their outputs.
        device: where the confusion matrices live.

    Example:
        >>> metric = MultiHeadSegmentationMetric(2, ["rgb", "depth", "ensemble"])
        >>> logits = [torch.randn(1, 2, 4, 4) for _ in range(3)]
        >>> metric.update(logits, torch.ones(1, 4, 4, dtype=torch.long))
        >>> print(metric.format_table().splitlines()[0])
        head      pixel acc   mean acc       mIoU
    """

    def __init__(
        self, num_classes: int, heads: Sequence[str], device: torch.device | str | None = None
    ) -> None:
        if not heads or len(set(heads)) != len(heads):
            raise ValueError(f"heads must be distinct and non-empty, got {list(heads)}")
        self.metrics = {name: SegmentationMetric(num_classes, device) for name in heads}

    def update(self, outputs: Sequence[Tensor], target: Tensor) -> None:
        """Add one batch for every head.

        Args:
            outputs: one tensor per head, in the order of ``heads``; each logits
                ``(B, C, h, w)`` or class indices ``(B, H, W)``.
            target: labels ``(B, H, W)``, 255 = ignore.
        """
        if len(outputs) != len(self.metrics):
            raise ValueError(f"got {len(outputs)} outputs for {len(self.metrics)} heads")
        for metric, output in zip(self.metrics.values(), outputs):
            metric.update(output, target)

    def compute(self) -> dict[str, dict[str, float | list[float]]]:
        """``{head: scores}``, each as :meth:`SegmentationMetric.compute` (a collective call
        under ``torch.distributed``)."""
        return {name: metric.compute() for name, metric in self.metrics.items()}

    def summed_confmats(self) -> dict[str, Tensor]:
        """``{head: (C, C)}`` summed over processes (a collective call under
        ``torch.distributed``)."""
        return {name: metric.summed_confmat() for name, metric in self.metrics.items()}

    def reset(self) -> None:
        """Zero every head's confusion matrix."""
        for metric in self.metrics.values():
            metric.reset()

    def format_table(
        self, scores: Mapping[str, Mapping[str, float | list[float]]] | None = None
    ) -> str:
        """A text table of pixel acc / mean acc / mIoU (percent) per head.

        Pass ``scores`` when only the main process prints, since :meth:`compute` is a
        collective call under ``torch.distributed``.
        """
        return format_scores(self.compute() if scores is None else scores)


def format_scores(scores: Mapping[str, Mapping[str, float | list[float]]]) -> str:
    """A text table of pixel acc / mean acc / mIoU (percent) per head, without trailing newline."""
    width = max(len("head"), *(len(name) for name in scores))
    lines = [f"{'head':<{width}}  {'pixel acc':>9}  {'mean acc':>9}  {'mIoU':>9}"]
    for name, s in scores.items():
        lines.append(
            f"{name:<{width}}  {s['pixel_acc']:9.2f}  {s['mean_acc']:9.2f}  {s['miou']:9.2f}"
        )
    return "\n".join(lines)
