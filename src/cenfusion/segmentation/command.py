"""Command-line glue of the segmentation task: ``cen seg ...`` and its ``cen data`` commands;
flags -> :class:`SegmentationConfig` -> a call.

``cli.py`` adds the parsers below to its own and calls ``args.run(args)``; everything under
these functions takes typed arguments.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from cenfusion.engine.config import add_config_flags, given_flags
from cenfusion.engine.run import RunConfig, add_run_flags
from cenfusion.segmentation.config import NYUDV2, SYNTHETIC, SegmentationConfig

__all__ = ["DEMO_HELP", "DEMO_SCHEDULE", "add_data_parsers", "add_parsers", "demo"]

DEMO_HELP = "the segmentation ablation: RGB, depth, CEN without and with exchange"
#: The demo's epochs per stage.
DEMO_SCHEDULE = SYNTHETIC.epochs


def demo(flags: dict[str, Any], epochs: list[int] | None) -> None:
    """``cen demo``: the ablation on the embedded data, ``epochs`` per stage if given."""
    from cenfusion.segmentation.demo import run_demo

    schedule = {} if epochs is None else {"epochs": tuple(epochs)}
    run_demo(replace(SYNTHETIC, **flags, **schedule))


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add ``seg train``, ``seg predict`` and ``seg eval`` to ``subparsers`` (``cen``'s)."""
    seg = subparsers.add_parser("seg", help="RGB-D semantic segmentation")
    commands = seg.add_subparsers(dest="seg_command", required=True)
    _add_seg_train(commands)
    _add_seg_predict(commands)
    _add_seg_eval(commands)


def _seg_train(args: argparse.Namespace) -> None:
    from cenfusion.engine.session import run_command
    from cenfusion.segmentation.task import SEGMENTATION

    run_command(
        SEGMENTATION,
        given_flags(SegmentationConfig, args),
        preset=args.preset,
        yaml_path=args.config,
        resume=args.resume,
        evaluate_only=args.evaluate,
        force=args.force,
        **({"save_img": True} if args.save_img else {}),
    )


def _data_synthetic(args: argparse.Namespace) -> None:
    from cenfusion.data.synthetic import generate_segmentation_dataset

    size = None if args.size is None else tuple(args.size)
    given = {"num_train": args.num_train, "num_val": args.num_val, "size": size}
    out = generate_segmentation_dataset(
        args.out, seed=args.seed, **{k: v for k, v in given.items() if v is not None}
    )
    print(f"wrote {out}")


def _data_nyudv2(args: argparse.Namespace) -> None:
    from cenfusion.data.nyudv2 import NyuUrls, prepare_nyudv2

    defaults = NyuUrls()
    urls = NyuUrls(
        labeled=args.labeled_url or defaults.labeled,
        splits=args.splits_url or defaults.splits,
        class_mapping=args.mapping_url or defaults.class_mapping,
    )
    print(f"wrote {prepare_nyudv2(args.out, from_dir=args.from_dir, urls=urls)}")


def _data_sunrgbd(args: argparse.Namespace) -> None:
    from cenfusion.data.sunrgbd import prepare_sunrgbd

    out = prepare_sunrgbd(
        args.out,
        from_dir=args.from_dir,
        base_url=args.base_url,
        use_refined_depth=not args.raw_depth,
    )
    print(f"wrote {out}")


def _add_seg_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train or evaluate CEN segmentation (runs/EXP/)",
        description="Train CEN RGB-D segmentation. Settings: the preset (synthetic without "
        "--data, nyudv2 with it; a resumed checkpoint's own), then --config, then flags.",
    )
    p.add_argument(
        "--preset", choices=("synthetic", "nyudv2"), help="base settings (see the description)"
    )
    add_run_flags(p)
    p.add_argument(
        "--evaluate", action="store_true", help="evaluate --resume PATH, else best.pth/last.pth"
    )
    p.add_argument("--save-img", action="store_true", help="with --evaluate: write panels")
    add_config_flags(p, SegmentationConfig)
    p.set_defaults(run=_seg_train)


_PREDICT_SETTINGS = ("device", "amp", "channels_last", "compile", "keep_memory")


def _seg_predict(args: argparse.Namespace) -> None:
    from cenfusion.segmentation.predict import gather_cli_inputs, predict

    inputs, modalities = gather_cli_inputs(args.folders, args.rgb, args.depth, args.input)
    written = predict(
        args.checkpoint,
        inputs,
        args.out,
        depth_scale=args.depth_scale,
        size=tuple(args.size) if args.size else None,
        heads=args.heads,
        official=args.official,
        modalities=modalities,
        num_classes=args.num_classes,
        batch_size=args.batch_size,
        **{
            name: getattr(RunConfig, name) if getattr(args, name) is None else getattr(args, name)
            for name in _PREDICT_SETTINGS
        },
    )
    print(f"wrote {len(written)} files to {args.out}")


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
    "device",
    "gpu",
    "amp",
    "channels_last",
    "compile",
    "keep_memory",
)


def _seg_eval(args: argparse.Namespace) -> None:
    from cenfusion.engine.checkpoint import saved_config
    from cenfusion.segmentation.evaluate import protocols_for, run_evaluation
    from cenfusion.segmentation.task import SEGMENTATION

    given = given_flags(SegmentationConfig, args)
    saved = saved_config(args.resume, SEGMENTATION.name)
    cfg = SEGMENTATION.resolve_config(args.preset, args.config, given, saved, str(args.resume))
    protocols = protocols_for(args.ms, args.scales, args.flip)
    run_evaluation(cfg, args.resume, protocols, save="exp" in given, batch_size=args.eval_batch)


def _add_seg_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="segment one's own RGB-D images with a checkpoint (ours or released)",
        description="Writes OUT/<stem>_color.png, _label.png (raw classes) and _overlay.png "
        "per input. Depth PNG values are multiplied by --depth-scale; zeros (holes) stay "
        "zero, as in training. Folders are paired by file stem.",
    )
    p.add_argument("checkpoint", type=Path, help="cenfusion checkpoint or released .pth.tar")
    p.add_argument(
        "folders",
        type=Path,
        nargs="*",
        metavar="FOLDER",
        help="folder with one subfolder per modality (rgb/, depth/)",
    )
    p.add_argument(
        "--rgb", type=Path, nargs="+", action="extend", default=[], help="RGB image(s) or folder(s)"
    )
    p.add_argument(
        "--depth",
        type=Path,
        nargs="+",
        action="extend",
        default=[],
        help="depth PNG(s) or folder(s), matching --rgb one to one",
    )
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME[:KIND]=PATH",
        help="another modality (KIND rgb, depth or gray; default NAME)",
    )
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--depth-scale",
        type=float,
        default=1 / 5000,
        help="multiplies raw depth PNG values (default 1/5000, NYUDv2 mm)",
    )
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="size the network sees; outputs keep each image's own size",
    )
    p.add_argument("--heads", action="store_true", help="also write each modality's head")
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="images per forward pass (1); images share one where the network sees them at "
        "one size (--size, or equal sizes)",
    )
    p.add_argument("--num-classes", type=int, help="refuse a checkpoint with another count")
    p.add_argument(
        "--official",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="force (or rule out) the released .pth.tar format (default: detect)",
    )
    add_config_flags(p, RunConfig, only=_PREDICT_SETTINGS)
    p.set_defaults(run=_seg_predict)


def _add_seg_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="validation scores: single scale (released) and multi-scale + flip",
        description="Always prints the released single-scale protocol; --ms adds scales "
        "0.5 0.75 1 1.25 1.5 with horizontal flip (softmax probabilities averaged).",
    )
    p.add_argument("--resume", type=Path, required=True, help="checkpoint (ours or released)")
    p.add_argument(
        "--preset",
        choices=("synthetic", "nyudv2"),
        help="base settings when the checkpoint holds none",
    )
    p.add_argument("--config", type=Path, help="YAML file of settings (flags win)")
    add_config_flags(p, SegmentationConfig, only=_EVAL_FIELDS)
    p.add_argument("--ms", action="store_true", help="also multi-scale 0.5-1.5 + flip")
    p.add_argument(
        "--batch-size",
        dest="eval_batch",
        type=int,
        default=1,
        help="images per forward pass where consecutive ones share a size (1); same scores",
    )
    p.add_argument("--scales", type=float, nargs="+", help="scales of the extra protocol")
    p.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mirror inputs too (default: on with --ms)",
    )
    p.set_defaults(run=_seg_eval)


def _data_check(args: argparse.Namespace) -> None:
    from cenfusion.data.check import check_dataset
    from cenfusion.engine.config import replace_config
    from cenfusion.segmentation.build import modality_specs

    cfg = replace_config(NYUDV2, given_flags(SegmentationConfig, args))
    report = check_dataset(
        args.root,
        args.lists,
        modality_specs(cfg),
        cfg.num_classes,
        mask_column=cfg.mask_column,
        allow_mixed_depth=cfg.allow_mixed_depth,
    )
    print(f"{args.root}: {report.samples} samples, {report.files} files: OK")


def add_data_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``check``, ``synthetic``, ``nyudv2`` and ``sunrgbd`` to ``cen data``."""
    check = sub.add_parser("check", help="check a list-file data set before training (cached)")
    check.add_argument("root", type=Path)
    check.add_argument(
        "--lists", nargs="+", default=["train.txt", "val.txt"], help="(train.txt val.txt)"
    )
    add_config_flags(
        check,
        SegmentationConfig,
        only=("modalities", "mask_column", "depth_scale", "num_classes", "allow_mixed_depth"),
    )
    check.set_defaults(run=_data_check)

    syn = sub.add_parser("synthetic", help="write the embedded RGB-D data set")
    syn.add_argument("out", type=Path)
    same = "(default: the embedded set's)"
    syn.add_argument("--num-train", type=int, help=f"training images {same}")
    syn.add_argument("--num-val", type=int, help=f"validation images {same}")
    syn.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help=f"image size {same}")
    syn.add_argument("--seed", type=int, default=0)
    syn.set_defaults(run=_data_synthetic)

    nyu = sub.add_parser("nyudv2", help="download and convert NYU Depth v2 (40 classes)")
    nyu.add_argument("out", type=Path)
    nyu.add_argument(
        "--from",
        dest="from_dir",
        type=Path,
        help="folder with the downloaded files, or a released preprocessed set",
    )
    nyu.add_argument("--labeled-url", help="mirror of nyu_depth_v2_labeled.mat")
    nyu.add_argument("--splits-url", help="mirror of splits.mat")
    nyu.add_argument("--mapping-url", help="mirror of classMapping40.mat")
    nyu.set_defaults(run=_data_nyudv2)

    sun = sub.add_parser("sunrgbd", help="download and convert SUN RGB-D (37 classes)")
    sun.add_argument("out", type=Path)
    sun.add_argument(
        "--from",
        dest="from_dir",
        type=Path,
        help="folder with SUNRGBD(.zip) and SUNRGBDtoolbox(.zip)",
    )
    sun.add_argument("--base-url", default="http://rgbd.cs.princeton.edu/data/")
    sun.add_argument("--raw-depth", action="store_true", help="depth/ instead of depth_bfx/")
    sun.set_defaults(run=_data_sunrgbd)
