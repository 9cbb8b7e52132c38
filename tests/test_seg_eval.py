"""``cen seg eval``: the released single-scale protocol and multi-scale + flip."""

import json
import math
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from cenfusion.cli import main
from cenfusion.data.synthetic import generate_segmentation_dataset
from cenfusion.engine.checkpoint import save_checkpoint, saved_config
from cenfusion.engine.config import config_to_dict
from cenfusion.errors import CenError
from cenfusion.models.official import to_official_state_dict
from cenfusion.models.refinenet import create_cen_refinenet
from cenfusion.segmentation.build import build_dataset, build_model
from cenfusion.segmentation.config import SYNTHETIC
from cenfusion.segmentation.evaluate import (
    MS_SCALES,
    MULTI_SCALE_FLIP,
    SINGLE_SCALE,
    Protocol,
    TestTimeAugmentation,
    batches_by_size,
    evaluate,
    evaluate_checkpoint,
    evaluate_protocols,
    protocols_for,
)
from cenfusion.segmentation.export import export_checkpoint, export_onnx
from cenfusion.segmentation.modelio import model_record
from cenfusion.segmentation.task import SEGMENTATION


def same(a, b) -> bool:
    """Equal scores, NaN included (JSON writes NaN as NaN)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def close(a, b) -> bool:
    """The scores of one function computed by two runtimes (PyTorch, ONNX Runtime): their
    logits differ by float rounding, which may flip the few pixels whose classes tie within
    it (a random network has such ties); a pixel of these 3 images is 0.011 points."""
    for head in a:
        x, y = a[head], b[head]
        if any(abs(x[k] - y[k]) > 0.05 for k in ("pixel_acc", "mean_acc", "miou")):
            return False
        if [math.isnan(v) for v in x["iou"]] != [math.isnan(v) for v in y["iou"]]:
            return False
    return a.keys() == b.keys()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """3 validation images of 48x64, a random tiny CEN and its checkpoint."""
    root = tmp_path_factory.mktemp("eval")
    data = generate_segmentation_dataset(root / "data", 4, 3, (48, 64), seed=0)
    cfg = replace(
        SYNTHETIC, data=data, runs=root / "runs", decoder_width=32, workers=0, device="cpu",
        amp=False, channels_last=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    checkpoint = root / "best.pt"
    save_checkpoint(checkpoint, {**model_record(model), "config": config_to_dict(cfg)})
    return cfg, model, checkpoint


def test_batched_evaluation_gives_the_scores_of_one_image_at_a_time(setup) -> None:
    cfg, _, checkpoint = setup
    protocols = [SINGLE_SCALE, MULTI_SCALE_FLIP]
    one = evaluate_protocols(cfg, checkpoint, protocols)
    three = evaluate_protocols(cfg, checkpoint, protocols, batch_size=3)
    for protocol in protocols:
        assert same(three[protocol.label], one[protocol.label]), protocol.label
    with pytest.raises(CenError, match="--batch-size 0: expected >= 1"):
        evaluate_protocols(cfg, checkpoint, protocols, batch_size=0)


def test_evaluation_under_torchrun_is_refused(setup, monkeypatch) -> None:
    """Every process would score the whole set and append the same lines."""
    cfg, _, checkpoint = setup
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CenError, match="^cen seg eval runs in one process: start it without"):
        evaluate_protocols(cfg, checkpoint)


def test_a_batch_splits_where_the_image_size_changes() -> None:
    def sample(h: int, w: int, name: str) -> dict:
        return {"inputs": torch.zeros(2, 3, h, w), "mask": torch.zeros(h, w), "name": name}

    sizes = [(4, 6), (4, 6), (5, 6), (4, 6)]
    batches = batches_by_size([sample(h, w, str(i)) for i, (h, w) in enumerate(sizes)])
    assert [b["name"] for b in batches] == [["0", "1"], ["2"], ["3"]]
    assert [tuple(b["inputs"].shape) for b in batches] == [
        (2, 2, 3, 4, 6),
        (1, 2, 3, 5, 6),
        (1, 2, 3, 4, 6),
    ]


def test_one_pass_at_scale_one_is_the_single_scale_evaluate(setup) -> None:
    cfg, model, checkpoint = setup
    val = build_dataset(cfg, train=False)
    expected = evaluate(model, DataLoader(val, batch_size=1), cfg, torch.device("cpu"))
    assert same(evaluate_checkpoint(cfg, checkpoint), expected)
    assert same(evaluate_checkpoint(cfg, checkpoint, scales=(1.0,), flip=False), expected)
    assert list(expected) == ["rgb", "depth", "ensemble"]


def test_probability_path_keeps_the_argmax(setup) -> None:
    cfg, model, _ = setup
    val = build_dataset(cfg, train=False)
    sample = val[0]
    inputs = [x[None] for x in sample["inputs"]]
    tta = TestTimeAugmentation(model, sample["kinds"], scales=(1.0,), flip=False).eval()
    with torch.no_grad():
        probs = tta(inputs)
        logits = model(inputs)
    for p, h in zip(probs, logits):
        assert p.shape == (1, cfg.num_classes, 48, 64)
        torch.testing.assert_close(p.sum(1), torch.ones(1, 48, 64))
        up = nn.functional.interpolate(h, size=(48, 64), mode="bicubic", align_corners=False)
        assert (p.argmax(1) == up.argmax(1)).float().mean() > 0.999


class PixelModel(nn.Module):
    """A per-pixel CEN stand-in (1x1 convolutions): exactly equivariant to mirroring."""

    def __init__(self, modalities: int = 2, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, classes, 1)
        self.modalities = modalities

    def forward(self, inputs):
        heads = [self.conv(x) for x in inputs]
        return [*heads, sum(heads) / len(heads)]


def test_flip_averaging_of_an_equivariant_model_changes_nothing() -> None:
    torch.manual_seed(0)
    model = PixelModel()
    inputs = [torch.randn(2, 3, 20, 28), torch.randn(2, 3, 20, 28)]
    with torch.no_grad():
        for scales in ((1.0,), (0.5, 1.0, 1.5)):
            plain = TestTimeAugmentation(model, ["rgb", "gray"], scales, flip=False)(inputs)
            flipped = TestTimeAugmentation(model, ["rgb", "gray"], scales, flip=True)(inputs)
            for a, b in zip(plain, flipped):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        stacked = TestTimeAugmentation(model, ["rgb", "gray"], (1.0,), flip=True)(torch.cat(inputs))
        expected = [h.softmax(1) for h in model(inputs)]
        for a, b in zip(stacked, expected):
            torch.testing.assert_close(a, b)


class StridedModel(nn.Module):
    """Heads from a strided 3x3 convolution (outputs at half size, like CEN's quarter size),
    neither mirror- nor scale-equivariant; the ensemble is their mean."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, classes, 3, stride=2, padding=1)

    def forward(self, inputs):
        heads = [self.conv(x) for x in inputs]
        return [*heads, sum(heads) / len(heads)]


def test_multi_scale_flip_is_the_average_of_every_pass() -> None:
    """Each scale and mirror pass, computed here one by one: inputs resized (depth nearest,
    photographs bilinear), run, logits upsampled to the input size, mirrored back, softmax;
    the map is their mean."""
    torch.manual_seed(0)
    model = StridedModel().eval()
    inputs = [torch.randn(2, 3, 20, 28), torch.randn(2, 3, 20, 28)]
    kinds = ["rgb", "depth"]
    scales = (0.5, 1.0, 1.5)
    expected, passes = [torch.zeros(2, 4, 20, 28) for _ in range(3)], 0
    with torch.no_grad():
        for scale in scales:
            size = (round(20 * scale), round(28 * scale))
            resized = [
                nn.functional.interpolate(inputs[0], size, mode="bilinear", align_corners=False),
                nn.functional.interpolate(inputs[1], size, mode="nearest-exact"),
            ]
            for mirrored in (False, True):
                batch = [x.flip(-1) for x in resized] if mirrored else resized
                for i, logits in enumerate(model(batch)):
                    up = nn.functional.interpolate(
                        logits, (20, 28), mode="bicubic", align_corners=False
                    )
                    expected[i] += (up.flip(-1) if mirrored else up).softmax(1)
                passes += 1
        got = TestTimeAugmentation(model, kinds, scales, flip=True)(inputs)
        single = TestTimeAugmentation(model, kinds, (1.0,), flip=False)(inputs)
        two_scales = TestTimeAugmentation(model, kinds, scales[1:], flip=True)(inputs)
    assert passes == 6 and got.shape == (3, 2, 4, 20, 28)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b / passes)
    assert (got - single).abs().max() > 1e-2 and (got - two_scales).abs().max() > 1e-3


def test_multi_scale_sides_round_half_up_as_mmsegmentation_does() -> None:
    seen = []

    class Recording(StridedModel):
        def forward(self, inputs):
            seen.append(tuple(inputs[0].shape[-2:]))
            return super().forward(inputs)

    inputs = [torch.randn(1, 3, 21, 29), torch.randn(1, 3, 21, 29)]
    with torch.no_grad():
        TestTimeAugmentation(Recording(), ["rgb", "depth"], (0.5, 1.5), flip=False)(inputs)
    assert seen == [(11, 15), (32, 44)]  # 10.5 -> 11, 14.5 -> 15, 31.5 -> 32, 43.5 -> 44


def test_multi_scale_flip_differs_from_single_scale(setup) -> None:
    cfg, _, checkpoint = setup
    single = evaluate_checkpoint(cfg, checkpoint)
    multi = evaluate_checkpoint(cfg, checkpoint, scales=MS_SCALES, flip=True)
    assert list(multi) == ["rgb", "depth", "ensemble"]
    assert not same(single, multi)
    for scores in multi.values():
        assert 0 <= scores["pixel_acc"] <= 100


def test_protocols_for_and_labels() -> None:
    assert protocols_for() == [SINGLE_SCALE]
    assert protocols_for(ms=True) == [SINGLE_SCALE, MULTI_SCALE_FLIP]
    assert protocols_for(ms=True, flip=False) == [SINGLE_SCALE, Protocol(MS_SCALES, False)]
    assert protocols_for(flip=True) == [SINGLE_SCALE, Protocol((1.0,), True)]
    assert protocols_for(scales=[1.0]) == [SINGLE_SCALE]
    assert SINGLE_SCALE.label == "single-scale (released protocol)"
    assert MULTI_SCALE_FLIP.label == "multi-scale 0.5-1.5 + flip"
    assert Protocol((0.75, 1.0), False).label == "multi-scale 0.75, 1"
    with pytest.raises(CenError, match="positive"):
        Protocol((0.0,), False)


def test_cli_prints_both_tables_and_appends_json_lines(setup, tmp_path, capsys) -> None:
    cfg, _, checkpoint = setup
    argv = [
        "seg",
        "eval",
        "--resume",
        str(checkpoint),
        "--ms",
        "--scales",
        "0.75",
        "1.25",
        "-c",
        "ms",
        "--runs",
        str(tmp_path),
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "single-scale (released protocol)" in out and "multi-scale 0.75, 1.25 + flip" in out
    assert out.count("ensemble") == 2
    lines = (tmp_path / "ms" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["protocol"] for r in records] == [
        "single-scale (released protocol)",
        "multi-scale 0.75, 1.25 + flip",
    ]
    assert records[1]["scales"] == [0.75, 1.25] and records[1]["flip"] is True
    assert (records[1]["data"], records[1]["val_list"]) == (str(cfg.data), "val.txt")
    assert same(records[0]["val"], evaluate_checkpoint(cfg, checkpoint))


def test_an_exported_onnx_file_scores_as_its_checkpoint(setup, tmp_path) -> None:
    cfg, _, checkpoint = setup
    protocols = [SINGLE_SCALE, MULTI_SCALE_FLIP]
    onnx = export_checkpoint(checkpoint, tmp_path / "m.onnx", dynamic=True)
    expected = evaluate_protocols(cfg, checkpoint, protocols)
    got = evaluate_protocols(cfg, onnx, protocols, batch_size=3)
    for protocol in protocols:
        assert close(got[protocol.label], expected[protocol.label]), protocol.label
    with pytest.raises(CenError, match="--channels-last: for PyTorch checkpoints; .* onnxrun"):
        evaluate_protocols(replace(cfg, channels_last=True), onnx)
    ensemble = export_checkpoint(checkpoint, tmp_path / "e.onnx", heads="ensemble", dynamic=True)
    with pytest.raises(CenError, match="--heads ensemble; scoring needs every head"):
        evaluate_protocols(cfg, ensemble)


def test_cli_evaluates_an_onnx_file_with_its_runs_settings_not_how_it_ran(setup, tmp_path) -> None:
    cfg, model, _ = setup
    checkpoint = tmp_path / "amp.pt"
    ran = config_to_dict(replace(cfg, amp=True, channels_last=True))
    save_checkpoint(checkpoint, {**model_record(model), "config": ran})
    onnx = export_checkpoint(checkpoint, tmp_path / "m.onnx", dynamic=True)
    assert main(["seg", "eval", "--resume", str(onnx), "-c", "x", "--runs", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "x" / "metrics.jsonl").read_text())
    assert close(record["val"], evaluate_checkpoint(cfg, checkpoint))
    bare = export_onnx(model, tmp_path / "BARE.ONNX", dynamic=True)  # no settings: the preset's
    data = ["--data", str(cfg.data), "--preset", "synthetic", "--num-classes", str(cfg.num_classes)]
    assert (
        main(["seg", "eval", "--resume", str(bare), *data, "-c", "y", "--runs", str(tmp_path)]) == 0
    )
    record = json.loads((tmp_path / "y" / "metrics.jsonl").read_text())
    assert close(record["val"], evaluate_checkpoint(cfg, checkpoint))
    assert main(["seg", "eval", "--resume", str(bare), *data, "--amp"]) == 2


def test_released_checkpoint_is_evaluated_and_checked(setup, tmp_path) -> None:
    cfg, _, _ = setup
    torch.manual_seed(0)
    model = create_cen_refinenet(depth=50, num_classes=cfg.num_classes).eval()
    released = tmp_path / "cen.pth.tar"
    torch.save({"segmenter": to_official_state_dict(model)}, released)
    overrides = {"data": cfg.data, "num_classes": cfg.num_classes, "workers": 0, "device": "cpu"}
    saved = saved_config(released, "segmentation")
    assert saved is None, "a released file saves no settings: the preset is the base"
    released_cfg = SEGMENTATION.resolve_config(
        "synthetic", None, {**overrides, "amp": False}, saved
    )
    val = build_dataset(released_cfg, train=False)
    expected = evaluate(model, DataLoader(val, batch_size=1), released_cfg, torch.device("cpu"))
    assert same(evaluate_checkpoint(released_cfg, released), expected)
    with pytest.raises(
        CenError, match=f"model has {cfg.num_classes} classes, --num-classes gives 40"
    ):
        evaluate_checkpoint(replace(released_cfg, num_classes=40), released)


@pytest.mark.parametrize(("flags", "kept"), [([], True), (["--no-keep-memory"], False)])
def test_cpu_evaluation_keeps_freed_memory_unless_told_not_to(
    setup, tmp_path, kept_memory_calls, flags, kept
) -> None:
    import cenfusion.engine.runtime as module

    asked = kept_memory_calls(module)
    _, _, checkpoint = setup
    argv = ["seg", "eval", "--resume", str(checkpoint), "--device", "cpu", *flags]
    assert main([*argv, "--runs", str(tmp_path)]) == 0
    assert asked == [(kept, "cpu")]


def test_compiled_evaluation_freezes_the_weights(setup, tmp_path, monkeypatch) -> None:
    """The checkpoint's weights do not change during evaluation: inductor may fold them."""
    asked: list[dict] = []
    monkeypatch.setattr(torch, "compile", lambda net, **kwargs: asked.append(kwargs) or net)
    _, _, checkpoint = setup
    argv = ["seg", "eval", "--resume", str(checkpoint), "--device", "cpu", "--compile"]
    assert main([*argv, "--runs", str(tmp_path)]) == 0
    assert asked == [{"options": {"freezing": True}}]


def test_settings_that_cannot_run_are_refused_from_python_too(setup) -> None:
    cfg, _, checkpoint = setup
    with pytest.raises(CenError, match=r"^--exp '\.\./x': expected a run name"):
        evaluate_protocols(replace(cfg, exp="../x"), checkpoint)
