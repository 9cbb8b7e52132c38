import copy
import fnmatch
import math
import warnings

import pytest
import timm
import torch
import torchvision
from fusion_reference import LoopNorm, assert_close, hand_built_norm, random_norm
from timm.utils.model import freeze_batch_norm_2d
from torch import nn

from cenfusion.errors import CenError
from cenfusion.fusion import (
    RESNET_EXCHANGE_POINTS,
    AlphaEnsemble,
    ExchangePointsError,
    ModalityBatchNorm2d,
    ModalityInstanceNorm2d,
    ModalityNorm,
    convert,
    exchange_stats,
    exchanging_norms,
    set_frozen_stats,
    sparsity_penalty,
    stack_modalities,
)
from cenfusion.models.refinenet import create_cen_refinenet
from cenfusion.models.unet import create_cen_unet


def to_reference(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model)
    for name, module in list(ref.named_modules()):
        if isinstance(module, ModalityNorm):
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent) if parent else ref, child, LoopNorm(module))
    return ref


def ours_grad(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_parameter(name).grad


def reference_grad(ref: nn.Module, name: str) -> torch.Tensor:
    path, _, param = name.rpartition(".")
    module = ref.get_submodule(path)
    if isinstance(module, LoopNorm):
        return torch.stack([getattr(bn, param).grad for bn in module.norms])
    return ref.get_parameter(name).grad


def sparsify(model: nn.Module, fraction: float = 0.3, seed: int = 0) -> None:
    """Push a random part of every exchanging gamma under its threshold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, norm in exchanging_norms(model):
            norm.weight.uniform_(0.5, 1.5, generator=g)
            low = torch.rand(norm.weight.shape, generator=g) < fraction
            norm.weight[low] = 1e-3
            norm.bias.normal_(0, 0.1, generator=g)


@pytest.mark.parametrize("num_modalities", [2, 3])
@pytest.mark.parametrize("train", [True, False])
def test_model_matches_per_modality_loop(num_modalities: int, train: bool) -> None:
    torch.manual_seed(0)
    model = create_cen_refinenet(
        backbone="resnet26", num_classes=5, num_modalities=num_modalities, drop_rate=0.0
    )
    sparsify(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ModalityBatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    ref = to_reference(model)
    model.train(train)
    ref.train(train)
    inputs = [torch.randn(2, 3, 48, 40) for _ in range(num_modalities)]

    outs = model(inputs)
    ref_outs = ref(inputs)
    assert len(outs) == num_modalities + 1
    for a, b in zip(outs, ref_outs):
        assert_close(a, b)

    loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs)
    ref_loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in ref_outs)
    loss.backward()
    ref_loss.backward()
    checked = 0
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        assert_close(param.grad, reference_grad(ref, name))
        checked += 1
    assert checked == sum(1 for _ in model.parameters())

    if train:
        for name, module in model.named_modules():
            if isinstance(module, ModalityBatchNorm2d):
                loop = ref.get_submodule(name)
                assert_close(module.running_mean, torch.stack([b.running_mean for b in loop.norms]))
                assert_close(module.running_var, torch.stack([b.running_var for b in loop.norms]))


@pytest.mark.parametrize("num_modalities", [2, 3])
def test_instance_norm_matches_per_modality_loop(num_modalities: int) -> None:
    torch.manual_seed(1)
    norm = ModalityInstanceNorm2d(6, num_modalities, exchange=True, threshold=0.1)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.weight[0, 1] = 0.01
        norm.weight[-1, 4] = -0.05
        norm.bias.normal_()
    ref = LoopNorm(norm)
    x = torch.randn(num_modalities * 2, 6, 5, 7, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, ref_out = norm(x), ref(x_ref)
    assert_close(out, ref_out)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (ref_out * weights).sum().backward()
    assert_close(x.grad, x_ref.grad)
    assert_close(norm.weight.grad, torch.stack([n.weight.grad for n in ref.norms]))


def test_exchange_sources_with_hand_built_gammas() -> None:
    gammas = torch.tensor(
        [
            [1.0, 0.05, 2.0, -0.01],
            [3.0, 4.0, 0.0, -0.5],
            [5.0, 6.0, 7.0, 0.08],
        ]
    )
    norm = hand_built_norm(gammas)
    x = torch.arange(1.0, 4.0).view(3, 1, 1, 1, 1).expand(3, 1, 4, 2, 2).reshape(3, 4, 2, 2)
    out = norm(x)[:, :, 0, 0]
    y = gammas * torch.arange(1.0, 4.0)[:, None]
    expected = torch.tensor(
        [
            [y[0, 0], (y[1, 1] + y[2, 1]) / 2, y[0, 2], (y[1, 3] + y[2, 3]) / 2],
            [y[1, 0], y[1, 1], (y[0, 2] + y[2, 2]) / 2, y[1, 3]],
            [y[2, 0], y[2, 1], y[2, 2], (y[0, 3] + y[1, 3]) / 2],
        ]
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert torch.equal(out[:, 0], y[:, 0])


def test_two_modalities_copy_exactly_and_gradient_reaches_source() -> None:
    gammas = torch.tensor([[0.3, 0.001, 0.7], [0.9, 0.4, 0.002]])
    norm = hand_built_norm(gammas)
    x = torch.randn(2 * 3, 3, 4, 4, requires_grad=True)
    out = norm(x).view(2, 3, 3, 4, 4)
    own = (gammas[:, None, :, None, None] * x.view(2, 3, 3, 4, 4)).detach()
    assert torch.equal(out[0, :, 1], own[1, :, 1])
    assert torch.equal(out[1, :, 2], own[0, :, 2])
    assert torch.equal(out[0, :, 0], own[0, :, 0])
    out[0, :, 1].sum().backward()
    grad = x.grad.view(2, 3, 3, 4, 4)
    assert torch.all(grad[1, :, 1] == gammas[1, 1])
    assert torch.all(grad[0, :, 1] == 0)


def test_channel_above_threshold_everywhere_is_untouched() -> None:
    gammas = torch.tensor([[0.5, 0.0, 0.2], [0.6, 0.3, -0.01], [0.7, 0.2, 0.9]])
    norm = hand_built_norm(gammas)
    x = torch.randn(3 * 2, 3, 3, 3)
    out = norm(x).view(3, 2, 3, 3, 3)
    own = gammas[:, None, 0, None, None] * x.view(3, 2, 3, 3, 3)[:, :, 0]
    assert torch.equal(out[:, :, 0], own)


def test_sparsity_parts_are_disjoint_and_cover() -> None:
    for m, c in [(2, 8), (3, 10), (4, 7)]:
        norm = ModalityBatchNorm2d(c, m, exchange=True)
        mask = norm.penalty_mask
        assert torch.equal(mask.sum(0), torch.ones(c, dtype=torch.long))
        for i in range(m):
            owned = mask[i].nonzero().flatten()
            assert len(owned) >= c // m
            assert torch.equal(owned, torch.arange(owned[0], owned[-1] + 1))
    assert torch.equal(
        ModalityBatchNorm2d(8, 2, exchange=True).penalty_mask,
        torch.tensor([[1] * 4 + [0] * 4, [0] * 4 + [1] * 4], dtype=torch.bool),
    )


def test_sparsity_penalty_value_and_lambda_zero() -> None:
    model = nn.Sequential(
        ModalityBatchNorm2d(4, 2, exchange=True),
        ModalityBatchNorm2d(6, 3, exchange=True),
        ModalityBatchNorm2d(5, 2, exchange=False),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    w0, w1 = model[0].weight, model[1].weight
    expected = (
        w0[0, :2].abs().sum()
        + w0[1, 2:].abs().sum()
        + w1[0, :2].abs().sum()
        + w1[1, 2:4].abs().sum()
        + w1[2, 4:].abs().sum()
    )
    torch.testing.assert_close(sparsity_penalty(model, 0.5), 0.5 * expected)
    zero = sparsity_penalty(model, 0.0)
    assert float(zero) == 0.0 and not zero.requires_grad


def test_exchange_stats_per_point_and_overall() -> None:
    model = nn.Sequential(
        ModalityBatchNorm2d(4, 2, exchange=True, threshold=0.1),
        ModalityBatchNorm2d(4, 2, exchange=True, threshold=0.1),
    )
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.0, 0.5, 0.0, 0.0], [1.0, 1.0, 0.05, 1.0]]))
        model[1].weight.fill_(1.0)
    stats = exchange_stats(model)
    assert stats.per_point == {"0": 0.5, "1": 0.0}
    assert stats.overall == pytest.approx(2 / 8)


def test_the_ensemble_refuses_other_counts_and_a_penalty_needs_no_parameters() -> None:
    with pytest.raises(ValueError, match=r"^expected the 2 modalities' predictions stacked along"):
        AlphaEnsemble(2)(torch.randn(3, 1, 3))
    with pytest.raises(ValueError, match=r"stacked along axis 0, got list$"):
        AlphaEnsemble(2)([torch.randn(1, 3)] * 2)
    assert sparsity_penalty(nn.ReLU(), 0.0) == 0
    with pytest.raises(CenError, match=r"^num_modalities=0: expected an integer of at least 1"):
        AlphaEnsemble(0)
    for lamda in (-1e-3, math.nan, True, "1e-3", None):
        with pytest.raises(CenError, match=rf"^lamda={lamda!r}: expected a finite number >= 0"):
            sparsity_penalty(nn.ReLU(), lamda)
    with pytest.raises(
        CenError, match=r"^lamda: expected one number, got a tensor of shape \(2,\)"
    ):
        sparsity_penalty(nn.ReLU(), torch.ones(2))
    norm = _exchanging_norm()
    torch.testing.assert_close(
        sparsity_penalty(norm, torch.tensor(2.0)), sparsity_penalty(norm, 2.0)
    )
    for call in (lambda: sparsity_penalty(None, 1e-3), lambda: exchange_stats(None)):
        with pytest.raises(CenError, match="^model=NoneType: expected a torch.nn.Module"):
            call()


@pytest.mark.parametrize("norm", [ModalityBatchNorm2d, ModalityInstanceNorm2d])
def test_a_private_norm_refuses_bad_arguments_in_one_line(norm) -> None:
    for options, message in (
        ({"num_features": 8, "num_modalities": 2.5}, r"^num_modalities=2.5: expected an integer"),
        ({"num_features": 8, "num_modalities": "2"}, r"^num_modalities='2': expected an integer"),
        ({"num_features": -3, "num_modalities": 2}, r"^num_features=-3: expected an integer"),
        ({"num_features": 8, "num_modalities": 2, "exchange": True, "threshold": -1},
         r"^threshold=-1: expected a finite number >= 0"),
        ({"num_features": 8, "num_modalities": 2, "threshold": None},
         r"^threshold=None: expected a finite number >= 0"),
        ({"num_features": 8, "num_modalities": 1, "exchange": True},
         r"^channel exchange needs at least two modalities"),
    ):  # fmt: skip
        with pytest.raises(CenError, match=message):
            norm(**options)


def test_ensemble_weights_and_detach() -> None:
    outs = torch.randn(3, 2, 4, 5, 5, requires_grad=True)
    ens = AlphaEnsemble(3)
    with torch.no_grad():
        ens.alpha.copy_(torch.tensor([0.0, 1.0, 2.0]))
    w = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0)
    result = ens(outs)
    torch.testing.assert_close(result, (w[:, None, None, None, None] * outs).sum(0))
    result.sum().backward()
    assert outs.grad is None and ens.alpha.grad is not None
    AlphaEnsemble(3, detach=False)(outs).sum().backward()
    assert outs.grad is not None


@pytest.mark.parametrize(
    ("name", "exchange_at"),
    [
        ("resnet26", RESNET_EXCHANGE_POINTS),
        ("resnext50_32x4d", RESNET_EXCHANGE_POINTS),
        ("resnext26ts", ("stages_*.*.conv2_kxk.bn",)),
        ("efficientnet_b0", ("blocks.*.*.bn2",)),
    ],
)
def test_convert_keeps_function_for_identical_modalities(name: str, exchange_at) -> None:
    torch.manual_seed(0)
    plain = timm.create_model(name, features_only=True, out_indices=(1, 2, 3, 4)).eval()
    with torch.no_grad():
        for module in plain.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.weight.uniform_(-0.05, 1.0)
    selected = [
        n
        for n, m in plain.named_modules()
        if isinstance(m, nn.BatchNorm2d) and any(fnmatch.fnmatchcase(n, p) for p in exchange_at)
    ]
    cen = convert(copy.deepcopy(plain), 3, exchange_at).eval()
    assert not any(type(m) is nn.BatchNorm2d for m in cen.modules())
    points = [n for n, _ in exchanging_norms(cen)]
    assert len(selected) >= 8 and points == selected
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = plain(x)
        outs = cen(torch.cat([x, x, x]))
    for r, o in zip(ref, outs):
        torch.testing.assert_close(o, torch.cat([r, r, r]), rtol=1e-4, atol=1e-5)


def test_frozen_stats_use_and_keep_running_statistics() -> None:
    torch.manual_seed(0)
    norm = ModalityBatchNorm2d(3, 2)
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2)
    before = norm.running_mean.clone()
    set_frozen_stats(norm)
    x = torch.randn(4, 3, 5, 5)
    train_out = norm.train()(x)
    assert torch.equal(norm.running_mean, before)
    torch.testing.assert_close(train_out, norm.eval()(x))


def test_four_modalities_take_the_mean_of_the_other_three() -> None:
    gammas = torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0], [4.0, 0.01]])
    norm = hand_built_norm(gammas)
    x = torch.arange(1.0, 5.0).view(4, 1, 1, 1).expand(4, 2, 3, 3).contiguous()
    out = norm(x)[:, :, 0, 0]
    y = gammas * torch.arange(1.0, 5.0)[:, None]
    torch.testing.assert_close(out[0, 0], (y[1, 0] + y[2, 0] + y[3, 0]) / 3)
    torch.testing.assert_close(out[3, 1], (y[0, 1] + y[1, 1] + y[2, 1]) / 3)
    assert torch.equal(out[1:, 0], y[1:, 0]) and torch.equal(out[:3, 1], y[:3, 1])


@pytest.mark.parametrize("size", [(5, 6), (24, 24)])
def test_stack_not_a_multiple_of_the_modalities_is_refused(size: tuple[int, int]) -> None:
    norm = random_norm(3)
    with pytest.raises(ValueError, match="not a multiple of 3 modalities"):
        norm(torch.randn(4, 7, *size))
    with pytest.raises(ValueError, match="of 4 is not a multiple of 3 modalities .give M tensors"):
        stack_modalities(torch.randn(4, 7, *size), 3)
    assert stack_modalities(torch.randn(6, 7, *size), 3).shape == (6, 7, *size)


def test_exchange_points_that_select_nothing_are_refused() -> None:
    """ResNet's points on another family, or a misspelt pattern, would train without any
    exchange: each pattern must select a BatchNorm, and the error shows their names."""
    net = timm.create_model("mobilenetv3_small_100", features_only=True)
    with pytest.raises(ExchangePointsError) as excinfo:
        convert(copy.deepcopy(net), 2)
    assert str(excinfo.value) == (
        "exchange point 'layer*.*.bn2' matches none of the model's 34 BatchNorms, named like "
        "bn1, blocks.*.*.bn1, blocks.*.*.bn2, blocks.*.*.bn3 (e.g. blocks.0.0.bn1, "
        "blocks.0.0.bn2, blocks.1.0.bn1)"
    )
    flat = nn.Sequential(
        nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3)
    )
    with pytest.raises(ExchangePointsError, match=r"named like \* \(e\.g\. 1, 3\)$"):
        convert(flat, 2)
    with pytest.raises(ExchangePointsError, match="^the model is itself a BatchNorm2d: convert"):
        convert(nn.BatchNorm2d(3), 2, ())
    with pytest.raises(ExchangePointsError, match="^exchange point 'blocks.*.bn9' matches"):
        convert(copy.deepcopy(net), 2, ("blocks.*.*.bn2", "blocks.*.bn9"))
    with pytest.raises(ExchangePointsError, match="^the selector matches none of the model's"):
        convert(copy.deepcopy(net), 2, lambda name, module: False)
    dense = timm.create_model("densenet121", features_only=True)
    with pytest.raises(ExchangePointsError) as excinfo:
        convert(dense, 2)
    # the digits that end a part are indices too, but for the norm's own name; a shape is
    # a pattern
    assert str(excinfo.value).startswith(
        "exchange point 'layer*.*.bn2' matches none of the model's 121 BatchNorms, named like "
        "features_norm0, features_denseblock*.denselayer*.norm1, "
        "features_denseblock*.denselayer*.norm2, features_transition1.norm, "
    )
    with pytest.raises(ExchangePointsError, match=r"named like stem.bn, s\*.b\*.conv1.bn, s\*"):
        convert(timm.create_model("regnetx_002", features_only=True), 2)  # conv1.bn is a name
    assert len(exchanging_norms(convert(dense, 2, "features_denseblock*.denselayer*.norm2"))) == 58
    bn2 = [n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d) and n.endswith("bn2")]
    converted = convert(copy.deepcopy(net), 2, "blocks.*.*.bn2")
    assert [n for n, _ in exchanging_norms(converted)] == bn2
    assert not exchanging_norms(convert(net, 2, ()))


def test_resnets_points_on_a_network_with_a_layer1_alone_are_refused() -> None:
    """HRNet has a ResNet-like ``layer1``: ResNet's points would exchange there alone."""
    net = timm.create_model("hrnet_w18_small", features_only=True)
    with pytest.raises(
        ExchangePointsError,
        match=r"^ResNet's exchange points 'layer\*\.\*\.bn2' "
        r"match 1 of the model's \d+ BatchNorms, most of which lie outside",
    ):
        convert(copy.deepcopy(net), 2)
    assert len(exchanging_norms(convert(net, 2, "stage*.*.branches.*.*.bn2"))) > 10


def test_norms_that_stay_shared_are_warned_of(recwarn) -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4),
        nn.GroupNorm(2, 4),
        nn.LayerNorm(4),
        nn.BatchNorm2d(4, affine=False),
        nn.BatchNorm2d(4, track_running_stats=False),
        torchvision.ops.FrozenBatchNorm2d(4),
    )
    with pytest.warns(UserWarning) as caught:
        convert(net, 2, ())
    assert str(caught[0].message) == (
        "convert: 1 GroupNorm, 1 LayerNorm, 1 BatchNorm2d without affine parameters, "
        "1 BatchNorm2d without running statistics, 1 FrozenBatchNorm2d stay shared by the "
        "modalities (private norms are made of BatchNorm2d with affine parameters and running "
        "statistics)"
    )
    assert isinstance(net[1], ModalityBatchNorm2d)
    assert [type(m) for m in net[4:6]] == [nn.BatchNorm2d, nn.BatchNorm2d]
    convert(timm.create_model("resnet18", features_only=True), 2)
    assert not [w for w in recwarn if "stay shared" in str(w.message)]


def test_a_network_of_frozen_batchnorms_is_refused_naming_them() -> None:
    frozen = freeze_batch_norm_2d(timm.create_model("resnet18", features_only=True))
    with pytest.raises(ExchangePointsError) as excinfo:
        convert(frozen, 2)
    assert str(excinfo.value) == (
        "the model has no BatchNorm2d to make private (20 FrozenBatchNorm2d stay shared): "
        "channel exchange needs a BatchNorm CNN"
    )
    normfree = timm.create_model("nf_resnet26")
    with pytest.raises(ExchangePointsError, match="^the model has no BatchNorm2d to make priv"):
        convert(normfree, 2, ())  # private norms alone need norms too


def test_converted_norms_keep_the_mode_dtype_and_device_of_the_batchnorms() -> None:
    """A model converted in evaluation mode computes as before at once; a float64 model stays
    float64; a model on the meta device (FLOP counting) converts without data."""
    torch.manual_seed(0)
    plain = timm.create_model("resnet18", num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = plain(x)
        cen = convert(copy.deepcopy(plain), 2)
        assert not any(m.training for m in cen.modules())
        torch.testing.assert_close(cen(torch.cat([x, x]))[:2], expected)
    double = convert(copy.deepcopy(plain).double(), 2)
    assert {p.dtype for p in double.parameters()} == {torch.float64}
    assert double(torch.cat([x, x]).double()).dtype == torch.float64
    with torch.device("meta"):
        on_meta = timm.create_model("resnet18", num_classes=5)
    convert(on_meta, 2)
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}
    assert on_meta(torch.empty(4, 3, 32, 32, device="meta")).shape == (4, 5)


def test_converted_norms_stay_frozen_where_the_batchnorms_were() -> None:
    """Freezing the stem before converting is ordinary fine-tuning; with a frozen gamma and a
    trainable beta, beta still gets its gradient on the large-plane path."""
    model = timm.create_model("resnet18", num_classes=3)
    model.bn1.weight.requires_grad_(False)
    convert(model, 2)
    assert not model.bn1.weight.requires_grad and model.bn1.bias.requires_grad
    assert model.layer1[0].bn1.weight.requires_grad
    model.conv1.weight.requires_grad_(False)
    model(torch.randn(4, 3, 64, 64)).sum().backward()
    assert model.bn1.bias.grad is not None and model.bn1.weight.grad is None


@pytest.mark.parametrize("kind", [ModalityBatchNorm2d, ModalityInstanceNorm2d])
def test_another_channel_count_or_rank_is_refused(kind) -> None:
    """The fast path would read and write past the (M, C) statistics."""
    norm = kind(4, 2)
    for shape in [(4, 5, 64, 64), (4, 5, 4, 4), (4, 4, 64)]:
        with pytest.raises(ValueError, match=r"expected a 4-D input with 4 channels, got shape"):
            norm(torch.randn(shape))
    if kind is ModalityBatchNorm2d:
        assert not norm.running_mean.any()


@pytest.mark.parametrize("size", [4, 64])
def test_torch_func_transforms_see_the_same_function(size: int) -> None:
    """Per-sample gradients and meta-learning call the norms under ``torch.func``, where
    tensors have no storage for the caches to key on."""
    from torch.func import functional_call, grad

    torch.manual_seed(0)
    norm, x = _exchanging_norm().eval(), torch.randn(4, 8, size, size)
    params = {k: v.detach() for k, v in norm.named_parameters()}
    got = grad(lambda p: functional_call(norm, p, (x,)).sum())(params)
    tracked = {k: v.clone().requires_grad_() for k, v in params.items()}
    functional_call(norm, tracked, (x,)).sum().backward()
    for name, value in tracked.items():  # sums over 4*64*64 values, in another order
        scale = float(value.grad.abs().max())
        torch.testing.assert_close(got[name], value.grad, rtol=1e-5, atol=1e-6 * scale)


def _exchanging_norm() -> ModalityBatchNorm2d:
    norm = ModalityBatchNorm2d(8, 2, exchange=True, threshold=0.1)
    with torch.no_grad():
        norm.weight.fill_(0.15)
        norm.weight[:, :3] = 0.01
    return norm


@pytest.mark.parametrize("size", [4, 64])
def test_training_goes_on_after_an_evaluation_in_inference_mode(size: int) -> None:
    """Lightning validates under ``torch.inference_mode``: what it caches must not reach a
    later step's autograd."""
    norm, x = _exchanging_norm(), torch.randn(4, 8, size, size)
    with torch.inference_mode():
        norm.eval()(x)
    norm.train()(x).sum().backward()
    with torch.no_grad():
        norm.eval()(x)
    assert norm.weight.grad is not None


@pytest.mark.parametrize("size", [4, 64])
def test_a_norm_made_in_inference_mode_runs_and_follows_its_gammas(size: int) -> None:
    """Parameters made under ``torch.inference_mode`` keep no version counter to cache by:
    such a norm computes its plan and folded statistics at every call."""
    x, reference = torch.randn(4, 8, size, size), _exchanging_norm().eval()
    with torch.inference_mode():
        norm = _exchanging_norm().eval()
        assert norm.weight.is_inference()
        torch.testing.assert_close(norm(x), reference(x))
        norm.weight[:, 3] = 0.01
        with torch.no_grad():
            reference.weight[:, 3] = 0.01
        torch.testing.assert_close(norm(x), reference(x))
        assert int(norm.exchange_plan().full_mask.sum()) == 8


@pytest.mark.parametrize("train", [True, False])
def test_the_exchange_follows_a_fused_optimizers_step(train: bool) -> None:
    """A fused optimizer changes gamma in place without a version torch counts: the exchange
    must follow the values all the same."""
    norm, x = _exchanging_norm(), torch.randn(4, 8, 16, 16)
    norm.train(train)
    with torch.no_grad():
        norm(x)
    optimizer = torch.optim.SGD(norm.parameters(), lr=1.0, fused=True)
    norm(x).sum().backward()
    norm.weight.grad = torch.full_like(norm.weight, 0.1)
    optimizer.step()
    assert (norm.weight.abs() < 0.1).all()
    fresh = copy.deepcopy(norm)
    fresh._plan_cache = fresh._fold_cache = None
    with torch.no_grad():
        torch.testing.assert_close(norm(x), fresh(x))
    assert norm.exchange_plan().full_mask.all()


def test_timms_batchnorm_with_activation_keeps_its_names_and_reads_older_keys() -> None:
    """``BatchNormAct2d`` becomes one private norm with its activation, under its own name;
    a state dict saved when it was ``Sequential(norm, drop, act)`` still loads."""
    plain = timm.create_model("efficientnet_b0", features_only=True)
    cen = convert(copy.deepcopy(plain), 2, ("blocks.*.*.bn2",))
    assert set(cen.state_dict()) == set(plain.state_dict())
    assert [n for n, _ in exchanging_norms(cen)][:2] == ["blocks.0.0.bn2", "blocks.1.0.bn2"]
    assert type(plain.get_submodule("bn1")).__name__ == "BatchNormAct2d"
    assert isinstance(cen.get_submodule("bn1").act, nn.SiLU)
    with torch.no_grad():
        cen.get_submodule("bn1").weight.uniform_()
    nested = {
        (k.replace("bn1.", "bn1.0.", 1) if k.startswith("bn1.") else k): v
        for k, v in cen.state_dict().items()
    }
    again = convert(copy.deepcopy(plain), 2, ("blocks.*.*.bn2",))
    again.load_state_dict(nested)
    assert torch.equal(again.get_submodule("bn1").weight, cen.get_submodule("bn1").weight)


def test_a_batchnorm_under_two_names_becomes_one_private_norm() -> None:
    bn = nn.BatchNorm2d(4)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), bn, nn.Conv2d(4, 4, 1), bn)
    convert(net, 2, ())
    assert isinstance(net[1], ModalityBatchNorm2d) and net[3] is net[1]


def test_convert_refuses_what_it_cannot_use_in_one_line() -> None:
    net = timm.create_model("resnet18", features_only=True)
    for call, message in [
        (lambda: convert(net, 2.0), r"^convert: num_modalities=2.0: expected an integer"),
        (lambda: convert(net, 0), r"^convert: num_modalities=0: expected at least 1"),
        (lambda: convert(net, 2, None), r"^convert: exchange_at=None: expected fnmatch"),
        (lambda: convert(net, 2, threshold="x"), r"^convert: threshold='x': expected a number"),
        (lambda: convert("resnet18", 2), r"^convert: expected a torch.nn.Module, got str"),
        (lambda: convert(net, 2, [1]), r"^convert: exchange_at=\[1\]: expected fnmatch"),
        (lambda: convert(net, 1), r"^convert: num_modalities=1: channel exchange needs at"),
        (lambda: convert(net, 2, threshold=-1.0), r"^convert: threshold=-1.0: expected a fin"),
        (lambda: convert(net, 2, threshold=math.nan), r"^convert: threshold=nan: expected a"),
        (lambda: convert(net, 2, threshold=math.inf), r"^convert: threshold=inf: expected a"),
    ]:
        with pytest.raises(CenError, match=message):
            call()
    convert(copy.deepcopy(net), 1, ())
    convert(net, 2)
    with pytest.raises(CenError, match=r"^convert: the model already holds private norms"):
        convert(net, 3, ())


def test_evaluation_follows_running_statistics_updated_in_training_mode() -> None:
    """Re-estimating the statistics (training-mode passes that leave gamma alone) must reach
    the next evaluation: the norm kernels update them without a new tensor version."""
    torch.manual_seed(0)
    model = convert(timm.create_model("resnet18", num_classes=5), 2).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model(x)
        model.train()
        for _ in range(2):
            model(torch.randn(4, 3, 32, 32) * 2 + 1)
        model.eval()
        torch.testing.assert_close(model(x), copy.deepcopy(model)(x))


@pytest.mark.parametrize("size", [4, 40])
def test_a_cumulative_average_of_the_statistics_is_kept_as_batchnorm_keeps_it(size: int) -> None:
    """``momentum=None``, on the recorded path (small planes) and the custom function."""
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(3, momentum=None)
    private = convert(nn.Sequential(copy.deepcopy(plain)), 2, ())[0]
    for _ in range(3):
        x = torch.randn(2, 3, size, size) * 3 + 1
        plain(x)
        private(torch.cat([x, x]))
    for name in ("running_mean", "running_var"):
        expected = getattr(plain, name).expand(2, 3)
        torch.testing.assert_close(getattr(private, name), expected)


@pytest.mark.parametrize("network", ["converted resnet18", "CEN U-Net", "CEN RefineNet"])
def test_a_trace_of_a_network_has_no_shape_checks_to_warn_of(network: str) -> None:
    """``torch.jit.trace`` (and the ONNX export) fixes the shapes: checking them would warn
    at every norm, and where a model stacks its modalities."""
    x = torch.randn(4, 3, 32, 32)
    if network == "CEN U-Net":
        model = create_cen_unet(ngf=4, num_downs=5).eval()
    elif network == "CEN RefineNet":
        model = create_cen_refinenet(backbone="resnet18", num_classes=3, decoder_width=8).eval()
        x = (list(x.chunk(2)),)
    else:
        model = convert(timm.create_model("resnet18", num_classes=3), 2).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, x)
    ours = [w for w in caught if "cenfusion" in w.filename]
    assert not ours, [f"{w.filename}:{w.lineno} {w.message}" for w in ours]
    inputs = x if isinstance(x, tuple) else (x,)
    torch.testing.assert_close(traced(*inputs), model(*inputs))
