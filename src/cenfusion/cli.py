"""The ``cen`` command: parses flags, builds typed configs, calls task functions."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from cenfusion.engine.config import add_config_flags, given_flags
from cenfusion.engine.run import LogRouting, RunConfig, add_run_flags
from cenfusion.errors import MAX_LINE, CenError, shorten
from cenfusion.translation.command import add_i2i_parser, add_taskonomy_data_parser

#: Frames of an internal error's traceback that ``cen`` prints.
INTERNAL_FRAMES = 4


def _demo(args: argparse.Namespace) -> None:
    from dataclasses import replace

    common = {"runs": args.runs, "device": args.device}
    if args.seed is not None:
        common["seed"] = args.seed
    if args.task == "i2i":
        from cenfusion.translation.demo import DEMO, run_translation_demo

        if args.epochs is not None and len(args.epochs) != 1:
            raise CenError(f"--epochs {args.epochs}: the translation demo takes one number")
        epochs = {} if args.epochs is None else {"epochs": args.epochs[0]}
        run_translation_demo(replace(DEMO, **common, **epochs))
        return
    from cenfusion.segmentation.config import SYNTHETIC
    from cenfusion.segmentation.demo import run_demo

    epochs = {} if args.epochs is None else {"epochs": tuple(args.epochs)}
    run_demo(replace(SYNTHETIC, **common, **epochs))


def _seg_train(args: argparse.Namespace) -> None:
    from cenfusion.engine.run import resume_path
    from cenfusion.segmentation.build import config_for
    from cenfusion.segmentation.config import SegmentationConfig
    from cenfusion.segmentation.train import train

    given = given_flags(SegmentationConfig, args)
    run_dir = Path(given.get("runs", "runs")) / given.get("exp", SegmentationConfig.exp)
    resume = resume_path(args.resume, run_dir)
    cfg = config_for(args.preset, args.config, given, resume)
    train(cfg, resume, evaluate_only=args.evaluate, save_img=args.save_img, force=args.force)


def _convert_official(args: argparse.Namespace) -> None:
    from cenfusion.segmentation.modelio import convert_official

    model = convert_official(args.checkpoint, args.out)
    c = model.config
    print(f"wrote {args.out}: {c.backbone}, {c.num_classes} classes, {c.num_modalities} modalities")


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
    from cenfusion.segmentation.config import SegmentationConfig

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
    p.add_argument("--evaluate", action="store_true", help="only evaluate --resume CHECKPOINT")
    p.add_argument("--save-img", action="store_true", help="with --evaluate: write panels")
    add_config_flags(p, SegmentationConfig)
    p.set_defaults(run=_seg_train)


_PREDICT_SETTINGS = ("amp", "channels_last", "compile", "keep_memory")


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
        device=args.device,
        official=args.official,
        modalities=modalities,
        num_classes=args.num_classes,
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
    from cenfusion.segmentation.config import SegmentationConfig
    from cenfusion.segmentation.evaluate import eval_config, protocols_for, run_evaluation

    given = given_flags(SegmentationConfig, args)
    cfg = eval_config(args.preset, args.config, given, args.resume)
    protocols = protocols_for(args.ms, args.scales, args.flip)
    run_evaluation(cfg, args.resume, protocols, save="exp" in given)


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
    p.add_argument("--num-classes", type=int, help="refuse a checkpoint with another count")
    p.add_argument(
        "--official",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="force (or rule out) the released .pth.tar format (default: detect)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add_config_flags(p, RunConfig, only=_PREDICT_SETTINGS)
    p.set_defaults(run=_seg_predict)


def _add_seg_eval(sub: argparse._SubParsersAction) -> None:
    from cenfusion.segmentation.config import SegmentationConfig

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
    p.add_argument("--scales", type=float, nargs="+", help="scales of the extra protocol")
    p.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mirror inputs too (default: on with --ms)",
    )
    p.set_defaults(run=_seg_eval)


def _report(args: argparse.Namespace) -> None:
    from cenfusion.reporting.html import write_report

    print(f"wrote {write_report(args.run_dir)}")


def _info(args: argparse.Namespace) -> None:
    from cenfusion.reporting.info import format_model_info, info_for_encoder, info_from_checkpoint

    size = tuple(args.size) if args.size else None
    if (args.checkpoint is None) == (args.enc is None):
        raise CenError("cen info: give a checkpoint or --enc DEPTH (one of them)")
    if args.checkpoint is not None:
        info = info_from_checkpoint(args.checkpoint, size)
    else:
        info = info_for_encoder(args.enc, args.num_classes, args.num_modalities, size)
    print("\n".join(format_model_info(info)))


def _export_onnx(args: argparse.Namespace) -> None:
    from cenfusion.export import export_checkpoint

    height, width = args.size
    out = export_checkpoint(
        args.checkpoint,
        args.out,
        heads=args.heads,
        height=height,
        width=width,
        dynamic=args.dynamic,
        opset=args.opset,
    )
    print(f"wrote {out}")


def _data_check(args: argparse.Namespace) -> None:
    from cenfusion.data.check import check_dataset
    from cenfusion.engine.config import replace_config
    from cenfusion.segmentation.build import modality_specs
    from cenfusion.segmentation.config import NYUDV2, SegmentationConfig

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


def _add_tools(sub: argparse._SubParsersAction) -> None:
    rep = sub.add_parser("report", help="plots and a self-contained HTML page of a run")
    rep.add_argument("run_dir", type=Path, metavar="RUN", help="the run folder RUNS/EXP")
    rep.set_defaults(run=_report)

    info = sub.add_parser("info", help="parameters, FLOPs, exchange points of a model")
    info.add_argument("checkpoint", type=Path, nargs="?", help="a cenfusion checkpoint")
    info.add_argument("--enc", type=int, choices=(50, 101, 152), help="a fresh CEN RefineNet")
    info.add_argument("--num-classes", type=int, default=40, help="with --enc (40)")
    info.add_argument("--num-modalities", type=int, default=2, help="with --enc (2)")
    info.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="FLOPs input size")
    info.set_defaults(run=_info)

    export = sub.add_parser("export", help="export a model for deployment")
    formats = export.add_subparsers(dest="format", required=True)
    onnx = formats.add_parser("onnx", help="CEN RefineNet checkpoint -> ONNX (onnxruntime)")
    onnx.add_argument("checkpoint", type=Path, help="cenfusion checkpoint or released .pth.tar")
    onnx.add_argument("out", type=Path, help="the .onnx file to write")
    onnx.add_argument("--heads", choices=("all", "ensemble"), default="all", help="outputs (all)")
    onnx.add_argument(
        "--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"), help="(480 640)"
    )
    onnx.add_argument("--dynamic", action="store_true", help="free height and width")
    onnx.add_argument("--opset", type=int, default=17, help="ONNX opset (17)")
    onnx.set_defaults(run=_export_onnx)


def _add_data(sub: argparse._SubParsersAction) -> None:
    from cenfusion.segmentation.config import SegmentationConfig

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cen", description="CEN multimodal fusion")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="ablation on the embedded data: RGB, depth, CEN without and with exchange"
    )
    demo.add_argument(
        "--task",
        choices=("seg", "i2i"),
        default="seg",
        help="seg: the segmentation ablation; i2i: shading + texture -> RGB (default seg)",
    )
    demo.add_argument("--runs", type=Path, default=Path("runs"))
    demo.add_argument("--seed", type=int, default=None, help="default: the demo's own")
    demo.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    demo.add_argument(
        "--epochs",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="a longer or shorter schedule: seg, epochs per stage (4 1); i2i, one number (30)",
    )
    demo.set_defaults(run=_demo)

    seg = sub.add_parser("seg", help="RGB-D semantic segmentation")
    seg_sub = seg.add_subparsers(dest="seg_command", required=True)
    _add_seg_train(seg_sub)
    _add_seg_predict(seg_sub)
    _add_seg_eval(seg_sub)

    data = sub.add_parser("data", help="prepare data sets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    _add_data(data_sub)
    add_taskonomy_data_parser(data_sub)

    add_i2i_parser(sub)

    conv = sub.add_parser("convert-official", help="released CEN .pth.tar -> cenfusion checkpoint")
    conv.add_argument("checkpoint", type=Path)
    conv.add_argument("out", type=Path)
    conv.set_defaults(run=_convert_official)
    _add_tools(sub)
    return parser


def _one_line(err: CenError) -> str:
    """The error's own line, at most :data:`MAX_LINE` characters with the prefix; a
    DataLoader worker wraps it in a traceback, whose last line it is."""
    last = str(err).strip().splitlines()[-1]
    text = last.removeprefix(f"{CenError.__module__}.{CenError.__name__}: ")
    return shorten(text, MAX_LINE - len("cen: error: "))


def _report_internal_error(err: BaseException) -> None:
    """A short traceback (the innermost frames) and where to report it."""
    frames = traceback.extract_tb(err.__traceback__)[-INTERNAL_FRAMES:]
    print("Traceback (innermost frames):", file=sys.stderr)
    print("".join(traceback.format_list(frames)).rstrip(), file=sys.stderr)
    url = _issues_url()
    where = f"at {url}" if url else "to the cenfusion maintainers"
    print(
        f"cen: internal error: {type(err).__name__}: {shorten(str(err), 100)}; please "
        f"report it {where} with the command line and this output",
        file=sys.stderr,
    )


def _issues_url() -> str | None:
    """The issue tracker named in the installed package's metadata (``Project-URL``)."""
    try:
        urls = metadata.metadata("cenfusion").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        return None
    labelled = dict(u.split(", ", 1) for u in urls if ", " in u)
    return labelled.get("Issues") or labelled.get("Bug Tracker")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cen`` command; returns its exit status: 0, 2 for bad input (one line on
    stderr), 130 when interrupted, 1 for an internal error (a short traceback)."""
    args = build_parser().parse_args(argv)
    try:
        with LogRouting():
            from cenfusion.engine.launch import run_per_gpu

            if (code := run_per_gpu(args, argv)) is not None:
                return code
            args.run(args)
    except CenError as err:
        print(f"cen: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cen: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 (every unexpected error ends here)
        _report_internal_error(err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
