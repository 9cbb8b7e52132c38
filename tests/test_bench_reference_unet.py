"""The benchmark's per-modality translation reference computes what cenfusion's CEN U-Net
and its PatchGAN compute."""

import copy

import pytest
import torch

from cenfusion import sparsity_penalty
from cenfusion.bench.reference import PrivateInstanceNorm, reference_penalty
from cenfusion.bench.reference_unet import PerBranchDiscriminator, ReferenceUNet
from cenfusion.fusion import ModalityInstanceNorm2d
from cenfusion.models.patchgan import create_patchgan
from cenfusion.models.unet import create_cen_unet


@pytest.fixture(scope="module", params=[2, 3])
def model(request):
    """A small CEN U-Net whose modalities differ and whose exchange is active."""
    torch.manual_seed(request.param)
    model = create_cen_unet(num_modalities=request.param, ngf=8, num_downs=5, drop_rate=0.0)
    with torch.no_grad():
        for norm in model.modules():
            if isinstance(norm, ModalityInstanceNorm2d):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0, 0.1)
                if norm.exchange:
                    norm.weight[norm.penalty_mask & (torch.rand(norm.weight.shape) < 0.5)] = 0.0
        model.ensemble.alpha.normal_()
    return model


def inputs(m: int) -> list[torch.Tensor]:
    return [torch.randn(2, 3, 32, 64) for _ in range(m)]


def test_outputs_match(model) -> None:
    reference = ReferenceUNet(model)
    xs = inputs(model.num_modalities)
    with torch.no_grad():
        ours = model(xs)
        torch.testing.assert_close(reference(xs), ours, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(reference(torch.cat(xs)), ours, rtol=1e-4, atol=1e-5)


def test_gradients_match(model) -> None:
    """In float64, so that rounding flips no ReLU between the two."""
    ours = copy.deepcopy(model).double()
    theirs_model = copy.deepcopy(model).double()
    theirs = ReferenceUNet(theirs_model)
    xs = [x.double() for x in inputs(model.num_modalities)]
    target = torch.rand(2, 3, 32, 64, dtype=torch.float64)
    for net, penalty in ((ours, sparsity_penalty(ours, 1e-2)), (theirs, None)):
        penalty = reference_penalty(theirs, 1e-2) if penalty is None else penalty
        ((net(xs) - target).abs().mean() + penalty).backward()
    conv = "down.2.conv.weight"
    torch.testing.assert_close(theirs_model.get_parameter(conv).grad, ours.get_parameter(conv).grad)
    private = [n for n in theirs.modules() if isinstance(n, PrivateInstanceNorm)]
    our_norms = [n for n in ours.modules() if isinstance(n, ModalityInstanceNorm2d)]
    assert len(private) == len(our_norms) == 2 * 5 - 3
    for norm, ref in zip(our_norms, private):
        for m, one in enumerate(ref.norms):
            torch.testing.assert_close(norm.weight.grad[m], one.weight.grad)
    torch.testing.assert_close(theirs.alpha.grad, ours.ensemble.alpha.grad)


def test_the_discriminator_per_branch_equals_the_stacked_call() -> None:
    torch.manual_seed(0)
    discriminator = create_patchgan(ndf=8)
    pairs = torch.randn(3 * 2, 6, 64, 64)
    expected = discriminator(pairs)
    batches: list[int] = []
    discriminator.register_forward_pre_hook(lambda _, args: batches.append(args[0].shape[0]))
    torch.testing.assert_close(PerBranchDiscriminator(discriminator, 3)(pairs), expected)
    assert batches == [2, 2, 2]
