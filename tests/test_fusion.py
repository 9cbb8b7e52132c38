import copy
import fnmatch

import pytest
import timm
import torch
from torch import nn

from cenfusion.fusion import (
    RESNET_EXCHANGE_POINTS,
    AlphaEnsemble,
    ModalityBatchNorm2d,
    ModalityInstanceNorm2d,
    ModalityNorm,
    _exchange_subset,
    _recorded,
    convert,
    exchange_stats,
    exchanging_norms,
    set_frozen_stats,
    sparsity_penalty,
)
from cenfusion.models.refinenet import create_cen_refinenet


class LoopNorm(nn.Module):
    """Reference: one plain norm per modality, exchange by an explicit loop."""

    def __init__(self, norm: ModalityNorm) -> None:
        super().__init__()
        m, c = norm.num_modalities, norm.num_features
        if isinstance(norm, ModalityBatchNorm2d):
            self.norms = nn.ModuleList(
                nn.BatchNorm2d(c, eps=norm.eps, momentum=norm.momentum) for _ in range(m)
            )
            for i, bn in enumerate(self.norms):
                bn.running_mean.copy_(norm.running_mean[i])
                bn.running_var.copy_(norm.running_var[i])
        else:
            self.norms = nn.ModuleList(
                nn.InstanceNorm2d(c, eps=norm.eps, affine=True) for _ in range(m)
            )
        with torch.no_grad():
            for i, bn in enumerate(self.norms):
                bn.weight.copy_(norm.weight[i])
                bn.bias.copy_(norm.bias[i])
        self.exchange = norm.exchange
        self.threshold = norm.threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = len(self.norms)
        ys = [bn(chunk) for bn, chunk in zip(self.norms, x.chunk(m))]
        if not self.exchange:
            return torch.cat(ys)
        outs = []
        for i in range(m):
            channels = []
            for c in range(ys[i].shape[1]):
                if self.norms[i].weight[c].abs() < self.threshold:
                    others = [ys[j][:, c] for j in range(m) if j != i]
                    channels.append(sum(others) / len(others))
                else:
                    channels.append(ys[i][:, c])
            outs.append(torch.stack(channels, dim=1))
        return torch.cat(outs)


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


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.detach().abs().max()) + 1e-7)


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


def hand_built_norm(gammas: torch.Tensor, threshold: float = 0.1) -> ModalityBatchNorm2d:
    """Eval-mode norm with var + eps exactly 1, zero mean and bias: output = gamma * input.

    (eps stays positive: some torch versions refuse eps = 0 in ``F.batch_norm``.)
    """
    m, c = gammas.shape
    eps = 2.0**-20
    norm = ModalityBatchNorm2d(c, m, eps=eps, exchange=True, threshold=threshold).eval()
    with torch.no_grad():
        norm.weight.copy_(gammas)
        norm.running_var.fill_(1.0 - eps)
    return norm


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
    points = [n.removesuffix(".0") for n, _ in exchanging_norms(cen)]
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


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def random_norm(num_modalities: int, channels: int = 7, seed: int = 0) -> ModalityBatchNorm2d:
    """Random statistics and affine parameters; channel 0 exchanges in every modality,
    channel 1 in modality 0 only, channel 2 in the last only, the rest nowhere."""
    g = torch.Generator().manual_seed(seed)
    norm = ModalityBatchNorm2d(channels, num_modalities, exchange=True, threshold=0.1)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
        norm.weight[:, 0] = torch.linspace(-0.05, 0.05, num_modalities)
        norm.weight[0, 1] = 0.02
        norm.weight[-1, 2] = -0.09
        norm.bias.normal_(0, 0.5, generator=g)
        norm.running_mean.normal_(0, 1, generator=g)
        norm.running_var.uniform_(0.5, 2.0, generator=g)
    return norm


def run_both(
    norm: ModalityNorm, x: torch.Tensor, setting: str, weights: torch.Tensor | None = None
) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``norm`` and its per-modality reference on copies of ``x`` in ``setting``
    (``train``: batch statistics, ``frozen``: running statistics in training, ``eval``, and
    ``inference``: eval without autograd); backward of ``(out * weights).sum()`` in the first
    two. Returns the reference, both outputs and both input gradients."""
    ref = LoopNorm(norm).to(x.device)
    evaluating = setting in ("eval", "inference")
    if isinstance(norm, ModalityBatchNorm2d):
        norm.frozen_stats = setting == "frozen"
    norm.train(not evaluating)
    ref.train(setting == "train")
    x_ours = x.detach().clone().requires_grad_(not evaluating)
    x_ref = x.detach().clone().requires_grad_(not evaluating)
    with torch.set_grad_enabled(setting != "inference"):
        out, ref_out = norm(x_ours), ref(x_ref)
    if evaluating:
        return ref, out, ref_out, None, None
    if weights is None:
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(x.device)
    (out * weights).sum().backward()
    (ref_out * weights).sum().backward()
    return ref, out, ref_out, x_ours.grad, x_ref.grad


def widen_exchange(norm: ModalityNorm) -> None:
    """Make modality 0 exchange channels 3 and 4 too: five of seven channels exchange."""
    with torch.no_grad():
        norm.weight[0, 3:5] = 0.01


SETTINGS = ["train", "frozen", "eval", "inference"]

# (layout, spatial size, path). Large planes take the custom function, which exchanges only
# the planned channels in NCHW when they are at most half of all, else over the whole stack;
# small planes take the recorded operations.
PATHS = [
    ("nchw", (24, 24), "subset"),
    ("nchw", (24, 24), "dense"),
    ("channels_last", (24, 24), "dense"),
    ("nchw", (5, 6), "recorded"),
    ("channels_last", (5, 6), "recorded"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("layout", "size", "path"), PATHS)
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("num_modalities", [2, 3, 4])
def test_batch_norm_fast_paths_match_per_modality_reference(
    num_modalities: int, setting: str, layout: str, size: tuple[int, int], path: str, device: str
) -> None:
    norm = random_norm(num_modalities).to(device)
    if path == "dense" and layout == "nchw":
        widen_exchange(norm)
    running = (norm.running_mean.clone(), norm.running_var.clone())
    x = 3 * torch.randn(num_modalities * 2, 7, *size, generator=torch.Generator().manual_seed(2))
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = (x + 2).to(device, memory_format=memory_format)
    assert _recorded(x, num_modalities) == (path == "recorded" or device != "cpu")
    if device == "cpu" and path != "recorded":
        assert _exchange_subset(norm.exchange_plan(), x) == (path == "subset")
    ref, out, ref_out, grad, ref_grad = run_both(norm, x, setting)
    assert_close(out, ref_out)
    assert out.is_contiguous(memory_format=memory_format)
    if setting in ("train", "frozen"):
        assert_close(grad, ref_grad)
        for name in ("weight", "bias"):
            expected = torch.stack([getattr(bn, name).grad for bn in ref.norms])
            assert_close(getattr(norm, name).grad, expected)
    if setting == "train":
        assert int(norm.num_batches_tracked) == 1
        assert_close(norm.running_mean, torch.stack([bn.running_mean for bn in ref.norms]))
        assert_close(norm.running_var, torch.stack([bn.running_var for bn in ref.norms]))
    else:
        assert torch.equal(norm.running_mean, running[0])
        assert torch.equal(norm.running_var, running[1])


@pytest.mark.parametrize("size", [(5, 7), (24, 24)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("num_modalities", [2, 4])
def test_instance_norm_fast_path_matches_per_modality_reference(
    num_modalities: int, channels_last: bool, size: tuple[int, int]
) -> None:
    torch.manual_seed(3)
    norm = ModalityInstanceNorm2d(6, num_modalities, exchange=True, threshold=0.1)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.weight[:, 0] = 0.0
        norm.weight[1, 3] = 0.05
        norm.bias.normal_()
    x = torch.randn(num_modalities * 2, 6, *size) * 2 + 1
    x = x.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert _recorded(x, num_modalities) == (size == (5, 7))
    ref, out, ref_out, grad, ref_grad = run_both(norm, x, "train")
    assert_close(out, ref_out)
    assert_close(grad, ref_grad)
    for name in ("weight", "bias"):
        expected = torch.stack([getattr(n, name).grad for n in ref.norms])
        assert_close(getattr(norm, name).grad, expected)


def assert_close_bf16(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = float(b.detach().abs().max())
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [(6, 6), (24, 24)])
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("num_modalities", [2, 3])
def test_bf16_autocast_matches_reference_within_bf16_tolerance(
    num_modalities: int, setting: str, size: tuple[int, int], device: str
) -> None:
    norm = random_norm(num_modalities).to(device)
    x = torch.randn(num_modalities * 2, 7, *size, generator=torch.Generator().manual_seed(4))
    x = x.to(device, torch.bfloat16)
    assert _recorded(x, num_modalities) == (size == (6, 6) or device != "cpu")
    with torch.autocast(device, dtype=torch.bfloat16):
        ref, out, ref_out, grad, ref_grad = run_both(norm, x, setting)
    assert out.dtype == torch.bfloat16
    fp32_ref = LoopNorm(random_norm(num_modalities)).to(device).train(setting == "train")
    assert_close_bf16(out, fp32_ref(x.float()))
    assert_close_bf16(out, ref_out)
    if setting in ("train", "frozen"):
        assert grad.dtype == torch.bfloat16
        assert_close_bf16(grad, ref_grad)
        expected = torch.stack([bn.weight.grad for bn in ref.norms])
        assert_close_bf16(norm.weight.grad, expected)


def test_exchange_and_folded_statistics_follow_parameter_changes() -> None:
    """The exchanged channels and, for inference, the scale and shift folded from the
    statistics and affine parameters are cached; every way of changing them must refresh
    them."""
    norm = random_norm(3).eval()
    x = torch.randn(6, 7, 4, 4, generator=torch.Generator().manual_seed(5))

    def check() -> None:
        dtype = norm.weight.dtype
        with torch.no_grad():
            assert_close(norm(x.to(dtype)), LoopNorm(norm).to(dtype).eval()(x.to(dtype)))

    check()
    with torch.no_grad():
        norm.running_var.mul_(2)
    check()
    with torch.no_grad():
        norm.bias.add_(1)
    check()
    norm.running_mean = torch.randn(3, 7, generator=torch.Generator().manual_seed(8))
    check()
    norm.eps = 0.5
    check()
    with torch.no_grad():
        norm.weight[1, 5] = 0.0
    check()
    state = random_norm(3, seed=9).state_dict()
    state["weight"][:, 6] = 0.0
    norm.load_state_dict(state)
    assert norm.exchange_plan().channels.tolist() == [0, 1, 2, 6]
    check()
    norm.weight.grad = torch.zeros_like(norm.weight)
    norm.weight.grad[2, 4] = norm.weight[2, 4].item() / 0.5
    torch.optim.SGD([norm.weight], lr=0.5).step()
    assert norm.exchange_plan().channels.tolist() == [0, 1, 2, 4, 6]
    check()
    norm.double()
    check()
    with torch.no_grad():
        norm.weight.fill_(1.0)
    assert norm.exchange_plan() is None
    check()


def test_incoming_gradient_of_any_layout() -> None:
    """Expanded (from ``sum``) and channels-last upstream gradients give the same result in
    the custom function's backward."""
    norm = random_norm(2).train()
    x = torch.randn(4, 7, 24, 24, requires_grad=True)
    assert not _recorded(x, 2)
    norm(x).sum().backward()
    expanded = x.grad.clone()
    x.grad = None
    out = norm(x)
    out.backward(torch.ones_like(out).to(memory_format=torch.channels_last))
    torch.testing.assert_close(x.grad, expanded, rtol=0, atol=0)
    ref = x.detach().clone().requires_grad_(True)
    LoopNorm(norm).train()(ref).sum().backward()
    assert_close(expanded, ref.grad)


def test_four_modalities_take_the_mean_of_the_other_three() -> None:
    gammas = torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0], [4.0, 0.01]])
    norm = hand_built_norm(gammas)
    x = torch.arange(1.0, 5.0).view(4, 1, 1, 1).expand(4, 2, 3, 3).contiguous()
    out = norm(x)[:, :, 0, 0]
    y = gammas * torch.arange(1.0, 5.0)[:, None]
    torch.testing.assert_close(out[0, 0], (y[1, 0] + y[2, 0] + y[3, 0]) / 3)
    torch.testing.assert_close(out[3, 1], (y[0, 1] + y[1, 1] + y[2, 1]) / 3)
    assert torch.equal(out[1:, 0], y[1:, 0]) and torch.equal(out[:3, 1], y[:3, 1])


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("num_modalities", [2, 3])
def test_traceable_path_matches_per_modality_reference(
    num_modalities: int, setting: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ``torch.compile`` the norms take whole-stack tensor operations instead."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    norm = random_norm(num_modalities)
    x = torch.randn(num_modalities * 2, 7, 4, 5, generator=torch.Generator().manual_seed(6))
    ref, out, ref_out, grad, ref_grad = run_both(norm, x, setting)
    assert_close(out, ref_out)
    if setting in ("train", "frozen"):
        assert_close(grad, ref_grad)
        assert_close(norm.weight.grad, torch.stack([bn.weight.grad for bn in ref.norms]))
    if setting == "train":
        assert_close(norm.running_var, torch.stack([bn.running_var for bn in ref.norms]))
    instance = ModalityInstanceNorm2d(7, num_modalities, exchange=True, threshold=0.1)
    with torch.no_grad():
        instance.weight.copy_(norm.weight)
        instance.bias.copy_(norm.bias)
    _, out, ref_out, grad, ref_grad = run_both(instance, x, "train")
    assert_close(out, ref_out)
    assert_close(grad, ref_grad)


def test_compiles_to_the_same_function() -> None:
    torch.manual_seed(7)
    eager = nn.Sequential(nn.Conv2d(3, 7, 3, padding=1), random_norm(2), nn.ReLU()).train()
    compiled_copy = copy.deepcopy(eager)
    x = torch.randn(4, 3, 6, 6)
    out = eager(x)
    out.sum().backward()
    compiled_out = torch.compile(compiled_copy, backend="aot_eager")(x)
    compiled_out.sum().backward()
    assert_close(compiled_out, out)
    for p, q in zip(eager.parameters(), compiled_copy.parameters()):
        assert_close(q.grad, p.grad)
    assert_close(compiled_copy[1].running_mean, eager[1].running_mean)


@pytest.mark.parametrize("size", [(5, 6), (24, 24)])
def test_stack_not_a_multiple_of_the_modalities_is_refused(size: tuple[int, int]) -> None:
    norm = random_norm(3)
    with pytest.raises(ValueError, match="not a multiple of 3 modalities"):
        norm(torch.randn(4, 7, *size))


def test_batch_statistics_input_gradient_far_from_zero() -> None:
    """The custom backward writes the input gradient as ``a * grad + b * x + c``, which
    cancels where the mean is far from zero: with the mean a thousand standard deviations
    away, it stays within this suite's float32 tolerance of the float64 gradient."""
    norm = random_norm(2).train()
    x = torch.randn(4, 7, 24, 24, generator=torch.Generator().manual_seed(1)) + 1000
    assert not _recorded(x, 2)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    ours = x.clone().requires_grad_()
    (norm(ours) * weights).sum().backward()
    exact = x.double().requires_grad_()
    (LoopNorm(norm).double().train()(exact) * weights.double()).sum().backward()
    error = (ours.grad.double() - exact.grad).abs().max() / exact.grad.abs().max()
    assert error < 1e-5
