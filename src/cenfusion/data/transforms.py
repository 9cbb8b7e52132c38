"""Joint transforms for multimodal segmentation samples (the released NYUDv2 recipe, sizes configurable).

Every transform maps a whole sample to a new sample, so the inputs and the mask cannot drift
apart. A sample is the dict :class:`~cenfusion.data.listfile.ListFileDataset` returns::

    {"inputs": [float32 (3, H, W) per modality], "kinds": ["rgb", "depth", ...],
     "mask": int64 (H, W) (optional, 255 = ignore), "name": str}

``kinds`` decides how each input is treated: photographs (``rgb``, ``gray``) are resized
bicubically and normalised by mean/std, ``depth`` is a measurement, resized with nearest
neighbour (interpolating across an object boundary would invent depths that exist nowhere) and
left unnormalised (the dataset already scaled it). The mask is resized with nearest neighbour
and padded with the ignore value.

All randomness comes from torch's global generator: ``torch.manual_seed`` makes a run
repeatable, and DataLoader workers, which torch seeds one by one, draw different streams.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cenfusion.data.listfile import IGNORE_INDEX, NYUDV2_DEPTH_SCALE, Sample, Transform
from cenfusion.errors import CenError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Pad value of images: the ImageNet mean in 0..255, so padding normalises to zero.
IMAGE_FILL = (123.675, 116.28, 103.53)
#: Pad value of depth. The released code pads raw depth with ``IMAGE_FILL`` and only then
#: multiplies by 1/5000; our depth arrives already scaled, so the same values scaled give the
#: same tensors (about 0.02, practically the "no depth" value 0).
DEPTH_FILL = tuple(v * NYUDV2_DEPTH_SCALE for v in IMAGE_FILL)
#: Grey inputs (shading, edges, ...) have no ImageNet statistics: mean/std 0.5 map 0..255 to
#: -1..1, the range the translation task normalises every domain to.
GRAY_MEAN = 0.5
GRAY_STD = 0.5

_PHOTO_KINDS = ("rgb", "gray")


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` from an int or a pair."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def _kind_check(sample: Sample) -> list[str]:
    """The sample's ``kinds``, one per input, each known."""
    kinds = list(sample["kinds"])
    if len(kinds) != len(sample["inputs"]):
        raise CenError(
            f"sample {sample.get('name')}: {len(sample['inputs'])} inputs but {len(kinds)} kinds"
        )
    for kind in kinds:
        if kind not in (*_PHOTO_KINDS, "depth"):
            raise CenError(f"sample {sample.get('name')}: input kind {kind!r} is unknown")
    return kinds


def _replace(sample: Sample, inputs: list[torch.Tensor], mask: torch.Tensor | None) -> Sample:
    """A new sample with ``inputs`` and ``mask`` swapped in; the caller's dict is untouched."""
    out = {**sample, "inputs": inputs}
    if mask is not None:
        out["mask"] = mask
    return out


class Compose:
    """Apply ``transforms`` in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for transform in self.transforms:
            sample = transform(sample)
        return sample


class RandomScale:
    """Resize by ``s ~ U(low, high)``, raised so the shorter side is >= ``min_short_side``.

    Photographs use bicubic interpolation clamped to 0..255 (bicubic overshoots at edges);
    depth and mask use ``nearest-exact``, which samples at pixel centres like bicubic with
    ``align_corners=False`` does, so all modalities stay registered.
    """

    def __init__(self, low: float = 0.5, high: float = 2.0, min_short_side: int = 350) -> None:
        if not 0 < low <= high:
            raise CenError(f"RandomScale: expected 0 < low <= high, got low={low}, high={high}")
        self.low = low
        self.high = high
        self.min_short_side = min_short_side

    def __call__(self, sample: Sample) -> Sample:
        kinds = _kind_check(sample)
        height, width = sample["inputs"][0].shape[-2:]
        scale = self.low + (self.high - self.low) * float(torch.rand(()))
        scale = max(scale, self.min_short_side / min(height, width))
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        inputs = []
        for x, kind in zip(sample["inputs"], kinds, strict=True):
            if kind in _PHOTO_KINDS:
                resized = F.interpolate(x[None], size=size, mode="bicubic", align_corners=False)
                inputs.append(resized[0].clamp_(0.0, 255.0))
            else:
                inputs.append(F.interpolate(x[None], size=size, mode="nearest-exact")[0])
        mask = sample.get("mask")
        if mask is not None:
            mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")
            mask = mask[0, 0].long()
        return _replace(sample, inputs, mask)


class Pad:
    """Pad symmetrically (extra pixel at the bottom/right) to at least ``size``.

    Photographs are padded with ``image_fill``, depth with ``depth_fill`` (per channel), the
    mask with ``ignore_index`` so padding never counts in the loss.
    """

    def __init__(
        self,
        size: int | Sequence[int] = 500,
        image_fill: Sequence[float] = IMAGE_FILL,
        depth_fill: Sequence[float] = DEPTH_FILL,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.size = _pair(size)
        self.image_fill = torch.tensor(image_fill, dtype=torch.float32)
        self.depth_fill = torch.tensor(depth_fill, dtype=torch.float32)
        self.ignore_index = ignore_index

    def __call__(self, sample: Sample) -> Sample:
        kinds = _kind_check(sample)
        height, width = sample["inputs"][0].shape[-2:]
        pad_h = max(self.size[0] - height, 0)
        pad_w = max(self.size[1] - width, 0)
        if pad_h == 0 and pad_w == 0:
            return sample
        top, left = pad_h // 2, pad_w // 2
        window = (slice(top, top + height), slice(left, left + width))
        inputs = []
        for x, kind in zip(sample["inputs"], kinds, strict=True):
            fill = self.depth_fill if kind == "depth" else self.image_fill
            padded = fill.to(x.dtype)[:, None, None].repeat(1, height + pad_h, width + pad_w)
            padded[(slice(None), *window)] = x
            inputs.append(padded)
        mask = sample.get("mask")
        if mask is not None:
            padded_mask = mask.new_full((height + pad_h, width + pad_w), self.ignore_index)
            padded_mask[window] = mask
            mask = padded_mask
        return _replace(sample, inputs, mask)


class RandomHorizontalFlip:
    """Mirror all inputs and the mask left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, sample: Sample) -> Sample:
        if float(torch.rand(())) >= self.p:
            return sample
        inputs = [x.flip(-1) for x in sample["inputs"]]
        mask = sample.get("mask")
        return _replace(sample, inputs, None if mask is None else mask.flip(-1))


class RandomCrop:
    """Cut the same random ``size`` window from all inputs and the mask (pad first)."""

    def __init__(self, size: int | Sequence[int] = 500) -> None:
        self.size = _pair(size)

    def __call__(self, sample: Sample) -> Sample:
        height, width = sample["inputs"][0].shape[-2:]
        crop_h, crop_w = self.size
        if height < crop_h or width < crop_w:
            raise CenError(
                f"RandomCrop{self.size}: sample {sample.get('name')} is {height}x{width}, "
                f"expected at least {crop_h}x{crop_w} (put Pad before the crop)"
            )
        top = int(torch.randint(0, height - crop_h + 1, ()))
        left = int(torch.randint(0, width - crop_w + 1, ()))
        window = (slice(top, top + crop_h), slice(left, left + crop_w))
        inputs = [x[(slice(None), *window)] for x in sample["inputs"]]
        mask = sample.get("mask")
        return _replace(sample, inputs, None if mask is None else mask[window])


class Normalize:
    """Normalise inputs by kind.

    - ``rgb``: ``(x / 255 - mean) / std`` with the ImageNet statistics the encoder was
      trained on.
    - ``gray``: ``(x / 255 - 0.5) / 0.5``, i.e. -1..1 (see :data:`GRAY_MEAN`).
    - ``depth``: unchanged; the dataset already multiplied it by its depth scale and the
      released system applies no mean/std to depth.
    """

    def __init__(
        self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, sample: Sample) -> Sample:
        inputs = []
        for x, kind in zip(sample["inputs"], _kind_check(sample), strict=True):
            if kind == "rgb":
                inputs.append((x / 255.0 - self.mean) / self.std)
            elif kind == "gray":
                inputs.append((x / 255.0 - GRAY_MEAN) / GRAY_STD)
            else:
                inputs.append(x)
        return _replace(sample, inputs, None)


def train_transform(
    crop_size: int = 500,
    min_short_side: int = 350,
    scale: tuple[float, float] = (0.5, 2.0),
    depth_scale: float = NYUDV2_DEPTH_SCALE,
) -> Compose:
    """The released training augmentation: scale, pad, flip, crop ``crop_size``, normalise.

    Depth is padded with the image fill times ``depth_scale``: the raw fill value, scaled like
    the depth it sits beside.
    """
    depth_fill = tuple(v * depth_scale for v in IMAGE_FILL)
    return Compose(
        [
            RandomScale(scale[0], scale[1], min_short_side),
            Pad(crop_size, depth_fill=depth_fill),
            RandomHorizontalFlip(0.5),
            RandomCrop(crop_size),
            Normalize(),
        ]
    )


def val_transform() -> Compose:
    """Validation: the full image at its own size, only normalised."""
    return Compose([Normalize()])
