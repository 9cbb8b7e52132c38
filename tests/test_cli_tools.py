"""The small commands around training: report, info, export, data check."""

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cenfusion.cli import main
from cenfusion.data.own_images import Sample
from cenfusion.engine.checkpoint import save_checkpoint
from cenfusion.info import format_model_info, info_from_checkpoint
from cenfusion.models.refinenet import create_cen_refinenet
from cenfusion.segmentation.modelio import load_segmenter, model_record
from cenfusion.segmentation.predict import load_inputs
from cenfusion.segmentation.samples import Modality


@pytest.fixture(scope="module")
def data_root(seg_data: Path) -> Path:
    return seg_data


def test_data_check_reports_ok_and_names_a_bad_label(data_root: Path, capsys) -> None:
    assert main(["data", "check", str(data_root), "--num-classes", "10"]) == 0
    assert ": OK" in capsys.readouterr().out
    assert main(["data", "check", str(data_root), "--num-classes", "3"]) == 2
    *problems, last = capsys.readouterr().err.splitlines()
    assert problems and all("expected 0..2 or 255" in p for p in problems)
    assert last.startswith("cen: error: ") and f"of {len(problems)} problems" in last
    base = ["data", "check", str(data_root), "--num-classes", "10"]
    for extra, refusal in (
        (["--depth-scale", "-1"], "--depth-scale -1.0: expected >= 0"),
        (["--mask-column", "-1"], "--mask-column -1: expected >= 0"),
    ):
        assert main([*base, *extra]) == 2
        assert capsys.readouterr().err == f"cen: error: {refusal}\n"
    assert main([*base, "--lists", "train.txt", "train.txt"]) == 0
    assert main([*base, "--lists", "train.txt"]) == 0
    named_twice, named_once = capsys.readouterr().out.splitlines()
    assert named_twice == named_once, "a list named twice is checked once"


def _tiny_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = create_cen_refinenet(backbone="resnet18", num_classes=3, decoder_width=8)
    path = tmp_path / "model.pth"
    save_checkpoint(path, model_record(model))
    return path


def test_info_and_onnx_export_of_a_checkpoint(tmp_path: Path, capsys) -> None:
    path = _tiny_checkpoint(tmp_path)
    assert main(["info", str(path), "--size", "32", "32"]) == 0
    out = capsys.readouterr().out
    assert "resnet18" in out and "FLOPs" in out
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", "onnx", str(path), str(onnx_path), "--size", "32", "32"]) == 0
    assert onnx_path.stat().st_size > 0
    assert main(["info"]) == 2 and "--enc" in capsys.readouterr().err
    assert main(["info", str(path), "--num-classes", "5"]) == 2
    assert "--num-classes: with --enc only; " in capsys.readouterr().err
    info = info_from_checkpoint(path, (32, 32))
    many = format_model_info(replace(info, classes=tuple(f"c{i}" for i in range(100))))
    line = next(line for line in many if line.startswith("classes (100): "))
    assert line.endswith(", c59, ...") and "c60" not in line


def test_predict_with_the_onnx_file_equals_the_checkpoint(seg_data: Path, tmp_path: Path) -> None:
    """``cen seg predict`` runs an exported ``.onnx`` with onnxruntime, to the same labels.

    The classifier gets unit-scale random weights and no bias, so every label map holds
    several classes that depend on the features: a wrong graph cannot match by its bias."""
    torch.manual_seed(0)
    model = create_cen_refinenet(backbone="resnet18", num_classes=3, decoder_width=8)
    with torch.no_grad():
        model.decoder.classifier.weight.normal_(0, 1)
        model.decoder.classifier.bias.zero_()
    path = tmp_path / "model.pth"
    save_checkpoint(path, model_record(model))
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", "onnx", str(path), str(onnx_path), "--dynamic"]) == 0
    rgb, depth = seg_data / "rgb", seg_data / "depth"
    for model_file, out in ((path, tmp_path / "torch"), (onnx_path, tmp_path / "onnx")):
        code = main(["seg", "predict", str(model_file), "--rgb", str(rgb), "--depth", str(depth),
                     "-o", str(out), "--heads"])  # fmt: skip
        assert code == 0
    labels = sorted(p.name for p in (tmp_path / "torch").glob("*_label.png"))
    assert len(labels) >= 3
    for name in labels:
        ours = np.asarray(Image.open(tmp_path / "torch" / name))
        theirs = np.asarray(Image.open(tmp_path / "onnx" / name))
        shares = np.bincount(ours.ravel(), minlength=3) / ours.size
        assert (shares > 0.02).sum() >= 2, (name, shares)
        assert (ours != theirs).mean() < 1e-3, name
    stem = min(rgb.glob("*.png")).stem
    sample = Sample(stem, (rgb / f"{stem}.png", depth / f"{stem}.png"))
    inputs, _ = load_inputs(sample, [Modality("rgb", "rgb"), Modality("depth", "depth")], 1e-3)
    batch = [x[None] for x in inputs]
    with torch.no_grad():
        expected = load_segmenter(path).model.eval()(batch)
    got = load_segmenter(onnx_path).model(batch)
    assert len(got) == len(expected) == 3
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * float(e.abs().max()))


def test_report_of_a_missing_run_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_the_command_line_starts_without_torch() -> None:
    """``cen --help`` must answer at once: building the parser imports neither torch nor timm."""
    code = (
        "import sys; from cenfusion.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'timm', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_lazy_public_names_are_listed_without_importing_torch() -> None:
    """``dir(cenfusion)`` (and so ``help`` and completion) shows the names loaded on use."""
    code = (
        "import sys, cenfusion; names = dir(cenfusion); "
        "print(all(n in names for n in cenfusion.__all__), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]


def test_synthetic_data_help_states_the_embedded_sets_sizes(capsys) -> None:
    from cenfusion.data.synthetic import DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL, DEFAULT_SIZE

    with pytest.raises(SystemExit):
        main(["data", "synthetic", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for default in (f"{DEFAULT_NUM_TRAIN},", DEFAULT_NUM_VAL, "{} {}".format(*DEFAULT_SIZE)):
        assert f"(default: {default}" in out


def test_demo_schedule_flag_reaches_the_demo_configs(tmp_path: Path, monkeypatch, capsys) -> None:
    import cenfusion.segmentation.demo as seg_demo
    import cenfusion.translation.demo as i2i_demo

    seen = {}
    monkeypatch.setattr(seg_demo, "run_demo", lambda cfg: seen.setdefault("seg", cfg))
    monkeypatch.setattr(i2i_demo, "run_translation_demo", lambda cfg: seen.setdefault("i2i", cfg))
    runs = str(tmp_path / "runs")
    assert main(["demo", "--epochs", "16", "4", "--runs", runs]) == 0
    assert main(["demo", "--task", "i2i", "--epochs", "7", "--runs", runs]) == 0
    assert seen["seg"].epochs == (16, 4) and seen["seg"].seed == seg_demo.SYNTHETIC.seed
    assert seen["i2i"].epochs == 7 and seen["i2i"].seed == i2i_demo.DEMO.seed
    assert main(["demo", "--task", "i2i", "--epochs", "7", "2", "--runs", runs]) == 2
    assert "--epochs 7 2: the translation demo takes one number" in capsys.readouterr().err
    del seen["seg"]
    assert main(["demo", "--seed", "3", "--runs", runs]) == 0
    assert seen["seg"].seed == 3 and seen["seg"].epochs == seg_demo.SYNTHETIC.epochs
    assert not (tmp_path / "runs").exists()


def test_version_is_the_packages(capsys) -> None:
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, flags=re.MULTILINE).group(1)
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"cenfusion {version}"


def test_a_reader_that_goes_away_ends_the_command_quietly(monkeypatch, capfd) -> None:
    """``cen info ... | head -2``: writing to the closed pipe is no error of the user's."""
    from cenfusion.engine import launch

    def gone(*args: object) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(launch, "run_per_gpu", gone)
    assert main(["info", "--enc", "50"]) == 0
    assert capfd.readouterr().err == ""


def test_info_refuses_a_size_that_is_no_image_and_counts_below_one(tmp_path, capsys) -> None:
    for extra, refusal in (
        (["--size", "-5", "10"], "--size -5 10: expected two positive numbers H W"),
        (["--num-classes", "0"], "--num-classes 0: expected >= 1"),
        (["--num-modalities", "-3"], "--num-modalities -3: expected >= 1"),
    ):
        assert main(["info", "--enc", "50", *extra]) == 2
        assert capsys.readouterr().err == f"cen: error: {refusal}\n"
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    assert main(["info", str(tmp_path / "m.onnx")]) == 2
    assert "m.onnx: an ONNX file; cen info reads cenfusion checkpoints" in capsys.readouterr().err


def test_the_demos_epochs_are_one_per_stage(capsys) -> None:
    assert main(["demo", "--epochs", "0"]) == 2
    err = capsys.readouterr().err
    assert "--epochs 0: expected 2 numbers, one per stage of the demo (default 16 4)" in err
