"""The engine's contracts: settings defined once as flags, the run folder rules."""

import argparse
import dataclasses
import errno
import importlib.util
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import typing
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cenfusion.cli import build_parser, main
from cenfusion.engine import runtime
from cenfusion.engine.checkpoint import load_checkpoint
from cenfusion.engine.config import (
    SETTING_OF_ACTION,
    config_to_dict,
    flag_name,
    given_flags,
    options_from_args,
    replace_config,
)
from cenfusion.engine.files import atomic_write
from cenfusion.engine.launch import free_port, rank_env
from cenfusion.engine.rng import seed_everything
from cenfusion.engine.run import (
    BEST,
    CONFIG,
    LAST,
    METRICS,
    LogRouting,
    RunFolder,
    RuntimeConfig,
    resume_path,
)
from cenfusion.engine.run import log as run_log
from cenfusion.engine.runtime import CompiledOrEager, GraphSkips, Precision, open_runtime
from cenfusion.engine.session import train
from cenfusion.engine.trainer import _run_epoch
from cenfusion.errors import CenError
from cenfusion.fusion import RESNET_EXCHANGE_POINTS
from cenfusion.reporting.runlog import save_confusion
from cenfusion.segmentation.build import build_model
from cenfusion.segmentation.config import NYUDV2, SYNTHETIC, SegmentationConfig
from cenfusion.segmentation.task import SEGMENTATION
from cenfusion.translation.config import TranslationConfig
from cenfusion.translation.task import TRANSLATION

COMMANDS = {SegmentationConfig: ["seg", "train"], TranslationConfig: ["i2i", "train"]}


def _example(cls: type, field: dataclasses.Field) -> tuple[list[str], object]:
    """Command-line words that set ``field`` to a value other than its default, and the value."""
    hint = typing.get_type_hints(cls)[field.name]
    optional = type(None) in typing.get_args(hint)
    kind = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    default = field.default
    if kind is bool:
        value = not bool(default)
        return [flag_name(field.name) if value else "--no-" + field.name.replace("_", "-")], value
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        item = str if typing.get_args(item) else item  # several types: the flag takes text
        value = [item(3), item(4)] if item is not str else ["a", "b"]
        return [flag_name(field.name), *map(str, value)], value
    choices = field.metadata.get("choices")
    if choices:
        value = next(c for c in choices if c != default)
    elif kind is Path:
        value = Path("somewhere")
    elif kind is str:
        value = "something"
    else:
        value = kind(7) if default != 7 else kind(8)
    return [flag_name(field.name), str(value)], value


@pytest.mark.parametrize("cls", [SegmentationConfig, TranslationConfig])
def test_every_field_is_a_flag(cls: type) -> None:
    parser = build_parser()
    for field in dataclasses.fields(cls):
        words, value = _example(cls, field)
        args = parser.parse_args([*COMMANDS[cls], *words])
        assert given_flags(cls, args) == {field.name: value}, field.name


def _commands(parser: argparse.ArgumentParser, words: tuple[str, ...] = ("cen",)):
    """Every parser of the ``cen`` command, with the words that reach it."""
    yield words, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*words, name))


def test_every_flag_of_every_command_comes_from_a_setting() -> None:
    """Each argument of each command is made from a dataclass field, with its help."""
    count = 0
    for words, parser in _commands(build_parser()):
        for action in parser._actions:
            if isinstance(
                action,
                (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction),
            ):
                continue
            where = f"{' '.join(words)} {'/'.join(action.option_strings) or action.dest}"
            assert hasattr(action, SETTING_OF_ACTION), f"{where}: not made from a setting"
            cls, name = getattr(action, SETTING_OF_ACTION)
            field = next(f for f in dataclasses.fields(cls) if f.name == name)
            assert action.dest == name and field.metadata["help"] in action.help, where
            count += 1
    assert count > 150


SEG_ALIASES = {
    "--gpu 0 1": ("gpu", [0, 1]),
    "-c run1": ("exp", "run1"),
    "--ckpt run1": ("exp", "run1"),
    "-i rgb depth": ("modalities", ["rgb", "depth"]),
    "--input rgb": ("modalities", ["rgb"]),
    "--enc 152": ("enc", 152),
    "--num-epoch 10 20": ("epochs", [10, 20]),
    "--lr-enc 0.1": ("lr_enc", [0.1]),
    "--lr-dec 0.2": ("lr_dec", [0.2]),
    "--mom-enc 0.5": ("momentum_enc", 0.5),
    "--mom-dec 0.6": ("momentum_dec", 0.6),
    "--wd-enc 0.01": ("weight_decay_enc", 0.01),
    "--wd-dec 0.02": ("weight_decay_dec", 0.02),
    "--lamda 0.3": ("lamda", 0.3),
    "-t 0.05": ("threshold", 0.05),
    "--bn-threshold 0.05": ("threshold", 0.05),
    "--val-every 2": ("val_every", 2),
    "--batch-size 3": ("batch_size", 3),
    "--crop-size 64": ("crop_size", 64),
    "--num-classes 13": ("num_classes", 13),
    "--random-seed 5": ("seed", 5),
}
I2I_ALIASES = {
    "--gpu 1": ("gpu", [1]),
    "-c run2": ("exp", "run2"),
    "-i 3 1 0": ("img_types", ["3", "1", "0"]),
    "--img-types 3 normal 0": ("img_types", ["3", "normal", "0"]),
    "--num-epochs 7": ("epochs", 7),
    "--val-every 3": ("val_every", 3),
    "--lrG 0.1": ("lr_g", 0.1),
    "--lrD 0.2": ("lr_d", 0.2),
    "--beta1 0.3": ("beta1", 0.3),
    "--beta2 0.4": ("beta2", 0.4),
    "--gama 10": ("l1_weight", 10.0),
    "-l 0.01": ("lamda", 0.01),
    "--lamda 0.01": ("lamda", 0.01),
    "-t 0.02": ("threshold", 0.02),
    "--insnorm-threshold 0.02": ("threshold", 0.02),
    "--ngf 8": ("ngf", 8),
    "--ndf 8": ("ndf", 8),
    "--input-size 300": ("load_size", 300),
    "--crop-size 128": ("crop_size", 128),
    "--batch-size 4": ("batch_size", 4),
}


@pytest.mark.parametrize(
    ("command", "cls", "line", "expected"),
    [(["seg", "train"], SegmentationConfig, k, v) for k, v in SEG_ALIASES.items()]
    + [(["i2i", "train"], TranslationConfig, k, v) for k, v in I2I_ALIASES.items()],
)
def test_released_flag_spellings(command, cls, line, expected) -> None:
    args = build_parser().parse_args([*command, *line.split()])
    name, value = expected
    assert given_flags(cls, args) == {name: value}


def test_settings_files_mean_what_they_show(tmp_path: Path) -> None:
    """YAML 1.1 reads 1:30.0 as 90.0 and 1_0.5 as 10.5; merge keys stay usable."""
    from cenfusion.engine.config import load_yaml

    path = tmp_path / "s.yaml"
    for text, said in (("lamda: 1:30.0\n", "'1:30.0' reads as 90.0"), ("lamda: 1_0.5\n", "10.5")):
        path.write_text(text)
        with pytest.raises(CenError, match=f"^--config {path}: line 1: .*{said}"):
            load_yaml(path)
    path.write_text("base: &b {seed: 1, workers: 2}\nrun:\n  <<: *b\n  seed: 3\nlamda: 2.5e-3\n")
    assert load_yaml(path) == {
        "base": {"seed": 1, "workers": 2},
        "run": {"seed": 3, "workers": 2},
        "lamda": 0.0025,
    }


def test_numbers_in_other_scripts_are_refused(capsys) -> None:
    """Python reads int("３") as 3 and float("٠.١") as 0.1; a flag that took them would run
    what the line does not show."""
    numbers = [("--batch-size", "３"), ("--threshold", "٠.١"), ("--enc", "１０１")]
    for flag, value in [*numbers, ("--batch-size", "1_0"), ("--lamda", "1_0.5")]:
        with pytest.raises(SystemExit):
            build_parser().parse_args(["seg", "train", flag, value])
        assert f"value: '{value}'" in capsys.readouterr().err
    args = build_parser().parse_args(["seg", "train", "--batch-size", "3", "--enc", "101"])
    assert given_flags(SegmentationConfig, args) == {"batch_size": 3, "enc": 101}


@pytest.mark.parametrize(
    "argv",
    [
        ["seg", "train", "--data", ""],
        ["seg", "predict", "ckpt.pth", "--rgb", "a.png", "--depth", "b.png", "-o", ""],
        ["i2i", "predict", "ckpt.pth", "x/", "--out", ""],
        ["export", "onnx", "ckpt.pth", ""],
    ],
)
def test_an_empty_path_is_refused_not_read_as_the_current_folder(argv, capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert "expected a path, got an empty one" in capsys.readouterr().err
    with pytest.raises(CenError, match="flags: runs: expected a path, got ''"):
        replace_config(SegmentationConfig(), {"runs": ""})


def test_an_interrupted_run_says_what_resumes_it() -> None:
    from cenfusion.engine.trainer import _interrupted_line

    line = _interrupted_line
    assert line(0, 0, 5, "x", False) == "interrupted in epoch 1 of 5; no checkpoint yet"
    holds = "last.pth holds epoch 3, --resume continues"
    assert line(3, 1, 5, "x", False) == f"interrupted in epoch 4 of 5; {holds}"
    assert line(3, 3, 5, "runs/a/last.pth", True) == f"interrupted in epoch 4 of 5; {holds}"
    assert line(2, 2, 5, "other/last.pth", False) == (
        "interrupted in epoch 3 of 5; nothing saved here since other/last.pth (epoch 2)"
    )
    assert line(5, 0, 5, "x", False).startswith("interrupted after its last epoch; last")


def test_an_empty_flag_is_refused_but_a_checkpoints_empty_setting_reads_as_before(
    tmp_path: Path,
) -> None:
    """An unset shell variable (``--pretrained "$W"``) would train from random weights under
    the released recipe; a checkpoint saved with ``pretrained: ''`` meant none, and still does."""
    with pytest.raises(CenError, match=r"^--pretrained '': expected a value, got an empty one"):
        SEGMENTATION.resolve_config(None, None, {"pretrained": ""}, None)
    with pytest.raises(CenError, match=r"^--pretrained ' ': expected a value, got an empty one"):
        SEGMENTATION.resolve_config(None, None, {"pretrained": " "}, None)
    settings = tmp_path / "s.yaml"
    settings.write_text("pretrained: ''\n")
    with pytest.raises(
        CenError, match=rf"^--pretrained '': .*empty one \(set in --config {settings}"
    ):
        SEGMENTATION.resolve_config(None, settings, {}, None)
    saved = {**config_to_dict(SegmentationConfig()), "pretrained": ""}
    assert SEGMENTATION.resolve_config(None, None, {}, saved).pretrained_weights is None


@pytest.mark.parametrize("task", [SEGMENTATION, TRANSLATION])
def test_one_settings_rule_for_every_task(task, tmp_path: Path) -> None:
    """Checkpoint's settings (else the preset) < YAML file < flags."""
    preset = task.presets[task.default_preset({})]
    saved = {**config_to_dict(preset), "exp": "saved", "batch_size": 3, "seed": 5}
    yaml_file = tmp_path / "s.yaml"
    yaml_file.write_text("batch_size: 4\nworkers: 1\n")
    cfg = task.resolve_config(None, yaml_file, {"workers": 2}, saved)
    assert (cfg.exp, cfg.seed, cfg.batch_size, cfg.workers) == ("saved", 5, 4, 2)
    fresh = task.resolve_config(None, None, {}, None)
    assert fresh == preset
    asked = task.resolve_config(task.default_preset({}), None, {}, saved)
    assert asked == preset, "a preset asked for replaces the checkpoint's settings"
    with pytest.raises(CenError, match="--preset nope: expected one of"):
        task.resolve_config("nope", None, {}, None)
    with pytest.raises(CenError, match="checkpoint: unknown setting 'colour'"):
        task.resolve_config(None, None, {}, {**saved, "colour": 1})
    yaml_file.write_text("seed: 99999999999\nworkers: 1\n")
    with pytest.raises(
        CenError, match=rf"^--seed 99999999999: .* \(set in --config {yaml_file}\)$"
    ):
        task.resolve_config(None, yaml_file, {}, None)
    with pytest.raises(CenError, match=r"^--seed 5000000000: expected 0 to \d+$"):
        task.resolve_config(None, yaml_file, {"seed": 5_000_000_000}, None)


def test_yaml_numbers_and_single_values_read_as_flags_do(tmp_path: Path) -> None:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; a list setting may be one value."""
    (tmp_path / "s.yaml").write_text("lamda: 1e-3\nepochs: 3\nlr_enc: 2E-4\nlr_dec: [1e-2]\n")
    cfg = SEGMENTATION.resolve_config(None, tmp_path / "s.yaml", {})
    assert (cfg.lamda, cfg.epochs, cfg.lr_enc, cfg.lr_dec) == (1e-3, (3,), (2e-4,), (1e-2,))
    for wrong in ("lamda: 1e-3x", "lamda: e-3", "epochs: {a: 1}"):
        (tmp_path / "s.yaml").write_text(wrong + "\n")
        with pytest.raises(CenError, match=r"--config .*s\.yaml: (lamda: expected float|epochs)"):
            SEGMENTATION.resolve_config(None, tmp_path / "s.yaml", {})


def test_settings_are_checked_together_once_yaml_and_flags_are_in(tmp_path: Path) -> None:
    """Stages from the YAML file, their learning rates from flags: valid only together."""
    (tmp_path / "s.yaml").write_text("epochs: [3]\n")
    flags = {"lr_enc": (1e-3,), "lr_dec": (1e-2,)}
    cfg = SEGMENTATION.resolve_config(None, tmp_path / "s.yaml", flags)
    assert (cfg.epochs, cfg.lr_enc, cfg.lr_dec) == ((3,), (1e-3,), (1e-2,))
    with pytest.raises(CenError, match="need one value per stage, got 1, 2 and 2"):
        SEGMENTATION.resolve_config(None, tmp_path / "s.yaml", {})


@pytest.mark.parametrize("task", [SEGMENTATION, TRANSLATION])
def test_a_tasks_settings_read_back_and_change_with_checks(task, tmp_path: Path) -> None:
    preset = task.presets[task.default_preset({})]
    (tmp_path / "c.yaml").write_text(preset.to_yaml())
    assert type(preset).from_yaml(tmp_path / "c.yaml") == preset
    changed = preset.replace(batch_size=7, gpu=[0, 1])
    assert type(changed) is type(preset) and (changed.batch_size, changed.gpu) == (7, (0, 1))
    assert changed.to_dict() == {**preset.to_dict(), "batch_size": 7, "gpu": [0, 1]}
    with pytest.raises(CenError, match="flags: batch_size: expected int, got 'x'"):
        preset.replace(batch_size="x")
    (tmp_path / "c.yaml").write_text("colour: 1\n")
    with pytest.raises(CenError, match=r"c\.yaml: unknown setting 'colour'"):
        type(preset).from_yaml(tmp_path / "c.yaml")


def test_the_default_exchange_points_are_the_models() -> None:
    """The setting spells out the fusion module's constant (the CLI starts without torch)."""
    assert SegmentationConfig().exchange_at == RESNET_EXCHANGE_POINTS


def test_enc_given_takes_back_a_presets_backbone(tmp_path: Path) -> None:
    """The synthetic preset names a backbone, which overrides --enc: an --enc given without
    --backbone means that ResNet, not a silently ignored flag."""
    assert SYNTHETIC.backbone is not None
    resolved = SEGMENTATION.resolve_config(None, None, {"enc": 50})
    assert (resolved.backbone, resolved.model_name) == (None, "cen_refinenet_r50")
    both = SEGMENTATION.resolve_config(None, None, {"enc": 50, "backbone": "resnet18"})
    assert both.backbone == "resnet18"
    (tmp_path / "c.yaml").write_text("enc: 152\n")
    assert SEGMENTATION.resolve_config(None, tmp_path / "c.yaml", {}).backbone is None
    assert SEGMENTATION.resolve_config(None, None, {}).backbone == SYNTHETIC.backbone


def test_segmentation_preset_follows_the_data_flag() -> None:
    assert SEGMENTATION.resolve_config(None, None, {}) == SYNTHETIC
    own = SEGMENTATION.resolve_config(None, None, {"data": Path("d")})
    assert own == replace(NYUDV2, data=Path("d"))


@pytest.mark.parametrize("command", [["seg", "train"], ["i2i", "train"]])
def test_resume_alone_means_the_runs_own_last_checkpoint(command) -> None:
    parser = build_parser()
    assert parser.parse_args([*command, "--resume"]).resume == Path(LAST)
    assert parser.parse_args([*command, "--resume", "x.pth"]).resume == Path("x.pth")


def test_a_run_whose_last_checkpoint_failed_points_to_its_best(tmp_path: Path) -> None:
    (tmp_path / BEST).write_bytes(b"")
    with pytest.raises(
        CenError, match=r"holds no last.pth, only best.pth; --resume .*best.pth continues"
    ):
        resume_path(Path(LAST), tmp_path)


def test_a_disk_that_fills_up_during_a_write_is_said_to_be_full(tmp_path, monkeypatch) -> None:
    """The disk is full while the temporary file holds the space; once it is removed the
    space is back, and torch's zip writer only says 'unexpected pos'."""

    def usage(folder: str | Path) -> SimpleNamespace:
        writing = any(p.name.startswith(".") for p in Path(folder).iterdir())
        return SimpleNamespace(total=10**9, used=10**9, free=0 if writing else 10**8)

    def write(f: typing.IO[bytes]) -> None:
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(shutil, "disk_usage", usage)
    with pytest.raises(OSError) as excinfo:
        atomic_write(tmp_path / LAST, write)
    assert excinfo.value.errno == errno.ENOSPC and excinfo.value.filename == str(tmp_path / LAST)
    assert not list(tmp_path.iterdir())


def test_run_folder_is_continued_or_replaced_only_when_asked(tmp_path: Path) -> None:
    run = tmp_path / "exp"
    RunFolder.open(run, resuming=False, force=False)
    (run / LAST).write_bytes(b"weights")
    (run / ".last.pth.tmp123").write_bytes(b"half a write")
    with pytest.raises(CenError, match="already holds a run"):
        RunFolder.open(run, resuming=False, force=False)
    RunFolder.open(run, resuming=True, force=False)
    assert (run / LAST).is_file() and not (run / ".last.pth.tmp123").exists()
    RunFolder.open(run, resuming=False, force=True)
    assert not (run / LAST).exists()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("exp.old-")]
    assert len(aside) == 1 and (aside[0] / LAST).read_bytes() == b"weights"


def test_a_folder_without_checkpoint_is_taken_over_and_has_nothing_to_resume(
    tmp_path: Path,
) -> None:
    run = tmp_path / "exp"
    RunFolder.open(run, resuming=False, force=False)
    (run / CONFIG).write_text("seed: 1\n")
    (run / "log.txt").write_text("started\n")
    (run / METRICS).write_text('{"epoch": 1, "lo')
    with pytest.raises(CenError, match=r"nothing to resume, .*exp holds no last.pth \(its run"):
        resume_path(Path(LAST), run)
    RunFolder.open(run, resuming=False, force=False)
    assert not (run / CONFIG).exists() and not (run / METRICS).exists()
    assert (run / "log.txt").read_text() == "started\n"
    assert not any(p.name.startswith("exp.old-") for p in tmp_path.iterdir())
    (run / METRICS).write_text('{"evaluate": "best.pth", "val": {}}\n')
    with pytest.raises(CenError, match="already holds a run"):
        RunFolder.open(run, resuming=False, force=False)
    with pytest.raises(CenError, match="nothing to resume.*holds no last.pth; start"):
        resume_path(Path(LAST), tmp_path / "never")
    assert resume_path(Path("other.pth"), run) == Path("other.pth")


def test_confusion_matrices_follow_the_umask_and_their_temporaries_are_cleaned(
    tmp_path: Path,
) -> None:
    old = os.umask(0o027)
    try:
        path = save_confusion(tmp_path, {"ensemble": np.eye(3)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    (tmp_path / ".confusion.npz.k1ll3d").write_bytes(b"half a write")
    RunFolder.open(tmp_path, resuming=True, force=False)
    assert not (tmp_path / ".confusion.npz.k1ll3d").exists() and path.is_file()


def test_compile_failure_falls_back_to_eager(monkeypatch, capsys) -> None:
    def broken(net, mode=None):
        def run(*args):
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    net = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with LogRouting():
        wrapped = CompiledOrEager(net)
        assert torch.equal(wrapped(x), net(x))
        assert torch.equal(wrapped(x), net(x))
    out = capsys.readouterr().out
    assert out.count("--compile failed (RuntimeError: no compiler here); running eager") == 1


@pytest.mark.parametrize(
    ("flag", "mode", "warning"),
    [
        ([], None, False),
        (["--compile-mode", "max-autotune"], "max-autotune", False),
        (["--compile-mode", "reduce-overhead"], None, True),
    ],
)
def test_the_compile_mode_reaches_torch_compile(monkeypatch, capsys, flag, mode, warning) -> None:
    """--compile-mode picks torch.compile's mode; reduce-overhead (CUDA graphs) on the CPU
    compiles in the default mode and says so once."""
    asked: list[str | None] = []

    def recording(net, mode=None):
        asked.append(mode)
        return net

    monkeypatch.setattr(torch, "compile", recording)
    args = build_parser().parse_args(["seg", "train", "--compile", *flag])
    settings = options_from_args(RuntimeConfig, args)
    with LogRouting(), open_runtime(replace(settings, device="cpu")) as opened:
        opened.prepare(torch.nn.Linear(2, 2))
        opened.prepare(torch.nn.Linear(2, 2))
    assert asked == [mode, mode]
    said = "CUDA graphs need a CUDA device, not cpu; compiling in the default mode"
    assert capsys.readouterr().out.count(said) == int(warning)


def test_a_runtime_restores_the_process_settings_it_changes() -> None:
    threads, benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
    with open_runtime(RuntimeConfig(device="cpu", threads=1)):
        torch.backends.cudnn.benchmark = True  # as a CUDA run's training network sets it
        assert torch.get_num_threads() == 1
    assert (torch.get_num_threads(), torch.backends.cudnn.benchmark) == (threads, benchmark)


def test_a_runtime_says_how_it_runs(monkeypatch) -> None:
    monkeypatch.setattr(runtime, "cpu_has_bfloat16", lambda: True)
    with open_runtime(RuntimeConfig(device="cpu")) as opened:
        assert opened.describe() == "cpu, float32"
    fast = RuntimeConfig(device="cpu", amp=True, channels_last=True, compile=True)
    with open_runtime(fast) as opened:
        assert opened.describe() == "cpu, bfloat16 autocast, channels-last, compiled"


@pytest.mark.parametrize("mode", ["default", "max-autotune"])
def test_a_frozen_network_compiles_with_inductors_freezing(monkeypatch, mode) -> None:
    """Weights that do not change (evaluation, prediction) are folded into the compiled
    code, in any --compile-mode; a run's network is compiled as it is."""
    from torch._inductor import list_mode_options

    asked: list[dict] = []
    monkeypatch.setattr(torch, "compile", lambda net, **kwargs: asked.append(kwargs) or net)
    settings = RuntimeConfig(device="cpu", compile=True, compile_mode=mode)
    with open_runtime(settings) as opened:
        opened.prepare(torch.nn.Linear(2, 2), frozen=True)
        opened.prepare(torch.nn.Linear(2, 2), training=True)
    frozen = {"options": {**list_mode_options(mode), "freezing": True}}
    assert asked == [frozen, {"mode": None if mode == "default" else mode}]


def test_a_graph_that_skips_cuda_graph_capture_gives_one_warning(monkeypatch, capsys) -> None:
    """Inductor reports a skipped capture through its counter and a log artifact that is off
    by default; the runtime turns the first into one warning with its reason."""
    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

    def skipping(net, mode=None):
        def run(*args):
            if not calls:
                log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs")
            calls.append(mode)
            return net(*args)

        return run

    calls: list[str | None] = []
    monkeypatch.setattr(torch, "compile", skipping)
    net, x = torch.nn.Linear(3, 2), torch.randn(4, 3)
    with LogRouting():
        skips = GraphSkips()
        first = CompiledOrEager(net, "reduce-overhead", skips)
        skips.check()
        assert "warning" not in capsys.readouterr().out
        for _ in range(3):
            assert torch.equal(first(x), net(x))
            assert torch.equal(CompiledOrEager(net, "reduce-overhead", skips)(x), net(x))
        skips.close()
    assert calls == ["reduce-overhead"] * 6
    out = capsys.readouterr().out
    said = "reduce-overhead: a compiled graph runs without CUDA graphs (skipping cudagraphs due to"
    assert out.count(said) == 1 and "mutated inputs)" in out, out
    assert not logging.getLogger(GraphSkips.LOGGER).handlers


def test_each_compilation_is_said_with_its_time_and_shapes(monkeypatch, capsys) -> None:
    """The warm-up, then each recompilation for new input shapes, and nothing between."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda net, mode=None: real(net, backend="eager"))
    torch._dynamo.reset()
    net = torch.nn.Linear(3, 2)
    with LogRouting():
        wrapped = CompiledOrEager(net)
        for rows in (4, 4, 5, 5):
            x = torch.randn(rows, 3)
            assert torch.equal(wrapped(x), net(x))
    lines = capsys.readouterr().out.splitlines()
    said = [line.split("--compile: ", 1)[1] for line in lines if "--compile: " in line]
    assert len(said) == 2, lines
    assert said[0].startswith("compiled in ") and said[0].endswith(" s for inputs 4x3")
    assert said[1].startswith("compiled again in ") and "for new inputs 5x3 (version 2" in said[1]


def test_a_network_that_fails_eagerly_too_raises_its_own_error(monkeypatch, capsys) -> None:
    def compiled(net, mode=None):
        return net

    monkeypatch.setattr(torch, "compile", compiled)
    net = torch.nn.Linear(3, 2)
    with LogRouting():
        wrapped = CompiledOrEager(net)
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            wrapped(torch.randn(4, 5))
        assert torch.equal(wrapped(torch.ones(1, 3)), net(torch.ones(1, 3)))
        assert wrapped.compiled is net
    assert "--compile failed" not in capsys.readouterr().out


@pytest.mark.parametrize("changes", [{"channels_last": True}, {"amp": True}])
def test_fast_paths_compute_the_same_training(seg_data, tmp_path, changes) -> None:
    """channels-last (fp32) and bfloat16 autocast train the weights fp32 NCHW trains.

    Frozen BN statistics (the released recipe's) and no L1 term keep the comparison well
    conditioned: with batch statistics over 2 samples at the 1x1 deepest level, rounding
    of near-equal values dominates the normalised output. Measured over these 4 steps: the
    fast run's weights end 3.7% (channels-last) and 1.9% (bfloat16) of the training's own
    movement away from fp32's, the losses 1.7e-4 and 4e-7 apart (relative); the bounds below
    are about 4 and 6 times that."""
    base = replace(
        SYNTHETIC, data=seg_data, runs=tmp_path, backbone="resnet26", decoder_width=16,
        crop_size=32, min_short_side=32, batch_size=2, workers=0, epochs=(2,), lr_enc=(0.01,),
        lr_dec=(0.01,), val_every=2, device="cpu", max_iters=2, quiet=True, plots=False,
        amp=False, channels_last=False, frozen_bn=True, lamda=0.0,
    )  # fmt: skip
    train(SEGMENTATION, replace(base, exp="plain"))
    train(SEGMENTATION, replace(base, exp="fast", **changes))
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / exp / "metrics.jsonl").open()]
        for exp in ("plain", "fast")
    ]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-3)

    def flat(state: dict) -> torch.Tensor:
        return torch.cat([v.flatten().double() for k, v in state.items() if v.is_floating_point()])

    seed_everything(base.seed)
    init = flat(build_model(base).state_dict())
    plain, fast = (
        flat(load_checkpoint(tmp_path / exp / LAST)["model"]) for exp in ("plain", "fast")
    )
    moved = (plain - init).norm()
    assert 0 < moved < 1e-2 * plain.norm()  # the same initial weights, trained a little
    assert (fast - plain).norm() < 0.15 * moved


@pytest.mark.filterwarnings("ignore:.*CUDA is not available")
@pytest.mark.parametrize(
    ("flags", "dtype"),
    [
        ([], None),
        (["--amp-dtype", "bfloat16"], None),
        (["--amp"], torch.float16),
        (["--amp", "--amp-dtype", "bfloat16"], torch.bfloat16),
    ],
)
def test_amp_dtype_chooses_the_autocast_dtype(monkeypatch, flags, dtype) -> None:
    """On a (stand-in) GPU --amp is float16 and --amp-dtype bfloat16 picks bfloat16, only
    with --amp."""
    monkeypatch.setattr(runtime, "resolve_device", lambda *args: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation: True)
    args = build_parser().parse_args(["seg", "eval", "--resume", "x.pth", *flags])
    with open_runtime(options_from_args(RuntimeConfig, args)) as opened:
        assert opened.device.type == "cuda" and opened.precision.dtype == dtype


def test_amp_dtype_a_device_cannot_compute_in_is_one_line(monkeypatch) -> None:
    settings = RuntimeConfig(device="cpu", amp=True, amp_dtype="float16")
    with pytest.raises(CenError, match="^--amp-dtype float16: CUDA only; on cpu the half"):
        open_runtime(settings).__enter__()
    with open_runtime(replace(settings, amp=False)) as opened:
        assert opened.precision.dtype is None
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation: False)
    with pytest.raises(CenError, match="^--amp-dtype bfloat16: Tesla V100 has no bfloat16"):
        runtime._amp_dtype("bfloat16", cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation: True)
    assert runtime._amp_dtype("bfloat16", cuda) == torch.bfloat16
    assert runtime._amp_dtype("float16", cuda) == torch.float16
    assert runtime._amp_dtype("auto", cuda) is None


def test_bfloat16_autocast_on_cuda_needs_no_loss_scaling() -> None:
    precision = Precision(True, torch.device("cuda"), torch.bfloat16)
    assert precision.dtype == torch.bfloat16 and not precision.scaler.is_enabled()


def test_amp_on_a_cpu_without_bfloat16_computes_in_float32(monkeypatch, capsys) -> None:
    cpu = torch.device("cpu")
    assert Precision(True, cpu).dtype == (torch.bfloat16 if runtime.cpu_has_bfloat16() else None)
    monkeypatch.setattr(runtime, "cpu_has_bfloat16", lambda: False)
    with LogRouting():
        precision = Precision(True, cpu)
        assert Precision(False, cpu).dtype is None
    assert precision.dtype is None and not precision.scaler.is_enabled()
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no bfloat16 support; computing in float32" in out


class _Probe:
    """A step's loss that notes when the engine reads it (the wait for the device)."""

    def __init__(self, events: list[str], step: int, value: float) -> None:
        self.events, self.step, self.value = events, step, value

    def __float__(self) -> float:
        self.events.append(f"read {self.step}")
        return self.value


class _CountingRecipe:
    """The part of a recipe the epoch loop calls: steps that note when they are queued."""

    def __init__(self, losses: list[float]) -> None:
        self.losses, self.events = losses, []
        self.train_loader = torch.utils.data.DataLoader(list(range(len(losses))))
        self.ctx = SimpleNamespace(dist=SimpleNamespace(enabled=False), device="cpu")

    def begin_epoch(self, epoch: int) -> torch.utils.data.DataLoader:
        return self.train_loader

    def num_epochs(self) -> int:
        return 1

    def batch_size(self, batch: torch.Tensor) -> int:
        return len(batch)

    def train_step(self, batch: torch.Tensor) -> dict[str, _Probe]:
        step = int(batch) + 1
        self.events.append(f"step {step}")
        return {"loss": _Probe(self.events, step, self.losses[step - 1])}


def test_a_steps_loss_is_read_once_the_next_step_is_queued() -> None:
    recipe = _CountingRecipe([4.0, 3.0, 2.0, 1.0])
    means = _run_epoch(recipe, 1, argparse.Namespace(seed=0, quiet=True))
    assert recipe.events == [
        "step 1",
        "read 1",
        "step 2",
        "step 3",
        "read 2",
        "step 4",
        "read 3",
        "read 4",
    ]
    assert means["loss"] == 2.5


@pytest.mark.parametrize("bad", [1, 3, 5])  # read at once, one step late, last
def test_a_non_finite_loss_read_late_still_names_its_iteration(bad: int) -> None:
    losses = [1.0] * 5
    losses[bad - 1] = float("nan")
    recipe = _CountingRecipe(losses)
    with pytest.raises(CenError, match=rf"^epoch 1, iteration {bad}: loss nan; stopping$"):
        _run_epoch(recipe, 1, argparse.Namespace(seed=0, quiet=True))
    assert recipe.events[-1] == f"read {bad}"
    assert f"step {bad + 2}" not in recipe.events


def test_tensorboard_without_its_package_is_refused_before_the_run_folder(
    tmp_path, monkeypatch, capsys
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name)
    )
    argv = ["seg", "train", "--runs", str(tmp_path), "--tensorboard", "--workers", "0"]
    assert main(argv) == 2
    assert "--tensorboard: the tensorboard package is not installed" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_only_the_main_process_speaks_on_the_console(capsys) -> None:
    """Under torchrun the command's console handler exists in every process; the other
    ranks' lines would appear once per process."""
    with LogRouting():
        with LogRouting(is_main=False):
            run_log.info("from rank 1")
        run_log.info("from rank 0")
    assert capsys.readouterr().out == "from rank 0\n"


def _rng_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from cenfusion.engine.distributed import on_main
    from cenfusion.engine.rng import capture_rng, restore_rng

    os.environ.update(rank_env(rank, 2, port))
    dist.init_process_group("gloo")
    try:
        seed_everything(7 + rank)
        state = capture_rng()
        expected = torch.rand(3)
        seed_everything(0)
        saved = on_main(lambda: state)  # what every rank reads back: rank 0's checkpoint
        restore_rng(saved, rank)
        torch.save({"expected": expected, "resumed": torch.rand(3)}, Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_every_rank_resumes_its_own_random_stream(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_rng_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    assert not torch.equal(ranks[0]["expected"], ranks[1]["expected"])
    for rank in ranks:
        assert torch.equal(rank["resumed"], rank["expected"])


def test_a_folder_lock_is_one_holders_and_stays_beside_its_folder(tmp_path: Path) -> None:
    from cenfusion.engine.files import FolderLock

    run = tmp_path / "runs" / "run"
    lock = FolderLock(run)
    assert lock.path == tmp_path / "runs" / ".run.lock" and not run.exists()
    pid = os.getpid()
    with pytest.raises(CenError, match=rf"^{run} is in use by another cen process \(pid {pid}\)"):
        FolderLock(run)
    lock.release()
    busy = pytest.raises(CenError, match="in use by another cen process")
    with FolderLock(run), busy:  # free again, and held while the block runs
        FolderLock(run)
    FolderLock(run).release()


def test_a_run_still_before_its_first_checkpoint_names_its_process(tmp_path: Path) -> None:
    """With no checkpoint yet, "nothing to resume" or "already holds a run; --resume
    continues it" would be wrong advice while the run goes on in another process."""
    from cenfusion.engine.files import FolderLock
    from cenfusion.engine.run import LAST, resume_path

    run = tmp_path / "runs" / "run"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"evaluate": "x.pth"}\n')  # a run folder's work
    holder = "import sys, time; from pathlib import Path; from cenfusion.engine.files import "
    holder += "FolderLock; FolderLock(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)"
    other = subprocess.Popen(
        [sys.executable, "-c", holder, str(run)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout.readline() == "held\n"
        busy = rf"^{run} is in use by another cen process \(pid {other.pid}\)"
        with pytest.raises(CenError, match=busy):
            resume_path(Path(LAST), run)
        with pytest.raises(CenError, match=busy):
            FolderLock.refuse_if_held(run)
    finally:
        other.kill()
        other.wait()
    with pytest.raises(CenError, match="^--resume: nothing to resume, .* stopped before"):
        resume_path(Path(LAST), run)
    with FolderLock(run):  # this process's own lock is no other's
        FolderLock.refuse_if_held(run)
    FolderLock(run).release()  # the probes took no lock


@pytest.mark.skipif(torch.cuda.is_available(), reason="the toolchain's warning is for CPU hosts")
def test_compiling_on_the_cpu_keeps_the_cuda_toolkit_search_quiet(tmp_path: Path) -> None:
    """A CPU machine with a CUDA toolkit (CUDA_HOME) but no GPU: torch's toolchain search
    warns "No CUDA runtime is found" when inductor first loads it; a CPU compile is no place
    for that news. Without the runtime's quiet load, the same process says it."""
    env = {**os.environ, "CUDA_HOME": str(tmp_path)}
    opened = (
        "from cenfusion.engine.run import RuntimeConfig\n"
        "from cenfusion.engine.runtime import open_runtime\n"
        "with open_runtime(RuntimeConfig(device='cpu', compile=True)):\n"
        "    import torch.utils.cpp_extension\n"
    )
    plain = "import torch.utils.cpp_extension\n"
    said = {}
    for name, code in (("opened", opened), ("plain", plain)):
        argv = [sys.executable, "-c", code]
        done = subprocess.run(argv, check=False, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        said[name] = done.stderr
    assert "No CUDA runtime is found" in said["plain"]
    assert "No CUDA runtime is found" not in said["opened"], said["opened"]


def test_an_atomic_write_refuses_what_is_no_file_and_names_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename would put a file in place of a folder's name or a device; a folder that
    takes no new file is said of the path asked for, not of the temporary beside it."""
    (tmp_path / "folder").mkdir()
    with pytest.raises(CenError, match=r"folder: a folder, expected a file to write$"):
        atomic_write(tmp_path / "folder", lambda f: f.write(b"x"))
    if Path("/dev/null").exists():
        with pytest.raises(CenError, match=r"^/dev/null: not a regular file, expected a file"):
            atomic_write(Path("/dev/null"), lambda f: f.write(b"x"))

    def refused(prefix: str, dir: Path) -> tuple[int, str]:
        raise PermissionError(errno.EACCES, "Permission denied", str(dir / f"{prefix}tmp123"))

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(OSError) as caught:
        atomic_write(tmp_path / "x.pth", lambda f: f.write(b"x"))
    assert caught.value.filename == str(tmp_path / "x.pth")
    assert caught.value.errno == errno.EACCES
