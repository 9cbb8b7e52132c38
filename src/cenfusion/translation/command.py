"""Command-line glue of the translation task: flags -> :class:`TranslationConfig` -> a call.

``cli.py`` adds the parsers below to its own (``cen i2i train ...``, ``cen data taskonomy ...``)
and calls ``args.run(args)``; everything under these functions takes typed arguments.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cenfusion.data.class_names import TASKONOMY_DOMAINS as DOMAINS
from cenfusion.data.own_images import items_from_columns
from cenfusion.engine.config import (
    REQUIRED,
    add_config_flags,
    given_flags,
    options_from_args,
    setting,
)
from cenfusion.engine.run import RunModeOptions, RuntimeConfig, log
from cenfusion.errors import CenError
from cenfusion.translation.config import TranslationConfig
from cenfusion.translation.demo import DEMO

__all__ = ["DEMO_HELP", "DEMO_SCHEDULE", "add_data_parsers", "add_parsers", "demo"]

DEMO_HELP = "shading + texture -> RGB on the embedded scenes"
#: The demo's epochs.
DEMO_SCHEDULE = (DEMO.epochs,)

_TABLE = ", ".join(f"{i} {d}" for i, d in enumerate(DOMAINS))


def demo(flags: dict[str, Any], epochs: Sequence[int] | None) -> None:
    """``cen demo --task i2i``, for ``epochs`` (one number) if given."""
    from cenfusion.translation.demo import run_translation_demo

    if epochs is not None and len(epochs) != 1:
        raise CenError(
            f"--epochs {' '.join(map(str, epochs))}: the translation demo takes one number"
        )
    schedule = {} if epochs is None else {"epochs": epochs[0]}
    run_translation_demo(replace(DEMO, **flags, **schedule))


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add ``i2i train`` to ``subparsers`` (the ``cen`` command's)."""
    i2i = subparsers.add_parser("i2i", help="multimodal image-to-image translation (Taskonomy)")
    commands = i2i.add_subparsers(dest="i2i_command", required=True)
    p = commands.add_parser(
        "train",
        help="train a CEN U-Net (or evaluate one with --evaluate)",
        description="Train CEN image-to-image translation; every --val-every epochs the "
        "validation predictions are written to RUNS/EXP (input*/ fake*/ real/ best/) with "
        "FID/KID and L1/MSE. Settings: the checkpoint's own (with --resume or --evaluate), "
        "else the released recipe; then --config, then flags.",
    )
    add_config_flags(p, RunModeOptions)
    add_config_flags(p, TranslationConfig)
    p.set_defaults(run=_run_train)

    t = commands.add_parser(
        "predict",
        help="translate one's own views with a checkpoint (ours or released)",
        description="Writes OUT/<stem>.png (the ensemble's translation) per sample, and "
        "with --heads OUT/<stem>_from_<domain>.png per branch, at the size the network sees. "
        "Views are decoded per domain as in validation; folders are paired by file stem "
        "(a Taskonomy name's _domain_<domain> ending left out).",
    )
    add_config_flags(t, TranslateOptions)
    add_config_flags(t, RuntimeConfig)
    t.set_defaults(run=_run_predict)


@dataclass(frozen=True, kw_only=True)
class TranslateOptions:
    """``cen i2i predict``'s flags besides the run-time settings."""

    checkpoint: Path = setting(
        REQUIRED,
        "cenfusion translation checkpoint or released checkpoint-gen-N.pkl",
        positional=True,
    )
    folders: tuple[Path, ...] = setting(
        (),
        "folder with one subfolder per input domain (a Taskonomy root)",
        positional=True,
        metavar="FOLDER",
    )
    input: tuple[str, ...] = setting(
        (),
        "an input domain's image(s) or folder(s), DOMAIN a name or an img-type index",
        repeatable=True,
        metavar="DOMAIN=PATH",
    )
    out: Path = setting(REQUIRED, "output folder", aliases=("-o",))
    size: tuple[int, int] | None = setting(
        None, "size the network sees (default: its run's crop size)", metavar=("H", "W")
    )
    heads: bool = setting(False, "also write each branch's translation")
    dropout: bool | None = setting(
        None, "sample with the generator's dropout on (default: as its run evaluated)"
    )
    seed: int = setting(0, "random seed of the dropout")
    batch_size: int = setting(1, "views per forward pass")


def _run_predict(args: argparse.Namespace) -> None:
    from cenfusion.translation.predict import translate

    o = options_from_args(TranslateOptions, args)
    if o.folders and o.input:
        raise CenError(
            f"FOLDER {o.folders[0]} and --input: give folders with one subfolder per domain "
            "or each domain's paths, not both"
        )
    columns: dict[str, list[Path]] = {}
    for text in o.input:
        domain, eq, path = text.partition("=")
        if not eq or not domain or not path:
            raise CenError(f"--input {text}: expected DOMAIN=PATH")
        columns.setdefault(domain, []).append(Path(path))
    items = [*o.folders, *items_from_columns(columns)]
    if not items:
        raise CenError("nothing to translate: give --input DOMAIN=PATH per domain, or a FOLDER")
    written = translate(
        o.checkpoint,
        items,
        o.out,
        domains=list(columns) or None,
        size=o.size,
        heads=o.heads,
        dropout=o.dropout,
        seed=o.seed,
        batch_size=o.batch_size,
        runtime=options_from_args(RuntimeConfig, args),
    )
    print(f"wrote {len(written)} file{'s' * (len(written) != 1)} to {o.out}")


def _run_train(args: argparse.Namespace) -> None:
    from cenfusion.engine.session import run_command
    from cenfusion.translation.task import TRANSLATION

    mode = options_from_args(RunModeOptions, args)
    run_command(TRANSLATION, given_flags(TranslationConfig, args), mode)


@dataclass(frozen=True)
class TaskonomyOptions:
    """``cen data taskonomy``."""

    out: Path = setting(REQUIRED, "folder to write", positional=True)
    domains: tuple[str, ...] = setting(
        ("reshading", "edge_texture", "rgb"), f"names or img-type indices; {_TABLE}"
    )
    base_url: str | None = setting(None, "where <domain>/<file> lives (the released host)")
    workers: int = setting(4, "parallel downloads")


@dataclass(frozen=True)
class SyntheticTaskonomyOptions:
    """``cen data synthetic-taskonomy``."""

    out: Path = setting(REQUIRED, "folder to write", positional=True)
    num_train: int = setting(200, "training views")
    num_val: int = setting(50, "validation views")
    size: int = setting(128, "image side")
    seed: int = setting(0, "random seed")


def add_data_parsers(data_subparsers: argparse._SubParsersAction) -> None:
    """Add ``taskonomy`` and ``synthetic-taskonomy`` to the ``cen data`` subcommands."""
    p = data_subparsers.add_parser(
        "taskonomy",
        help="download the Taskonomy sample building (only the domains asked for)",
        description="Fetch the 1000 train / 500 val views of CEN's split for each domain, one "
        "file at a time (resumable, present files skipped), and write train.txt / val.txt.",
    )
    add_config_flags(p, TaskonomyOptions)
    p.set_defaults(run=_run_taskonomy)
    s = data_subparsers.add_parser(
        "synthetic-taskonomy",
        help="write synthetic indoor scenes in the Taskonomy layout (the embedded default)",
    )
    add_config_flags(s, SyntheticTaskonomyOptions)
    s.set_defaults(run=_run_synthetic)


def _run_taskonomy(args: argparse.Namespace) -> None:
    from cenfusion.data.taskonomy import DEFAULT_BASE_URL, prepare_taskonomy, resolve_domain

    o = options_from_args(TaskonomyOptions, args)
    out = prepare_taskonomy(o.out, o.domains, o.base_url or DEFAULT_BASE_URL, o.workers)
    names = dict.fromkeys(resolve_domain(d) for d in o.domains)
    log.info(f"wrote {out}: {', '.join(names)}; train.txt, val.txt")


def _run_synthetic(args: argparse.Namespace) -> None:
    from cenfusion.data.synthetic_taskonomy import generate_taskonomy_dataset

    o = options_from_args(SyntheticTaskonomyOptions, args)
    out = generate_taskonomy_dataset(o.out, o.num_train, o.num_val, o.size, o.seed)
    log.info(f"wrote {out}: {o.num_train} train / {o.num_val} val synthetic views")
