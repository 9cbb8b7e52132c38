"""A narrow ResNet-26 in timm's registry, for CEN runs that must train to a plateau on a CPU.

``resnet26_narrow`` is timm's ResNet-26 (bottleneck blocks, two per stage, exchange points at
every ``bn2`` as in the larger ResNets) at a quarter of the widths: bottleneck planes 16, 32,
64, 128, so the four levels the decoder reads have 64, 128, 256 and 512 channels. Registering
it with timm (rather than passing widths at build time) lets its name alone rebuild it, which
is what checkpoints and ``--backbone`` store. It has no pretrained weights, and its last norm of
every block starts at 1, as in torchvision's ResNet (the released code's), not at timm's 0:
a branch that starts closed stays nearly closed for thousands of SGD steps, which leaves a
short CPU run with an encoder of stem and shortcuts.

The scales of the norms where CEN exchanges (every bottleneck's ``bn2``) start spread,
uniform in [0, 1), as a pretrained network's are, instead of all at 1. From equal scales the
sparsity term cannot select within a short run: the task gradient on a scale is orders of
magnitude below any ``lamda`` that moves scales to the threshold in a thousand steps, so every
penalised scale follows the same path and crosses in the same epoch (all or none exchanged).
From spread scales, those that start low reach the threshold first unless the task holds them
up, and the fraction exchanged grows through the run as it does in the paper's fine-tuning.
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, register_model
from timm.models.resnet import Bottleneck, ResNet
from torch import nn

#: timm reads a model's default configuration from its module under this name.
default_cfgs: dict[str, dict[str, Any]] = {
    "resnet26_narrow": {"num_classes": 1000, "input_size": (3, 224, 224)}
}


@register_model
def resnet26_narrow(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-26 with bottleneck planes (16, 32, 64, 128): 0.9 M parameters without the head.

    Every bottleneck's ``bn2`` scale starts uniform in [0, 1) (module docstring).
    """
    model = build_model_with_cfg(
        ResNet,
        "resnet26_narrow",
        pretrained,
        block=Bottleneck,
        layers=(2, 2, 2, 2),
        channels=(16, 32, 64, 128),
        **{"zero_init_last": False, **kwargs},
    )
    for module in model.modules():
        if isinstance(module, Bottleneck):
            nn.init.uniform_(module.bn2.weight, 0.0, 1.0)
    return model
