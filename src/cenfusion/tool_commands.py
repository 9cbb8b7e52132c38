"""The commands that work on a model or a run of any task: ``cen report``, ``cen info``,
``cen export onnx`` and ``cen convert-official``; flags -> options dataclass -> a call."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from cenfusion.engine.config import (
    REQUIRED,
    add_config_flags,
    flag_name,
    given_flags,
    options_from_args,
    setting,
)
from cenfusion.errors import CenError

__all__ = ["add_tool_parsers"]


@dataclass(frozen=True)
class ReportOptions:
    run_dir: Path = setting(REQUIRED, "the run folder RUNS/EXP", positional=True, metavar="RUN")


def _report(args: argparse.Namespace) -> None:
    from cenfusion.reporting.html import write_report
    from cenfusion.tasks import task_of_run

    run_dir = options_from_args(ReportOptions, args).run_dir
    task = task_of_run(run_dir)
    print(f"wrote {(task.write_report if task else write_report)(run_dir)}")


@dataclass(frozen=True)
class InfoOptions:
    checkpoint: Path | None = setting(None, "a cenfusion checkpoint", positional=True)
    enc: int | None = setting(None, "a fresh CEN RefineNet", choices=(50, 101, 152))
    num_classes: int = setting(40, "with --enc")
    num_modalities: int = setting(2, "with --enc")
    size: tuple[int, int] | None = setting(
        None, "FLOPs input size (default: seg 480 640, i2i the run's crop)", metavar=("H", "W")
    )


def _info(args: argparse.Namespace) -> None:
    from cenfusion.info import format_model_info, info_for_encoder, info_from_checkpoint

    o = options_from_args(InfoOptions, args)
    if (o.checkpoint is None) == (o.enc is None):
        raise CenError("cen info: give a checkpoint or --enc DEPTH (one of them)")
    given = given_flags(InfoOptions, args)
    fresh = [flag_name(n) for n in ("num_classes", "num_modalities") if n in given]
    for name in ("num_classes", "num_modalities"):
        if getattr(o, name) < 1:
            raise CenError(f"{flag_name(name)} {getattr(o, name)}: expected >= 1")
    if o.checkpoint is not None and fresh:
        raise CenError(f"{' '.join(fresh)}: with --enc only; {o.checkpoint} holds its own")
    if o.checkpoint is not None:
        info = info_from_checkpoint(o.checkpoint, o.size)
    else:
        info = info_for_encoder(o.enc, o.num_classes, o.num_modalities, o.size)
    print("\n".join(format_model_info(info)))


@dataclass(frozen=True)
class OnnxOptions:
    checkpoint: Path = setting(
        REQUIRED, "cenfusion checkpoint or released .pth.tar", positional=True
    )
    out: Path = setting(REQUIRED, "the .onnx file to write", positional=True)
    heads: str = setting("all", "outputs", choices=("all", "ensemble"))
    size: tuple[int, int] = setting((480, 640), "input size", metavar=("H", "W"))
    dynamic: bool = setting(False, "free height and width")
    opset: int = setting(17, "ONNX opset")


def _export_onnx(args: argparse.Namespace) -> None:
    from cenfusion.segmentation.export import export_checkpoint

    o = options_from_args(OnnxOptions, args)
    height, width = o.size
    out = export_checkpoint(
        o.checkpoint,
        o.out,
        heads=o.heads,
        height=height,
        width=width,
        dynamic=o.dynamic,
        opset=o.opset,
    )
    print(f"wrote {out}")


@dataclass(frozen=True)
class ConvertOptions:
    checkpoint: Path = setting(
        REQUIRED,
        "released .pth.tar, or translation checkpoint-gen-N.pkl (told apart)",
        positional=True,
    )
    out: Path = setting(REQUIRED, "the cenfusion checkpoint to write", positional=True)
    discriminator: Path | None = setting(None, "translation: the released D (.pkl)")
    threshold: float | None = setting(
        None, "exchange threshold on |gamma| (default: the released 2e-2 seg, 1e-2 i2i)"
    )


def _convert_official(args: argparse.Namespace) -> None:
    from cenfusion.engine.files import refuse_overwriting
    from cenfusion.models.official_translation import released_kind

    o = options_from_args(ConvertOptions, args)
    refuse_overwriting(o.out, "OUT", [o.checkpoint, o.discriminator])
    threshold = {} if o.threshold is None else {"threshold": o.threshold}  # else each default
    kind = released_kind(o.checkpoint)
    if kind == "discriminator":
        raise CenError(
            f"{o.checkpoint}: a released discriminator; convert its generator, with this "
            "file as --discriminator"
        )
    translation = kind == "generator" or (kind is None and o.checkpoint.suffix == ".pkl")
    if o.discriminator is not None or translation:
        from cenfusion.translation.modelio import convert_official as convert_translation

        net = convert_translation(o.checkpoint, o.discriminator, o.out, **threshold)
        c = net.config
        judged = " and its discriminator" if o.discriminator else ""
        print(f"wrote {o.out}: U-Net{judged}, {c.num_downs} levels, {c.num_modalities} inputs")
        return
    from cenfusion.segmentation.modelio import convert_official

    model = convert_official(o.checkpoint, o.out, **threshold)
    c = model.config
    print(f"wrote {o.out}: {c.backbone}, {c.num_classes} classes, {c.num_modalities} modalities")


def add_tool_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``convert-official``, ``report``, ``info`` and ``export onnx`` to ``cen``."""
    conv = sub.add_parser(
        "convert-official",
        help="released CEN checkpoint -> cenfusion checkpoint",
        description="A released segmentation .pth.tar, or a released translation generator "
        "checkpoint-gen-N.pkl (with --discriminator checkpoint-dis-N.pkl).",
    )
    add_config_flags(conv, ConvertOptions)
    conv.set_defaults(run=_convert_official)
    rep = sub.add_parser("report", help="plots and a self-contained HTML page of a run")
    add_config_flags(rep, ReportOptions)
    rep.set_defaults(run=_report)
    info = sub.add_parser("info", help="parameters, FLOPs, exchange points of a model")
    add_config_flags(info, InfoOptions)
    info.set_defaults(run=_info)
    export = sub.add_parser("export", help="export a model for deployment")
    formats = export.add_subparsers(dest="format", required=True)
    onnx = formats.add_parser("onnx", help="CEN RefineNet checkpoint -> ONNX (onnxruntime)")
    add_config_flags(onnx, OnnxOptions)
    onnx.set_defaults(run=_export_onnx)
