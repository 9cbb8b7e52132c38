"""ONNX export of CEN RefineNet, checked against onnxruntime, and the onnxruntime segmenter."""

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from cenfusion.engine.checkpoint import save_checkpoint
from cenfusion.errors import CenError
from cenfusion.fusion import ModalityBatchNorm2d, exchange_stats
from cenfusion.models.refinenet import CENRefineNet, create_cen_refinenet
from cenfusion.segmentation.export import (
    MAX_OPSET,
    MIN_OPSET,
    export_checkpoint,
    export_onnx,
    max_abs_difference,
)
from cenfusion.segmentation.modelio import load_segmenter, model_record
from cenfusion.segmentation.onnx_segmenter import OnnxSegmenter

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model() -> CENRefineNet:
    """A small CEN RefineNet whose private norms differ per modality and really exchange."""
    torch.manual_seed(0)
    net = create_cen_refinenet(backbone="resnet18", num_classes=3, decoder_width=16)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, ModalityBatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                if module.exchange:
                    module.weight[module.penalty_mask & (torch.rand_like(module.weight) < 0.3)] = 0
        net.ensemble.alpha.copy_(torch.tensor([0.3, 1.2]))
    assert exchange_stats(net).overall > 0.1
    return net.train()


def inputs(batch: int, height: int, width: int, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, height, width, generator=generator) for _ in range(2)]


def test_all_heads_dynamic_size_match_torch(model: CENRefineNet, tmp_path: Path) -> None:
    path = export_onnx(model, tmp_path / "m.onnx", heads="all", height=64, width=64, dynamic=True)
    assert model.training, "export must restore the model's mode"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["rgb", "depth"]
    assert [o.name for o in session.get_outputs()] == ["rgb_logits", "depth_logits", "ensemble"]
    model.eval()
    for batch, height, width in [(1, 64, 64), (2, 48, 80)]:
        rgb, depth = inputs(batch, height, width)
        got = session.run(None, {"rgb": rgb.numpy(), "depth": depth.numpy()})
        with torch.no_grad():
            expected = model([rgb, depth])
        for g, e in zip(got, expected, strict=True):
            assert g.shape == (batch, 3, -(-height // 4), -(-width // 4))
            assert np.abs(g - e.numpy()).max() < TOLERANCE
    model.train()


def test_a_backbone_of_padded_sizes_exports_a_graph_its_segmenter_pads_for(tmp_path) -> None:
    torch.manual_seed(0)
    net = create_cen_refinenet(
        backbone="dla46_c", num_classes=3, decoder_width=16, exchange_at="*.bn2"
    ).eval()
    for dynamic in (False, True):
        with pytest.raises(CenError, match=r"--size 60 80: dla46_c takes sides in multiples of"):
            export_onnx(net, tmp_path / "odd.onnx", height=60, width=80, dynamic=dynamic)
    path = export_onnx(net, tmp_path / "d.onnx", height=64, width=64, dynamic=True)
    segmenter = OnnxSegmenter(path)
    assert segmenter.size_multiple == 32
    for height, width in [(64, 96), (37, 81)]:
        rgb, depth = inputs(1, height, width)
        with torch.no_grad():
            expected = net([rgb, depth])
        got = segmenter([rgb, depth])
        assert got.shape == expected.shape == (3, 1, 3, -(-height // 4), -(-width // 4))
        assert (got - expected).abs().max() < TOLERANCE


def test_ensemble_only_fixed_size(model: CENRefineNet, tmp_path: Path) -> None:
    path = export_onnx(model, tmp_path / "e.onnx", heads="ensemble", height=64, width=64)
    segmenter = OnnxSegmenter(path)
    assert segmenter.output_names == ["ensemble"]
    assert segmenter.heads == "ensemble"
    assert max_abs_difference(model, path, inputs(2, 64, 64)) < TOLERANCE
    with pytest.raises(CenError, match=r"input rgb is 1x3x64x80, the graph takes anyx3x64x64"):
        segmenter(inputs(1, 64, 80))


def test_segmenter_takes_lists_or_stacked_numpy_and_torch(
    model: CENRefineNet, tmp_path: Path
) -> None:
    path = export_onnx(model, tmp_path / "m.onnx", height=32, width=32, modalities=["a", "b"])
    segmenter = OnnxSegmenter(path, threads=1)
    assert segmenter.modalities == ("a", "b")
    assert segmenter.num_classes == 3
    assert segmenter.model_config["backbone"] == "resnet18"
    rgb, depth = inputs(2, 32, 32)
    from_list = segmenter([rgb, depth])
    from_stack = segmenter(torch.cat([rgb, depth]).numpy())
    assert len(from_list) == 3
    for a, b in zip(from_list, from_stack, strict=True):
        assert isinstance(a, torch.Tensor) and torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        expected = model([rgb, depth])
    model.train()
    for a, e in zip(from_list, expected, strict=True):
        assert (a - e).abs().max() < TOLERANCE
    with pytest.raises(CenError, match="takes 2 modalities"):
        segmenter([rgb])
    with pytest.raises(CenError, match="not a multiple of 2"):
        segmenter(torch.cat([rgb, depth, rgb[:1]]))


def test_export_checkpoint_names_inputs_after_its_modalities(
    model: CENRefineNet, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "best.pth"
    config = {"modalities": ["rgb:0:rgb", "hha:3:gray"], "depth_scale": 0.001}
    save_checkpoint(checkpoint, {**model_record(model), "config": config})
    path = export_checkpoint(checkpoint, tmp_path / "out" / "m.onnx", height=32, width=32)
    segmenter = OnnxSegmenter(path)
    assert segmenter.modalities == ("rgb", "hha") and segmenter.depth_scale == 0.001
    assert segmenter.kinds == ("rgb", "gray")
    assert segmenter.output_names == ["rgb_logits", "hha_logits", "ensemble"]
    assert max_abs_difference(model, path, inputs(1, 32, 32)) < TOLERANCE


@pytest.mark.parametrize("opset", [MIN_OPSET, MAX_OPSET])
def test_every_opset_allowed_exports_the_same_function(model, tmp_path, opset) -> None:
    path = export_onnx(model, tmp_path / "m.onnx", height=32, width=32, opset=opset)
    assert max_abs_difference(model, path, inputs(1, 32, 32)) < TOLERANCE


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"heads": "rgb"}, "--heads rgb: expected one of all, ensemble"),
        ({"opset": 11}, "--opset 11: expected 12..20"),
        ({"height": 0}, "--size 0 64: expected two positive numbers"),
        ({"modalities": ["rgb"]}, "takes 2 distinct modality names"),
        ({"modalities": ["rgb", "rgb"]}, "takes 2 distinct modality names"),
        ({"modalities": ["rgb", "ensemble"]}, "'ensemble' is taken"),
    ],
)
def test_bad_export_arguments(model: CENRefineNet, tmp_path: Path, kwargs, message) -> None:
    arguments = {"height": 64, "width": 64, **kwargs}
    with pytest.raises(CenError, match=message):
        export_onnx(model, tmp_path / "m.onnx", **arguments)
    assert not (tmp_path / "m.onnx").exists()


def test_an_output_path_that_cannot_be_a_file_is_refused(model, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CenError, match=r"afile/m\.onnx: .*afile is a file, expected a folder"):
        export_onnx(model, tmp_path / "afile" / "m.onnx", height=32, width=32)
    with pytest.raises(CenError, match=r": a folder, expected the ONNX file to write"):
        export_onnx(model, tmp_path, height=32, width=32)


def test_export_refuses_an_onnx_input_its_own_input_as_output_and_memory_it_lacks(
    model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = tmp_path / "m.pth"
    save_checkpoint(checkpoint, model_record(model))
    with pytest.raises(CenError, match=r"^OUT .*m\.pth: an input of this command; write another"):
        export_checkpoint(checkpoint, checkpoint, height=32, width=32)
    assert load_segmenter(checkpoint).model.config == model.config, "the checkpoint is intact"
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"an ONNX file, by name")
    with pytest.raises(CenError, match=r"m\.onnx: an ONNX file already; export takes a cenfusion"):
        export_checkpoint(onnx, tmp_path / "again.onnx", height=32, width=32)

    def exhausted(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] Cannot allocate memory")

    monkeypatch.setattr(torch.onnx, "export", exhausted)
    with pytest.raises(CenError, match=r"^--size 32 32: out of memory tracing the network"):
        export_onnx(model, tmp_path / "big.onnx", height=32, width=32)
    assert not (tmp_path / "big.onnx").exists()


def test_missing_onnxruntime_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(CenError) as caught:
        OnnxSegmenter(tmp_path / "m.onnx")
    message = str(caught.value)
    assert "\n" not in message and "pip install cenfusion[onnx]" in message


def test_unreadable_files_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(CenError, match="ONNX file not found"):
        OnnxSegmenter(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(CenError, match="not a loadable ONNX model") as caught:
        OnnxSegmenter(garbage)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 200
