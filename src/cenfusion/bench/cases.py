"""What ``cen bench`` times: the networks (seeded, with exchange active), their inputs, and one
inference call or one training step of each, computed by the same functions training uses.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from cenfusion.bench.reference import ReferenceCEN, reference_penalty
from cenfusion.bench.reference_unet import ReferenceUNet
from cenfusion.engine.runtime import Precision
from cenfusion.fusion import exchanging_norms, sparsity_penalty
from cenfusion.models.patchgan import PatchDiscriminator, create_patchgan
from cenfusion.models.refinenet import CENRefineNet, create_cen_refinenet
from cenfusion.models.unet import CENUNet, create_cen_unet
from cenfusion.segmentation.train import segmentation_step
from cenfusion.translation.losses import pix2pix_step

#: Classes of the segmentation network (NYUDv2-40), the released lamda and learning rate.
NUM_CLASSES, LAMDA, LR = 40, 2e-4, 1e-3
#: The released translation loss weights: L1 and the sparsity term's lamda.
I2I_L1_WEIGHT, I2I_LAMDA = 100.0, 1e-3

Step = Callable[[], object]
Inputs = list[Tensor] | Tensor


def with_exchange(model: nn.Module) -> nn.Module:
    """Half of each modality's penalised gammas set to zero, as after sparsity training, so
    that the exchange really copies channels."""
    with torch.no_grad():
        for _, norm in exchanging_norms(model):
            every_other = torch.arange(norm.num_features, device=norm.weight.device) % 2 == 0
            norm.weight[norm.penalty_mask & every_other] = 0.0
    return model


def refinenet(depth: int, num_modalities: int = 2) -> CENRefineNet:
    """The benchmark's CEN RefineNet: seeded, exchange active, no pretrained download."""
    torch.manual_seed(0)
    model = create_cen_refinenet(
        depth=depth, num_classes=NUM_CLASSES, num_modalities=num_modalities, pretrained=None
    )
    return with_exchange(model)


def translation_networks(ngf: int, num_downs: int) -> tuple[CENUNet, PatchDiscriminator]:
    torch.manual_seed(0)
    generator = with_exchange(create_cen_unet(num_modalities=2, ngf=ngf, num_downs=num_downs))
    return generator, create_patchgan(ndf=ngf)


def images(batch: int, size: tuple[int, int], num_modalities: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, *size, generator=generator) for _ in range(num_modalities)]


def reference_difference(
    model: nn.Module,
    make_reference: Callable[[nn.Module], nn.Module],
    inputs: Inputs,
    training: bool,
) -> float:
    """Largest difference between ``model``'s heads and those of its per-modality reference
    on ``inputs``, relative to the outputs' scale: eval mode and, with ``training``, training
    mode with dropout off (its masks are random). TF32 is off for the check, so that both
    compute in float32."""
    model, tf32 = copy.deepcopy(model), torch.backends.cudnn.allow_tf32
    reference = make_reference(model)
    for module in (*model.modules(), *reference.modules()):
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    torch.backends.cudnn.allow_tf32 = False
    worst = 0.0
    try:
        for mode in (False, True)[: 1 + training]:
            model.train(mode), reference.train(mode)
            with torch.no_grad():
                for ours, theirs in zip(model(inputs), reference(inputs)):
                    diff = float((ours - theirs).abs().max() / theirs.abs().max())
                    worst = max(worst, diff)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    return worst


def penalty_of(model: nn.Module, lamda: float) -> Callable[[], Tensor]:
    """The sparsity term of ``model``: a reference's over its per-modality norms."""
    if isinstance(model, (ReferenceCEN, ReferenceUNet)):
        return partial(reference_penalty, model, lamda)
    return partial(sparsity_penalty, model, lamda)


def inference(
    net: Callable[[list[Tensor]], object], xs: list[Tensor], precision: Precision
) -> Step:
    """One forward pass without gradients."""

    def step() -> None:
        with torch.no_grad(), precision.autocast():
            net(xs)

    return step


def fid_views(
    net: Callable[[list[Tensor]], Tensor],
    extractor: Callable[[Tensor], Tensor],
    xs: list[Tensor],
    precision: Precision,
) -> Step:
    """Validation views as translation's evaluator scores them, once the real images'
    features are known: the generator's heads, then the FID Inception's features of each."""

    def step() -> None:
        with torch.no_grad():
            with precision.autocast():
                heads = net(xs)
            for head in heads.float().clamp(-1, 1):
                extractor(head)

    return step


def segmentation_training(
    net: Callable[[list[Tensor]], Tensor],
    model: nn.Module,
    xs: list[Tensor],
    precision: Precision,
) -> Step:
    """One SGD step of the released loss (every head's cross-entropy at the label size plus
    the sparsity term) on labels of every class."""
    batch, _, height, width = xs[0].shape
    generator = torch.Generator().manual_seed(2)
    target = torch.randint(0, NUM_CLASSES, (batch, height, width), generator=generator)
    target = target.to(xs[0].device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    penalty = penalty_of(model, LAMDA)
    return partial(segmentation_step, net, penalty, xs, target, optimizer, precision)


def translation_training(
    generator: nn.Module,
    discriminator: nn.Module,
    nets: tuple[nn.Module, nn.Module],
    xs: list[Tensor],
    precision: Precision,
) -> Step:
    """One pix2pix step (D, then G against the updated D), the released Adam settings and
    loss weights; ``generator`` and ``discriminator`` are the bare modules of ``nets``."""
    optimizers = (
        torch.optim.Adam(generator.parameters(), lr=2e-4, betas=(0.5, 0.999)),
        torch.optim.Adam(discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999)),
    )
    target = torch.zeros_like(xs[0]).uniform_(-1, 1)
    penalty = penalty_of(generator, I2I_LAMDA)
    return partial(
        pix2pix_step,
        nets,
        discriminator,
        optimizers,
        torch.cat(xs),
        target,
        I2I_L1_WEIGHT,
        penalty,
        precision,
    )
