"""Fidelity to the released CEN segmentation code.

``data/released_r50_outputs.pt`` (described in ``data/README.md``) holds what the released
model code (unchanged, CPU fp32, eval mode) outputs for a ResNet-50 CEN RefineNet, 40
classes, 2 modalities, on weights given by the deterministic rule below and on fixed inputs.
We rebuild those weights in the released checkpoint layout, load them with our importer and
require the same outputs.
"""

import math
import zlib
from pathlib import Path

import pytest
import torch

from cenfusion import load_official_checkpoint

GOLDEN = Path(__file__).parent / "data" / "released_r50_outputs.pt"


def _released_weight(key: str, shape: list[int]) -> torch.Tensor:
    """The golden file's weight rule: every key drawn from its own crc32-seeded generator."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    if key == "alpha":
        return torch.randn(shape, generator=g)
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.int64)
    if ".bn_" in key:
        if key.endswith(".weight"):
            w = torch.rand(shape, generator=g) * 0.5 + 0.5
            if key.startswith("layer") and ".bn2.bn_" in key:
                low = torch.rand(shape, generator=g) < 0.3
                small = (torch.rand(shape, generator=g) - 0.5) * 0.02
                w = torch.where(low, small, w)
            return w
        if key.endswith(".bias"):
            return torch.randn(shape, generator=g) * 0.05
        if key.endswith(".running_mean"):
            return torch.randn(shape, generator=g) * 0.1
        if key.endswith(".running_var"):
            return torch.rand(shape, generator=g) * 0.5 + 0.75
    if len(shape) == 4:
        fan_in = shape[1] * shape[2] * shape[3]
        return torch.randn(shape, generator=g) * math.sqrt(1 / fan_in)
    if len(shape) == 1 and key.endswith("bias"):
        return torch.randn(shape, generator=g) * 0.01
    raise AssertionError(f"the weight rule has no case for {key} {shape}")


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(GOLDEN, map_location="cpu", weights_only=True)


def test_released_weights_give_released_outputs(golden, tmp_path) -> None:
    state = {f"module.{k}": _released_weight(k, shape) for k, shape in golden["keys"].items()}
    path = tmp_path / "cen_r50_golden.pth.tar"
    torch.save({"segmenter": state}, path)
    model = load_official_checkpoint(path, bn_threshold=golden["threshold"]).eval()
    assert model.config.backbone == "resnet50" and model.config.num_classes == 40
    exchanging = sum(
        int((state[k].abs() < golden["threshold"]).sum())
        for k in state
        if k.startswith("module.layer") and ".bn2.bn_" in k and k.endswith(".weight")
    )
    assert exchanging == 2269
    with torch.no_grad():
        heads = model(golden["inputs"])
    assert len(heads) == len(golden["outputs"]) == 3
    for name, ours, released in zip(("rgb", "depth", "ensemble"), heads, golden["outputs"]):
        assert ours.shape == released.shape, name
        rel = float((ours - released).norm() / released.norm())
        assert rel < 1e-5, f"{name} head: relative error {rel:.3g}"
