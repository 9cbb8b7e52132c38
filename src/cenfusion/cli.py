"""The ``cen`` command: parses flags, builds typed configs, calls task functions."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from cenfusion.engine.config import add_config_flags, given_flags
from cenfusion.engine.run import LogRouting, RunConfig
from cenfusion.errors import MAX_LINE, CenError, describe_os_error, shorten
from cenfusion.tasks import COMMANDS

#: Frames of an internal error's traceback that ``cen`` prints.
INTERNAL_FRAMES = 4


def _demo(args: argparse.Namespace) -> None:
    COMMANDS[args.task].demo(given_flags(RunConfig, args), args.epochs)


def _report(args: argparse.Namespace) -> None:
    from cenfusion.reporting.html import write_report

    print(f"wrote {write_report(args.run_dir)}")


def _info(args: argparse.Namespace) -> None:
    from cenfusion.info import format_model_info, info_for_encoder, info_from_checkpoint

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


def _convert_official(args: argparse.Namespace) -> None:
    if args.checkpoint.suffix == ".pkl" or args.discriminator is not None:
        from cenfusion.translation.modelio import convert_official as convert_translation

        net = convert_translation(args.checkpoint, args.discriminator, args.out, args.threshold)
        c = net.config
        judged = " and its discriminator" if args.discriminator else ""
        print(f"wrote {args.out}: U-Net{judged}, {c.num_downs} levels, {c.num_modalities} inputs")
        return
    from cenfusion.segmentation.modelio import convert_official

    model = convert_official(args.checkpoint, args.out)
    c = model.config
    print(f"wrote {args.out}: {c.backbone}, {c.num_classes} classes, {c.num_modalities} modalities")


def _version() -> str:
    """The installed package's version (``unknown`` when run from a source tree)."""
    try:
        return metadata.version("cenfusion")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cen", description="CEN multimodal fusion")
    parser.add_argument("--version", action="version", version=f"cenfusion {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train on the embedded data, to see the method work")
    words = list(COMMANDS)
    demo.add_argument(
        "--task",
        choices=words,
        default=words[0],
        help="; ".join(f"{word}: {c.DEMO_HELP}" for word, c in COMMANDS.items())
        + f" (default {words[0]})",
    )
    add_config_flags(demo, RunConfig, only=("runs", "device"))
    demo.add_argument("--seed", type=int, help="random seed (default: the demo's own)")
    schedules = ", ".join(f"{w} {' '.join(map(str, c.DEMO_SCHEDULE))}" for w, c in COMMANDS.items())
    demo.add_argument(
        "--epochs",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help=f"a longer or shorter schedule, per stage ({schedules})",
    )
    demo.set_defaults(run=_demo)

    data = sub.add_parser("data", help="prepare data sets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    for commands in COMMANDS.values():
        commands.add_parsers(sub)
        commands.add_data_parsers(data_sub)
    conv = sub.add_parser(
        "convert-official",
        help="released CEN checkpoint -> cenfusion checkpoint",
        description="A released segmentation .pth.tar, or a released translation generator "
        "checkpoint-gen-N.pkl (with --discriminator checkpoint-dis-N.pkl).",
    )
    conv.add_argument("checkpoint", type=Path)
    conv.add_argument("out", type=Path)
    conv.add_argument("--discriminator", type=Path, help="translation: the released D (.pkl)")
    conv.add_argument("--threshold", type=float, default=1e-2, help="translation: theta (1e-2)")
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
    """Run the ``cen`` command; returns its exit status: 0, 2 for bad input or an
    operating-system error such as a full disk (one line on stderr), 130 when interrupted,
    1 for an internal error (a short traceback)."""
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
    except OSError as err:
        print(f"cen: error: {shorten(describe_os_error(err), MAX_LINE - 12)}", file=sys.stderr)
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
