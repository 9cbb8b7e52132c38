"""Joint transforms: alignment of all modalities and the mask, padding, sizes, determinism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cenfusion.data.transforms import (
    DEPTH_FILL,
    IMAGE_FILL,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalize,
    Pad,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    train_transform,
    val_transform,
)
from cenfusion.errors import CenError

BLOCK = 12
NUM_LABELS = 7
MEAN = torch.tensor(IMAGENET_MEAN)[:, None, None]
STD = torch.tensor(IMAGENET_STD)[:, None, None]


def _colour(label: torch.Tensor) -> torch.Tensor:
    """RGB value (3, ...) of each label: distinct per label, inside 0..255."""
    return torch.stack([30.0 * label + 10, 250.0 - 30 * label, 100.0 + 7 * label])


def _depth(label: torch.Tensor) -> torch.Tensor:
    return (label + 1) * 0.125  # exact in float32


def _gray(label: torch.Tensor) -> torch.Tensor:
    return 20.0 * label + 15


def _block_sample(height: int = 48, width: int = 64) -> dict:
    """Constant blocks of BLOCK pixels; every modality is a function of the block's label."""
    rows = torch.arange(height)[:, None] // BLOCK
    cols = torch.arange(width)[None, :] // BLOCK
    label = (rows * 5 + cols * 3) % NUM_LABELS
    return {
        "inputs": [
            _colour(label.float()),
            _depth(label.float()).expand(3, -1, -1).clone(),
            _gray(label.float()).expand(3, -1, -1).clone(),
        ],
        "kinds": ["rgb", "depth", "gray"],
        "mask": label.long(),
        "name": "blocks",
    }


def _uniform_neighbourhood(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """True where the (2r+1)^2 window around a pixel holds one label (inside the image)."""
    m = mask[None, None].float()
    size = 2 * radius + 1
    high = F.max_pool2d(m, size, stride=1, padding=radius)
    low = -F.max_pool2d(-m, size, stride=1, padding=radius)
    inside = torch.zeros_like(mask, dtype=torch.bool)
    inside[radius:-radius, radius:-radius] = True
    return (high == low)[0, 0] & inside


def test_train_transform_keeps_modalities_aligned() -> None:
    transform = train_transform(crop_size=64, min_short_side=40, scale=(0.5, 2.0))
    checked = 0
    saw_padding = False
    for seed in range(12):
        torch.manual_seed(seed)
        out = transform(_block_sample())
        rgb, depth, gray = out["inputs"]
        mask = out["mask"]
        assert rgb.shape == depth.shape == gray.shape == (3, 64, 64)
        assert mask.shape == (64, 64) and mask.dtype == torch.int64
        pad = mask == 255
        saw_padding |= bool(pad.any())
        # Nearest-resampled modalities must match the mask exactly, padding included.
        labels = mask.clamp(max=NUM_LABELS - 1).float()
        for channel, fill in zip(depth, DEPTH_FILL, strict=True):
            expected = torch.where(pad, torch.tensor(fill), _depth(labels))
            assert torch.equal(channel, expected)
        # Padding of the image normalises to ~0 (the fill is the ImageNet mean).
        if pad.any():
            assert rgb[:, pad].abs().max() < 1e-4
        # Bicubic photographs match in block interiors.
        interior = _uniform_neighbourhood(mask, radius=4) & ~pad
        raw_rgb = (rgb * STD + MEAN) * 255
        assert torch.allclose(raw_rgb[:, interior], _colour(labels[interior]), atol=0.05)
        raw_gray = gray * 0.5 * 255 + 0.5 * 255
        assert torch.allclose(
            raw_gray[:, interior], _gray(labels[interior]).expand(3, -1), atol=0.05
        )
        checked += int(interior.sum())
    assert saw_padding
    assert checked > 12 * 300


def test_random_scale_floor_and_interpolation() -> None:
    sample = _block_sample(40, 80)
    assert RandomScale(0.5, 0.5, min_short_side=0)(sample)["mask"].shape == (20, 40)
    out = RandomScale(0.5, 0.5, min_short_side=30)(sample)
    assert out["mask"].shape == (30, 60)
    assert all(x.shape == (3, 30, 60) for x in out["inputs"])
    # Nearest keeps only values that existed; bicubic overshoot is clamped to 0..255.
    assert set(out["mask"].unique().tolist()) <= set(range(NUM_LABELS))
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 255.0
    image = {"inputs": [checker.expand(3, -1, -1).clone()], "kinds": ["rgb"], "name": "c"}
    up = RandomScale(1.7, 1.7, 0)(image)["inputs"][0]
    assert up.min() == 0.0 and up.max() == 255.0
    assert "mask" not in RandomScale()(image)


def test_pad_is_symmetric_and_uses_fills() -> None:
    sample = _block_sample(10, 21)
    out = Pad(size=(16, 24))(sample)
    mask = out["mask"]
    assert mask.shape == (16, 24)
    assert torch.equal(mask[3:13, 1:22], sample["mask"])
    ignore = torch.ones(16, 24, dtype=torch.bool)
    ignore[3:13, 1:22] = False
    assert torch.all(mask[ignore] == 255)
    rgb, depth, gray = out["inputs"]
    assert rgb[:, 0, 0].tolist() == pytest.approx(IMAGE_FILL)
    assert gray[:, 15, 23].tolist() == pytest.approx(IMAGE_FILL)
    assert depth[:, 0, 23].tolist() == pytest.approx(DEPTH_FILL)
    assert torch.equal(depth[:, 3:13, 1:22], sample["inputs"][1])
    assert Pad(8)(sample) is sample  # already large enough


def test_flip_and_crop_move_everything_together() -> None:
    sample = _block_sample()
    flipped = RandomHorizontalFlip(p=1.0)(sample)
    assert torch.equal(flipped["mask"], sample["mask"].flip(-1))
    for before, after in zip(sample["inputs"], flipped["inputs"], strict=True):
        assert torch.equal(after, before.flip(-1))
    assert RandomHorizontalFlip(p=0.0)(sample) is sample

    torch.manual_seed(3)
    crop = RandomCrop((16, 24))(sample)
    mask = crop["mask"]
    assert mask.shape == (16, 24)
    # Locate the crop window in the original mask via the exact depth values.
    depth = sample["inputs"][1]
    hits = [
        (top, left)
        for top in range(48 - 16 + 1)
        for left in range(64 - 24 + 1)
        if torch.equal(sample["mask"][top : top + 16, left : left + 24], mask)
    ]
    assert hits
    top, left = hits[0]
    assert torch.equal(crop["inputs"][1], depth[:, top : top + 16, left : left + 24])
    assert torch.equal(crop["inputs"][0], sample["inputs"][0][:, top : top + 16, left : left + 24])


def test_crop_larger_than_sample_is_one_line_error() -> None:
    with pytest.raises(CenError) as excinfo:
        RandomCrop(100)(_block_sample())
    message = str(excinfo.value)
    assert "\n" not in message and "blocks" in message and "48x64" in message


def test_normalize_per_kind() -> None:
    sample = _block_sample(8, 8)
    out = Normalize()(sample)
    rgb, depth, gray = out["inputs"]
    torch.testing.assert_close(rgb, (sample["inputs"][0] / 255 - MEAN) / STD)
    assert torch.equal(depth, sample["inputs"][1])
    torch.testing.assert_close(gray, sample["inputs"][2] / 127.5 - 1)
    assert torch.equal(out["mask"], sample["mask"])
    assert torch.equal(val_transform()(sample)["inputs"][0], rgb)
    with pytest.raises(CenError, match="kind 'hha'"):
        Normalize()({**sample, "kinds": ["rgb", "hha", "gray"]})


def test_determinism_under_manual_seed() -> None:
    transform = train_transform(crop_size=40, min_short_side=30)
    sample = _block_sample()
    outputs = []
    for seed in (1, 1, 2, 3, 4):
        torch.manual_seed(seed)
        outputs.append(transform(sample))
    assert torch.equal(outputs[0]["mask"], outputs[1]["mask"])
    for a, b in zip(outputs[0]["inputs"], outputs[1]["inputs"], strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(outputs[0]["mask"], o["mask"]) for o in outputs[2:])
    # The input sample is never modified in place.
    assert torch.equal(sample["inputs"][0], _block_sample()["inputs"][0])


def test_train_transform_pads_depth_in_its_own_scale() -> None:
    sample = _block_sample(24, 24)
    torch.manual_seed(0)
    out = train_transform(crop_size=64, min_short_side=24, scale=(1.0, 1.0), depth_scale=1e-3)(
        sample
    )
    depth, mask = out["inputs"][1], out["mask"]
    padding = mask == 255
    assert padding.any()
    expected = torch.tensor(IMAGE_FILL)[:, None] * 1e-3
    torch.testing.assert_close(depth[:, padding], expected.expand(3, int(padding.sum())))
