"""Coloured label maps and side-by-side panels (inputs, ground truth, each head)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cenfusion.data.transforms import GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD
from cenfusion.metrics.segmentation import upsample_logits


def palette(num_classes: int) -> np.ndarray:
    """``(256, 3)`` uint8 colours: distinct hues for the classes, black for 255 (ignore)."""
    colours = np.zeros((256, 3), dtype=np.uint8)
    index = np.arange(num_classes)
    hue = (index * 0.618034) % 1.0
    value = 0.95 - 0.35 * ((index // 8) % 2)
    channel = np.stack([hue, hue + 2 / 3, hue + 1 / 3], axis=1) % 1.0
    rgb = np.clip(np.abs(channel * 6 - 3) - 1, 0, 1) * 0.75 + 0.25
    colours[:num_classes] = (rgb * value[:, None] * 255).astype(np.uint8)
    return colours


def colorize(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``(H, W)`` labels -> ``(H, W, 3)`` uint8 colours."""
    return palette(num_classes)[labels.astype(np.int64).clip(0, 255)]


def input_to_rgb(x: Tensor, kind: str) -> np.ndarray:
    """A normalised input ``(3, H, W)`` -> ``(H, W, 3)`` uint8 for display."""
    x = x.detach().float().cpu()
    if kind == "rgb":
        x = (
            x * torch.tensor(IMAGENET_STD)[:, None, None]
            + torch.tensor(IMAGENET_MEAN)[:, None, None]
        )
    elif kind == "gray":
        x = x * GRAY_STD + GRAY_MEAN
    else:
        valid = x[x > 0]
        high = float(valid.max()) if valid.numel() else 1.0
        x = x / max(high, 1e-6)
    return (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def predict_labels(logits: Tensor, size: Sequence[int]) -> np.ndarray:
    """Logits ``(C, h, w)`` -> labels ``(H, W)`` at ``size``, resized as evaluation does
    (:func:`~cenfusion.metrics.segmentation.upsample_logits`), then argmax."""
    return upsample_logits(logits[None], size)[0].argmax(0).byte().cpu().numpy()


def save_prediction_panel(
    path: Path,
    inputs: Sequence[Tensor],
    kinds: Sequence[str],
    mask: Tensor | None,
    heads: Sequence[Tensor],
    num_classes: int,
) -> None:
    """Write one PNG: the inputs, the ground truth (if any) and every head's prediction."""
    size = inputs[0].shape[-2:]
    tiles = [input_to_rgb(x, k) for x, k in zip(inputs, kinds)]
    if mask is not None:
        tiles.append(colorize(mask.cpu().numpy(), num_classes))
    tiles += [colorize(predict_labels(h, size), num_classes) for h in heads]
    gap = np.full((size[0], 4, 3), 255, dtype=np.uint8)
    row = np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(row).save(path)
