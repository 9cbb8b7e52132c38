"""``cen seg predict``: released and cenfusion checkpoints on one's own RGB-D images."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cenfusion.cli import main
from cenfusion.engine.checkpoint import save_checkpoint
from cenfusion.engine.config import config_to_dict
from cenfusion.engine.run import RuntimeConfig
from cenfusion.errors import CenError
from cenfusion.models.official import to_official_state_dict
from cenfusion.models.refinenet import create_cen_refinenet
from cenfusion.segmentation.config import SYNTHETIC
from cenfusion.segmentation.modelio import model_record
from cenfusion.segmentation.predict import predict
from cenfusion.segmentation.samples import gather_cli_inputs
from cenfusion.segmentation.visualize import palette

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

CPU = RuntimeConfig(device="cpu")


def write_rgb(path: Path, height: int, width: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    smooth = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    image = (0.5 * smooth + 0.5 * rng.integers(0, 256, (height, width, 3))).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def write_depth(path: Path, height: int, width: int, seed: int = 0, holes: bool = True) -> Path:
    rng = np.random.default_rng(seed + 100)
    depth = rng.integers(500, 8000, (height, width)).astype(np.uint16)
    if holes:
        depth[: height // 3, : width // 2] = 0
        depth[rng.random((height, width)) < 0.1] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(depth).save(path)
    return path


def network_inputs(rgb: Path, depth: Path, scale: float = 1 / 5000) -> list[torch.Tensor]:
    """The released NYUDv2 encoding, written out independently of the package."""
    image = (np.asarray(Image.open(rgb).convert("RGB"), np.float32) / 255 - MEAN) / STD
    raw = np.asarray(Image.open(depth), np.float32) * scale
    return [
        torch.from_numpy(image.transpose(2, 0, 1).copy())[None],
        torch.from_numpy(np.repeat(raw[None], 3, axis=0))[None],
    ]


def reference_labels(model, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    """argmax of every head's logits resized to the image size as evaluation does (bicubic)."""
    with torch.no_grad():
        heads = model(inputs)
    size = inputs[0].shape[-2:]
    return [
        F.interpolate(h, size=size, mode="bicubic", align_corners=False)[0].argmax(0).numpy()
        for h in heads
    ]


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A ResNet-50 CEN with 5 classes saved in the released ``.pth.tar`` layout."""
    torch.manual_seed(0)
    model = create_cen_refinenet(depth=50, num_classes=5).eval()
    with torch.no_grad():
        model.ensemble.alpha.copy_(torch.tensor([0.3, -0.2]))
    path = tmp_path_factory.mktemp("released") / "cen.pth.tar"
    torch.save({"segmenter": to_official_state_dict(model), "epoch": 7}, path)
    return model, path


def save_tiny(path: Path, modalities=("rgb", "depth"), seed: int = 1, depth_scale=1 / 5000):
    torch.manual_seed(seed)
    model = create_cen_refinenet(
        backbone="resnet26", num_classes=5, decoder_width=32, num_modalities=len(modalities)
    ).eval()
    cfg = replace(
        SYNTHETIC,
        num_classes=5,
        decoder_width=32,
        modalities=tuple(modalities),
        depth_scale=depth_scale,
    )
    save_checkpoint(path, {**model_record(model), "config": config_to_dict(cfg)})
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    return save_tiny(path), path


def test_released_checkpoint_odd_size_with_holes(released, tmp_path) -> None:
    model, checkpoint = released
    rgb = write_rgb(tmp_path / "in" / "kitchen.png", 37, 53)
    depth = write_depth(tmp_path / "in" / "kitchen_depth.png", 37, 53)
    assert (read(depth) == 0).mean() > 0.1  # a real share of holes
    out = tmp_path / "out"
    written = predict(checkpoint, [(rgb, depth)], out, heads=True, runtime=CPU)

    names = {p.name for p in written}
    expected = {
        f"kitchen{head}_{kind}.png"
        for head in ("", "_rgb", "_depth")
        for kind in ("color", "label", "overlay")
    }
    assert names == expected and all((out / n).is_file() for n in names)

    refs = reference_labels(model, network_inputs(rgb, depth))
    labels = Image.open(out / "kitchen_label.png")
    assert labels.mode == "L" and labels.size == (53, 37)
    np.testing.assert_array_equal(np.asarray(labels), refs[-1])
    np.testing.assert_array_equal(read(out / "kitchen_rgb_label.png"), refs[0])
    np.testing.assert_array_equal(read(out / "kitchen_depth_label.png"), refs[1])
    np.testing.assert_array_equal(read(out / "kitchen_color.png"), palette(5)[refs[-1]])
    overlay = read(out / "kitchen_overlay.png").astype(int)
    blend = 0.5 * palette(5)[refs[-1]] + 0.5 * read(rgb)
    assert overlay.shape == (37, 53, 3) and np.abs(overlay - blend).max() <= 1
    assert len(np.unique(refs[-1])) > 1  # the test would be weak on a constant prediction


def test_released_checkpoint_refuses_class_and_modality_count(released, tmp_path) -> None:
    _, checkpoint = released
    rgb = write_rgb(tmp_path / "a.png", 20, 24)
    depth = write_depth(tmp_path / "a_d.png", 20, 24)
    with pytest.raises(CenError, match="predicts 5 classes, --num-classes says 40"):
        predict(checkpoint, [(rgb, depth)], tmp_path / "out", num_classes=40, runtime=CPU)
    with pytest.raises(CenError, match="takes 2 modalities, 3 given"):
        predict(
            checkpoint,
            [(rgb, depth, rgb)],
            tmp_path / "out",
            runtime=CPU,
            modalities=["rgb", "depth", "hha:rgb"],
        )
    assert not (tmp_path / "out").exists()


def test_our_checkpoint_refuses_mismatches_on_the_command_line(tiny, tmp_path, capsys) -> None:
    _, checkpoint = tiny
    rgb = write_rgb(tmp_path / "a.png", 20, 24)
    depth = write_depth(tmp_path / "a_d.png", 20, 24)
    common = [
        "seg",
        "predict",
        str(checkpoint),
        "--rgb",
        str(rgb),
        "--depth",
        str(depth),
        "-o",
        str(tmp_path / "out"),
        "--device",
        "cpu",
    ]
    assert main([*common, "--input", f"hha:gray={rgb}"]) == 2
    err = capsys.readouterr().err
    assert "takes 2 modalities (rgb, depth), 3 given (rgb, depth, hha)" in err
    assert main([*common, "--num-classes", "8"]) == 2
    assert "the model predicts 5 classes, --num-classes says 8" in capsys.readouterr().err


def test_not_a_checkpoint(tmp_path) -> None:
    bogus = tmp_path / "bogus.pth.tar"
    bogus.write_bytes(b"not a checkpoint at all")
    rgb = write_rgb(tmp_path / "a.png", 20, 24)
    with pytest.raises(CenError, match="neither a cenfusion checkpoint nor a released"):
        predict(bogus, [(rgb, rgb)], tmp_path / "out", runtime=CPU)


def test_depth_of_another_size_is_resized_with_a_warning(tiny, tmp_path, capsys) -> None:
    model, checkpoint = tiny
    rgb = write_rgb(tmp_path / "room.png", 37, 53)
    depth = write_depth(tmp_path / "room_depth.png", 40, 60)
    predict(checkpoint, [(rgb, depth)], tmp_path / "out", runtime=CPU)
    err = capsys.readouterr().err
    assert "warning" in err and "room_depth.png is 40x60" in err and "room.png is 37x53" in err
    assert read(tmp_path / "out" / "room_label.png").shape == (37, 53)
    # resized with nearest neighbour: only values of the original map, holes included
    small = network_inputs(rgb, write_depth(tmp_path / "room_small.png", 37, 53))
    resized = F.interpolate(network_inputs(rgb, depth)[1], size=(37, 53), mode="nearest-exact")
    refs = reference_labels(model, [small[0], resized])
    np.testing.assert_array_equal(read(tmp_path / "out" / "room_label.png"), refs[-1])


def test_folder_batch_and_cli(tiny, tmp_path, capsys) -> None:
    model, checkpoint = tiny
    root = tmp_path / "scenes"
    for i, (h, w) in enumerate([(37, 53), (24, 32), (41, 30)]):
        write_rgb(root / "rgb" / f"{i:03d}.png", h, w, seed=i)
        write_depth(root / "depth" / f"{i:03d}.png", h, w, seed=i)
    out = tmp_path / "out"
    written = predict(checkpoint, [root], out, runtime=CPU)
    assert len(written) == 9
    for i in range(3):
        rgb, depth = root / "rgb" / f"{i:03d}.png", root / "depth" / f"{i:03d}.png"
        refs = reference_labels(model, network_inputs(rgb, depth))
        np.testing.assert_array_equal(read(out / f"{i:03d}_label.png"), refs[-1])

    out2 = tmp_path / "out2"
    argv = [
        "seg",
        "predict",
        str(checkpoint),
        "--rgb",
        str(root / "rgb"),
        "--depth",
        str(root / "depth"),
        "-o",
        str(out2),
        "--size",
        "32",
        "48",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    assert "wrote 9 files" in capsys.readouterr().out
    for i, size in enumerate([(37, 53), (24, 32), (41, 30)]):
        assert read(out2 / f"{i:03d}_label.png").shape == size  # back at the image's own size
        assert read(out2 / f"{i:03d}_overlay.png").shape == (*size, 3)


def test_mismatched_stems_name_the_missing_partner(tiny, tmp_path) -> None:
    _, checkpoint = tiny
    for stem in ("a", "b", "c"):
        write_rgb(tmp_path / "rgb" / f"{stem}.png", 16, 16)
    for stem in ("a", "c"):
        write_depth(tmp_path / "depth" / f"{stem}.png", 16, 16)
    with pytest.raises(
        CenError, match=r"rgb/b\.png has no depth partner .*depth/b\.\* \(files pair by name\)"
    ):
        predict(checkpoint, [(tmp_path / "rgb", tmp_path / "depth")], tmp_path / "out", runtime=CPU)


@pytest.mark.parametrize("trained", [("depth", "rgb"), ("depth:2:depth", "rgb:0:rgb")])
def test_inputs_follow_the_checkpoint_modality_order(tmp_path, trained) -> None:
    """Own data's runs record NAME:COLUMN:KIND; the inputs are matched by NAME."""
    checkpoint = tmp_path / "depth_first.pt"
    model = save_tiny(checkpoint, modalities=trained, seed=3)
    rgb = write_rgb(tmp_path / "x.png", 29, 31)
    depth = write_depth(tmp_path / "x_d.png", 29, 31)
    predict(
        checkpoint,
        [(rgb, depth)],
        tmp_path / "out",
        runtime=CPU,
        modalities=["rgb", "depth"],
        heads=True,
    )
    image, dep = network_inputs(rgb, depth)
    refs = reference_labels(model, [dep, image])
    np.testing.assert_array_equal(read(tmp_path / "out" / "x_label.png"), refs[-1])
    np.testing.assert_array_equal(read(tmp_path / "out" / "x_depth_label.png"), refs[0])


def test_depth_is_read_at_the_scale_the_checkpoint_was_trained_with(tmp_path, capsys) -> None:
    checkpoint = tmp_path / "millimetres_1000.pt"
    model = save_tiny(checkpoint, seed=4, depth_scale=1 / 1000)
    rgb = write_rgb(tmp_path / "x.png", 29, 31)
    depth = write_depth(tmp_path / "x_d.png", 29, 31)
    own = reference_labels(model, network_inputs(rgb, depth, scale=1 / 1000))
    nyu = reference_labels(model, network_inputs(rgb, depth))
    assert (own[1] != nyu[1]).any(), "the depth head must see the scale"
    predict(checkpoint, [(rgb, depth)], tmp_path / "own", runtime=CPU, heads=True)
    np.testing.assert_array_equal(read(tmp_path / "own" / "x_depth_label.png"), own[1])
    assert "depth-scale" not in capsys.readouterr().err
    given = tmp_path / "given"
    predict(checkpoint, [(rgb, depth)], given, runtime=CPU, heads=True, depth_scale=1 / 5000)
    np.testing.assert_array_equal(read(given / "x_depth_label.png"), nyu[1])
    warning = "--depth-scale 0.0002: " + str(checkpoint) + " was trained with 0.001"
    assert warning in capsys.readouterr().err


def test_bare_names_take_the_kinds_the_checkpoint_was_trained_with(tmp_path) -> None:
    checkpoint = tmp_path / "own.pt"
    save_tiny(checkpoint, modalities=("rgb:0:rgb", "depth:2:gray", "hha:3:rgb"), seed=5)
    root = tmp_path / "in"
    write_rgb(root / "rgb" / "x.png", 29, 31)
    write_depth(root / "depth" / "x.png", 29, 31)
    write_rgb(root / "hha" / "x.png", 29, 31, seed=7)
    predict(checkpoint, [root], tmp_path / "folder", runtime=CPU, heads=True)
    explicit = ["rgb:rgb", "depth:gray", "hha:rgb"]
    paths = tuple(root / name / "x.png" for name in ("rgb", "depth", "hha"))
    given = tmp_path / "given"
    predict(checkpoint, [paths], given, runtime=CPU, heads=True, modalities=explicit)
    for name in ("x_label.png", "x_depth_label.png", "x_hha_label.png"):
        np.testing.assert_array_equal(read(tmp_path / "folder" / name), read(given / name))
    with pytest.raises(CenError, match=r"^modality depth:depth: .*own.pt was trained on depth as"):
        predict(checkpoint, [paths], given, runtime=CPU, modalities=["rgb", "depth:depth", "hha"])
    for names in (["rgb", "depth", "thermal"], ["a:gray", "b:rgb", "c:depth"]):
        wrong = names[-1].partition(":")[0] if names[0] == "rgb" else "a"
        with pytest.raises(CenError, match=rf"^modality {wrong}: .*own.pt was trained on rgb, de"):
            predict(checkpoint, [paths], tmp_path / "wrong", runtime=CPU, modalities=names)
    assert not (tmp_path / "wrong").exists()


def test_gather_cli_inputs() -> None:
    items, names = gather_cli_inputs(
        [],
        [Path("a.png"), Path("b.png")],
        [Path("a_d.png"), Path("b_d.png")],
        ["hha:gray=a_h.png", "hha:gray=b_h.png"],
    )
    assert names == ["rgb", "depth", "hha:gray"]
    assert items == [
        (Path("a.png"), Path("a_d.png"), Path("a_h.png")),
        (Path("b.png"), Path("b_d.png"), Path("b_h.png")),
    ]
    with pytest.raises(CenError, match="as many paths as the others, got rgb 2, depth 1"):
        gather_cli_inputs([], [Path("a"), Path("b")], [Path("c")], [])
    with pytest.raises(CenError, match="expected NAME=PATH"):
        gather_cli_inputs([], [], [], ["hha"])
    with pytest.raises(CenError, match="hha:rgb=y.png: hha was given without a kind before"):
        gather_cli_inputs([], [], [], ["hha=x.png", "hha:rgb=y.png"])
    with pytest.raises(CenError, match="modality name 'a/b': expected letters, digits"):
        gather_cli_inputs([], [], [], ["a/b:rgb=x.png"])
    with pytest.raises(CenError, match="nothing to predict"):
        gather_cli_inputs([], [], [], [])
    with pytest.raises(CenError, match="^FOLDER root and --rgb/--input: give folders with"):
        gather_cli_inputs([Path("root")], [Path("photos")], [], ["hha=h.png"])


def test_every_unreadable_input_is_listed_before_anything_is_written(
    tiny, tmp_path, capsys
) -> None:
    _, checkpoint = tiny
    for i in range(4):
        write_rgb(tmp_path / "in" / "rgb" / f"{i}.png", 20, 24, seed=i)
        write_depth(tmp_path / "in" / "depth" / f"{i}.png", 20, 24, seed=i)
    for name in ("rgb/1.png", "depth/3.png"):
        (tmp_path / "in" / name).write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    assert main(["seg", "predict", str(checkpoint), str(tmp_path / "in"), "-o", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "1 of 2 problems" in err[-1]
    assert "rgb/1.png" in err[0] and "depth/3.png" in err[1]
    assert not out.exists()


def test_fast_path_flags_compute_the_same_labels(tiny, tmp_path, capsys) -> None:
    model, checkpoint = tiny
    rgb = write_rgb(tmp_path / "in" / "rgb" / "a.png", 37, 53)
    depth = write_depth(tmp_path / "in" / "depth" / "a.png", 37, 53)
    inputs = network_inputs(rgb, depth)
    base = ["seg", "predict", str(checkpoint), "--rgb", str(rgb), "--depth", str(depth)]

    assert main([*base, "-o", str(tmp_path / "cl"), "--channels-last", "--device", "cpu"]) == 0
    labels = read(tmp_path / "cl" / "a_label.png")
    np.testing.assert_array_equal(labels, reference_labels(model, inputs)[-1])

    assert main([*base, "-o", str(tmp_path / "amp"), "--amp", "--device", "cpu"]) == 0
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        heads = model(inputs).float()
    expected = F.interpolate(heads[-1], size=(37, 53), mode="bicubic", align_corners=False)
    np.testing.assert_array_equal(read(tmp_path / "amp" / "a_label.png"), expected[0].argmax(0))


def test_compiled_prediction_freezes_the_weights(tiny, tmp_path, monkeypatch) -> None:
    asked: list[dict] = []
    monkeypatch.setattr(torch, "compile", lambda net, **kwargs: asked.append(kwargs) or net)
    rgb = write_rgb(tmp_path / "in" / "rgb" / "a.png", 37, 53)
    depth = write_depth(tmp_path / "in" / "depth" / "a.png", 37, 53)
    argv = ["seg", "predict", str(tiny[1]), "--rgb", str(rgb), "--depth", str(depth)]
    assert main([*argv, "-o", str(tmp_path / "out"), "--compile", "--device", "cpu"]) == 0
    assert asked == [{"options": {"freezing": True}}]


def test_fast_path_flags_are_refused_for_an_onnx_file(tiny, tmp_path, capsys) -> None:
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"")
    rgb = write_rgb(tmp_path / "rgb.png", 8, 8)
    depth = write_depth(tmp_path / "depth.png", 8, 8)
    argv = ["seg", "predict", str(onnx), "--rgb", str(rgb), "--depth", str(depth)]
    assert main([*argv, "-o", str(tmp_path / "out"), "--amp", "--compile"]) == 2
    assert "--amp --compile: for PyTorch checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("flags", "kept"), [([], True), (["--no-keep-memory"], False)])
def test_cpu_prediction_keeps_freed_memory_unless_told_not_to(
    tiny, tmp_path, kept_memory_calls, flags, kept
) -> None:
    import cenfusion.engine.runtime as module

    asked = kept_memory_calls(module)
    _, checkpoint = tiny
    rgb = write_rgb(tmp_path / "rgb.png", 8, 8)
    depth = write_depth(tmp_path / "depth.png", 8, 8)
    argv = ["seg", "predict", str(checkpoint), "--rgb", str(rgb), "--depth", str(depth)]
    assert main([*argv, "-o", str(tmp_path / "out"), "--device", "cpu", *flags]) == 0
    assert asked == [(kept, "cpu")]


def test_batched_prediction_equals_one_image_at_a_time(tmp_path) -> None:
    """Images share a forward pass where the network sees them at one size (a change of size
    mid-stream starts a new batch); every output equals the one-at-a-time run's, and the
    labels vary (a classifier of unit-scale weights without bias) so that mixing up images
    or their sizes would show."""
    torch.manual_seed(2)
    model = create_cen_refinenet(backbone="resnet26", num_classes=5, decoder_width=32).eval()
    with torch.no_grad():
        model.decoder.classifier.weight.normal_(0, 1)
        model.decoder.classifier.bias.zero_()
    checkpoint = tmp_path / "varied.pt"
    save_checkpoint(checkpoint, model_record(model))
    sizes = [(24, 32), (24, 32), (20, 28), (24, 32), (24, 32), (24, 32)]
    pairs = [
        (
            write_rgb(tmp_path / "in" / f"{i}.png", h, w, seed=i),
            write_depth(tmp_path / "in" / f"{i}_depth.png", h, w, seed=i),
        )
        for i, (h, w) in enumerate(sizes)
    ]
    for size in (None, (16, 24)):
        outs = []
        for batch in (1, 4):
            out = tmp_path / f"out-{batch}-{size}"
            predict(checkpoint, pairs, out, heads=True, size=size, batch_size=batch, runtime=CPU)
            outs.append(out)
        names = sorted(p.name for p in outs[0].iterdir())
        assert len(names) == 6 * 3 * 3 and names == sorted(p.name for p in outs[1].iterdir())
        for name in names:
            assert np.array_equal(read(outs[0] / name), read(outs[1] / name)), (size, name)
    labels = read(tmp_path / "out-4-None" / "2_label.png")
    assert labels.shape == (20, 28) and len(np.unique(labels)) >= 2
    expected = reference_labels(model, network_inputs(*pairs[2]))[-1]
    assert (labels == expected).mean() > 0.999


def test_prediction_runs_with_the_threads_asked_for(tiny, tmp_path, monkeypatch) -> None:
    """Prediction opens the same runtime settings as training: --threads too."""
    import cenfusion.segmentation.predict as module

    seen: list[int] = []
    real = module.predict_batch

    def recording(*args: object, **kwargs: object):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "predict_batch", recording)
    _, checkpoint = tiny
    rgb = write_rgb(tmp_path / "rgb.png", 8, 8)
    depth = write_depth(tmp_path / "depth.png", 8, 8)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # so that a prediction on 1 thread differs from the default
    try:
        argv = ["seg", "predict", str(checkpoint), "--rgb", str(rgb), "--depth", str(depth)]
        assert main([*argv, "-o", str(tmp_path / "out"), "--device", "cpu", "--threads", "1"]) == 0
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_heads_outputs_may_not_overwrite_another_samples(tiny, tmp_path) -> None:
    _, checkpoint = tiny
    for stem in ("a", "a_rgb"):
        write_rgb(tmp_path / "rgb" / f"{stem}.png", 20, 24)
        write_depth(tmp_path / "depth" / f"{stem}.png", 20, 24)
    folders = [(tmp_path / "rgb", tmp_path / "depth")]
    message = r"^a_rgb_\*\.png: written by .*rgb/a_rgb\.png and by the rgb head of sample a; "
    with pytest.raises(CenError, match=message):
        predict(checkpoint, folders, tmp_path / "out", heads=True, runtime=CPU)
    assert not (tmp_path / "out").exists(), "refused before any output"
    assert len(predict(checkpoint, folders, tmp_path / "out", runtime=CPU)) == 6
    again = (
        write_rgb(tmp_path / "b" / "a.png", 20, 24),
        write_depth(tmp_path / "b" / "d.png", 20, 24),
    )
    with pytest.raises(CenError, match=r"rgb/a\.png and .*b/a\.png are both named a: their out"):
        predict(checkpoint, [*folders, again], tmp_path / "again", runtime=CPU)
    assert not (tmp_path / "again").exists()


def test_an_exported_file_predicts_the_checkpoints_labels(tiny, tmp_path) -> None:
    from cenfusion.segmentation.export import export_checkpoint

    _, checkpoint = tiny
    pairs = []
    for stem, (height, width) in {"a": (20, 24), "b": (27, 31)}.items():
        pairs.append(
            (
                write_rgb(tmp_path / "rgb" / f"{stem}.png", height, width),
                write_depth(tmp_path / "depth" / f"{stem}.png", height, width),
            )
        )
    expected = predict(checkpoint, pairs, tmp_path / "pt", heads=True, runtime=CPU)
    dynamic = export_checkpoint(checkpoint, tmp_path / "d.onnx", dynamic=True)
    got = predict(dynamic, pairs, tmp_path / "onnx", heads=True, runtime=CPU)
    assert [p.name for p in got] == [p.name for p in expected]
    for a, b in zip(got, expected):
        assert np.array_equal(read(a), read(b)), a.name
    static = export_checkpoint(checkpoint, tmp_path / "s.onnx", height=20, width=24)
    with pytest.raises(CenError, match=r"b\.png is 27x31, .*s\.onnx takes 20x24 only: .*--size"):
        predict(static, pairs, tmp_path / "static", runtime=CPU)
    assert not (tmp_path / "static").exists(), "refused before any output"
    with pytest.raises(CenError, match=r"--size 27 31: .*s\.onnx takes 20x24 only"):
        predict(static, pairs, tmp_path / "static", size=(27, 31), runtime=CPU)
    assert len(predict(static, pairs, tmp_path / "static", size=(20, 24), runtime=CPU)) == 6
    alone = export_checkpoint(checkpoint, tmp_path / "e.onnx", heads="ensemble", dynamic=True)
    with pytest.raises(CenError, match=r"^--heads: .*e\.onnx was exported with the ensemble head"):
        predict(alone, pairs, tmp_path / "alone", heads=True, runtime=CPU)
    assert len(predict(alone, pairs, tmp_path / "alone", runtime=CPU)) == 6


def test_the_package_loads_a_runs_segmenter_with_its_inputs(tiny) -> None:
    import cenfusion

    model, checkpoint = tiny
    loaded = cenfusion.load_segmenter(checkpoint)
    assert loaded.trained_kinds() == {"rgb": "rgb", "depth": "depth"}
    inputs = [torch.randn(1, 3, 20, 24) for _ in range(2)]
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(inputs), model(inputs))


def test_outputs_may_not_write_over_inputs_and_positionals_follow_flags(
    tiny, tmp_path, capsys
) -> None:
    """An input named like an output, in the output folder, is refused before anything is
    written; a refused run makes no folder; FOLDER may come after -o."""
    _, checkpoint = tiny
    own = tmp_path / "own"
    write_rgb(own / "a.png", 20, 24)
    write_rgb(own / "a_color.png", 20, 24, seed=1)  # another sample, named as a's output
    write_depth(own / "d.png", 20, 24)
    before = {p.name: p.read_bytes() for p in own.iterdir()}
    items = [(own / "a.png", own / "d.png"), (own / "a_color.png", own / "d.png")]
    with pytest.raises(CenError, match=r"^--out .*own: a_color.png there is an input, which"):
        predict(checkpoint, items, own, runtime=CPU)
    assert {p.name: p.read_bytes() for p in own.iterdir()} == before
    pair = tmp_path / "pair"
    write_rgb(pair / "rgb" / "x.png", 20, 24)
    write_depth(pair / "depth" / "x.png", 20, 24)
    with pytest.raises(CenError, match=r"^--out .*depth: a folder of the inputs, where the out"):
        predict(checkpoint, [(pair / "rgb", pair / "depth")], pair / "depth", runtime=CPU)
    linked = tmp_path / "linked"  # a data set of links to files kept elsewhere
    (linked / "rgb").mkdir(parents=True)
    (linked / "depth").mkdir()
    (linked / "rgb" / "x.png").symlink_to(pair / "rgb" / "x.png")
    (linked / "depth" / "x.png").symlink_to(pair / "depth" / "x.png")
    with pytest.raises(CenError, match=r"^--out .*linked/rgb: a folder of the inputs, where"):
        predict(checkpoint, [(linked / "rgb", linked / "depth")], linked / "rgb", runtime=CPU)
    predict(checkpoint, items[:1], own, runtime=CPU)  # files given one by one: theirs to place
    assert (own / "a_label.png").is_file()
    if not torch.cuda.is_available():
        with pytest.raises(CenError, match="cuda"):
            predict(checkpoint, items[:1], tmp_path / "out", runtime=RuntimeConfig(device="cuda"))
        assert not (tmp_path / "out").exists()
    root = tmp_path / "in"
    write_rgb(root / "rgb" / "x.png", 20, 24)
    write_depth(root / "depth" / "x.png", 20, 24)
    argv = ["seg", "predict", str(checkpoint), "-o", str(tmp_path / "o"), "--device", "cpu"]
    assert main([*argv, str(root)]) == 0
    written = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert written == ["x_color.png", "x_label.png", "x_overlay.png"]


def test_depth_of_another_bit_depth_than_trained_on_is_refused(tmp_path, capsys) -> None:
    """One depth scale cannot read 8- and 16-bit files alike: a checkpoint that records its
    data's depth bit depth refuses the other, or warns when the caller gives the scale."""
    checkpoint = tmp_path / "m.pt"
    save_tiny(checkpoint)
    state = torch.load(checkpoint, weights_only=True)
    save_checkpoint(checkpoint, {**state, "data": {"depth_bits": {"depth": 16}}})
    rgb = write_rgb(tmp_path / "x.png", 20, 24)
    sixteen = write_depth(tmp_path / "x_d.png", 20, 24)
    eight = tmp_path / "x_d8.png"
    Image.fromarray(np.full((20, 24), 40, np.uint8)).save(eight)
    predict(checkpoint, [(rgb, sixteen)], tmp_path / "ok", runtime=CPU)
    with pytest.raises(CenError, match=r"x_d8.png is 8-bit, .*m.pt was trained on 16-bit depth;"):
        predict(checkpoint, [(rgb, eight)], tmp_path / "no", runtime=CPU)
    assert not (tmp_path / "no").exists()
    predict(checkpoint, [(rgb, eight)], tmp_path / "own", runtime=CPU, depth_scale=0.05)
    assert "x_d8.png is 8-bit" in capsys.readouterr().err
