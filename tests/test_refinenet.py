import copy
import math
from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F
from dependencies import needs_cxx
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from cenfusion import CenError, create_cen_refinenet, create_model
from cenfusion.bench.cases import translation_networks, translation_training, with_exchange
from cenfusion.engine.runtime import CompiledOrEager, Precision
from cenfusion.fusion import (
    ModalityBatchNorm2d,
    exchange_stats,
    exchanging_norms,
    sparsity_penalty,
)
from cenfusion.metrics.segmentation import SegmentationMetric
from cenfusion.models import refinenet
from cenfusion.models.crp_pool import max_pool_5x5, recomputed_max_pool_5x5
from cenfusion.models.refinenet import (
    CENRefineNet,
    CENRefineNetConfig,
    ChainedResidualPool,
    ResidualConvUnit,
    create_encoder,
)
from cenfusion.segmentation.train import segmentation_step


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("depth", "millions", "points"), [(101, 118.2, 33), (152, 133.9, 50)])
def test_parameter_counts_and_exchange_points(depth: int, millions: float, points: int) -> None:
    model = create_cen_refinenet(depth=depth, num_classes=40, num_modalities=2)
    assert abs(count(model) / 1e6 - millions) <= 0.1
    assert len(exchanging_norms(model)) == points


@pytest.mark.parametrize(("h", "w"), [(64, 64), (65, 50), (37, 81)])
def test_output_shapes_and_stacked_input(h: int, w: int) -> None:
    torch.manual_seed(0)
    model = create_cen_refinenet(backbone="resnet26", num_classes=6, num_modalities=3).eval()
    inputs = [torch.randn(2, 3, h, w) for _ in range(3)]
    with torch.no_grad():
        outs = model(inputs)
        stacked = model(torch.cat(inputs))
    assert len(outs) == 4
    for o, s in zip(outs, stacked):
        assert o.shape == (2, 6, math.ceil(h / 4), math.ceil(w / 4))
        assert torch.equal(o, s)


def test_a_backbone_that_needs_a_multiple_of_its_stride_takes_any_size_padded() -> None:
    """DLA fuses branches of different strides: at 37x81 its own forward fails, so the
    input is padded to 64x96 and the logits cropped to what the size gives."""
    torch.manual_seed(0)
    model = create_cen_refinenet(
        backbone="dla46_c", num_classes=4, decoder_width=16, exchange_at="*.bn2"
    ).eval()
    assert model.size_multiple == 32
    rgb, depth = torch.randn(2, 3, 37, 81), torch.randn(2, 3, 37, 81)
    with pytest.raises(RuntimeError, match="size of tensor"), torch.no_grad():
        model.encoder(torch.cat([rgb, depth]))
    with torch.no_grad():
        got = model([rgb, depth])
        padded = model([F.pad(x, (0, 96 - 81, 0, 64 - 37)) for x in (rgb, depth)])
    assert got.shape == (3, 2, 4, 10, 21) and padded.shape == (3, 2, 4, 16, 24)
    assert torch.equal(got, padded[..., :10, :21])
    any_size = create_cen_refinenet(backbone="mobilenetv3_small_050", exchange_at="blocks.*")
    assert any_size.size_multiple == 1 and create_model("cen_refinenet_r50").size_multiple == 1


def test_wrong_modality_count_is_refused() -> None:
    model = create_cen_refinenet(backbone="resnet26", num_classes=3, num_modalities=2)
    with pytest.raises(ValueError, match="^expected 2 modalities, got 3$"):
        model([torch.randn(1, 3, 32, 32)] * 3)
    with pytest.raises(ValueError, match=r"^expected 2 modalities, got 3 along axis 1 of a \("):
        model(torch.randn(2, 3, 3, 32, 32))
    with pytest.raises(ValueError, match=r"^the modalities' tensors must have one shape, got "):
        model([torch.randn(1, 3, 32, 32), torch.randn(3, 3, 32, 32)])


def test_decoder_bias_placement_and_dropout() -> None:
    model = create_cen_refinenet(backbone="resnet26", num_classes=7)
    convs = {n: m for n, m in model.decoder.named_modules() if isinstance(m, nn.Conv2d)}
    with_bias = sorted(n for n, m in convs.items() if m.bias is not None)
    rcu_first = sorted(
        f"{n}.conv1" for n, m in model.decoder.named_modules() if isinstance(m, ResidualConvUnit)
    )
    assert with_bias == sorted([*rcu_first, "classifier"])
    assert len(rcu_first) == 4 * (2 + 3)
    assert all(m.kernel_size == (3, 3) for m in convs.values())
    assert [s.reduce.out_channels for s in model.decoder.stages] == [512, 256, 256, 256]
    assert [s.reduce.in_channels for s in model.decoder.stages] == [2048, 1024, 512, 256]
    assert model.decoder.classifier.out_channels == 7
    assert model.decoder.dropout.p == 0.5


def test_parameter_groups_partition_the_model() -> None:
    model = create_cen_refinenet(backbone="resnet26", num_classes=3)
    enc, dec = model.encoder_parameters(), model.decoder_parameters()
    assert {id(p) for p in enc}.isdisjoint({id(p) for p in dec})
    assert len(enc) + len(dec) == len(list(model.parameters()))
    assert any(p is model.ensemble.alpha for p in dec)


def test_local_pretrained_weights_copied_into_every_modality(tmp_path) -> None:
    torch.manual_seed(0)
    source = timm.create_model("resnet26")
    with torch.no_grad():
        for module in source.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.weight.normal_()
    path = tmp_path / "r26.pth"
    torch.save(source.state_dict(), path)
    model = create_cen_refinenet(backbone="resnet26", num_modalities=3, pretrained=path)
    bn = model.encoder.get_submodule("layer2.1.bn2")
    assert isinstance(bn, ModalityBatchNorm2d) and bn.frozen_stats
    for m in range(3):
        assert torch.equal(bn.running_mean[m], source.layer2[1].bn2.running_mean)
        assert torch.equal(bn.weight[m], source.layer2[1].bn2.weight)
    assert torch.equal(model.encoder.conv1.weight, source.conv1.weight)
    assert not create_cen_refinenet(backbone="resnet26").encoder.bn1.frozen_stats


def test_bad_arguments_give_clear_errors(tmp_path) -> None:
    with pytest.raises(CenError, match=r"^depth=34 \(--enc\): expected one of"):
        create_cen_refinenet(depth=34)
    with pytest.raises(CenError, match="not found"):
        create_cen_refinenet(backbone="resnet26", pretrained=tmp_path / "none.pth")
    with pytest.raises(CenError, match="expected one of"):
        create_model("cen_refinenet_r7")
    with pytest.raises(CenError, match=r"^depth='50' \(--enc\): expected one of \[50, 101, 152\]"):
        create_cen_refinenet(depth="50")
    for name, value in [("num_classes", 0), ("num_modalities", 2.5), ("decoder_width", True)]:
        with pytest.raises(CenError, match=f"^{name}={value!r}: expected an integer of at least"):
            create_cen_refinenet(backbone="resnet26", **{name: value})
    for name, value in [("drop_rate", 2), ("drop_rate", -1)]:
        with pytest.raises(CenError, match=rf"^{name}={value!r}: expected a number in \[0, 1\)"):
            create_cen_refinenet(backbone="resnet26", **{name: value})
    for value in (-1.0, float("inf")):
        with pytest.raises(CenError, match=rf"^bn_threshold={value!r}: expected a finite number"):
            create_cen_refinenet(backbone="resnet26", bn_threshold=value)
    with pytest.raises(CenError, match="^exchange_at: expected fnmatch patterns"):
        create_cen_refinenet(backbone="resnet26", exchange_at=None)
    with pytest.raises(CenError, match="^backbone=18: expected a timm model name"):
        create_cen_refinenet(backbone=18)
    with pytest.raises(CenError, match="^exchange_at: expected fnmatch patterns"):
        create_cen_refinenet(backbone="resnet26", exchange_at=lambda name, module: True)
    with pytest.raises(CenError, match="^model cen_refinenet_r50 fixes depth=50; use cen_refin"):
        create_model("cen_refinenet_r50", depth=101)
    with pytest.raises(CenError, match="^model cen_refinenet_r50 fixes its backbone; use cen_"):
        create_model("cen_refinenet_r50", backbone="resnet26")
    restated = create_model("cen_refinenet_r50", depth=50, backbone=None, decoder_width=8)
    assert restated.config.backbone == "resnet50"
    with pytest.raises(CenError, match="^backbone=<ResNet module>: expected a timm model name"):
        create_cen_refinenet(backbone=timm.create_model("resnet26"))


def test_weights_not_fetched_say_what_to_do_offline(monkeypatch) -> None:
    from huggingface_hub.constants import HF_HUB_CACHE

    def offline(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=False, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(CenError) as info:
        create_cen_refinenet(depth=50, pretrained="tv_in1k")
    assert str(info.value) == (
        "pretrained weights 'resnet50.tv_in1k' not fetched (OSError); offline, give a local file "
        f"(--pretrained PATH) or fill the caches {HF_HUB_CACHE}, {torch.hub.get_dir()}"
    )


def test_one_exchange_pattern_may_be_a_bare_string_and_pretrained_false_means_none() -> None:
    model = create_cen_refinenet(
        backbone="efficientnet_b0", num_classes=3, exchange_at="blocks.*.*.bn2", pretrained=False
    )
    assert model.config.exchange_at == ("blocks.*.*.bn2",)
    assert exchanging_norms(model)[0][0] == "encoder.blocks.0.0.bn2"
    assert not model.encoder.bn1.frozen_stats


@pytest.mark.parametrize(
    ("backbone", "points"),
    [("vgg11_bn", "features_*"), ("repvit_m1", "stages_*.blocks.*.token_mixer.*")],
)
def test_the_decoder_takes_the_levels_at_strides_4_to_32(backbone: str, points: str) -> None:
    """timm gives a VGG a level at stride 1 first, and a RepViT only four levels: ResNet's
    level indices would hand the decoder strides 2..16, or fail."""
    levels = timm.create_model(backbone, features_only=True).feature_info
    assert levels.reduction()[1:5] != [4, 8, 16, 32]
    model = create_cen_refinenet(backbone=backbone, num_classes=3, exchange_at=(points,)).eval()
    assert model.encoder.feature_info.reduction() == [4, 8, 16, 32]
    assert exchanging_norms(model)
    with torch.no_grad():
        heads = model([torch.randn(1, 3, 64, 96)] * 2)
    assert heads.shape == (3, 1, 3, 16, 24)


def test_checkpoints_record_the_levels_and_older_ones_rebuild_on_levels_1_to_4() -> None:
    """A record saved before the levels were chosen by stride was built on levels 1..4: it
    rebuilds on them, so that its weights fit whatever strides they have."""
    model = create_cen_refinenet(backbone="vgg11_bn", num_classes=3, exchange_at=("features_*",))
    record = model.config.to_dict()
    assert record["encoder_levels"] == (2, 3, 4, 5)
    again = CENRefineNet(CENRefineNetConfig.from_dict(record))
    assert again.encoder.feature_info.reduction() == [4, 8, 16, 32]
    del record["encoder_levels"]
    older = CENRefineNet(CENRefineNetConfig.from_dict(record))
    assert older.config.encoder_levels == (1, 2, 3, 4)
    assert older.encoder.feature_info.reduction() == [2, 4, 8, 16]


def test_an_encoder_without_those_levels_is_refused() -> None:
    message = r"^backbone='vit_tiny_patch16_224' \(--backbone\): its feature levels "
    with pytest.raises(CenError, match=message):
        create_cen_refinenet(backbone="vit_tiny_patch16_224")


def test_a_record_naming_levels_its_encoder_lacks_is_refused() -> None:
    """RepViT has four feature levels (0..3): a record asking for ResNet's 1..4 names one
    more than it has."""
    with pytest.raises(
        CenError, match=r"^backbone repvit_m1: has no feature levels \[1, 2, 3, 4\]"
    ):
        create_encoder("repvit_m1", levels=(1, 2, 3, 4))


def test_a_pretrained_path_is_a_file_whatever_its_name(tmp_path, monkeypatch) -> None:
    """A path is read as a file, not sent to timm as a weights tag, when it names a folder
    or exists; an unreadable one is one line."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CenError, match=r"^pretrained='weights' \(--pretrained\): file not found"):
        create_cen_refinenet(backbone="resnet26", pretrained="./weights")
    (tmp_path / "weights").write_text("not weights")
    with pytest.raises(CenError, match=r"^pretrained='weights' \(--pretrained\): not a readable"):
        create_cen_refinenet(backbone="resnet26", pretrained="weights")


def test_unreachable_pretrained_weights_name_the_cache(monkeypatch) -> None:
    real = refinenet.timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(refinenet.timm, "create_model", offline)
    with pytest.raises(CenError) as info:
        create_cen_refinenet(depth=50, pretrained="tv_in1k")
    message = str(info.value)
    assert "resnet50.tv_in1k" in message and "huggingface" in message
    assert torch.hub.get_dir() in message and "--pretrained PATH" in message


@pytest.mark.parametrize("channels_last", [False, True])
def test_crp_pool_equals_torch_max_pool_in_values_gradients_and_layout(channels_last) -> None:
    x = torch.randn(2, 8, 13, 17)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = max_pool_5x5(ours)
    expected = F.max_pool2d(theirs, 5, stride=1, padding=2)
    assert torch.equal(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert out.is_contiguous() == (not channels_last)
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    assert torch.equal(ours.grad, theirs.grad)


@pytest.mark.parametrize("channels_last", [False, True])
def test_crp_pool_keeps_only_its_input_for_the_backward(channels_last) -> None:
    x = torch.randn(2, 8, 13, 17) * torch.ones(1, requires_grad=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    saved: list[torch.Tensor] = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        max_pool_5x5(x)
    assert len(saved) == 1 and saved[0].data_ptr() == x.data_ptr()


def test_crp_with_recomputed_pools_compiles_to_the_same_function() -> None:
    torch.manual_seed(0)
    eager = ChainedResidualPool(8)
    compiled_copy = copy.deepcopy(eager)
    x = torch.randn(2, 8, 9, 11)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = eager(ours)
    out.sum().backward()
    compiled_out = torch.compile(compiled_copy, backend="aot_eager")(theirs)
    compiled_out.sum().backward()
    torch.testing.assert_close(compiled_out, out)
    torch.testing.assert_close(theirs.grad, ours.grad)
    for p, q in zip(eager.parameters(), compiled_copy.parameters()):
        torch.testing.assert_close(q.grad, p.grad)


@needs_cxx
@pytest.mark.parametrize(
    ("pool", "channels_last"), [("cpu", False), ("cpu", True), ("off the cpu", False)]
)
def test_crp_compiled_by_inductor_computes_the_same_function(
    monkeypatch, pool, channels_last
) -> None:
    """Inductor calls the CPU pool and its backward as the native kernels they are (its own
    loops for the window were slower); the GPU's pool (PyTorch's, recomputed by activation
    checkpointing) runs here on the CPU too. The compiled chain gives eager's values and
    gradients, in the input's layout."""
    if pool == "off the cpu":
        monkeypatch.setattr(refinenet, "max_pool_5x5", recomputed_max_pool_5x5)
    torch.manual_seed(0)
    eager = ChainedResidualPool(8, stages=2)
    compiled_copy = copy.deepcopy(eager)
    x = torch.randn(2, 8, 9, 11)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = eager(ours)
    out.sum().backward()
    compiled = torch.compile(compiled_copy)
    if pool == "cpu":
        graph = torch._dynamo.explain(compiled_copy)(x).graphs[0].code
        assert "cenfusion.max_pool_5x5" in graph and "max_pool2d" not in graph
    compiled_out = compiled(theirs)
    compiled_out.sum().backward()
    torch.testing.assert_close(compiled_out, out)
    torch.testing.assert_close(theirs.grad, ours.grad)
    assert theirs.grad.is_contiguous(memory_format=torch.channels_last) == channels_last


FROZEN = [
    pytest.param("cpu", "default", marks=needs_cxx, id="cpu"),
    *(
        [pytest.param("cuda", "default", id="cuda"), pytest.param("cuda", "reduce-overhead")]
        if torch.cuda.is_available()
        else []
    ),
]


@pytest.mark.parametrize(("device", "mode"), FROZEN)
def test_a_frozen_compiled_cen_block_computes_the_same_function(monkeypatch, device, mode):
    """Evaluation and prediction compile with the weights folded in (inductor's freezing):
    shared convolution, private norms with exchange, ReLU and the CRP pools give eager's
    values (on a GPU also in CUDA graphs, recorded at the second call, replayed after)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    norm = ModalityBatchNorm2d(8, num_modalities=2, exchange=True)
    with torch.no_grad():
        norm.weight[norm.penalty_mask & (torch.arange(8) % 2 == 0)] = 0.0
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
    block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm, nn.ReLU(), ChainedResidualPool(8))
    block.eval().to(device)
    compiled = CompiledOrEager(copy.deepcopy(block), mode, frozen=True)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(4, 3, 10, 12, generator=generator).to(device)
            torch.testing.assert_close(compiled(x), block(x))
    assert compiled.compilations == 1


@pytest.mark.parametrize("pool", ["cpu", "off the cpu"])
@pytest.mark.parametrize("training", [False, True])
def test_cen_refinenet_compiles_as_one_graph(monkeypatch, training: bool, pool: str) -> None:
    """A graph break splits what inductor can fuse and puts a Python round trip between the
    pieces: the whole network, inference and training alike, is one graph, with the CPU's
    pool and with the GPU's."""
    if pool == "off the cpu":
        monkeypatch.setattr(refinenet, "max_pool_5x5", recomputed_max_pool_5x5)
    torch.manual_seed(0)
    model = create_cen_refinenet(backbone="resnet26", num_classes=6).train(training)
    inputs = [torch.randn(1, 3, 40, 40) for _ in range(2)]
    with torch.set_grad_enabled(training):
        explained = torch._dynamo.explain(model)(inputs)
    reasons = [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_crp_pool_without_autograd_equals_torch_max_pool(channels_last, dtype) -> None:
    x = torch.randn(2, 8, 13, 17, generator=torch.Generator().manual_seed(3)).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = max_pool_5x5(x)
    assert out.dtype == dtype
    assert torch.equal(out, F.max_pool2d(x, 5, stride=1, padding=2))
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert out.is_contiguous() == (not channels_last)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_crp_pool_traces_to_the_standard_operator() -> None:
    """An exported graph needs PyTorch's own pool, not oneDNN's layout conversions."""
    with torch.no_grad():
        graph = torch.jit.trace(max_pool_5x5, torch.randn(1, 2, 6, 7)).graph
    kinds = {node.kind() for node in graph.nodes()}
    assert "aten::max_pool2d" in kinds and not any("mkldnn" in kind for kind in kinds)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_training_step_and_inference_never_wait_for_the_device(dtype) -> None:
    """A wait for the GPU stops the host from queueing the next kernels: a training step
    (exchange active, the sparsity term, SGD) and an inference pass of eager CEN RefineNet
    make none once warm (loss scaling, float16's own wait, is not used in either dtype)."""
    torch.manual_seed(0)
    model = with_exchange(create_cen_refinenet(backbone="resnet26", num_classes=6)).cuda()
    device = torch.device("cuda")
    precision = Precision(dtype != torch.float32, device, dtype)
    xs = torch.randn(4, 3, 64, 64, device=device)
    target = torch.randint(0, 6, (2, 64, 64), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    penalty = partial(sparsity_penalty, model, 2e-4)
    step = partial(segmentation_step, model, penalty, xs, target, optimizer, precision)
    step()
    model.eval()
    with torch.no_grad(), precision.autocast():
        model(xs)
    model.train()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        model.eval()
        with torch.no_grad(), precision.autocast():
            model(xs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


class RefuseDeviceWaits(TorchDispatchMode):
    """Raises on every operator whose CUDA kernel makes the host wait for the device: reading
    a value (``.item()``), an output whose size depends on values, a bool mask as an index,
    a copy from the host."""

    WAITING = frozenset({
        "_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
        "unique_consecutive", "bincount", "repeat_interleave", "is_nonzero", "equal",
    })  # fmt: skip

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        kwargs = kwargs or {}
        if name in self.WAITING and not args[0].is_cpu:  # Adam's step count lives on the host
            raise AssertionError(f"{func} waits for the device")
        masks = name in ("index", "index_put_", "_index_put_impl_") and any(
            t is not None and t.dtype == torch.bool for t in args[1]
        )
        if masks:
            raise AssertionError(f"{func} with a bool mask waits for the device")
        to_device = kwargs.get("device") not in (None, torch.device("cpu"))
        if (name == "_to_copy" and args[0].is_cpu and to_device) or (
            name == "copy_" and args[1].is_cpu and not args[0].is_cpu
        ):
            raise AssertionError(f"{func}: a copy from the host waits for the device")
        return func(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_off_the_cpu_a_step_and_inference_use_no_operator_that_waits(dtype) -> None:
    """The CUDA test above, on every machine: the same step and inference on the ``meta``
    device, which takes the code paths of CUDA (norms and exchange as recorded operators, the
    exchange over the whole stack, no listed channels), dispatch no operator that waits."""
    device = torch.device("meta")
    model = with_exchange(create_cen_refinenet(backbone="resnet26", num_classes=6))
    model = model.to(device, dtype)
    precision = Precision(False, device)
    xs = torch.randn(4, 3, 64, 64, device=device, dtype=dtype)
    target = torch.randint(0, 6, (2, 64, 64), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    penalty = partial(sparsity_penalty, model, 2e-4)
    step = partial(segmentation_step, model, penalty, xs, target, optimizer, precision)
    step()
    metric = SegmentationMetric(6, device)
    with RefuseDeviceWaits():
        step()
        model.eval()
        with torch.no_grad():
            metric.update(model(xs)[-1], target)


def test_off_the_cpu_a_translation_step_uses_no_operator_that_waits() -> None:
    """The same for a pix2pix step: the CEN U-Net (private InstanceNorms, exchange), the
    PatchGAN and their Adam optimisers."""
    generator, discriminator = translation_networks(ngf=8, num_downs=5)
    nets = (generator.to("meta"), discriminator.to("meta"))
    xs = [torch.randn(2, 3, 32, 32, device="meta") for _ in range(2)]
    step = translation_training(*nets, nets, xs, Precision(False, torch.device("meta")))
    step()
    with RefuseDeviceWaits():
        step()


def test_pretrained_true_asks_timm_for_the_backbones_default_weights(monkeypatch) -> None:
    calls = []
    real = timm.create_model

    def spy(name: str, **kwargs):
        calls.append((name, kwargs["pretrained"]))
        return real(name, **{**kwargs, "pretrained": False})

    monkeypatch.setattr(refinenet.timm, "create_model", spy)
    model = create_cen_refinenet(backbone="resnet26", num_classes=3, pretrained=True)
    assert calls == [("resnet26", True)]
    assert model.encoder.bn1.frozen_stats


def test_from_scratch_no_exchange_point_starts_with_every_channel_exchanged() -> None:
    """timm starts the last BN of a basic block (ResNet-18's ``bn2``, an exchange point) at
    zero scale, which would exchange every channel from the first step."""
    model = create_cen_refinenet(backbone="resnet18", num_classes=3, decoder_width=8)
    assert exchange_stats(model).overall == 0.0
    bottleneck = create_cen_refinenet(backbone="resnet26", num_classes=3, decoder_width=8)
    assert not bottleneck.encoder.layer1[0].bn3.weight.any()
