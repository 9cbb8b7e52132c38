"""The fast path computes what the private norms' reference computation does: every path
(custom function with subset or dense exchange, recorded operations, folded inference,
traced or compiled) against plain per-modality norms."""

import copy

import pytest
import torch
from dependencies import needs_cxx
from fusion_reference import LoopNorm, assert_close, random_norm
from torch import nn

from cenfusion.fusion import ModalityBatchNorm2d, ModalityInstanceNorm2d, ModalityNorm
from cenfusion.fusion.fastpath import exchange_subset, recorded

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


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
    assert recorded(x, num_modalities) == (path == "recorded" or device != "cpu")
    if device == "cpu" and path != "recorded":
        assert exchange_subset(norm.exchange_plan(), x) == (path == "subset")
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
    assert recorded(x, num_modalities) == (size == (5, 7))
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
    assert recorded(x, num_modalities) == (size == (6, 6) or device != "cpu")
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
    """Channels-last and expanded (stride 0) upstream gradients give the custom backward's
    result for the same contiguous gradient, and that result is the reference's."""
    norm = random_norm(2).train()
    x = torch.randn(4, 7, 24, 24, generator=torch.Generator().manual_seed(3), requires_grad=True)
    assert not recorded(x, 2)
    g = torch.Generator().manual_seed(4)
    upstream = torch.randn(4, 7, 24, 24, generator=g)
    per_sample = torch.randn(4, 7, 1, 1, generator=g)
    for contiguous, other in [
        (upstream, upstream.to(memory_format=torch.channels_last)),
        (per_sample.expand(4, 7, 24, 24).contiguous(), per_sample.expand(4, 7, 24, 24)),
    ]:
        grads = []
        for gradient in (contiguous, other):
            x.grad = None
            norm(x).backward(gradient)
            grads.append(x.grad.clone())
        assert_close(grads[1], grads[0])
        ref = x.detach().clone().requires_grad_(True)
        LoopNorm(norm).train()(ref).backward(contiguous)
        assert float(ref.grad.abs().max()) > 1e-2
        assert_close(grads[0], ref.grad)


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


COMPILERS = [
    pytest.param("cpu", "aot_eager", None, id="cpu-aot_eager"),
    pytest.param("cpu", "inductor", None, marks=needs_cxx, id="cpu-inductor"),
    *(
        [
            pytest.param("cuda", "inductor", None, id="cuda-inductor"),
            pytest.param("cuda", "inductor", "reduce-overhead", id="cuda-graphs"),
        ]
        if torch.cuda.is_available()
        else []
    ),
]


@pytest.mark.parametrize(("device", "backend", "mode"), COMPILERS)
def test_compiles_to_the_same_function(monkeypatch, device, backend, mode) -> None:
    """The private norms, their exchange and running statistics, traced (``aot_eager``) and
    compiled into fused kernels (``inductor``, what ``--compile`` uses; on a GPU also in CUDA
    graphs), over three training steps: graphs are recorded at the second and replayed from
    the third."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(7)
    # no convolution bias: before batch statistics its gradient is zero up to rounding
    conv = nn.Conv2d(3, 7, 3, padding=1, bias=False)
    eager = nn.Sequential(conv, random_norm(2), nn.ReLU()).train().to(device)
    compiled_copy = copy.deepcopy(eager)
    compiled = torch.compile(compiled_copy, backend=backend, mode=mode)
    generator = torch.Generator().manual_seed(8)
    for _ in range(3):
        x = torch.randn(4, 3, 6, 6, generator=generator).to(device)
        out = eager(x)
        out.sum().backward()
        compiled_out = compiled(x)
        compiled_out.sum().backward()
        assert_close(compiled_out, out)
    for p, q in zip(eager.parameters(), compiled_copy.parameters()):
        assert_close(q.grad, p.grad)
    assert_close(compiled_copy[1].running_mean, eager[1].running_mean)


def test_batch_statistics_input_gradient_far_from_zero() -> None:
    """The custom backward writes the input gradient as ``a * grad + b * x + c``, which
    cancels where the mean is far from zero: with the mean a thousand standard deviations
    away, it stays within this suite's float32 tolerance of the float64 gradient."""
    norm = random_norm(2).train()
    x = torch.randn(4, 7, 24, 24, generator=torch.Generator().manual_seed(1)) + 1000
    assert not recorded(x, 2)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    ours = x.clone().requires_grad_()
    (norm(ours) * weights).sum().backward()
    exact = x.double().requires_grad_()
    (LoopNorm(norm).double().train()(exact) * weights.double()).sum().backward()
    error = (ours.grad.double() - exact.grad).abs().max() / exact.grad.abs().max()
    assert error < 1e-5
