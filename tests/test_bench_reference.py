"""The benchmark's per-modality reference computes what cenfusion's CEN RefineNet computes."""

import copy

import pytest
import torch
import torch.nn.functional as F

from cenfusion import create_cen_refinenet, sparsity_penalty
from cenfusion.bench import reference as reference_cen
from cenfusion.fusion import ModalityBatchNorm2d, fastpath


@pytest.fixture(scope="module", params=[2, 3])
def model(request):
    """R50 CEN RefineNet whose modalities differ and whose exchange is active."""
    torch.manual_seed(request.param)
    model = create_cen_refinenet(
        depth=50, num_classes=3, num_modalities=request.param, drop_rate=0.0, decoder_width=32
    )
    with torch.no_grad():
        for norm in model.modules():
            if isinstance(norm, ModalityBatchNorm2d):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0, 0.1)
                norm.running_mean.normal_(0, 0.1)
                norm.running_var.uniform_(0.5, 2.0)
                if norm.exchange:
                    norm.weight[norm.penalty_mask & (torch.rand(norm.weight.shape) < 0.5)] = 0.0
        model.ensemble.alpha.normal_()
    return model


@pytest.fixture(params=["custom", "recorded"])
def norm_path(request, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every private norm on the custom function, or every one on the recorded operations
    (by default the plane size picks per norm)."""
    monkeypatch.setattr(fastpath, "CUSTOM_MIN_PLANE", 0 if request.param == "custom" else 10**9)
    return request.param


def inputs(m: int) -> list[torch.Tensor]:
    return [torch.randn(2, 3, 64, 48) for _ in range(m)]


def assert_same(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_exchange_is_active(model) -> None:
    zeroed = [bool((n.weight == 0).any()) for n in model.modules() if getattr(n, "exchange", 0)]
    assert zeroed and all(zeroed)


def test_eval_outputs_match(model, norm_path: str) -> None:
    reference = reference_cen.ReferenceCEN(model).eval()
    model.eval()
    xs = inputs(model.num_modalities)
    with torch.no_grad():
        assert_same(model(xs), reference(xs))


def test_training_step_matches(model, norm_path: str) -> None:
    """In float64: in float32, rounding flips a few ReLUs and the gradients then differ."""
    ours = copy.deepcopy(model).double().train()
    theirs_model = copy.deepcopy(model).double()
    theirs = reference_cen.ReferenceCEN(theirs_model).train()
    xs = [x.double() for x in inputs(model.num_modalities)]
    target = torch.randint(0, 3, (2, 16, 12))

    def loss(outs, penalty):
        return sum(F.cross_entropy(o, target) for o in outs) + penalty

    outs, ref_outs = ours(xs), theirs(xs)
    assert_same(outs, ref_outs)
    loss(outs, sparsity_penalty(ours, 1e-2)).backward()
    loss(ref_outs, reference_cen.reference_penalty(theirs, 1e-2)).backward()

    conv = "encoder.layer3.0.conv2.weight"
    torch.testing.assert_close(ours.get_parameter(conv).grad, theirs_model.get_parameter(conv).grad)
    ref_norms = [n for n in theirs.modules() if isinstance(n, reference_cen.PrivateBatchNorm)]
    our_norms = [n for n in ours.modules() if isinstance(n, ModalityBatchNorm2d)]
    assert len(ref_norms) == len(our_norms) == 53
    for norm, ref in zip(our_norms, ref_norms):
        for m, bn in enumerate(ref.norms):
            torch.testing.assert_close(norm.running_var[m], bn.running_var)
            torch.testing.assert_close(norm.weight.grad[m], bn.weight.grad)
