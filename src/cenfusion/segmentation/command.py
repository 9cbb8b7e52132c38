"""Command-line glue of the segmentation task: ``cen seg ...`` and its ``cen data`` commands;
flags -> :class:`SegmentationConfig` -> a call.

``cli.py`` adds the parsers below to its own and calls ``args.run(args)``; everything under
these functions takes typed arguments.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from cenfusion.engine.config import (
    REQUIRED,
    add_config_flags,
    given_flags,
    load_yaml,
    options_from_args,
    setting,
)
from cenfusion.engine.run import RunModeOptions, RuntimeConfig
from cenfusion.errors import CenError
from cenfusion.segmentation.config import NYUDV2, PRESETS, SYNTHETIC, SegmentationConfig

__all__ = ["DEMO_HELP", "DEMO_SCHEDULE", "add_data_parsers", "add_parsers", "demo"]

DEMO_HELP = "the segmentation ablation: RGB, depth, CEN without and with exchange"
#: The demo's epochs per stage.
DEMO_SCHEDULE = SYNTHETIC.epochs


def demo(flags: dict[str, Any], epochs: Sequence[int] | None) -> None:
    """``cen demo``: the ablation on the embedded data, ``epochs`` per stage if given."""
    from cenfusion.segmentation.demo import run_demo

    if epochs is not None and len(epochs) != len(DEMO_SCHEDULE):
        stages = " ".join(map(str, DEMO_SCHEDULE))
        raise CenError(
            f"--epochs {' '.join(map(str, epochs))}: expected {len(DEMO_SCHEDULE)} numbers, one "
            f"per stage of the demo (default {stages})"
        )
    schedule = {} if epochs is None else {"epochs": tuple(epochs)}
    run_demo(replace(SYNTHETIC, **flags, **schedule))


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add ``seg train``, ``seg predict`` and ``seg eval`` to ``subparsers`` (``cen``'s)."""
    seg = subparsers.add_parser("seg", help="RGB-D semantic segmentation")
    commands = seg.add_subparsers(dest="seg_command", required=True)
    _add_seg_train(commands)
    _add_seg_predict(commands)
    _add_seg_eval(commands)


@dataclass(frozen=True)
class TrainOptions(RunModeOptions):
    """``cen seg train``'s flags besides the run's settings."""

    preset: str | None = setting(
        None, "base settings (see the description)", choices=tuple(PRESETS)
    )
    save_img: bool = setting(False, "with --evaluate: write each image's panel")


def _seg_train(args: argparse.Namespace) -> None:
    from cenfusion.engine.session import run_command
    from cenfusion.segmentation.task import SEGMENTATION

    o = options_from_args(TrainOptions, args)
    extra = {"save_img": True} if o.save_img else {}
    run_command(SEGMENTATION, given_flags(SegmentationConfig, args), o, o.preset, **extra)


@dataclass(frozen=True)
class SyntheticOptions:
    """``cen data synthetic``."""

    out: Path = setting(REQUIRED, "folder to write", positional=True)
    num_train: int | None = setting(None, "training images (default: 400, the embedded set's)")
    num_val: int | None = setting(None, "validation images (default: 100)")
    size: tuple[int, int] | None = setting(None, "image size (default: 60 80)", metavar=("H", "W"))
    seed: int = setting(0, "random seed")


def _data_synthetic(args: argparse.Namespace) -> None:
    from cenfusion.data.synthetic import generate_segmentation_dataset

    o = options_from_args(SyntheticOptions, args)
    given = {"num_train": o.num_train, "num_val": o.num_val, "size": o.size}
    out = generate_segmentation_dataset(
        o.out, seed=o.seed, **{k: v for k, v in given.items() if v is not None}
    )
    print(f"wrote {out}")


@dataclass(frozen=True)
class NyuOptions:
    """``cen data nyudv2``."""

    out: Path = setting(REQUIRED, "folder to write", positional=True)
    from_dir: Path | None = setting(
        None,
        "folder with the downloaded files, or a released preprocessed set",
        aliases=("--from",),
    )
    labeled_url: str | None = setting(None, "mirror of nyu_depth_v2_labeled.mat")
    splits_url: str | None = setting(None, "mirror of splits.mat")
    mapping_url: str | None = setting(None, "mirror of classMapping40.mat")


def _data_nyudv2(args: argparse.Namespace) -> None:
    from cenfusion.data.nyudv2 import NyuUrls, prepare_nyudv2

    o, defaults = options_from_args(NyuOptions, args), NyuUrls()
    urls = NyuUrls(
        labeled=o.labeled_url or defaults.labeled,
        splits=o.splits_url or defaults.splits,
        class_mapping=o.mapping_url or defaults.class_mapping,
    )
    kept = _prepared(o.out)
    _say_prepared(prepare_nyudv2(o.out, from_dir=o.from_dir, urls=urls), kept)


def _prepared(out: Path) -> bool:
    from cenfusion.data.nyudv2 import output_ready
    from cenfusion.data.staging import output_folder

    return output_ready(output_folder(out))


def _say_prepared(out: Path, kept: bool) -> None:
    if kept:
        print(f"{out} already holds a prepared data set: kept as it is (delete it to redo it)")
    else:
        print(f"wrote {out}")


@dataclass(frozen=True)
class SunOptions:
    """``cen data sunrgbd``."""

    out: Path = setting(REQUIRED, "folder to write", positional=True)
    from_dir: Path | None = setting(
        None, "folder with SUNRGBD(.zip) and SUNRGBDtoolbox(.zip)", aliases=("--from",)
    )
    base_url: str = setting("http://rgbd.cs.princeton.edu/data/", "where the files live")
    raw_depth: bool = setting(False, "depth/ instead of depth_bfx/")


def _data_sunrgbd(args: argparse.Namespace) -> None:
    from cenfusion.data.sunrgbd import prepare_sunrgbd

    o = options_from_args(SunOptions, args)
    kept = _prepared(o.out)
    out = prepare_sunrgbd(
        o.out, from_dir=o.from_dir, base_url=o.base_url, use_refined_depth=not o.raw_depth
    )
    _say_prepared(out, kept)


def _add_seg_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train or evaluate CEN segmentation (runs/EXP/)",
        description="Train CEN RGB-D segmentation. Settings: the preset (synthetic without "
        "--data, nyudv2 with it; a resumed checkpoint's own), then --config, then flags. The "
        "defaults below are nyudv2's; a run prints every value it uses at its start.",
    )
    add_config_flags(p, TrainOptions)
    add_config_flags(p, SegmentationConfig)
    p.set_defaults(run=_seg_train)


@dataclass(frozen=True, kw_only=True)
class PredictOptions:
    """``cen seg predict``'s flags besides the run-time settings."""

    checkpoint: Path = setting(
        REQUIRED,
        "cenfusion checkpoint, released .pth.tar, or exported .onnx (onnxruntime)",
        positional=True,
    )
    folders: tuple[Path, ...] = setting(
        (),
        "folder with one subfolder per modality (rgb/, depth/)",
        positional=True,
        metavar="FOLDER",
    )
    rgb: tuple[Path, ...] = setting((), "RGB image(s) or folder(s)", repeatable=True)
    depth: tuple[Path, ...] = setting(
        (), "depth PNG(s) or folder(s), matching --rgb one to one", repeatable=True
    )
    input: tuple[str, ...] = setting(
        (),
        "another modality (KIND rgb, depth or gray; default NAME)",
        repeatable=True,
        metavar="NAME[:KIND]=PATH",
    )
    out: Path = setting(REQUIRED, "output folder", aliases=("-o",))
    depth_scale: float | None = setting(
        None, "multiplies raw depth PNG values (default: the checkpoint's, else NYUDv2's 1/5000)"
    )
    size: tuple[int, int] | None = setting(
        None,
        "size the network sees; outputs keep each image's own size",
        metavar=("H", "W"),
    )
    heads: bool = setting(False, "also write each modality's head")
    batch_size: int = setting(
        1,
        "images per forward pass; images share one where the network sees them at one size "
        "(--size, or equal sizes)",
    )
    num_classes: int | None = setting(None, "refuse a checkpoint with another count")
    official: bool | None = setting(
        None, "force (or rule out) the released .pth.tar format (default: detect)"
    )


def _seg_predict(args: argparse.Namespace) -> None:
    from cenfusion.segmentation.predict import predict
    from cenfusion.segmentation.samples import gather_cli_inputs

    o = options_from_args(PredictOptions, args)
    inputs, modalities = gather_cli_inputs(o.folders, o.rgb, o.depth, o.input)
    written = predict(
        o.checkpoint,
        inputs,
        o.out,
        depth_scale=o.depth_scale,
        size=o.size,
        heads=o.heads,
        official=o.official,
        modalities=modalities,
        num_classes=o.num_classes,
        batch_size=o.batch_size,
        runtime=options_from_args(RuntimeConfig, args),
    )
    print(f"wrote {len(written)} file{'s' * (len(written) != 1)} to {o.out}")


_EVAL_FIELDS = (
    "exp",
    "runs",
    "data",
    "val_list",
    "modalities",
    "mask_column",
    "depth_scale",
    "num_classes",
    "workers",
    *(field.name for field in fields(RuntimeConfig)),
)


@dataclass(frozen=True)
class EvalOptions:
    """``cen seg eval``'s flags besides the run's settings."""

    resume: Path = setting(REQUIRED, "checkpoint (ours or released) or exported .onnx")
    preset: str | None = setting(
        None, "base settings when the checkpoint holds none", choices=tuple(PRESETS)
    )
    config: Path | None = setting(None, "YAML file of settings (flags win)")
    ms: bool = setting(False, "also multi-scale 0.5-1.5 + flip")
    eval_batch: int = setting(
        1,
        "images per forward pass where consecutive ones share a size; same scores in float32",
        aliases=("--batch-size",),
    )
    scales: tuple[float, ...] | None = setting(
        None, "scales of the extra protocol (with --ms: 0.5 0.75 1 1.25 1.5; alone: no flip)"
    )
    flip: bool | None = setting(None, "mirror inputs too (default: on with --ms)")


def _seg_eval(args: argparse.Namespace) -> None:
    from cenfusion.segmentation.evaluate import protocols_for, run_evaluation
    from cenfusion.segmentation.modelio import onnx_runtime, saved_settings
    from cenfusion.segmentation.task import SEGMENTATION

    o, given = options_from_args(EvalOptions, args), given_flags(SegmentationConfig, args)
    saved = saved_settings(o.resume)
    cfg = SEGMENTATION.resolve_config(o.preset, o.config, given, saved, str(o.resume))
    cfg = onnx_runtime(o.resume, cfg, {*given, *(load_yaml(o.config) if o.config else {})})
    protocols = protocols_for(o.ms, o.scales, o.flip)
    run_evaluation(cfg, o.resume, protocols, save="exp" in given, batch_size=o.eval_batch)


def _add_seg_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="segment one's own RGB-D images with a checkpoint (ours or released)",
        description="Writes OUT/<stem>_color.png, _label.png (raw classes) and _overlay.png "
        "per input. Depth PNG values are multiplied by --depth-scale; zeros (holes) stay "
        "zero, as in training. Folders are paired by file stem.",
    )
    add_config_flags(p, PredictOptions)
    add_config_flags(p, RuntimeConfig)
    p.set_defaults(run=_seg_predict)


def _add_seg_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="validation scores: single scale (released) and multi-scale + flip",
        description="Always prints the released single-scale protocol; --ms adds scales "
        "0.5 0.75 1 1.25 1.5 with horizontal flip (softmax probabilities averaged). With "
        "-c EXP the scores are also appended to RUNS/EXP/metrics.jsonl; without, only printed. "
        "Settings not given are the checkpoint's run's, its precision and layout included (an "
        ".onnx file runs as exported).",
    )
    add_config_flags(p, EvalOptions)
    add_config_flags(p, SegmentationConfig, only=_EVAL_FIELDS)
    p.set_defaults(run=_seg_eval)


@dataclass(frozen=True)
class CheckOptions:
    """``cen data check``'s flags besides the data settings."""

    root: Path = setting(REQUIRED, "the data set's folder", positional=True)
    lists: tuple[str, ...] = setting(("train.txt", "val.txt"), "list files to check")


def _data_check(args: argparse.Namespace) -> None:
    from cenfusion.data.check import check_dataset
    from cenfusion.engine.config import replace_config
    from cenfusion.segmentation.build import modality_specs

    o = options_from_args(CheckOptions, args)
    cfg = replace_config(NYUDV2, given_flags(SegmentationConfig, args))
    cfg.validate()
    report = check_dataset(
        o.root,
        list(dict.fromkeys(o.lists)),
        modality_specs(cfg),
        cfg.num_classes,
        mask_column=cfg.mask_column,
        allow_mixed_depth=cfg.allow_mixed_depth,
    )
    print(f"{o.root}: {report.samples} samples, {report.files} files: OK")


def add_data_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``check``, ``synthetic``, ``nyudv2`` and ``sunrgbd`` to ``cen data``."""
    check = sub.add_parser("check", help="check a list-file data set before training (cached)")
    add_config_flags(check, CheckOptions)
    add_config_flags(
        check,
        SegmentationConfig,
        only=("modalities", "mask_column", "depth_scale", "num_classes", "allow_mixed_depth"),
    )
    check.set_defaults(run=_data_check)
    for name, options, run, help in (
        ("synthetic", SyntheticOptions, _data_synthetic, "write the embedded RGB-D data set"),
        ("nyudv2", NyuOptions, _data_nyudv2, "download and convert NYU Depth v2 (40 classes)"),
        ("sunrgbd", SunOptions, _data_sunrgbd, "download and convert SUN RGB-D (37 classes)"),
    ):
        parser = sub.add_parser(name, help=help)
        add_config_flags(parser, options)
        parser.set_defaults(run=run)
